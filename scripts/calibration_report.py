"""Calibration and OOD acceptance of the shipped models, printed as the Markdown tables of their cards.

Run from the repository root:  .venv/bin/python scripts/calibration_report.py
cxr-pneumonia: Brier score and reliability (10 equal-width bins of the predicted probability) on the validation and
test splits of PneumoniaMNIST, and the share of each split under the OOD threshold. ct-organs-tiny: voxel-wise
multi-class Brier score and reliability of the top-class probability on the validation series (3 mm grid, voxels
inside the body), against TotalSegmentator's labels for it.
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

from models.cxr_pneumonia.train import DEFAULT_DATA, load_split  # noqa: E402
from models.ood import load_stats, projection_scores  # noqa: E402
from models.preprocess import preprocess, probabilities, resample, to_ras_image  # noqa: E402
from models.registry import LoadedModel, load_model, load_spec  # noqa: E402
from worker import infer, load_volume  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
CT_DIR = SHARED / "dicom" / "totalsegmentator-ct-abdomen"
REFERENCE = SHARED / "train-data" / "totalsegmentator-ct" / "example_seg_dicom.nii.gz"
TOTAL_TO_OURS = {1: 1, 2: 2, 3: 3, 5: 4, 6: 5}
Floats = NDArray[np.float64]


def reliability(confidence: Floats, correct: Floats) -> list[str]:
    """Markdown rows: bin, count, mean predicted, observed frequency."""
    rows = ["| predicted | images/voxels | mean predicted | observed |", "|---|---|---|---|"]
    edges = np.linspace(0.0, 1.0, 11)
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence >= low) & ((confidence < high) | (high == 1.0))
        if inside.any():
            rows.append(
                f"| {low:.1f}–{high:.1f} | {int(inside.sum())} | {confidence[inside].mean():.3f} | "
                f"{correct[inside].mean():.3f} |"
            )
    return rows


def cxr(model: LoadedModel) -> None:
    assert model.spec.ood is not None
    stats = load_stats(model.spec.ood)
    for split in ("val", "test"):
        data = load_split(DEFAULT_DATA, split)
        p = probabilities(model, data.images)
        y = data.labels.astype(np.float64)
        accepted = projection_scores(model, stats, model.spec.ood.layer, data.images) <= stats.threshold
        print(f"\n### cxr-pneumonia {split}: {len(y)} images")
        print(f"Brier {np.mean((p - y) ** 2):.4f}; OOD accepted {accepted.mean():.4f} ({int(accepted.sum())})")
        print("\n".join(reliability(p, y)))


def ct(model: LoadedModel) -> None:
    volume = load_volume.load_series(sorted(CT_DIR.iterdir()))
    image = to_ras_image(volume.array, volume.affine)
    prepared = preprocess(image, model.spec.preprocessing)
    with torch.no_grad():
        probs = torch.softmax(infer._predict(model, prepared), dim=0).numpy().astype(np.float64)
    total = np.asarray(nib.nifti1.Nifti1Image.from_filename(REFERENCE).dataobj, dtype=np.uint8)
    ours = np.zeros_like(total)
    for total_id, label in TOTAL_TO_OURS.items():
        ours[total == total_id] = label
    ref_image = nib.nifti1.Nifti1Image.from_filename(REFERENCE)
    reference = MetaTensor(
        torch.from_numpy(ours.astype(np.float32))[None], affine=torch.as_tensor(ref_image.affine, dtype=torch.float64)
    )
    ref = resample(reference, model.spec.preprocessing.spacing_mm, mode="nearest").as_tensor()[0].round().numpy()
    body = prepared.as_tensor()[0].numpy() > 0.05
    if ref.shape != probs.shape[1:]:
        raise SystemExit(f"grids differ: reference {ref.shape}, prediction {probs.shape[1:]}")
    onehot = np.stack([ref == k for k in range(probs.shape[0])]).astype(np.float64)
    brier = np.sum((probs - onehot) ** 2, axis=0)[body].mean()
    confidence = probs.max(axis=0)[body]
    correct = (probs.argmax(axis=0) == ref)[body].astype(np.float64)
    print(f"\n### ct-organs-tiny validation series: {int(body.sum())} body voxels on the 3 mm grid")
    print(f"multi-class Brier {brier:.4f} (body voxels); accuracy {correct.mean():.4f}")
    print("\n".join(reliability(confidence, correct)))


def main() -> int:
    torch.set_num_threads(2)
    cxr(load_model(load_spec("cxr-pneumonia"), "cpu"))
    ct(load_model(load_spec("ct-organs-tiny"), "cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
