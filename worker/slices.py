"""Step 6 input, first half: which planes of which files can form a volume (single-frame images, or the frames of
an enhanced multi-frame image with their functional groups), each with its geometry, rescale and stack key."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset

_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "SeriesInstanceUID")
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1 … .7.4
_IN_STACK = (pydicom.tag.Tag("InStackPositionNumber"), pydicom.tag.Tag("ImagePositionPatient"))


class NotASlice(Exception):
    """A file that is not part of any volume; the message is the reason counted in the log."""


@dataclass(frozen=True, slots=True)
class Slice:
    """One candidate plane: its header, frame number (0: single-frame), geometry, rescale and stack."""

    ds: Dataset
    frame: int
    position_mm: NDArray[np.float64]
    orientation: NDArray[np.float64]
    pixel_spacing_mm: NDArray[np.float64]
    rescale: tuple[float, float] | None  # (slope, intercept) of a frame; None: the single-frame modality LUT
    stack: Hashable


def check_image(ds: Dataset) -> None:
    """Raise NotASlice for what is no volume slice: no pixels, secondary captures and other secondary derived
    images, localizers, mosaics, colour."""
    if "PixelData" not in ds:
        raise NotASlice("no pixel data (SR, dose report, presentation state or similar)")
    if str(ds.get("SOPClassUID", "")).startswith(_SECONDARY_CAPTURE):
        raise NotASlice("secondary capture")
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if image_type[:2] == ["DERIVED", "SECONDARY"]:  # DERIVED\PRIMARY stays: e.g. lossy-compressed originals
        raise NotASlice("secondary derived image (reformat, projection or capture)")
    if "LOCALIZER" in image_type:
        raise NotASlice("localizer")
    if "MOSAIC" in image_type:
        raise NotASlice("mosaic (several slices tiled in one image)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise NotASlice("colour image")


def single(ds: Dataset) -> Slice:
    """A single-frame image as a plane of its series' stack."""
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise NotASlice("multi-frame image without per-frame functional groups")
    if not all(keyword in ds for keyword in _REQUIRED):
        raise NotASlice("image without position, orientation or pixel spacing")
    return Slice(
        ds=ds,
        frame=0,
        position_mm=vector(ds.ImagePositionPatient, 3),
        orientation=vector(ds.ImageOrientationPatient, 6),
        pixel_spacing_mm=vector(ds.PixelSpacing, 2),
        rescale=None,
        stack=("series", str(ds.SeriesInstanceUID)),
    )


def frames(ds: Dataset) -> list[Slice]:
    """The frames of an enhanced multi-frame image, each with its functional groups (per-frame before shared)."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != int(ds.get("NumberOfFrames", 0) or 0) or not all(k in ds for k in ("Rows", "Columns")):
        raise NotASlice("multi-frame image whose functional groups do not match its frames")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    planes = []
    for number, groups in enumerate(per_frame, start=1):
        position = _group_item(groups, shared, "PlanePositionSequence").get("ImagePositionPatient")
        orientation = _group_item(groups, shared, "PlaneOrientationSequence").get("ImageOrientationPatient")
        spacing = _group_item(groups, shared, "PixelMeasuresSequence").get("PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise NotASlice("multi-frame image without plane position, orientation or pixel spacing")
        cosines = vector(orientation, 6)
        planes.append(
            Slice(
                ds=ds,
                frame=number,
                position_mm=vector(position, 3),
                orientation=cosines,
                pixel_spacing_mm=vector(spacing, 2),
                rescale=_frame_rescale(ds, groups, shared),
                stack=_frame_stack(ds, groups, shared, cosines),
            )
        )
    return planes


def _group_item(groups: Dataset, shared: Dataset, keyword: str) -> Dataset:
    """The first item of a functional group macro, per-frame if present there, else shared, else empty."""
    for source in (groups, shared):
        if source.get(keyword):
            item: Dataset = source[keyword][0]
            return item
    return Dataset()


def _frame_rescale(ds: Dataset, groups: Dataset, shared: Dataset) -> tuple[float, float]:
    """(slope, intercept) from Pixel Value Transformation, else the top-level attributes, else identity."""
    item = _group_item(groups, shared, "PixelValueTransformationSequence")
    slope = item.get("RescaleSlope", ds.get("RescaleSlope", 1.0))
    intercept = item.get("RescaleIntercept", ds.get("RescaleIntercept", 0.0))
    return float(slope if slope not in (None, "") else 1.0), float(intercept if intercept not in (None, "") else 0.0)


def _frame_stack(ds: Dataset, groups: Dataset, shared: Dataset, orientation: NDArray[np.float64]) -> Hashable:
    """What frames of one stack share: instance, orientation, frame type, Stack ID, non-positional dimensions."""
    frame_type: tuple[str, ...] = ()
    for source in (groups, shared):
        for element in source:
            if element.keyword.endswith("FrameTypeSequence") and element.value and not frame_type:
                frame_type = tuple(str(v) for v in element.value[0].get("FrameType", []))
    content = _group_item(groups, shared, "FrameContentSequence")
    indices = content.get("DimensionIndexValues")
    indices = [indices] if isinstance(indices, int) else list(indices or [])
    pointers = [item.get("DimensionIndexPointer") for item in ds.get("DimensionIndexSequence", [])]
    dimensions = tuple(int(v) for pointer, v in zip(pointers, indices, strict=False) if pointer not in _IN_STACK)
    return (
        "frames",
        str(ds.SOPInstanceUID),
        tuple(np.round(orientation, 3).tolist()),
        frame_type,
        str(content.get("StackID", "")),
        dimensions,
    )


def vector(value: object, length: int) -> NDArray[np.float64]:
    """A multi-valued number as a float vector of the expected length."""
    try:
        vector = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise NotASlice("image with unreadable geometry values") from None
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        raise NotASlice("image with unreadable geometry values")
    return vector
