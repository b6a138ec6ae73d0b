"""The layer contract (pyproject.toml [tool.importlinter]) holds, and an upward import breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.services import REPO

PACKAGES = ("pacsai", "models", "dicom_node", "worker")


def _copy_tree(to: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO / package, to / package, ignore=shutil.ignore_patterns("*.pt", "*.bin", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", to / "pyproject.toml")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(lint), str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_its_layers_and_an_upward_import_breaks_them(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    kept = _lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "1 kept, 0 broken" in kept.stdout

    errors = tmp_path / "pacsai" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport worker.tasks  # deliberately upward\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout and "pacsai.errors -> worker.tasks" in broken.stdout


def test_models_may_not_import_the_node(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    registry = tmp_path / "models" / "registry.py"
    registry.write_text(registry.read_text() + "\nimport dicom_node.route  # deliberately upward\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode != 0 and "models.registry -> dicom_node.route" in broken.stdout
