"""Step 6 input: DICOM files of one series → Volume (decoded, rescaled, sorted along the slice normal)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from billiard.exceptions import SoftTimeLimitExceeded
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut

from worker.errors import StudyRejected
from worker.volume import Volume

log = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-3  # direction cosines that differ by less are the same orientation (≈0.06°)
SPACING_TOLERANCE = 0.02  # slice steps may differ from their mean by 2% of it (rounding in ImagePositionPatient)
_REQUIRED = ("PixelData", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
             "SeriesInstanceUID")


class SeriesNotLoadable(StudyRejected):
    """The files do not form one volume; `reason` says why and never quotes a UID or patient value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Slice:
    """One candidate image: its header and where it sits along the slice normal."""

    ds: Dataset
    position_mm: NDArray[np.float64]
    along_normal_mm: float


def load_series(paths: Sequence[Path], *, min_slices: int = 2) -> Volume:
    """Read the files, keep the largest series of axial-like images, check its geometry and decode it."""
    images = _candidates(_read_all(paths))
    if not images:
        raise SeriesNotLoadable(f"none of {len(paths)} files is a single-frame image with position and orientation")
    series = _largest_series(images)
    if len(series) < min_slices:
        raise SeriesNotLoadable(f"series has {len(series)} slice(s), at least {min_slices} are needed")
    _check_same(series, "ImageOrientationPatient", "mixed orientations", tolerance=ORIENTATION_TOLERANCE)
    _check_same(series, "PixelSpacing", "mixed pixel spacings", tolerance=1e-4)
    _check_same(series, "Rows", "mixed image sizes")
    _check_same(series, "Columns", "mixed image sizes")
    slices = _sorted_along_normal(series)
    step = _slice_step(slices)
    array = np.stack([_decode(s.ds) for s in slices])
    affine = _affine(slices[0], step)
    for s in slices:
        del s.ds.PixelData
    log.info("loaded series: %d slices of %dx%d, %d files not used", len(slices), array.shape[1], array.shape[2],
             len(paths) - len(slices))
    return Volume(array=array, affine=affine, datasets=tuple(s.ds for s in slices))


def read_source(path: Path) -> Dataset:
    """Read one spooled file with its text re-declared as UTF-8 (see utf8_text)."""
    ds = pydicom.dcmread(path)
    utf8_text(ds)
    return ds


def utf8_text(ds: Dataset) -> None:
    """C8: decode every text value with the declared Specific Character Set, then declare ISO_IR 192 (UTF-8).

    Results copy patient and study attributes from their source, so they are valid whatever the source declared:
    ISO 2022 code extensions, GBK, GB18030, or an unknown or misspelt term, which pydicom decodes with its default
    (ISO-IR 6 / latin-1), replacing bytes that do not decode and warning without the value. Without a declared
    character set (the default repertoire) nothing changes.
    """
    if not ds.get("SpecificCharacterSet"):
        return
    ds.decode()
    ds.SpecificCharacterSet = "ISO_IR 192"


def _read_all(paths: Sequence[Path]) -> list[Dataset]:
    """Parse every file; unreadable ones are counted and skipped (a missing slice then shows as a gap)."""
    datasets: list[Dataset] = []
    unreadable: Counter[str] = Counter()
    for path in paths:
        try:
            datasets.append(read_source(path))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            unreadable[type(exc).__name__] += 1
    if unreadable:
        log.warning("skipped unreadable files: %s", dict(unreadable))
    return datasets


