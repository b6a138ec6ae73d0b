"""The whole shared corpus through a real node: it never crashes; every file is accepted or refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import need
from tests.corpus import COMMAND, REPORT, CorpusRun, Outcome, render_report, run_corpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ORIGINAL = "totalsegmentator-ct-abdomen-original"


@pytest.fixture(scope="module")
def corpus(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> CorpusRun:
    need("storescu")
    return run_corpus(shared / "dicom", tmp_path_factory.mktemp("corpus"))


def outcome(run: CorpusRun, path: str) -> Outcome:
    (found,) = [o for o in run.outcomes if o.file.path == path]
    return found


def test_the_node_never_crashes_and_nothing_is_dropped(corpus: CorpusRun) -> None:
    assert corpus.crashes == ()
    assert corpus.node_errors == ()
    assert [o.file.path for o in corpus.silent()] == []
    assert corpus.spool_files == corpus.distinct_accepted > 400
    for o in corpus.outcomes:
        assert o.kind in ("accepted", "refused", "not sendable"), o
        if o.kind == "refused" and not o.sent.rejected:
            status = o.sent.status or 0
            assert 0xA700 <= status <= 0xA7FF or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xC0FF, o
        if o.kind == "not sendable":  # only files no C-STORE can carry: no SOP class or instance UID at all
            assert o.storescu_note and o.sent.note, o
        if o.sent.sender == "storescu" and o.sent.status is not None:  # storescu's exit code agrees with the status
            assert (o.storescu_exit == 0) == (o.kind == "accepted"), o


def test_empty_uids_are_refused_with_cannot_understand(corpus: CorpusRun) -> None:
    originals = [o for o in corpus.outcomes if o.file.folder == ORIGINAL]
    assert len(originals) == 20
    for o in originals:
        assert (o.sent.status, o.node_reason) == (0xC000, "StudyInstanceUID is not a valid UID"), o


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("orthanc-tests/2026-05-06-Deeply-Nested-Sequence.dcm", 0xC000, "sequences nested too deep to decode"),
        ("pydicom/test_files/MR_truncated.dcm", 0xC000, "PixelData is shorter than its declared length (truncated)"),
        ("orthanc-tests/2026-05-26-oob-monochrome-65535.dcm", 0xA900, "PixelData is shorter than Rows x Columns"),
        ("orthanc-tests/2020-09-12-ELSCINT1-PMSCT_RLE1.dcm", 0xA900, "PixelData missing from an image SOP class"),
        ("orthanc-tests/Issue22-NoPixelData.dcm", 0xA900, "PixelData missing from an image SOP class"),
        ("pydicom/test_files/badVR.dcm", 0xA900, "NumberOfFrames is not a positive integer"),
    ],
)
def test_known_bad_files_are_refused_for_their_reason(corpus: CorpusRun, path: str, status: int, reason: str) -> None:
    found = outcome(corpus, path)
    assert found.sent.status == status and found.node_reason.startswith(reason), found


def test_the_deeply_nested_file_does_not_kill_the_node(corpus: CorpusRun) -> None:
    found = outcome(corpus, "orthanc-tests/2026-05-06-Deeply-Nested-Sequence.dcm")
    assert found.sent.status == 0xC000  # dcmtk 3.6.7's storescu overflows its own stack on it: sent raw
    assert "orthanc-tests" not in corpus.crashes and corpus.node_errors == ()


def test_retired_jpeg_syntaxes_are_refused_at_negotiation(corpus: CorpusRun) -> None:
    for name in (
        "JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53",
        "JPEGProcess10_12TransferSyntax_1.2.840.10008.1.2.4.55",
    ):
        found = outcome(corpus, f"cornerstone3D-testImages/CTImage.dcm_{name}.dcm")
        assert found.kind == "refused" and found.sent.rejected == "Transfer Syntaxes Not Supported", found


@pytest.mark.parametrize(
    "folder",
    [
        "totalsegmentator-ct-abdomen",
        "dcm_qa_ct/GE_head_tilt",
        "nema-wg04",
        "dcm_qa_ts",
        "dcm_qa_enh",
        "dcmqi",
        "highdicom",
    ],
)
def test_good_series_in_every_transfer_syntax_are_accepted(corpus: CorpusRun, folder: str) -> None:
    group = [o for o in corpus.outcomes if o.file.folder == folder]
    assert group and [o.file.path for o in group if o.kind != "accepted"] == []
    assert all(o.sent.sender == "storescu" for o in group)


def test_the_committed_report_is_current(corpus: CorpusRun) -> None:
    assert REPORT.read_text(encoding="utf-8") == render_report(corpus), f"docs/corpus-report.md is stale: run {COMMAND}"
