"""DIMSE status codes we answer with on purpose, and how we classify the ones a PACS answers us."""

from __future__ import annotations

from enum import Enum

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # C-STORE: refused, out of resources (spool full, reserve crossed)
DATASET_DOES_NOT_MATCH = 0xA900  # C-STORE: dataset does not match SOP class / command
CANNOT_UNDERSTAND = 0xC000  # C-STORE: cannot understand (malformed header, invalid UIDs)
PIXELS_TOO_LARGE = 0xC001  # C-STORE: decoded pixel data over the size cap (never fits: not 0xA7xx)
NO_DECODER = 0xC002  # C-STORE: pixel data in a transfer syntax no decoder exists for
PROCESSING_FAILURE = 0x0110  # unexpected internal failure while storing


class StoreOutcome(Enum):
    SUCCESS = "success"
    WARNING = "warning"  # stored with coercion etc.: counts as delivered
    TRANSIENT = "transient"  # retry later (0xA7xx out of resources, 0x0122-style busy)
    PERMANENT = "permanent"  # never retry (0xA9xx, 0xCxxx, other failures)


def classify(status: int) -> StoreOutcome:
    """Classify a C-STORE response status from a peer (PS3.4 B.2.3, PS3.7 C)."""
    if status == SUCCESS:
        return StoreOutcome.SUCCESS
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return StoreOutcome.WARNING
    if 0xA700 <= status <= 0xA7FF or status in (0x0213, 0xFE00):
        return StoreOutcome.TRANSIENT
    return StoreOutcome.PERMANENT


# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 is permanent, 2 transient; reason texts by (source, reason)
_RJ_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
_RJ_SOURCES = {1: "service user", 2: "service provider (ACSE)", 3: "service provider (presentation)"}


def classify_rejection(result: int) -> StoreOutcome:
    """An association rejection: "rejected-permanent" (1) is not retried, "rejected-transient" (2) is."""
    return StoreOutcome.TRANSIENT if result == 2 else StoreOutcome.PERMANENT


def describe_rejection(result: int, source: int, reason: int) -> str:
    """An A-ASSOCIATE-RJ in words, with its three codes (for logs and job reasons)."""
    kind = {1: "permanently", 2: "transiently"}.get(result, "with an unknown result")
    why = _RJ_REASONS.get((source, reason), "reserved reason")
    return f"rejected {kind} by the {_RJ_SOURCES.get(source, 'unknown source')}: {why} ({result}, {source}, {reason})"
