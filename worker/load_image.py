"""Step 6 input (classification): one CR/DX DICOM image → ProjectionImage, prepared the way MedMNIST made its images.

MedMNIST's PneumoniaMNIST took the 8-bit source JPEGs, cut the centred square whose side is the short edge and resized
it to 28×28. Its authors do not name the filter; we use PIL's antialiased BICUBIC (Image.resize's default since Pillow
7.0) on the 8-bit square, and the spec can choose another (ProjectionPreprocessing.resample).

The 8-bit image is what a viewer shows: stored values → modality LUT or rescale → the first VOI LUT, or else the
first window (LINEAR, LINEAR_EXACT or SIGMOID), or else the full range of the values → 0..255 → inverted for
MONOCHROME1 → rounded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from billiard.exceptions import SoftTimeLimitExceeded
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut

from models.preprocess import centre_square, shrink_square
from models.spec import ProjectionPreprocessing
from pacsai.errors import StudyRejected

log = logging.getLogger(__name__)

_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA = 0x7FE00010


class ImageNotLoadable(StudyRejected):
    """The file is not one greyscale 2D image we can display; `reason` never quotes a UID or patient value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProjectionImage:
    """`grey` is the whole image as displayed, uint8 (rows, columns) on the source pixel grid.

    `square` = (top, left, side) is the centred square the model sees; `network_grey` is that square resized to the
    spec's input_size (rows, columns). `header` is the source dataset without its pixel data.
    """

    grey: NDArray[np.uint8]
    network_grey: NDArray[np.uint8]
    square: tuple[int, int, int]
    header: Dataset


def load_image(path: Path, pre: ProjectionPreprocessing) -> ProjectionImage:
    """Read one DICOM file and prepare it for the model."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImageNotLoadable(f"file is not readable DICOM ({type(exc).__name__})") from None
    return prepare_image(ds, pre)


def prepare_image(ds: Dataset, pre: ProjectionPreprocessing) -> ProjectionImage:
    """Displayed grey values, the centred square and its resized copy; `ds` itself is left unchanged."""
    grey = display_grey(ds)
    square = centre_square(*grey.shape)
    small = shrink_square(grey, pre)  # the one implementation training and evaluation use too (models/preprocess.py)
    header = without_pixels(ds)
    log.info("prepared a %dx%d image (square side %d) as %dx%d", *grey.shape, square[2], *small.shape)
    return ProjectionImage(grey=grey, network_grey=small, square=square, header=header)


def without_pixels(ds: Dataset) -> Dataset:
    """A new dataset sharing every element of `ds` except Pixel Data (Dataset.copy is shallow: a del would reach ds)."""
    header = Dataset({tag: element for tag, element in ds.items() if tag != _PIXEL_DATA})
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


def display_grey(ds: Dataset) -> NDArray[np.uint8]:
    """The image as a viewer shows it, uint8 with 0 black and 255 white (MONOCHROME1 inverted, so both look alike)."""
    stored = _stored(ds)
    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:  # pydicom's text may quote values
        raise ImageNotLoadable(f"the modality LUT or rescale cannot be applied ({type(exc).__name__})") from None
    scaled = _voi_scaled(values, ds)
    if str(ds.PhotometricInterpretation) == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.asarray(np.rint(np.clip(scaled, 0.0, 1.0) * 255.0), dtype=np.uint8)


def _stored(ds: Dataset) -> NDArray[np.generic]:
    """Decoded stored values (rows, columns) of a single-frame greyscale image; ImageNotLoadable otherwise."""
    if "PixelData" not in ds:
        raise ImageNotLoadable("the dataset has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or str(ds.get("PhotometricInterpretation", "")) not in _GREYSCALE:
        raise ImageNotLoadable("the image is not greyscale (colour images are not supported)")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ImageNotLoadable("the image has several frames; one 2D image is needed")
    if str(ds.get("PresentationIntentType", "")).upper() == "FOR PROCESSING":
        raise ImageNotLoadable("the image is FOR PROCESSING; a FOR PRESENTATION image is needed")
    try:
        stored: NDArray[np.generic] = ds.pixel_array
    except SoftTimeLimitExceeded:  # the task's time limit, not a decoding fault
        raise
    except Exception as exc:  # pydicom raises many types; its text may quote element values
        raise ImageNotLoadable(f"pixel data could not be decoded ({type(exc).__name__})") from None
    if stored.ndim != 2 or stored.shape != (int(ds.Rows), int(ds.Columns)) or min(stored.shape) < 1:
        raise ImageNotLoadable(f"decoded pixels have shape {stored.shape}, expected one rows x columns image")
    return stored


def _voi_scaled(values: NDArray[np.float64], ds: Dataset) -> NDArray[np.float64]:
    """Modality values → 0..1 through the first VOI LUT, else the first window, else their own min..max."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        return _lookup(values, ds.VOILUTSequence[0])
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _window(
            values, _first(ds.WindowCenter), _first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR")).upper()
        )
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _lookup(values: NDArray[np.float64], item: Dataset) -> NDArray[np.float64]:
    """PS3.3 C.11.2.1.1: values below the first mapped one take entry 0, values past the end the last entry; the
    output range is 0..2^bits-1. (pydicom 3.0's apply_voi_lut wraps inputs past 255 for an 8-bit LUT.)"""
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        raw = item.LUTData
        data = np.frombuffer(raw, dtype="<u2") if isinstance(raw, bytes) else np.asarray(raw, dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        raise ImageNotLoadable("the VOI LUT is malformed") from None
    entries = entries or 65536
    if data.ndim != 1 or data.size < entries or not 1 <= bits <= 16:
        raise ImageNotLoadable("the VOI LUT is malformed")
    index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.int64)
    return np.asarray(data[index], dtype=np.float64) / float(2**bits - 1)


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element."""
    return float(value[0]) if isinstance(value, MultiValue) else float(value)


def _window(values: NDArray[np.float64], centre: float, width: float, function: str) -> NDArray[np.float64]:
    """PS3.3 C.11.2.1.2 (LINEAR) and C.11.2.1.3 (LINEAR_EXACT, SIGMOID) onto 0..1."""
    if function == "SIGMOID":
        if width <= 0:
            raise ImageNotLoadable("window width must be positive")
        result: NDArray[np.float64] = 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
        return result
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ImageNotLoadable("window width must be positive")
        return np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    if function != "LINEAR":
        raise ImageNotLoadable("VOI LUT function is not LINEAR, LINEAR_EXACT or SIGMOID")
    if width < 1:
        raise ImageNotLoadable("window width must be at least 1 for a LINEAR window")
    if width == 1:
        return (values > centre - 0.5).astype(np.float64)
    return np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
