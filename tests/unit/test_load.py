"""load_series on real series (TotalSegmentator CT, GE tilted head CT, enhanced MR, a Philips study mix) and on broken
copies made with pydicom."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.pixels.processing import apply_modality_lut

from dicom_node.assemble import Assembler
from dicom_node.receive import header_of
from dicom_node.route import SeriesHeader, explain, load_rules
from pacsai.jobs import SeriesJob, SeriesState
from pacsai.settings import Settings
from pacsai.state import State
from pacsai.storage import Spool
from worker.load_volume import SeriesNotLoadable, load_series, read_source

SHARED = Path(os.environ.get("PACSAI_SHARED_DIR", Path(__file__).resolve().parents[2].parent / "shared"))
CT_DIR = SHARED / "dicom" / "totalsegmentator-ct-abdomen"


@pytest.fixture(scope="module")
def ct_files() -> list[Path]:
    if not CT_DIR.is_dir():
        pytest.skip(f"shared corpus not found at {CT_DIR} (set PACSAI_SHARED_DIR)")
    return sorted(CT_DIR.iterdir())


@pytest.fixture
def ct_copy(ct_files: list[Path], tmp_path: Path) -> list[Path]:
    """A writable copy of the series, for edits."""
    return [Path(shutil.copy(path, tmp_path / path.name)) for path in ct_files]


def test_real_series_loads_sorted_with_measured_step(ct_files: list[Path]) -> None:
    volume = load_series(ct_files)
    assert volume.array.shape == (20, 512, 512)
    assert volume.array.dtype == np.float32
    orientation = np.asarray(volume.datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.asarray([ds.ImagePositionPatient for ds in volume.datasets], dtype=float)
    assert np.all(np.diff(positions @ normal) > 0)
    assert np.allclose(np.diff(positions, axis=0), volume.affine[:3, 0])
    assert np.allclose(volume.affine[:3, 3], positions[0])
    assert volume.spacing_mm == pytest.approx((2.0, 0.9765625, 0.9765625))  # step 2 mm, thickness is 3 mm
    assert all("PixelData" not in ds for ds in volume.datasets)


def test_real_series_holds_plausible_hounsfield_units(ct_files: list[Path]) -> None:
    hu = load_series(ct_files).array
    assert hu.min() >= -1100 and hu.max() <= 3100
    assert np.mean(hu < -900) > 0.2  # air around the body
    assert np.mean((hu > -100) & (hu < 150)) > 0.2  # soft tissue
    centre = hu[:, 200:312, 200:312]
    assert -100 < float(np.median(centre)) < 200


def test_file_order_does_not_matter(ct_files: list[Path]) -> None:
    shuffled = list(ct_files)
    random.Random(7).shuffle(shuffled)
    assert shuffled != ct_files
    first, second = load_series(ct_files), load_series(shuffled)
    assert np.array_equal(first.array, second.array)
    assert np.array_equal(first.affine, second.affine)
    assert [ds.SOPInstanceUID for ds in first.datasets] == [ds.SOPInstanceUID for ds in second.datasets]


def _edit(path: Path, **values: object) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return ds


def _refusal(paths: list[Path]) -> str:
    with pytest.raises(SeriesNotLoadable) as caught:
        load_series(paths)
    message = str(caught.value)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    for value in (ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPInstanceUID, str(ds.PatientName), paths[0].name):
        assert not value or str(value) not in message
    return message


def test_mixed_orientation_is_refused(ct_copy: list[Path]) -> None:
    _edit(ct_copy[5], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    assert "mixed orientations" in _refusal(ct_copy)


def test_single_slice_is_refused(ct_copy: list[Path]) -> None:
    assert "at least 2" in _refusal(ct_copy[:1])


def test_duplicate_position_is_refused(ct_copy: list[Path], tmp_path: Path) -> None:
    twin = tmp_path / "twin.dcm"
    shutil.copy(ct_copy[3], twin)
    _edit(twin, SOPInstanceUID=pydicom.uid.generate_uid())
    assert "duplicate positions" in _refusal([*ct_copy, twin])


def test_gap_in_slices_is_refused_as_uneven_spacing(ct_copy: list[Path]) -> None:
    message = _refusal(ct_copy[:7] + ct_copy[8:])
    assert "uneven slice spacing" in message and "tolerance" in message


def test_localizer_and_other_series_are_skipped(ct_copy: list[Path], tmp_path: Path) -> None:
    localizer, other = tmp_path / "localizer.dcm", tmp_path / "other.dcm"
    shutil.copy(ct_copy[0], localizer)
    shutil.copy(ct_copy[0], other)
    _edit(
        localizer,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
        SOPInstanceUID=pydicom.uid.generate_uid(),
    )
    _edit(other, SeriesInstanceUID=pydicom.uid.generate_uid(), SOPInstanceUID=pydicom.uid.generate_uid())
    (tmp_path / "notes.txt").write_text("not DICOM")
    volume = load_series([localizer, other, tmp_path / "notes.txt", *ct_copy])
    assert volume.array.shape == (20, 512, 512)


# --- signed pixels, MONOCHROME1, secondary derived images ------------------------------------------------------------


def test_monochrome1_changes_display_not_values(ct_copy: list[Path]) -> None:
    """MONOCHROME1 inverts how grey is shown; modality values (HU) stay what the rescale gives."""
    before = load_series(ct_copy).array
    for path in ct_copy:
        _edit(path, PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(load_series(ct_copy).array, before)


def test_secondary_derived_images_are_skipped_and_primary_derived_kept(ct_copy: list[Path]) -> None:
    """DERIVED\\SECONDARY (reformats, projections, captures) is no volume; DERIVED\\PRIMARY (e.g. lossy) is."""
    for path in ct_copy:
        _edit(path, ImageType=["DERIVED", "PRIMARY", "AXIAL"])
    assert load_series(ct_copy).array.shape == (20, 512, 512)
    for path in ct_copy:
        _edit(path, ImageType=["DERIVED", "SECONDARY", "REFORMATTED"])
    assert "20 secondary derived image (reformat, projection or capture)" in _refusal(ct_copy)


# --- gantry tilt and uneven spacing (GE HiSpeed head CT, +18.5°) -----------------------------------------------------

GE_TILT = SHARED / "dicom" / "dcm_qa_ct" / "GE_head_tilt"


@pytest.fixture(scope="module")
def ge_files() -> list[Path]:
    if not GE_TILT.is_dir():
        pytest.skip(f"shared corpus not found at {GE_TILT}")
    return sorted(GE_TILT.glob("*.dcm"))


def test_tilted_series_keeps_its_slices_on_a_sheared_grid(ge_files: list[Path]) -> None:
    """Images 01-14 step 4.22 mm along the table; the image normal is tilted 18.5°, so the grid is sheared."""
    volume = load_series(ge_files[:14])
    headers = [pydicom.dcmread(path) for path in ge_files[:14]]
    positions = np.asarray([ds.ImagePositionPatient for ds in headers], dtype=float)
    assert volume.sheared
    assert np.allclose(volume.affine[:3, 0], [0.0, 0.0, 4.22], atol=1e-6)  # the table step, not the normal
    assert np.allclose(volume.affine[:3, 3], positions[0])
    normal = np.cross(volume.affine[:3, 2], volume.affine[:3, 1])
    normal /= np.linalg.norm(normal)
    assert float(volume.affine[:3, 0] @ normal) == pytest.approx(4.0, abs=0.01)  # 4 mm slices
    source_normal = np.cross(*np.reshape(np.asarray(headers[0].ImageOrientationPatient, dtype=float), (2, 3)))
    slab_mm = float(np.mean(np.diff(positions @ source_normal)))
    assert volume.voxel_volume_ml == pytest.approx(float(np.prod(headers[0].PixelSpacing)) * slab_mm / 1000)
    assert [str(ds.SOPInstanceUID) for ds in volume.datasets] == [str(ds.SOPInstanceUID) for ds in headers]
    # signed 16-bit stored values, rescaled as pydicom does for the file itself
    assert headers[6].PixelRepresentation == 1
    assert np.array_equal(volume.array[6], apply_modality_lut(headers[6].pixel_array, headers[6]))
    assert volume.array.min() < -1000 < 0 < volume.array.max()


def test_whole_tilted_series_is_refused_for_its_uneven_spacing(ge_files: list[Path]) -> None:
    """14 slices 4.22 mm apart, one step of 1.14 mm, 13 of 7.38 mm: the series is refused, naming the steps."""
    message = _refusal(ge_files)
    assert message == ("uneven slice spacing: steps from 1.14 to 7.38 mm, mean 5.63 mm (tolerance 2% of the step)")


def test_results_can_copy_what_the_source_left_out(ge_files: list[Path]) -> None:
    """The GE images have no PatientBirthDate or PatientSex and an empty DeidentificationMethod."""
    source = pydicom.dcmread(ge_files[0], stop_before_pixels=True)
    assert "PatientBirthDate" not in source and source.DeidentificationMethod == ""
    header = load_series(ge_files[:3]).datasets[0]
    assert header.PatientBirthDate == "" and header.PatientSex == ""
    assert header.DeidentificationMethod == "not stated by the source"


# --- enhanced multi-frame ---------------------------------------------------------------------------------------------

ENHANCED = SHARED / "dicom" / "dcm_qa_enh"


def test_enhanced_mr_frames_become_slices_of_the_largest_stack(caplog: pytest.LogCaptureFixture) -> None:
    """Philips field map: 64 frames, magnitude (frames 1-32) and field map (33-64) at the same 32 positions; ties
    go to the first stack. Geometry and rescale come from each frame's functional groups."""
    path = ENHANCED / "Philips" / "IM_0027_fMAP.dcm"
    if not path.is_file():
        pytest.skip(f"shared corpus not found at {path}")
    with caplog.at_level("INFO", logger="worker.load_volume"):
        volume = load_series([path])
    ds = pydicom.dcmread(path)
    groups = ds.PerFrameFunctionalGroupsSequence
    assert volume.array.shape == (32, 64, 64) and len(volume.instances) == 1
    positions = np.asarray([groups[n - 1].PlanePositionSequence[0].ImagePositionPatient for n in volume.frame_numbers])
    assert np.all(np.diff(positions[:, 2]) > 0)  # axial frames, ascending along the normal (+z)
    assert {groups[n - 1].MRImageFrameTypeSequence[0].FrameType[3] for n in volume.frame_numbers} == {"M"}
    assert np.allclose(volume.affine[:3, 3], positions[0]) and np.allclose(volume.affine[:3, 0], [0, 0, 4], atol=1e-3)
    k, number = 5, volume.frame_numbers[5]
    rescale = groups[number - 1].PixelValueTransformationSequence[0]
    expected = ds.pixel_array[number - 1] * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    assert np.allclose(volume.array[k], expected, atol=1e-3)
    assert "not used: 32 frame(s) of another stack" in caplog.text


