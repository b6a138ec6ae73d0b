"""Spool: each instance is written atomically (temp, fsync, rename, fsync dir) under keyed, UID-free names."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.logs import key_of

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


class SpoolFull(Exception):
    """Free disk is under the reserve: refuse before writing."""


class InvalidUid(ValueError):
    """A UID is empty, too long or not digits and dots; the message names the attribute, not the value."""


def check_uid(keyword: str, value: object) -> str:
    text = str(value or "").rstrip("\x00 ")
    if not text or len(text) > 64 or not _UID.match(text):
        raise InvalidUid(f"{keyword} is not a valid UID")
    return text


@dataclass(frozen=True, slots=True)
class SpooledInstance:
    study_key: str
    series_key: str
    sop_key: str
    path: str          # relative to the spool root


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes so that the file is either absent or complete and durable, even after a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class Spool:
    """The node's durable store of received instances; names are keyed hashes, never values from the dataset."""

    def __init__(self, root: Path, log_key: bytes, *, reserve_bytes: int) -> None:
        self.root = root
        self._log_key = log_key
        self._reserve_bytes = reserve_bytes
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError("spool directory is not writable")

    def keys(self, study_uid: str, series_uid: str, sop_uid: str) -> tuple[str, str, str]:
        return (key_of(self._log_key, study_uid), key_of(self._log_key, series_uid), key_of(self._log_key, sop_uid))

    def put(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> SpooledInstance:
        """Store one encoded instance (DICOM file format bytes); raise SpoolFull before writing anything."""
        if shutil.disk_usage(self.root).free - len(data) < self._reserve_bytes:
            raise SpoolFull("free disk under the reserve")
        study_key, series_key, sop_key = self.keys(study_uid, series_uid, sop_uid)
        relative = Path(study_key) / series_key / f"{sop_key}.dcm"
        write_atomic(self.root / relative, data)
        return SpooledInstance(study_key, series_key, sop_key, str(relative))

    def write_manifest(self, study_key: str, series_key: str, job_id: str, files: Sequence[str]) -> str:
        """Write the file list of one job next to its series; return its spool-relative path."""
        relative = Path(study_key) / series_key / f"manifest-{job_id}.json"
        write_atomic(self.root / relative, json.dumps({"files": list(files)}).encode())
        return str(relative)

    def read_manifest(self, relative: str) -> list[Path]:
        files = json.loads(self.resolve(relative).read_text(encoding="utf-8"))["files"]
        return [self.resolve(item) for item in files]

    def resolve(self, relative: str) -> Path:
        """Map a spool-relative path to a file, refusing anything that escapes the spool."""
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError("path escapes the spool")
        return path

    def remove_series(self, study_key: str, series_key: str) -> None:
        shutil.rmtree(self.root / study_key / series_key, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / study_key).rmdir()
