"""Deterministic output UIDs, and spool paths that never come from the dataset."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pacsai.jobs import job_id_for
from pacsai.storage import InvalidUid, Spool, SpoolFull, check_uid
from worker.uids import derive_uid, output_uids


def test_output_uids_are_deterministic_valid_and_distinct() -> None:
    first = output_uids("1.2.3.4", "ct-organs-tiny", "0.1.0")
    assert first == output_uids("1.2.3.4", "ct-organs-tiny", "0.1.0")
    assert len(set(first.values())) == 4
    for uid in first.values():
        assert len(uid) <= 64 and re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid)
    assert output_uids("1.2.3.4", "ct-organs-tiny", "0.2.0") != first
    assert output_uids("1.2.3.5", "ct-organs-tiny", "0.1.0") != first
    assert derive_uid("a", "bc") != derive_uid("ab", "c")


def test_job_id_depends_on_the_exact_instance_set() -> None:
    assert job_id_for("s", "m", ["b", "a"]) == job_id_for("s", "m", ["a", "b"])
    assert job_id_for("s", "m", ["a", "b"]) != job_id_for("s", "m", ["a", "b", "c"])
    assert job_id_for("s", "m", ["a"]) != job_id_for("s", "n", ["a"])


@pytest.mark.parametrize(
    "uid",
    ["", "../../x", "/etc/cron.d/x", "1.2\x00.3", "1.2.a", "1..2", "01.2", "1.2\\3", "1." + "2" * 64, "1.2.3/../../4"],
)
@pytest.mark.catalogue("C1", "C2")
def test_invalid_uids_are_refused(uid: str) -> None:
    with pytest.raises(InvalidUid, match="StudyInstanceUID") as info:
        check_uid("StudyInstanceUID", uid)
    assert uid not in str(info.value) or uid == ""


@pytest.mark.catalogue("C1")
def test_spool_names_are_keyed_hashes_inside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", b"key", reserve_bytes=0)
    stored = spool.put("1.2.3", "1.2.3.4", "1.2.3.4.5", b"DICM")
    path = spool.resolve(stored.path)
    assert path.read_bytes() == b"DICM"
    assert (tmp_path / "spool") in path.parents
    assert "1.2.3" not in stored.path
    assert re.fullmatch(r"[0-9a-f]{24}/[0-9a-f]{24}/[0-9a-f]{24}\.dcm", stored.path)
    assert not list(path.parent.glob(".*.tmp"))
    other_key = Spool(tmp_path / "other", b"other-key", reserve_bytes=0).keys("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert other_key != spool.keys("1.2.3", "1.2.3.4", "1.2.3.4.5")
    with pytest.raises(ValueError, match="escapes"):
        spool.resolve("../../etc/passwd")


def test_spool_refuses_before_writing_when_under_reserve(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", b"key", reserve_bytes=1 << 62)
    with pytest.raises(SpoolFull):
        spool.put("1.2.3", "1.2.3.4", "1.2.3.4.5", b"DICM")
    assert not any(p.is_file() for p in (tmp_path / "spool").rglob("*"))


@pytest.mark.catalogue("S6")
def test_concurrent_writes_of_one_instance_never_tear(tmp_path: Path) -> None:
    """S6: many threads store the same instance with different bytes; the file is always one whole version."""
    from concurrent.futures import ThreadPoolExecutor

    spool = Spool(tmp_path / "spool", b"key", reserve_bytes=0)
    versions = [bytes([n]) * 200_000 for n in range(16)]
    with ThreadPoolExecutor(8) as pool:
        stored = list(pool.map(lambda data: spool.put("1.2.3", "1.2.3.4", "1.2.3.4.5", data), versions * 4))
    content = spool.resolve(stored[0].path).read_bytes()
    assert content in versions
    assert [p.name for p in spool.resolve(stored[0].path).parent.iterdir()] == [Path(stored[0].path).name]


def test_third_party_log_lines_lose_their_values(capsys: pytest.CaptureFixture[str]) -> None:
    """pydicom/pynetdicom messages that quote element values are redacted by our handler (A7)."""
    import logging

    from pacsai.logs import configure

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure("INFO")
    try:
        _log_third_party_lines()
    finally:
        root.handlers[:], root.level = saved
        logging.captureWarnings(False)
    err = capsys.readouterr().err
    assert "1.2.826.0.1" not in err and "1.2.3.4.5" not in err and "CANARY" not in err
    assert "Invalid value for VR UI" in err


def _log_third_party_lines() -> None:
    import logging

    logging.getLogger("pydicom").warning("Invalid value for VR UI: '1.2.826.0.1.3680043.10.1051.777.1'")
    logging.getLogger("pynetdicom.utils").error("Non-conformant 'Affected SOP Instance UID' value '1.2.3.4.5'")
    logging.getLogger("py.warnings").warning("UserWarning: The value 'CANARY^PHI' is invalid for PN")
