"""Geometry: SEGs for a gantry-tilted CT and for an enhanced multi-frame MR land on the exact source frames.

A deterministic stand-in network, a 1x1x1 convolution (label 1 where the window-scaled value exceeds a threshold),
runs through worker/infer.py's real path: the source grid resampled with its full affine onto the model's grid, the
labels mapped back to every source voxel. worker/encode_seg.py builds the SEG (one frame per source slice). Every
check compares with the source files read here with pydicom, never with worker/load.py's Volume.

* GE head CT (dcm_qa_ct/GE_head_tilt), gantry tilt +18.5°: images 01-14, its evenly spaced part (4.22 mm steps
  along the table, 4.0 mm along the normal). The whole series also holds 7.38 mm steps and is refused for uneven
  spacing (tests/unit/test_load.py).
* Philips enhanced MR field map (dcm_qa_enh/Philips/IM_0027_fMAP.dcm): 64 frames, a magnitude and a field-map stack
  at the same 32 positions, orientation, pixel spacing and rescale per frame. The magnitude stack is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from pydicom import Dataset, dcmread
from pydicom.pixels.processing import apply_modality_lut

from models.preprocess import preprocess, to_ras_image
from models.registry import LoadedModel
from models.spec import Code, Label, ModelSpec, Preprocessing, Task
from tests.checks import dciodvfy_errors, read_strict, sr_volumes, to_bytes
from tests.conftest import need
from tests.services import SHARED
from worker import infer
from worker.encode_seg import encode_seg
from worker.load_volume import load_series
from worker.pipeline import process_series
from worker.uids import output_uids

pytestmark = pytest.mark.integration

DICOM = SHARED / "dicom"
REGION = Label(1, "above threshold", Code("123037004", "Anatomical Structure"), Code("69536005", "Head"), (255, 64, 0))
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Case:
    """A source, the stand-in's intensity window and threshold (modality values) and the model grid spacing."""

    files: tuple[Path, ...]
    window: tuple[float, float]
    threshold: float
    spacing_mm: tuple[float, float, float]
    slices: int

    @property
    def multiframe(self) -> bool:
        return len(self.files) == 1


CASES = {
    "ge-tilted-ct": Case(
        tuple(sorted((DICOM / "dcm_qa_ct" / "GE_head_tilt").glob("*.dcm"))[:14]),
        window=(-1000.0, 1000.0),
        threshold=-300.0,
        spacing_mm=(1.5, 1.5, 1.5),
        slices=14,
    ),
    "enhanced-mr": Case(
        (DICOM / "dcm_qa_enh" / "Philips" / "IM_0027_fMAP.dcm",),
        window=(0.0, 2000.0),
        threshold=300.0,
        spacing_mm=(3.0, 3.0, 3.0),
        slices=32,
    ),
}


