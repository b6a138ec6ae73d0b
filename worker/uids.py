"""Deterministic output UIDs: the same (source series, model, version, role) always yields the same UID."""

from __future__ import annotations

import hashlib


def derive_uid(*parts: str) -> str:
    """Return a 2.25 UID (UUID-derived, ≤ 44 chars) from a SHA-256 over the parts.

    Re-running a model on the same series therefore replaces its earlier results instead of duplicating them.
    """
    digest = hashlib.sha256("\x1f".join(("pacsai", *parts)).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def output_uids(source_series_uid: str, model: str, version: str) -> dict[str, str]:
    """Series and instance UIDs for the SEG and SR made from one source series by one model version."""
    base = (source_series_uid, model, version)
    return {role: derive_uid(*base, role) for role in ("seg_series", "seg_instance", "sr_series", "sr_instance")}
