"""Streamed receipt (C15): each C-STORE data set goes to a file as its PDUs arrive, never whole into memory.

pynetdicom streams when `_config.STORE_RECV_CHUNKED_DATASET` is on, into whatever `dimse_messages.NamedTemporaryFile`
returns. For the associations of our own AE that is an `IncomingFile`: it lives in the node's incoming directory (next
to the spool, which then takes it by a rename), stops growing at PACSAI_MAX_INSTANCE_MB and survives a full disk, so
the C-STORE handler can still answer with a status (0xC001, 0xA700) where pynetdicom would drop the association.
The SHA-256 the spool records (S7) is computed here, as the bytes are written, so the file is not read again for it.
Other AEs in the same process (a test's fake PACS) get pynetdicom's own temporary file, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages

TOO_LARGE = "larger than PACSAI_MAX_INSTANCE_MB"
WRITE_FAILED = "could not be written to disk"
_PREFIX = "incoming-"
_pynetdicom_file = dimse_messages.NamedTemporaryFile  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Policy:
    directory: Path
    max_bytes: int


class IncomingFile:
    """What pynetdicom streams one data set into; it calls write(), file.flush() and close(), and reads `name`."""

    def __init__(self, policy: Policy) -> None:
        self.file = self
        self.size = 0
        self.problem = ""  # TOO_LARGE or WRITE_FAILED: the C-STORE handler refuses the instance
        self._max_bytes = policy.max_bytes
        self._handle: Any = None
        self._hash = hashlib.sha256()
        try:
            policy.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # unbuffered: a full disk surfaces in write(), not in a close() that pynetdicom does not expect to fail
            self._handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - pynetdicom closes it, we delete it
                mode="wb", buffering=0, prefix=_PREFIX, suffix=".dcm", dir=policy.directory, delete=False
            )
            self.name = self._handle.name
        except OSError:  # no inode, read-only, directory gone: refuse the instance, keep the association
            self.problem = WRITE_FAILED
            self.name = str(policy.directory / f"{_PREFIX}{os.getpid()}-never-created")  # pynetdicom unlinks it

    def write(self, data: bytes) -> int:
        """Append, or once over the cap or after a write error, drop: the rest still has to be read off the wire."""
        if self.problem:
            return len(data)
        if self.size + len(data) > self._max_bytes:
            self._give_up(TOO_LARGE)
            return len(data)
        view = memoryview(data)
        try:
            while view:
                view = view[self._handle.write(view) :]
        except OSError:
            self._give_up(WRITE_FAILED)
            return len(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    @property
    def digest(self) -> str:
        """Hex SHA-256 of the bytes written ('' once a problem stopped the writing)."""
        return "" if self.problem else self._hash.hexdigest()

    def flush(self) -> None:
        """Nothing is buffered here (pynetdicom flushes after each fragment)."""

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()

    def discard(self) -> None:
        self.close()
        if self._handle is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.name)

    def _give_up(self, problem: str) -> None:
        self.problem = problem
        with contextlib.suppress(OSError, ValueError):
            os.ftruncate(self._handle.fileno(), 0)  # give the disk back now, not when the data set ends


_policies: weakref.WeakKeyDictionary[Any, Policy] = weakref.WeakKeyDictionary()


def stream_to_files(ae: Any, policy: Policy) -> None:
    """Stream the data sets this AE receives into files under `policy` (pynetdicom's switch is process-wide)."""
    policy.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _policies[ae] = policy
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _open  # type: ignore[attr-defined]


def _open(*args: Any, **kwargs: Any) -> Any:
    # pynetdicom decodes P-DATA in the association's own DUL thread, which knows its association and so its AE
    assoc = getattr(threading.current_thread(), "assoc", None)
    ae = getattr(assoc, "ae", None)
    policy = _policies.get(ae) if ae is not None else None
    return IncomingFile(policy) if policy is not None else _pynetdicom_file(*args, **kwargs)


def problem_of(request: Any) -> str:
    """Why a received data set must be refused before it is even read ('' when it arrived whole)."""
    received = getattr(request, "_dataset_file", None)
    return received.problem if isinstance(received, IncomingFile) else ""


def digest_of(request: Any) -> str | None:
    """SHA-256 of the data set file as it was streamed to disk, or None (not streamed by us: hash the file)."""
    received = getattr(request, "_dataset_file", None)
    return (received.digest or None) if isinstance(received, IncomingFile) else None


def discard_partial(assoc: Any) -> None:
    """An association that ended in the middle of a data set leaves its partial file behind: delete it (N10)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if isinstance(partial, IncomingFile):
        partial.discard()


def remove_leftovers(directory: Path) -> int:
    """At start: partial files of a node that was killed mid-transfer (N11); return how many were removed."""
    removed = 0
    for path in directory.glob(f"{_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed
