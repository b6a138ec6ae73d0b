"""Fit mr-brain-mindgrab's OOD statistics (models/meshnet_ood.py) on the little in-domain head MR there is here.

Run from the repository root:  .venv/bin/python scripts/fit_mindgrab_ood.py     (about 10 minutes on 2 CPU cores)
In-domain data: the one complete head MR volume of the corpus (dcm_qa_toshiba, Canon 3T DTI b0 EPI) and one more
real head EPI (dcm_qa_nih/GE_mr_0004: its first 15-slice time point, partial coverage). Mean and covariance come
from TRAIN augmented draws of the Toshiba volume (rotation ±12°, L-R mirror, gamma, bias field, noise, dropped end
slices); the threshold rejects at most 5 % of the validation scores: VALIDATION other draws and the GE volume.
Then it prints the scores of what must be refused: a head CT phantom, the abdominal CT, the abdominal MR of
../shared/train-data and the synthetic bench CT. Writes models/mr_brain_mindgrab/ood.npz and its SHA-256.
A script, not a module of models/: it reads DICOM with worker.load_volume, which models/ may not import.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from numpy.typing import NDArray
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.make_ct import write_ct  # noqa: E402
from models import meshnet_ood, ood  # noqa: E402
from models.cxr_pneumonia.fit_ood import write_stats_sha256  # noqa: E402
from models.registry import LoadedModel, load_model, load_spec, sha256_of  # noqa: E402
from worker import load_volume  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "models" / "mr_brain_mindgrab"
CORPUS = REPO.parent / "shared" / "dicom"
ABDOMINAL_MR = REPO.parent / "shared" / "train-data" / "totalsegmentator-ct" / "example_mr_sm.nii.gz"
TRAIN, VALIDATION = 8, 8
SEED = 20261207
Volume = tuple[NDArray[np.float32], NDArray[np.float64]]  # (slice, row, column) array, its LPS affine


def series(folder: Path) -> Volume:
    files = (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(("LICENSE", "README", "PROVENANCE")))
    volume = load_volume.load_series(sorted(files))
    return volume.array, volume.affine


def first_time_point(folder: Path) -> Volume:
    """A time series' first volume: the first file at each slice position."""
    first: dict[tuple[float, ...], Path] = {}
    for path in sorted(folder.glob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        first.setdefault(tuple(round(float(v), 2) for v in header.ImagePositionPatient), path)
    volume = load_volume.load_series(sorted(first.values()))
    return volume.array, volume.affine


def nifti_lps(path: Path) -> Volume:
    image = nib.nifti1.Nifti1Image.from_filename(path)
    return np.asarray(image.dataobj, dtype=np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine


def augmented(volume: Volume, rng: np.random.Generator) -> Volume:
    """One draw of what another head MR acquisition could look like: pose, contrast, coil shading, noise, coverage."""
    array, affine = volume
    drop = rng.integers(0, 6, size=2)
    array = array[drop[0] : array.shape[0] - drop[1]]
    affine = affine.copy()
    affine[:3, 3] += affine[:3, 0] * drop[0]
    if rng.random() < 0.5:
        array = array[:, :, ::-1]
        affine[:3, 3] += affine[:3, 2] * (array.shape[2] - 1)
        affine[:3, 2] *= -1.0
    scaled = np.clip(array / max(float(array.max()), 1e-6), 0.0, None) ** rng.uniform(0.7, 1.4)
    shading = ndimage.zoom(rng.uniform(0.8, 1.2, size=(2, 2, 2)), np.asarray(array.shape) / 2.0, order=1)
    noisy = scaled * shading[: array.shape[0], : array.shape[1], : array.shape[2]]
    noisy = noisy + rng.normal(0.0, rng.uniform(0.0, 0.03), size=array.shape)
    angles = np.deg2rad(rng.uniform(-12.0, 12.0, size=3))
    rotation = _rotation(angles)
    centre = affine @ np.append((np.asarray(array.shape) - 1.0) / 2.0, 1.0)
    turned = np.eye(4)
    turned[:3, :3] = rotation @ affine[:3, :3]
    turned[:3, 3] = centre[:3] - turned[:3, :3] @ ((np.asarray(array.shape) - 1.0) / 2.0)
    return np.ascontiguousarray(noisy * 1000.0, dtype=np.float32), turned


def _rotation(angles: NDArray[np.float64]) -> NDArray[np.float64]:
    result = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        plane = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[np.ix_(plane, plane)] = [[c, -s], [s, c]]
        result = turn @ result
    return result


def refused_volumes(tmp: Path) -> dict[str, Volume]:
    return {
        "head CT phantom (dcm_qa_ct/Philips_head_phantom/S2010)": series(
            CORPUS / "dcm_qa_ct/Philips_head_phantom/S2010"
        ),
        "abdominal CT (totalsegmentator-ct-abdomen)": series(CORPUS / "totalsegmentator-ct-abdomen"),
        "abdominal MR (train-data example_mr_sm.nii.gz)": nifti_lps(ABDOMINAL_MR),
        "bench CT (bench/make_ct.py, 64 slices)": series(write_ct(tmp / "bench", slices=64)[0].parent),
    }


def scores_of(model: LoadedModel, stats: ood.OodStats, volumes: dict[str, Volume]) -> dict[str, float]:
    result = {}
    for name, (array, affine) in volumes.items():
        result[name] = meshnet_ood.score(stats, meshnet_ood.volume_features(model, array, affine))
        print(f"  {result[name]:8.3f}  {name}", flush=True)
    return result


def main() -> int:
    torch.set_num_threads(2)
    model = load_model(load_spec("mr-brain-mindgrab"), "cpu")
    rng = np.random.default_rng(SEED)
    toshiba = series(CORPUS / "dcm_qa_toshiba")
    train = [meshnet_ood.volume_features(model, *augmented(toshiba, rng)) for _ in range(TRAIN)]
    train.append(meshnet_ood.volume_features(model, *toshiba))
    vectors = np.concatenate(train)
    means, precision = ood.fit(vectors, np.zeros(len(vectors), dtype=np.int64))
    provisional = ood.OodStats(means=means, precision=precision, threshold=0.0)
    print(f"train: {len(vectors)} head locations from the Toshiba volume and {TRAIN} draws; validation:")
    validation = {f"Toshiba draw {i + 1}": augmented(toshiba, rng) for i in range(VALIDATION)}
    validation["GE EPI (dcm_qa_nih/GE_mr_0004, 1st time point)"] = first_time_point(CORPUS / "dcm_qa_nih/GE_mr_0004")
    in_domain = np.array(list(scores_of(model, provisional, validation).values()))
    threshold = ood.calibrate(in_domain, reject_fraction=0.05)
    out = HERE / "ood.npz"
    ood.save_stats(out, ood.OodStats(means=means, precision=precision, threshold=threshold))
    write_stats_sha256(HERE / "spec.yaml", sha256_of(out))
    print(f"threshold {threshold:.3f}: {np.mean(in_domain <= threshold):.3f} of the validation volumes accepted")
    print("must be refused:")
    with tempfile.TemporaryDirectory() as tmp:
        refused = scores_of(model, provisional, refused_volumes(Path(tmp)))
    print(f"refused: {sum(s > threshold for s in refused.values())} of {len(refused)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
