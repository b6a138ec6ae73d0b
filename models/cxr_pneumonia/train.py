"""Train cxr-pneumonia: seeded CPU training of a quarter-width 2D ResNet-18 on the official PneumoniaMNIST train split.

Run from the repository root:  .venv/bin/python -m models.cxr_pneumonia.train [--data DIR]
Writes model.pt next to this file, then writes its SHA-256 and the decision threshold (chosen on the validation split
only, by Youden's J) into spec.yaml. The test split is never read here; evaluate.py scores it.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from models import networks
from models.preprocess import probabilities
from models.registry import LoadedModel, sha256_of
from models.spec import ModelSpec

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "train-data" / "pneumoniamnist"
BALANCED = "pneumoniamnist_balanced_aksufatih.npz"  # holds all 1214 official train normals
VARUN = "pneumoniamnist_varun19424.npz"  # holds all 3494 official train pneumonias, the official val and test


@dataclass(frozen=True, slots=True)
class Split:
    """Images (N, 28, 28) uint8 as MedMNIST ships them, and labels (N,) with 1 = pneumonia."""

    images: NDArray[np.uint8]
    labels: NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Recipe:
    """Training hyper-parameters; the defaults made the shipped weights."""

    epochs: int = 30
    batch: int = 128
    max_lr: float = 3e-3
    weight_decay: float = 5e-4
    rotation_deg: float = 10.0
    zoom: float = 0.10  # ± relative
    shift: float = 0.10  # ± fraction of the half-width (≈ 1.4 pixels at 28)
    contrast: float = 0.20  # ± relative, about the image mean
    brightness: float = 0.10  # ± on the 0..1 scale
    gamma_log: float = 0.20  # gamma = exp(±0.2)


def load_split(data_dir: Path, split: str) -> Split:
    """The official split: train = normals from the balanced file + pneumonias from varun19424 (4708: 1214/3494);
    val (524) and test (624) come from varun19424 unchanged."""
    varun = np.load(data_dir / VARUN)
    if split in ("val", "test"):
        return Split(np.asarray(varun[f"{split}_images"], np.uint8), varun[f"{split}_labels"][:, 0].astype(np.int64))
    if split != "train":
        raise ValueError(f"unknown split {split!r}")
    balanced = np.load(data_dir / BALANCED)
    normals = balanced["train_images"][balanced["train_labels"][:, 0] == 0]
    pneumonias = varun["train_images"][varun["train_labels"][:, 0] == 1]
    images = np.concatenate([normals, pneumonias]).astype(np.uint8)
    labels = np.concatenate([np.zeros(len(normals)), np.ones(len(pneumonias))]).astype(np.int64)
    return Split(images, labels)


def augment(batch: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, zoom and shift (bilinear, border padding), then contrast, brightness and gamma; 0..1 in/out."""
    n = batch.shape[0]

    def uniform(half_width: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2.0 - 1.0) * half_width

    angle = uniform(math.radians(recipe.rotation_deg))
    scale = 1.0 + uniform(recipe.zoom)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, 0, 2] = uniform(recipe.shift)
    theta[:, 1, 2] = uniform(recipe.shift)
    grid = torch.nn.functional.affine_grid(theta, list(batch.shape), align_corners=False)
    moved = torch.nn.functional.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = (1.0 + uniform(recipe.contrast)).view(n, 1, 1, 1)
    brightness = uniform(recipe.brightness).view(n, 1, 1, 1)
    mean = moved.mean(dim=(2, 3), keepdim=True)
    adjusted = ((moved - mean) * contrast + mean + brightness).clamp(1e-4, 1.0)
    return adjusted ** torch.exp(uniform(recipe.gamma_log)).view(n, 1, 1, 1)


