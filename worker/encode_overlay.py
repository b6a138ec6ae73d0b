"""Step 7 (segmentation, for viewers without SEG): SEG → one RGB Secondary Capture per source slice it marks.

Each picture is its source slice windowed to grey, every segment on it filled translucently and outlined in the
segment's recommended display colour, a banner "AI result - not for diagnosis" across the top and a legend of the
segment names at the bottom left. The picture keeps the source's rows and columns, so its pixels stay aligned with
the source (PixelSpacing, position and orientation are copied for viewers that link series).
Everything is read from the SEG and the Volume, so the same overlays come from a fresh SEG or one in the outbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pacsai.errors import ModelError
from worker.encode_sc import BANNER, secondary_capture
from worker.uids import derive_uid
from worker.volume import Volume

OVERLAY_SERIES_NUMBER = 9904
FILL_OPACITY = 0.35
OUTLINE_PX = 2
CT_WINDOW = (40.0, 400.0)  # centre, width in HU (soft tissue) for CT that names no window
_BANNER_RGB, _TEXT_RGB, _LEGEND_RGB = (160, 0, 0), (255, 255, 255), (0, 0, 0)
_GEOMETRY = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "SliceThickness",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
)
Layer = tuple["SegmentStyle", NDArray[np.bool_]]


@dataclass(frozen=True, slots=True)
class SegmentStyle:
    """How one SEG segment is drawn: its number, label and recommended display colour as sRGB."""

    number: int
    name: str
    rgb: tuple[int, int, int]


def overlay_series_uid(seg_series_uid: str) -> str:
    """The overlay series derives from the SEG's series, itself derived from (source series, model, version)."""
    return derive_uid(seg_series_uid, "overlay_series")


def overlay_instance_uid(seg_series_uid: str, source_sop_uid: str) -> str:
    return derive_uid(seg_series_uid, "overlay_instance", source_sop_uid)


def encode_seg_overlays(seg: Dataset, volume: Volume) -> list[hd.sc.SCImage]:
    """One SC per slice of `volume` holding a segment of `seg`, in slice order (ascending along the normal)."""
    styles = segment_styles(seg)
    layers = seg_layers(seg, volume, styles)
    model = str(seg.get("ManufacturerModelName", ""))
    name = " ".join(part for part in ("AI", model, _algorithm_version(seg)) if part)
    equipment = (model, str(seg.get("SoftwareVersions", "")), str(seg.get("DeviceSerialNumber", "")))
    series_uid = overlay_series_uid(str(seg.SeriesInstanceUID))
    overlays = []
    for index in sorted(layers):
        source = volume.datasets[index]
        picture = render_overlay(window_grey(volume.array[index], source), layers[index])
        overlays.append(
            secondary_capture(
                source,
                picture,
                series_uid=series_uid,
                series_number=OVERLAY_SERIES_NUMBER,
                instance_uid=overlay_instance_uid(str(seg.SeriesInstanceUID), str(source.SOPInstanceUID)),
                instance_number=int(source.get("InstanceNumber") or index + 1),
                series_description=f"{name} overlay - not for diagnosis",
                derivation=f"{name}: segmentation burned into the displayed image",
                equipment=equipment,
                references=(source, seg),
                patient_orientation=patient_orientation(source),
                pixel_spacing=_pixel_spacing(source),
            )
        )
        for keyword in _GEOMETRY:
            if keyword in source:
                setattr(overlays[-1], keyword, source[keyword].value)
    return overlays


def segment_styles(seg: Dataset) -> dict[int, SegmentStyle]:
    """Segment number → style; a segment without a display colour is drawn in yellow."""
    styles = {}
    for item in seg.SegmentSequence:
        lab = item.get("RecommendedDisplayCIELabValue")
        rgb = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in lab)).to_rgb() if lab else (255, 255, 0)
        number = int(item.SegmentNumber)
        styles[number] = SegmentStyle(number, str(item.get("SegmentLabel", f"segment {number}")), rgb)
    return styles


