"""Classification path on real radiographs: spec, loader (VOI, MONOCHROME1), classify, SR and SC read back."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from models.preprocess import probabilities
from models.registry import LoadedModel, load_model, load_spec
from models.spec import ModelSpec, ProjectionPreprocessing, SpecError, Task
from pacsai.errors import StudyRejected
from tests.checks import dciodvfy_errors, read_strict, to_bytes
from tests.conftest import need
from worker.classify import Classification, classify
from worker.encode_sc import BANNER, MAX_SIDE_PX, blend, caption_for, encode_heatmap_sc, heatmap_uids
from worker.encode_sr import encode_classification_sr
from worker.load_image import ImageNotLoadable, ProjectionImage, display_grey, load_image, prepare_image
from worker.uids import output_uids

SOFTWARE_VERSION = "pacsai 0.1.0"
RG1 = Path("dicom/pydicom-data/RG1_UNCR.dcm")  # chest PA, MONOCHROME1, window 15000/30000, 1955 x 1841
RG1_J2K = Path("dicom/pydicom-data/RG1_J2KI.dcm")  # the same image, lossy JPEG 2000
MONO1 = Path("dicom/orthanc-tests/Issue44/Monochrome1-Jpeg.dcm")  # chest PA, MONOCHROME1, JPEG, 2446 x 2010
DOG = Path("dicom/highdicom/dx_image.dcm")  # DX for presentation, a dog's thorax, 169 x 211
TINY = Path("dicom/pydicom/test_files/dicomdirtests/77654033/CR1/6154")  # CR, 16 x 16
NO_PIXELS = Path("dicom/orthanc-tests/Issue56-NoPixelData.dcm")
COLOUR = Path("dicom/pydicom/test_files/SC_rgb_dcmtk_+eb+cr.dcm")
MULTI_FRAME = Path("dicom/cornerstone3D-testImages/CT0012.fragmented_no_bot_jpeg_baseline.51.dcm")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(load_spec("cxr-pneumonia"), "cpu")


@pytest.fixture(scope="module")
def pre(model: LoadedModel) -> ProjectionPreprocessing:
    assert model.spec.classification is not None
    return model.spec.classification.preprocessing


@pytest.fixture(scope="module")
def rg1(shared: Path) -> Dataset:
    return pydicom.dcmread(shared / RG1)


@pytest.fixture(scope="module")
def rg1_image(rg1: Dataset, pre: ProjectionPreprocessing) -> ProjectionImage:
    return prepare_image(rg1, pre)


@pytest.fixture(scope="module")
def result(model: LoadedModel, rg1_image: ProjectionImage) -> Classification:
    return classify(model, rg1_image)


@pytest.fixture(scope="module")
def uids(rg1: Dataset, model: LoadedModel) -> dict[str, str]:
    base = (str(rg1.SeriesInstanceUID), model.spec.name, model.spec.version)
    return output_uids(*base) | heatmap_uids(*base)


@pytest.fixture(scope="module")
def sr_bytes(rg1_image: ProjectionImage, result: Classification, model: LoadedModel, uids: dict[str, str]) -> bytes:
    return to_bytes(
        encode_classification_sr(rg1_image.header, result, model.spec, uids, software_version=SOFTWARE_VERSION)
    )


@pytest.fixture(scope="module")
def sc_bytes(rg1: Dataset, result: Classification, model: LoadedModel, uids: dict[str, str]) -> bytes:
    return to_bytes(
        encode_heatmap_sc(
            rg1, result.heatmap, model.spec, uids, software_version=SOFTWARE_VERSION, caption=caption_for(result)
        )
    )


def test_shipped_spec_is_a_classifier(model: LoadedModel) -> None:
    spec = model.spec
    assert (spec.task, spec.modalities, spec.labels) == (Task.CLASSIFICATION, ("CR", "DX"), ())
    assert spec.classification is not None
    assert (spec.classification.finding.value, spec.classification.finding.scheme) == ("233604007", "SCT")
    assert 0.0 < spec.classification.threshold < 1.0
    assert spec.classification.preprocessing.input_size == (28, 28)
    assert spec.weights.stat().st_size <= 10 * 2**20
    assert not model.module.training


def _classifier_yaml(folder: Path, **changes: object) -> None:
    raw = yaml.safe_load((Path(load_spec("cxr-pneumonia").weights).parent / "spec.yaml").read_text(encoding="utf-8"))
    raw.update(changes)
    folder.mkdir()
    (folder / "spec.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"classification": None}, "classification"),
        (
            {"classification": {"finding": {"value": "1", "meaning": "x"}, "threshold": 1.5, "cam_layer": "layer4"}},
            "threshold",
        ),
        ({"preprocessing": {"input_size": [28]}}, "input_size"),
        ({"preprocessing": {"input_size": [28, 28], "resample": "lanczos"}}, "lanczos"),
    ],
)
def test_broken_classification_spec_names_the_field(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    _classifier_yaml(tmp_path / "broken", **changes)
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_folder(tmp_path / "broken")


def test_rg1_is_prepared_like_medmnist(rg1_image: ProjectionImage, rg1: Dataset) -> None:
    """Whole image on the source grid; the centred 1841-pixel square shrunk to 28 x 28 uint8."""
    assert rg1_image.grey.shape == (1955, 1841) and rg1_image.grey.dtype == np.uint8
    assert rg1_image.square == ((1955 - 1841) // 2, 0, 1841)
    assert rg1_image.network_grey.shape == (28, 28) and rg1_image.network_grey.dtype == np.uint8
    assert int(rg1_image.network_grey.max()) - int(rg1_image.network_grey.min()) > 100
    assert "PixelData" not in rg1_image.header and "PixelData" in rg1  # the source dataset is left whole
    assert rg1_image.header.SOPInstanceUID == rg1.SOPInstanceUID


def test_linear_window_matches_pydicom(rg1: Dataset) -> None:
    """Our window (then MONOCHROME1 inversion) equals pydicom's VOI output scaled from its 0..2^BitsStored-1 range."""
    voi = apply_voi_lut(apply_modality_lut(rg1.pixel_array, rg1), rg1)
    expected = 255.0 - np.rint(voi / (2 ** int(rg1.BitsStored) - 1) * 255.0)
    assert np.abs(display_grey(rg1).astype(np.float64) - expected).max() <= 1.0


