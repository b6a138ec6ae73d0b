"""mr-brain-mindgrab's OOD check (models/meshnet_ood.py): the corpus's head MR passes, a CT and a body MR do not.

The check runs the network's first two layers on brainchop's conformed input (about 10-25 s a volume on 2 shared
cores); the statistics are models/mr_brain_mindgrab/ood.npz, fitted by scripts/fit_mindgrab_ood.py.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from models import meshnet_ood
from models.registry import LoadedModel, load_model, load_spec
from pacsai.errors import ModelError
from tests.services import SHARED
from worker.load_volume import load_series

pytestmark = [pytest.mark.integration]
HEAD_MR = SHARED / "dicom" / "dcm_qa_toshiba"
ABDOMINAL_CT = SHARED / "dicom" / "totalsegmentator-ct-abdomen"
ABDOMINAL_MR = SHARED / "train-data" / "totalsegmentator-ct" / "example_mr_sm.nii.gz"


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    torch.set_num_threads(2)
    return load_model(load_spec("mr-brain-mindgrab"), "cpu")


def _score(model: LoadedModel, array: np.ndarray, affine: np.ndarray) -> tuple[float, float]:
    scored = meshnet_ood.volume_score(model, np.asarray(array, dtype=np.float32), affine)
    assert scored is not None
    return scored


def test_spec_names_the_fitted_statistics(model: LoadedModel) -> None:
    settings = meshnet_ood.settings_of(model)
    assert settings is not None and settings.layer == 1 and settings.stats.stats.is_file()
    with pytest.raises(ModelError, match="is not a MeshNet"):
        meshnet_ood.network_of(load_model(load_spec("ct-organs-tiny"), "cpu"))


def test_the_head_mr_of_the_corpus_is_accepted(model: LoadedModel) -> None:
    volume = load_series(sorted(HEAD_MR.glob("*.dcm")))
    score, threshold = _score(model, volume.array, volume.affine)
    print(f"head MR (dcm_qa_toshiba): OOD score {score:.3f}, threshold {threshold:.3f}")
    assert score <= threshold


def test_an_abdominal_mr_is_refused(model: LoadedModel) -> None:
    image = nib.nifti1.Nifti1Image.from_filename(ABDOMINAL_MR)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    score, threshold = _score(model, np.asarray(image.dataobj), lps)
    print(f"abdominal MR: OOD score {score:.3f}, threshold {threshold:.3f}")
    assert score > threshold


def test_an_abdominal_ct_is_refused(model: LoadedModel) -> None:
    """The CT's first 8 slices (16 mm) keep the test short; the whole series scores past the threshold too (card)."""
    volume = load_series(sorted(p for p in ABDOMINAL_CT.iterdir() if p.is_file())[:8])
    score, threshold = _score(model, volume.array, volume.affine)
    print(f"abdominal CT, 8 slices: OOD score {score:.3f}, threshold {threshold:.3f}")
    assert score > threshold


@pytest.mark.slow
def test_one_forward_pass_gives_the_mask_and_the_same_score(model: LoadedModel) -> None:
    """segment_with_score (the whole network once) scores the head MR as the cheap check before inference does."""
    volume = load_series(sorted(HEAD_MR.glob("*.dcm")))
    labels, scored = meshnet_ood.segment_with_score(model, volume.array, volume.affine)
    assert scored is not None and labels.shape == volume.array.shape
    assert scored == pytest.approx(_score(model, volume.array, volume.affine), abs=1e-6)
    assert 1000.0 <= float((labels == 1).sum()) * volume.voxel_volume_ml <= 1700.0
