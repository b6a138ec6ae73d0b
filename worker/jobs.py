"""Job messages: small JSON dicts of our own ids and spool-relative paths, never pixels or patient data."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import Enum


class JobState(Enum):
    PENDING = "pending"        # recorded, not yet on the queue
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"      # failed in a way worth another try; enqueued again by the node when due
    ENCODED = "encoded"        # results written to the outbox
    DELIVERED = "delivered"
    FAILED = "failed"          # not retryable: reason recorded
    DEAD = "dead"              # retries exhausted: reason recorded


class SeriesState(Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"      # jobs created
    NO_MODEL = "no_model"
    PURGED = "purged"          # jobs ended and retention passed: spooled files deleted


def job_id_for(series_key: str, model: str, instance_keys: Iterable[str]) -> str:
    """Job identity = (series, model, exact instance set): the same input never becomes two jobs."""
    digest = hashlib.sha256("\x1f".join((series_key, model, *sorted(instance_keys))).encode()).hexdigest()
    return digest[:24]


@dataclass(frozen=True, slots=True)
class SeriesJob:
    """One model run on one series; `manifest` is relative to the spool directory.

    `revision` counts the jobs of one series and model (a later instance set makes the next, see State.close_series);
    `supersedes` is the job whose delivered results this one's replace ("" when none), set when it is queued.
    """

    job_id: str
    study_key: str
    series_key: str
    model: str
    manifest: str
    destination: str
    revision: int = 1
    supersedes: str = ""

    def to_message(self) -> dict[str, str]:
        return {**asdict(self), "revision": str(self.revision)}

    @classmethod
    def from_message(cls, message: Mapping[str, str]) -> SeriesJob:
        """A message of this or an older release (without revision: a first job)."""
        later = ("revision", "supersedes")
        named = {name: str(message[name]) for name in cls.__dataclass_fields__ if name not in later}
        return cls(**named, revision=int(message.get("revision", 1)), supersedes=str(message.get("supersedes", "")))


@dataclass(frozen=True, slots=True)
class Delivery:
    """Results of one job waiting in the outbox for one destination."""

    job_id: str
    destination: str

    def to_message(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_message(cls, message: Mapping[str, str]) -> Delivery:
        return cls(job_id=str(message["job_id"]), destination=str(message["destination"]))
