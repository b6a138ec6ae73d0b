"""load_series on the real TotalSegmentator CT series and on broken copies of it made with pydicom."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from worker.load import SeriesNotLoadable, load_series

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
    _edit(localizer, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
          SOPInstanceUID=pydicom.uid.generate_uid())
    _edit(other, SeriesInstanceUID=pydicom.uid.generate_uid(), SOPInstanceUID=pydicom.uid.generate_uid())
    (tmp_path / "notes.txt").write_text("not DICOM")
    volume = load_series([localizer, other, tmp_path / "notes.txt", *ct_copy])
    assert volume.array.shape == (20, 512, 512)
