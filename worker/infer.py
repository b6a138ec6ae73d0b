"""Step 6: Volume → label map on the same (slice, row, column) grid; pure computation, no file or network I/O."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.inferers.utils import sliding_window_inference
from monai.networks.layers.spatial_transforms import AffineTransform
from monai.transforms.spatial.array import Orientation, Spacing
from numpy.typing import NDArray

from models.ood import BodyFeatures, VolumeScore, captured
from models.preprocess import RAS_LABELS, scale_intensity, to_ras_image
from models.registry import LoadedModel
from models.spec import Preprocessing
from pacsai.errors import ModelError
from worker.resample_axes import resample_along_axes
from worker.volume import Volume, release_freed_memory

log = logging.getLogger(__name__)


def segment(model: LoadedModel, volume: Volume, ood: VolumeScore | None = None) -> NDArray[np.uint8]:
    """Label map shaped like volume.array; network channel k is the spec's label number k (0 is background).

    `ood`: the OOD score to sum from the features of this same inference pass (models/ood.py BodyFeatures over its
    sliding windows; the spec must name an OOD layer)."""
    started = time.monotonic()
    image = to_ras_image(volume.array, volume.affine)  # a view of the volume's array, not a copy
    prepared = prepare(image, model.spec.preprocessing)
    log.info("stage resample: to the network grid in %.2f s", time.monotonic() - started)
    started = time.monotonic()
    channels = _predict(model, prepared, ood)
    log.info("stage forward: sliding-window inference in %.2f s", time.monotonic() - started)
    started = time.monotonic()
    lut = np.zeros(256, dtype=np.uint8)  # channels that are no label of the spec become background
    for label in model.spec.labels:
        lut[label.number] = label.number
    grid_labels = lut[channel_argmax(channels).numpy()]  # on the network grid: cheap
    del channels  # the logits: channels × the network grid in float32
    release_freed_memory()
    labels = map_back(grid_labels, prepared.affine.numpy(), image.affine.numpy(), volume.array.shape)
    log.info("stage labels: argmax and back to the source grid in %.2f s", time.monotonic() - started)
    return labels


def prepare(image: MetaTensor, pre: Preprocessing) -> MetaTensor:
    """models.preprocess.preprocess in one resampling pass on the float32 volume, without copies of it.

    MONAI's Orientation flips a copy of the volume and its Spacing makes more (in float64 by default). Here both
    run lazily, only to compute the target grid (affine and shape) exactly as they would, and one trilinear
    `grid_sample` reads the volume where it lies (MONAI's AffineTransform, as Spacing uses it); when the grid lies
    along the scanner's axes, one linear pass per axis does the same (worker/resample_axes.py). Same grid, same
    values to float32 rounding; the intensity window follows as in preprocess.
    """
    oriented = Orientation(axcodes="RAS", labels=RAS_LABELS, lazy=True)(image)
    pending = Spacing(pixdim=pre.spacing_mm, mode="bilinear", padding_mode="border", lazy=True)(oriented)
    if not isinstance(pending, MetaTensor):
        raise ModelError("resampling lost the image geometry")
    target = pending.peek_pending_affine().to(torch.float64)  # type: ignore[no-untyped-call]
    size = [int(n) for n in pending.peek_pending_shape()]  # type: ignore[no-untyped-call]
    source = image.affine.to(torch.float64)
    to_source = torch.linalg.solve(source, target)  # target voxel → source voxel
    with torch.no_grad():
        along_axes = resample_along_axes(image.as_tensor()[0], to_source, size)  # a grid in the scanner's axes
        if along_axes is not None:
            grid = along_axes[None]
        else:
            resample = AffineTransform(
                normalized=False, mode="bilinear", padding_mode="border", align_corners=False, reverse_indexing=True
            )
            grid = resample(image.as_tensor()[None], theta=to_source.to(torch.float32), spatial_size=size)[0]
    return scale_intensity(MetaTensor(grid, affine=target), pre)


def channel_argmax(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(dim=0)` as uint8 (≤ 256 channels), first channel on ties as argmax: one running maximum over the
    channels, elementwise. torch reduces over the leading axis of a (6, 137, 137, 126) tensor in ~0.4 s on this CPU;
    this takes ~0.04 s (scores are finite: `_predict` refuses NaN and infinities)."""
    best = scores[0].clone()
    labels = torch.zeros(scores.shape[1:], dtype=torch.uint8, device=scores.device)
    for channel in range(1, scores.shape[0]):
        labels.masked_fill_(scores[channel] > best, channel)
        torch.maximum(best, scores[channel], out=best)
    return labels


def _predict(model: LoadedModel, prepared: MetaTensor, ood: VolumeScore | None = None) -> torch.Tensor:
    """Sliding-window logits (channels, x, y, z) on the CPU; AMP only on CUDA.

    W2: out of memory releases the device's cached memory and tries once more with half the window batch; a second
    time is a ModelError (the job fails with that reason; the worker carries on). W7: NaN or infinite scores are a
    ModelError too, since argmax would turn them into labels.
    """
    pre = model.spec.preprocessing
    batch = prepared.as_tensor()[None].to(model.device, dtype=torch.float32)
    logits = _windows(model, batch, pre.sw_batch_size, ood)
    if logits is None:
        smaller = max(1, pre.sw_batch_size // 2)
        log.warning(
            "model %s ran out of memory on %s with sw_batch_size %d; trying once more with %d",
            model.spec.name,
            model.device.type,
            pre.sw_batch_size,
            smaller,
        )
        logits = _windows(model, batch, smaller, ood)
        if logits is None:
            raise ModelError(
                f"model {model.spec.name} ran out of memory on {model.device.type} again with "
                f"sw_batch_size {smaller}; not retried"
            )
    if not isinstance(logits, torch.Tensor):
        raise ModelError(f"model {model.spec.name} returned {type(logits).__name__}, expected one tensor")
    scores = logits[0].float()
    invalid = int((~torch.isfinite(scores)).sum())
    if invalid:
        raise ModelError(
            f"model {model.spec.name} returned NaN or infinite scores for {invalid} of {scores.numel()} "
            "values; no result made"
        )
    return scores


def _windows(model: LoadedModel, batch: torch.Tensor, sw_batch_size: int, ood: VolumeScore | None) -> object | None:
    """One sliding-window pass (summing `ood` anew); None when the device ran out of memory (its cached memory
    released by then)."""
    amp = torch.autocast("cuda", dtype=torch.float16) if model.device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.inference_mode(), amp, _predictor(model, ood) as predictor:
            return sliding_window_inference(
                batch,
                roi_size=model.spec.preprocessing.roi_size,
                sw_batch_size=sw_batch_size,
                predictor=predictor,
                overlap=model.spec.preprocessing.overlap,
                mode="gaussian",
                device=torch.device("cpu"),
            )
    except torch.cuda.OutOfMemoryError:
        pass  # leave the except block first: its traceback holds the tensors whose memory is to be released
    gc.collect()
    torch.cuda.empty_cache()  # device-agnostic: does nothing unless CUDA was initialised
    return None


@contextlib.contextmanager
def _predictor(model: LoadedModel, ood: VolumeScore | None) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The network itself, or with `ood` the network with a hook on the spec's OOD layer feeding the score."""
    if ood is None:
        yield model.module
        return
    if model.spec.ood is None:
        raise ModelError(f"model {model.spec.name} has no OOD layer to score")
    ood.reset()
    with captured(model, model.spec.ood.layer, keep_maps=True) as store:
        yield BodyFeatures(model, model.spec.ood, store, ood.add)


def map_back(
    grid_labels: NDArray[np.uint8],
    grid_affine: NDArray[np.float64],
    source_affine: NDArray[np.float64],
    source_shape: tuple[int, ...],
) -> NDArray[np.uint8]:
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
    labels = np.pad(np.transpose(grid_labels, grid_axis), 1)
    for axis in range(3):  # one axis at a time: each lookup copies rows of bytes, the last one writes the result
        grid = int(grid_axis[axis])
        position = linear[grid, axis] * np.arange(source_shape[axis]) + to_grid[grid, 3]
        index = np.clip(np.floor(position + 0.5).astype(np.intp) + 1, 0, labels.shape[axis] - 1)
        # a new array each time: one kept from the last job (as the volume is) would be resident during the next
        # forward pass, where the worker's memory peaks (+79 MB for 300 x 512², over goal 3's 1.2 GB in bench/e2e.py)
        labels = np.take(labels, index, axis=axis)
    return labels


def _map_back_by_slice(
    grid_labels: NDArray[np.uint8], to_grid: NDArray[np.float64], source_shape: tuple[int, ...]
) -> NDArray[np.uint8]:
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
