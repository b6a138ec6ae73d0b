"""Our error tree; messages never carry patient data or DICOM UIDs.

    PacsaiError
    ├── ConfigError              a PACSAI_* variable is missing or wrong (names the variable)
    └── WorkerError              .retryable says whether a job may be tried again
        ├── StudyRejected        the series cannot be processed (not a volume, undecodable, …)
        ├── ModelError           the model is missing, broken or failed
        ├── PeerUnavailable      the PACS could not be reached or dropped the association (retryable)
        └── PeerRefused          the PACS answered with a failure status (not retryable)
"""

from __future__ import annotations

from collections.abc import Iterator


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


def causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then what it was raised from or during (__cause__, else __context__), each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
