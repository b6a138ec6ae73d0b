"""Independent checks of SEG/SR results against the source files (not against our own loader)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import Dataset, config, dcmread
from pydicom.uid import UID

from models.spec import Label, ModelSpec, Preprocessing, Task

VOLUME_CODE = "118565006"
REFERENCED_SEGMENT_CODE = "121191"


def segmentation_spec(*labels: Label, name: str = "ct-organs-tiny", modalities: tuple[str, ...] = ("CT",)) -> ModelSpec:
    """A segmentation model's spec with these labels, for encoding tests (no weights are loaded from it)."""
    return ModelSpec(
        name=name,
        version="0.1.0",
        task=Task.SEGMENTATION,
        modalities=modalities,
        network="unet",
        network_args={},
        weights=Path("weights.pt"),
        weights_sha256="0123abcd" * 8,
        labels=labels,
        preprocessing=Preprocessing((1.5, 1.5, 2.0), -1000.0, 1000.0, (64, 64, 64)),
    )


def to_bytes(dataset: Dataset) -> bytes:
    """A dataset written in the DICOM file format, as bytes."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_strict(data: bytes) -> Dataset:
    """Read bytes back with pydicom's strict reading (raises on anything malformed)."""
    with config.strict_reading():
        return dcmread(BytesIO(data))


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines dciodvfy reports as errors for a file (warnings are not errors)."""
    run = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def source_geometry(source_dir: Path) -> tuple[dict[str, tuple[float, ...]], float]:
    """SOP Instance UID → ImagePositionPatient of each source file, and the voxel volume in mL."""
    headers = [dcmread(p, stop_before_pixels=True) for p in sorted(source_dir.iterdir()) if p.is_file()]
    headers = [h for h in headers if "ImagePositionPatient" in h]
    positions = {str(h.SOPInstanceUID): tuple(float(v) for v in h.ImagePositionPatient) for h in headers}
    orientation = np.array(headers[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    along = sorted(float(np.dot(normal, p)) for p in positions.values())
    step = float(np.median(np.diff(along)))
    spacing = [float(v) for v in headers[0].PixelSpacing]
    return positions, spacing[0] * spacing[1] * step / 1000.0


def seg_voxels_per_segment(seg: Dataset) -> dict[int, int]:
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    counts: dict[int, int] = {}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for index, frame in enumerate(frames):
        groups = seg.PerFrameFunctionalGroupsSequence[index]
        identification = groups if "SegmentIdentificationSequence" in groups else shared
        number = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[number] = counts.get(number, 0) + int(frame.astype(bool).sum())
    return counts


def _walk(items: Iterator[Dataset] | list[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def sr_volumes(sr: Dataset) -> dict[int, float]:
    """Segment number → volume (mL) from each TID 1411 measurement group of a TID 1500 report."""
    volumes: dict[int, float] = {}
    for group in _walk(sr.ContentSequence):
        if group.get("ValueType") != "CONTAINER" or "ContentSequence" not in group:
            continue
        children = list(group.ContentSequence)
        segment = [
            c.ReferencedSOPSequence[0].ReferencedSegmentNumber
            for c in children
            if c.ConceptNameCodeSequence[0].CodeValue == REFERENCED_SEGMENT_CODE
        ]
        volume = [
            float(c.MeasuredValueSequence[0].NumericValue)
            for c in children
            if c.get("ValueType") == "NUM" and c.ConceptNameCodeSequence[0].CodeValue == VOLUME_CODE
        ]
        if segment and volume:
            volumes[int(segment[0])] = volume[0]
    return volumes


def check_seg_and_sr(seg_path: Path, sr_path: Path, source_dir: Path) -> dict[int, float]:
    """Assert the whole-path contract of issue 2; return the SR volumes per segment."""
    seg, sr = dcmread(seg_path), dcmread(sr_path)
    positions, voxel_ml = source_geometry(source_dir)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    referenced = {
        str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence
    }
    assert referenced == set(positions), "the SEG must reference every source instance"
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = tuple(float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        source_uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert np.allclose(position, positions[source_uid], atol=1e-3), "SEG frame not on its source slice"
    assert seg.StudyInstanceUID == sr.StudyInstanceUID
    for path in (seg_path, sr_path):
        assert dciodvfy_errors(path) == [], f"dciodvfy errors in {path.name}"
    volumes = sr_volumes(sr)
    counts = seg_voxels_per_segment(seg)
    assert set(volumes) == set(counts) and volumes
    for number, count in counts.items():
        assert volumes[number] > 0
        assert abs(volumes[number] - count * voxel_ml) <= max(0.01, 1e-3 * volumes[number])
    return volumes


def reuid_series(source_dir: Path, target_dir: Path, root: str, study_uid: str = "", **values: str) -> int:
    """Copy a series with Study/Series/SOP UIDs under `root` (and other attributes set); return the file count."""
    target_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source_dir.iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md"))
    for index, path in enumerate(files):
        ds = dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or f"{root}.1", f"{root}.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{root}.3.{index + 1}")
        ds.save_as(target_dir / f"{index:04d}.dcm", enforce_file_format=True)
    return len(files)


def make_canary_series(source_dir: Path, target_dir: Path) -> list[str]:
    """Copy a series with unique patient values and UIDs; return the strings that must never leak."""
    root = "1.2.826.0.1.3680043.10.1051.777"
    values = {
        "PatientName": "CANARY^PHI^Zq7",
        "PatientID": "CANARYID9Xk2",
        "PatientBirthDate": "19470203",
    }  # an adult age: the CT model takes 18-120 years
    reuid_series(source_dir, target_dir, root, **values)
    return [*values.values(), f"{root}.1", f"{root}.2", f"{root}.3.", "CANARY"]


def find_leaks(canaries: list[str], texts: dict[str, str], root: Path) -> list[str]:
    """Where any canary appears: in the given texts (logs, Redis dumps) or in a file name under root."""
    leaks = [f"{canary!r} in {where}" for where, text in texts.items() for canary in canaries if canary in text]
    for path in root.rglob("*"):
        leaks += [f"{canary!r} in file name {path}" for canary in canaries if canary in str(path.relative_to(root))]
    return leaks
