"""Out-of-distribution score from a model's own features: Mahalanobis distance (Lee et al. 2018).

The features are the output of one module of the network (spec `ood.layer`), moved to (vectors, channels): one vector
per image for a pooled layer (cxr-pneumonia: `avgpool`), one per spatial location for a feature map (ct-organs-tiny:
the UNet bottleneck's convolution before its instance norm, one location per 24 mm cube, locations in the air
around the patient left out). The distance of a vector is its smallest
Mahalanobis distance to the class means under the shared covariance; a series' score is the mean over its vectors.
A score above the stored threshold means the series is not evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers.utils import sliding_window_inference
from numpy.typing import NDArray
from torch.nn import functional

from models.preprocess import check_batch, to_input
from models.registry import LoadedModel, sha256_of
from models.spec import OodSpec, Preprocessing
from pacsai.errors import ModelError

Floats = NDArray[np.float64]
Sink = Callable[[torch.Tensor], None]
SHRINKAGE = 0.05  # covariance ← (1 - s) · covariance + s · mean variance · identity: keeps the inverse stable


@dataclass(frozen=True, slots=True)
class OodStats:
    """Class means (classes, channels), shared precision matrix (channels, channels) and the rejection threshold."""

    means: Floats
    precision: Floats
    threshold: float


def fit(features: Floats, labels: NDArray[np.int64]) -> tuple[Floats, Floats]:
    """Class-conditional means and the precision of the shared (within-class, shrunk) covariance."""
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    covariance = centred.T @ centred / max(len(features) - len(classes), 1)
    target = np.eye(covariance.shape[0]) * float(np.trace(covariance)) / covariance.shape[0]
    return means, np.linalg.inv((1.0 - SHRINKAGE) * covariance + SHRINKAGE * target)


def distances(means: Floats, precision: Floats, features: Floats) -> Floats:
    """Each vector's smallest Mahalanobis distance to a class mean."""
    best = np.full(len(features), np.inf)
    for mean in means:
        centred = features - mean
        best = np.minimum(best, np.einsum("nc,cd,nd->n", centred, precision, centred))
    result: Floats = np.sqrt(np.maximum(best, 0.0))
    return result


def calibrate(scores: Floats, *, reject_fraction: float = 0.05) -> float:
    """The threshold that rejects at most `reject_fraction` of these in-domain scores (score > threshold)."""
    ordered = np.sort(scores)
    keep = int(np.ceil((1.0 - reject_fraction) * len(ordered)))
    return float(ordered[max(keep - 1, 0)])


def save_stats(path: Path, stats: OodStats) -> None:
    with path.open("wb") as stream:
        np.savez(stream, means=stats.means, precision=stats.precision, threshold=np.float64(stats.threshold))


def load_stats(spec: OodSpec) -> OodStats:
    """The statistics file named by the spec, after checking its SHA-256."""
    if not spec.stats.is_file():
        raise ModelError(f"OOD statistics {spec.stats.name} are missing")
    if sha256_of(spec.stats) != spec.stats_sha256.lower():
        raise ModelError(f"OOD statistics {spec.stats.name} do not match their sha256 in spec.yaml")
    with np.load(spec.stats) as data:
        return OodStats(
            means=np.asarray(data["means"], dtype=np.float64),
            precision=np.asarray(data["precision"], dtype=np.float64),
            threshold=float(data["threshold"]),
        )


def flat(output: torch.Tensor) -> torch.Tensor:
    """(batch, channels, *spatial) → (batch · locations, channels), batch-major."""
    return output.detach().float().flatten(2).transpose(1, 2).reshape(-1, output.shape[1]).cpu()


@contextmanager
def captured(model: LoadedModel, layer: str, *, keep_maps: bool = False) -> Iterator[list[torch.Tensor]]:
    """Collect the (vectors, channels) features of `layer` for every forward pass inside the block (with
    `keep_maps`, the (batch, channels, *spatial) maps as they are)."""
    modules = dict(model.module.named_modules())
    if layer not in modules:
        raise ModelError(f"model {model.spec.name}: no layer {layer!r} for the OOD check")
    store: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        store.append(output.detach().float().cpu() if keep_maps else flat(output))

    hook = modules[layer].register_forward_hook(keep)
    try:
        yield store
    finally:
        hook.remove()


