"""S7 with the hash computed while a C-STORE data set is streamed to disk (issue 11): the spool records the hash of
the bytes that reached the file, and only a data set that arrived whole has one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dicom_node.stream_to_disk import TOO_LARGE, IncomingFile, Policy
from pacsai.storage import Spool, file_hash, recorded_hash

UIDS = ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3")


def test_the_digest_is_that_of_the_bytes_written_and_the_spool_records_it(tmp_path: Path) -> None:
    incoming = IncomingFile(Policy(tmp_path / "incoming", max_bytes=1 << 20))
    chunks = [os.urandom(size) for size in (128, 4, 70_000, 1)]
    for chunk in chunks:
        incoming.write(chunk)
    incoming.close()
    assert incoming.digest == hashlib.sha256(b"".join(chunks)).hexdigest() == file_hash(Path(incoming.name))
    spool = Spool(tmp_path / "spool", b"k" * 32, reserve_bytes=0)
    stored = spool.put_file(*UIDS, Path(incoming.name), digest=incoming.digest)
    assert recorded_hash(spool.root / stored.path) == incoming.digest


def test_a_data_set_cut_at_the_size_cap_has_no_digest(tmp_path: Path) -> None:
    incoming = IncomingFile(Policy(tmp_path / "incoming", max_bytes=100))
    incoming.write(b"x" * 60)
    incoming.write(b"x" * 60)
    incoming.close()
    assert incoming.problem == TOO_LARGE
    assert incoming.digest == ""


def test_without_a_digest_the_spool_hashes_the_file_itself(tmp_path: Path) -> None:
    source = tmp_path / "received.dcm"
    source.write_bytes(b"DICM" * 1000)
    expected = file_hash(source)
    spool = Spool(tmp_path / "spool", b"k" * 32, reserve_bytes=0)
    stored = spool.put_file(*UIDS, source)
    assert recorded_hash(spool.root / stored.path) == expected
