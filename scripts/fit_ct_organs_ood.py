"""Fit ct-organs-tiny's OOD statistics: Mahalanobis on its bottleneck features, threshold on the validation series.

Run from the repository root:  .venv/bin/python scripts/fit_ct_organs_ood.py
Features come from the sliding windows the worker's inference uses (the spec's overlap), so that a series is scored
as it was calibrated. Mean and shared covariance come from the body locations of the training CT (example_ct.nii.gz,
one class). The threshold rejects at most 5 % of the validation scores: every contiguous run of at least MIN_SLABS
slices of ../shared/dicom/totalsegmentator-ct-abdomen (the series the card's Dice comes from; one patient), read by
the worker's own loader. Writes models/ct_organs_tiny/ood.npz and its SHA-256 into spec.yaml; prints the scores.
A script, not a module of models/: it reads DICOM with worker.load_volume, which models/ may not import.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import ood  # noqa: E402
from models.cxr_pneumonia.fit_ood import write_stats_sha256  # noqa: E402
from models.preprocess import preprocess, to_ras_image  # noqa: E402
from models.registry import LoadedModel, load_model, sha256_of  # noqa: E402
from models.spec import ModelSpec  # noqa: E402
from worker import load_volume  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "models" / "ct_organs_tiny"
TRAIN = REPO.parent / "shared" / "train-data" / "totalsegmentator-ct" / "example_ct.nii.gz"
VALIDATION = REPO.parent / "shared" / "dicom" / "totalsegmentator-ct-abdomen"
MIN_SLABS = 10
SEED = 20240601


def train_volume(spec: ModelSpec) -> torch.Tensor:
    image = nib.nifti1.Nifti1Image.from_filename(TRAIN)
    data = torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32))[None]
    return preprocess(MetaTensor(data, affine=torch.as_tensor(image.affine, dtype=torch.float64)), spec.preprocessing)


def validation_slabs(model: LoadedModel) -> list[torch.Tensor]:
    """Every contiguous run of >= MIN_SLABS slices of the validation series, each with one draw of the training
    augmentation's intensity changes (train.py: soft-tissue shift, gain, noise), prepared like the worker does."""
    volume = load_volume.load_series(sorted(p for p in VALIDATION.iterdir() if p.is_file()))
    count = volume.array.shape[0]
    rng = np.random.default_rng(SEED)
    return [
        preprocess(
            to_ras_image(_vary(volume.array[start:stop], rng), _shifted(volume.affine, start)),
            model.spec.preprocessing,
        )
        for start in range(count)
        for stop in range(start + MIN_SLABS, count + 1)
    ]


def _vary(hu: NDArray[np.float32], rng: np.random.Generator) -> NDArray[np.float32]:
    """The intensity variation the model was trained to take: contrast phase, scanner gain, noise."""
    soft = 1.0 / (1.0 + np.exp(-(hu + 60.0) / 15.0))
    varied = (hu + rng.uniform(-20.0, 70.0) * soft) * rng.uniform(0.9, 1.1)
    if rng.random() < 0.5:
        varied = varied + rng.normal(0.0, rng.uniform(0.0, 17.0), size=hu.shape)
    result: NDArray[np.float32] = np.asarray(varied, dtype=np.float32)
    return result


def _shifted(affine: NDArray[np.float64], start: int) -> NDArray[np.float64]:
    """The affine of the volume that starts `start` slices later (axis 0 is the slice axis)."""
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ np.array([start, 0, 0]) + affine[:3, 3]
    return moved


def main() -> int:
    torch.set_num_threads(2)
    spec = ModelSpec.from_folder(HERE)
    if spec.ood is None:
        raise SystemExit("spec.yaml needs an ood block")
    model = load_model(spec, "cpu")
    overlap = spec.preprocessing.overlap  # the windows the worker scores: those of its own inference pass
    features = ood.volume_features(model, train_volume(spec), spec.preprocessing, spec.ood, overlap=overlap)
    means, precision = ood.fit(features, np.zeros(len(features), dtype=np.int64))
    provisional = ood.OodStats(means=means, precision=precision, threshold=0.0)
    scores = np.array(
        [
            ood.score(provisional, ood.volume_features(model, slab, spec.preprocessing, spec.ood, overlap=overlap))
            for slab in validation_slabs(model)
        ]
    )
    threshold = ood.calibrate(scores, reject_fraction=0.05)
    out = HERE / "ood.npz"
    ood.save_stats(out, ood.OodStats(means=means, precision=precision, threshold=threshold))
    write_stats_sha256(HERE / "spec.yaml", sha256_of(out))
    print(f"train: {len(features)} body locations; validation: {len(scores)} slabs of >= {MIN_SLABS} slices")
    print(f"validation scores: min {scores.min():.3f} median {np.median(scores):.3f} max {scores.max():.3f}")
    print(f"threshold {threshold:.3f}: {np.mean(scores <= threshold):.4f} of the validation slabs accepted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
