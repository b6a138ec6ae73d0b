"""mr-brain-mindgrab without ground truth: how its brain mask on the head MR of the corpus moves with the cut-off.

Run from the repository root:  .venv/bin/python scripts/mindgrab_agreement.py      (one forward pass, ~2 minutes)
No reference mask exists here, so no reliability diagram or Brier score can be computed. What can be measured: the
mask at several cut-offs of the softmax "brain" probability (the shipped result is the argmax, i.e. 0.5, then the
largest component), its volume, its Dice against an independent threshold mask (Otsu, opening, largest component,
holes filled; the same as tests/integration/test_meshnet.py) and the share of head voxels whose probability is
undecided (between 0.1 and 0.9). Prints a Markdown table for the card.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage
from skimage.filters import threshold_otsu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import conform, meshnet_ood  # noqa: E402
from models.registry import load_model, load_spec  # noqa: E402
from worker.load_volume import load_series  # noqa: E402

HEAD_MR = Path(__file__).resolve().parents[2] / "shared" / "dicom" / "dcm_qa_toshiba"
CUT_OFFS = (0.1, 0.3, 0.5, 0.7, 0.9)


def threshold_mask(array: NDArray[np.float32]) -> NDArray[np.bool_]:
    foreground = array > float(threshold_otsu(array))  # type: ignore[no-untyped-call]
    foreground = ndimage.binary_opening(foreground, structure=np.ones((1, 3, 3)))
    components, _ = ndimage.label(foreground)
    largest = components == int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    return np.stack([ndimage.binary_fill_holes(plane) for plane in largest])


def main() -> int:
    torch.set_num_threads(2)
    model = load_model(load_spec("mr-brain-mindgrab"), "cpu")
    volume = load_series(sorted(HEAD_MR.glob("*.dcm")))
    settings = conform.ConformSettings.from_args(model.spec.network_args.get("conform", {}))
    conformed = conform.conform(volume.array, volume.affine, settings)
    low, high = float(conformed.array.min()), float(conformed.array.max())
    normalised = (conformed.array - low) / (high - low)
    box = conform.crop_box(normalised, settings)
    with torch.no_grad():
        logits = meshnet_ood.network_of(model)(torch.from_numpy(np.ascontiguousarray(normalised[box]))[None, None])
    brain = np.zeros(normalised.shape, dtype=np.float32)
    brain[box] = torch.softmax(logits[0], dim=0)[1].numpy()
    reference = threshold_mask(volume.array)
    head = normalised > 0.1
    undecided = float(((brain > 0.1) & (brain < 0.9) & head).sum()) / float(head.sum())
    print(f"head voxels with a brain probability between 0.1 and 0.9: {100 * undecided:.1f} %")
    print("| cut-off | brain (mL) | Dice vs threshold mask |\n|---|---|---|")
    for cut in CUT_OFFS:
        grid = conform.keep_largest_components((brain > cut).astype(np.uint8))
        mask = conform.on_source(grid, conformed.affine, volume.affine, volume.array.shape) == 1
        dice = 2.0 * float((mask & reference).sum()) / float(mask.sum() + reference.sum())
        print(f"| {cut:.1f} | {mask.sum() * volume.voxel_volume_ml:.0f} | {dice:.3f} |")
    print(f"threshold mask: {reference.sum() * volume.voxel_volume_ml:.0f} mL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
