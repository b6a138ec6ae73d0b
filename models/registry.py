"""Model registry: model name → ModelSpec, and a spec → checksum-verified, eval-mode network on a device."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from models import networks
from models.bundle import BundleError, BundleModel, load_bundle
from models.meshnet import TfjsModelError, load_tfjs
from models.spec import BUNDLE_NETWORK, MESHNET_NETWORK, ModelSpec, SpecError

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).parent
_CHUNK_BYTES = 1 << 20


class ModelLoadError(RuntimeError):
    """A model cannot be loaded (unknown, missing or altered weights, unknown network); the message names it."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A spec with its network in eval mode on `device`."""

    spec: ModelSpec
    module: torch.nn.Module
    device: torch.device
    bundle: BundleModel | None = None  # set when the model is a MONAI bundle (spec network "monai.bundle")


def _folder_name(name: str) -> str:
    """Model "ct-organs-tiny" lives in folder ct_organs_tiny (a Python-importable name)."""
    return name.replace("-", "_")


def load_spec(name: str, models_dir: Path = MODELS_DIR) -> ModelSpec:
    """The spec of model `name`, read from models_dir/<name with - as _>/spec.yaml."""
    folder = models_dir / _folder_name(name)
    if not (folder / "spec.yaml").is_file():
        known = ", ".join(spec.name for spec in list_specs(models_dir)) or "none"
        raise ModelLoadError(f"no model named {name!r} (known: {known})")
    spec = ModelSpec.from_folder(folder)
    if spec.name != name:
        raise SpecError(f"model {folder.name}: spec.yaml names it {spec.name!r}, expected {name!r}")
    return spec


def list_specs(models_dir: Path = MODELS_DIR) -> list[ModelSpec]:
    """Every model folder's spec (folders holding a spec.yaml), sorted by model name."""
    folders = sorted(p.parent for p in models_dir.glob("*/spec.yaml"))
    return sorted((ModelSpec.from_folder(folder) for folder in folders), key=lambda spec: spec.name)


def pick_device(requested: str) -> str:
    """ "auto" → "cuda" when CUDA is available, else "cpu"; any other value is checked and passed through."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return str(torch.device(requested))
    except RuntimeError:
        raise ModelLoadError(f"unknown device {requested!r}") from None


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(spec: ModelSpec, device: str) -> LoadedModel:
    """Build the spec's network, verify the weights' SHA-256, load them strictly and switch to eval mode."""
    if spec.network == BUNDLE_NETWORK:
        return _load_bundle(spec, device)
    if spec.network == MESHNET_NETWORK:
        return _load_meshnet(spec, device)
    try:
        module = networks.build(spec.network, spec.network_args)
    except networks.UnknownNetwork as exc:
        raise ModelLoadError(f"model {spec.name}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"model {spec.name}: network_args do not fit {spec.network} ({exc})") from None
    _verify_weights(spec)
    target = torch.device(pick_device(device))
    try:
        state = torch.load(spec.weights, map_location=target, weights_only=True)
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"model {spec.name}: weights do not fit {spec.network} ({type(exc).__name__})") from None
    module.to(target).eval()
    log.info("loaded model %s %s on %s", spec.name, spec.version, target)
    return LoadedModel(spec=spec, module=module, device=target)


def _verify_weights(spec: ModelSpec) -> None:
    if not spec.weights.is_file():
        raise ModelLoadError(f"model {spec.name}: weights file {spec.weights.name} is missing")
    actual = sha256_of(spec.weights)
    if actual != spec.weights_sha256.lower():
        raise ModelLoadError(
            f"model {spec.name}: weights checksum mismatch for {spec.weights.name} "
            f"(spec {spec.weights_sha256[:12]}…, file {actual[:12]}…)"
        )


def _load_bundle(spec: ModelSpec, device: str) -> LoadedModel:
    """A MONAI bundle folder (configs/ + the spec's weights under it): the bundle's own network and transforms."""
    _verify_weights(spec)
    folder = spec.weights.parent.parent if spec.weights.parent.name == "models" else spec.weights.parent
    try:
        bundle = load_bundle(folder, pick_device(device), overrides=spec.network_args.get("overrides"))
    except BundleError as exc:
        raise ModelLoadError(f"model {spec.name}: {exc}") from None
    return LoadedModel(spec=spec, module=bundle.network, device=bundle.device, bundle=bundle)


def _load_meshnet(spec: ModelSpec, device: str) -> LoadedModel:
    """The published tf.js files as they are: model.json (the spec's weights) and each shard, checksums verified."""
    _verify_weights(spec)
    shards = spec.network_args.get("shards_sha256")
    if not isinstance(shards, dict) or not shards:
        raise ModelLoadError(f"model {spec.name}: network_args.shards_sha256 must map each weight shard to its SHA-256")
    for name, expected in shards.items():
        path = spec.weights.parent / str(name)
        if not path.is_file() or sha256_of(path) != str(expected).lower():
            raise ModelLoadError(f"model {spec.name}: weight shard {name} is missing or its checksum differs")
    try:
        module = load_tfjs(spec.weights, expected_shards=frozenset(str(name) for name in shards))
    except TfjsModelError as exc:
        raise ModelLoadError(f"model {spec.name}: {exc}") from None
    target = torch.device(pick_device(device))
    module.to(target).eval()
    log.info("loaded model %s %s on %s", spec.name, spec.version, target)
    return LoadedModel(spec=spec, module=module, device=target)