def _ramp(**attributes: object) -> Dataset:
    """A 32 x 32 MONOCHROME2 image, 12 bits stored, pixel k (raster order) holding the value k (0..1023)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(1024, dtype=np.uint16).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _voi_lut(descriptor: list[int], data: list[int]) -> list[Dataset]:
    item = Dataset()
    item.LUTDescriptor, item.LUTData = descriptor, data
    return [item]


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({}, {0: 0, 512: 128, 1023: 255}),  # no VOI: the values' own min..max
        ({"PhotometricInterpretation": "MONOCHROME1"}, {0: 255, 1023: 0}),
        ({"WindowCenter": 512, "WindowWidth": 256}, {383: 0, 384: 0, 512: 128, 639: 255, 1023: 255}),
        (
            {"WindowCenter": [512, 100], "WindowWidth": [256, 50], "VOILUTFunction": "LINEAR_EXACT"},
            {384: 0, 512: 128, 640: 255},
        ),  # the first of several windows
        ({"WindowCenter": 512, "WindowWidth": 256, "VOILUTFunction": "SIGMOID"}, {0: 0, 512: 128, 1023: 255}),
        (
            {"RescaleSlope": 2, "RescaleIntercept": -1000, "WindowCenter": 24, "WindowWidth": 512},
            {384: 0, 512: 128, 640: 255},
        ),  # the window is in modality units
        (
            {"VOILUTSequence": _voi_lut([256, 0, 8], list(range(255, -1, -1))), "WindowCenter": 1, "WindowWidth": 1},
            {0: 255, 100: 155, 255: 0, 300: 0},
        ),  # a LUT wins over a window; values past its end take its last entry
    ],
)
def test_voi_on_synthetic_images(attributes: dict[str, object], expected: dict[int, int]) -> None:
    grey = display_grey(_ramp(**attributes)).ravel()
    assert {value: int(grey[value]) for value in expected} == expected


def test_lossy_copy_prepares_to_nearly_the_same_input(
    shared: Path, rg1_image: ProjectionImage, pre: ProjectionPreprocessing
) -> None:
    j2k = load_image(shared / RG1_J2K, pre)
    difference = np.abs(j2k.network_grey.astype(int) - rg1_image.network_grey.astype(int))
    assert difference.max() <= 2


def test_monochrome1_is_inverted(shared: Path) -> None:
    """MONOCHROME1 shows high values dark: the lungs come out darker than the mediastinum, and the same pixels
    labelled MONOCHROME2 come out as the exact complement."""
    ds = pydicom.dcmread(shared / MONO1)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    grey = display_grey(ds).astype(int)
    rows, columns = grey.shape
    band = slice(rows * 3 // 10, rows * 6 // 10)
    lungs = np.r_[
        grey[band, columns * 25 // 100 : columns * 35 // 100].ravel(),
        grey[band, columns * 65 // 100 : columns * 75 // 100].ravel(),
    ]
    mediastinum = grey[band, columns * 47 // 100 : columns * 53 // 100]
    assert mediastinum.mean() > lungs.mean() + 40
    ds.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_array_equal(display_grey(ds).astype(int), 255 - grey)


@pytest.mark.parametrize("relative", [DOG, TINY])
def test_odd_radiographs_still_load(shared: Path, relative: Path, pre: ProjectionPreprocessing) -> None:
    """A dog's DX (wider than high) and a 16 x 16 CR: the square is centred and upsampled when small."""
    image = load_image(shared / relative, pre)
    rows, columns = image.grey.shape
    top, left, side = image.square
    assert side == min(rows, columns) and top == (rows - side) // 2 and left == (columns - side) // 2
    assert image.network_grey.shape == (28, 28)


