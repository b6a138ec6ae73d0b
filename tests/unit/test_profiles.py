"""Destination profiles: the file's format, its checks, the defaults, and which outbox files go to a peer."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from dicom_node.send import SOP_CLASS_NOT_SUPPORTED, SendResult, proposed_contexts
from pacsai.dimse import StoreOutcome
from pacsai.errors import ConfigError
from pacsai.profiles import Output, Profile, Profiles, SegFallback, output_of, overlay_file, parse_profiles
from pacsai.settings import Peer, Settings
from pacsai.state import State
from worker.deliver import FALLBACK, pending, with_seg_fallback

OUTBOX = ("seg.dcm", "sr.dcm", "sc.dcm", overlay_file(1), overlay_file(2))
PROFILES = """
default:
  seg_fallback: sr-only
peers:
  PACS1:
    outputs: [seg, sr]
    seg_omit_empty_frames: false
  VIEWER2:
    outputs: sc, sr, heatmap
    seg_fallback: skip
    transfer_syntaxes: [jpeg-baseline, explicit-le]
"""


def _settings(tmp_path: Path, profiles: str, peers: str = "PACS1@h:104,VIEWER2@h:105,OTHER@h:106") -> Settings:
    path = tmp_path / "profiles.yaml"
    path.write_text(profiles)
    return Settings.from_env(
        {"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": peers, "PACSAI_PROFILES_FILE": str(path)}
    )


def test_without_a_file_every_peer_gets_what_it_got_before(tmp_path: Path) -> None:
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": "PACS1@h:104"})
    profile = settings.delivery.profile_for("PACS1")
    assert profile == Profile() == settings.delivery.profile_for("ANYONE")
    assert profile.outputs == {Output.SEG, Output.SR, Output.HEATMAP}
    assert profile.seg_omit_empty_frames and profile.seg_fallback is SegFallback.SC
    assert profile.transfer_syntaxes == (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert [name for name in OUTBOX if profile.sends(name)] == ["seg.dcm", "sr.dcm", "sc.dcm"]


def test_peers_inherit_the_default_section_and_override_it(tmp_path: Path) -> None:
    settings = _settings(tmp_path, PROFILES)
    pacs1, viewer2, other = (settings.delivery.profile_for(title) for title in ("PACS1", "VIEWER2", "OTHER"))
    assert pacs1 == Profile(
        outputs=frozenset({Output.SEG, Output.SR}), seg_omit_empty_frames=False, seg_fallback=SegFallback.SR_ONLY
    )
    assert viewer2.outputs == {Output.SC, Output.SR, Output.HEATMAP} and viewer2.seg_fallback is SegFallback.SKIP
    assert viewer2.transfer_syntaxes == (JPEGBaseline8Bit, ExplicitVRLittleEndian)
    assert other == Profile(seg_fallback=SegFallback.SR_ONLY)
    assert [name for name in OUTBOX if viewer2.sends(name)] == ["sr.dcm", "sc.dcm", *OUTBOX[3:]]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("peers: {PACS1: {outputs: [seg, pdf]}}", "'pdf' is not one of seg, sr, sc, heatmap"),
        ("peers: {PACS1: {outputs: []}}", "outputs lists nothing"),
        ("peers: {PACS1: {seg_fallback: sms}}", "'sms' is not one of sc, sr-only, skip, fail"),
        ("peers: {PACS1: {seg_omit_empty_frames: perhaps}}", "must be true or false"),
        ("peers: {PACS1: {transfer_syntaxes: [jpeg2000]}}", "unknown transfer syntax(es) ['jpeg2000']"),
        ("peers: {PACS1: {transfer_syntaxes: [jpeg-baseline]}}", "needs explicit-le or implicit-le"),
        ("peers: {PACS1: {output: [seg]}}", "unknown key(s) ['output']"),
        ("peers: {'A\\\\B': {outputs: [sr]}}", "not a valid AE title"),
        ("peers: [PACS1]", "'peers' must map AE titles"),
        ("profiles: {}", "expected a mapping with 'default' and/or 'peers'"),
        ("peers: {PACS1: {outputs: [seg}", "cannot be read (ParserError)"),
        ("peers: {NOBODY: {outputs: [sr]}}", "PACSAI_PEERS does not name"),
    ],
)
def test_a_wrong_file_names_the_variable_and_the_problem(text: str, complaint: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PACSAI_PROFILES_FILE") as raised:
        _settings(tmp_path, text)
    assert complaint in str(raised.value)


def test_a_missing_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PACSAI_PROFILES_FILE is invalid: .* cannot be read"):
        Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PROFILES_FILE": str(tmp_path / "none.yaml")})


def test_an_empty_file_means_defaults() -> None:
    assert parse_profiles(None) == Profiles()


def test_file_names_map_to_output_kinds() -> None:
    assert [output_of(name) for name in OUTBOX] == [Output.SEG, Output.SR, Output.HEATMAP, Output.SC, Output.SC]
    assert output_of("notes.txt") is None and Profile(outputs=frozenset({Output.SR})).sends("extra.dcm")


@pytest.mark.parametrize(
    ("fallback", "outputs", "after_refusal"),
    [
        (SegFallback.SC, {Output.SEG, Output.SR}, ["sr.dcm", *OUTBOX[3:]]),
        (SegFallback.SR_ONLY, {Output.SEG}, ["sr.dcm"]),  # the SR goes although the profile does not list it
        (SegFallback.SKIP, {Output.SEG}, []),
        (SegFallback.FAIL, {Output.SEG, Output.SR}, ["sr.dcm"]),
    ],
)
def test_after_a_seg_refusal_the_fallback_files_go_and_never_the_seg(
    fallback: SegFallback, outputs: set[Output], after_refusal: list[str]
) -> None:
    profile = Profile(outputs=frozenset(outputs), seg_fallback=fallback)
    assert [name for name in OUTBOX if profile.sends(name, seg_refused=True)] == after_refusal


def test_pending_leaves_out_what_is_delivered_and_a_refused_seg(tmp_path: Path) -> None:
    for name in OUTBOX:
        (tmp_path / name).write_bytes(b"")
    profile = Profile(outputs=frozenset({Output.SEG, Output.SR}))
    assert [p.name for p in pending(tmp_path, [], profile)] == ["seg.dcm", "sr.dcm"]
    records = [("sr.dcm", "success", 1, "0x0000"), ("seg.dcm", FALLBACK, 1, "0x0122")]
    assert [p.name for p in pending(tmp_path, records, profile)] == [overlay_file(1), overlay_file(2)]
    records = [("seg.dcm", "permanent", 1, "0xA900")]
    assert [p.name for p in pending(tmp_path, records, profile)] == ["seg.dcm", "sr.dcm"]


def test_without_a_refusal_or_with_fallback_fail_results_stay_as_they_are(tmp_path: Path) -> None:
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path)})
    state = State(tmp_path / "state.db")
    refused = SendResult(tmp_path / "seg.dcm", StoreOutcome.PERMANENT, SOP_CLASS_NOT_SUPPORTED, negotiated=False)
    other = SendResult(tmp_path / "seg.dcm", StoreOutcome.PERMANENT, 0xA900)

    def send(files: list[Path]) -> list[SendResult]:
        raise AssertionError("nothing may be sent")

    for results, fallback in (([refused], SegFallback.FAIL), ([other], SegFallback.SC)):
        kept = with_seg_fallback(
            results,
            send,
            profile=Profile(seg_fallback=fallback),
            peer=Peer("P", "h", 1),
            job_id="j1",
            settings=settings,
            state=state,
        )
        assert kept == results
    assert state.deliveries("j1") == []
    state.close()


def _file(sop_class: str, syntax: str, **values: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.SOPClassUID = sop_class
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_the_sender_proposes_only_what_the_files_need_in_the_profiles_syntaxes() -> None:
    rgb = {"PixelData": b"\0" * 12, "BitsAllocated": 8, "SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}
    datasets = [
        _file(SegmentationStorage, ExplicitVRLittleEndian),
        _file(Comprehensive3DSRStorage, ExplicitVRLittleEndian),
        _file(SecondaryCaptureImageStorage, ExplicitVRLittleEndian, **rgb),
        _file(SecondaryCaptureImageStorage, ExplicitVRLittleEndian, **rgb),
    ]
    contexts = proposed_contexts(datasets, (JPEGBaseline8Bit, ImplicitVRLittleEndian))
    assert contexts == {
        SegmentationStorage: [ImplicitVRLittleEndian],
        Comprehensive3DSRStorage: [ImplicitVRLittleEndian],
        SecondaryCaptureImageStorage: [JPEGBaseline8Bit, ImplicitVRLittleEndian],
    }
    ct_image = "1.2.840.10008.5.1.4.1.1.2"
    compressed = _file(ct_image, JPEG2000Lossless)  # a compressed file goes as it is
    assert proposed_contexts([compressed], (ExplicitVRLittleEndian,)) == {ct_image: [JPEG2000Lossless]}


def test_delivery_code_loads_no_inference() -> None:
    """Delivery only reads, checks and sends files: the delivery module imports neither the pipeline nor torch."""
    import subprocess
    import sys

    probe = "import sys, worker.deliver; print(sorted(m for m in ('worker.pipeline', 'torch') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]"
