"""S5, S7 and C9 at the spool itself: unusable spool directories, hashes that catch a flipped bit, file modes.

Real files on real file systems: a read-only tmpfs and an immutable directory (both need root; they skip locally and
fail in CI otherwise), and the extended attributes of the machine's own disk.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from pacsai.errors import ConfigError, StudyRejected
from pacsai.storage import (
    HASH_ATTRIBUTE,
    Spool,
    SpoolCorrupted,
    SpoolUnusable,
    check_intact,
    file_hash,
    move_atomic,
    recorded_hash,
    write_atomic,
)
from tests.conftest import IN_CI

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))
UIDS = ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3")


def needs_root(what: str) -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail(f"{what} needs root")
        pytest.skip(f"{what} needs root")


@pytest.fixture()
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool", b"key", reserve_bytes=0)
    if recorded_hash(_probe(tmp_path)) is None:
        pytest.skip("this file system keeps no extended attributes")
    return spool


def _probe(folder: Path) -> Path:
    write_atomic(folder / "probe", b"x")
    return folder / "probe"


def flip_one_bit(path: Path, offset: int) -> None:
    """What a failing disk or a stray write does to a file after it was written: one bit, in place."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


# --- S7: a stored hash catches a flipped bit before anything uses the file -----------------------------------------


@pytest.mark.catalogue("S7")
def test_a_flipped_bit_in_a_spooled_instance_fails_the_manifest_read(spool: Spool) -> None:
    """The worker reads a job's files through read_manifest: one flipped bit in one instance makes that fail with
    "spooled instance corrupted", a StudyRejected (not retried), and names no file, UID or value."""
    data = CT_SMALL.read_bytes()
    stored = [spool.put(UIDS[0], UIDS[1], f"{UIDS[2]}.{n}", data) for n in range(3)]
    manifest = spool.write_manifest(stored[0].study_key, stored[0].series_key, "job1", [s.path for s in stored])
    assert [file_hash(p) for p in spool.read_manifest(manifest)] == [file_hash(CT_SMALL)] * 3  # intact: fine

    flip_one_bit(spool.resolve(stored[1].path), len(data) - 1000)  # in the pixel data, far from the header
    with pytest.raises(SpoolCorrupted) as raised:
        spool.read_manifest(manifest)
    assert isinstance(raised.value, StudyRejected) and not raised.value.retryable
    assert str(raised.value) == "spooled instance corrupted: 1 of 3 file(s) differ from what was received"
    assert stored[1].sop_key not in str(raised.value) and UIDS[2] not in str(raised.value)
    assert dcmread(spool.resolve(stored[1].path)).PatientName == dcmread(CT_SMALL).PatientName  # still "valid" DICOM


@pytest.mark.catalogue("S7")
def test_a_corrupted_manifest_is_caught_before_it_is_parsed(spool: Spool) -> None:
    stored = spool.put(*UIDS, CT_SMALL.read_bytes())
    manifest = spool.write_manifest(stored.study_key, stored.series_key, "job2", [stored.path])
    flip_one_bit(spool.resolve(manifest), 3)
    with pytest.raises(SpoolCorrupted, match="^spooled job manifest corrupted: 1 of 1 file"):
        spool.read_manifest(manifest)


@pytest.mark.catalogue("S7")
def test_a_streamed_receipt_is_hashed_as_it_is_moved_in(spool: Spool, tmp_path: Path) -> None:
    """put_file (the node's path for a streamed C-STORE) records the hash of what arrived, then catches a flip."""
    received = tmp_path / "incoming.dcm"
    received.write_bytes(CT_SMALL.read_bytes())
    stored = spool.put_file(*UIDS, received)
    path = spool.resolve(stored.path)
    assert not received.exists()  # moved, not copied: same file system
    assert recorded_hash(path) == file_hash(CT_SMALL)
    check_intact([path])
    flip_one_bit(path, 200)
    with pytest.raises(SpoolCorrupted, match="1 of 1 file"):
        check_intact([path])


