"""Network architectures by name: one build() per architecture a spec.yaml may name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


class UnknownNetwork(ValueError):
    """A spec names a network this build does not know."""


def _monai_unet(**args: Any) -> torch.nn.Module:
    from monai.networks.nets.unet import UNet

    return UNet(**args)


def _monai_resnet(**args: Any) -> torch.nn.Module:
    from monai.networks.nets.resnet import ResNet

    return ResNet(**args)


NETWORKS: dict[str, Callable[..., torch.nn.Module]] = {
    "monai.UNet": _monai_unet,
    "monai.ResNet": _monai_resnet,
}


def build(name: str, args: Mapping[str, Any]) -> torch.nn.Module:
    """A freshly initialised network `name` built with keyword `args` (from spec.yaml's network_args)."""
    try:
        factory = NETWORKS[name]
    except KeyError:
        raise UnknownNetwork(f"unknown network {name!r} (known: {', '.join(sorted(NETWORKS))})") from None
    return factory(**dict(args))
