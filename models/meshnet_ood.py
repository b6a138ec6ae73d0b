"""Out-of-distribution score of a MeshNet (mr-brain-mindgrab) from its own features, on brainchop's conformed input.

Features: the output of hidden layer `layer` (after its normalisation and GELU; layer 1 is the second of the 25
dilated convolutions, receptive field 49 mm), averaged over cubes of `pool` voxels (mm); only the cubes whose input is
mostly head (at least `min_body_fraction` of the voxels above `body_above` on the [0, 1] input) are kept, so the
empty conformed grid around the head does not count. The score is volume-level: the Mahalanobis distance (models/ood.py)
of the mean of those vectors to the in-domain mean, under the covariance of single in-domain vectors. (Each layer's
instance normalisation makes every volume's own vectors look alike; where their mean lies inside the head is what
tells a head MR from a CT or a body MR.) Above the stored threshold the series is not evaluated.

The layer's features are the same whether the network stops there (`volume_score`, a cheap check before inference:
2 of 26 layers) or runs to the end (`segment_with_score`, one forward pass for both). Settings come from the spec's
`network_args.ood` block (layer, stats, stats_sha256, pool, body_above, min_body_fraction).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn import functional

from models import conform, ood
from models.meshnet import NORM_EPSILON, MeshNet
from models.registry import LoadedModel
from models.spec import OodSpec
from pacsai.errors import ModelError

Floats = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class MeshnetOod:
    """`network_args.ood` of a meshnet.tfjs spec."""

    layer: int
    stats: OodSpec
    pool: int = 8
    body_above: float = 0.1
    min_body_fraction: float = 0.5

    @classmethod
    def from_args(cls, folder: Path, args: Mapping[str, Any]) -> MeshnetOod:
        return cls(
            layer=int(args["layer"]),
            stats=OodSpec(
                layer=f"layer {args['layer']}",
                stats=folder / str(args["stats"]),
                stats_sha256=str(args["stats_sha256"]),
            ),
            pool=int(args.get("pool", 8)),
            body_above=float(args.get("body_above", 0.1)),
            min_body_fraction=float(args.get("min_body_fraction", 0.5)),
        )


def settings_of(model: LoadedModel) -> MeshnetOod | None:
    """The model's MeshNet OOD settings; None when its spec has no `network_args.ood`."""
    raw = model.spec.network_args.get("ood")
    return None if raw is None else MeshnetOod.from_args(model.spec.weights.parent, raw)


def network_of(model: LoadedModel) -> MeshNet:
    if not isinstance(model.module, MeshNet):
        raise ModelError(f"model {model.spec.name} is not a MeshNet")
    return model.module


def step(network: MeshNet, index: int, x: torch.Tensor) -> torch.Tensor:
    """Layer `index` of the chain, as MeshNet.forward runs it."""
    x = network.convs[index](x)
    if network.layers[index].normalise:
        x = functional.instance_norm(x, eps=NORM_EPSILON)
    activation: nn.Module = network.activations[index]
    result: torch.Tensor = activation(x)
    return result


def pooled(features: torch.Tensor, batch: torch.Tensor, settings: MeshnetOod) -> Floats:
    """(locations inside the head, channels) of a (1, C, D, H, W) feature map and its (1, 1, D, H, W) input."""
    size = settings.pool
    vectors = functional.avg_pool3d(features.float(), size, ceil_mode=True)
    inside = functional.avg_pool3d((batch > settings.body_above).float(), size, ceil_mode=True)
    keep = inside.reshape(-1) >= settings.min_body_fraction
    flat = vectors.flatten(2)[0].transpose(0, 1)
    result: Floats = flat[keep].to(torch.float64).cpu().numpy()
    return result


@torch.no_grad()
def features(network: MeshNet, batch: torch.Tensor, settings: MeshnetOod) -> Floats:
    """Pooled features of layer `settings.layer` for a network input, running the chain only that far."""
    x = batch
    for index in range(settings.layer + 1):
        x = step(network, index, x)
    return pooled(x, batch, settings)


def score(stats: ood.OodStats, vectors: Floats) -> float:
    """Mahalanobis distance of the vectors' mean to the in-domain mean; infinite when no location is inside a head."""
    if not len(vectors):
        return float("inf")
    return float(ood.distances(stats.means, stats.precision, vectors.mean(axis=0, keepdims=True))[0])


def conformed_batch(
    array: NDArray[np.float32], affine_lps: NDArray[np.float64], settings: conform.ConformSettings
) -> torch.Tensor:
    """The network input brainchop makes of a volume: conformed, min-max normalised, cropped (1, 1, D, H, W)."""
    conformed = conform.conform(array, affine_lps, settings)
    low, high = float(conformed.array.min()), float(conformed.array.max())
    normalised = (conformed.array - low) / (high - low) if high > low else np.zeros_like(conformed.array)
    box = conform.crop_box(normalised, settings)
    return torch.from_numpy(np.ascontiguousarray(normalised[box]))[None, None]


def volume_features(model: LoadedModel, array: NDArray[np.float32], affine_lps: NDArray[np.float64]) -> Floats:
    """Pooled features of a source volume (slice, row, column) with its LPS affine: the cheap check's input."""
    settings = settings_of(model)
    if settings is None:
        raise ModelError(f"model {model.spec.name} has no network_args.ood")
    grid = conform.ConformSettings.from_args(model.spec.network_args.get("conform", {}))
    batch = conformed_batch(array, affine_lps, grid).to(model.device)
    return features(network_of(model), batch, settings)


def volume_score(
    model: LoadedModel, array: NDArray[np.float32], affine_lps: NDArray[np.float64]
) -> tuple[float, float] | None:
    """(score, threshold) of a source volume before inference; None when the spec has no `network_args.ood`."""
    settings = settings_of(model)
    if settings is None:
        return None
    stats = ood.load_stats(settings.stats)
    return score(stats, volume_features(model, array, affine_lps)), stats.threshold


def segment_with_score(
    model: LoadedModel, array: NDArray[np.float32], affine_lps: NDArray[np.float64]
) -> tuple[NDArray[np.uint8], tuple[float, float] | None]:
    """conform.segment's label map and the OOD (score, threshold) from the same forward pass (None: no OOD spec)."""
    settings = settings_of(model)
    network = network_of(model)
    grid = conform.ConformSettings.from_args(model.spec.network_args.get("conform", {}))
    if settings is None:
        return conform.segment(network, model.device, array, affine_lps, grid), None
    collected: list[Floats] = []

    def forward(batch: torch.Tensor) -> torch.Tensor:
        x = batch
        for index in range(len(network.layers)):
            x = step(network, index, x)
            if index == settings.layer:
                collected.append(pooled(x, batch, settings))
        return x

    labels = conform.segment(network, model.device, array, affine_lps, grid, forward=forward)
    stats = ood.load_stats(settings.stats)
    vectors = collected[0] if collected else np.zeros((0, 1))
    return labels, (score(stats, vectors), stats.threshold)