def test_not_loadable_images_are_rejected(shared: Path, tmp_path: Path, pre: ProjectionPreprocessing) -> None:
    for relative, reason in ((NO_PIXELS, "no pixel data"), (COLOUR, "not greyscale"), (MULTI_FRAME, "frames")):
        with pytest.raises(ImageNotLoadable, match=reason):
            load_image(shared / relative, pre)
    for_processing = pydicom.dcmread(shared / DOG)
    for_processing.PresentationIntentType = "FOR PROCESSING"
    with pytest.raises(ImageNotLoadable, match="FOR PROCESSING"):
        prepare_image(for_processing, pre)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(StudyRejected, match="not readable DICOM"):
        load_image(tmp_path / "junk.dcm", pre)


def test_classification_has_a_heatmap_on_the_source_grid(
    result: Classification, rg1_image: ProjectionImage, model: LoadedModel
) -> None:
    assert model.spec.classification is not None
    assert 0.0 <= result.probability <= 1.0
    assert result.threshold == model.spec.classification.threshold
    assert result.present == (result.probability >= result.threshold)
    assert result.finding == model.spec.classification.finding
    heatmap = result.heatmap
    assert heatmap.shape == (1955, 1841) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    top, _, side = rg1_image.square
    assert not heatmap[:top].any() and not heatmap[top + side :].any()  # outside the square the model saw
    assert heatmap[top : top + side].max() > 0.5


def test_classify_agrees_with_the_batch_path(
    result: Classification, rg1_image: ProjectionImage, model: LoadedModel
) -> None:
    """The evaluation scores through probabilities(); one image through classify() gets the same number."""
    batch = probabilities(model, rg1_image.network_grey[None])
    assert result.probability == pytest.approx(float(batch[0]), abs=1e-6)


