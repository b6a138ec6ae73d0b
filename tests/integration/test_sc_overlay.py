"""SEG overlays as Secondary Captures, from the real CT series and a synthetic label map (and through the pipeline
with the real tiny model); and sending them to a peer that takes Secondary Captures only in JPEG baseline and no SEG
at all."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage
from pynetdicom import AE, evt

from dicom_node.send import SOP_CLASS_NOT_SUPPORTED, send_files
from models.spec import Code, Label, ModelSpec
from pacsai.dimse import StoreOutcome
from pacsai.jobs import SeriesJob
from pacsai.profiles import Output, output_of
from pacsai.settings import Peer, Settings
from pacsai.storage import Spool, outbox_for
from tests.checks import dciodvfy_errors, read_strict, segmentation_spec, to_bytes
from tests.conftest import need
from tests.services import free_port
from worker import pipeline
from worker.deliver import pending
from worker.encode_overlay import (
    FILL_OPACITY,
    OVERLAY_SERIES_NUMBER,
    encode_seg_overlays,
    outline,
    patient_orientation,
    segment_styles,
    window_grey,
)
from worker.encode_sc import BANNER
from worker.encode_seg import encode_seg
from worker.load_volume import load_series
from worker.uids import output_uids
from worker.volume import Volume

pytestmark = pytest.mark.integration
ANATOMY = Code("123037004", "Anatomical Structure")
LIVER = Label(1, "liver", ANATOMY, Code("10200004", "Liver"), (221, 130, 101))
SPLEEN = Label(2, "spleen", ANATOMY, Code("78961009", "Spleen"), (157, 108, 162))
BOX = (slice(3, 11), slice(150, 250), slice(150, 260))  # liver: slices 3..10
DISC: tuple[slice, int, int, int] = (slice(8, 14), 320, 360, 25)  # spleen: slices 8..13, centre row/column, radius px
BANNER_RGB = (160, 0, 0)


@pytest.fixture(scope="module")
def volume(ct_series: Path) -> Volume:
    return load_series(sorted(ct_series.iterdir()))


@pytest.fixture(scope="module")
def label_map(volume: Volume) -> NDArray[np.uint8]:
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[BOX] = LIVER.number
    rows, columns = np.ogrid[: labels.shape[1], : labels.shape[2]]  # type: ignore[misc]
    disc = (rows - DISC[1]) ** 2 + (columns - DISC[2]) ** 2 <= DISC[3] ** 2
    labels[DISC[0]] = np.where(disc, SPLEEN.number, labels[DISC[0]])
    return labels


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return segmentation_spec(LIVER, SPLEEN)


def _seg(volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec, *, omit_empty_frames: bool) -> Dataset:
    uids = output_uids(str(volume.datasets[0].SeriesInstanceUID), spec.name, spec.version)
    return encode_seg(
        volume, label_map, spec, uids, software_version="pacsai test", omit_empty_frames=omit_empty_frames
    )


@pytest.fixture(scope="module")
def seg(volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec) -> Dataset:
    return _seg(volume, label_map, spec, omit_empty_frames=True)


@pytest.fixture(scope="module")
def overlays(seg: Dataset, volume: Volume) -> list[Dataset]:
    return [read_strict(to_bytes(sc)) for sc in encode_seg_overlays(seg, volume)]


def _sources(ct_series: Path) -> dict[str, Dataset]:
    """The source files themselves, by SOP Instance UID (not through our loader)."""
    headers = (dcmread(path, stop_before_pixels=True) for path in sorted(ct_series.iterdir()))
    return {str(ds.SOPInstanceUID): ds for ds in headers}


def test_one_overlay_per_labelled_slice_in_a_new_series_of_the_study(
    overlays: list[Dataset], volume: Volume, label_map: NDArray[np.uint8], seg: Dataset, ct_series: Path
) -> None:
    labelled = [k for k in range(label_map.shape[0]) if label_map[k].any()]
    assert labelled == list(range(3, 14))
    assert [str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in overlays] == [
        str(volume.datasets[k].SOPInstanceUID) for k in labelled
    ]
    sources = _sources(ct_series)
    for sc in overlays:
        source = sources[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.SeriesNumber == OVERLAY_SERIES_NUMBER
        assert (sc.StudyInstanceUID, sc.PatientID, sc.PatientName) == (
            source.StudyInstanceUID,
            source.PatientID,
            source.PatientName,
        )
        assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, seg.SeriesInstanceUID)
        assert sc.BurnedInAnnotation == "YES" and "not for diagnosis" in sc.SeriesDescription
        assert sc.SeriesDescription.startswith("AI ct-organs-tiny 0.1.0")
        assert str(sc.SourceImageSequence[1].ReferencedSOPInstanceUID) == seg.SOPInstanceUID
        assert (sc.Rows, sc.Columns, sc.SamplesPerPixel) == (source.Rows, source.Columns, 3)
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "FrameOfReferenceUID"):
            assert sc[keyword].value == source[keyword].value, keyword
        assert list(sc.PatientOrientation) == ["L", "P"]  # axial: rows run to the left, columns to the back
    assert len({sc.SOPInstanceUID for sc in overlays}) == len(overlays)
    assert len({sc.SeriesInstanceUID for sc in overlays}) == 1


def test_segments_are_drawn_in_their_colours_where_they_are(
    overlays: list[Dataset], volume: Volume, label_map: NDArray[np.uint8], seg: Dataset
) -> None:
    styles = segment_styles(seg)
    for colour, label in ((styles[1].rgb, LIVER), (styles[2].rgb, SPLEEN)):
        assert np.allclose(colour, label.colour_rgb, atol=2)  # CIELab in the SEG, back to sRGB
    k = 9  # liver and spleen both on this slice
    picture = overlays[k - 3].pixel_array.astype(np.int64)
    grey = window_grey(volume.array[k], volume.datasets[k]).astype(np.int64)
    for number, style in styles.items():
        mask = label_map[k] == number
        edge, inside = outline(mask), mask & ~outline(mask)
        assert edge.any() and inside.any()
        assert (picture[edge] == style.rgb).all()
        blended = np.rint(grey[inside][:, None] * (1 - FILL_OPACITY) + np.asarray(style.rgb) * FILL_OPACITY)
        assert np.abs(picture[inside] - blended).max() <= 1
    body = np.zeros(label_map[k].shape, dtype=bool)
    body[100:400, 60:450] = True  # away from the banner and the legend
    body &= label_map[k] == 0
    assert (picture[body] == grey[body][:, None]).all()  # untouched: grey, unchanged


def test_banner_and_legend_are_burned_in(overlays: list[Dataset], seg: Dataset) -> None:
    picture = overlays[9 - 3].pixel_array
    banner = picture[:12]
    assert (banner[1, :] == BANNER_RGB).all(), "a banner across the whole width"
    assert (banner == 255).all(axis=-1).sum() > 50, f"white text on the banner ({BANNER!r})"
    legend = picture[-60:, :200]
    for style in segment_styles(seg).values():  # a swatch of each segment on this slice
        assert (legend == style.rgb).all(axis=-1).sum() > 20, style.name


def test_overlays_pass_dciodvfy(overlays: list[Dataset], tmp_path: Path) -> None:
    need("dciodvfy")
    for index, sc in enumerate(overlays[:3]):
        path = tmp_path / f"overlay-{index}.dcm"
        path.write_bytes(to_bytes(sc))
        assert dciodvfy_errors(path) == []


def test_the_same_overlays_come_from_the_seg_file_and_from_a_seg_with_empty_frames(
    overlays: list[Dataset], seg: Dataset, volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec
) -> None:
    """A SEG fallback draws the SEG in the outbox: same UIDs, same pixels as overlays made with the SEG."""
    from_file = encode_seg_overlays(hd.seg.segread(BytesIO(to_bytes(seg))), volume)
    full = _seg(volume, label_map, spec, omit_empty_frames=False)  # the profile option seg_omit_empty_frames false
    assert int(full.NumberOfFrames) == 2 * label_map.shape[0] > int(seg.NumberOfFrames)
    for again in (from_file, encode_seg_overlays(full, volume)):
        assert [sc.SOPInstanceUID for sc in again] == [sc.SOPInstanceUID for sc in overlays]
        assert all((a.pixel_array == b.pixel_array).all() for a, b in zip(again, overlays, strict=True))


def test_a_peer_taking_sc_only_as_jpeg_gets_jpeg_and_no_seg(
    overlays: list[Dataset], seg: Dataset, tmp_path: Path
) -> None:
    """The sender proposes the profile's syntaxes, compresses for a JPEG-only peer, and does not send a SEG
    the peer accepted no context for (0x0122, not negotiated)."""
    received: list[Dataset] = []

    def store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="VIEWER")
    ae.add_supported_context(SecondaryCaptureImageStorage, [JPEGBaseline8Bit])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    files = [tmp_path / "overlay-0001.dcm", tmp_path / "seg.dcm"]
    files[0].write_bytes(to_bytes(overlays[6]))
    files[1].write_bytes(to_bytes(seg))
    try:
        results = send_files(
            files,
            Peer("VIEWER", "127.0.0.1", port),
            calling_ae="PACSAI",
            transfer_syntaxes=(JPEGBaseline8Bit, "1.2.840.10008.1.2.1"),
        )
    finally:
        assert server is not None
        server.shutdown()
    assert [(r.outcome, r.code, r.negotiated) for r in results] == [
        (StoreOutcome.SUCCESS, 0, True),
        (StoreOutcome.PERMANENT, SOP_CLASS_NOT_SUPPORTED, False),
    ]
    (jpeg,) = received
    assert jpeg.file_meta.TransferSyntaxUID == JPEGBaseline8Bit and jpeg.LossyImageCompression == "01"
    assert jpeg.SOPInstanceUID == overlays[6].SOPInstanceUID
    difference = np.abs(jpeg.pixel_array.astype(int) - overlays[6].pixel_array.astype(int))
    assert difference.mean() < 3.0  # lossy, but the same picture


@pytest.mark.slow
def test_the_pipeline_makes_overlays_for_a_profile_with_sc_and_again_from_the_seg(
    ct_series: Path, tmp_path: Path
) -> None:
    """pipeline.run with the real tiny model for a peer whose profile lists sc; the fallback path
    (write_overlays, from the SEG in the outbox) then makes the very same files."""
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("peers:\n  VIEWER:\n    outputs: [sc, sr]\n    seg_omit_empty_frames: false\n")
    settings = Settings.from_env(
        {
            "PACSAI_DATA_DIR": str(tmp_path / "data"),
            "PACSAI_PEERS": "VIEWER@127.0.0.1:104",
            "PACSAI_PROFILES_FILE": str(profiles),
            "PACSAI_DEVICE": "cpu",
        }
    )
    spool = Spool(settings.storage.spool_dir, b"test-key", reserve_bytes=0)
    stored = []
    for path in sorted(ct_series.iterdir()):
        header = dcmread(path, stop_before_pixels=True)
        stored.append(
            spool.put(header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID, path.read_bytes())
        )
    manifest = spool.write_manifest(stored[0].study_key, stored[0].series_key, "job1", [s.path for s in stored])
    job = SeriesJob("job1", stored[0].study_key, stored[0].series_key, "ct-organs-tiny", manifest, "VIEWER")

    made = {path.name: dcmread(path) for path in pipeline.run(job, settings, spool).files}
    overlays = sorted(name for name in made if output_of(name) is Output.SC)
    assert sorted(set(made) - set(overlays)) == ["seg.dcm", "sr.dcm"] and overlays
    seg = made["seg.dcm"]
    assert int(seg.NumberOfFrames) == len(seg.SegmentSequence) * len(stored)  # empty frames kept, as asked
    marked = {
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f, frame in zip(seg.PerFrameFunctionalGroupsSequence, seg.pixel_array, strict=True)
        if frame.any()
    }
    assert {str(made[name].SourceImageSequence[0].ReferencedSOPInstanceUID) for name in overlays} == marked
    outbox = outbox_for(settings, job.job_id)
    assert [p.name for p in pending(outbox, [], settings.delivery.profile_for("VIEWER"))] == [*overlays, "sr.dcm"]

    for name in overlays:
        (outbox / name).unlink()
    again = {path.name: dcmread(path) for path in pipeline.write_overlays(job, settings, spool)}
    assert sorted(again) == overlays
    assert all(again[name].SOPInstanceUID == made[name].SOPInstanceUID for name in overlays)
    assert all((again[name].pixel_array == made[name].pixel_array).all() for name in overlays)


def test_overlays_of_a_gantry_tilted_series_carry_its_oblique_orientation(
    shared: Path, spec: ModelSpec, tmp_path: Path
) -> None:
    """The GE head CT is tilted: its columns run posterior and foot-ward ("PF"), which highdicom's own
    one-letter-per-direction check refuses; the overlay still says where its rows and columns point."""
    need("dciodvfy")
    folder = shared / "dicom" / "dcm_qa_ct" / "GE_head_tilt"
    files = sorted(folder.glob("*.dcm"))[:14]  # images 01-14: evenly spaced (the whole series is not)
    tilted = load_series(files)
    labels = np.zeros(tilted.array.shape, dtype=np.uint8)
    labels[5:8, 200:300, 200:300] = LIVER.number
    seg = _seg(tilted, labels, spec, omit_empty_frames=True)
    overlays = [read_strict(to_bytes(sc)) for sc in encode_seg_overlays(seg, tilted)]
    assert len(overlays) == 3
    for index, sc in enumerate(overlays):
        assert list(sc.PatientOrientation) == list(patient_orientation(tilted.datasets[5]) or ())
        assert len(sc.PatientOrientation[1]) == 2  # oblique: two letters
        path = tmp_path / f"overlay{index}.dcm"
        path.write_bytes(to_bytes(sc))
        assert dciodvfy_errors(path) == []
