"""Step 6 (classification): ProjectionImage → probability, decision and Grad-CAM heat-map; no file or network I/O."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from models.preprocess import classification_spec, logits, to_input
from models.registry import LoadedModel
from models.spec import Code
from pacsai.errors import ModelError
from worker.load_image import ProjectionImage

log = logging.getLogger(__name__)


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


def classify(model: LoadedModel, image: ProjectionImage) -> Classification:
    """Probability and decision for the finding, with a Grad-CAM heat-map mapped back onto the source grid."""
    started = time.monotonic()
    spec = classification_spec(model.spec)
    logit, cam = grad_cam(model, to_input(image.network_grey[None], spec.preprocessing), spec.cam_layer)
    probability = float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64)))
    heatmap = to_source_grid(cam, image)
    log.info(
        "classified one %dx%d image with %s in %.2f s", *image.grey.shape, model.spec.name, time.monotonic() - started
    )
    return Classification(
        finding=spec.finding,
        probability=probability,
        threshold=spec.threshold,
        present=probability >= spec.threshold,
        heatmap=heatmap,
    )


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
            logit = logits(model, inputs.requires_grad_(True))[0]
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
    stretched = torch.nn.functional.interpolate(
        torch.from_numpy(cam)[None, None], size=(side, side), mode="bilinear", align_corners=False
    )[0, 0]
    heatmap = np.zeros(image.grey.shape, dtype=np.float32)
    heatmap[top : top + side, left : left + side] = stretched.clamp(0.0, 1.0).numpy()
    return heatmap
