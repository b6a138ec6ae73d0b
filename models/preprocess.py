"""Preprocessing shared by training, evaluation and inference: one implementation of each step, used by all three.

Projection (cxr): displayed 8-bit grey → centred square → resized to the input size → (grey / 255 - mean) / std.
Volume (ct): (slice, row, column) LPS array → RAS MetaTensor → the spec's spacing → intensity window scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.transforms.intensity.array import ScaleIntensityRange
from monai.transforms.spatial.array import Orientation, Spacing
from numpy.typing import NDArray
from PIL import Image

from models.registry import LoadedModel
from models.spec import ClassificationSpec, ModelSpec, Preprocessing, ProjectionPreprocessing, Resample
from pacsai.errors import ModelError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # world axes of the affine: towards R, A, S
_BATCH = 256
_FILTERS = {
    Resample.BICUBIC: Image.Resampling.BICUBIC,
    Resample.BILINEAR: Image.Resampling.BILINEAR,
    Resample.BOX: Image.Resampling.BOX,
}


def classification_spec(spec: ModelSpec) -> ClassificationSpec:
    """The spec's classification block; a ModelError for a model that does not classify."""
    if spec.classification is None:
        raise ModelError(f"model {spec.name} is not a classification model")
    return spec.classification


def centre_square(rows: int, columns: int) -> tuple[int, int, int]:
    """(top, left, side) of the centred square whose side is the short edge; an odd excess leaves 1 more after it."""
    side = min(rows, columns)
    return (rows - side) // 2, (columns - side) // 2, side


def shrink_square(grey: NDArray[np.uint8], pre: ProjectionPreprocessing) -> NDArray[np.uint8]:
    """The centred square of a displayed uint8 image resized to the spec's input size (rows, columns)."""
    top, left, side = centre_square(*grey.shape)
    crop = Image.fromarray(np.ascontiguousarray(grey[top : top + side, left : left + side]))
    rows, columns = pre.input_size
    return np.asarray(crop.resize((columns, rows), resample=_FILTERS[pre.resample]), dtype=np.uint8)


def to_input(grey: NDArray[np.uint8], pre: ProjectionPreprocessing) -> torch.Tensor:
    """(N, H, W) grey values 0..255 → (N, 1, H, W) float32 network input (grey / 255 - mean) / std."""
    scaled = torch.tensor(grey, dtype=torch.float32) / 255.0
    return ((scaled - pre.mean) / pre.std)[:, None]


def check_batch(model: LoadedModel, grey: NDArray[np.uint8]) -> ProjectionPreprocessing:
    """The projection preprocessing, after checking `grey` is a (N, rows, columns) uint8 batch of the input size."""
    pre = classification_spec(model.spec).preprocessing
    if grey.ndim != 3 or grey.shape[1:] != pre.input_size or grey.dtype != np.uint8:
        raise ModelError(
            f"model {model.spec.name}: input is {grey.dtype} {grey.shape}, expected uint8 "
            f"(N, {pre.input_size[0]}, {pre.input_size[1]})"
        )
    return pre


@torch.no_grad()
def probabilities(model: LoadedModel, grey: NDArray[np.uint8]) -> NDArray[np.float64]:
    """sigmoid(logit) for each prepared image of a (N, H, W) uint8 batch; training, evaluation and worker use this."""
    pre = check_batch(model, grey)
    chunks = [
        torch.sigmoid(logits(model, to_input(grey[i : i + _BATCH], pre)).cpu()) for i in range(0, len(grey), _BATCH)
    ]
    return torch.cat(chunks).to(torch.float64).numpy() if chunks else np.zeros(0)


def logits(model: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    """(N,) logits of the network's single output channel."""
    output: torch.Tensor = model.module(inputs.to(model.device))
    if output.ndim != 2 or output.shape[1] != 1:
        raise ModelError(f"model {model.spec.name}: network output is {tuple(output.shape)}, expected (N, 1)")
    return output[:, 0]


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
    scaled = ScaleIntensityRange(a_min=pre.intensity_min, a_max=pre.intensity_max, b_min=0.0, b_max=1.0, clip=True)(
        image
    )
    if not isinstance(scaled, MetaTensor):
        raise ModelError("intensity scaling lost the image geometry")
    return scaled
