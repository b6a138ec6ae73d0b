"""Step 6 (classification): ProjectionImage → probability, decision and Grad-CAM heat-map; no file or network I/O."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from models.registry import LoadedModel
from models.spec import ClassificationSpec, Code, ModelSpec, ProjectionPreprocessing
from worker.errors import ModelError
from worker.load_image import ProjectionImage

log = logging.getLogger(__name__)
_BATCH = 256


@dataclass(frozen=True, slots=True)
class Classification:
    """One image's result for the model's finding.

    `probability` is sigmoid(logit); `present` is probability >= threshold. `heatmap` is the Grad-CAM of the finding's
    logit on the source pixel grid (rows, columns of the DICOM image), scaled to 0..1 by its own maximum (all 0 when
    nothing speaks for the finding) and 0 outside the centred square the model saw.
    """

    finding: Code
    probability: float
    threshold: float
    present: bool
    heatmap: NDArray[np.float32]


def classification_spec(spec: ModelSpec) -> ClassificationSpec:
    """The spec's classification block; a ModelError for a model that does not classify."""
    if spec.classification is None:
        raise ModelError(f"model {spec.name} is not a classification model")
    return spec.classification


def to_input(grey: NDArray[np.uint8], pre: ProjectionPreprocessing) -> torch.Tensor:
    """(N, H, W) grey values 0..255 → (N, 1, H, W) float32 network input (grey / 255 - mean) / std."""
    scaled = torch.tensor(grey, dtype=torch.float32) / 255.0
    return ((scaled - pre.mean) / pre.std)[:, None]


@torch.no_grad()
def probabilities(model: LoadedModel, grey: NDArray[np.uint8]) -> NDArray[np.float64]:
    """sigmoid(logit) for each prepared image of a (N, H, W) uint8 batch; the evaluation uses this too."""
    pre = classification_spec(model.spec).preprocessing
    if grey.ndim != 3 or grey.shape[1:] != pre.input_size or grey.dtype != np.uint8:
        raise ModelError(f"model {model.spec.name}: input is {grey.dtype} {grey.shape}, expected uint8 "
                         f"(N, {pre.input_size[0]}, {pre.input_size[1]})")
    chunks = [torch.sigmoid(_logits(model, to_input(grey[i:i + _BATCH], pre)).cpu())
              for i in range(0, len(grey), _BATCH)]
    return torch.cat(chunks).to(torch.float64).numpy() if chunks else np.zeros(0)


def classify(model: LoadedModel, image: ProjectionImage) -> Classification:
    """Probability and decision for the finding, with a Grad-CAM heat-map mapped back onto the source grid."""
    started = time.monotonic()
    spec = classification_spec(model.spec)
    logit, cam = grad_cam(model, to_input(image.network_grey[None], spec.preprocessing), spec.cam_layer)
    probability = float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64)))
    heatmap = to_source_grid(cam, image)
    log.info("classified one %dx%d image with %s in %.2f s", *image.grey.shape, model.spec.name,
             time.monotonic() - started)
    return Classification(finding=spec.finding, probability=probability, threshold=spec.threshold,
                          present=probability >= spec.threshold, heatmap=heatmap)


def grad_cam(model: LoadedModel, inputs: torch.Tensor, layer_name: str) -> tuple[float, NDArray[np.float32]]:
    """The logit of a (1, 1, H, W) input and its Grad-CAM at `layer_name`'s resolution, scaled to 0..1.

    Grad-CAM (Selvaraju et al. 2017): ReLU of the layer's channels weighted by the spatial mean of the logit's
    gradient with respect to them.
    """
    layers = dict(model.module.named_modules())
    if layer_name not in layers:
        raise ModelError(f"model {model.spec.name}: no layer {layer_name!r} for Grad-CAM")
    captured: list[torch.Tensor] = []
    hook = layers[layer_name].register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        with torch.enable_grad():
            logit = _logits(model, inputs.requires_grad_(True))[0]
            (gradient,) = torch.autograd.grad(logit, captured[0])
    finally:
        hook.remove()
    activation = captured[0].detach()
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1))[0]
    peak = float(cam.max())
    scaled = cam / peak if peak > 0 else torch.zeros_like(cam)
    return float(logit.detach()), scaled.cpu().numpy().astype(np.float32)


def to_source_grid(cam: NDArray[np.float32], image: ProjectionImage) -> NDArray[np.float32]:
    """Stretch the CAM (bilinear, pixel centres aligned) over the centred square; 0 elsewhere on the source grid."""
    top, left, side = image.square
    stretched = torch.nn.functional.interpolate(torch.from_numpy(cam)[None, None], size=(side, side),
                                                mode="bilinear", align_corners=False)[0, 0]
    heatmap = np.zeros(image.grey.shape, dtype=np.float32)
    heatmap[top:top + side, left:left + side] = stretched.clamp(0.0, 1.0).numpy()
    return heatmap


def _logits(model: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    """(N,) logits of the network's single output channel."""
    output: torch.Tensor = model.module(inputs.to(model.device))
    if output.ndim != 2 or output.shape[1] != 1:
        raise ModelError(f"model {model.spec.name}: network output is {tuple(output.shape)}, expected (N, 1)")
    return output[:, 0]
