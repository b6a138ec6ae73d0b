"""DICOMweb pieces without a network: peer and credential settings, STOW response ↔ per-instance outcomes,
the request's media type, a multipart body split into files."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset

from dicom_node.console.stow import response_of
from dicom_node.multipart_in import PartsToFiles, UnsupportedMedia, boundary_of
from dicom_node.store_instance import Received
from pacsai.dimse import StoreOutcome
from pacsai.errors import ConfigError
from pacsai.peers import WebAuth
from pacsai.settings import Settings
from worker.stow import MISSING, multipart_body, outcomes

ENV = {
    "PACSAI_LOG_KEY": "k",
    "PACSAI_DICOMWEB_PEERS": "PACS1=https://pacs.example/dicom-web/, LOCAL=http://127.0.0.1:8042/dicom-web",
}


def test_web_peers_with_credentials_and_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    settings = Settings.from_env(
        {
            **ENV,
            "PACSAI_DICOMWEB_CREDENTIALS": "PACS1 basic alice:s3:cret\nLOCAL bearer tok.en",
            "PACSAI_DICOMWEB_CA": str(ca),
        }
    )
    pacs, local = settings.delivery.web_peers
    assert (pacs.ae_title, pacs.url, pacs.tls, pacs.host, pacs.ca) == (
        "PACS1",
        "https://pacs.example/dicom-web",
        True,
        "pacs.example",
        ca,
    )
    assert pacs.auth == WebAuth("basic", "alice", "s3:cret")
    assert local.auth == WebAuth("bearer", secret="tok.en")
    assert settings.delivery.web_peer("LOCAL") is local and settings.delivery.peer("LOCAL") is None
    assert "s3:cret" not in repr(settings) and "tok.en" not in repr(settings)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"PACSAI_DICOMWEB_PEERS": "PACS1=ftp://x/y"}, "not NAME=http"),
        ({"PACSAI_DICOMWEB_PEERS": "PACS1=https://u:p@x/y"}, "no credentials"),
        ({"PACSAI_DICOMWEB_CREDENTIALS": "PACS1 basic alice"}, "line 1: expected"),
        ({"PACSAI_DICOMWEB_CREDENTIALS": "OTHER bearer t"}, "not DICOMweb peers"),
        (
            {"PACSAI_DICOMWEB_PEERS": "P=http://pacs.example/dw", "PACSAI_DICOMWEB_CREDENTIALS": "P bearer t"},
            "only over https",
        ),
        ({"PACSAI_PEERS": "PACS1@10.0.0.1:104"}, "in both"),
    ],
)
def test_web_peer_mistakes_are_named(extra: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        Settings.from_env({**ENV, **extra})
    assert "alice" not in str(raised.value)  # a credential line is never quoted


def test_outcomes_from_a_stow_response(tmp_path: Path) -> None:
    """Referenced (with or without a warning), failed (its reason classified as a C-STORE status), not mentioned."""
    answer = Dataset()
    answer.ReferencedSOPSequence = [_ref("1.1"), _ref("1.2", warning=0xB000)]
    answer.FailedSOPSequence = [_ref("1.3", failure=0xA700), _ref("1.4", failure=0x0122), _ref("1.5", failure=0xC000)]
    files = [tmp_path / f"{n}.dcm" for n in range(6)]
    uids = ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6"]
    got = [(r.outcome, r.code) for r in outcomes(files, uids, answer)]
    assert got == [
        (StoreOutcome.SUCCESS, 0),
        (StoreOutcome.WARNING, 0xB000),
        (StoreOutcome.TRANSIENT, 0xA700),
        (StoreOutcome.PERMANENT, 0x0122),
        (StoreOutcome.PERMANENT, 0xC000),
        (StoreOutcome.TRANSIENT, MISSING),
    ]
    assert outcomes(files[3:4], ["1.4"], answer)[0].sop_class_refused  # the SEG fallback applies (E5)


def test_response_of_and_back() -> None:
    """What our endpoint answers reads back through our client's parser, in DICOM JSON."""
    ok = Received(0, "9", "s", "1.2.840.10008.5.1.4.1.1.2", "1.1")
    bad = Received(0xA900, "9", "", "1.2.840.10008.5.1.4.1.1.2", "1.2")
    assert response_of([ok])[0] == 200
    assert response_of([bad])[0] == 409
    code, answer = response_of([ok, bad])
    assert code == 202
    back = Dataset.from_json(answer.to_json_dict())
    got = [(r.outcome, r.code) for r in outcomes([Path("a"), Path("b")], ["1.1", "1.2"], back)]
    assert got == [(StoreOutcome.SUCCESS, 0), (StoreOutcome.PERMANENT, 0xA900)]


def test_media_type_and_parts(tmp_path: Path) -> None:
    assert boundary_of('multipart/related; type="application/dicom"; boundary=abc') == "abc"
    for wrong in (
        "application/dicom",
        'multipart/related; type="application/dicom+json"; boundary=a',
        "multipart/related; type=application/dicom",
    ):
        with pytest.raises(UnsupportedMedia):
            boundary_of(wrong)
    body = multipart_body([b"A" * 10, b"B" * 3000, b"C"], "xyz")
    parts = PartsToFiles(tmp_path, "xyz", max_part_bytes=2000)
    for start in range(0, len(body), 7):  # arbitrary chunking
        parts.write(body[start : start + 7])
    assert [(p.media_type, p.too_large) for p in parts.parts] == [
        ("application/dicom", False),
        ("application/dicom", True),  # over max_part_bytes: no longer written
        ("application/dicom", False),
    ]
    assert parts.parts[0].path.read_bytes() == b"A" * 10 and parts.parts[1].path.stat().st_size == 0
    assert oct(parts.parts[0].path.stat().st_mode & 0o777) == "0o600"
    parts.discard()
    assert not list(tmp_path.iterdir())
    full = PartsToFiles(tmp_path, "xyz", max_part_bytes=1 << 30, reserve_bytes=1 << 62)  # more than any disk has
    full.write(body)
    assert [p.no_room for p in full.parts] == [True, True, True] and {p.path.stat().st_size for p in full.parts} == {0}
    full.discard()


def _ref(uid: str, *, warning: int = 0, failure: int = 0) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = uid
    if warning:
        item.WarningReason = warning
    if failure:
        item.FailureReason = failure
    return item
