"""Train ct-organs-tiny: seeded CPU training of a small 3D UNet on TotalSegmentator's public example CT.

Run from the repository root:  .venv/bin/python -m models.ct_organs_tiny.train [--data DIR]
Writes model.pt next to this file, prints its SHA-256 and writes that into spec.yaml (weights_sha256).
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.losses.dice import DiceCELoss
from numpy.typing import NDArray

from models import networks
from models.preprocess import resample
from models.registry import sha256_of
from models.spec import ModelSpec, Preprocessing

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "train-data" / "totalsegmentator-ct"
# (image, label map) pairs; example_seg_dicom.nii.gz is the held-out check and is never read here.
PAIRS = (("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"), ("example_ct_sm.nii.gz", "example_seg.nii.gz"))
PAIR_WEIGHTS = (0.75, 0.25)
# TotalSegmentator `total` id → our label: spleen, kidney_right, kidney_left, liver, stomach
TOTAL_TO_OURS = {1: 1, 2: 2, 3: 3, 5: 4, 6: 5}
AIR_HU = -1024.0
ScalarT = TypeVar("ScalarT", bound=np.generic)


@dataclass(frozen=True, slots=True)
class Case:
    """One training volume in RAS at the spec spacing: HU, our labels, and where each label's voxels are."""

    hu: NDArray[np.float32]
    labels: NDArray[np.uint8]
    voxels_by_label: dict[int, NDArray[np.intp]]


def _load_nifti(path: Path) -> MetaTensor:
    image = nib.nifti1.Nifti1Image.from_filename(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    return MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(image.affine, dtype=torch.float64))


def load_case(data_dir: Path, image_name: str, label_name: str, pre: Preprocessing) -> Case:
    """Resample image (trilinear) and labels (nearest) exactly as worker.infer does, then remap label ids."""
    hu = resample(_load_nifti(data_dir / image_name), pre.spacing_mm, mode="bilinear")
    total = resample(_load_nifti(data_dir / label_name), pre.spacing_mm, mode="nearest")
    total_ids = total.as_tensor()[0].round().to(torch.int64).numpy()
    labels = np.zeros(total_ids.shape, dtype=np.uint8)
    for total_id, ours in TOTAL_TO_OURS.items():
        labels[total_ids == total_id] = ours
    voxels = {ours: np.argwhere(labels == ours) for ours in TOTAL_TO_OURS.values()}
    present = {label: where for label, where in voxels.items() if len(where)}
    return Case(hu=hu.as_tensor()[0].numpy(), labels=labels, voxels_by_label=present)


def _crop(array: NDArray[ScalarT], start: NDArray[np.intp], size: NDArray[np.intp], fill: float) -> NDArray[ScalarT]:
    """array[start:start+size] with out-of-range voxels set to `fill`."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + np.asarray(size), array.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi, strict=True))] = array[
        tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))
    ]
    return out


def _sample(volume: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample a (x, y, z) volume on `grid`; outside is 0. Returns (1, *roi)."""
    return torch.nn.functional.grid_sample(
        volume[None, None], grid, mode=mode, padding_mode="zeros", align_corners=False
    )[0]