def test_files_without_a_recorded_hash_are_passed_not_failed(
    spool: Spool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Files spooled before hashes existed (or on a file system without extended attributes) are not corrupted."""
    stored = spool.put(*UIDS, CT_SMALL.read_bytes())
    path = spool.resolve(stored.path)
    os.removexattr(path, HASH_ATTRIBUTE)
    check_intact([path])
    assert "1 of 1 instance file(s) carry no recorded hash" in caplog.text


def test_concurrent_writers_cannot_leave_a_mismatched_hash(spool: Spool) -> None:
    """The hash lives on the file's own inode: whichever version of an instance wins the rename, its hash wins too."""
    from concurrent.futures import ThreadPoolExecutor

    versions = [bytes([n]) * 300_000 for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        stored = list(pool.map(lambda data: spool.put(*UIDS, data), versions * 4))
    check_intact([spool.resolve(stored[0].path)])


# --- C9: spooled and written files are never executable -------------------------------------------------------------


@pytest.mark.catalogue("C9")
def test_spooled_files_are_never_executable_whatever_they_came_from(spool: Spool, tmp_path: Path) -> None:
    """C9: a received file (even one created executable) and everything write_atomic writes end up 0640."""
    received = tmp_path / "incoming.dcm"
    received.write_bytes(CT_SMALL.read_bytes())
    received.chmod(0o755)
    stored = spool.put_file(*UIDS, received)
    manifest = spool.write_manifest(stored.study_key, stored.series_key, "job3", [stored.path])
    for path in (spool.resolve(stored.path), spool.resolve(manifest)):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, oct(mode)
        assert not os.access(path, os.X_OK)  # not even for root: no execute bit anywhere


# --- S5: a spool directory that cannot be used stops the node, naming the variable ----------------------------------


def test_a_spool_path_under_a_regular_file_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(SpoolUnusable) as raised:
        Spool(tmp_path / "data" / "spool", b"key", reserve_bytes=0)
    assert isinstance(raised.value, ConfigError)
    assert str(raised.value) == (
        f"spool directory {tmp_path / 'data' / 'spool'} cannot be used (Not a directory); "
        "PACSAI_DATA_DIR must be a writable directory on a local or shared disk "
        "(the spool is its spool/ folder)"
    )


@pytest.fixture()
def read_only_spool(tmp_path: Path) -> Iterator[Path]:
    needs_root("mounting a read-only tmpfs")
    root = tmp_path / "spool"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.mark.catalogue("S5")
def test_a_read_only_spool_is_refused_and_nothing_is_written_elsewhere(read_only_spool: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SpoolUnusable, match=r"cannot be used \(Read-only file system\); PACSAI_DATA_DIR"):
        Spool(read_only_spool, b"key", reserve_bytes=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no fallback directory appeared


@pytest.fixture()
def immutable_spool(tmp_path: Path) -> Iterator[Path]:
    """A directory even root cannot create files in (chattr +i): the 'wrong permissions' case for a root test."""
    needs_root("chattr +i")
    root = tmp_path / "spool"
    root.mkdir()
    if subprocess.run(["chattr", "+i", str(root)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable attribute")
    try:
        yield root
    finally:
        subprocess.run(["chattr", "-i", str(root)], check=False)


@pytest.mark.catalogue("S5")
def test_an_unwritable_spool_is_caught_by_the_start_probe(immutable_spool: Path) -> None:
    """os.access does not see every reason a write fails; check_writable really writes, syncs and deletes a file."""
    with pytest.raises(SpoolUnusable, match=r"cannot be used \((Operation not permitted|Permission denied)\)"):
        Spool(immutable_spool, b"key", reserve_bytes=0).check_writable()
    assert list(immutable_spool.iterdir()) == []


def test_check_writable_leaves_nothing_behind(spool: Spool) -> None:
    spool.check_writable()
    assert list(spool.root.iterdir()) == []


def test_manifest_paths_cannot_leave_the_spool(spool: Spool) -> None:
    """read_manifest still refuses a listed path outside the spool before hashing anything."""
    target = spool.root / "x" / "y" / "manifest-evil.json"
    write_atomic(target, json.dumps({"files": ["../../../etc/passwd"]}).encode())
    with pytest.raises(ValueError, match="escapes the spool"):
        spool.read_manifest("x/y/manifest-evil.json")


def test_move_atomic_copies_across_file_systems(tmp_path: Path) -> None:
    """The node's incoming directory may sit on another file system than the spool: then the file is copied."""
    needs_root("mounting a tmpfs")
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(other)], check=True)
    try:
        source = other / "incoming.dcm"
        source.write_bytes(CT_SMALL.read_bytes())
        move_atomic(source, tmp_path / "spool" / "a.dcm")
        assert file_hash(tmp_path / "spool" / "a.dcm") == file_hash(CT_SMALL)
        assert recorded_hash(tmp_path / "spool" / "a.dcm") == file_hash(CT_SMALL)
    finally:
        subprocess.run(["umount", "-l", str(other)], check=False)