@dataclass(frozen=True)
class SourcePlane:
    """One source slice or frame as its file says: geometry, modality values and frame type."""

    position: NDArray[np.float64]
    orientation: NDArray[np.float64]
    pixel_spacing: NDArray[np.float64]
    values: NDArray[np.float64]
    frame_type: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One case run through the stand-in model and encode_seg; the SEG as written and read back strictly."""

    case: Case
    seg: Dataset
    path: Path
    sources: dict[tuple[str, int], SourcePlane]


def source_planes(files: tuple[Path, ...]) -> dict[tuple[str, int], SourcePlane]:
    """(SOP Instance UID, frame number; 0 for a single-frame image) → that plane, read with pydicom alone."""
    planes = {}
    for path in files:
        ds = dcmread(path)
        if "PerFrameFunctionalGroupsSequence" not in ds:
            planes[(str(ds.SOPInstanceUID), 0)] = SourcePlane(
                np.asarray(ds.ImagePositionPatient, float),
                np.asarray(ds.ImageOrientationPatient, float),
                np.asarray(ds.PixelSpacing, float),
                np.asarray(apply_modality_lut(ds.pixel_array, ds), float),
                tuple(ds.ImageType),
            )
            continue
        shared = ds.SharedFunctionalGroupsSequence[0]
        for number, (groups, stored) in enumerate(
            zip(ds.PerFrameFunctionalGroupsSequence, ds.pixel_array, strict=True), start=1
        ):
            rescale = group_item(groups, shared, "PixelValueTransformationSequence")
            planes[(str(ds.SOPInstanceUID), number)] = SourcePlane(
                np.asarray(group_item(groups, shared, "PlanePositionSequence").ImagePositionPatient, float),
                np.asarray(group_item(groups, shared, "PlaneOrientationSequence").ImageOrientationPatient, float),
                np.asarray(group_item(groups, shared, "PixelMeasuresSequence").PixelSpacing, float),
                stored * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept),
                tuple(group_item(groups, shared, "MRImageFrameTypeSequence").FrameType),
            )
    return planes


def group_item(groups: Dataset, shared: Dataset, keyword: str) -> Dataset:
    """A functional group's item: the frame's own, else the shared one."""
    item: Dataset = (groups if keyword in groups else shared)[keyword][0]
    return item


def stand_in(case: Case) -> LoadedModel:
    """Channel 0 is the scaled threshold, channel 1 the scaled value: argmax is 1 where the value is above it."""
    low, high = case.window
    spec = ModelSpec(
        name="threshold-stand-in",
        version="1",
        task=Task.SEGMENTATION,
        modalities=("CT", "MR"),
        network="conv1x1",
        network_args={},
        weights=Path("none"),
        weights_sha256="",
        labels=(REGION,),
        preprocessing=Preprocessing(case.spacing_mm, low, high, (64, 64, 64)),
    )
    network = torch.nn.Conv3d(1, 2, kernel_size=1)
    assert network.bias is not None
    with torch.no_grad():
        network.weight.copy_(torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1))
        network.bias.copy_(torch.tensor([(case.threshold - low) / (high - low), 0.0]))
    return LoadedModel(spec=spec, module=network.eval(), device=torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    if not all(path.is_file() for case in CASES.values() for path in case.files):
        pytest.skip(f"shared corpus not found under {DICOM}")
    return {name: run_case(case, tmp_path_factory.mktemp(name)) for name, case in CASES.items()}


def run_case(case: Case, folder: Path) -> Run:
    """load_series → stand-in through infer.segment → encode_seg (every slice a frame) → file → strict read."""
    volume = load_series(case.files)
    model = stand_in(case)
    labels = infer.segment(model, volume)
    uids = output_uids(str(volume.datasets[0].SeriesInstanceUID), model.spec.name, model.spec.version)
    seg = encode_seg(volume, labels, model.spec, uids, software_version="pacsai test", omit_empty_frames=False)
    path = folder / "seg.dcm"
    path.write_bytes(to_bytes(seg))
    return Run(case=case, seg=read_strict(path.read_bytes()), path=path, sources=source_planes(case.files))


def referenced_plane(groups: Dataset) -> tuple[str, int]:
    """The one source plane a SEG frame names in its Derivation Image Sequence."""
    (derivation,) = groups.DerivationImageSequence
    (source,) = derivation.SourceImageSequence
    return str(source.ReferencedSOPInstanceUID), int(source.get("ReferencedFrameNumber", 0) or 0)


@pytest.mark.catalogue("W8")  # a viewer overlays a SEG frame where its plane position and reference say
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_seg_frame_sits_on_the_source_frame_it_references(runs: dict[str, Run], name: str) -> None:
    """Position, orientation and pixel spacing of each SEG frame equal its source's; one frame per source slice."""
    run = runs[name]
    shared = run.seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float)
    referenced = []
    for groups in run.seg.PerFrameFunctionalGroupsSequence:
        key = referenced_plane(groups)
        source = run.sources[key]
        assert np.allclose(
            np.asarray(groups.PlanePositionSequence[0].ImagePositionPatient, float), source.position, rtol=0, atol=1e-4
        )
        assert np.allclose(orientation, source.orientation, rtol=0, atol=1e-6)
        assert np.allclose(spacing, source.pixel_spacing, rtol=0, atol=1e-6)
        referenced.append(key)
    assert len(referenced) == len(set(referenced)) == run.case.slices
    assert run.seg.FrameOfReferenceUID == dcmread(run.case.files[0], stop_before_pixels=True).FrameOfReferenceUID


def test_the_tilted_series_keeps_its_own_frames(runs: dict[str, Run]) -> None:
    """The GE SEG names each of the 14 source images once: its frames are the tilted source planes, not new ones."""
    run = runs["ge-tilted-ct"]
    referenced = {referenced_plane(groups) for groups in run.seg.PerFrameFunctionalGroupsSequence}
    assert referenced == set(run.sources)
    tilt = next(iter(run.sources.values())).orientation[3:]
    assert abs(float(np.degrees(np.arcsin(-tilt[2])))) == pytest.approx(18.5, abs=0.01)


def test_the_enhanced_seg_references_the_magnitude_stack_only(runs: dict[str, Run]) -> None:
    """The field map's 32 phase frames share the magnitude frames' positions; the SEG names only magnitude frames."""
    run = runs["enhanced-mr"]
    referenced = [referenced_plane(groups) for groups in run.seg.PerFrameFunctionalGroupsSequence]
    assert {run.sources[key].frame_type[-1] for key in referenced} == {"M"}
    assert sorted(number for _, number in referenced) == list(range(1, 33))


@pytest.mark.catalogue("W8")  # a viewer overlays a SEG frame where its plane position and reference say
@pytest.mark.parametrize("name", sorted(CASES))
def test_seg_pixels_agree_with_thresholding_the_source_frames(runs: dict[str, Run], name: str) -> None:
    """Resampled to the model grid and back, the labels still match the source's own values (≥ 95 % of pixels)."""
    run = runs[name]
    threshold = run.case.threshold
    frames = run.seg.pixel_array.reshape(-1, run.seg.Rows, run.seg.Columns).astype(bool)
    agreement = [
        np.mean(frame == (run.sources[referenced_plane(groups)].values > threshold))
        for frame, groups in zip(frames, run.seg.PerFrameFunctionalGroupsSequence, strict=True)
    ]
    assert float(np.mean(agreement)) > 0.97 and min(agreement) > 0.95, agreement
    assert 0.2 < float(np.mean(frames)) < 0.8  # a real region, neither empty nor everything


