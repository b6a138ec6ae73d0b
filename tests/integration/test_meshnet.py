"""mr-brain-mindgrab: the published tf.js files load unchanged into our MeshNet, and the brain mask of the one real
head MR volume of the corpus (dcm_qa_toshiba, DTI b0 EPI) is plausible: adult brain volume, close to a threshold mask.

Run: .venv/bin/python -m pytest tests/integration/test_meshnet.py -s   (the real-series test takes about a minute)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from scipy import ndimage
from skimage.filters import threshold_otsu

from models import conform
from models.meshnet import MeshNet, TfjsModelError, load_tfjs
from models.registry import LoadedModel, ModelLoadError, load_model, load_spec, sha256_of
from worker.load_volume import load_series
from worker.pipeline import segment
from worker.volume import Volume

SHARED = Path(os.environ.get("PACSAI_SHARED_DIR", Path(__file__).resolve().parents[2].parent / "shared"))
MR_DIR = SHARED / "dicom" / "dcm_qa_toshiba"
PUBLISHED = SHARED / "train-data" / "weights" / "brainchop-meshnet" / "mindgrab"
PUBLISHED_PARAMETERS = 146_237  # arXiv:2506.11860
# measured (torch 2.13 CPU): 1278 mL, Dice 0.944 against the threshold mask (1320 mL)
ADULT_BRAIN_ML = (1000.0, 1700.0)
MIN_DICE_VS_THRESHOLD = 0.90


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(load_spec("mr-brain-mindgrab"), "cpu")


def test_shipped_files_are_the_published_ones(model: LoadedModel) -> None:
    """Checksums in the spec are those of the files as published (the shared copy of brainchop @ 4c87885)."""
    spec = model.spec
    if not PUBLISHED.is_dir():
        pytest.skip(f"published weights not found under {PUBLISHED}")
    assert sha256_of(spec.weights) == spec.weights_sha256 == sha256_of(PUBLISHED / "model.json")
    for name, digest in spec.network_args["shards_sha256"].items():
        assert sha256_of(spec.weights.parent / name) == digest == sha256_of(PUBLISHED / name)


def test_network_has_the_published_shape(model: LoadedModel) -> None:
    """25 dilated 3×3×3 convolutions of 15 channels with normalisation and GELU, 1×1×1 to 2 classes, 146,237 values."""
    network = model.module
    assert isinstance(network, MeshNet)
    assert sum(p.numel() for p in network.parameters()) == PUBLISHED_PARAMETERS
    hidden, last = network.layers[:-1], network.layers[-1]
    assert [layer.dilation for layer in hidden] == [16, 8, 4, 2, 1] * 5
    assert all(layer.out_channels == 15 and layer.normalise and layer.activation == "gelu" for layer in hidden)
    assert (last.kernel, last.out_channels, last.bias, last.activation) == (1, 2, True, "linear")
    with torch.no_grad():
        logits = network(torch.rand(1, 1, 24, 20, 16))
    assert logits.shape == (1, 2, 24, 20, 16) and bool(torch.isfinite(logits).all())


def test_kernels_are_the_manifest_values_transposed(model: LoadedModel) -> None:
    """The first kernel in torch layout equals the first float32 values of model.bin read as (d, h, w, in, out)."""
    manifest = json.loads(model.spec.weights.read_text(encoding="utf-8"))["weightsManifest"][0]["weights"][0]
    raw = np.fromfile(model.spec.weights.parent / "model.bin", dtype="<f4", count=int(np.prod(manifest["shape"])))
    keras = raw.reshape(manifest["shape"])
    assert isinstance(model.module, MeshNet)
    conv = model.module.convs[0]
    assert isinstance(conv, torch.nn.Conv3d)
    torch_kernel = conv.weight.detach().numpy()
    assert np.array_equal(torch_kernel, keras.transpose(4, 3, 0, 1, 2))


def test_altered_shard_is_refused(tmp_path: Path) -> None:
    """A changed byte in model.bin stops the load with a checksum error; a manifest naming other shards too."""
    folder = tmp_path / "mr_brain_mindgrab"
    shutil.copytree(load_spec("mr-brain-mindgrab").weights.parent, folder)
    data = bytearray((folder / "model.bin").read_bytes())
    data[100] ^= 0xFF
    (folder / "model.bin").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="model.bin"):
        load_model(load_spec("mr-brain-mindgrab", tmp_path), "cpu")
    with pytest.raises(TfjsModelError, match="manifest names shards"):
        load_tfjs(folder / "model.json", expected_shards=frozenset({"other.bin"}))


def test_conformed_grid_is_lia_1mm_centred() -> None:
    """The conformed affine: 1 mm, voxel axes towards Left, Inferior, Anterior; its centre on the source's centre."""
    source = np.diag([2.0, 0.5, 0.5, 1.0])
    source[:3, 3] = (-40.0, 10.0, 5.0)
    grid = conform.conformed_affine((41, 101, 61), source, conform.ConformSettings())
    assert np.allclose(grid[:3, :3], [[1, 0, 0], [0, 0, -1], [0, -1, 0]])
    centre_source = source @ np.array([20.0, 50.0, 30.0, 1.0])
    assert np.allclose(grid @ np.array([128.0, 128.0, 128.0, 1.0]), centre_source)


@pytest.fixture(scope="module")
def mr() -> Volume:
    if not MR_DIR.is_dir():
        pytest.skip(f"shared corpus not found under {SHARED} (set PACSAI_SHARED_DIR)")
    return load_series(sorted(MR_DIR.glob("*.dcm")))


def threshold_mask(volume: Volume) -> NDArray[np.bool_]:
    """Independent of the model: Otsu foreground, opened in plane, largest component, holes filled slice by slice."""
    foreground = volume.array > float(threshold_otsu(volume.array))  # type: ignore[no-untyped-call]
    foreground = ndimage.binary_opening(foreground, structure=np.ones((1, 3, 3)))
    components, _ = ndimage.label(foreground)
    largest = components == int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    return np.stack([ndimage.binary_fill_holes(plane) for plane in largest])


@pytest.mark.slow
def test_brain_mask_of_a_real_head_mr_is_plausible(model: LoadedModel, mr: Volume) -> None:
    """Adult brain volume, Dice ≥ 0.90 against the threshold mask, and the mask lies within the head."""
    labels = segment(model, mr)
    assert labels.shape == mr.array.shape and set(np.unique(labels)) == {0, 1}
    brain = labels == 1
    volume_ml = float(brain.sum()) * mr.voxel_volume_ml
    reference = threshold_mask(mr)
    dice = 2.0 * float((brain & reference).sum()) / float(brain.sum() + reference.sum())
    print(f"brain {volume_ml:.0f} mL, threshold mask {reference.sum() * mr.voxel_volume_ml:.0f} mL, Dice {dice:.3f}")
    assert ADULT_BRAIN_ML[0] <= volume_ml <= ADULT_BRAIN_ML[1]
    assert dice >= MIN_DICE_VS_THRESHOLD
    assert float((brain & reference).sum()) / float(brain.sum()) > 0.9
