"""Step 7 (classification): heat-map → RGB Secondary Capture with a burned-in banner and legend, built but not written.

The picture is the source image as displayed (grey), the heat-map blended over it in colour (opacity grows with the
heat), a banner above ("AI result - not for diagnosis") and a legend below (colour bar and caption). It is scaled
down so that its long side is at most MAX_SIDE_PX: it is a visual aid, not a diagnostic image.
`secondary_capture` builds the SC around a picture for both this and the SEG overlays (worker/encode_overlay.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from models.spec import ModelSpec
from pacsai.errors import ModelError
from worker.classify import Classification
from worker.encode_seg import MANUFACTURER, clip_lo, declare_charset, device_serial_number, revised
from worker.load_image import display_grey
from worker.uids import derive_uid, revision_base

SC_SERIES_NUMBER = 9903
MAX_SIDE_PX = 1024
BANNER = "AI result - not for diagnosis"
MAX_OPACITY = 0.5
# Colour scale anchors (heat → RGB), blue → cyan → green → yellow → red, interpolated linearly.
_ANCHORS = ((0.0, (0, 0, 255)), (0.25, (0, 255, 255)), (0.5, (0, 255, 0)), (0.75, (255, 255, 0)), (1.0, (255, 0, 0)))
_BANNER_RGB, _BANNER_TEXT_RGB, _LEGEND_RGB, _TEXT_RGB = (160, 0, 0), (255, 255, 255), (0, 0, 0), (255, 255, 255)


def heatmap_uids(source_series_uid: str, model: str, version: str, revision: int = 1) -> dict[str, str]:
    """Series and instance UID of the heat-map SC, derived like worker.uids.output_uids (same base, new roles)."""
    base = revision_base(source_series_uid, model, version, revision)
    return {role: derive_uid(*base, role) for role in ("sc_series", "sc_instance")}


def caption_for(result: Classification) -> str:
    """One legend line, e.g. "Pneumonia: present (p = 0.93, threshold 0.29)"."""
    word = "present" if result.present else "absent"
    return f"{result.finding.meaning}: {word} (p = {result.probability:.2f}, threshold {result.threshold:.2f})"


def encode_heatmap_sc(
    source: Dataset,
    heatmap: NDArray[np.float32],
    spec: ModelSpec,
    uids: Mapping[str, str],
    *,
    software_version: str,
    caption: str = "",
    revision: int = 1,
) -> hd.sc.SCImage:
    """RGB Secondary Capture in a new series of the source's study; uids needs "sc_series" and "sc_instance".

    `source` must still hold its pixel data; `heatmap` is 0..1 on its pixel grid (rows, columns).
    """
    grey = display_grey(source)
    if heatmap.shape != grey.shape:
        raise ModelError(f"model {spec.name}: heat-map is {heatmap.shape}, expected the image's {grey.shape}")
    picture = render(grey, heatmap, caption=caption or f"Grad-CAM, {spec.name} {spec.version}")
    name = f"AI {spec.name} {spec.version}"
    return secondary_capture(
        source,
        picture,
        series_uid=uids["sc_series"],
        series_number=SC_SERIES_NUMBER,
        instance_uid=uids["sc_instance"],
        instance_number=1,
        series_description=f"{name} {revised('heat-map', revision)} - not for diagnosis",
        derivation=f"{name}: Grad-CAM heat-map over the displayed image",
        equipment=(spec.name, software_version, device_serial_number(spec)),
        references=(source,),
    )


def secondary_capture(
    source: Dataset,
    picture: NDArray[np.uint8],
    *,
    series_uid: str,
    series_number: int,
    instance_uid: str,
    instance_number: int,
    series_description: str,
    derivation: str,
    equipment: tuple[str, str, str],
    references: Sequence[Dataset],
    patient_orientation: tuple[str, str] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
) -> hd.sc.SCImage:
    """RGB SC in a new series of the source's study, marked burned-in; equipment is (model, software, serial).

    patient_orientation None: the source's own PatientOrientation (Type 2C: empty when it gives none).
    """
    model_name, software_version, serial = equipment
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("L", "F"),  # placeholder: highdicom takes one letter per direction (no "PF" for oblique)
        pixel_spacing=pixel_spacing,  # type: ignore[arg-type]  # highdicom 0.28 annotates ints; mm are floats
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=clip_lo(series_description),
        manufacturer_model_name=clip_lo(model_name),
        software_versions=clip_lo(software_version),
        device_serial_number=serial,
    )
    _take_from_source(sc, source, patient_orientation, derivation, references)
    return declare_charset(sc)


def _take_from_source(
    sc: hd.sc.SCImage,
    source: Dataset,
    patient_orientation: tuple[str, str] | None,
    derivation: str,
    references: Sequence[Dataset],
) -> None:
    """What the SC keeps of its source: orientation, laterality, visual features; burned-in, derived, referenced."""
    if patient_orientation is None:
        # highdicom wants an orientation for PATIENT; the SC's rows and columns run as the source's, so copy its
        # own over the placeholder above.
        sc.PatientOrientation = source.get("PatientOrientation", None)
    else:
        sc.PatientOrientation = list(patient_orientation)
    sc.Laterality = source.get("Laterality", None)  # General Series, Type 2C: the source's, or empty
    if "AnatomicalOrientationType" in source:
        sc.AnatomicalOrientationType = source.AnatomicalOrientationType
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = str(source.get("RecognizableVisualFeatures", "NO")) or "NO"
    sc.ConversionType = "WSD"  # made on a workstation from the source image
    sc.DerivationDescription = clip_lo(derivation)
    sc.SourceImageSequence = [reference_to(ds) for ds in references]


def reference_to(ds: Dataset) -> Dataset:
    """A SourceImageSequence item naming ds."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return reference


