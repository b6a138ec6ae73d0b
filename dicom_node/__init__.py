"""PACS-facing node: SCP, spool, completeness, routing, sending."""
