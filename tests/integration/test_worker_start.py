"""W5: a worker whose model weights are missing or corrupt refuses to start and consumes nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.registry import MODELS_DIR
from tests.services import REPO

pytestmark = [pytest.mark.integration, pytest.mark.catalogue("W5")]


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_worker_refuses_to_start_with_bad_weights(damage: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS_DIR / "ct_organs_tiny", models / "ct_organs_tiny")
    weights = models / "ct_organs_tiny" / "model.pt"
    if damage == "missing":
        weights.unlink()
    else:
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    queue = tmp_path / "data" / "queue" / "messages"
    env = {
        "PACSAI_DATA_DIR": str(tmp_path / "data"),
        "PACSAI_MODELS_DIR": str(models),
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
    }
    run = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2
    assert "not starting: model ct-organs-tiny" in run.stderr
    assert ("missing" if damage == "missing" else "checksum mismatch") in run.stderr
    assert not queue.exists() or not list(queue.iterdir())