def render(grey: NDArray[np.uint8], heatmap: NDArray[np.float32], *, caption: str) -> NDArray[np.uint8]:
    """(rows', columns', 3) uint8: banner, blended image (long side ≤ MAX_SIDE_PX), legend."""
    blended = Image.fromarray(blend(grey, heatmap))
    scale = min(1.0, MAX_SIDE_PX / max(blended.size))
    width, height = max(1, round(blended.width * scale)), max(1, round(blended.height * scale))
    blended = blended.resize((width, height), resample=Image.Resampling.BILINEAR)
    font_px = max(10, min(48, width // 28))
    font = ImageFont.load_default(size=font_px)
    banner_h, legend_h = 2 * font_px, 4 * font_px
    canvas = Image.new("RGB", (max(width, 16 * font_px), height + banner_h + legend_h), _LEGEND_RGB)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, canvas.width, banner_h - 1), fill=_BANNER_RGB)
    draw.text((font_px // 2, font_px // 2), BANNER, fill=_BANNER_TEXT_RGB, font=font)
    canvas.paste(blended, (0, banner_h))
    _legend(draw, top=banner_h + height, width=canvas.width, font=font, font_px=font_px, caption=caption)
    return np.asarray(canvas, dtype=np.uint8)


def blend(grey: NDArray[np.uint8], heatmap: NDArray[np.float32]) -> NDArray[np.uint8]:
    """Grey as RGB with colour(heat) laid over it at opacity MAX_OPACITY × heat (heat 0 leaves the grey as is)."""
    heat = np.clip(np.nan_to_num(heatmap, nan=0.0), 0.0, 1.0)
    colour = colour_scale(heat).astype(np.float32)
    opacity = (MAX_OPACITY * heat)[..., None]
    base = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    return np.asarray(np.rint(base * (1.0 - opacity) + colour * opacity), dtype=np.uint8)


def colour_scale(heat: NDArray[np.float32]) -> NDArray[np.uint8]:
    """RGB of each heat value 0..1 along _ANCHORS."""
    stops = np.array([a[0] for a in _ANCHORS])
    channels = [np.interp(heat, stops, [a[1][c] for a in _ANCHORS]) for c in range(3)]
    return np.asarray(np.rint(np.stack(channels, axis=-1)), dtype=np.uint8)


def _legend(
    draw: ImageDraw.ImageDraw,
    *,
    top: int,
    width: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    font_px: int,
    caption: str,
) -> None:
    """Colour bar labelled low … high on the first line, the caption on the second."""
    margin = font_px // 2
    low_w = int(draw.textlength("low", font=font))
    bar_left, bar_right = margin + low_w + margin, min(width - margin, margin + low_w + margin + 10 * font_px)
    bar_top = top + margin
    ramp = colour_scale(np.linspace(0.0, 1.0, max(2, bar_right - bar_left), dtype=np.float32))
    for offset, rgb in enumerate(ramp):
        draw.line(
            (bar_left + offset, bar_top, bar_left + offset, bar_top + font_px),
            fill=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
        )
    draw.text((margin, bar_top), "low", fill=_TEXT_RGB, font=font)
    draw.text((bar_right + margin, bar_top), "high", fill=_TEXT_RGB, font=font)
    draw.text((margin, bar_top + font_px + margin), caption, fill=_TEXT_RGB, font=font)
