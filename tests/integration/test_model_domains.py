"""Issue 12: the shipped models refuse what they were not made for, over the whole shared corpus.

The corpus is judged once per module (tests/model_domains.py: header domain for every series, the worker's own
process_series for the series inside it); a sample of the refusals goes through process_series too, to check the
refusal is the same and its report holds no finding. docs/model-domains.md must be what this run renders.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from bench.make_ct import write_ct
from models.bundle import instantiate_network, read_bundle
from models.cxr_pneumonia.train import DEFAULT_DATA, load_split
from models.ood import load_stats, projection_scores
from models.registry import LoadedModel, load_model, load_spec
from tests.integration.test_bundle_as_model import SPEC
from tests.model_domains import (
    COMMAND,
    CORPUS,
    SC,
    TABLE,
    Series,
    Verdict,
    content_items,
    corpus_series,
    judge_corpus,
    render,
    run,
    shipped_models,
)
from tests.services import SHARED
from worker import screen
from worker.pipeline import process_series
from worker.run_folder import run_folder

pytestmark = [pytest.mark.integration]
Verdicts = dict[str, dict[Series, Verdict]]


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    torch.set_num_threads(2)
    return {model.spec.name: model for model in shipped_models()}


@pytest.fixture(scope="module")
def verdicts(models: dict[str, LoadedModel]) -> Verdicts:
    return judge_corpus(list(models.values()))


def _is_image_for_cxr_refusal(series: Series) -> bool:
    return series.modality in ("CR", "DX", "CT", "MR") or series.sop_class.startswith(SC)


def test_cxr_pneumonia_refuses_every_radiograph_ct_mr_and_secondary_capture_of_the_corpus(verdicts: Verdicts) -> None:
    """The corpus has no pediatric chest radiograph: the hip, the adult chests, CT/MR slices, SC are all refused."""
    cxr = verdicts["cxr-pneumonia"]
    checked = [s for s in cxr if _is_image_for_cxr_refusal(s)]
    assert len(checked) > 100
    accepted = [s.paths[0] for s in checked if cxr[s].accepted]
    assert accepted == []
    assert all(cxr[s].reason.startswith("not evaluated") for s in checked if s.modality in ("CR", "DX"))


def test_refusals_through_the_worker_path_are_the_same_and_carry_no_finding(
    verdicts: Verdicts, models: dict[str, LoadedModel]
) -> None:
    """Radiographs, three secondary captures, a CT and an MR series through process_series: refused, same reason."""
    cxr = verdicts["cxr-pneumonia"]
    sample = [s for s in cxr if s.modality in ("CR", "DX")]
    sample += [s for s in cxr if s.sop_class.startswith(SC)][:3]
    sample += [next(s for s in cxr if s.modality == m and len(s.paths) > 10) for m in ("CT", "MR")]
    for series in sample:
        verdict = run(models["cxr-pneumonia"], [CORPUS / p for p in series.paths])
        assert not verdict.accepted and verdict.reason == cxr[series].reason, series.paths[0]
        if verdict.reason.startswith("not evaluated"):
            assert verdict.finding_free, series.paths[0]


def test_adult_chests_score_past_the_ood_threshold_too(verdicts: Verdicts, models: dict[str, LoadedModel]) -> None:
    """The second check alone would refuse all but one radiograph of the corpus: the adult chest RG1 barely (9.03
    against 9.01) and a 16×16-pixel test CR not at all; the header domain is what refuses those (see the card)."""
    spec = models["cxr-pneumonia"].spec.ood
    assert spec is not None
    threshold = load_stats(spec).threshold
    scores = {s.paths[0]: v.ood for s, v in verdicts["cxr-pneumonia"].items() if s.modality in ("CR", "DX")}
    scored = {path: score for path, score in scores.items() if score is not None}
    assert len(scored) >= 8
    below = {path for path, score in scored.items() if score <= threshold}
    assert below == {"pydicom/test_files/dicomdirtests/77654033/CR2/6247"}, scored


def test_most_pneumoniamnist_test_images_pass_the_ood_check(models: dict[str, LoadedModel]) -> None:
    model = models["cxr-pneumonia"]
    assert model.spec.ood is not None
    stats = load_stats(model.spec.ood)
    scores = projection_scores(model, stats, model.spec.ood.layer, load_split(DEFAULT_DATA, "test").images)
    assert len(scores) == 624
    assert np.mean(scores <= stats.threshold) >= 0.90


def test_ct_organs_tiny_takes_the_abdominal_ct_and_refuses_head_ct_and_mr(verdicts: Verdicts) -> None:
    ct = verdicts["ct-organs-tiny"]
    by_folder = {s.folder: v for s, v in ct.items()}
    abdomen = by_folder["totalsegmentator-ct-abdomen"]
    assert abdomen.accepted and abdomen.reason == "evaluated: SEG, SR" and abdomen.ood is not None
    for series, verdict in ct.items():
        if series.modality == "MR" or series.folder.startswith("dcm_qa_ct"):
            assert not verdict.accepted, series.paths[0]
    assert [s.folder for s, v in ct.items() if v.accepted] == ["totalsegmentator-ct-abdomen"]


def test_ct_organs_tiny_refuses_the_synthetic_bench_ct_by_its_ood_score(
    models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    """The bench phantom is CT of an 'ABDOMEN' in every header, so only the features can tell."""
    paths = write_ct(tmp_path / "bench", slices=48)
    with pytest.raises(screen.NotEvaluated, match="OOD score") as refused:
        process_series(paths, models["ct-organs-tiny"])
    assert refused.value.report is not None and refused.value.refusal.ood is not None


BUNDLE_SPEC = (  # the spleen bundle's spec of test_bundle_as_model, with a domain
    SPEC
    + """\
domain:
  modalities: [CT]
  body_parts: [ABDOMEN]
  unknown_body_part: refuse
"""
)


def test_a_bundle_and_models_run_refuse_outside_the_domain(tmp_path: Path) -> None:
    """`pacsai models run` (run_folder) with a bundle: the head CT is not evaluated; the report only, no SEG."""
    folder = tmp_path / "models" / "spleen_ct_segmentation"
    shutil.copytree(SHARED / "monai-bundles" / "spleen_ct_segmentation" / "configs", folder / "configs")
    network = instantiate_network(read_bundle(folder, "cpu", None), folder.name)
    (folder / "models").mkdir()
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    sha = hashlib.sha256((folder / "models" / "model.pt").read_bytes()).hexdigest()
    (folder / "spec.yaml").write_text(BUNDLE_SPEC.format(sha=sha))
    model = load_model(load_spec("spleen-ct-segmentation", tmp_path / "models"), "cpu")
    assert model.bundle is not None
    outcomes = run_folder(model, CORPUS / "dcm_qa_ct" / "Philips_head_phantom" / "S2010", tmp_path / "out")
    assert outcomes == {"1": "not evaluated: body part BRAIN is not one of ABDOMEN"}
    assert sorted(p.name for p in (tmp_path / "out" / "1").iterdir()) == ["sr.dcm"]
    report = dcmread(tmp_path / "out" / "1" / "sr.dcm")
    texts = [str(item.TextValue) for item in content_items(report) if "TextValue" in item]
    assert "spleen-ct-segmentation 0.5.4 did not evaluate this series: body part BRAIN is not one of ABDOMEN" in texts


def test_the_committed_domain_table_is_current(verdicts: Verdicts) -> None:
    assert len(verdicts["cxr-pneumonia"]) == len(corpus_series())
    assert TABLE.read_text(encoding="utf-8") == render(verdicts), f"regenerate it: {COMMAND}"
