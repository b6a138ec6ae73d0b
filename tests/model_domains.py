"""Which series of the shared corpus each shipped model evaluates or refuses, and why; renders docs/model-domains.md.

Every series (MANIFEST.tsv rows grouped by folder and SeriesInstanceUID) goes through the worker's own path,
worker.pipeline.process_series, for each model with an OOD check: the domain check on the headers, then the OOD
score, then inference. A refusal is worker.screen.NotEvaluated with its "not evaluated" SR, which must hold no
finding. For a model without an OOD check only the header domain is checked (its inference is not run here).
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from models.ood import ood_score
from models.registry import LoadedModel, list_specs, load_model
from pacsai.errors import StudyRejected
from tests.services import REPO, SHARED
from worker import load_image, load_volume, screen
from worker.encode_ood import OOD_SCORE, OOD_THRESHOLD
from worker.pipeline import process_series

CORPUS = SHARED / "dicom"
TABLE = REPO / "docs" / "model-domains.md"
COMMAND = ".venv/bin/python scripts/model_domains.py"
PROJECTION = (
    "CR",
    "DX",
    "RG",
    "XA",
    "OT",
    "MG",
)  # radiographs (and other single projections) the OOD score is shown for
SC = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture SOP classes
_SPLIT = {"pydicom", "dcm_qa_ct"}  # folders whose subfolders are separate sources (as in tests/corpus.py)


@dataclass(frozen=True, slots=True)
class Series:
    folder: str
    paths: tuple[str, ...]  # relative to the corpus root, sorted
    modality: str
    sop_class: str


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: bool
    reason: str  # "evaluated: SEG, SR", "not evaluated: …", "not processed: …"
    ood: float | None = None  # the OOD score when the check ran
    finding_free: bool = True  # a refusal's report holds no finding (only the OOD numbers, if any)


def corpus_series(root: Path = CORPUS) -> list[Series]:
    """The corpus as series: MANIFEST rows grouped by source folder and SeriesInstanceUID (no UID: one per file)."""
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    with (root / "MANIFEST.tsv").open(encoding="utf-8") as stream:
        for row in csv.DictReader(stream, delimiter="\t"):
            folder = _folder(row["path"])
            groups[(folder, row["SeriesInstanceUID"] or row["path"])].append(row)
    return sorted(
        (
            Series(
                folder=folder,
                paths=tuple(sorted(r["path"] for r in rows)),
                modality=rows[0]["Modality"],
                sop_class=rows[0]["SOPClassUID"],
            )
            for (folder, _), rows in groups.items()
        ),
        key=lambda s: s.paths[0],
    )


def _folder(path: str) -> str:
    parts = path.split("/")
    return "/".join(parts[:2]) if parts[0] in _SPLIT and len(parts) > 2 else parts[0]


def shipped_models() -> list[LoadedModel]:
    return [load_model(spec, "cpu") for spec in list_specs(REPO / "models")]


def judge(model: LoadedModel, paths: Sequence[Path]) -> Verdict:
    """The model's verdict on one series: its header domain (worker.screen, as process_series checks it first), then
    for a model with an OOD check the rest of the worker's path, process_series (OOD score, inference)."""
    try:
        headers = screen.read_headers(paths)
        refusal = screen.check_headers(model, headers)
    except Exception as exc:  # noqa: BLE001 (files the node refuses on receipt: docs/corpus-report.md)
        return Verdict(False, f"not processed: unreadable by the worker ({type(exc).__name__})")
    if refusal is not None:
        return Verdict(False, f"not evaluated: {refusal.reason}", projection_ood(model, paths, headers[0]))
    if model.spec.ood is None:  # this model's inference is not run over the corpus
        return Verdict(True, "inside the domain (no OOD check; not run here)")
    return run(model, paths)


def run(model: LoadedModel, paths: Sequence[Path]) -> Verdict:
    """process_series on the series: evaluated (with the OOD score its SR reports) or refused, with the reason."""
    try:
        datasets = process_series(paths, model)
    except screen.NotEvaluated as refused:
        score = None if refused.refusal.ood is None else refused.refusal.ood[0]
        return Verdict(False, str(refused), score, finding_free(refused.report))
    except StudyRejected as exc:
        return Verdict(False, f"not processed: {exc}")
    except Exception as exc:  # noqa: BLE001 (files the node refuses on receipt: docs/corpus-report.md)
        return Verdict(False, f"not processed: unreadable by the worker ({type(exc).__name__})")
    return Verdict(True, "evaluated: " + ", ".join(str(ds.Modality) for ds in datasets), ood_of(datasets))


