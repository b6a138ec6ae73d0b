"""MONAI bundles as models: the bundle's own network, transforms, inferer and labels, fed volumes loaded from DICOM.

Over 300 lines on purpose: a bundle's load, its transforms and its inference are one contract with MONAI's configs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from billiard.exceptions import SoftTimeLimitExceeded
from monai.bundle.config_parser import ConfigParser
from monai.data.meta_tensor import MetaTensor
from monai.inferers.inferer import Inferer, SlidingWindowInferer
from monai.transforms.compose import Compose
from monai.transforms.transform import MapTransform
from numpy.typing import NDArray

from models.bundle_config import (  # BundleError, BundleUnsupported: re-exported, the errors of this module
    PRED_KEY,
    BundleError,
    BundleUnsupported,
    adapt_network,
    adapt_postprocessing,
    check_packages,
    component,
    replace_loader,
)
from models.spec import Task

log = logging.getLogger(__name__)
__all__ = [
    "BundleError",
    "BundleModel",
    "BundleUnsupported",
    "LoadVolumed",
    "instantiate_network",
    "load_bundle",
    "read_bundle",
    "run_bundle",
]

CONFIG_FILES = ("configs/metadata.json", "configs/inference.json")
WEIGHT_FILES = ("models/model.pt", "models/model.ts")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NO_CHANNEL = float("nan")  # MONAI readers' original_channel_dim for an array without a channel axis


class VolumeLike(Protocol):
    """worker.volume.Volume as read here: (slice, row, column) float32 array; affine maps voxels to LPS mm."""

    @property
    def array(self) -> NDArray[np.float32]: ...

    @property
    def affine(self) -> NDArray[np.float64]: ...


@dataclass(frozen=True, slots=True)
class BundleModel:
    """A bundle ready to run: eval-mode network, the bundle's transforms without file I/O, its inferer.

    `labels` are the output channel names from metadata.json; label value k is channel k when `argmax` is true,
    else the bundle's postprocessing assigns the values (BraTS: 1, 2, 4). `inputs` name the input channels.
    """

    name: str
    version: str
    task: Task
    labels: tuple[str, ...]
    inputs: tuple[str, ...]
    network: torch.nn.Module
    preprocessing: Compose
    inferer: Inferer
    postprocessing: Compose
    device: torch.device
    image_key: str
    spatial_dims: int
    argmax: bool
    amp: bool


class LoadVolumed(MapTransform):
    """Stands in for LoadImaged: the volumes in data[key] → the MetaTensor MONAI's readers give for the series.

    3D: (column, row, slice), slices ascending along the normal as ITK orders them, RAS affine; several volumes
    (one per input channel) stack on a new first axis, as LoadImaged stacks a list of files. 2D: (column, row),
    grey repeated into `channels` last-axis channels when the bundle reads RGB exports (PIL's layout for a PNG).
    """

    def __init__(self, keys: Any, spatial_dims: int = 3, channels: int = 1, image_only: bool = True) -> None:
        super().__init__(keys)
        self.spatial_dims, self.channels, self.image_only = spatial_dims, channels, image_only

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._image(tuple(d[key]))
            if not self.image_only:
                d[f"{key}_meta_dict"] = dict(d[key].meta)
        return d

    def _image(self, volumes: Sequence[VolumeLike]) -> MetaTensor:
        affine = LPS_TO_RAS @ volumes[0].affine[:, [2, 1, 0, 3]]
        arrays = [np.transpose(v.array, (2, 1, 0)) for v in volumes]
        if self.spatial_dims == 2:
            arrays = [a[..., 0] for a in arrays]
            affine = np.diag([*np.linalg.norm(affine[:3, :2], axis=0), 1.0])
        spatial_shape, channel_dim, array = np.asarray(arrays[0].shape), NO_CHANNEL, arrays[0]
        if len(arrays) > 1:
            array, channel_dim = np.stack(arrays), 0
        elif self.spatial_dims == 2 and self.channels > 1:
            array, channel_dim = np.repeat(array[..., None], self.channels, axis=-1), -1
        meta = {
            "original_affine": affine,
            "spatial_shape": spatial_shape,
            "original_channel_dim": channel_dim,
            "space": "RAS",
            "filename_or_obj": "dicom-series",
        }
        data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return MetaTensor(data, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def is_bundle(folder: Path) -> bool:
    """A MONAI bundle folder holds configs/metadata.json and configs/inference.json."""
    return all((folder / name).is_file() for name in CONFIG_FILES)


def read_bundle(folder: Path, device: str = "cpu", overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """The bundle's configs with bundle_root, device and `overrides` (config ids such as displayable_configs#…)."""
    if not is_bundle(folder):
        raise BundleError(f"bundle {folder.name}: configs/metadata.json or configs/inference.json is missing")
    parser = ConfigParser()
    try:
        parser.read_meta(folder / CONFIG_FILES[0])
        parser.read_config(folder / CONFIG_FILES[1])
    except (OSError, ValueError) as exc:
        raise BundleError(f"bundle {folder.name}: configs cannot be read ({type(exc).__name__})") from None
    parser["bundle_root"] = str(folder)
    for device_id in ("device", "inferer#device"):
        if parser.get(device_id) is not None:
            parser[device_id] = f"$torch.device({device!r})"
    parser.update(dict(overrides or {}))
    adapt_network(parser)
    return parser


def instantiate_network(parser: ConfigParser, name: str) -> torch.nn.Module:
    """The bundle's network_def, freshly initialised; BundleUnsupported names a missing package."""
    check_packages(parser.get("network_def"), name)
    network: torch.nn.Module = _parsed(parser, "network_def", name)
    return network


def load_bundle(folder: Path, device: str, *, overrides: Mapping[str, Any] | None = None) -> BundleModel:
    """The bundle with its weights in eval mode on `device` (a device name, as registry.pick_device returns)."""
    target = torch.device(device)
    parser = read_bundle(folder, str(target), overrides)
    meta: dict[str, Any] = parser.get("_meta_", {})
    name, formats = str(meta.get("name", folder.name)), meta.get("network_data_format", {})
    inputs, outputs = formats.get("inputs", {}).get("image", {}), formats.get("outputs", {}).get(PRED_KEY, {})
    classifies = outputs.get("format") != "segmentation" and "classif" in str(meta.get("task", "")).lower()
    task = Task.CLASSIFICATION if classifies else Task.SEGMENTATION
    for section in ("network_def", "preprocessing", "inferer", "postprocessing"):
        check_packages(parser.get(section), name)
    spatial_dims = len(inputs.get("spatial_shape", "xyz"))
    image_key = replace_loader(parser, inputs, spatial_dims, name, loader=LoadVolumed)
    argmax = adapt_postprocessing(parser, image_key, segmentation=task is Task.SEGMENTATION, name=name)
    model = BundleModel(
        name=name,
        version=str(meta.get("version", "0")),
        task=task,
        labels=_channel_names(outputs),
        inputs=_channel_names(inputs) or (image_key,),
        network=_weighted_network(parser, folder, name, target),
        preprocessing=_parsed(parser, "preprocessing", name),
        inferer=_parsed(parser, "inferer", name),
        postprocessing=_parsed(parser, "postprocessing", name),
        device=target,
        image_key=image_key,
        spatial_dims=spatial_dims,
        argmax=argmax,
        amp=bool(parser.get("evaluator#amp", False)),
    )
    log.info("loaded bundle %s %s (%s) on %s", folder.name, model.version, task.value, target)
    return model


def run_bundle(
    model: BundleModel,
    volume: VolumeLike | Mapping[str, VolumeLike],
    *,
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int | None = None,
) -> NDArray[Any]:
    """Segmentation: uint8 label map shaped like volume.array; classification: float32 score per label.

    A multi-channel bundle takes {input channel name (model.inputs): volume}, all on one grid. `roi_size` and
    `sw_batch_size` replace the bundle's sliding-window settings, e.g. a shallow window for a thin series.
    """
    volumes = _in_channel_order(model, volume)
    data = model.preprocessing({model.image_key: volumes})
    image = data[model.image_key]
    amp = torch.autocast("cuda") if model.amp and model.device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.no_grad(), amp:
            raw = _window(model.inferer, roi_size, sw_batch_size)(image[None].to(model.device), model.network)
        pred = raw[0].as_subclass(torch.Tensor)  # a bare tensor: Invertd takes the geometry from the image
        data[PRED_KEY] = MetaTensor(pred.detach().float().cpu(), meta=dict(image.meta))
        out = model.postprocessing(data)[PRED_KEY]
    except ImportError as exc:
        raise BundleUnsupported(f"bundle {model.name}: a package is missing ({exc})") from exc
    result = np.asarray(out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else out)
    if model.task is Task.CLASSIFICATION:
        return result.reshape(-1).astype(np.float32)
    return _label_map(result, volumes[0].array.shape, model.name)


def _channel_names(section: Mapping[str, Any]) -> tuple[str, ...]:
    channels = section.get("channel_def", {})
    return tuple(str(channels[key]) for key in sorted(channels, key=int))


def _parsed(parser: ConfigParser, section: str, name: str) -> Any:
    """Instantiate one config section; a missing optional package becomes BundleUnsupported."""
    try:
        with warnings.catch_warnings():  # MONAI's notices of future default changes (Orientationd labels)
            warnings.simplefilter("ignore", FutureWarning)
            return parser.get_parsed_content(section)
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ImportError):
            cause = cause.__cause__
        if cause is not None:
            raise BundleUnsupported(f"bundle {name}: {section} needs a missing package ({cause})") from exc
        raise BundleError(f"bundle {name}: {section} cannot be built ({type(exc).__name__}: {exc})") from exc