def test_several_enhanced_instances_of_one_series_give_one_stack() -> None:
    """Siemens XA10: four 6-frame instances, one per time point at the same positions; Instance Number 1 is used,
    whatever the file order."""
    files = sorted((ENHANCED / "Siemens" / "XA10").glob("*.dcm"))
    if len(files) != 4:
        pytest.skip(f"shared corpus not found at {ENHANCED}")
    volume = load_series(files[::-1])
    assert volume.array.shape == (6, 64, 64) and volume.frame_numbers == (1, 2, 3, 4, 5, 6)
    assert str(volume.instances[0].SOPInstanceUID) == str(pydicom.dcmread(files[0]).SOPInstanceUID)


@pytest.mark.parametrize(
    ("relative", "reason"),
    [
        ("pydicom-data/emri_small.dcm", "1 multi-frame image without per-frame functional groups"),
        ("dcm_qa_nih/Siemens_mr_0003", "2 mosaic (several slices tiled in one image)"),
        (
            "cornerstone3D-testImages/no-pixel-data.dcm",
            "1 no pixel data (SR, dose report, presentation state or similar)",
        ),
    ],
)
def test_what_is_no_volume_is_refused_with_the_reason(relative: str, reason: str) -> None:
    path = SHARED / "dicom" / relative
    if not path.exists():
        pytest.skip(f"shared corpus not found at {path}")
    files = sorted(path.glob("*.dcm")) if path.is_dir() else [path]
    assert reason in _refusal(files)


