"""ModelSpec: what a model is, what it reads and what its labels mean (parsed from a model folder's spec.yaml).

A segmentation spec has `labels` and volume `preprocessing`. A classification spec (task: classification) has a
`classification` block instead: its finding code, decision threshold, Grad-CAM layer and projection preprocessing
(read from the YAML `preprocessing` block); its `labels` may be empty and its `preprocessing` is NO_VOLUME.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from models.domain import Domain, parse_domain


class SpecError(ValueError):
    """A model spec is invalid; the message names the model and the field."""


class Task(Enum):
    SEGMENTATION = "segmentation"
    CLASSIFICATION = "classification"


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept (SNOMED CT by default), as used in SEG and SR."""

    value: str
    meaning: str
    scheme: str = "SCT"


@dataclass(frozen=True, slots=True)
class Label:
    """One output label: its number in the label map, its name, its codes and display colour."""

    number: int
    name: str
    category: Code
    type: Code
    colour_rgb: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Preprocessing:
    """How a volume is prepared for the network (RAS orientation, target spacing, intensity window)."""

    spacing_mm: tuple[float, float, float]
    intensity_min: float
    intensity_max: float
    roi_size: tuple[int, int, int]
    sw_batch_size: int = 1
    overlap: float = 0.25


class Resample(Enum):
    """PIL resampling filter used to shrink the centre square of a radiograph to the network input."""

    BICUBIC = "bicubic"
    BILINEAR = "bilinear"
    BOX = "box"


@dataclass(frozen=True, slots=True)
class ProjectionPreprocessing:
    """How a CR/DX image becomes the network input (worker/load_image.py).

    Displayed grey values (modality LUT, VOI window, MONOCHROME1 inverted) scaled to 0..255 and rounded to uint8, the
    centred square whose side is the short edge, resized to input_size (rows, columns) with `resample`; the network
    then sees (grey / 255 - mean) / std.
    """

    input_size: tuple[int, int]
    resample: Resample = Resample.BICUBIC
    mean: float = 0.5
    std: float = 0.5


@dataclass(frozen=True, slots=True)
class ClassificationSpec:
    """A binary image classifier: one output logit; sigmoid(logit) >= threshold means the finding is present."""

    finding: Code
    threshold: float
    cam_layer: str
    preprocessing: ProjectionPreprocessing


@dataclass(frozen=True, slots=True)
class OodSpec:
    """Out-of-distribution check: Mahalanobis distance of the features at `layer` to the statistics in `stats`.

    `stats` (an .npz beside the weights, checked against `stats_sha256`) holds the class means, the shared precision
    matrix and the threshold, which was calibrated on in-domain validation data; a score past it is not evaluated.
    """

    layer: str
    stats: Path
    stats_sha256: str
    body_above: float | None = None  # volumes: only feature locations whose input patch is mostly above this value
    min_body_fraction: float = 0.5  # (the body, not the air around it) are scored


def _ood(folder: Path, raw: dict[str, Any] | None) -> OodSpec | None:
    if raw is None:
        return None
    body = raw.get("body_above")
    return OodSpec(
        layer=str(raw["layer"]),
        stats=folder / str(raw["stats"]),
        stats_sha256=str(raw["stats_sha256"]),
        body_above=None if body is None else float(body),
        min_body_fraction=float(raw.get("min_body_fraction", 0.5)),
    )


# A classification spec has no volume preprocessing; this placeholder fills ModelSpec.preprocessing and is never read.
BUNDLE_NETWORK = "monai.bundle"  # a MONAI bundle folder: network, preprocessing and inferer come from its configs
MESHNET_NETWORK = "meshnet.tfjs"  # a tf.js MeshNet (models/meshnet.py); conform settings in network_args
NO_VOLUME = Preprocessing(spacing_mm=(0.0, 0.0, 0.0), intensity_min=0.0, intensity_max=0.0, roi_size=(0, 0, 0))


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    version: str
    task: Task
    modalities: tuple[str, ...]
    network: str
    network_args: dict[str, Any]
    weights: Path
    weights_sha256: str
    labels: tuple[Label, ...]
    preprocessing: Preprocessing
    description: str = ""
    classification: ClassificationSpec | None = None
    domain: Domain | None = None  # the series it may evaluate (models/domain.py); None: no constraint
    ood: OodSpec | None = None  # its out-of-distribution statistics (models/ood.py); None: no OOD check

    @classmethod
    def from_folder(cls, folder: Path) -> ModelSpec:
        """Parse folder/spec.yaml; every error names the model folder and the field."""
        path = folder / "spec.yaml"
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"model {folder.name}: cannot read spec.yaml ({type(exc).__name__})") from None
        try:
            return _parse(folder, raw)
        except KeyError as missing:
            raise SpecError(f"model {folder.name}: spec.yaml lacks {missing}") from None
        except (TypeError, ValueError) as exc:
            raise SpecError(f"model {folder.name}: {exc}") from None


