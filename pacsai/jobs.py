"""Job messages: small JSON dicts of our own ids and spool-relative paths, never pixels or patient data."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import Enum, StrEnum
from typing import Any

from pacsai.errors import PacsaiError


class JobState(Enum):
    PENDING = "pending"  # recorded, not yet on the queue
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"  # failed in a way worth another try; enqueued again by the node when due
    WAITING = "waiting"  # a resource ran out (disk, host memory, broker): resumes by itself when it returns
    ENCODED = "encoded"  # results written to the outbox
    DELIVERED = "delivered"
    COMMITTED = "committed"  # delivered, and the destination confirmed it has every result (storage commitment/C-FIND)
    FAILED = "failed"  # not retryable: reason recorded
    DEAD = "dead"  # retries exhausted: reason recorded
    CANCELLED = "cancelled"  # an operator cancelled it before it ran


class SeriesState(Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"  # jobs created
    NO_MODEL = "no_model"
    PURGED = "purged"  # jobs ended and retention passed: spooled files deleted


class Priority(StrEnum):
    """How urgent a job is (routing rules set it): STAT jobs go ahead of waiting routine ones; background jobs wait
    for the off-peak window. `rank` orders them, most urgent first."""

    STAT = "stat"
    ROUTINE = "routine"
    BACKGROUND = "background"

    @property
    def rank(self) -> int:
        return (Priority.STAT, Priority.ROUTINE, Priority.BACKGROUND).index(self)


class DeliveryStatus(Enum):
    """The last outcome of sending one result file (`deliveries.status`): a C-STORE outcome or a fallback."""

    SUCCESS = "success"
    WARNING = "warning"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    FALLBACK = "fallback"  # the peer refused the SOP class; the profile's fallback went instead


J = JobState
# The job state machine: every change of a job's state is checked against this table (pacsai.job_table).
JOB_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    J.PENDING: frozenset({J.QUEUED, J.RUNNING, J.FAILED, J.CANCELLED}),
    J.QUEUED: frozenset({J.QUEUED, J.RUNNING, J.FAILED, J.DEAD, J.CANCELLED, J.WAITING}),
    J.RUNNING: frozenset({J.RUNNING, J.QUEUED, J.RETRYING, J.WAITING, J.ENCODED, J.DELIVERED, J.FAILED, J.DEAD}),
    J.RETRYING: frozenset({J.QUEUED, J.RUNNING, J.FAILED, J.DEAD, J.CANCELLED}),
    J.WAITING: frozenset({J.QUEUED, J.RUNNING, J.ENCODED, J.CANCELLED}),
    J.ENCODED: frozenset({J.ENCODED, J.WAITING, J.DELIVERED, J.FAILED, J.DEAD}),
    J.DELIVERED: frozenset({J.ENCODED, J.COMMITTED}),  # an operator re-delivers; the PACS confirms it has them all
    J.COMMITTED: frozenset({J.ENCODED}),  # an operator re-delivers the results
    J.FAILED: frozenset({J.PENDING}),  # an operator retries it, or the series is sent again
    J.DEAD: frozenset({J.PENDING}),
    J.CANCELLED: frozenset({J.PENDING}),
}
ENDED_JOB_STATES = frozenset({J.DELIVERED, J.COMMITTED, J.FAILED, J.DEAD, J.CANCELLED})

S = SeriesState
SERIES_TRANSITIONS: Mapping[SeriesState, frozenset[SeriesState]] = {
    S.RECEIVING: frozenset({S.RECEIVING, S.COMPLETE, S.NO_MODEL}),
    S.COMPLETE: frozenset({S.RECEIVING, S.PURGED}),  # a late instance re-opens it
    S.NO_MODEL: frozenset({S.RECEIVING, S.PURGED}),
    S.PURGED: frozenset({S.RECEIVING}),  # sent again after its files were deleted
}

D = DeliveryStatus
# A file's status changes with each attempt: any attempt may follow any other, but a stored file stays stored.
DELIVERY_TRANSITIONS: Mapping[DeliveryStatus | None, frozenset[DeliveryStatus]] = {
    None: frozenset(DeliveryStatus),
    D.TRANSIENT: frozenset(DeliveryStatus),
    D.PERMANENT: frozenset(DeliveryStatus),  # after an operator fixed the peer and re-delivered
    D.SUCCESS: frozenset({D.SUCCESS, D.WARNING}),  # a re-delivery stores the same instance again
    D.WARNING: frozenset({D.SUCCESS, D.WARNING}),
    D.FALLBACK: frozenset({D.FALLBACK, D.SUCCESS, D.WARNING}),
}


class IllegalTransition(PacsaiError):
    """A state change the transition table does not allow: a bug in the caller, never a peer's or a study's fault."""

    retryable = False


def check_transition(table: Mapping[Any, frozenset[Any]], old: Any, new: Any, what: str) -> None:
    """Raise IllegalTransition unless `table` allows `old` → `new`."""
    if new not in table.get(old, frozenset()):
        old_name = old.value if isinstance(old, Enum) else old
        raise IllegalTransition(f"{what}: {old_name} → {new.value} is not an allowed transition")


class Claim(StrEnum):
    """What claiming a job for a run gave (pacsai.job_table.JobTable.claim_job)."""

    CLAIMED = "claimed"
    HELD = "held"  # another live process holds a fresh lease on it
    EXHAUSTED = "exhausted"  # it already started the maximum number of times
    UNKNOWN = "unknown"  # no such job


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
    priority: Priority = Priority.ROUTINE

    def to_message(self) -> dict[str, str]:
        """The message; a routine job's carries no priority, as messages did before priorities. A job on a
        de-identified copy (manifest under deid/) names its study and series by its job id: a remote worker cannot
        tell that two jobs came from one series (the worker needs neither key)."""
        message = {**asdict(self), "revision": str(self.revision), "priority": self.priority.value}
        if self.manifest.startswith("deid/"):  # pacsai.storage.DEID_DIR
            message["study_key"] = message["series_key"] = self.job_id
        if self.priority is Priority.ROUTINE:
            del message["priority"]
        return message

    @classmethod
    def from_message(cls, message: Mapping[str, str]) -> SeriesJob:
        """A message of this or an older release (without revision or priority: a first, routine job)."""
        later = ("revision", "supersedes", "priority")
        named = {name: str(message[name]) for name in cls.__dataclass_fields__ if name not in later}
        return cls(
            **named,
            revision=int(message.get("revision", 1)),
            supersedes=str(message.get("supersedes", "")),
            priority=Priority(message.get("priority", Priority.ROUTINE.value)),
        )


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
