"""Our error tree; messages never carry patient data or DICOM UIDs.

PacsaiError
├── ConfigError              a PACSAI_* variable is missing or wrong (names the variable)
└── WorkerError              .retryable says whether a job may be tried again
    ├── StudyRejected        the series cannot be processed (not a volume, undecodable, …)
    ├── ModelError           the model is missing, broken or failed
    ├── PeerUnavailable      the PACS could not be reached or dropped the association (retryable)
    ├── PeerRefused          the PACS answered with a failure status (not retryable)
    └── ResourceExhausted    disk, host memory or broker ran out: the job waits for it, no attempt is spent
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from enum import StrEnum


class PacsaiError(Exception):
    """Root of every error we raise on purpose."""


class ConfigError(PacsaiError):
    """Settings are wrong; the message names the PACSAI_* variable."""


class WorkerError(PacsaiError):
    retryable = False


class StudyRejected(WorkerError):
    retryable = False


class ModelError(WorkerError):
    retryable = False


class PeerUnavailable(WorkerError):
    retryable = True


class PeerRefused(WorkerError):
    retryable = False


class Resource(StrEnum):
    """What a job can wait for (JobState.WAITING): its reason names it, so the reconciler knows when to resume."""

    DISK = "disk"
    MEMORY = "memory"
    BROKER = "broker"

    @property
    def waiting_reason(self) -> str:
        return _WAITING_REASONS[self]

    @classmethod
    def of_reason(cls, reason: str) -> Resource | None:
        """The resource a waiting job's reason names (None for any other reason)."""
        return next((resource for resource, text in _WAITING_REASONS.items() if reason.startswith(text)), None)


_WAITING_REASONS = {
    Resource.DISK: "waiting: no space left on the data volume",
    Resource.MEMORY: "waiting: not enough free memory on the host",
    Resource.BROKER: "waiting: the broker refuses or cannot take messages",
}
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class ResourceExhausted(WorkerError):
    """A resource the job needs ran out; the job waits (not failed, no attempt spent) until it comes back."""

    retryable = True

    def __init__(self, resource: Resource, detail: str = "") -> None:
        super().__init__(resource.waiting_reason + (f" ({detail})" if detail else ""))
        self.resource = resource


def exhausted_resource(exc: BaseException) -> Resource | None:
    """The resource that ran out, anywhere in the exception's chain: no space (ENOSPC, EDQUOT, SQLite's "database or
    disk is full"), host memory (MemoryError, torch's CPU allocator); None when the failure is something else."""
    for current in causes(exc):
        if isinstance(current, ResourceExhausted):
            return current.resource
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return Resource.DISK
        if isinstance(current, sqlite3.OperationalError) and getattr(current, "sqlite_errorcode", 0) == 13:
            return Resource.DISK  # SQLITE_FULL
        if isinstance(current, MemoryError) or (
            isinstance(current, RuntimeError) and "can't allocate memory" in str(current)
        ):
            return Resource.MEMORY
    return None


def causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then what it was raised from or during (__cause__, else __context__), each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
