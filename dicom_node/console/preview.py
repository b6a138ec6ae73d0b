"""Result previews: PNG thumbnails of a job's outbox files, rendered once and cached beside the data.

A SEG is drawn over the source slices with the largest segmented area (the key slices, at most three); a secondary
capture (a heat-map or an overlay) is drawn as it is. Nothing here logs or returns header values.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread

THUMBNAIL_PX = 256
KEY_SLICES = 3
OVERLAY_RGB = np.array([255, 40, 40], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class ResultFile:
    name: str  # file name in the outbox folder
    modality: str  # SEG, SR, OT, …
    size_bytes: int


def result_files(outbox: Path) -> list[ResultFile]:
    """The job's result files (header only, no pixel data read)."""
    found = []
    for path in sorted(outbox.glob("*.dcm")) if outbox.is_dir() else []:
        try:
            modality = str(dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", ""))
        except Exception:
            modality = "?"
        found.append(ResultFile(path.name, modality, path.stat().st_size))
    return found


def thumbnail_names(outbox: Path) -> list[str]:
    """Names of the thumbnails a job has: `<file>-<n>.png` (SEG key slices) and `<file>-0.png` (images)."""
    names = []
    for result in result_files(outbox):
        if result.modality == "SEG":
            names += [f"{result.name}-{n}.png" for n in range(KEY_SLICES)]
        elif result.modality not in ("SR", "?"):
            names.append(f"{result.name}-0.png")
    return names


def render_thumbnail(outbox: Path, name: str, sources: Sequence[Path], cache: Path) -> bytes | None:
    """The PNG `name` (from thumbnail_names), from the cache or rendered now; None when it does not exist."""
    file_name, _, index_text = name.removesuffix(".png").rpartition("-")
    path = outbox / file_name
    if not index_text.isdigit() or "/" in file_name or not path.is_file():
        return None
    cached = cache / f"{file_name}-{int(path.stat().st_mtime_ns)}-{index_text}.png"
    if cached.is_file():
        return cached.read_bytes()
    ds = dcmread(path)
    images = _seg_key_slices(ds, sources) if ds.Modality == "SEG" else [_to_rgb(ds.pixel_array, ds)]
    index = int(index_text)
    if index >= len(images):
        return None
    data = _png(images[index])
    cache.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(data)
    return data


def _png(rgb: NDArray[np.uint8]) -> bytes:
    image = Image.fromarray(rgb)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _to_rgb(pixels: NDArray[Any], ds: Any) -> NDArray[np.uint8]:
    """An image (grey or RGB, possibly multi-frame: the first frame) as 8-bit RGB, stretched to its range."""
    array = np.asarray(pixels)
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3:
        array = array[0] if array.ndim == 4 else array
        return _stretch(array).astype(np.uint8)
    array = array[0] if array.ndim == 3 else array
    grey = _stretch(array)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 255 - grey
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def _stretch(array: NDArray[Any]) -> NDArray[np.float32]:
    values = array.astype(np.float32)
    low, high = np.percentile(values, (1, 99)) if values.size else (0.0, 1.0)
    return np.clip((values - low) / max(float(high - low), 1e-6) * 255.0, 0, 255).astype(np.float32)


def _seg_key_slices(ds: Any, sources: Sequence[Path]) -> list[NDArray[np.uint8]]:
    """The SEG's frames grouped by source slice, the KEY_SLICES slices with the largest area, drawn over them."""
    frames = np.asarray(ds.pixel_array)
    frames = frames[None] if frames.ndim == 2 else frames
    masks: dict[str, NDArray[np.bool_]] = defaultdict(lambda: np.zeros(frames.shape[1:], dtype=bool))
    for index, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        source_uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        masks[source_uid] |= frames[index] > 0
    ranked = sorted(masks, key=lambda uid: int(masks[uid].sum()), reverse=True)[:KEY_SLICES]
    by_uid = _sources_by_uid(sources, set(ranked))
    images = []
    for uid in ranked:
        base = by_uid.get(uid)
        images.append(_overlay(base if base is not None else np.zeros((*masks[uid].shape, 3), np.uint8), masks[uid]))
    return images


def _sources_by_uid(sources: Sequence[Path], wanted: set[str]) -> dict[str, NDArray[np.uint8]]:
    found: dict[str, NDArray[np.uint8]] = {}
    for path in sources:
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            if str(header.SOPInstanceUID) in wanted:
                ds = dcmread(path)
                found[str(ds.SOPInstanceUID)] = _to_rgb(ds.pixel_array, ds)
        except Exception:
            continue
    return found


def _overlay(base: NDArray[np.uint8], mask: NDArray[np.bool_]) -> NDArray[np.uint8]:
    if base.shape[:2] != mask.shape:
        base = np.zeros((*mask.shape, 3), np.uint8)
    mixed = base.astype(np.float32)
    mixed[mask] = 0.5 * mixed[mask] + 0.5 * OVERLAY_RGB
    return mixed.astype(np.uint8)
