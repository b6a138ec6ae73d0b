"""`pacsai feedback export DIR`: each corrected SEG with its source image as NIfTI pairs, and a CSV, for retraining.

Names are feedback ids and series keys (keyed hashes): the CSV holds no patient data or UID. NIfTI images are in
RAS+ (nibabel's convention): DICOM's LPS patient axes with x and y negated.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from pacsai.feedback_table import FeedbackKind, FeedbackRow
from pacsai.settings import Settings
from pacsai.state import State
from pacsai.storage import Spool

log = logging.getLogger(__name__)
CSV_NAME = "feedback.csv"
COLUMNS = (
    "feedback_id", "job_id", "model", "model_version", "kind", "series_key", "segment", "dice", "ours_ml",
    "theirs_ml", "volume_diff_ml", "image", "label",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Exported:
    rows: int  # feedback rows written to the CSV
    pairs: int  # image + label pairs written
    missing: int  # corrections whose source images are no longer in the spool (retention): CSV only


def export(settings: Settings, state: State, out: Path) -> Exported:
    """Write out/<feedback id>/{image,label}.nii.gz and labels.json for each correction, and out/feedback.csv."""
    out.mkdir(parents=True, exist_ok=True)
    spool = Spool(settings.storage.spool_dir, settings.log_key, reserve_bytes=0)
    lines, pairs, missing = [], 0, 0
    rows = state.feedback()
    for row in rows:
        job = state.job(row.job_id)
        series_key = job.series_key if job else ""
        image = label = ""
        if row.kind is FeedbackKind.CORRECTED and job is not None:
            try:
                sources = spool.read_manifest(job.manifest)
            except (OSError, ValueError) as exc:
                log.warning(
                    "feedback %s: source images not in the spool (%s): CSV only",
                    row.feedback_id[:8],
                    type(exc).__name__,
                )
                missing += 1
            else:
                image, label = write_pair(
                    sources, settings.storage.data_dir / row.corrected_file, out / row.feedback_id
                )
                pairs += 1
        lines.extend(_csv_lines(row, series_key, image, label))
    with open(out / CSV_NAME, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(lines)
    return Exported(len(rows), pairs, missing)


def _csv_lines(row: FeedbackRow, series_key: str, image: str, label: str) -> list[dict[str, object]]:
    common = {
        "feedback_id": row.feedback_id, "job_id": row.job_id, "model": row.model, "model_version": row.model_version,
        "kind": row.kind.value, "series_key": series_key, "image": image, "label": label,
    }  # fmt: skip
    if not row.segments:
        return [{**common, "segment": ""}]
    return [
        {**common, "segment": s.label, "dice": s.dice, "ours_ml": s.ours_ml, "theirs_ml": s.theirs_ml,
         "volume_diff_ml": round(s.volume_diff_ml, 3)}
        for s in row.segments
    ]  # fmt: skip


def write_pair(sources: list[Path], corrected: Path, folder: Path) -> tuple[str, str]:
    """The source slices as image.nii.gz (rescaled values) and the corrected segments as label.nii.gz (voxel =
    segment number, 0 background; labels.json names them), on the same grid; return the two paths relative to
    the export folder."""
    folder.mkdir(parents=True, exist_ok=True)
    slices = sorted((pydicom.dcmread(p) for p in sources), key=_along_normal)
    image = np.stack([_rescaled(ds) for ds in slices])
    seg = hd.seg.segread(corrected)
    uids = [str(ds.SOPInstanceUID) for ds in slices]
    numbers = list(seg.segment_numbers)
    masks = seg.get_pixels_by_source_instance(
        uids, segment_numbers=numbers, assert_missing_frames_are_empty=True, ignore_spatial_locations=True
    )
    labels = np.zeros(image.shape, dtype=np.uint8)
    for index, number in enumerate(numbers):  # a later segment wins where two overlap
        labels[masks[..., index] > 0] = number
    affine = _affine(slices)
    for name, array in (("image", image), ("label", labels)):  # (slice, row, column) → NIfTI's (i, j, k)
        nib.save(nib.Nifti1Image(np.transpose(array, (2, 1, 0)), affine), folder / f"{name}.nii.gz")  # type: ignore[no-untyped-call]
    names = {str(n): str(seg.get_segment_description(n).segment_label) for n in numbers}
    (folder / "labels.json").write_text(json.dumps(names, indent=1), encoding="utf-8")
    return f"{folder.name}/image.nii.gz", f"{folder.name}/label.nii.gz"


def _along_normal(ds: Dataset) -> float:
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), np.array(ds.ImagePositionPatient, dtype=float)))


def _rescaled(ds: Dataset) -> npt.NDArray[np.float32]:
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return np.asarray(ds.pixel_array, dtype=np.float32) * slope + intercept


def _affine(slices: Sequence[Dataset]) -> npt.NDArray[np.float64]:
    """Voxel (column, row, slice) → RAS+ mm, from the slices' orientation, spacing and first and last positions."""
    orientation = np.array(slices[0].ImageOrientationPatient, dtype=float)
    row_mm, column_mm = (float(v) for v in slices[0].PixelSpacing)
    first = np.array(slices[0].ImagePositionPatient, dtype=float)
    last = np.array(slices[-1].ImagePositionPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    step = (last - first) / (len(slices) - 1) if len(slices) > 1 else normal * float(slices[0].get("SliceThickness", 1))
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = orientation[:3] * column_mm, orientation[3:] * row_mm, step, first
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