def _weights_path(parser: ConfigParser, folder: Path, name: str) -> Path | None:
    """The file the bundle's own CheckpointLoader reads, else models/model.pt, else models/model.ts."""
    handlers = [
        f"handlers#{i}" for i, h in enumerate(parser.get("handlers") or []) if component(h) == "CheckpointLoader"
    ]
    ids = [f"{loader}#load_path" for loader in ("checkpointloader", *handlers)]
    configured = [Path(str(_parsed(parser, i, name))) for i in ids if parser.get(i) is not None]
    return next((path for path in [*configured, *(folder / f for f in WEIGHT_FILES)] if path.is_file()), None)


def _weighted_network(parser: ConfigParser, folder: Path, name: str, device: torch.device) -> torch.nn.Module:
    """TorchScript model.ts as it is, or network_def with the checkpoint loaded strictly; eval mode on `device`."""
    path = _weights_path(parser, folder, name)
    if path is None:
        raise BundleError(f"bundle {name}: no weights (models/model.pt or models/model.ts)")
    if path.suffix == ".ts":
        scripted: torch.nn.Module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
        return scripted.eval()
    network = instantiate_network(parser, name)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # a checkpoint saved as {"model": state_dict}
        network.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, OSError, pickle.UnpicklingError) as exc:
        raise BundleError(f"bundle {name}: {path.name} does not load into network_def ({type(exc).__name__})") from None
    return network.to(device).eval()


