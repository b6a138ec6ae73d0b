"""cxr-pneumonia on the official PneumoniaMNIST test split: the shipped weights reproduce evaluation.json.

Run: .venv/bin/python -m pytest tests/integration/test_cxr_model.py -m slow -s   (prints the test metrics)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.cxr_pneumonia.evaluate import evaluate
from models.registry import load_spec
from tests.conftest import IN_CI

pytestmark = pytest.mark.slow
TARGET_AUC, TARGET_ACCURACY = 0.96, 0.90
METRICS = ("auc", "accuracy", "sensitivity", "specificity")


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    spec = load_spec("cxr-pneumonia")
    record: dict[str, Any] = json.loads((spec.weights.parent / "evaluation.json").read_text(encoding="utf-8"))
    return record


@pytest.fixture(scope="module")
def recomputed(shared: Path) -> dict[str, Any]:
    data = shared / "train-data" / "pneumoniamnist"
    if not data.is_dir():
        if IN_CI:
            pytest.fail(f"PneumoniaMNIST files not found under {data}")
        pytest.skip(f"PneumoniaMNIST files not found under {data}")
    return evaluate(load_spec("cxr-pneumonia"), data)


def test_evaluation_belongs_to_the_shipped_weights(committed: dict[str, Any]) -> None:
    spec = load_spec("cxr-pneumonia")
    assert spec.classification is not None
    assert committed["weights_sha256"] == spec.weights_sha256
    assert committed["threshold"] == spec.classification.threshold
    assert (committed["test"]["images"], committed["test"]["normal"], committed["test"]["pneumonia"]) == (624, 234, 390)


def test_shipped_weights_reproduce_the_committed_metrics(committed: dict[str, Any], recomputed: dict[str, Any]) -> None:
    for split in ("test", "validation"):
        for name in METRICS:
            assert recomputed[split][name] == pytest.approx(committed[split][name], abs=1e-6), (split, name)
        for count in ("tp", "fp", "tn", "fn"):
            assert recomputed[split][count] == committed[split][count], (split, count)
    assert recomputed["data"] == committed["data"]  # the same npz files
    test = recomputed["test"]
    print(
        f"\ntest: AUC {test['auc']:.4f} accuracy {test['accuracy']:.4f} sensitivity {test['sensitivity']:.4f} "
        f"specificity {test['specificity']:.4f} at threshold {recomputed['threshold']:.4f}"
    )


def test_targets_are_met(recomputed: dict[str, Any]) -> None:
    assert recomputed["test"]["auc"] >= TARGET_AUC
    assert recomputed["test"]["accuracy"] >= TARGET_ACCURACY
