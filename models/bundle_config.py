"""A MONAI Model Zoo bundle's config made to run here: its components checked for packages, the network and the
pre- and postprocessing adapted (DICOM volumes in, no file writers out, labels inverted onto the source grid)."""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping
from typing import Any

from monai.bundle.config_parser import ConfigParser

log = logging.getLogger(__name__)

PRED_KEY = "pred"  # MONAI engines' key for the network output (CommonKeys.PRED)
# MONAI components whose optional packages bundle metadata tends to leave out: component → (module, pip name)
NEEDS = {
    "SwinUNETR": ("einops", "einops"),
    "TorchVisionFCModel": ("torchvision", "torchvision"),
    "KeepLargestConnectedComponentd": ("skimage", "scikit-image"),
}
REMOVED_ARGS = {"SwinUNETR": ("img_size",)}  # keywords newer MONAI dropped; left out when the class lacks them
_WRITERS = ("SaveImaged", "SaveClassificationd")


class BundleError(RuntimeError):
    """A bundle cannot be loaded or run; the message names the bundle and never quotes patient data."""


class BundleUnsupported(BundleError):
    """A bundle needs a package this installation lacks; the message names the package."""


def component(item: Any) -> str:
    """The class name a config item instantiates ("" when it is no component)."""
    target = item.get("_target_") if isinstance(item, Mapping) else None
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else ""


def components(config: Any) -> list[str]:
    """Every component name in a config section, depth first."""
    children = config.values() if isinstance(config, Mapping) else config if isinstance(config, list) else ()
    return [component(config)] + [name for child in children for name in components(child)]


def check_packages(config: Any, name: str) -> None:
    """Raise BundleUnsupported naming the first package a component in `config` needs and cannot import."""
    for component in (c for c in components(config) if c in NEEDS):
        module, package = NEEDS[component]
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a wheel built for another torch failing in its own way
            problem = "is not installed" if isinstance(exc, ImportError) else f"fails to import ({type(exc).__name__})"
            raise BundleUnsupported(
                f"bundle {name}: {component} needs the package {package}, which {problem}"
            ) from None


def adapt_network(parser: ConfigParser) -> None:
    """Leave out keywords newer MONAI removed (SwinUNETR img_size); no ImageNet download for weights we replace."""
    network = parser.get("network_def")
    if not isinstance(network, dict):
        return
    target = component(network)
    cls = getattr(importlib.import_module("monai.networks.nets"), target, None)
    for arg in REMOVED_ARGS.get(target, ()):
        if arg in network and cls is not None and arg not in inspect.signature(cls).parameters:
            log.warning("bundle network %s: leaving out %s, which this MONAI no longer accepts", target, arg)
            network = {key: value for key, value in network.items() if key != arg}
    if network.get("pretrained") is True:
        network = {**network, "pretrained": False}
    parser["network_def"] = network


def replace_loader(
    parser: ConfigParser, inputs: Mapping[str, Any], spatial_dims: int, name: str, *, loader: type
) -> str:
    """Swap the preprocessing's LoadImaged for `loader` (models.bundle.LoadVolumed) on its first key; return the
    image key."""
    transforms = parser.get("preprocessing#transforms")
    for index, item in enumerate(transforms if isinstance(transforms, list) else []):
        if component(item) == "LoadImaged":
            keys = parser.get_parsed_content(f"preprocessing#transforms#{index}#keys")
            image_key = str(keys if isinstance(keys, str) else keys[0])
            parser[f"preprocessing#transforms#{index}"] = {
                "_target_": loader,
                "keys": image_key,
                "spatial_dims": spatial_dims,
                "channels": int(inputs.get("num_channels", 1)),
                "image_only": bool(item.get("image_only", True)),
            }
            return image_key
    raise BundleError(f"bundle {name}: preprocessing has no LoadImaged to feed the DICOM volume into")


def adapt_postprocessing(parser: ConfigParser, image_key: str, *, segmentation: bool, name: str) -> bool:
    """Drop file writers; invert discrete labels with nearest neighbours (or at all); return whether it argmaxes."""
    transforms = parser.get("postprocessing#transforms")
    if not isinstance(transforms, list):
        raise BundleError(f"bundle {name}: postprocessing is not a Compose of a transforms list")
    kept: list[Any] = []
    discrete = inverted = argmax = False
    for item in (t for t in transforms if component(t) not in _WRITERS):
        if component(item) == "Invertd":
            inverted = True
            if discrete and item.get("nearest_interp") is not True:
                log.warning("bundle %s inverts discrete labels with interpolation; using nearest neighbours", name)
                item = {**item, "nearest_interp": True}
        discrete = discrete or component(item).startswith("AsDiscrete")
        argmax = argmax or (isinstance(item, dict) and item.get("argmax") is True)
        kept.append(item)
    if segmentation and not inverted:
        kept.append(
            {
                "_target_": "Invertd",
                "keys": PRED_KEY,
                "transform": "@preprocessing",
                "orig_keys": image_key,
                "nearest_interp": discrete,
                "to_tensor": True,
            }
        )
    parser["postprocessing#transforms"] = kept
    return argmax
