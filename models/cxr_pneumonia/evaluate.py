"""Evaluate cxr-pneumonia on the official PneumoniaMNIST test split (624 images) with the shipped weights.

Run from the repository root:  .venv/bin/python -m models.cxr_pneumonia.evaluate [--data DIR] [--out FILE]
Loads the model through the registry (which checks the weights' SHA-256), scores every image through
models.preprocess.probabilities, applies the spec's threshold (chosen on the validation split by train.py) and writes
AUC, accuracy, sensitivity and specificity to evaluation.json next to this file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from models.cxr_pneumonia.train import BALANCED, DEFAULT_DATA, HERE, VARUN, load_split
from models.preprocess import classification_spec, probabilities
from models.registry import load_model, sha256_of
from models.spec import ModelSpec

COMMAND = ".venv/bin/python -m models.cxr_pneumonia.evaluate"


def auc(scores: NDArray[np.float64], labels: NDArray[np.int64]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted as one half."""
    positives, negatives = scores[labels == 1][:, None], scores[labels == 0][None, :]
    wins = (positives > negatives).sum() + 0.5 * (positives == negatives).sum()
    return float(wins / (positives.size * negatives.size))


def metrics(scores: NDArray[np.float64], labels: NDArray[np.int64], threshold: float) -> dict[str, Any]:
    """AUC, and accuracy, sensitivity and specificity of `score >= threshold`, with the confusion counts."""
    predicted = scores >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    tn = int(np.sum(~predicted & (labels == 0)))
    fp = int(np.sum(predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    return {
        "images": int(labels.size),
        "pneumonia": int(np.sum(labels == 1)),
        "normal": int(np.sum(labels == 0)),
        "auc": auc(scores, labels),
        "accuracy": (tp + tn) / labels.size,
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def evaluate(spec: ModelSpec, data_dir: Path) -> dict[str, Any]:
    """The evaluation record: model, weights, threshold, data files, and metrics on the test and validation splits."""
    threshold = classification_spec(spec).threshold
    model = load_model(spec, "cpu")
    splits = {name: load_split(data_dir, name) for name in ("test", "val")}
    scored = {
        name: metrics(probabilities(model, split.images), split.labels, threshold) for name, split in splits.items()
    }
    return {
        "model": spec.name,
        "version": spec.version,
        "weights_sha256": spec.weights_sha256,
        "threshold": threshold,
        "threshold_rule": "Youden's J (max sensitivity + specificity) on the validation split; score >= threshold "
        "means pneumonia",
        "data": {name: sha256_of(data_dir / name) for name in (VARUN, BALANCED)},
        "test_split": "official PneumoniaMNIST test = varun19424 test_images (624: 234 normal, 390 pneumonia)",
        "test": scored["test"],
        "validation": scored["val"],
        "command": COMMAND,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the two PneumoniaMNIST npz files")
    parser.add_argument("--out", type=Path, default=HERE / "evaluation.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = evaluate(ModelSpec.from_folder(HERE), args.data)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    test = record["test"]
    print(
        f"test ({test['images']} images): AUC {test['auc']:.4f}  accuracy {test['accuracy']:.4f}  "
        f"sensitivity {test['sensitivity']:.4f}  specificity {test['specificity']:.4f}  "
        f"at threshold {record['threshold']:.6f}; wrote {args.out.name}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