@pytest.mark.parametrize("name", sorted(CASES))
def test_seg_passes_dciodvfy_and_reads_back_in_highdicom(runs: dict[str, Run], name: str) -> None:
    run = runs[name]
    need("dciodvfy")
    assert dciodvfy_errors(run.path) == []
    seg = hd.seg.segread(run.path)
    assert seg.SegmentationType == "BINARY" and seg.number_of_segments == 1
    if run.case.multiframe:  # highdicom finds each frame's pixels by the source frame number
        (uid,) = {uid for uid, _ in run.sources}
        pixels = seg.get_pixels_by_source_frame(uid, source_frame_numbers=list(range(1, 33)))
        assert pixels.shape == (32, run.seg.Rows, run.seg.Columns, 1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_model_grid_holds_the_source_value_at_each_patient_position(runs: dict[str, Run], name: str) -> None:
    """The network sees, at each of its voxels, the source value found at that point in patient space.

    Grid voxels within 0.3 mm of a source plane are compared with that plane's nearest pixel, located from the
    source's own position and orientation. Ignoring the GE tilt (slices stacked along the normal) scores 0.84.
    """
    run = runs[name]
    case = run.case
    volume = load_series(case.files)
    grid = preprocess(to_ras_image(volume.array, volume.affine), stand_in(case).spec.preprocessing)
    values = grid.as_tensor()[0].numpy()
    index = np.stack([np.random.default_rng(0).integers(0, n, 20000) for n in values.shape], axis=1)
    world = (RAS_TO_LPS @ grid.affine.numpy() @ np.c_[index, np.ones(len(index))].T).T[:, :3]
    planes = [plane for plane in run.sources.values() if not case.multiframe or plane.frame_type[-1] == "M"]
    normal = np.cross(planes[0].orientation[:3], planes[0].orientation[3:])
    distance = (world[:, None, :] - np.stack([p.position for p in planes])[None]) @ normal
    nearest = np.argmin(np.abs(distance), axis=1)
    got, expected = [], []
    for point, k, value in zip(world, nearest, values[tuple(index.T)], strict=True):
        plane = planes[int(k)]
        offset = point - plane.position
        row = round(float(offset @ plane.orientation[3:]) / plane.pixel_spacing[0])
        column = round(float(offset @ plane.orientation[:3]) / plane.pixel_spacing[1])
        inside = 0 <= row < plane.values.shape[0] and 0 <= column < plane.values.shape[1]
        if inside and abs(float(offset @ normal)) < 0.3:
            got.append(value)
            expected.append(np.clip((plane.values[row, column] - case.window[0]) / np.ptp(case.window), 0, 1))
    assert len(got) > 500
    assert float(np.corrcoef(got, expected)[0, 1]) > 0.98
    assert float(np.median(np.abs(np.subtract(got, expected)))) < 0.01


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_pipeline_gives_valid_seg_and_sr_with_the_source_slab_volume(
    runs: dict[str, Run], name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """process_series: SEG + SR, both dciodvfy-clean; the SR's volume is the SEG's voxel count times pixel area
    times the spacing between source planes along their normal (4.0 mm for GE's 4.22 mm table steps). Asked for SC
    overlays, an enhanced multi-frame source gets none, and the log says so."""
    need("dciodvfy")
    case = runs[name].case
    with caplog.at_level("WARNING", logger="worker.pipeline"):
        results = process_series(list(case.files), stand_in(case), overlays=case.multiframe)
    assert sorted(str(ds.Modality) for ds in results) == ["SEG", "SR"]
    paths = {}
    for ds in results:
        paths[str(ds.Modality)] = tmp_path / f"{str(ds.Modality).lower()}.dcm"
        paths[str(ds.Modality)].write_bytes(to_bytes(ds))
        assert dciodvfy_errors(paths[str(ds.Modality)]) == []
    planes = [p for p in runs[name].sources.values() if not case.multiframe or p.frame_type[-1] == "M"]
    normal = np.cross(planes[0].orientation[:3], planes[0].orientation[3:])
    slab_mm = float(np.mean(np.diff(sorted(float(p.position @ normal) for p in planes))))
    voxel_ml = float(np.prod(planes[0].pixel_spacing)) * slab_mm / 1000.0
    seg = dcmread(paths["SEG"])
    (volume_ml,) = sr_volumes(dcmread(paths["SR"])).values()
    assert volume_ml == pytest.approx(int(seg.pixel_array.astype(bool).sum()) * voxel_ml, rel=1e-3)
    assert ("drawing the frames of an enhanced multi-frame source is not supported" in caplog.text) == case.multiframe
