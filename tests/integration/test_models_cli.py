"""`pacsai models check|run`, worker binding to models, and the memory guard, on the real CT series."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from models.registry import load_model, load_spec
from pacsai.errors import StudyRejected
from tests.checks import check_seg_and_sr
from tests.services import run_cli
from worker.pipeline import estimate_bytes, process_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def pacsai(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"PACSAI_DATA_DIR": str(tmp_path / "data"), **env}, timeout_s=300)


def test_models_check_runs_the_model_once(tmp_path: Path) -> None:
    run = pacsai("models", "check", "ct-organs-tiny", tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "weights checksum ok" in run.stdout and "ran on a synthetic" in run.stdout
    missing = pacsai("models", "check", "no-such-model", tmp_path=tmp_path)
    assert missing.returncode == 1 and "no-such-model" in missing.stderr


def test_models_run_on_a_folder_writes_seg_and_sr(tmp_path: Path, ct_series: Path) -> None:
    run = pacsai("models", "run", "ct-organs-tiny", str(ct_series), "--out", str(tmp_path / "out"), tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "series 1: SEG, SR" in run.stdout
    assert "20/20" not in run.stderr and "1/1" in run.stderr  # progress bar counts series
    seg, sr = tmp_path / "out" / "1" / "seg.dcm", tmp_path / "out" / "1" / "sr.dcm"
    check_seg_and_sr(seg, sr, ct_series)
    assert dcmread(seg).SeriesDescription.startswith("AI ct-organs-tiny")


def test_a_worker_for_an_unknown_model_does_not_start(tmp_path: Path) -> None:
    run = pacsai("worker", tmp_path=tmp_path, PACSAI_WORKER_MODELS="no-such-model")
    assert run.returncode == 2 and "not starting" in run.stderr and "no-such-model" in run.stderr


def test_a_series_over_the_memory_budget_is_refused_before_loading(ct_series: Path) -> None:
    paths = sorted(ct_series.iterdir())
    needed = estimate_bytes(paths)
    assert needed >= 20 * 512 * 512 * 4
    model = load_model(load_spec("ct-organs-tiny"), "cpu")
    with pytest.raises(StudyRejected, match="PACSAI_WORKER_MEMORY_MB"):
        process_series(paths, model, memory_limit_bytes=needed // 2)