def _code(raw: dict[str, str]) -> Code:
    return Code(value=str(raw["value"]), meaning=str(raw["meaning"]), scheme=str(raw.get("scheme", "SCT")))


def _label(raw: dict[str, Any]) -> Label:
    colour = tuple(int(c) for c in raw["colour_rgb"])
    if len(colour) != 3:
        raise ValueError(f"label {raw['name']}: colour_rgb needs 3 values")
    return Label(
        number=int(raw["number"]),
        name=str(raw["name"]),
        category=_code(raw["category"]),
        type=_code(raw["type"]),
        colour_rgb=(colour[0], colour[1], colour[2]),
    )


def _triple(values: Any, kind: type) -> Any:
    items = tuple(kind(v) for v in values)
    if len(items) != 3:
        raise ValueError(f"expected 3 values, got {len(items)}")
    return items


def _volume(pre: dict[str, Any]) -> Preprocessing:
    return Preprocessing(
        spacing_mm=_triple(pre["spacing_mm"], float),
        intensity_min=float(pre["intensity_min"]),
        intensity_max=float(pre["intensity_max"]),
        roi_size=_triple(pre["roi_size"], int),
        sw_batch_size=int(pre.get("sw_batch_size", 1)),
        overlap=float(pre.get("overlap", 0.25)),
    )


def _projection(pre: dict[str, Any]) -> ProjectionPreprocessing:
    size = tuple(int(v) for v in pre["input_size"])
    if len(size) != 2 or min(size) < 1:
        raise ValueError("preprocessing.input_size needs 2 positive values (rows, columns)")
    std = float(pre.get("std", 0.5))
    if std <= 0:
        raise ValueError("preprocessing.std must be positive")
    return ProjectionPreprocessing(
        input_size=(size[0], size[1]),
        resample=Resample(pre.get("resample", "bicubic")),
        mean=float(pre.get("mean", 0.5)),
        std=std,
    )


def _classification(raw: dict[str, Any]) -> ClassificationSpec:
    block = raw.get("classification")
    if not isinstance(block, dict):
        raise ValueError("task classification needs a classification block (finding, threshold, cam_layer)")
    threshold = float(block["threshold"])
    if not 0.0 < threshold < 1.0:
        raise ValueError("classification.threshold must lie strictly between 0 and 1")
    return ClassificationSpec(
        finding=_code(block["finding"]),
        threshold=threshold,
        cam_layer=str(block["cam_layer"]),
        preprocessing=_projection(raw["preprocessing"]),
    )


def _parse(folder: Path, raw: dict[str, Any]) -> ModelSpec:
    task = Task(raw["task"])
    classification = _classification(raw) if task is Task.CLASSIFICATION else None
    labels = tuple(_label(item) for item in (raw["labels"] if classification is None else raw.get("labels") or ()))
    if not labels and classification is None:
        raise ValueError("labels is empty")
    return ModelSpec(
        name=str(raw["name"]),
        version=str(raw["version"]),
        task=task,
        modalities=tuple(str(m) for m in raw["modalities"]),
        network=str(raw["network"]),
        network_args=dict(raw.get("network_args", {})),
        weights=folder / str(raw["weights"]),
        weights_sha256=str(raw["weights_sha256"]),
        labels=labels,
        preprocessing=(
            NO_VOLUME
            if classification is not None or str(raw["network"]) in (BUNDLE_NETWORK, MESHNET_NETWORK)
            else _volume(raw["preprocessing"])
        ),
        description=str(raw.get("description", "")),
        classification=classification,
        domain=parse_domain(raw.get("domain")),
        ood=_ood(folder, raw.get("ood")),
    )
