"""Every MONAI bundle in ../shared/monai-bundles loads through models.bundle and runs on a real DICOM series.

No weights are shipped: each test builds the bundle's own network_def, seeds torch with 0 and saves the random
state_dict where the bundle's CheckpointLoader looks. Outputs are checked for grid, dtype and label set, not accuracy.
CT bundles run on totalsegmentator-ct-abdomen (20 slices of 512x512). The only real MR volume series in the corpus
that load_series accepts is dcm_qa_toshiba (40 oblique slices of 64x64), so MR bundles run on it, and BraTS, which
wants T1c, T1, T2 and FLAIR, gets that same series in all four channels.
A bundle whose components need a package we lack must fail with BundleUnsupported naming that package.

Run: .venv/bin/python -m pytest tests/integration/test_bundles.py -m slow --durations=0
"""

from __future__ import annotations

import importlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms.io.dictionary import LoadImaged
from monai.transforms.spatial.dictionary import Orientationd
from monai.transforms.utility.dictionary import EnsureChannelFirstd
from numpy.typing import NDArray
from pydicom.pixels.processing import apply_modality_lut

from models.bundle import (
    BundleError,
    BundleUnsupported,
    LoadVolumed,
    instantiate_network,
    load_bundle,
    read_bundle,
    run_bundle,
)
from models.spec import Task
from tests.services import SHARED
from worker.load_volume import load_series
from worker.volume import Volume

pytestmark = pytest.mark.slow

BUNDLES = SHARED / "monai-bundles"
CT = SHARED / "dicom" / "totalsegmentator-ct-abdomen"
MR = SHARED / "dicom" / "dcm_qa_toshiba"
RADIOGRAPH = SHARED / "dicom" / "pydicom-data" / "RG1_UNCR.dcm"
THIN_CT_WINDOW = (96, 96, 32)  # the CT is 20 slices (40 mm) deep: a 96-voxel-deep window would be mostly padding


@dataclass(frozen=True)
class Case:
    """How one bundle is tested: its series, bundle config overrides, window, and the package it may lack."""

    series: Path
    task: Task = Task.SEGMENTATION
    weights: str = "models/model.pt"
    overrides: dict[str, Any] = field(default_factory=dict)
    roi_size: tuple[int, int, int] | None = None
    needs: tuple[str, str] | None = None  # (module, pip name) a component needs beyond our dependencies
    values: frozenset[int] | None = None  # label values when they are not the output channel numbers
    crop: tuple[int, int] | None = None  # run on the central (slices, columns) box only (heavy networks on CPU)


CASES = {
    "spleen_ct_segmentation": Case(CT, roi_size=THIN_CT_WINDOW),
    # the bundle's documented 3 mm option (displayable_configs#highres) and its weights file, to stay fast on CPU
    "wholeBody_ct_segmentation": Case(
        CT, weights="models/model_lowres.pt", overrides={"displayable_configs#highres": False}, roi_size=THIN_CT_WINDOW
    ),
    "swin_unetr_btcv_segmentation": Case(CT, roi_size=THIN_CT_WINDOW, needs=("einops", "einops"), crop=(20, 128)),
    "breast_density_classification": Case(RADIOGRAPH, Task.CLASSIFICATION, needs=("torchvision", "torchvision")),
    # BraTS postprocessing writes 1 tumour core, 2 oedema, 4 enhancing tumour (its Lambdad; docs/README.md)
    "brats_mri_segmentation": Case(MR, roi_size=(64, 64, 40), values=frozenset({0, 1, 2, 4})),
    "prostate_mri_anatomy": Case(MR, needs=("skimage", "scikit-image"), crop=(6, 48)),  # KeepLargest…d
}


@pytest.fixture(scope="module")
def volumes() -> dict[Path, Volume]:
    if not BUNDLES.is_dir() or not all(path.exists() for path in (CT, MR, RADIOGRAPH)):
        pytest.skip(f"shared bundles or DICOM corpus not found under {SHARED}")
    series = {folder: load_series(sorted(p for p in folder.iterdir() if p.name != "LICENSE")) for folder in (CT, MR)}
    return {**series, RADIOGRAPH: radiograph(RADIOGRAPH)}


def radiograph(path: Path) -> Volume:
    """One projection image as a one-slice Volume (load_series wants a stack with positions; a CR has none)."""
    ds = pydicom.dcmread(path)
    array = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)[None]
    return Volume(array=array, affine=np.eye(4), datasets=(ds,))


def central_crop(volume: Volume, box: tuple[int, int]) -> Volume:
    """The central box (slices, then size x size columns of each), the origin moved to the box's first voxel."""
    depth, size = box
    slices, rows, columns = volume.array.shape
    first, top, left = max((slices - depth) // 2, 0), max((rows - size) // 2, 0), max((columns - size) // 2, 0)
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, 0] * first + affine[:3, 1] * top + affine[:3, 2] * left
    array = np.ascontiguousarray(volume.array[first : first + depth, top : top + size, left : left + size])
    return Volume(array=array, affine=affine, datasets=volume.datasets[first : first + depth])


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a wheel built for another torch fails in its own ways
        return False
    return True


def bundle_copy(name: str, tmp_path: Path) -> Path:
    """The bundle's configs (no weights, no scripts) in a scratch folder."""
    folder = tmp_path / name
    shutil.copytree(BUNDLES / name / "configs", folder / "configs")
    return folder


