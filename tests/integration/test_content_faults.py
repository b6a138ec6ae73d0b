"""Fault catalogue C8–C12, C15, C16, S4, S5 and S7 with real peers and real (re-UIDed, edited) corpus files.

One node, one worker and a dcmtk storescp standing in for the PACS serve most tests of this module; each test sends
its own studies (fresh UIDs) and looks at the wire (DIMSE statuses), the database, the spool, the PACS's inbox and
the processes' logs. Large instances (C15), an unusable spool (S5) and the fsync order (S4) get nodes of their own.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import MPEG4HP41, UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config

from dicom_node.node import start_node
from pacsai.logs import configure, key_of
from pacsai.settings import Settings
from pacsai.storage import file_hash, recorded_hash
from tests.conftest import IN_CI, need
from tests.services import (
    REPO,
    Process,
    free_port,
    pacsai_env,
    port_open,
    spawn,
    start_pacsai,
    start_storescp,
    wait_until,
)
from worker import load_volume

pytestmark = [pytest.mark.integration]
LOG_KEY = "test-log-key"
PACS = "PACS"
MARKUP_AE = "<i>&\"'</i>"  # C11: markup in an AE title (PS3.5 allows it: no backslash, no control char)
SHELL_AE = "$(touch pwn1)|"  # C10: a command substitution and a pipe in an AE title
CONTROL_AE = "A\x1b[31m\nFAKE"  # C10: an ANSI escape and a newline (pynetdicom refuses to send it unless told)
VIDEO_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"


def new_root() -> str:
    return f"2.25.{uuid.uuid4().int}"


def copy_series(
    files: Sequence[Path],
    target: Path,
    root: str,
    *,
    raw: dict[str, tuple[str, bytes]] | None = None,
    edit: Callable[[int, Dataset], None] | None = None,
) -> list[Path]:
    """Copy files with fresh Study/Series/SOP UIDs under `root`; `raw` values are written as the bytes given."""
    target.mkdir(parents=True, exist_ok=True)
    copies = []
    for index, path in enumerate(files):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{root}.1", f"{root}.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{root}.3.{index + 1}")
        for keyword, (vr, value) in (raw or {}).items():
            ds[keyword] = DataElement(Tag(keyword), vr, value)
        if edit is not None:
            edit(index, ds)
        copy = target / f"{index:04d}.dcm"
        ds.save_as(copy, enforce_file_format=True)
        copies.append(copy)
    return copies


def store(
    port: int, files: Sequence[Path], *, calling: str = PACS, while_open: Callable[[], None] | None = None
) -> list[int]:
    """C-STORE each file over one pynetdicom association; return the statuses (-1: no reply)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    for sop_class, syntax in sorted({_context_of(path) for path in files}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    statuses = []
    for path in files:
        reply = assoc.send_c_store(path)
        statuses.append(int(reply.Status) if "Status" in reply else -1)
    if while_open is not None:
        while_open()
    assoc.release()
    return statuses


def _context_of(path: Path) -> tuple[str, str]:
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def storescu(port: int, files: Sequence[Path], *, calling: str = PACS) -> None:
    subprocess.run(
        ["storescu", "-xv", "-aet", calling, "-aec", "PACSAI", "127.0.0.1", str(port), *map(str, files)],
        check=True,
        timeout=120,
        capture_output=True,
    )


def escaped_forgeries(log: str) -> list[str]:
    """Lines of a log that carry a raw control character or start like a forged entry (C10)."""
    return [line for line in log.splitlines() if "\x1b" in line or "\r" in line or line.startswith("FAKE")]


# --- the module's node, worker and PACS ------------------------------------------------------------------------------


@dataclass
class Stack:
    work: Path
    port: int
    env: dict[str, str]
    inbox: Path
    processes: list[Process] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.work / "data"

    def log(self, name: str) -> str:
        return next(proc.log() for proc in self.processes if proc.name == name)

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.data / "pacsai.db", timeout=30)) as db:
            return [tuple(row) for row in db.execute(sql, params).fetchall()]

    def series(self, series_uid: str) -> tuple[str, str] | None:
        rows = self.query(
            "SELECT state, reason FROM series WHERE series_key=?", (key_of(LOG_KEY.encode(), series_uid),)
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def jobs(self, series_uid: str) -> list[tuple[str, str, str]]:
        """(job id, state, reason) of the series' jobs."""
        rows = self.query(
            "SELECT job_id, state, reason FROM jobs WHERE series_key=? ORDER BY job_id",
            (key_of(LOG_KEY.encode(), series_uid),),
        )
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    def spooled(self, series_uid: str) -> list[Path]:
        rows = self.query(
            "SELECT path FROM instances WHERE series_key=? ORDER BY path", (key_of(LOG_KEY.encode(), series_uid),)
        )
        return [self.data / "spool" / str(r[0]) for r in rows]

    def wait_jobs_ended(
        self, series_uids: Sequence[str], timeout_s: float = 150
    ) -> dict[str, list[tuple[str, str, str]]]:
        def ended() -> dict[str, list[tuple[str, str, str]]] | None:
            found = {uid: self.jobs(uid) for uid in series_uids}
            done = all(
                jobs and all(state in ("delivered", "failed", "dead") for _, state, _ in jobs)
                for jobs in found.values()
            )
            return found if done else None

        result: dict[str, list[tuple[str, str, str]]] = wait_until(ended, timeout_s, "the jobs to end", 0.5)
        return result

    def wait_series_closed(self, series_uids: Sequence[str], timeout_s: float = 60) -> dict[str, tuple[str, str]]:
        def closed() -> dict[str, tuple[str, str]] | None:
            found = {uid: self.series(uid) for uid in series_uids}
            done = all(row is not None and row[0] != "receiving" for row in found.values())
            return {uid: row for uid, row in found.items() if row is not None} if done else None

        result: dict[str, tuple[str, str]] = wait_until(closed, timeout_s, "the series to close", 0.5)
        return result

    def results(self, study_uid: str) -> dict[str, Dataset]:
        """What the PACS received for a study, by modality."""
        found: dict[str, Dataset] = {}
        for path in self.inbox.iterdir():
            ds = dcmread(path)
            if ds.StudyInstanceUID == study_uid:
                found[str(ds.Modality)] = ds
        return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need("storescp"), need("storescu")
    work = tmp_path_factory.mktemp("content")
    storescp, pacs_port, inbox = start_storescp(work / "pacs", ae_title=PACS)
    port = free_port()
    env = pacsai_env(
        work / "data",
        port=port,
        peers=f"{PACS}@127.0.0.1:{pacs_port}",
        PACSAI_ALLOWED_CALLERS=",".join((PACS, MARKUP_AE, SHELL_AE)),
        PACSAI_QUIET_PERIOD_S="4",
        PACSAI_RELEASE_GRACE_S="1",
    )
    stack = Stack(work, port, env, inbox, [storescp])
    try:
        stack.processes.append(start_pacsai("node", work, env))
        stack.processes.append(start_pacsai("worker", work, env))
        yield stack
    finally:
        for proc in reversed(stack.processes):
            proc.stop()


# --- C8: character sets ----------------------------------------------------------------------------------------------


def corpus_text(shared: Path, name: str) -> tuple[bytes, bytes]:
    """A corpus file's Specific Character Set and Patient's Name, as their encoded bytes."""
    ds = dcmread(shared / "dicom" / "pydicom" / "charset_files" / name)
    return ds.get_item("SpecificCharacterSet").value, ds.get_item("PatientName").value


@pytest.mark.catalogue("C8")
@pytest.mark.parametrize(
    "name",
    [
        "chrArab.dcm",
        "chrGreek.dcm",
        "chrH31.dcm",
        "chrH32.dcm",
        "chrI2.dcm",
        "chrKoreanMulti.dcm",
        "chrRuss.dcm",
        "chrX1.dcm",
        "chrX2.dcm",
        "chrSQEncoding.dcm",
        "chrSQEncoding1.dcm",
        "chrJapMultiExplicitIR6.dcm",
    ],
)
def test_c8_every_corpus_character_set_is_read_as_utf8(shared: Path, name: str, tmp_path: Path) -> None:
    """The worker reads each spooled file through load_volume.read_source: the text pydicom decodes with the declared
    character set (ISO 2022 code extensions, GB18030, sequences in another set) survives a write as ISO_IR 192."""
    path = shared / "dicom" / "pydicom" / "charset_files" / name
    original = dcmread(path)
    original.decode()
    source = load_volume.read_source(path)
    assert source.SpecificCharacterSet == "ISO_IR 192"
    source.save_as(tmp_path / "utf8.dcm", enforce_file_format=True)
    again = dcmread(tmp_path / "utf8.dcm")
    for keyword in ("PatientName", "StudyDescription", "InstitutionName"):
        if keyword in original:
            assert str(again[keyword].value) == str(original[keyword].value)
    if "ReferencedStudySequence" in original or "OtherPatientIDsSequence" in original:
        assert again.to_json_dict() == original.to_json_dict() | {"00080005": again.to_json_dict()["00080005"]}


@pytest.mark.catalogue("C8")
def test_c8_unusual_and_unknown_character_sets_come_back_as_utf8(stack: Stack, shared: Path, ct_series: Path) -> None:
    """Two 10-slice CT studies, one in ISO 2022 IR 13 + IR 87 (half-width katakana and kanji, from the corpus), one
    whose latin-1 name is declared with an unknown term: both are stored as received, run through the model, and
    come back as SEG and SR in UTF-8 with the names as pydicom decodes them (unknown term: ISO-IR 6/latin-1)."""
    slices = sorted(ct_series.iterdir())[:10]
    japanese_charset, japanese_name = corpus_text(shared, "chrH32.dcm")
    _, german_name = corpus_text(shared, "chrGerm.dcm")
    cases = {  # root → (raw charset, raw name, expected decoded name)
        new_root(): (japanese_charset, japanese_name, "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
        new_root(): (b"ISO_IR 999", german_name, "Äneas^Rüdiger"),
    }
    for root, (charset, name, _) in cases.items():
        files = copy_series(
            slices,
            stack.work / "c8" / root,
            root,
            raw={"SpecificCharacterSet": ("CS", charset), "PatientName": ("PN", name)},
        )
        storescu(stack.port, files)
    jobs = stack.wait_jobs_ended([f"{root}.2" for root in cases])
    for root, (_, raw_name, expected) in cases.items():
        assert [state for _, state, _ in jobs[f"{root}.2"]] == ["delivered"], jobs
        spooled = dcmread(stack.spooled(f"{root}.2")[0])
        assert spooled.get_item("PatientName").value == raw_name  # stored as received, bytes and all
        results = stack.results(f"{root}.1")
        assert sorted(results) == ["SEG", "SR"]
        for ds in results.values():
            assert ds.SpecificCharacterSet == "ISO_IR 192"
            assert str(ds.PatientName) == expected
    logs = stack.log("pacsai-worker") + stack.log("pacsai-node")
    assert "using default encoding instead" in logs  # the fallback is announced …
    assert "Rüdiger" not in logs and "太郎" not in logs and "ISO_IR 999" not in logs  # … without the values


# --- C9: preamble content --------------------------------------------------------------------------------------------

ELF_PREAMBLE = (b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + b"\x02\x00\x3e\x00" + b"MZ\x90\x00#!/bin/sh\nid\n").ljust(
    128, b"\x00"
)


@pytest.mark.catalogue("C9")
def test_c9_executable_preambles_never_reach_the_spool(stack: Stack, ct_series: Path) -> None:
    """C9 (CVE-2019-11687): a file whose 128-byte preamble is an ELF/PE/shell header is sent; the spooled copy has
    a zeroed preamble (a preamble never travels over DIMSE; pynetdicom writes zeros) and no execute bit."""
    root = new_root()
    (source,) = copy_series(
        sorted(ct_series.iterdir())[:1],
        stack.work / "c9" / root,
        root,
        edit=lambda _, ds: setattr(ds, "preamble", ELF_PREAMBLE),
    )
    assert source.read_bytes()[:4] == b"\x7fELF"
    seen: dict[str, Any] = {}

    def inspect_spool() -> None:  # while the association is open the series is not complete yet
        (spooled,) = stack.spooled(f"{root}.2")
        content = spooled.read_bytes()
        seen.update(
            preamble=content[:128],
            prefix=content[128:132],
            mode=stat.S_IMODE(spooled.stat().st_mode),
            executable=os.access(spooled, os.X_OK),
            hash=recorded_hash(spooled) == file_hash(spooled),
        )

    assert store(stack.port, [source], while_open=inspect_spool) == [0x0000]
    assert seen == {"preamble": b"\x00" * 128, "prefix": b"DICM", "mode": 0o600, "executable": False, "hash": True}


@pytest.mark.catalogue("C9", "C10")
def test_c9_c10_product_code_never_hands_anything_to_a_shell() -> None:
    """No shell anywhere in the product: no os.system/os.popen, no shell=True, and the one process we start (the
    worker under `pacsai run`) has a constant argument list; so no received value can become a command."""
    calls = []
    files = sorted(file for package in ("dicom_node", "worker", "models") for file in (REPO / package).rglob("*.py"))
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert not any(k.arg == "shell" for k in node.keywords), f"shell= in {file.name}: {name}"
            assert name not in (
                "os.system",
                "os.popen",
                "subprocess.getoutput",
                "subprocess.getstatusoutput",
                "pty.spawn",
            ) and not name.startswith(("os.exec", "os.spawn")), f"{file.name}: {name}"
            if name.startswith("subprocess."):
                calls.append((file.name, name, ast.unparse(node.args[0])))
    assert calls == [("cli.py", "subprocess.Popen", "[sys.executable, '-m', 'worker.cli', 'worker']")]


# --- C10, C11: shell metacharacters, control characters and markup in what peers send --------------------------------

HOSTILE = {
    "PatientName": ("PN", b"<script>alert(1)</script>^$(touch pwn2)"),
    "PatientID": ("LO", b"`touch pwn3`;|&"),
    "StudyDescription": ("LO", b"x\x1b[2J\x1b[31m\nFAKE 2026 ERROR forged\r"),
    "SeriesDescription": ("LO", b"abdomen $(touch pwn4); <b onmouseover=alert(2)>"),
    "InstitutionName": ("LO", b"'; DROP TABLE jobs; --"),
}


@pytest.mark.catalogue("C10", "C11", "C9")
def test_c10_c11_hostile_text_stays_data(stack: Stack, ct_series: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CT study whose patient and study strings hold command substitutions, ANSI escapes, newlines and HTML is
    processed and delivered with those values unchanged (DICOM values are data); nothing ran them, no log line was
    forged, and every place we render text (audit XML, `pacsai audit`, `pacsai status`) escapes or omits them.
    AE titles are peer-controlled text too: one with markup, one with a command, one with control characters."""
    root, markup_root, shell_root = new_root(), new_root(), new_root()
    files = copy_series(sorted(ct_series.iterdir())[:10], stack.work / "c10" / root, root, raw=HOSTILE)
    storescu(stack.port, files)
    for calling, other in ((MARKUP_AE, markup_root), (SHELL_AE, shell_root)):  # a study of their own each
        single = copy_series(sorted(ct_series.iterdir())[:1], stack.work / "c10" / other, other, raw=HOSTILE)
        assert store(stack.port, single, calling=calling) == [0x0000]
    monkeypatch.setitem(_config.VALIDATORS, "AE", lambda value: (True, ""))  # let our SCU send what a rogue would
    rogue = AE(ae_title=CONTROL_AE)
    rogue.add_requested_context("1.2.840.10008.1.1")
    assert not rogue.associate("127.0.0.1", stack.port, ae_title="PACSAI").is_established

    (job,) = stack.wait_jobs_ended([f"{root}.2"])[f"{root}.2"]
    assert job[1] == "delivered", job
    results = stack.results(f"{root}.1")
    assert sorted(results) == ["SEG", "SR"]
    for ds in results.values():  # copied, not "sanitised": viewers escape when they render
        assert ds.PatientName.original_string == HOSTILE["PatientName"][1]
        assert ds.PatientID == HOSTILE["PatientID"][1].decode()
    sr_text = [
        item.get("TextValue", "") + str(item.get("ConceptNameCodeSequence", ""))
        for item in _content_items(results["SR"])
    ]
    assert not [text for text in sr_text if "<script" in text or "$(" in text]  # our report text is our own

    # C10: nothing was run, and no log line carries a raw control character or starts a forged entry
    assert not [p for p in stack.work.rglob("pwn*")]
    for name in ("pacsai-node", "pacsai-worker"):
        assert escaped_forgeries(stack.log(name)) == [], name
    closed = stack.wait_series_closed([f"{markup_root}.2", f"{shell_root}.2"])  # stored, then not processed
    assert {state for state, _ in closed.values()} == {"no_model"}

    # C11: the audit trail is XML that still parses, with the markup AE title as text; the CLIs print no markup
    audit = (stack.data / "audit.log").read_text(encoding="utf-8")
    lines = [line for line in audit.splitlines() if line.strip()]
    from dicom_node.read_audit import parse_line

    entries = [parse_line(line) for line in lines]
    assert None not in entries
    assert any(f"{MARKUP_AE} (" in part for entry in entries if entry for part in entry.participants)
    assert "&lt;i&gt;&amp;" in audit and "<i>&" not in audit and "\x1b" not in audit
    cli = [sys.executable, "-m", "worker.cli"]
    env = {**os.environ, **stack.env, "PYTHONPATH": str(REPO)}
    status = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout)["instances"]["received"] >= 10
    listing = subprocess.run([*cli, "audit"], env=env, capture_output=True, text=True, check=True).stdout
    assert MARKUP_AE in listing and "<script" not in listing and "<b " not in listing and "\x1b" not in listing

    # C9: what we write ourselves (the results in the outbox) has a zero preamble and no execute bit
    for path in (stack.data / "outbox" / job[0]).glob("*.dcm"):
        assert path.read_bytes()[:132] == b"\x00" * 128 + b"DICM"
        assert stat.S_IMODE(path.stat().st_mode) & 0o111 == 0


def _content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_c10_log_lines_escape_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    """Formatter level: whatever a message interpolates stays on one line; only a traceback keeps its breaks."""
    import logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure("INFO")
    try:
        logging.getLogger("dicom_node.receive").warning("refused instance from %s", "A\x1b[31m\nFAKE\r\u2028\x85")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("dicom_node.receive").exception("failed for %s", "B\nC")
    finally:
        root.handlers[:], root.level = saved
        logging.captureWarnings(False)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith(r"refused instance from A\x1b[31m\x0aFAKE\x0d\u2028\x85")
    assert lines[1].endswith(r"failed for B\x0aC") and lines[2] == "Traceback (most recent call last):"


# --- C12: SOP classes no model takes ---------------------------------------------------------------------------------


def video_from(multiframe_jpeg: Path, target: Path, root: str) -> Path:
    """The corpus's 120-frame JPEG ultrasound, relabelled Video Photographic Image Storage (JPEG is allowed there)."""

    def relabel(_: int, ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(VIDEO_PHOTOGRAPHIC)
        ds.Modality = "XC"

    (path,) = copy_series([multiframe_jpeg], target, root, edit=relabel)
    return path


def mpeg4_video(template: Path, target: Path, root: str) -> Path:
    """A video in MPEG-4 AVC: no pixel decoder exists for it anywhere in the worker."""

    def to_mpeg(_: int, ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(VIDEO_PHOTOGRAPHIC)
        ds.file_meta.TransferSyntaxUID = MPEG4HP41
        ds.Modality, ds.NumberOfFrames, ds.Rows, ds.Columns = "XC", 2, 64, 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_PARTIAL_420", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
        ds["PixelData"].VR = "OB"

    (path,) = copy_series([template], target, root, edit=to_mpeg)
    return path


@pytest.mark.catalogue("C12")
def test_c12_objects_no_model_takes_are_accepted_then_ignored(stack: Stack, shared: Path) -> None:
    """SR, ECG, a JPEG video, a dose-summary secondary capture and a CT localizer are stored (a PACS forwarding a
    whole study must not see failures for them), then closed as `no_model` with the reason, their files deleted and
    no job made. An MPEG-4 video, which nothing could ever decode, is refused with 0xC002 on the wire."""
    corpus = shared / "dicom"
    sources = {
        "SR": corpus / "highdicom" / "sr_document.dcm",
        "basic text SR": corpus / "cornerstone3D-testImages" / "no-pixel-data.dcm",
        "ECG": corpus / "pydicom" / "test_files" / "waveform_ecg.dcm",
        "dose summary": sorted((corpus / "dcm_qa_ct" / "Philips_head_phantom" / "S4010").iterdir())[0],
        "localizer": corpus / "dcm_qa_ct" / "Philips_head_phantom" / "S1000" / "I10",
    }
    roots = {what: new_root() for what in [*sources, "video", "mpeg"]}
    files = {
        what: copy_series([path], stack.work / "c12" / roots[what], roots[what])[0] for what, path in sources.items()
    }
    files["video"] = video_from(
        corpus / "pydicom-data" / "color3d_jpeg_baseline.dcm", stack.work / "c12" / "video", roots["video"]
    )
    files["mpeg"] = mpeg4_video(
        corpus / "pydicom-data" / "color3d_jpeg_baseline.dcm", stack.work / "c12" / "mpeg", roots["mpeg"]
    )
    statuses = dict(zip(files, store(stack.port, list(files.values())), strict=True))
    assert statuses == {what: 0x0000 for what in [*sources, "video"]} | {"mpeg": 0xC002}

    accepted = [f"{roots[what]}.2" for what in [*sources, "video"]]
    closed = stack.wait_series_closed(accepted)
    assert set(closed.values()) == {("no_model", "no model matches")}
    assert all(stack.jobs(uid) == [] for uid in accepted)
    assert stack.series(f"{roots['mpeg']}.2") is None  # refused: never recorded
    assert not any((stack.data / "spool" / key_of(LOG_KEY.encode(), f"{roots[what]}.1")).exists() for what in roots)
    assert "no pixel data decoder exists for MPEG-4 AVC/H.264 High Profile / Level 4.1 (0xC002)" in stack.log(
        "pacsai-node"
    )


# --- C16: series a model is routed to but no volume can be made of ---------------------------------------------------


@pytest.mark.catalogue("C16")
def test_c16_unusable_series_end_failed_with_their_reason(stack: Stack, shared: Path, ct_series: Path) -> None:
    """Routed to the CT model, but: a gantry-tilted head with uneven spacing (GE), an abdomen with a slice missing,
    an abdomen with one slice in another orientation, and two slices at one position. Each job ends `failed`
    with a reason naming the problem, nothing is sent to the PACS, and the worker keeps running."""
    slices = sorted(ct_series.iterdir())
    roots = {what: new_root() for what in ("tilt", "gap", "orientation", "duplicate")}

    def tilt_one(index: int, ds: Dataset) -> None:
        if index == 5:
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.9950042, -0.0998334]  # 5.7° about x

    def twin(index: int, ds: Dataset) -> None:
        if index == 1:
            ds.ImagePositionPatient = dcmread(slices[0], stop_before_pixels=True).ImagePositionPatient

    series = {
        "tilt": copy_series(
            sorted((shared / "dicom" / "dcm_qa_ct" / "GE_head_tilt").glob("*.dcm")),
            stack.work / "c16" / "tilt",
            roots["tilt"],
        ),
        "gap": copy_series(slices[:9] + slices[10:], stack.work / "c16" / "gap", roots["gap"]),
        "orientation": copy_series(
            slices[:12], stack.work / "c16" / "orientation", roots["orientation"], edit=tilt_one
        ),
        "duplicate": copy_series(slices[:12], stack.work / "c16" / "duplicate", roots["duplicate"], edit=twin),
    }
    for files in series.values():
        storescu(stack.port, files)
    jobs = stack.wait_jobs_ended([f"{root}.2" for root in roots.values()])
    reasons = {what: jobs[f"{roots[what]}.2"] for what in roots}
    assert {what: [state for _, state, _ in found] for what, found in reasons.items()} == {
        what: ["failed"] for what in roots
    }
    expected = {
        "tilt": "uneven slice spacing",
        "gap": "uneven slice spacing",
        "orientation": "mixed orientations in one series (ImageOrientationPatient differs)",
        "duplicate": "share a position with another slice (duplicate positions)",
    }
    for what, fragment in expected.items():
        ((_, _, reason),) = reasons[what]
        assert reason.startswith("series not loadable: ") and fragment in reason, (what, reason)
        assert stack.results(f"{roots[what]}.1") == {}
    assert next(p for p in stack.processes if p.name == "pacsai-worker").popen.poll() is None


# --- S7: a bit flipped in the spool after the instance was accepted --------------------------------------------------


@pytest.mark.catalogue("S7")
def test_s7_a_bit_flipped_after_acceptance_fails_the_job_before_inference(stack: Stack, ct_series: Path) -> None:
    """Ten slices are accepted (0x0000); before the series completes one spooled file loses a bit in its pixel
    data. The worker compares every file with the hash recorded at receipt: the job fails with "spooled instance
    corrupted", no inference result is written or sent, and the log says so without naming a file or UID."""
    root = new_root()
    files = copy_series(sorted(ct_series.iterdir())[:10], stack.work / "s7" / root, root)

    def flip_a_bit() -> None:
        victim = stack.spooled(f"{root}.2")[3]
        size = victim.stat().st_size
        with open(victim, "r+b") as handle:
            handle.seek(size - 4096)
            byte = handle.read(1)
            handle.seek(size - 4096)
            handle.write(bytes([byte[0] ^ 0x10]))

    assert store(stack.port, files, while_open=flip_a_bit) == [0x0000] * 10
    ((job_id, state, reason),) = stack.wait_jobs_ended([f"{root}.2"])[f"{root}.2"]
    assert (state, reason) == ("failed", "spooled instance corrupted: 1 of 10 file(s) differ from what was received")
    assert not (stack.data / "outbox" / job_id).exists() or not list((stack.data / "outbox" / job_id).iterdir())
    assert stack.results(f"{root}.1") == {}
    log = stack.log("pacsai-worker")
    assert "1 of 10 spooled instance file(s) differ from the hash recorded when they were written" in log
    assert root not in log


# --- C15: a very large instance is streamed to disk; the cap refuses before it fills the disk ------------------------


def multiframe(path: Path, root: str, frames: int) -> Path:
    """A 512 x 512 x frames, 16-bit multi-frame secondary capture (frames x 0.5 MiB of pixel data)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MULTIFRAME_WORD_SC, f"{root}.3.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = f"{root}.1", f"{root}.2", "OT"
    ds.PatientName, ds.PatientID = "Large^Instance", "C15"
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 512, 512, frames, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME2", 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(512 * 512 * 2 * frames)
    ds["PixelData"].VR = "OW"
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_hash(path: Path) -> str:
    """SHA-256 of a DICOM file's data set, after its file meta (which the receiver writes anew)."""
    with open(path, "rb") as handle:
        handle.seek(132)
        group_length = handle.read(12)  # (0002,0000) UL, explicit VR: tag, VR, length, value
        handle.seek(132 + 12 + struct.unpack("<I", group_length[8:])[0])
        return hashlib.file_digest(handle, "sha256").hexdigest()


def peak_rss_mb(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024


@pytest.mark.catalogue("C15", "S1")
def test_c15_large_instances_stream_to_disk_with_memory_bounded(tmp_path: Path) -> None:
    """A 50 MiB instance is accepted and an 80 MiB one refused (PACSAI_MAX_INSTANCE_MB=64) with 0xC001; the
    node's peak RSS grows by far less than either (in-memory receipt costs 2-3 copies of the instance), the refused
    one never takes more than the cap on disk, and nothing of it is left anywhere. Then (S1) the disk under the
    incoming files fills in the middle of a data set: 0xA700 for it, and the next instance on the same association
    is stored (pynetdicom alone would drop the association on the write error)."""
    port = free_port()
    env = pacsai_env(
        tmp_path / "data",
        port=port,
        peers=f"{PACS}@127.0.0.1:104",
        PACSAI_MAX_INSTANCE_MB="64",
        # the multi-frame series must stay spooled until it is checked (complete by its count, no model: cleaned)
        PACSAI_COMPLETE_ON_DECLARED_COUNT="false",
        PACSAI_RELEASE_GRACE_S="300",
    )
    accepted = multiframe(tmp_path / "accepted.dcm", new_root(), 100)  # 50 MiB of pixel data
    refused = multiframe(tmp_path / "refused.dcm", new_root(), 160)  # 80 MiB
    node = start_pacsai("node", tmp_path, env)
    try:
        before = peak_rss_mb(node.popen.pid)
        incoming = tmp_path / "data" / "incoming"
        largest = [0]
        stop = threading.Event()

        def watch() -> None:  # how large the node's partial files get on disk while data arrives
            while not stop.wait(0.02):
                for path in incoming.glob("*"):
                    with contextlib.suppress(OSError):
                        largest[0] = max(largest[0], path.stat().st_size)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            statuses = store(port, [accepted, refused])
        finally:
            stop.set()
            watcher.join()
        growth = peak_rss_mb(node.popen.pid) - before
        print(
            f"C15: node peak RSS {before:.0f} -> {before + growth:.0f} MiB; largest partial file "
            f"{largest[0] / 2**20:.0f} MiB"
        )
        assert statuses == [0x0000, 0xC001]
        assert growth < 32, f"node peak RSS grew by {growth:.0f} MiB"  # one copy in memory would be 50 MiB
        assert 0 < largest[0] <= 64 * 2**20
        assert list(incoming.iterdir()) == []
        (spooled,) = [p for p in (tmp_path / "data" / "spool").rglob("*.dcm")]
        assert dataset_hash(spooled) == dataset_hash(accepted)  # the data set as sent, byte for byte
        assert "data set larger than PACSAI_MAX_INSTANCE_MB (0xC001)" in node.log()

        # S1 while streaming: the disk under `incoming` fills mid data set; 0xA700, and the association goes on
        if not mount_tmpfs(incoming, "4m"):
            return
        try:
            big, small = (
                multiframe(tmp_path / "big.dcm", new_root(), 20),
                multiframe(tmp_path / "small.dcm", new_root(), 2),
            )
            assert store(port, [big, small]) == [0xA700, 0x0000]  # 10 MiB does not fit in 4, 1 MiB does
            assert list(incoming.iterdir()) == []
            assert "data set could not be written to disk (0xA700)" in node.log()
        finally:
            subprocess.run(["umount", "-l", str(incoming)], check=False)
    finally:
        node.stop()


def in_process_node_settings(tmp_path: Path) -> Settings:
    """A node started in this process (start_node) on a free loopback port, data under tmp_path, 1 MB reserve."""
    return Settings.from_env(
        {
            "PACSAI_DATA_DIR": str(tmp_path / "data"),
            "PACSAI_BIND_HOST": "127.0.0.1",
            "PACSAI_PORT": str(free_port()),
            "PACSAI_LOG_KEY": LOG_KEY,
            "PACSAI_PEERS": f"{PACS}@127.0.0.1:104",
            "PACSAI_SPOOL_RESERVE_MB": "1",
        }
    )


@pytest.mark.catalogue("C15")
def test_c15_a_transfer_cut_off_mid_data_set_leaves_no_partial_file(tmp_path: Path) -> None:
    """The streamed file of a data set whose sender dies halfway (N10, N11: storescu killed -9, so the connection
    drops mid-P-DATA) is deleted when the connection ends, and files left by a node killed mid-transfer are
    deleted when it starts again; nothing reaches the spool."""
    need("storescu")
    settings = in_process_node_settings(tmp_path)
    incoming = settings.storage.data_dir / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "incoming-left-by-a-killed-node.dcm").write_bytes(b"\x00" * 1000)
    (incoming / "not-ours.txt").write_text("kept")
    big = multiframe(tmp_path / "big.dcm", new_root(), 200)  # 100 MiB
    node = start_node(settings)
    try:
        assert sorted(p.name for p in incoming.iterdir()) == ["not-ours.txt"]
        sender = subprocess.Popen(
            ["storescu", "-aet", PACS, "-aec", "PACSAI", "127.0.0.1", str(settings.node.port), str(big)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(
                lambda: any(p.stat().st_size > 10 * 2**20 for p in incoming.glob("incoming-*")),
                60,
                "part of the data set on disk",
                0.02,
            )
        finally:
            sender.kill()
            sender.wait()
        wait_until(lambda: not list(incoming.glob("incoming-*")), 30, "the partial file to go", 0.1)
        assert not list(settings.storage.spool_dir.rglob("*.dcm")) and node.state.counts()["instances"]["received"] == 0
    finally:
        node.stop()


def mount_tmpfs(where: Path, size: str) -> bool:
    """Mount a small tmpfs (root only): False where that is not possible outside CI."""
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    ):
        return True
    if IN_CI:
        pytest.fail("cannot mount a tmpfs (needs root)")
    return False


# --- S5: a spool the node cannot write ------------------------------------------------------------------------------


@pytest.fixture()
def tmpfs_spool(tmp_path: Path) -> Iterator[Path]:
    spool = tmp_path / "data" / "spool"
    spool.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(spool)], capture_output=True).returncode:
        if IN_CI:
            pytest.fail("cannot mount a tmpfs for the spool (needs root)")
        pytest.skip("cannot mount a tmpfs for the spool (needs root)")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


@pytest.mark.catalogue("S5")
def test_s5_read_only_spool_stops_the_node_and_a_spool_lost_later_answers_out_of_resources(
    tmpfs_spool: Path, tmp_path: Path, ct_series: Path
) -> None:
    """At start, a read-only spool stops `pacsai node` with a message naming the directory and PACSAI_DATA_DIR; it
    never listens and never writes elsewhere (its TMPDIR stays empty). Made read-only while running, the spool makes
    the node answer 0xA700 (the sender retries later), keep nothing, and store again once it is writable."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    port = free_port()
    env = pacsai_env(
        tmp_path / "data", port=port, peers=f"{PACS}@127.0.0.1:104", TMPDIR=str(scratch), PACSAI_SPOOL_RESERVE_MB="0"
    )
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs_spool)], check=True)
    refused = spawn(
        "pacsai-node-ro", [sys.executable, "-m", "worker.cli", "node"], tmp_path, {**env, "PYTHONPATH": str(REPO)}
    )
    assert refused.popen.wait(timeout=60) == 1
    assert (
        f"pacsai: spool directory {tmpfs_spool} cannot be used (Read-only file system); PACSAI_DATA_DIR must be "
        "a writable directory"
    ) in refused.log()
    assert not port_open(port) and list(scratch.iterdir()) == []

    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs_spool)], check=True)
    node = start_pacsai("node", tmp_path, env)
    try:
        root = new_root()
        files = copy_series(sorted(ct_series.iterdir())[:2], tmp_path / "series", root)
        subprocess.run(["mount", "-o", "remount,ro", str(tmpfs_spool)], check=True)
        assert store(port, files[:1]) == [0xA700]
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs_spool)], check=True)
        assert store(port, files[1:]) == [0x0000]
        assert len(list(tmpfs_spool.rglob("*.dcm"))) == 1
        assert list((tmp_path / "data" / "incoming").iterdir()) == [] and list(scratch.iterdir()) == []
        assert "spool write failed (OSError)" in node.log()
    finally:
        node.stop()


# --- S4: durable before the success reply ----------------------------------------------------------------------------


@pytest.mark.catalogue("S4")
def test_s4_file_and_directory_are_synced_before_the_success_reply(tmp_path: Path, ct_series: Path) -> None:
    """Watch the node (in this process) with a profiler, not a mock: for each C-STORE, the spooled file is fsynced,
    renamed into place and its directory fsynced, and only then is the success reply sent; at that moment the file
    on disk is complete. A power cut after the reply finds the instance (what an fsync promises)."""
    settings = in_process_node_settings(tmp_path)
    root = new_root()
    files = copy_series(sorted(ct_series.iterdir())[:3], tmp_path / "series", root)
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and arg in (os.fsync, os.replace):
            code = frame.f_code.co_name
            if code in ("move_atomic", "_placed", "_fsync_dir"):
                target = frame.f_locals.get("path")
                with lock:
                    events.append((f"{arg.__name__} in {code}", str(target)))
        elif (
            event == "call"
            and frame.f_code.co_name == "send_msg"
            and "dimse" in frame.f_code.co_filename
            and (frame.f_back is None or frame.f_back.f_code.co_name != "send_msg")  # the outer one: fast_dimse's
        ):  # (which hands an unusual response on to pynetdicom's send_msg, e.g. when pynetdicom's log handlers listen)
            primitive = frame.f_locals.get("primitive")  # the SCP's C-STORE response (requests have no Status)
            if type(primitive).__name__ == "C_STORE" and getattr(primitive, "Status", None) is not None:
                with lock:
                    events.append(("reply", f"0x{int(primitive.Status):04X}"))

    node = start_node(settings)
    threading.setprofile(profile)
    try:
        assert store(settings.node.port, files) == [0x0000] * 3
    finally:
        threading.setprofile(None)
        node.stop()
    spooled = sorted(p for p in (tmp_path / "data" / "spool").rglob("*.dcm"))
    assert len(spooled) == 3
    per_instance = [events[i : i + 5] for i in range(0, len(events), 5)]
    assert len(per_instance) == 3, events
    for steps in per_instance:  # received file moved next to its place, synced, renamed into place, directory synced
        assert [what for what, _ in steps] == [
            "replace in move_atomic",
            "fsync in move_atomic",
            "replace in _placed",
            "fsync in _fsync_dir",
            "reply",
        ], steps
        final, directory, code = Path(steps[2][1]), Path(steps[3][1]), steps[4][1]
        assert final in spooled and directory == final.parent and code == "0x0000"
    for path, source in zip(
        sorted(spooled, key=lambda p: dcmread(p).InstanceNumber),
        sorted(files, key=lambda p: dcmread(p).InstanceNumber),
        strict=True,
    ):
        assert dcmread(path).PixelData == dcmread(source).PixelData
