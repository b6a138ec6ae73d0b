"""Model registry: the shipped spec parses and its weights verify; broken models fail with clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from models import networks
from models.registry import ModelLoadError, list_specs, load_model, load_spec, pick_device
from models.spec import Task

TINY_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [2, 4],
    "strides": [2],
    "num_res_units": 0,
}


def _write_model(models_dir: Path, *, network: str = "monai.UNet", sha256: str | None = None) -> Path:
    """A tiny model folder "tiny_test" with real (random-init) weights and a spec pointing at them."""
    folder = models_dir / "tiny_test"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(networks.build("monai.UNet", TINY_ARGS).state_dict(), folder / "model.pt")
    actual = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    code = {"value": "123037004", "meaning": "Anatomical Structure"}
    spec = {
        "name": "tiny-test",
        "version": "0.0.1",
        "task": "segmentation",
        "modalities": ["CT"],
        "network": network,
        "network_args": TINY_ARGS,
        "weights": "model.pt",
        "weights_sha256": sha256 or actual,
        "preprocessing": {
            "spacing_mm": [3, 3, 3],
            "intensity_min": -175,
            "intensity_max": 250,
            "roi_size": [16, 16, 16],
        },
        "labels": [
            {
                "number": 1,
                "name": "liver",
                "category": code,
                "type": {"value": "10200004", "meaning": "Liver"},
                "colour_rgb": [221, 130, 101],
            }
        ],
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return folder


def test_shipped_spec_parses() -> None:
    spec = load_spec("ct-organs-tiny")
    assert (spec.name, spec.version, spec.task, spec.modalities) == (
        "ct-organs-tiny",
        "0.1.0",
        Task.SEGMENTATION,
        ("CT",),
    )
    assert spec.network in networks.NETWORKS
    assert [label.number for label in spec.labels] == [1, 2, 3, 4, 5]
    assert {label.type.value for label in spec.labels} == {"78961009", "9846003", "18639004", "10200004", "69695003"}
    assert all(label.category.value == "123037004" and label.type.scheme == "SCT" for label in spec.labels)
    assert len({label.colour_rgb for label in spec.labels}) == len(spec.labels)
    assert spec.network_args["out_channels"] == max(label.number for label in spec.labels) + 1
    assert "ct-organs-tiny" in [s.name for s in list_specs()]


def test_shipped_weights_verify_and_load() -> None:
    spec = load_spec("ct-organs-tiny")
    assert spec.weights.stat().st_size < 10 * 2**20
    model = load_model(spec, "cpu")
    assert model.device == torch.device("cpu") and not model.module.training


def test_tiny_model_loads(tmp_path: Path) -> None:
    _write_model(tmp_path)
    model = load_model(load_spec("tiny-test", tmp_path), "cpu")
    assert model.spec.name == "tiny-test" and not model.module.training
    assert [s.name for s in list_specs(tmp_path)] == ["tiny-test"]


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    _write_model(tmp_path, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match=r"tiny-test: weights checksum mismatch"):
        load_model(load_spec("tiny-test", tmp_path), "cpu")


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    folder = _write_model(tmp_path)
    (folder / "model.pt").unlink()
    with pytest.raises(ModelLoadError, match=r"tiny-test: weights file model.pt is missing"):
        load_model(load_spec("tiny-test", tmp_path), "cpu")


def test_unknown_network_is_refused(tmp_path: Path) -> None:
    _write_model(tmp_path, network="monai.NoSuchNet")
    with pytest.raises(ModelLoadError, match=r"tiny-test: unknown network 'monai.NoSuchNet'"):
        load_model(load_spec("tiny-test", tmp_path), "cpu")


def test_unknown_model_name_is_refused(tmp_path: Path) -> None:
    _write_model(tmp_path)
    with pytest.raises(ModelLoadError, match=r"no model named 'nope' \(known: tiny-test\)"):
        load_spec("nope", tmp_path)


def test_pick_device() -> None:
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == "cpu"
    with pytest.raises(ModelLoadError):
        pick_device("abacus")
