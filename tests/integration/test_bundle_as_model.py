"""A MONAI bundle folder plus a spec.yaml is a pacsai model: registry → worker pipeline → SEG + SR."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from models.bundle import instantiate_network, read_bundle
from models.registry import list_specs, load_model, load_spec
from tests.checks import check_seg_and_sr
from tests.services import SHARED
from worker.pipeline import process_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = """\
name: spleen-ct-segmentation
version: 0.5.4
task: segmentation
modalities: [CT]
description: MONAI Model Zoo spleen bundle (random weights in this test)
network: monai.bundle
network_args: {{roi_size: [96, 96, 32], sw_batch_size: 1}}
weights: models/model.pt
weights_sha256: "{sha}"
labels:
  - number: 1
    name: spleen
    category: {{value: "123037004", meaning: Anatomical Structure}}
    type: {{value: "78961009", meaning: Spleen}}
    colour_rgb: [157, 108, 162]
"""


def test_spleen_bundle_runs_through_the_worker_pipeline(tmp_path: Path, ct_series: Path) -> None:
    folder = tmp_path / "models" / "spleen_ct_segmentation"
    shutil.copytree(SHARED / "monai-bundles" / "spleen_ct_segmentation" / "configs", folder / "configs")
    torch.manual_seed(0)
    network = instantiate_network(read_bundle(folder, "cpu", None), folder.name)
    (folder / "models").mkdir()
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    sha = hashlib.sha256((folder / "models" / "model.pt").read_bytes()).hexdigest()
    (folder / "spec.yaml").write_text(SPEC.format(sha=sha))
    assert [spec.name for spec in list_specs(tmp_path / "models")] == ["spleen-ct-segmentation"]
    model = load_model(load_spec("spleen-ct-segmentation", tmp_path / "models"), "cpu")
    assert model.bundle is not None and model.bundle.labels[1:] == ("spleen",)
    datasets = process_series(sorted(ct_series.iterdir()), model)
    assert [str(ds.Modality) for ds in datasets] == ["SEG", "SR"]  # random weights label something
    for ds in datasets:
        ds.save_as(tmp_path / f"{ds.Modality}.dcm", enforce_file_format=True)
    check_seg_and_sr(tmp_path / "SEG.dcm", tmp_path / "SR.dcm", ct_series)
