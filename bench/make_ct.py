"""Synthetic benchmark data: a CT series with a body-like phantom (default 300 × 512²) and many small MR instances.

Deterministic: the same arguments always give the same bytes (seeded noise, UIDs derived from the seed and study
number). Explicit VR little endian. Nothing here is committed data; the files are made into the folder you name.

    .venv/bin/python bench/make_ct.py ct /tmp/ct --slices 300 --study 0
    .venv/bin/python bench/make_ct.py small /tmp/small --count 2000
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root; UIDs are hashes of the names below
PIXEL_SPACING_MM = 0.8  # 512 px → 410 mm field of view
SLICE_THICKNESS_MM = 1.25


@dataclass(frozen=True, slots=True)
class Organ:
    """An ellipsoid in patient coordinates (LPS, mm; z = 0 at the first slice), filled with one HU value."""

    centre_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    hu: float


# Abdomen seen from the feet: patient right is -x (image left), posterior is +y. Later organs overwrite earlier ones.
PHANTOM = (
    Organ((0, 10, 190), (165, 120, 400), 30),  # body: soft tissue
    Organ((0, 10, 190), (160, 115, 400), -90),  # subcutaneous fat ring inside the skin...
    Organ((0, 12, 190), (145, 100, 400), 35),  # ...around the abdominal wall and contents
    Organ((-75, 30, 330), (70, 75, 80), -850),  # right lung base (top slices)
    Organ((75, 30, 330), (65, 75, 75), -850),  # left lung base
    Organ((-65, 5, 250), (75, 70, 80), 60),  # liver
    Organ((85, 45, 250), (35, 45, 55), 50),  # spleen
    Organ((40, -30, 235), (50, 35, 45), 25),  # stomach wall and contents
    Organ((40, -45, 245), (25, 12, 20), -950),  # gas in the stomach
    Organ((-60, 65, 170), (28, 30, 55), 35),  # right kidney
    Organ((60, 65, 180), (28, 30, 55), 35),  # left kidney
    Organ((0, 40, 190), (12, 12, 400), 180),  # aorta with contrast
    Organ((0, 85, 190), (22, 20, 400), 700),  # vertebral bodies
    Organ((0, 118, 190), (8, 16, 400), 500),  # spinal canal's posterior elements
)


def uid(*parts: object) -> str:
    return str(generate_uid(UID_PREFIX, entropy_srcs=[str(p) for p in parts]))


def phantom_slice(z_mm: float, size: int, rng: np.random.Generator) -> NDArray[np.int16]:
    """HU of one axial slice at height z (plus seeded noise), as int16."""
    axis = (np.arange(size, dtype=np.float32) - size / 2 + 0.5) * PIXEL_SPACING_MM
    x, y = np.meshgrid(axis, axis)  # rows run anterior → posterior (y), columns right → left (x)
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    for organ in PHANTOM:
        (cx, cy, cz), (rx, ry, rz) = organ.centre_mm, organ.radii_mm
        reach = 1.0 - ((z_mm - cz) / rz) ** 2
        if reach > 0:
            hu[((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= reach] = organ.hu
    inside = hu > -900
    hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32) * inside
    return np.clip(hu, -1024, 3071).astype(np.int16)


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(uid("pacsai-bench-implementation"))
    meta.ImplementationVersionName = "PACSAI_BENCH"
    return meta


def _patient_study(ds: Dataset, *, seed: int, study: int, modality: str) -> None:
    """Patient, General Study, General Equipment and SOP Common attributes of a synthetic study."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"BENCH^{modality}{study:03d}"
    ds.PatientID = f"BENCH-{seed}-{study}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientAge = "066Y"
    ds.StudyInstanceUID = uid("study", modality, seed, study)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261202"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "080000"
    ds.AccessionNumber = f"BA{seed:02d}{study:05d}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = str(study + 1)
    ds.StudyDescription = "BENCHMARK"
    ds.Manufacturer = "pacsai bench"
    ds.ManufacturerModelName = "make_ct.py"
    ds.InstitutionName = "Synthetic"