def _in_channel_order(model: BundleModel, volume: VolumeLike | Mapping[str, VolumeLike]) -> tuple[VolumeLike, ...]:
    """The input volumes in model.inputs order, checked to share one grid."""
    if not isinstance(volume, Mapping):
        if len(model.inputs) > 1:
            raise BundleError(f"bundle {model.name} takes {len(model.inputs)} series: {', '.join(model.inputs)}")
        volume = {model.inputs[0]: volume}
    if set(volume) != set(model.inputs):
        raise BundleError(f"bundle {model.name} takes {', '.join(model.inputs)}; got {', '.join(sorted(volume))}")
    volumes = tuple(volume[channel] for channel in model.inputs)
    first = volumes[0]
    if model.spatial_dims == 2 and first.array.shape[0] != 1:
        raise BundleError(f"bundle {model.name} reads one 2D image, not {first.array.shape[0]} slices")
    if any(
        v.array.shape != first.array.shape or not np.allclose(v.affine, first.affine, atol=1e-3) for v in volumes[1:]
    ):
        raise BundleError(f"bundle {model.name}: the input series are not on one grid (register and resample them)")
    return volumes


def _window(inferer: Inferer, roi_size: Sequence[int] | None, sw_batch_size: int | None) -> Inferer:
    """The bundle's inferer, or a copy of its SlidingWindowInferer with another window size or batch."""
    if roi_size is None and sw_batch_size is None:
        return inferer
    if not isinstance(inferer, SlidingWindowInferer):
        raise BundleError(f"roi_size and sw_batch_size need a SlidingWindowInferer, not {type(inferer).__name__}")
    changed = copy.copy(inferer)
    changed.roi_size = tuple(roi_size) if roi_size is not None else inferer.roi_size
    changed.sw_batch_size = sw_batch_size or inferer.sw_batch_size
    return changed


def _label_map(result: NDArray[Any], source_shape: tuple[int, ...], name: str) -> NDArray[np.uint8]:
    """(1, column, row, slice) labels → uint8 (slice, row, column); refuses interpolated or out-of-range values."""
    if result.ndim != 4 or result.shape[0] != 1:
        raise BundleError(f"bundle {name}: postprocessing left shape {result.shape}, not one 3D label channel")
    labels = np.transpose(result[0], (2, 1, 0))
    if labels.shape != source_shape:
        raise BundleError(f"bundle {name}: labels came back {labels.shape}, expected the source grid {source_shape}")
    if not np.array_equal(labels, np.rint(labels)) or labels.min() < 0 or labels.max() > 255:
        raise BundleError(f"bundle {name}: postprocessing left values that are not uint8 labels")
    return np.ascontiguousarray(labels, dtype=np.uint8)