def seg_layers(seg: Dataset, volume: Volume, styles: dict[int, SegmentStyle]) -> dict[int, list[Layer]]:
    """Slice index → (style, mask) per non-empty SEG frame, matched to the slice by its source SOP Instance UID."""
    frames = np.asarray(seg.pixel_array).reshape(-1, int(seg.Rows), int(seg.Columns))
    if frames.shape[1:] != volume.array.shape[1:]:
        raise ModelError(f"SEG frames are {frames.shape[1:]}, the source slices {volume.array.shape[1:]}")
    slice_of = {str(ds.SOPInstanceUID): index for index, ds in enumerate(volume.datasets)}
    shared = seg.SharedFunctionalGroupsSequence[0]
    layers: dict[int, list[Layer]] = {}
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        identification = groups if "SegmentIdentificationSequence" in groups else shared
        number = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source_uid = str(groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        if source_uid not in slice_of:
            raise ModelError("a SEG frame references an image that is not in the source series")
        if frame.any():
            layers.setdefault(slice_of[source_uid], []).append((styles[number], frame.astype(bool)))
    return layers


def window_grey(values: NDArray[np.float32], header: Dataset) -> NDArray[np.uint8]:
    """Modality values → 0..255 through the source's first window (PS3.3 C.11.2.1.2.1, linear); CT without one:
    soft tissue (CT_WINDOW); anything else: its 1st..99th percentile. MONOCHROME1 is inverted to look alike."""
    if "WindowCenter" in header and "WindowWidth" in header:
        centre, width = _first(header.WindowCenter), max(_first(header.WindowWidth), 1.0)
    elif str(header.get("Modality", "")) == "CT":
        centre, width = CT_WINDOW
    else:
        low, high = (float(v) for v in np.percentile(values, (1.0, 99.0)))
        centre, width = (low + high) / 2.0, max(high - low, 1.0)
    scaled = np.clip((values - (centre - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)
    if str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.asarray(np.rint(scaled * 255.0), dtype=np.uint8)


def render_overlay(grey: NDArray[np.uint8], layers: Sequence[Layer]) -> NDArray[np.uint8]:
    """(rows, columns, 3) uint8: fills first, then outlines (so a neighbour's fill never hides an edge), then the
    banner and the legend of the segments on this slice."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    for style, mask in layers:
        rgb[mask] = rgb[mask] * (1.0 - FILL_OPACITY) + np.asarray(style.rgb, np.float32) * FILL_OPACITY
    for style, mask in layers:
        rgb[outline(mask)] = style.rgb
    canvas = Image.fromarray(np.asarray(np.rint(rgb), dtype=np.uint8))
    font_px = max(9, min(32, canvas.width // 36))
    font = ImageFont.load_default(size=font_px)
    draw = ImageDraw.Draw(canvas)
    banner_h = font_px * 3 // 2
    draw.rectangle((0, 0, canvas.width - 1, banner_h - 1), fill=_BANNER_RGB)
    draw.text((font_px // 2, font_px // 4), BANNER, fill=_TEXT_RGB, font=font)
    names = list(dict.fromkeys(style for style, _ in layers))
    line_h = font_px + font_px // 3
    top = canvas.height - line_h * len(names) - font_px // 2
    width = max((int(draw.textlength(s.name, font=font)) for s in names), default=0) + 2 * font_px
    draw.rectangle((0, top, width, canvas.height - 1), fill=_LEGEND_RGB)
    for row, style in enumerate(names):
        y = top + font_px // 4 + row * line_h
        draw.rectangle((font_px // 4, y, font_px // 4 + font_px - 2, y + font_px - 2), fill=style.rgb)
        draw.text((font_px + font_px // 2, y - font_px // 8), style.name, fill=_TEXT_RGB, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def outline(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The mask's pixels within OUTLINE_PX of its edge (4-neighbour erosion; the image border counts as outside)."""
    inner = mask.copy()
    for _ in range(OUTLINE_PX):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.asarray(mask & ~inner, dtype=np.bool_)


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """PatientOrientation (row, column directions as L/R, P/A, H/F letters) from ImageOrientationPatient."""
    if "ImageOrientationPatient" not in source:
        return None
    cosines = np.asarray(source.ImageOrientationPatient, dtype=np.float64)
    row, column = _letters(cosines[:3]), _letters(cosines[3:])
    return (row, column) if row and column else None


def _letters(direction: NDArray[np.float64]) -> str:
    """Main axes first; axes under 0.25 of the direction are left out (PS3.3 C.7.6.1.1.1)."""
    axes = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(direction))
    return "".join(axes[a][0 if direction[a] > 0 else 1] for a in order if abs(direction[a]) >= 0.25)


def _pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    spacing = source.get("PixelSpacing")
    return (float(spacing[0]), float(spacing[1])) if spacing else None


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element."""
    return float(value[0]) if isinstance(value, MultiValue) else float(value)


def _algorithm_version(seg: Dataset) -> str:
    items = seg.SegmentSequence[0].get("SegmentationAlgorithmIdentificationSequence") or [Dataset()]
    return str(items[0].get("AlgorithmVersion", ""))
