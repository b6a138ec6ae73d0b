"""A series on brainchop's conformed grid and back: the input a MeshNet expects, its labels on the source voxels.

The conformed grid is FreeSurfer's: size³ voxels of voxel_mm, voxel axes towards Left, Inferior, Anterior (LIA), its
centre voxel (size / 2) on the centre of the source volume. Intensities: trilinear resampling (0 outside the
source), then source minimum → 0 and the 99.9th percentile of the non-zero source values (1000-bin histogram) → 255,
clipped and truncated to integers, as niivue's conform does before brainchop runs a model. brainchop then scales
the conformed volume min–max to [0, 1], crops it to the box of voxels above `crop_threshold` (plus `crop_padding`
voxels, inside the grid), runs the network on that box with the voxel axes (i, j, k) as (D, H, W), takes the argmax
and keeps the largest 26-connected component of each label. Re-implemented from those descriptions, not copied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

log = logging.getLogger(__name__)

LIA_IN_LPS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]])  # columns: voxel i, j, k in LPS
_HISTOGRAM_BINS = 1000


@dataclass(frozen=True, slots=True)
class ConformSettings:
    """What brainchop does around a full-volume MeshNet (spec.yaml network_args of a meshnet.tfjs model)."""

    size: int = 256
    voxel_mm: float = 1.0
    upper_fraction: float = 0.999
    crop_threshold: float = 0.5
    crop_padding: int = 20
    largest_component: bool = True

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ConformSettings:
        return cls(
            size=int(args.get("size", 256)),
            voxel_mm=float(args.get("voxel_mm", 1.0)),
            upper_fraction=float(args.get("upper_fraction", 0.999)),
            crop_threshold=float(args.get("crop_threshold", 0.5)),
            crop_padding=int(args.get("crop_padding", 20)),
            largest_component=bool(args.get("largest_component", True)),
        )


@dataclass(frozen=True, slots=True)
class Conformed:
    """`array` (i, j, k) on the conformed grid, values 0..255; `affine` maps (i, j, k, 1) to LPS mm."""

    array: NDArray[np.float32]
    affine: NDArray[np.float64]


def conformed_affine(
    shape: tuple[int, ...], affine_lps: NDArray[np.float64], settings: ConformSettings
) -> NDArray[np.float64]:
    """LIA grid whose centre voxel lies on the source volume's centre (the middle of its first and last voxels)."""
    centre = affine_lps @ np.append((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0, 1.0)
    grid = np.eye(4)
    grid[:3, :3] = LIA_IN_LPS * settings.voxel_mm
    grid[:3, 3] = centre[:3] - grid[:3, :3] @ np.full(3, settings.size / 2.0)
    return grid


def conform(array: NDArray[np.float32], affine_lps: NDArray[np.float64], settings: ConformSettings) -> Conformed:
    """Resample (trilinear, 0 outside) onto the conformed grid and scale to 0..255 like niivue's uint8 conform."""
    grid = conformed_affine(array.shape, affine_lps, settings)
    to_source = np.linalg.inv(affine_lps) @ grid
    size = settings.size
    j, k = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    plane = to_source[:3, 1, None, None] * j + to_source[:3, 2, None, None] * k + to_source[:3, 3, None, None]
    source = np.asarray(array, dtype=np.float32)
    out = np.zeros((size, size, size), dtype=np.float32)
    for i in range(size):
        coords = plane + to_source[:3, 0, None, None] * i
        out[i] = ndimage.map_coordinates(source, coords, order=1, mode="constant", cval=0.0, prefilter=False)
    low, high = intensity_range(source, settings.upper_fraction)
    scale = 255.0 / (high - low) if high > low else 1.0
    return Conformed(array=np.floor(np.clip((out - low) * scale, 0.0, 255.0)).astype(np.float32), affine=grid)


def intensity_range(source: NDArray[np.float32], upper_fraction: float) -> tuple[float, float]:
    """(minimum, value below which all but (1 - upper_fraction) of the non-zero voxels lie), from a histogram."""
    low, high = float(source.min()), float(source.max())
    if high <= low:
        return low, high
    counts, _ = np.histogram(source, bins=_HISTOGRAM_BINS, range=(low, high))
    cumulative = np.cumsum(counts)
    non_zero = int(np.count_nonzero(np.abs(source) >= 1e-15))
    wanted = source.size - int((1.0 - upper_fraction) * non_zero)
    index = int(np.searchsorted(cumulative[1:], wanted))  # first bin whose successor reaches the count
    return low, low + min(index, _HISTOGRAM_BINS - 1) * (high - low) / _HISTOGRAM_BINS


def crop_box(normalised: NDArray[np.float32], settings: ConformSettings) -> tuple[slice, slice, slice]:
    """Box of the voxels above crop_threshold, widened by crop_padding voxels and kept inside the grid."""
    above = normalised > settings.crop_threshold
    if not above.any():
        above = normalised > 0
    if not above.any():
        return (slice(0, 0), slice(0, 0), slice(0, 0))
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(above.any(axis=other))
        start = max(0, int(present[0]) - settings.crop_padding)
        stop = min(normalised.shape[axis], int(present[-1]) + 1 + settings.crop_padding)
        box.append(slice(start, stop))
    return box[0], box[1], box[2]


def keep_largest_components(labels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Each non-zero label reduced to its largest 26-connected component."""
    result = np.zeros_like(labels)
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in np.unique(labels[labels > 0]):
        components, count = ndimage.label(labels == value, structure=structure)
        if count:
            sizes = np.bincount(components.ravel())[1:]
            result[components == int(np.argmax(sizes)) + 1] = value
    return result


def on_source(
    grid_labels: NDArray[np.uint8],
    grid_affine: NDArray[np.float64],
    affine_lps: NDArray[np.float64],
    shape: tuple[int, ...],
) -> NDArray[np.uint8]:
    """Nearest conformed label for each source voxel (slice, row, column); 0 outside the conformed grid."""
    to_grid = np.linalg.inv(grid_affine) @ affine_lps
    rows, columns = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    in_plane = to_grid[:3, 1, None, None] * rows + to_grid[:3, 2, None, None] * columns + to_grid[:3, 3, None, None]
    labels = np.zeros(shape, dtype=np.uint8)
    upper = np.asarray(grid_labels.shape)[:, None, None]
    for s in range(shape[0]):
        index = np.floor(in_plane + to_grid[:3, 0, None, None] * s + 0.5).astype(np.intp)
        inside = np.all((index >= 0) & (index < upper), axis=0)
        labels[s][inside] = grid_labels[index[0][inside], index[1][inside], index[2][inside]]
    return labels


def segment(
    network: torch.nn.Module,
    device: torch.device,
    array: NDArray[np.float32],
    affine_lps: NDArray[np.float64],
    settings: ConformSettings,
    *,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> NDArray[np.uint8]:
    """Label map shaped like `array` (slice, row, column): conform, normalise, crop, argmax, clean, map back.

    `forward`: runs the network on the cropped input instead of `network` itself (e.g. to keep a layer's features
    from the same pass, models/meshnet_ood.py)."""
    started = time.monotonic()
    conformed = conform(array, affine_lps, settings)
    low, high = float(conformed.array.min()), float(conformed.array.max())
    normalised = (conformed.array - low) / (high - low) if high > low else np.zeros_like(conformed.array)
    box = crop_box(normalised, settings)
    grid_labels = np.zeros(conformed.array.shape, dtype=np.uint8)
    if all(part.stop > part.start for part in box):
        batch = torch.from_numpy(np.ascontiguousarray(normalised[box]))[None, None].to(device)
        with torch.no_grad():
            logits = (forward or network)(batch)
        grid_labels[box] = logits[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
    if settings.largest_component:
        grid_labels = keep_largest_components(grid_labels)
    log.info(
        "MeshNet on a %s box of the conformed grid in %.1f s",
        "x".join(str(part.stop - part.start) for part in box),
        time.monotonic() - started,
    )
    return on_source(grid_labels, conformed.affine, affine_lps, array.shape)
