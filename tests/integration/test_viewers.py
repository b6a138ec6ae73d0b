"""Viewer compatibility (issue 12 item 4): the SEG and SR the pipeline makes, read by dcmjs as OHIF loads them and by
dcmqi as 3D Slicer does, with no warning, and dciodvfy-clean.

ct-organs-tiny on the abdominal CT of the corpus; cxr-pneumonia on a PneumoniaMNIST test image made into a pediatric CR
(its domain: ages 1-5; no corpus radiograph is one, and every one is refused) and on a corpus radiograph it refuses,
whose "not evaluated" SR viewers must read too. Needs Debian's node with `npm ci` run in tests/js, and pip's dcmqi.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian

from models.preprocess import classification_spec
from models.registry import LoadedModel, load_model, load_spec
from tests.checks import dciodvfy_errors, sr_volumes, to_bytes
from tests.conftest import need
from tests.viewers import check_seg_in_viewers, check_sr_in_viewers
from worker import screen
from worker.encode_not_evaluated import encode_not_evaluated_sr
from worker.load_image import display_grey, prepare_image
from worker.pipeline import process_series
from worker.uids import derive_uid, output_uids

pytestmark = pytest.mark.integration

PNEUMONIAMNIST = Path("train-data") / "pneumoniamnist" / "pneumoniamnist_balanced_aksufatih.npz"
PROBABILITY = "Probability"


def written(datasets: list[Dataset], folder: Path) -> dict[str, Path]:
    """The results as files, by SOP class role: SEG, SR, SC."""
    folder.mkdir(parents=True, exist_ok=True)
    roles = {"SEG": "SEG", "SR": "SR"}
    files = {}
    for ds in datasets:
        role = roles.get(str(ds.Modality), "SC")
        files[role] = folder / f"{role.lower()}.dcm"
        files[role].write_bytes(to_bytes(ds))
    return files


def pediatric_cr(image: np.ndarray, path: Path) -> Path:
    """A 28×28 PneumoniaMNIST image as a 3-year-old's AP chest CR: 280×280 pixels of 0.5 mm (a 14 cm field)."""
    big = np.asarray(Image.fromarray(image).resize((280, 280), Image.Resampling.BICUBIC), dtype=np.uint8)
    root = derive_uid("pacsai-test", "pneumoniamnist", "test", "0")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, derive_uid(root, "instance")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = derive_uid(root, "study"), derive_uid(root, "series")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = (
        "TEST^PMNIST",
        "PMNIST0",
        "",
        "O",
        "003Y",
    )
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = (
        "20260101",
        "1200",
        "1",
        "",
        "",
    )
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.Manufacturer = "CR", "CHEST", "AP", ""
    ds.SeriesNumber, ds.InstanceNumber, ds.ImagerPixelSpacing, ds.PixelSpacing = 1, 1, [0.5, 0.5], [0.5, 0.5]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *big.shape, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = big.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def ct(ct_series: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict[str, Path]]:
    sources = sorted(p for p in ct_series.iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md"))
    datasets = process_series(sources, load_model(load_spec("ct-organs-tiny"), "cpu"))
    return sources, written(datasets, tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def cxr(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict[str, Path]]:
    folder = tmp_path_factory.mktemp("cxr")
    source = pediatric_cr(np.load(shared / PNEUMONIAMNIST)["test_images"][0], folder / "source.dcm")
    datasets = process_series([source], load_model(load_spec("cxr-pneumonia"), "cpu"))
    return [source], written(datasets, folder)


@pytest.fixture(scope="module", params=["domain", "ood"])
def refused(
    request: pytest.FixtureRequest, shared: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[Path], dict[str, Path]]:
    """Refused by its headers (an adult's radiograph), or by the OOD check (a CT slice's pixels in a child's CR)."""
    folder = tmp_path_factory.mktemp(f"refused-{request.param}")
    source = shared / "dicom" / "pydicom-data" / "RG1_UNCR.dcm"
    if request.param == "ood":
        source = pediatric_cr(
            display_grey(dcmread(shared / "dicom" / "pydicom-data" / "693_UNCR.dcm")), folder / "ct.dcm"
        )
    report = refusal_report(source, load_model(load_spec("cxr-pneumonia"), "cpu"))
    assert ("OOD score" in str(report.ContentSequence)) == (request.param == "ood")
    return [source], written([report], folder)


def refusal_report(source: Path, model: LoadedModel) -> Dataset:
    """The "not evaluated" SR as the worker makes it: its domain check on the header, then the OOD check on the
    network's input; built here from worker.screen and the encoder, so this test does not wait on the pipeline."""
    ds = dcmread(source)
    refusal = screen.check_headers(model, [ds])
    if refusal is None:
        image = prepare_image(ds, classification_spec(model.spec).preprocessing)
        refusal, _ = screen.check_ood(model, grey=image.network_grey)
    assert refusal is not None, "the model accepted the image"
    uids = output_uids(str(ds.SeriesInstanceUID), model.spec.name, model.spec.version, 1)
    return encode_not_evaluated_sr([ds], refusal.reason, refusal.ood, model.spec, uids, software_version="pacsai test")


def uids_of(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_ct_seg_frames_map_to_source_images_in_dcmjs_and_dcmqi(
    ct: tuple[list[Path], dict[str, Path]], tmp_path: Path
) -> None:
    """Every SEG frame lands on its CT slice in dcmjs; dcmqi reads it; both count the SEG's voxels per segment."""
    sources, files = ct
    counts = check_seg_in_viewers(files["SEG"], sources, tmp_path)
    assert len(counts) >= 2, "liver and spleen are in this series"


def test_ct_sr_groups_and_values_in_dcmjs_and_dcmqi(ct: tuple[list[Path], dict[str, Path]], tmp_path: Path) -> None:
    """The Image Library lists the 20 slices; one group per model label, the volumes those of the SR as written, and
    the group of the OOD check (score, threshold)."""
    sources, files = ct
    measurements = check_sr_in_viewers(files["SR"], uids_of(sources), tmp_path)
    labels = [label for label in load_spec("ct-organs-tiny").labels if label.number > 0]
    assert sorted(m["trackingId"] for m in measurements) == sorted([*(label.name for label in labels), "OOD check"])
    volumes = {m["trackingId"]: m["values"][0] for m in measurements if m["trackingId"] != "OOD check"}
    assert all(v["name"] == "Volume" and v["units"] == "ml" for v in volumes.values())
    written_volumes = sorted(sr_volumes(dcmread(files["SR"])).values())
    assert sorted(v["value"] for v in volumes.values() if v["value"] > 0) == pytest.approx(written_volumes)


def test_cxr_classification_sr_in_dcmjs_and_dcmqi(cxr: tuple[list[Path], dict[str, Path]], tmp_path: Path) -> None:
    """An accepted radiograph: one group with the probability and the threshold, the source image in the library."""
    sources, files = cxr
    assert sorted(files) == ["SC", "SR"]
    (measurement,) = check_sr_in_viewers(files["SR"], uids_of(sources), tmp_path)
    values = {v["name"]: v["value"] for v in measurement["values"]}
    assert 0.0 <= values[PROBABILITY] <= 1.0
    classification = load_spec("cxr-pneumonia").classification
    assert classification is not None and values["Threshold Value"] == pytest.approx(classification.threshold)


def test_not_evaluated_sr_in_dcmjs_and_dcmqi(refused: tuple[list[Path], dict[str, Path]], tmp_path: Path) -> None:
    """A refused radiograph's report: one group, no probability (the OOD score when that refused it), the source
    image in the library."""
    sources, files = refused
    (measurement,) = check_sr_in_viewers(files["SR"], uids_of(sources), tmp_path)
    assert PROBABILITY not in {v["name"] for v in measurement["values"]}
    assert {v["name"] for v in measurement["values"]} <= {"OOD score", "OOD score threshold"}


def test_results_have_no_dciodvfy_errors(
    ct: tuple[list[Path], dict[str, Path]],
    cxr: tuple[list[Path], dict[str, Path]],
    refused: tuple[list[Path], dict[str, Path]],
) -> None:
    need("dciodvfy")
    for _, files in (ct, cxr, refused):
        for role, path in files.items():
            assert dciodvfy_errors(path) == [], f"{role} {path.parent.name}"