def projection_ood(model: LoadedModel, paths: Sequence[Path], header: Dataset) -> float | None:
    """A classifier's OOD score of a radiograph or secondary capture its domain refused (what the second check would
    have said); None for other images and when the image cannot be prepared (colour, no pixel data, …)."""
    if model.spec.classification is None:
        return None
    if header.get("Modality") not in PROJECTION and not str(header.get("SOPClassUID", "")).startswith(SC):
        return None
    try:  # the worker classifies a series' first image (pipeline.classify_image)
        source = load_volume.read_source(sorted(paths)[0])
        image = load_image.prepare_image(source, model.spec.classification.preprocessing)
        scored = ood_score(model, grey=image.network_grey)
    except Exception:  # noqa: BLE001 (colour, multi-frame, no pixel data: nothing to score)
        return None
    return None if scored is None else scored[0]


def finding_free(report: Dataset | None) -> bool:
    """A "not evaluated" SR's measurement groups hold no probability, no volume, no present/absent: their only
    numbers are the OOD score and threshold, their only coded item the finding type "not evaluated"."""
    if report is None:
        return True
    allowed = {OOD_SCORE.value, OOD_THRESHOLD.value}
    groups = [item for item in content_items(report) if _code(item) == "125007"]  # Measurement Group
    for item in (child for group in groups for child in group.get("ContentSequence", [])):
        kind = item.get("ValueType")
        if kind == "NUM" and _code(item) not in allowed:
            return False
        if kind == "CODE" and (_code(item) != "121071" or item.ConceptCodeSequence[0].CodeValue != "NOT-EVALUATED"):
            return False
    return bool(groups)


def _code(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue) if "ConceptNameCodeSequence" in item else ""


def ood_of(datasets: Iterable[Dataset]) -> float | None:
    for ds in datasets:
        for item in content_items(ds) if ds.Modality == "SR" else ():
            if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == OOD_SCORE.value:
                return float(item.MeasuredValueSequence[0].NumericValue)
    return None


def content_items(ds: Dataset) -> Iterable[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def judge_corpus(models: Sequence[LoadedModel], root: Path = CORPUS) -> dict[str, dict[Series, Verdict]]:
    """Every model's verdict on every corpus series (warnings of the refusals silenced)."""
    quiet = logging.getLogger("worker")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        series = corpus_series(root)
        return {m.spec.name: {s: judge(m, [root / p for p in s.paths]) for s in series} for m in models}
    finally:
        quiet.setLevel(level)


def render(verdicts: dict[str, dict[Series, Verdict]]) -> str:
    names = sorted(verdicts)
    lines = [
        "# Which corpus series each model evaluates",
        "",
        f"Generated by `{COMMAND}` over `../shared/dicom` (MANIFEST.tsv rows grouped by folder and series);",
        "do not edit by hand. `tests/integration/test_model_domains.py` checks it is current.",
        "",
        "Each series goes through the worker's own screening (`worker/pipeline.py` `process_series`): the header",
        "domain of the model's spec, then its OOD score, then inference. A model without an OOD check is only",
        "checked against its header domain here. Reasons are the worker's own words. For an image the classifier's",
        "domain refused, the OOD score is what its second check would have said (threshold in the spec's ood.npz).",
        "",
        "## Summary",
        "",
        "| model | series evaluated | refused by the domain | refused by the OOD check | not processed |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        values = list(verdicts[name].values())
        ood = sum(1 for v in values if not v.accepted and "OOD score" in v.reason)
        domain = sum(1 for v in values if v.reason.startswith("not evaluated")) - ood
        lines.append(
            f"| {name} | {sum(v.accepted for v in values)} | {domain} | {ood} | "
            f"{sum(1 for v in values if not v.accepted and not v.reason.startswith('not evaluated'))} |"
        )
    for name in names:
        lines += [
            "",
            f"## {name}",
            "",
            "| series (first file) | files | modality | verdict | OOD score |",
            "|---|---|---|---|---|",
        ]
        for series, verdict in verdicts[name].items():
            score = "" if verdict.ood is None else f"{verdict.ood:.2f}"
            mark = "**accepted**" if verdict.accepted else "refused"
            lines.append(
                f"| `{series.paths[0]}` | {len(series.paths)} | {series.modality or '—'} | {mark}: "
                f"{_cell(verdict.reason)} | {score} |"
            )
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
