"""Delivery streams a file that goes in its own transfer syntax as written (never decoded and encoded again), and
converts one the peer takes only in another syntax (dcmtk storescp as the peer: every syntax, or implicit VR little
endian only)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset

from dicom_node.send import send_files
from pacsai.settings import Peer
from tests.conftest import need
from tests.services import start_storescp

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))  # explicit VR little endian


def _send_to_storescp(workdir: Path, monkeypatch: pytest.MonkeyPatch, *options: str) -> tuple[list[object], Path]:
    """CT_SMALL sent to a storescp started with `options`: what send_c_store was given, and the stored file."""
    need("storescp")
    proc, port, received = start_storescp(workdir, "PACS", options=options)
    payloads = _sent(monkeypatch)
    try:
        results = send_files([CT_SMALL], Peer("PACS", "127.0.0.1", port), calling_ae="PACSAI")
    finally:
        proc.stop()
    assert [r.code for r in results] == [0x0000]
    (stored,) = [p for p in received.iterdir() if p.is_file()]
    return payloads, stored


def _data_set_bytes(path: Path) -> bytes:
    """A file's bytes after its preamble and file meta information: the data set as encoded."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _sent(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What each send_c_store was given: a path (streamed from the file) or a dataset (encoded by pynetdicom)."""
    payloads: list[object] = []
    real = Association.send_c_store

    def spy(self: Association, dataset: object, *args: object, **kwargs: object) -> Dataset:
        payloads.append(dataset)
        return real(self, dataset, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Association, "send_c_store", spy)
    return payloads


def test_a_file_in_an_accepted_syntax_goes_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert dcmread(CT_SMALL).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    payloads, stored = _send_to_storescp(tmp_path, monkeypatch, "+xa", "+B")  # +B: stores the data set as received
    assert payloads == [CT_SMALL]  # the path: pynetdicom streams the file
    assert _config.STORE_SEND_CHUNKED_DATASET is False  # pynetdicom's default again for any other caller
    assert dcmread(stored).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert _data_set_bytes(stored) == _data_set_bytes(CT_SMALL)


def test_a_file_the_peer_takes_only_in_implicit_vr_is_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads, stored = _send_to_storescp(tmp_path, monkeypatch, "+xi")  # storescp: implicit VR little endian only
    assert len(payloads) == 1 and isinstance(payloads[0], Dataset)  # read whole, encoded by pynetdicom
    ours, theirs = dcmread(CT_SMALL), dcmread(stored)
    assert theirs.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert theirs.SOPInstanceUID == ours.SOPInstanceUID and theirs.PixelData == ours.PixelData
    padding = 0xFFFCFFFC  # Data Set Trailing Padding, which storescp drops when it writes the file
    assert [e.tag for e in theirs] == [e.tag for e in ours if e.tag != padding]
