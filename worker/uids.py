"""Deterministic output UIDs: the same (source series, model, version, revision, role) always yields the same UID."""

from __future__ import annotations

import hashlib


def derive_uid(*parts: str) -> str:
    """Return a 2.25 UID (UUID-derived, ≤ 44 chars) from a SHA-256 over the parts.

    Re-running a model on the same series therefore replaces its earlier results instead of duplicating them.
    """
    digest = hashlib.sha256("\x1f".join(("pacsai", *parts)).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def revision_base(source_series_uid: str, model: str, version: str, revision: int = 1) -> tuple[str, ...]:
    """What every result UID of one revision derives from.

    Revision 1 (the first result of a series and model) keeps the base results always had, so a redelivered or
    re-run first job replaces its own results; revision n > 1 (a later instance set, see State.close_series) adds
    "revision n", so a superseding result is a new instance next to the one it supersedes, never over it.
    """
    if revision < 1:
        raise ValueError(f"revision {revision}: revisions count from 1")
    base = (source_series_uid, model, version)
    return base if revision == 1 else (*base, f"revision {revision}")


def output_uids(source_series_uid: str, model: str, version: str, revision: int = 1) -> dict[str, str]:
    """Series and instance UIDs for the SEG and SR made from one source series by one model version."""
    base = revision_base(source_series_uid, model, version, revision)
    return {role: derive_uid(*base, role) for role in ("seg_series", "seg_instance", "sr_series", "sr_instance")}
