# over 300 lines: the spool's writing, integrity (S7) and layout stay in one module
"""Spool: each instance is written atomically (temp, fsync, rename, fsync dir) under keyed, UID-free names.

Every file written here carries the SHA-256 of its bytes in an extended attribute of its own inode (it moves with the
file on rename, so concurrent writers of one instance cannot mismatch it); the worker compares it before it uses a
file (fault catalogue S7). A file system without extended attributes keeps no hash, and such files go unchecked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pacsai.errors import ConfigError, Resource, ResourceExhausted, StudyRejected
from pacsai.logs import key_of
from pacsai.settings import Settings

log = logging.getLogger(__name__)
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
DEID_DIR = "deid"  # spool/deid/<job_id>/: de-identified copies, all a remote worker may see (A10)
HASH_ATTRIBUTE = "user.pacsai.sha256"  # S7: hex SHA-256 of the bytes as written, on the file's own inode
DIR_MODE, FILE_MODE = 0o700, 0o600  # the data dir holds patient data: its owner only (docs/security.md)


class SpoolFull(Exception):
    """Free disk is under the reserve: refuse before writing."""


class SpoolUnusable(ConfigError):
    """The spool directory cannot be created or written (S5): the node refuses to start, never writes elsewhere."""


class SpoolCorrupted(StudyRejected):
    """A spooled file no longer matches the hash recorded when it was written (S7): never inferred on or exported."""


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
    path: str  # relative to the spool root


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp")


def _record_hash(fd: int, digest: str) -> None:
    """Keep the hash on the file itself; where the file system has no extended attributes the file keeps none."""
    with contextlib.suppress(OSError):
        os.setxattr(fd, HASH_ATTRIBUTE, digest.encode("ascii"))


def recorded_hash(path: Path) -> str | None:
    """The hash recorded when the file was written, or None (none recorded, or no extended attributes here)."""
    try:
        return os.getxattr(path, HASH_ATTRIBUTE).decode("ascii", "replace")
    except OSError:
        return None


def file_hash(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def require_room(directory: Path, nbytes: int, reserve_bytes: int) -> None:
    """Raise ResourceExhausted (disk) when writing `nbytes` under `directory` would leave less than `reserve_bytes`
    free: the reserve the node keeps for incoming instances (PACSAI_SPOOL_RESERVE_MB) is never written into."""
    if reserve_bytes <= 0:
        return
    existing = next((p for p in (directory, *directory.parents) if p.exists()), directory)
    free = shutil.disk_usage(existing).free
    if free - nbytes < reserve_bytes:
        raise ResourceExhausted(
            Resource.DISK, f"{free >> 20} MB free, {nbytes >> 10} kB to write, reserve {reserve_bytes >> 20} MB"
        )


def write_atomic(path: Path, data: bytes, *, reserve_bytes: int = 0) -> None:
    """Write bytes so that the file is either absent or complete and durable, even after a power cut.

    The file is never executable (0600) and carries the hash of `data` (see the module docstring). With
    `reserve_bytes`, ResourceExhausted is raised before writing when the disk would fall under that reserve.
    """
    require_room(path.parent, len(data), reserve_bytes)
    with _placed(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        _record_hash(handle.fileno(), hashlib.sha256(data).hexdigest())
        os.fsync(handle.fileno())


def move_atomic(source: Path, path: Path, *, digest: str | None = None) -> None:
    """write_atomic for a file already on disk (a streamed receipt): renamed when on the same file system, else
    copied by the kernel; never read into memory whole. `source` is gone afterwards unless it had to be copied.
    `digest`: the SHA-256 of `source` computed while it was written (else the file is read to hash it)."""
    with _placed(path) as tmp:
        try:
            os.replace(source, tmp)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.copyfile(source, tmp)
            digest = None  # a copy is hashed as it landed
        digest = digest or file_hash(tmp)
        with open(tmp, "rb") as handle:
            _record_hash(handle.fileno(), digest)
            os.fsync(handle.fileno())


@contextmanager
def _placed(path: Path) -> Iterator[Path]:
    """A temp name beside `path` for the block to fill; then it becomes `path` (mode 0600, directory fsync'd),
    or is removed when the block fails."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tmp = _temp_for(path)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def check_intact(paths: Sequence[Path], *, what: str = "instance") -> None:
    """S7: compare each file with the hash recorded when it was written; raise SpoolCorrupted if any differs."""
    judge_intact([intact(path) for path in paths], what=what)


def intact(path: Path, data: bytes | None = None) -> bool | None:
    """Whether `path` (`data`: its bytes, already read) matches the hash recorded at writing; None: none recorded."""
    expected = recorded_hash(path)
    if expected is None:
        return None
    return (file_hash(path) if data is None else hashlib.sha256(data).hexdigest()) == expected


def judge_intact(verdicts: Sequence[bool | None], *, what: str = "instance") -> None:
    """The files' `intact` verdicts: a warning for unchecked ones, SpoolCorrupted if any differs."""
    unchecked, corrupted = verdicts.count(None), verdicts.count(False)
    if unchecked:
        log.warning("%d of %d %s file(s) carry no recorded hash and were not checked", unchecked, len(verdicts), what)
    if corrupted:
        counts = f"{corrupted} of {len(verdicts)}"
        log.error("%s spooled %s file(s) differ from the hash recorded when they were written", counts, what)
        raise SpoolCorrupted(f"spooled {what} corrupted: {counts} file(s) differ from what was received")


def _unusable(root: Path, exc: OSError) -> SpoolUnusable:
    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return SpoolUnusable(
        f"spool directory {root} cannot be used ({reason}); PACSAI_DATA_DIR must be a writable "
        "directory on a local or shared disk (the spool is its spool/ folder)"
    )


class Spool:
    """The node's durable store of received instances; names are keyed hashes, never values from the dataset."""

    def __init__(self, root: Path, log_key: bytes, *, reserve_bytes: int) -> None:
        self.root = root
        self._log_key = log_key
        self._reserve_bytes = reserve_bytes
        try:
            root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise _unusable(root, exc) from None
        if not os.access(root, os.W_OK):
            code = errno.EROFS if os.statvfs(root).f_flag & os.ST_RDONLY else errno.EACCES
            raise _unusable(root, OSError(code, os.strerror(code)))

    def check_writable(self) -> None:
        """S5, at the node's start: really write, sync and delete a file, so a read-only or full file system stops
        the node here (with a message naming the directory) instead of refusing every instance later."""
        probe = self.root / f".probe-{os.getpid()}"
        try:
            write_atomic(probe, b"pacsai spool probe")
            hashed = recorded_hash(probe) is not None
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink()
            raise _unusable(self.root, exc) from None
        if not hashed:
            log.warning(
                "the spool's file system keeps no extended attributes: spooled files are not checked for corruption"
            )

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

    def put_file(
        self, study_uid: str, series_uid: str, sop_uid: str, source: Path, *, digest: str | None = None
    ) -> SpooledInstance:
        """Store one instance already received into a file (DICOM file format) without reading it into memory;
        raise SpoolFull before writing anything. The source file is moved, or copied when on another file system;
        `digest`: its SHA-256 if already known (computed while it was received)."""
        if shutil.disk_usage(self.root).free - source.stat().st_size < self._reserve_bytes:
            raise SpoolFull("free disk under the reserve")
        study_key, series_key, sop_key = self.keys(study_uid, series_uid, sop_uid)
        relative = Path(study_key) / series_key / f"{sop_key}.dcm"
        move_atomic(source, self.root / relative, digest=digest)
        return SpooledInstance(study_key, series_key, sop_key, str(relative))

    def write_manifest(
        self, study_key: str, series_key: str, job_id: str, files: Sequence[str], *, folder: str = ""
    ) -> str:
        """Write the file list of one job next to its series (or in `folder`, a de-identified copy's); return its
        spool-relative path."""
        relative = Path(folder or Path(study_key) / series_key) / f"manifest-{job_id}.json"
        write_atomic(self.root / relative, json.dumps({"files": list(files)}).encode())
        return str(relative)

    def read_manifest(self, relative: str, *, check_files: bool = True) -> list[Path]:
        """The job's files, each checked against the hash recorded when it was written (S7: SpoolCorrupted);
        `check_files=False`: the manifest only, the caller checks the files as it reads them (`intact`)."""
        manifest = self.resolve(relative)
        check_intact([manifest], what="job manifest")
        files = [self.resolve(item) for item in json.loads(manifest.read_text(encoding="utf-8"))["files"]]
        if check_files:
            check_intact(files)
        return files

    def resolve(self, relative: str) -> Path:
        """Map a spool-relative path to a file, refusing anything that escapes the spool."""
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError("path escapes the spool")
        return path

    def remove_series(self, study_key: str, series_key: str, *, manifests: Sequence[str] = ()) -> None:
        """The series' files, and the de-identified copies among its jobs' `manifests` (spool/deid/<job id>/)."""
        shutil.rmtree(self.root / study_key / series_key, ignore_errors=True)
        shutil.rmtree(self.root / DEID_DIR / series_key, ignore_errors=True)  # copies of releases before per-job ones
        for manifest in manifests:
            if Path(manifest).parts[:1] == (DEID_DIR,) and len(Path(manifest).parts) == 3:
                shutil.rmtree(self.root / Path(manifest).parent, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / study_key).rmdir()


def protect_tree(root: Path) -> int:
    """At start: folders under `root` (the data dir) 0700 and files 0600, for data written by an older release or
    under another umask; return how many modes were changed. Symbolic links are not followed."""
    changed = 0
    if not root.is_dir():
        return 0
    for folder, _dirs, files in os.walk(root):
        for name, mode in [(folder, DIR_MODE)] + [(os.path.join(folder, f), FILE_MODE) for f in files]:
            with contextlib.suppress(OSError):
                if not os.path.islink(name) and os.stat(name).st_mode & 0o777 != mode:
                    os.chmod(name, mode)
                    changed += 1
    return changed


def outbox_for(settings: Settings, job_id: str) -> Path:
    """The job's results folder: `<outbox>/<job id>` (job ids are hashes of our keys, never UIDs)."""
    return settings.storage.outbox_dir / job_id


def receiving_spool(settings: Settings) -> Spool:
    """The spool as instances are received into it: the free disk under PACSAI_SPOOL_RESERVE_MB refuses them."""
    return Spool(settings.storage.spool_dir, settings.log_key, reserve_bytes=settings.storage.spool_reserve_bytes)
