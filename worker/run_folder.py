"""`pacsai models run|check`: run a model on a folder of DICOM files without any server (for model developers)."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from models.registry import LoadedModel
from pacsai.errors import StudyRejected
from worker import pipeline, screen
from worker.volume import Volume


def _progress(done: int, total: int, label: str, started: float) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<28} {time.monotonic() - started:5.1f} s"
    )
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def group_series(folder: Path) -> dict[str, list[Path]]:
    """DICOM files under folder, grouped by series (keys are 1-based ordinals, not UIDs)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        groups[str(ds.get("SeriesInstanceUID", ""))].append(path)
    return {str(index + 1): paths for index, (_, paths) in enumerate(sorted(groups.items()))}


def run_folder(model: LoadedModel, folder: Path, out: Path) -> dict[str, str]:
    """Run the model on every series under folder; write results to out/<series ordinal>/; return outcomes."""
    series = group_series(folder)
    outcomes: dict[str, str] = {}
    started = time.monotonic()
    for done, (ordinal, paths) in enumerate(series.items()):
        _progress(done, len(series), f"series {ordinal} ({len(paths)} files)", started)
        try:
            datasets = pipeline.process_series(paths, model)
        except screen.NotEvaluated as refused:  # outside the model's domain or past its OOD threshold: no finding
            datasets = [] if refused.report is None else [refused.report]
            outcomes[ordinal] = str(refused)
        except StudyRejected as exc:
            outcomes[ordinal] = f"not processed: {exc}"
            continue
        target = out / ordinal
        target.mkdir(parents=True, exist_ok=True)
        for ds in datasets:
            ds.save_as(target / f"{str(ds.Modality).lower()}.dcm", enforce_file_format=True)
        outcomes.setdefault(ordinal, ", ".join(str(ds.Modality) for ds in datasets))
    _progress(len(series), len(series), "done", started)
    return outcomes


def check_model(model: LoadedModel) -> str:
    """Run the model once on a synthetic volume (CT-like noise on a 2 mm grid) and check the label map."""
    rng = np.random.default_rng(0)
    shape = (24, 96, 96)
    array = rng.normal(40.0, 60.0, size=shape).astype(np.float32)
    affine = np.diag([2.0, 1.5, 1.5, 1.0])
    volume = Volume(array=array, affine=affine, datasets=())
    started = time.monotonic()
    labels = pipeline.segment(model, volume)
    if labels.shape != shape:
        raise StudyRejected(f"label map has shape {labels.shape}, expected {shape}")
    known = {0, *(label.number for label in model.spec.labels)}
    unknown = set(np.unique(labels).tolist()) - known
    if unknown:
        raise StudyRejected(f"label map holds numbers the spec does not define: {sorted(unknown)}")
    return f"ran on a synthetic {shape[0]}x{shape[1]}x{shape[2]} volume in {time.monotonic() - started:.1f} s"
