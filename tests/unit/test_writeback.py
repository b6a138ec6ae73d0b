"""Writeback started while an instance streams in (issue 11): the fsync before success waits only for the tail."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dicom_node import stream_to_disk
from dicom_node.stream_to_disk import WRITEBACK_BYTES, IncomingFile, Policy
from pacsai.writeback import start_writeback


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_starts_on_a_file_and_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    path = tmp_path / "part.dcm"
    path.write_bytes(os.urandom(300_000))
    fd = os.open(path, os.O_RDWR)
    try:
        assert start_writeback(fd, 0, 300_000)
        assert not start_writeback(fd, 0, 0)  # nothing to write
    finally:
        os.close(fd)
    read_end, write_end = os.pipe()
    try:
        assert not start_writeback(write_end, 0, 10)  # a pipe has no pages to write back (ESPIPE)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_each_part_is_handed_to_writeback_once_in_order_and_the_tail_is_left_to_the_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(stream_to_disk, "start_writeback", lambda fd, offset, length: started.append((offset, length)))
    incoming = IncomingFile(Policy(tmp_path / "incoming", max_bytes=1 << 30))
    fragment = WRITEBACK_BYTES * 2 // 3
    chunks = [os.urandom(fragment) for _ in range(5)]
    for chunk in chunks:
        incoming.write(chunk)
    incoming.close()
    assert started == [(0, 2 * fragment), (2 * fragment, 2 * fragment)]  # a part once it reaches WRITEBACK_BYTES
    assert Path(incoming.name).read_bytes() == b"".join(chunks)


def test_a_data_set_refused_for_its_size_starts_no_writeback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(stream_to_disk, "start_writeback", lambda fd, offset, length: started.append((offset, length)))
    incoming = IncomingFile(Policy(tmp_path / "incoming", max_bytes=WRITEBACK_BYTES - 1))
    incoming.write(b"x" * (WRITEBACK_BYTES - 10))
    incoming.write(b"x" * 20)  # over the cap: dropped, the file truncated
    incoming.write(b"x" * WRITEBACK_BYTES)
    incoming.close()
    assert incoming.problem == stream_to_disk.TOO_LARGE and started == []