class Sampler:
    """Draws augmented (image, label) patches: class-balanced centres, contrast, affine, noise and z-padding."""

    def __init__(self, cases: Sequence[Case], pre: Preprocessing, seed: int) -> None:
        self.cases, self.pre = cases, pre
        self.rng = np.random.default_rng(seed)
        self.roi = np.asarray(pre.roi_size)
        self.margin = (self.roi * 1.25).astype(np.intp)  # room for rotation and zoom before the centre crop

    def _centre(self, case: Case) -> NDArray[np.intp]:
        if self.rng.random() < 0.15:
            return np.asarray([self.rng.integers(0, n) for n in case.hu.shape], dtype=np.intp)
        label = int(self.rng.choice(sorted(case.voxels_by_label)))
        voxels = case.voxels_by_label[label]
        jitter = self.rng.integers(-(self.roi // 3), self.roi // 3 + 1)
        return np.asarray(voxels[self.rng.integers(len(voxels))] + jitter, dtype=np.intp)

    def _contrast(self, hu: NDArray[np.float32]) -> NDArray[np.float32]:
        """Random enhancement of soft tissue only (contrast phases), plus a mild global gain."""
        shift = self.rng.uniform(-20.0, 70.0)
        soft = 1.0 / (1.0 + np.exp(-(hu + 60.0) / 15.0))
        gain = self.rng.uniform(0.9, 1.1)
        out: NDArray[np.float32] = ((hu + shift * soft) * gain).astype(np.float32)
        return out

    def _grid(self) -> torch.Tensor:
        """Sampling grid for a random rotation (small about x, y; larger about z) and zoom, centred on the patch."""
        angles = self.rng.uniform(-1.0, 1.0, size=3) * np.asarray([0.1, 0.1, 0.3])
        rotation = np.eye(3)
        for axis, angle in enumerate(angles):
            a, b = [i for i in range(3) if i != axis]
            turn = np.eye(3)
            turn[a, a] = turn[b, b] = np.cos(angle)
            turn[a, b], turn[b, a] = -np.sin(angle), np.sin(angle)
            rotation = rotation @ turn
        zoom = np.diag(1.0 + self.rng.uniform(-1.0, 1.0, size=3) * np.asarray([0.15, 0.15, 0.1]))
        # normalised output coordinate → patch voxel offset → input voxel offset → normalised input coordinate
        linear = np.diag(2.0 / self.margin) @ rotation @ zoom @ np.diag(self.roi / 2.0)
        theta = np.zeros((1, 3, 4))
        theta[0, :, :3] = linear[::-1, ::-1]  # grid_sample orders coordinates (last axis, …, first axis)
        size = (1, 1, *(int(n) for n in self.roi))
        return torch.nn.functional.affine_grid(torch.from_numpy(theta).float(), list(size), align_corners=False)

    def patch(self) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[self.rng.choice(len(self.cases), p=PAIR_WEIGHTS)]
        start = self._centre(case) - self.margin // 2
        labels = _crop(case.labels, start, self.margin, 0)
        hu = self._contrast(_crop(case.hu, start, self.margin, AIR_HU))
        scaled = np.clip((hu - self.pre.intensity_min) / (self.pre.intensity_max - self.pre.intensity_min), 0, 1)
        grid = self._grid()
        image = _sample(torch.from_numpy(scaled.astype(np.float32)), grid, "bilinear")
        label = _sample(torch.from_numpy(labels.astype(np.float32)), grid, "nearest").round().long()
        if self.rng.random() < 0.5:
            image = (image + torch.from_numpy(self.rng.normal(0, self.rng.uniform(0, 0.04), image.shape))).float()
        if self.rng.random() < 0.25:  # like sliding-window padding of a thin series
            low, high = self.rng.integers(0, 3, size=2)
            for lo, hi in ((0, low), (image.shape[-1] - high, image.shape[-1])):
                image[..., lo:hi] = 0.0
                label[..., lo:hi] = 0
        return image, label


def train(spec: ModelSpec, data_dir: Path, *, iterations: int, batch: int, seed: int) -> torch.nn.Module:
    """Seeded AdamW + Dice-CE training with a one-cycle learning rate; returns the network in eval mode."""
    cases = [load_case(data_dir, image, label, spec.preprocessing) for image, label in PAIRS]
    sampler = Sampler(cases, spec.preprocessing, seed)
    net = networks.build(spec.network, spec.network_args)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=3e-3, total_steps=iterations, pct_start=max(0.05, 2 / iterations)
    )
    started, running = time.monotonic(), 0.0
    net.train()
    for step in range(1, iterations + 1):
        patches = [sampler.patch() for _ in range(batch)]
        images = torch.stack([p[0] for p in patches])
        labels = torch.stack([p[1] for p in patches])
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(net(images), labels)
        loss.backward()
        optimiser.step()
        schedule.step()
        running += loss.item()
        if step % 100 == 0:
            print(f"step {step}/{iterations}  loss {running / 100:.4f}  {time.monotonic() - started:.0f} s", flush=True)
            running = 0.0
    return net.eval()


def write_sha256(spec_path: Path, sha256: str) -> None:
    """Replace the weights_sha256 value in spec.yaml, leaving the rest of the file as written."""
    text = spec_path.read_text(encoding="utf-8")
    updated, count = re.subn(r"(?m)^weights_sha256:.*$", f'weights_sha256: "{sha256}"', text)
    if count != 1:
        raise SystemExit(f"{spec_path} needs exactly one weights_sha256 line")
    spec_path.write_text(updated, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the TotalSegmentator examples")
    parser.add_argument("--out", type=Path, default=HERE / "model.pt")
    parser.add_argument("--iterations", type=int, default=900)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--threads", type=int, default=2, help="fixed so results do not depend on the machine")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    spec = ModelSpec.from_folder(HERE)
    started = time.monotonic()
    net = train(spec, args.data, iterations=args.iterations, batch=args.batch, seed=args.seed)
    torch.save(net.state_dict(), args.out)
    sha256 = sha256_of(args.out)
    print(
        f"trained in {time.monotonic() - started:.0f} s; {args.out.name}: {args.out.stat().st_size} bytes, "
        f"sha256 {sha256}"
    )
    if args.out.resolve() == spec.weights.resolve():
        write_sha256(HERE / "spec.yaml", sha256)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
