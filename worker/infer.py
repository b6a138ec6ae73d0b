"""Step 6: Volume → label map on the same (slice, row, column) grid; pure computation, no file or network I/O."""

from __future__ import annotations

import contextlib
import gc
import logging
import time

import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.inferers.utils import sliding_window_inference
from monai.transforms.intensity.array import ScaleIntensityRange
from monai.transforms.spatial.array import Orientation, Spacing
from numpy.typing import NDArray

from models.registry import LoadedModel
from models.spec import Preprocessing
from worker.errors import ModelError
from worker.volume import Volume

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # world axes of the affine: towards R, A, S


def segment(model: LoadedModel, volume: Volume) -> NDArray[np.uint8]:
    """Label map shaped like volume.array; network channel k is the spec's label number k (0 is background)."""
    started = time.monotonic()
    image = to_ras_image(volume.array, volume.affine)
    prepared = preprocess(image, model.spec.preprocessing)
    channels = _predict(model, prepared)
    grid_labels = channels.argmax(dim=0).to(torch.uint8).numpy()
    labels = map_back(grid_labels, prepared.affine.numpy(), image.affine.numpy(), volume.array.shape)
    lut = np.zeros(256, dtype=np.uint8)
    for label in model.spec.labels:
        lut[label.number] = label.number
    log.info("segmented %d slices with %s in %.1f s", volume.array.shape[0], model.spec.name,
             time.monotonic() - started)
    return lut[labels]


def to_ras_image(array: NDArray[np.float32], affine_lps: NDArray[np.float64]) -> MetaTensor:
    """Channel-first MetaTensor (1, slice, row, column) whose affine maps those voxel indices to RAS mm."""
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return MetaTensor(data, affine=torch.as_tensor(LPS_TO_RAS @ affine_lps, dtype=torch.float64))


def preprocess(image: MetaTensor, pre: Preprocessing) -> MetaTensor:
    """RAS axis order, the spec's spacing (trilinear), intensity window scaled to [0, 1] (clipped)."""
    return scale_intensity(resample(image, pre.spacing_mm, mode="bilinear"), pre)


def resample(image: MetaTensor, spacing_mm: tuple[float, float, float], *, mode: str) -> MetaTensor:
    """Reorder axes to RAS (no interpolation), then resample to spacing_mm ("bilinear" or "nearest")."""
    oriented = Orientation(axcodes="RAS", labels=RAS_LABELS)(image)
    resampled = Spacing(pixdim=spacing_mm, mode=mode, padding_mode="border")(oriented)
    if not isinstance(resampled, MetaTensor):
        raise ModelError("resampling lost the image geometry")
    return resampled


def scale_intensity(image: MetaTensor, pre: Preprocessing) -> MetaTensor:
    """Map [intensity_min, intensity_max] to [0, 1], clipping outside values."""
    scaled = ScaleIntensityRange(a_min=pre.intensity_min, a_max=pre.intensity_max, b_min=0.0, b_max=1.0,
                                 clip=True)(image)
    if not isinstance(scaled, MetaTensor):
        raise ModelError("intensity scaling lost the image geometry")
    return scaled