def ct_slice(index: int, *, slices: int, size: int, seed: int, study: int) -> Dataset:
    """Slice `index` (0 = feet end) of the synthetic CT series as a complete CT Image Storage dataset."""
    rng = np.random.default_rng([seed, study, index])
    z_mm = index * SLICE_THICKNESS_MM
    ds = Dataset()
    sop_instance = uid("ct", seed, study, index)
    ds.file_meta = _file_meta(CT_IMAGE_STORAGE, sop_instance)
    _patient_study(ds, seed=seed, study=study, modality="CT")
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.SeriesInstanceUID = uid("ct-series", seed, study)
    ds.SeriesNumber = 2
    ds.SeriesDescription = f"ABDOMEN {SLICE_THICKNESS_MM} mm"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "FFS"
    ds.FrameOfReferenceUID = uid("ct-frame", seed, study)
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = slices - index  # head first in instance order, like most scanners
    ds.ImagesInAcquisition = slices
    ds.ImagePositionPatient = [-(size / 2 - 0.5) * PIXEL_SPACING_MM, -(size / 2 - 0.5) * PIXEL_SPACING_MM, z_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = z_mm
    ds.SliceThickness = SLICE_THICKNESS_MM
    ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.KVP = 120
    ds.ConvolutionKernel = "STANDARD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    stored = phantom_slice(z_mm, size, rng).astype(np.int32) + 1024  # HU = stored - 1024
    ds.PixelData = stored.astype("<i2").tobytes()
    return ds


def small_instance(index: int, *, size: int, seed: int, per_series: int) -> Dataset:
    """Instance `index` of the small set: 16-bit MR images, `per_series` per series, two series per study."""
    series, number = divmod(index, per_series)
    study = series // 2
    rng = np.random.default_rng([seed, 7, index])
    ds = Dataset()
    sop_instance = uid("mr", seed, index)
    ds.file_meta = _file_meta(MR_IMAGE_STORAGE, sop_instance)
    _patient_study(ds, seed=seed, study=study, modality="MR")
    ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, sop_instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.Modality = "MR"
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.SeriesInstanceUID = uid("mr-series", seed, series)
    ds.SeriesNumber = series % 2 + 1
    ds.SeriesDescription = "T2 AX" if series % 2 == 0 else "T1 AX"
    ds.FrameOfReferenceUID = uid("mr-frame", seed, study)
    ds.PositionReferenceIndicator = ""
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 4000, 90, 16
    ds.MagneticFieldStrength = 1.5
    ds.InstanceNumber = number + 1
    ds.ImagePositionPatient = [-size / 2, -size / 2, number * 4.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 4.0
    ds.PixelSpacing = [1.0, 1.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    x, y = np.meshgrid(axis, axis)
    image = 1500 * np.exp(-(x**2 + y**2) * 2) + rng.normal(0, 40, (size, size))
    ds.PixelData = np.clip(image, 0, 4095).astype("<u2").tobytes()
    return ds


def write_ct(folder: Path, *, slices: int = 300, size: int = 512, seed: int = 0, study: int = 0) -> list[Path]:
    """Write the CT series into `folder` (one file per slice); return the paths in instance order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(slices):
        path = folder / f"ct{study:03d}_{slices - index:04d}.dcm"
        ct_slice(index, slices=slices, size=size, seed=seed, study=study).save_as(path, enforce_file_format=True)
        paths.append(path)
    return sorted(paths)


def write_small(
    folder: Path, *, count: int = 2000, size: int = 136, seed: int = 0, per_series: int = 100
) -> list[Path]:
    """Write `count` small MR instances (136² × 16 bit ≈ 38 KB each) into `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"mr{index:05d}.dcm"
        small_instance(index, size=size, seed=seed, per_series=per_series).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    ct = sub.add_parser("ct", help="one CT series with a body phantom")
    ct.add_argument("folder", type=Path)
    ct.add_argument("--slices", type=int, default=300)
    ct.add_argument("--size", type=int, default=512, help="rows = columns")
    ct.add_argument("--seed", type=int, default=0)
    ct.add_argument("--study", type=int, default=0, help="study number: another number gives other UIDs")
    small = sub.add_parser("small", help="many small MR instances")
    small.add_argument("folder", type=Path)
    small.add_argument("--count", type=int, default=2000)
    small.add_argument("--size", type=int, default=136)
    small.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "ct":
        paths = write_ct(args.folder, slices=args.slices, size=args.size, seed=args.seed, study=args.study)
    else:
        paths = write_small(args.folder, count=args.count, size=args.size, seed=args.seed)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} files, {total / 1e6:.1f} MB in {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
