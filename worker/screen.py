"""Step 5b: may the model evaluate this series? Its spec's domain (headers) first, then its OOD score (features).

A refusal is a value, not an error: the pipeline reports it (WARNING log, job reason, "not evaluated" SR) and never
produces a probability or a segment for the series.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from models.domain import check_domain, series_header
from models.ood import ood_score
from models.registry import LoadedModel
from pacsai.errors import StudyRejected
from worker.encode_not_evaluated import encode_not_evaluated_sr
from worker.uids import output_uids

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the model did not evaluate a series; `ood` is (score, threshold) when the OOD check ran."""

    reason: str
    ood: tuple[float, float] | None = None


def read_headers(paths: Sequence[Path]) -> list[Dataset]:
    """The series' headers without pixel data, in file order."""
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(paths)]


ALIKE_BYTES = 16 << 10  # single-frame files whose sizes differ by less hold images of the same size


class SeriesHeaders:
    """A series' headers as far as the checks before loading need them (issue 11: reading 300 headers took 0.1-0.3 s
    before the load read every file again).

    `for_checks` (memory estimate, domain) is the first file's header standing for every file when the files are
    alike: single-frame and of sizes within ALIKE_BYTES, i.e. the same image size, so rows x columns x frames and the
    slice count come out as from every header. Otherwise (multi-frame, compressed slices of varying size, a mixed
    series) it is every header. `all()` reads every header once, for a "not evaluated" SR."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = sorted(paths)
        self._all: list[Dataset] | None = None
        if not self.paths:  # the load then says what is wrong (no file holds an image slice)
            self.for_checks: list[Dataset] = []
            return
        first = pydicom.dcmread(self.paths[0], stop_before_pixels=True)
        sizes = [path.stat().st_size for path in self.paths]
        alike = int(first.get("NumberOfFrames", 1) or 1) == 1 and max(sizes) - min(sizes) < ALIKE_BYTES
        self.for_checks = [first] * len(self.paths) if alike else self.all()

    def all(self) -> list[Dataset]:
        if self._all is None:
            self._all = read_headers(self.paths)
        return self._all


def check_headers(model: LoadedModel, headers: Sequence[Dataset]) -> Refusal | None:
    """The spec's domain against the series' headers; None when inside (or the spec declares no domain)."""
    if model.spec.domain is None or not headers:
        return None
    reasons = check_domain(model.spec.domain, series_header(headers))
    return refuse(model, "; ".join(reasons)) if reasons else None


def check_ood(
    model: LoadedModel, *, grey: NDArray[np.uint8] | None = None, prepared: torch.Tensor | None = None
) -> tuple[Refusal | None, tuple[float, float] | None]:
    """The OOD check on the prepared network input: (a refusal past the threshold, (score, threshold) or None)."""
    scored = ood_score(model, grey=grey, prepared=prepared)
    return (None, None) if scored is None else (judge_ood(model, scored), scored)


def judge_ood(model: LoadedModel, scored: tuple[float, float]) -> Refusal | None:
    """A refusal when the (score, threshold) of the series' OOD check is past the threshold; else None."""
    score, threshold = scored
    log.info("model %s: OOD score %.3f (threshold %.3f)", model.spec.name, score, threshold)
    if score > threshold:
        return refuse(model, f"OOD score {score:.2f} is above the threshold {threshold:.2f}", scored)
    return None


def refuse(model: LoadedModel, reason: str, ood: tuple[float, float] | None = None) -> Refusal:
    log.warning("model %s did not evaluate the series: %s", model.spec.name, reason)
    return Refusal(reason=reason, ood=ood)


class NotEvaluated(StudyRejected):
    """The model refused the series: `refusal` says why, `report` is the "not evaluated" SR for the destination
    (None when the series' headers cannot make one, e.g. no SOP class).

    Caught by pipeline.run and run_folder, which deliver the report (per profile) and record the reason; it is
    never a failure of the job's inference and never carries a probability.
    """

    def __init__(self, refusal: Refusal, report: Dataset | None) -> None:
        super().__init__(f"not evaluated: {refusal.reason}")
        self.refusal = refusal
        self.report = report


def not_evaluated(
    headers: Sequence[Dataset], refusal: Refusal, model: LoadedModel, revision: int, software_version: str
) -> NotEvaluated:
    """The refusal with its "not evaluated" SR (None when the headers cannot make one), ready to raise."""
    try:
        uids = output_uids(str(headers[0].SeriesInstanceUID), model.spec.name, model.spec.version, revision)
        report = encode_not_evaluated_sr(
            headers, refusal.reason, refusal.ood, model.spec, uids, software_version=software_version, revision=revision
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # e.g. no SOP class or series UID
        log.warning("no 'not evaluated' SR for this series (%s); the refusal is recorded", type(exc).__name__)
        return NotEvaluated(refusal, None)
    return NotEvaluated(refusal, report)