def _predict(model: LoadedModel, prepared: MetaTensor) -> torch.Tensor:
    """Sliding-window logits (channels, x, y, z) on the CPU; AMP only on CUDA.

    W2: out of memory releases the device's cached memory and tries once more with half the window batch; a second
    time is a ModelError (the job fails with that reason; the worker carries on). W7: NaN or infinite scores are a
    ModelError too, since argmax would turn them into labels.
    """
    pre = model.spec.preprocessing
    batch = prepared.as_tensor()[None].to(model.device, dtype=torch.float32)
    logits = _windows(model, batch, pre.sw_batch_size)
    if logits is None:
        smaller = max(1, pre.sw_batch_size // 2)
        log.warning("model %s ran out of memory on %s with sw_batch_size %d; trying once more with %d",
                    model.spec.name, model.device.type, pre.sw_batch_size, smaller)
        logits = _windows(model, batch, smaller)
        if logits is None:
            raise ModelError(f"model {model.spec.name} ran out of memory on {model.device.type} again with "
                             f"sw_batch_size {smaller}; not retried")
    if not isinstance(logits, torch.Tensor):
        raise ModelError(f"model {model.spec.name} returned {type(logits).__name__}, expected one tensor")
    scores = logits[0].float()
    invalid = int((~torch.isfinite(scores)).sum())
    if invalid:
        raise ModelError(f"model {model.spec.name} returned NaN or infinite scores for {invalid} of {scores.numel()} "
                         "values; no result made")
    return scores


def _windows(model: LoadedModel, batch: torch.Tensor, sw_batch_size: int) -> object | None:
    """One sliding-window pass; None when the device ran out of memory (its cached memory released by then)."""
    amp = torch.autocast("cuda", dtype=torch.float16) if model.device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.no_grad(), amp:
            return sliding_window_inference(batch, roi_size=model.spec.preprocessing.roi_size,
                                            sw_batch_size=sw_batch_size, predictor=model.module,
                                            overlap=model.spec.preprocessing.overlap, mode="gaussian",
                                            device=torch.device("cpu"))
    except torch.cuda.OutOfMemoryError:
        pass    # leave the except block first: its traceback holds the tensors whose memory is to be released
    gc.collect()
    torch.cuda.empty_cache()    # device-agnostic: does nothing unless CUDA was initialised
    return None


def map_back(grid_labels: NDArray[np.uint8], grid_affine: NDArray[np.float64], source_affine: NDArray[np.float64],
             source_shape: tuple[int, ...]) -> NDArray[np.uint8]:
    """Nearest-neighbour labels on the source grid; voxels outside the network grid get 0.

    Orientation only permutes/flips axes and Spacing only rescales them, so for an orthogonal source grid source
    axis a maps to one grid axis and index i there to round(scale * i + offset): a separable lookup, exact and
    cheap in memory. A sheared source (gantry tilt) was resampled onto an orthogonal grid with the full affine
    (MONAI's Spacing keeps rotation, drops shear); its voxels are looked up one slice at a time.
    """
    to_grid = np.linalg.inv(grid_affine) @ source_affine
    linear = to_grid[:3, :3]
    grid_axis = np.argmax(np.abs(linear), axis=0)
    on_axis = np.abs(linear[grid_axis, np.arange(3)])
    off_axis = np.abs(linear).sum(axis=0) - on_axis
    if sorted(grid_axis.tolist()) != [0, 1, 2] or np.any(off_axis > 1e-6 * on_axis):
        return _map_back_by_slice(grid_labels, to_grid, source_shape)
    padded = np.pad(np.transpose(grid_labels, grid_axis), 1)
    indices = []
    for axis in range(3):
        grid = int(grid_axis[axis])
        position = linear[grid, axis] * np.arange(source_shape[axis]) + to_grid[grid, 3]
        index = np.floor(position + 0.5).astype(np.intp) + 1
        indices.append(np.clip(index, 0, padded.shape[axis] - 1))
    return np.ascontiguousarray(padded[np.ix_(*indices)])


def _map_back_by_slice(grid_labels: NDArray[np.uint8], to_grid: NDArray[np.float64],
                       source_shape: tuple[int, ...]) -> NDArray[np.uint8]:
    """General affine lookup: each source voxel (slice, row, column) → nearest grid voxel, 0 outside the grid."""
    rows, columns = np.meshgrid(np.arange(source_shape[1]), np.arange(source_shape[2]), indexing="ij")
    in_plane = to_grid[:3, 1, None, None] * rows + to_grid[:3, 2, None, None] * columns
    labels = np.zeros(tuple(source_shape), dtype=np.uint8)
    upper = np.asarray(grid_labels.shape)[:, None, None]
    for k in range(source_shape[0]):
        index = np.floor(in_plane + (to_grid[:3, 0] * k + to_grid[:3, 3])[:, None, None] + 0.5).astype(np.intp)
        inside = np.all((index >= 0) & (index < upper), axis=0)
        labels[k][inside] = grid_labels[index[0][inside], index[1][inside], index[2][inside]]
    return labels
