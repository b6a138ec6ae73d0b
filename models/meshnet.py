"""MeshNet (dilated 3×3×3 convolutions) built from a TensorFlow.js layers-model and its weight shards, read unchanged.

The tf.js files are the published artefact (brainchop); nothing is converted on disk. model.json lists the layers
(Keras topology: Conv3D then Activation, a chain) and the weights manifest; the shards hold little-endian float32
values in manifest order. Keras kernels are (depth, height, width, in, out), channels last; torch wants
(out, in, depth, height, width), channels first: the loader transposes them, and the network's input axes are the
tf.js input's spatial axes in the same order.

A convolution whose layer name ends in "_gn" is followed by a per-channel normalisation over the spatial axes
(mean 0, variance 1, epsilon 1e-5, no learned scale) before its activation: that is what brainchop's inference does
for such layers (the PyTorch exporter of its newer models encodes the normalisation in the name).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

NORM_SUFFIX = "_gn"
NORM_EPSILON = 1e-5
ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}


class TfjsModelError(ValueError):
    """The tf.js files do not describe a MeshNet this module can build; the message names the file and the layer."""


@dataclass(frozen=True, slots=True)
class ConvLayer:
    """One Conv3D of the chain with what follows it (normalisation, activation; "linear" means none)."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    dilation: int
    bias: bool
    normalise: bool
    activation: str


