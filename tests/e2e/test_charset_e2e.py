"""A Japanese (ISO 2022 IR 87) study through dcmtk storescu → node → worker → dcmtk storescp, sent three times:
first, again unchanged, then with two late slices. Issue #4 (names round-trip) and #5 item 2 (superseding results)."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.uid import UID

from pacsai.logs import key_of
from tests.checks import dciodvfy_errors
from tests.conftest import need
from tests.services import start_storescp, wait_until
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = "2.25.27182818284590452353602874713526"
SLICES, LATE = 12, 2
CORPUS_FILE = "chrH31.dcm"  # ['', 'ISO 2022 IR 87']: Yamada^Tarou=山田^太郎=やまだ^たろう


def japanese_series(ct_series: Path, corpus: Dataset, target: Path) -> list[Path]:
    """SLICES + LATE contiguous CT slices with the corpus file's character set and Patient's Name bytes."""
    files = [p for p in ct_series.iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md")]
    files.sort(key=lambda p: float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    target.mkdir(parents=True)
    copies = []
    for index, path in enumerate(files[: SLICES + LATE]):
        ds = dcmread(path)
        ds["SpecificCharacterSet"] = DataElement(0x00080005, "CS", corpus.get_item("SpecificCharacterSet").value)
        ds["PatientName"] = DataElement(0x00100010, "PN", corpus.get_item("PatientName").value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{ROOT}.1", f"{ROOT}.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{ROOT}.3.{index + 1}")
        copies.append(target / f"{index:02d}.dcm")
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def storescu(port: int, files: list[Path]) -> None:
    subprocess.run(
        ["storescu", "-xv", "-aet", "PACS", "-aec", "PACSAI", "127.0.0.1", str(port), *map(str, files)],
        check=True,
        timeout=120,
        capture_output=True,
    )


def jobs(data: Path) -> list[tuple[str, int, str, str, str]]:
    """(state, revision, job id, supersedes, superseded_by) of the series' jobs, by revision."""
    with contextlib.closing(sqlite3.connect(data / "pacsai.db", timeout=30)) as db:
        rows = db.execute(
            "SELECT state, revision, job_id, supersedes, superseded_by FROM jobs WHERE series_key=? ORDER BY revision",
            (key_of(b"test-log-key", f"{ROOT}.2"),),
        ).fetchall()
    return [(str(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows]


def series_state(data: Path) -> str:
    with contextlib.closing(sqlite3.connect(data / "pacsai.db", timeout=30)) as db:
        rows = db.execute("SELECT state FROM series WHERE series_key=?", (key_of(b"test-log-key", f"{ROOT}.2"),))
        found = rows.fetchall()
    return str(found[0][0]) if found else ""


def arrived(inbox: Path, count: int) -> dict[str, list[Dataset]]:
    """The results at the PACS by modality, once there are `count` of them (else empty)."""
    files = sorted(p for p in inbox.iterdir() if p.is_file())
    if len(files) < count:
        return {}
    found: dict[str, list[Dataset]] = {}
    for path in files:
        ds = dcmread(path)
        ds.filename = str(path)
        found.setdefault(str(ds.Modality), []).append(ds)
    return found


def check_names(result: Dataset, corpus: Dataset) -> None:
    """UTF-8 declared and on the wire; the three component groups equal the source's."""
    assert result.SpecificCharacterSet == "ISO_IR 192"
    assert result.get_item("PatientName").value == str(corpus.PatientName).encode("utf-8")
    name, expected = result.PatientName, corpus.PatientName
    assert (name.alphabetic, name.ideographic, name.phonetic) == (
        expected.alphabetic,
        expected.ideographic,
        expected.phonetic,
    )
    assert dciodvfy_errors(Path(result.filename)) == [], f"dciodvfy errors in the {result.Modality}"


@pytest.mark.catalogue("C8")
def test_japanese_study_round_trips_and_a_late_slice_supersedes_the_first_result(
    tmp_path: Path, shared: Path, ct_series: Path, stack: Callable[..., Stack]
) -> None:
    """First sending: one SEG and one SR whose names equal the source's. The same instances again: no job, nothing
    new at the PACS. Two late slices: a second SEG and SR (v2) next to the first, the SR naming the first SR as its
    predecessor, and the database recording that the first result is superseded by the second."""
    need("storescu"), need("storescp"), need("dciodvfy")
    corpus = dcmread(shared / "dicom" / "pydicom" / "charset_files" / CORPUS_FILE)
    files = japanese_series(ct_series, corpus, tmp_path / "source")
    corpus.decode()
    storescp, pacs_port, inbox = start_storescp(tmp_path / "pacs", ae_title="PACS")
    pacsai = stack(peers=f"PACS@127.0.0.1:{pacs_port}")  # on-disk queue
    pacsai.adopt(storescp)
    port, data = pacsai.port, pacsai.data
    node = pacsai.start("node")
    worker = pacsai.start("worker")
    storescu(port, files[:SLICES])
    first = wait_until(lambda: arrived(inbox, 2), 300, "the first SEG and SR", 1.0)
    assert sorted(first) == ["SEG", "SR"]
    for result in (first["SEG"][0], first["SR"][0]):
        check_names(result, corpus)
    wait_until(lambda: [row[0] for row in jobs(data)] == ["delivered"], 60, "the first job delivered", 0.5)

    storescu(port, files[:SLICES])  # the same study again
    wait_until(lambda: node.log().count("series complete") == 2, 60, "the series complete again", 0.5)
    assert "series complete, 12 instances, models ct-organs-tiny, 0 new job(s)" in node.log()
    assert len(jobs(data)) == 1 and series_state(data) == "complete", "an unchanged series makes no new job"
    assert len([p for p in inbox.iterdir() if p.is_file()]) == 2, "nothing new at the PACS"

    storescu(port, files[SLICES:])  # two slices arrive late
    results = wait_until(lambda: arrived(inbox, 4), 300, "the second SEG and SR", 1.0)
    assert [len(results["SEG"]), len(results["SR"])] == [2, 2], "the first result stays, one result is added"
    second_sr = next(ds for ds in results["SR"] if "PredecessorDocumentsSequence" in ds)
    second_seg = next(ds for ds in results["SEG"] if ds.SOPInstanceUID != first["SEG"][0].SOPInstanceUID)
    for result in (second_seg, second_sr):
        check_names(result, corpus)
    [study] = second_sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == f"{ROOT}.1"
    assert study.ReferencedSeriesSequence[0].SeriesInstanceUID == first["SR"][0].SeriesInstanceUID
    reference = study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == first["SR"][0].SOPInstanceUID
    assert " v2 " in second_seg.SeriesDescription and "replaces earlier" in second_seg.ContentDescription
    assert len(second_seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == SLICES + LATE

    def both_ended() -> list[tuple[str, int, str, str, str]]:
        rows = jobs(data)
        return rows if [row[0] for row in rows] == ["delivered", "delivered"] else []

    (_, _, first_id, _, superseded_by), (_, revision, second_id, supersedes, _) = wait_until(
        both_ended, 60, "both jobs delivered", 0.5
    )
    assert (revision, supersedes, superseded_by) == (2, first_id, second_id)
    node_log = node.log()
    assert f"revision 2 superseding job {first_id[:8]}" in node_log
    assert "Yamada" not in node_log + worker.log() and "山田" not in node_log + worker.log()