@torch.no_grad()
def projection_features(model: LoadedModel, inputs: torch.Tensor, layer: str) -> Floats:
    """Features of a (N, 1, H, W) network input batch: (N · locations, channels)."""
    with captured(model, layer) as store:
        model.module(inputs.to(model.device))
    return torch.cat(store).to(torch.float64).numpy()


class BodyFeatures:
    """A sliding-window predictor that runs the network and hands each window batch's `spec.layer` features to
    `sink` as (vectors, channels), batch-major; with `spec.body_above`, only the locations whose input patch lies at
    least `min_body_fraction` above that value (inside the body): the air around a patient looks alike in every CT
    and would dilute the score. Use inside `captured(model, spec.layer, keep_maps=True)`, whose store it reads."""

    def __init__(self, model: LoadedModel, spec: OodSpec, store: list[torch.Tensor], sink: Sink) -> None:
        self.model, self.spec, self.store, self.sink = model, spec, store, sink

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        self.store.clear()
        output: torch.Tensor = self.model.module(window)
        (maps,) = self.store
        vectors = flat(maps)
        if self.spec.body_above is not None:
            inside = (window > self.spec.body_above).float()
            grid = tuple(int(n) for n in maps.shape[2:])
            fraction = functional.adaptive_avg_pool3d(inside, (grid[0], grid[1], grid[2])).reshape(-1).cpu()
            vectors = vectors[fraction >= self.spec.min_body_fraction]
        self.store.clear()
        self.sink(vectors)
        return output


class VolumeScore:
    """A volume's OOD score summed window batch by window batch (`add`, a BodyFeatures sink): no feature kept."""

    def __init__(self, stats: OodStats) -> None:
        self.stats = stats
        self.total, self.count = 0.0, 0

    def add(self, vectors: torch.Tensor) -> None:
        if len(vectors):
            found = distances(self.stats.means, self.stats.precision, vectors.to(torch.float64).numpy())
            self.total += float(found.sum())
            self.count += len(found)

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def result(self) -> tuple[float, float]:
        """(score, threshold) as `score` gives them: infinite when no location was kept (no body)."""
        return (self.total / self.count if self.count else float("inf")), self.stats.threshold


@torch.no_grad()
def volume_features(
    model: LoadedModel, prepared: torch.Tensor, pre: Preprocessing, spec: OodSpec, *, overlap: float = 0.0
) -> Floats:
    """Features of a prepared (1, x, y, z) volume over sliding windows (BodyFeatures), as in-body locations.

    The worker scores the windows of its own inference pass instead (infer.segment with a VolumeScore)."""
    vectors: list[torch.Tensor] = []
    with captured(model, spec.layer, keep_maps=True) as store:
        sliding_window_inference(
            torch.as_tensor(prepared)[None].to(model.device, dtype=torch.float32),
            roi_size=pre.roi_size,
            sw_batch_size=pre.sw_batch_size,
            predictor=BodyFeatures(model, spec, store, vectors.append),
            overlap=overlap,
            device=torch.device("cpu"),
        )
    result: Floats = torch.cat(vectors).to(torch.float64).numpy()
    return result


def score(stats: OodStats, features: Floats) -> float:
    """A series' OOD score: the mean of its feature vectors' distances (infinite when none was kept: no body)."""
    if not len(features):
        return float("inf")
    return float(distances(stats.means, stats.precision, features).mean())


def projection_scores(model: LoadedModel, stats: OodStats, layer: str, grey: NDArray[np.uint8]) -> Floats:
    """One OOD score per prepared (N, H, W) uint8 image, from the same network input the classifier sees."""
    pre = check_batch(model, grey)
    chunks = [projection_features(model, to_input(grey[i : i + 256], pre), layer) for i in range(0, len(grey), 256)]
    return distances(stats.means, stats.precision, np.concatenate(chunks))


def ood_score(
    model: LoadedModel, *, grey: NDArray[np.uint8] | None = None, prepared: torch.Tensor | None = None
) -> tuple[float, float] | None:
    """(score, threshold) of one prepared image (`grey`, H x W) or volume (`prepared`); None: the spec has no OOD."""
    spec = model.spec.ood
    if spec is None:
        return None
    stats = load_stats(spec)
    if grey is not None:
        return float(projection_scores(model, stats, spec.layer, grey[None])[0]), stats.threshold
    if prepared is None:
        raise ModelError("ood_score needs an image or a volume")
    return score(stats, volume_features(model, prepared, model.spec.preprocessing, spec)), stats.threshold