def test_sr_reports_finding_probability_and_threshold(
    sr_bytes: bytes, result: Classification, rg1: Dataset, uids: dict[str, str]
) -> None:
    ds = read_strict(sr_bytes)
    assert (ds.SOPClassUID, ds.Modality) == (Comprehensive3DSRStorage, "SR")
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (uids["sr_series"], uids["sr_instance"])
    assert ds.SeriesDescription == "AI cxr-pneumonia 0.1.0 SR - not for diagnosis"
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName"):
        assert ds.get(keyword) == rg1.get(keyword), keyword
    report = hd.sr.srread(BytesIO(sr_bytes)).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_image_measurement_groups()
    assert group.finding_type is not None and group.finding_type.value == "233604007"
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name.value == "233604007"
    present = "52101004" if result.present else "272519000"  # SCT Present / Absent
    assert evaluation.value.value == present  # type: ignore[union-attr]
    values: dict[str, object] = {m.name.value: (m.value, m.unit.value) for m in group.get_measurements()}
    assert values == {
        "122157": (pytest.approx(result.probability, abs=1e-9), "1"),
        "122411": (pytest.approx(result.threshold, abs=1e-9), "1"),
    }
    (source,) = group.source_images
    assert source.referenced_sop_instance_uid == rg1.SOPInstanceUID


def test_sc_is_an_rgb_picture_in_a_new_series_of_the_study(sc_bytes: bytes, rg1: Dataset, uids: dict[str, str]) -> None:
    ds = read_strict(sc_bytes)
    assert (ds.SOPClassUID, ds.Modality) == (SecondaryCaptureImageStorage, "OT")
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (uids["sc_series"], uids["sc_instance"])
    assert ds.SeriesInstanceUID != rg1.SeriesInstanceUID
    assert ds.SeriesDescription == "AI cxr-pneumonia 0.1.0 heat-map - not for diagnosis"
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
    assert ds.BurnedInAnnotation == "YES"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == rg1.SOPInstanceUID
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientOrientation"):
        assert ds.get(keyword) == rg1.get(keyword), keyword
    pixels = ds.pixel_array
    assert pixels.shape[2] == 3 and max(pixels.shape[:2]) <= MAX_SIDE_PX + 300  # + banner and legend
    assert tuple(pixels[2, -2]) == (160, 0, 0)  # the banner's red, right of its text
    assert BANNER == "AI result - not for diagnosis"


def test_blend_leaves_grey_where_there_is_no_heat() -> None:
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    heat = np.zeros((16, 16), dtype=np.float32)
    heat[0, 0] = 1.0
    rgb = blend(grey, heat)
    np.testing.assert_array_equal(rgb[1:], np.repeat(grey[1:, :, None], 3, axis=2))
    assert tuple(rgb[0, 0]) == (128, 0, 0)  # half red over black


def test_outputs_are_deterministic(
    rg1_image: ProjectionImage, result: Classification, model: LoadedModel, uids: dict[str, str], sr_bytes: bytes
) -> None:
    again = encode_classification_sr(rg1_image.header, result, model.spec, uids, software_version=SOFTWARE_VERSION)
    assert again.SOPInstanceUID == read_strict(sr_bytes).SOPInstanceUID
    assert uids == output_uids(str(rg1_image.header.SeriesInstanceUID), "cxr-pneumonia", "0.1.0") | heatmap_uids(
        str(rg1_image.header.SeriesInstanceUID), "cxr-pneumonia", "0.1.0"
    )


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["sr", "sc"])
def test_dciodvfy_finds_no_error(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    need("dciodvfy")
    path = tmp_path / f"{kind}.dcm"
    path.write_bytes(request.getfixturevalue(f"{kind}_bytes"))
    assert dciodvfy_errors(path) == []