def train(spec: ModelSpec, data: Split, recipe: Recipe, *, seed: int) -> torch.nn.Module:
    """Seeded AdamW on class-weighted BCE (pos_weight = normals / pneumonias) with a one-cycle learning rate."""
    if spec.classification is None:
        raise SystemExit(f"model {spec.name} is not a classification model")
    pre = spec.classification.preprocessing
    generator = torch.Generator().manual_seed(seed)
    grey = torch.from_numpy(data.images).to(torch.float32)[:, None] / 255.0
    targets = torch.from_numpy(data.labels).to(torch.float32)
    net = networks.build(spec.network, spec.network_args)
    optimiser = torch.optim.AdamW(net.parameters(), lr=recipe.max_lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(targets) / recipe.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=recipe.max_lr, pct_start=0.15, total_steps=recipe.epochs * steps_per_epoch
    )
    pos_weight = torch.tensor(float((data.labels == 0).sum()) / float((data.labels == 1).sum()))
    started = time.monotonic()
    for epoch in range(1, recipe.epochs + 1):
        net.train()
        order, running = torch.randperm(len(targets), generator=generator), 0.0
        for start in range(0, len(targets), recipe.batch):
            index = order[start : start + recipe.batch]
            inputs = (augment(grey[index], recipe, generator) - pre.mean) / pre.std
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                net(inputs)[:, 0], targets[index], pos_weight=pos_weight
            )
            optimiser.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimiser.step()
            schedule.step()
            running += loss.item() * len(index)
        print(
            f"epoch {epoch}/{recipe.epochs}  loss {running / len(targets):.4f}  {time.monotonic() - started:.0f} s",
            flush=True,
        )
    return net.eval()


def youden_threshold(scores: NDArray[np.float64], labels: NDArray[np.int64]) -> float:
    """Threshold maximising sensitivity + specificity, at the midpoint between two neighbouring distinct scores.

    Ties go to the lowest such threshold. `score >= threshold` counts as positive.
    """
    distinct = np.unique(scores)
    candidates = (distinct[:-1] + distinct[1:]) / 2.0
    positives, negatives = scores[labels == 1], scores[labels == 0]
    sensitivity = (positives[None, :] >= candidates[:, None]).mean(axis=1)
    specificity = (negatives[None, :] < candidates[:, None]).mean(axis=1)
    return float(candidates[int(np.argmax(sensitivity + specificity))])


def write_spec_values(spec_path: Path, sha256: str, threshold: float) -> None:
    """Replace weights_sha256 and classification.threshold in spec.yaml, leaving the rest of the file as written."""
    text = spec_path.read_text(encoding="utf-8")
    text, hashes = re.subn(r"(?m)^weights_sha256:.*$", f'weights_sha256: "{sha256}"', text)
    text, thresholds = re.subn(r"(?m)^(  threshold:) *[0-9.eE+-]+", rf"\g<1> {threshold!r}", text)
    if (hashes, thresholds) != (1, 1):
        raise SystemExit(f"{spec_path} needs exactly one weights_sha256 line and one indented threshold line")
    spec_path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the two PneumoniaMNIST npz files")
    parser.add_argument("--out", type=Path, default=HERE / "model.pt")
    parser.add_argument("--epochs", type=int, default=Recipe().epochs)
    parser.add_argument("--seed", type=int, default=20240607)
    parser.add_argument("--threads", type=int, default=2, help="fixed so results do not depend on the machine")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    spec = ModelSpec.from_folder(HERE)
    assert spec.classification is not None
    started = time.monotonic()
    net = train(spec, load_split(args.data, "train"), Recipe(epochs=args.epochs), seed=args.seed)
    elapsed_s = time.monotonic() - started
    val = load_split(args.data, "val")
    scores = probabilities(LoadedModel(spec=spec, module=net, device=torch.device("cpu")), val.images)
    threshold = youden_threshold(scores, val.labels)
    torch.save(net.state_dict(), args.out)
    sha256 = sha256_of(args.out)
    print(
        f"trained in {elapsed_s:.0f} s; {args.out.name}: {args.out.stat().st_size} bytes, sha256 {sha256}; "
        f"validation threshold {threshold:.6f}"
    )
    if args.out.resolve() == spec.weights.resolve():
        write_spec_values(HERE / "spec.yaml", sha256, threshold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