# --- a real study mix: Philips head phantom --------------------------------------------------------------------------

PHILIPS = SHARED / "dicom" / "dcm_qa_ct" / "Philips_head_phantom"


@pytest.fixture(scope="module")
def philips_series() -> dict[str, list[Path]]:
    """S1000: 1 localizer; S2010: 28 axial slices; S4010: 6 "Exam Summary" secondary captures (dose, survey)."""
    if not PHILIPS.is_dir():
        pytest.skip(f"shared corpus not found at {PHILIPS}")
    return {folder.name: sorted(folder.iterdir()) for folder in sorted(PHILIPS.iterdir()) if folder.is_dir()}


def test_study_mix_loads_the_axial_series_and_says_what_it_left(
    philips_series: dict[str, list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    every_file = [path for files in philips_series.values() for path in files]
    with caplog.at_level("INFO", logger="worker.load_volume"):
        volume = load_series(every_file)
    assert volume.array.shape == (28, 512, 512)
    assert {str(ds.SOPInstanceUID) for ds in volume.datasets} == {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in philips_series["S2010"]
    }
    assert "not used: 1 localizer, 6 secondary capture" in caplog.text


def test_study_mix_becomes_one_job_for_the_axial_series(philips_series: dict[str, list[Path]], tmp_path: Path) -> None:
    """The node's assembler with the shipped routes: S2010 becomes a ct-organs-tiny job whose files load as the
    28-slice volume; the localizer (1 instance) and the secondary captures (SOP class) match no rule."""
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": "ORTHANC@127.0.0.1:4242"})
    state, spool = State(str(tmp_path / "state.db")), Spool(settings.storage.spool_dir, b"k", reserve_bytes=0)
    rules = load_rules(settings.node.routes_file)
    queued: list[SeriesJob] = []
    series_keys, headers = {}, {}
    for name, files in philips_series.items():
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            stored = spool.put(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, path.read_bytes())
            state.record_instance(
                stored,
                calling_ae="ORTHANC",
                called_ae="PACSAI",
                header=header_of(ds),
            )
        series_keys[name] = stored.series_key
        headers[name] = SeriesHeader(
            modality=str(ds.Modality),
            sop_class=str(ds.SOPClassUID),
            body_part="",
            series_description=str(ds.get("SeriesDescription", "")),
            instances=len(files),
            calling_ae="ORTHANC",
            called_ae="PACSAI",
        )
    Assembler(settings, state, spool, rules, queued.append, lambda: set()).tick(now=time.time() + 3600)
    assert [(job.model, job.series_key) for job in queued] == [("ct-organs-tiny", series_keys["S2010"])]
    assert state.jobs_for_series(series_keys["S1000"]) == state.jobs_for_series(series_keys["S4010"]) == []
    assert state.counts()["series"] == {SeriesState.COMPLETE.value: 1, SeriesState.NO_MODEL.value: 2}
    assert load_series(spool.read_manifest(queued[0].manifest)).array.shape == (28, 512, 512)
    assert explain(rules, headers["S1000"]).startswith("ct-abdominal-organs: 1 instance(s), the rule needs at least 10")
    assert explain(rules, headers["S4010"]).startswith("ct-abdominal-organs: SOPClassUID is not one the rule takes")


def _texts(ds: pydicom.Dataset) -> list[tuple[str, str]]:
    """Every text value (sequences included) as the str pydicom gives, with its tag."""
    found: list[tuple[str, str]] = []
    for element in ds.iterall():
        if element.VR in ("SH", "LO", "ST", "LT", "UT", "UC", "PN") and element.value is not None:
            found.append((str(element.tag), str(element.value)))
    return found


@pytest.mark.parametrize(
    "name", sorted(path.name for path in (SHARED / "dicom" / "pydicom" / "charset_files").glob("chr*.dcm"))
)
def test_read_source_gives_the_text_a_full_decode_gives_and_declares_utf8(name: str, tmp_path: Path) -> None:
    """C8 fast path: a source whose text is plain ASCII is re-declared without decoding each element; any other one
    (Latin-1, Greek, ISO 2022 with escapes, text in sequences) is decoded. Either way the values read, and the
    values after writing under ISO_IR 192 and reading back, are those of a full decode."""
    path = SHARED / "dicom" / "pydicom" / "charset_files" / name
    expected = pydicom.dcmread(path)
    expected.decode()
    got = read_source(path)
    assert got.SpecificCharacterSet == "ISO_IR 192"
    assert _texts(got) == _texts(expected)
    got.save_as(tmp_path / "out.dcm")
    assert _texts(pydicom.dcmread(tmp_path / "out.dcm")) == _texts(expected)


def test_plain_ascii_text_is_re_declared_without_decoding(ct_files: list[Path]) -> None:
    """The shared CT declares ISO_IR 100 and holds only ASCII text: its elements stay unconverted (raw) after the
    re-declaration, and read back as the same strings."""
    source = pydicom.dcmread(ct_files[0])
    assert source.get("SpecificCharacterSet")
    got = read_source(ct_files[0])
    assert got.SpecificCharacterSet == "ISO_IR 192"
    assert any(isinstance(element, RawDataElement) for element in got.elements())
    expected = pydicom.dcmread(ct_files[0])
    expected.decode()
    assert _texts(got) == _texts(expected)


def test_series_headers_read_one_file_when_all_are_alike(ct_copy: list[Path]) -> None:
    """SeriesHeaders: for single-frame files of one size the first header stands for all (the checks before loading
    then read one file, not every one); a file of another size (or a multi-frame one) makes them read every header.
    Either way the memory estimate and the domain's slice count are those of every header."""
    from worker.pipeline import estimate_from_headers
    from worker.screen import SeriesHeaders

    every = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(ct_copy)]
    alike = SeriesHeaders(ct_copy)
    assert len(alike.for_checks) == len(ct_copy) and all(ds is alike.for_checks[0] for ds in alike.for_checks)
    assert estimate_from_headers(alike.for_checks) == estimate_from_headers(every)
    assert [str(ds.SOPInstanceUID) for ds in alike.all()] == [str(ds.SOPInstanceUID) for ds in every]
    bigger = pydicom.dcmread(ct_copy[3])
    bigger.ImageComments = "x" * 40_000  # the same image in a file 40 kB larger
    bigger.save_as(ct_copy[3])
    mixed = SeriesHeaders(ct_copy)
    assert len({id(ds) for ds in mixed.for_checks}) == len(ct_copy)  # every header read
    assert SeriesHeaders([]).for_checks == []