def write_random_weights(folder: Path, case: Case, overrides: dict[str, Any] | None = None) -> None:
    """A seeded random state_dict of the bundle's own network_def, where its CheckpointLoader reads it."""
    torch.manual_seed(0)
    network = instantiate_network(read_bundle(folder, "cpu", overrides or case.overrides), folder.name)
    path = folder / case.weights
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)


def metadata(folder: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((folder / "configs" / "metadata.json").read_text(encoding="utf-8"))
    return meta


def test_every_shared_bundle_has_a_case() -> None:
    if not BUNDLES.is_dir():
        pytest.skip(f"shared bundles not found under {SHARED}")
    assert sorted(p.name for p in BUNDLES.iterdir() if p.is_dir()) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bundle_runs_on_dicom(name: str, tmp_path: Path, volumes: dict[Path, Volume]) -> None:
    case = CASES[name]
    folder = bundle_copy(name, tmp_path)
    if case.needs is not None and not importable(case.needs[0]):
        with pytest.raises(BundleUnsupported, match=f"needs the package {case.needs[1]}, which"):
            load_bundle(folder, "cpu", overrides=case.overrides)
        return
    write_random_weights(folder, case)
    model = load_bundle(folder, "cpu", overrides=case.overrides)
    meta = metadata(folder)
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert model.labels == tuple(channels[str(k)] for k in range(len(channels)))
    assert (model.name, model.version, model.task) == (meta["name"], meta["version"], case.task)
    volume = central_crop(volumes[case.series], case.crop) if case.crop else volumes[case.series]
    if model.task is Task.CLASSIFICATION:
        check_scores(run_bundle(model, volume), len(model.labels))
        return
    if len(model.inputs) > 1:
        with pytest.raises(BundleError, match="takes 4 series"):
            run_bundle(model, volume)
    # BraTS wants T1c, T1, T2 and FLAIR: the corpus has one real MR volume, so every channel gets that same series
    source = {channel: volume for channel in model.inputs} if len(model.inputs) > 1 else volume
    labels = run_bundle(model, source, roi_size=case.roi_size)
    assert labels.shape == volume.array.shape
    assert labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= (case.values or set(range(len(model.labels))))


def test_loaded_volume_matches_monai_reading_the_dicom_folder(volumes: dict[Path, Volume]) -> None:
    """LoadVolumed gives the image MONAI's own reader gives for the series, up to slice order (same voxels in RAS)."""
    keys = "image"
    ours = LoadVolumed(keys)({keys: (volumes[CT],)})
    theirs = LoadImaged(keys, reader="PydicomReader")({keys: str(CT)})
    assert ours[keys].shape == theirs[keys].shape
    to_ras = [EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS", labels=None)]
    for transform in to_ras:
        ours, theirs = transform(ours), transform(theirs)
    assert np.array_equal(ours[keys].numpy(), theirs[keys].numpy())
    assert np.allclose(ours[keys].affine.numpy(), theirs[keys].affine.numpy(), atol=1e-4)


def check_scores(scores: NDArray[Any], classes: int) -> None:
    assert scores.shape == (classes,)
    assert scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))


def test_classification_path_with_a_stand_in_network(tmp_path: Path, volumes: dict[Path, Volume]) -> None:
    """breast_density's own transforms and labels on a real radiograph, with MONAI's DenseNet121 as network_def.

    The bundle's inception_v3 needs torchvision (see the unsupported case above); this stand-in exercises the 2D
    classification path: grey image → 3 channels (the bundle reads RGB exports) → Resized 299 → sigmoid scores.
    """
    stand_in = {"network_def": {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 3, "out_channels": 4}}
    folder = bundle_copy("breast_density_classification", tmp_path)
    write_random_weights(folder, Case(RADIOGRAPH), stand_in)
    model = load_bundle(folder, "cpu", overrides=stand_in)
    assert (model.task, model.labels) == (Task.CLASSIFICATION, ("A", "B", "C", "D"))
    check_scores(run_bundle(model, volumes[RADIOGRAPH]), 4)
    with pytest.raises(BundleError, match="one 2D image"):
        run_bundle(model, volumes[MR])


@pytest.mark.catalogue("W8")
@pytest.mark.parametrize("series", [CT, MR], ids=["axial-ct", "oblique-mr"])
def test_labels_land_on_the_source_voxels(series: Path, tmp_path: Path, volumes: dict[Path, Volume]) -> None:
    """spleen's transforms with a 1x1x1 convolution whose answer is known: label 1 where the scaled value > 0.5.

    After Orientationd, Spacingd, ScaleIntensityRanged(-57..164 HU → 0..1), inference and Invertd, the labels must
    agree with thresholding the source at -57 + 0.5 * 221 HU on the source grid (measured: CT 98%, oblique MR 97%;
    a flipped row or slice axis scores 82–93%).
    """
    stand_in = {"network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}}
    folder = bundle_copy("spleen_ct_segmentation", tmp_path)
    network = instantiate_network(read_bundle(folder, "cpu", stand_in), folder.name)
    with torch.no_grad():
        network.weight.copy_(  # type: ignore[operator]  # a Conv3d, typed as Module here
            torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1)
        )
        network.bias.copy_(  # type: ignore[operator]
            torch.tensor([0.5, 0.0])
        )  # channel 0 = 0.5, channel 1 = the scaled value
    (folder / "models").mkdir()
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    volume = volumes[series]
    labels = run_bundle(load_bundle(folder, "cpu", overrides=stand_in), volume)
    expected = volume.array > -57 + 0.5 * 221
    assert labels.shape == volume.array.shape
    assert np.mean(labels.astype(bool) == expected) > 0.95