def _candidates(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Single-frame greyscale images with geometry; localizers, SR, SEG, multi-frame and the like are dropped."""
    kept = []
    for ds in datasets:
        if not all(keyword in ds for keyword in _REQUIRED):
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
            continue
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        if "LOCALIZER" in image_type:
            continue
        kept.append(ds)
    return kept


def _largest_series(images: Sequence[Dataset]) -> list[Dataset]:
    """The images of the series with the most of them (ties go to the first series seen)."""
    counts = Counter(str(ds.SeriesInstanceUID) for ds in images)
    if len(counts) > 1:
        log.info("files hold %d image series, using the largest", len(counts))
    chosen = counts.most_common(1)[0][0]
    return [ds for ds in images if str(ds.SeriesInstanceUID) == chosen]


def _check_same(series: Sequence[Dataset], keyword: str, problem: str, *, tolerance: float = 0.0) -> None:
    """Refuse the series unless every image has (nearly) the same value of `keyword`."""
    first = np.asarray(series[0].get(keyword), dtype=np.float64)
    for ds in series[1:]:
        value = np.asarray(ds.get(keyword), dtype=np.float64)
        if value.shape != first.shape or not np.allclose(value, first, rtol=0.0, atol=tolerance):
            raise SeriesNotLoadable(f"{problem} in one series ({keyword} differs)")


def _normal(ds: Dataset) -> NDArray[np.float64]:
    """Unit slice normal: row direction × column direction (ImageOrientationPatient halves)."""
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    length = float(np.linalg.norm(normal))
    if length < 0.5 or abs(float(np.dot(orientation[:3], orientation[3:]))) > 0.01:
        raise SeriesNotLoadable("ImageOrientationPatient is not two orthogonal unit vectors")
    return normal / length


def _sorted_along_normal(series: Sequence[Dataset]) -> list[_Slice]:
    """Sort ascending by position projected on the normal; refuse duplicate positions."""
    normal = _normal(series[0])
    slices = []
    for ds in series:
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        if position.shape != (3,):
            raise SeriesNotLoadable("ImagePositionPatient does not hold 3 values")
        slices.append(_Slice(ds=ds, position_mm=position, along_normal_mm=float(np.dot(position, normal))))
    slices.sort(key=lambda s: s.along_normal_mm)
    gaps = np.diff([s.along_normal_mm for s in slices])
    duplicates = int(np.count_nonzero(gaps < 1e-3))
    if duplicates:
        raise SeriesNotLoadable(f"{duplicates} slice(s) share a position with another slice (duplicate positions)")
    return slices


def _slice_step(slices: Sequence[_Slice]) -> NDArray[np.float64]:
    """Mean step between neighbouring positions; refuse the series if steps differ beyond SPACING_TOLERANCE."""
    positions = np.stack([s.position_mm for s in slices])
    steps = np.diff(positions, axis=0)
    mean_step: NDArray[np.float64] = (positions[-1] - positions[0]) / (len(slices) - 1)
    step_mm = float(np.linalg.norm(mean_step))
    deviation_mm = float(np.max(np.linalg.norm(steps - mean_step, axis=1)))
    if deviation_mm > SPACING_TOLERANCE * step_mm:
        lengths = np.linalg.norm(steps, axis=1)
        raise SeriesNotLoadable(
            f"uneven slice spacing: steps from {lengths.min():.2f} to {lengths.max():.2f} mm, mean {step_mm:.2f} mm "
            f"(tolerance {SPACING_TOLERANCE:.0%} of the step)")
    return mean_step


def _decode(ds: Dataset) -> NDArray[np.float32]:
    """Pixel data → modality values (rescale slope/intercept or modality LUT) as float32."""
    try:
        stored = ds.pixel_array
    except SoftTimeLimitExceeded:  # the task's time limit, not a decoding fault
        raise
    except Exception as exc:  # pydicom raises many types; its text may quote element values
        raise SeriesNotLoadable(f"pixel data could not be decoded ({type(exc).__name__})") from None
    if stored.shape != (int(ds.Rows), int(ds.Columns)):
        raise SeriesNotLoadable(f"decoded image has shape {stored.shape}, expected rows x columns")
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def _affine(first: _Slice, step: NDArray[np.float64]) -> NDArray[np.float64]:
    """Voxel (slice, row, column, 1) → LPS mm; column 0 is the measured slice step, not SliceThickness."""
    orientation = np.asarray(first.ds.ImageOrientationPatient, dtype=np.float64)
    row_spacing_mm, column_spacing_mm = (float(v) for v in first.ds.PixelSpacing)
    affine = np.eye(4, dtype=np.float64)
    affine[:3, 0] = step
    affine[:3, 1] = orientation[3:] * row_spacing_mm  # down a column: rows advance
    affine[:3, 2] = orientation[:3] * column_spacing_mm  # along a row: columns advance
    affine[:3, 3] = first.position_mm
    return affine
