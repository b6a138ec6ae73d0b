"""Fit cxr-pneumonia's OOD statistics: Mahalanobis on the `avgpool` features, threshold calibrated on validation.

Run from the repository root:  .venv/bin/python -m models.cxr_pneumonia.fit_ood [--data DIR]
Class means and the shared covariance come from the official train split (4708 images); the threshold is the
smallest that rejects at most 5 % of the validation split (524 images). Writes ood.npz next to the weights and its
SHA-256 into spec.yaml (ood.stats_sha256); prints the acceptance on the validation and test splits.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from models import ood
from models.cxr_pneumonia.train import DEFAULT_DATA, HERE, load_split
from models.preprocess import check_batch, to_input
from models.registry import LoadedModel, load_model, sha256_of
from models.spec import ModelSpec

LAYER = "avgpool"


def features(model: LoadedModel, grey: NDArray[np.uint8]) -> ood.Floats:
    pre = check_batch(model, grey)
    return np.concatenate(
        [ood.projection_features(model, to_input(grey[i : i + 256], pre), LAYER) for i in range(0, len(grey), 256)]
    )


def fit_stats(model: LoadedModel, data_dir: Path) -> ood.OodStats:
    train, val = load_split(data_dir, "train"), load_split(data_dir, "val")
    means, precision = ood.fit(features(model, train.images), train.labels)
    threshold = ood.calibrate(ood.distances(means, precision, features(model, val.images)), reject_fraction=0.05)
    return ood.OodStats(means=means, precision=precision, threshold=threshold)


def write_stats_sha256(spec_path: Path, sha256: str) -> None:
    text = spec_path.read_text(encoding="utf-8")
    updated, count = re.subn(r'(stats_sha256: )"[0-9a-f]*"', rf'\g<1>"{sha256}"', text)
    if count != 1:
        raise SystemExit("spec.yaml needs one ood.stats_sha256 line")
    spec_path.write_text(updated, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    spec = ModelSpec.from_folder(HERE)
    model = load_model(spec, "cpu")
    stats = fit_stats(model, args.data)
    out = HERE / "ood.npz"
    ood.save_stats(out, stats)
    write_stats_sha256(HERE / "spec.yaml", sha256_of(out))
    for split in ("val", "test"):
        scores = ood.distances(stats.means, stats.precision, features(model, load_split(args.data, split).images))
        print(f"{split}: {np.mean(scores <= stats.threshold):.4f} accepted (threshold {stats.threshold:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