class MeshNet(nn.Module):
    """Input (batch, 1, D, H, W) → logits (batch, classes, D, H, W); "same" padding, so any spatial size works."""

    def __init__(self, layers: tuple[ConvLayer, ...]) -> None:
        super().__init__()
        self.layers = layers
        self.convs = nn.ModuleList(
            nn.Conv3d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel,
                padding=layer.dilation * (layer.kernel // 2),
                dilation=layer.dilation,
                bias=layer.bias,
            )
            for layer in layers
        )
        self.activations = nn.ModuleList(
            ACTIVATIONS[layer.activation]() if layer.activation != "linear" else nn.Identity() for layer in layers
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, conv, activation in zip(self.layers, self.convs, self.activations, strict=True):
            x = conv(x)
            if layer.normalise:
                x = nn.functional.instance_norm(x, eps=NORM_EPSILON)
            x = activation(x)
        return x


def read_layers(model_json: Mapping[str, Any], source: str) -> tuple[ConvLayer, ...]:
    """The Conv3D chain of a tf.js layers-model; anything else than Input, Conv3D and Activation is refused."""
    config = model_json["modelTopology"]["model_config"]["config"]
    layers: list[ConvLayer] = []
    channels = 1
    for entry in config["layers"]:
        kind, cfg = entry["class_name"], entry["config"]
        if kind == "InputLayer":
            channels = int(cfg["batch_input_shape"][-1])
        elif kind == "Conv3D":
            layers.append(_conv(cfg, channels, source))
            channels = layers[-1].out_channels
        elif kind == "Activation" and layers and layers[-1].activation == "linear":
            activation = str(cfg["activation"])
            if activation not in ACTIVATIONS:
                raise TfjsModelError(f"{source}: activation {activation!r} of layer {cfg['name']} is not supported")
            layers[-1] = replace(layers[-1], activation=activation)
        else:
            raise TfjsModelError(f"{source}: layer {cfg.get('name')} ({kind}) is not part of a MeshNet")
    if not layers:
        raise TfjsModelError(f"{source}: no Conv3D layer")
    return tuple(layers)


def _conv(cfg: Mapping[str, Any], in_channels: int, source: str) -> ConvLayer:
    kernel, dilation, strides = (tuple(int(v) for v in cfg[key]) for key in ("kernel_size", "dilation_rate", "strides"))
    if len(set(kernel)) != 1 or len(set(dilation)) != 1 or set(strides) != {1} or kernel[0] % 2 == 0:
        raise TfjsModelError(f"{source}: layer {cfg['name']} is not an isotropic odd-kernel, stride-1 convolution")
    if cfg.get("padding") != "same" or cfg.get("data_format", "channels_last") != "channels_last":
        raise TfjsModelError(f"{source}: layer {cfg['name']} is not 'same'-padded and channels-last")
    return ConvLayer(
        name=str(cfg["name"]),
        in_channels=in_channels,
        out_channels=int(cfg["filters"]),
        kernel=kernel[0],
        dilation=dilation[0],
        bias=bool(cfg["use_bias"]),
        normalise=str(cfg["name"]).endswith(NORM_SUFFIX),
        activation=str(cfg.get("activation", "linear")),
    )


def read_weights(model_json: Mapping[str, Any], folder: Path, source: str) -> dict[str, np.ndarray[Any, Any]]:
    """Manifest name → float32 array in Keras layout, read from the shards (concatenated in manifest order)."""
    weights: dict[str, np.ndarray[Any, Any]] = {}
    for group in model_json["weightsManifest"]:
        data = b"".join((folder / str(path)).read_bytes() for path in group["paths"])
        offset = 0
        for entry in group["weights"]:
            if entry.get("dtype") != "float32" or "quantization" in entry:
                raise TfjsModelError(f"{source}: weight {entry['name']} is not plain float32")
            shape = tuple(int(v) for v in entry["shape"])
            count = int(np.prod(shape))
            values = np.frombuffer(data, dtype="<f4", count=count, offset=offset)
            weights[str(entry["name"])] = values.reshape(shape).astype(np.float32)
            offset += 4 * count
        if offset != len(data):
            raise TfjsModelError(f"{source}: shards hold {len(data)} bytes, the manifest describes {offset}")
    return weights


def state_dict_of(
    layers: tuple[ConvLayer, ...], weights: Mapping[str, np.ndarray[Any, Any]]
) -> dict[str, torch.Tensor]:
    """Keras weights → MeshNet state dict: kernel (d, h, w, in, out) → (out, in, d, h, w); every weight used once."""
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for index, layer in enumerate(layers):
        kernel_name = f"{layer.name}/kernel"
        state[f"convs.{index}.weight"] = torch.from_numpy(
            np.ascontiguousarray(weights[kernel_name].transpose(4, 3, 0, 1, 2))
        )
        used.add(kernel_name)
        if layer.bias:
            state[f"convs.{index}.bias"] = torch.from_numpy(weights[f"{layer.name}/bias"].copy())
            used.add(f"{layer.name}/bias")
    unused = sorted(set(weights) - used)
    if unused:
        raise TfjsModelError(f"weights not used by any layer: {', '.join(unused[:5])}")
    return state


def shard_names(model_json: Mapping[str, Any]) -> frozenset[str]:
    """The weight files the manifest names."""
    return frozenset(str(path) for group in model_json["weightsManifest"] for path in group["paths"])


def load_tfjs(model_json_path: Path, *, expected_shards: frozenset[str] | None = None) -> MeshNet:
    """MeshNet with the published weights loaded strictly (shapes must match); eval mode, on the CPU.

    `expected_shards`: the shard files whose checksums the caller verified; the manifest must name exactly these."""
    source = model_json_path.name
    try:
        model_json = json.loads(model_json_path.read_text(encoding="utf-8"))
        if expected_shards is not None and shard_names(model_json) != expected_shards:
            raise TfjsModelError(
                f"{source}: the manifest names shards {sorted(shard_names(model_json))}, "
                f"verified {sorted(expected_shards)}"
            )
        layers = read_layers(model_json, source)
        weights = read_weights(model_json, model_json_path.parent, source)
        network = MeshNet(layers)
        network.load_state_dict(state_dict_of(layers, weights), strict=True)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise TfjsModelError(f"{source}: not a tf.js layers-model ({type(exc).__name__}: {exc})") from None
    except RuntimeError as exc:  # load_state_dict: a shape that does not fit
        raise TfjsModelError(f"{source}: weights do not fit the layers ({exc})") from None
    return network.eval()
