"""worker/resample_axes.py: axis-by-axis trilinear resampling gives what MONAI's 3-D grid_sample gives."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.networks.layers.spatial_transforms import AffineTransform

from worker.resample_axes import resample_along_axes


def _smooth(shape: tuple[int, int, int]) -> torch.Tensor:
    """A smooth volume with values up to ~1000 (CT-like), so float32 rounding of the sample points stays small."""
    axes = torch.meshgrid(*(torch.linspace(0, 3, n, dtype=torch.float64) for n in shape), indexing="ij")
    return (400 * torch.sin(axes[0]) * torch.cos(axes[1]) + 300 * torch.sin(2 * axes[2]) + 100).to(torch.float32)


def _grid_sample(source: torch.Tensor, to_source: torch.Tensor, size: list[int]) -> torch.Tensor:
    resample = AffineTransform(
        normalized=False, mode="bilinear", padding_mode="border", align_corners=False, reverse_indexing=True
    )
    with torch.no_grad():
        result: torch.Tensor = resample(source[None, None], theta=to_source.to(torch.float32), spatial_size=size)
    return result[0, 0]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, 1, -1), (1, -1, 1)])
def test_every_axis_order_and_flip_matches_grid_sample(
    order: tuple[int, int, int], flips: tuple[int, int, int]
) -> None:
    source = _smooth((20, 24, 28))
    size = [17, 31, 13]
    to_source = torch.eye(4, dtype=torch.float64)
    to_source[:3, :3] = 0
    for target, axis in enumerate(order):
        step = flips[target] * (source.shape[axis] - 1) / (size[target] - 1) * 1.07  # a little past the far end
        to_source[axis, target] = step
        to_source[axis, 3] = (source.shape[axis] - 1) * (1.0 if step < 0 else 0.0) - 0.4 * flips[target]
    expected = _grid_sample(source, to_source, size)
    found = resample_along_axes(source, to_source, size)
    assert found is not None and found.shape == expected.shape
    assert torch.allclose(found, expected, rtol=0, atol=2e-3)  # values up to ~800: float32 rounding


def test_the_ct_grid_matches_grid_sample() -> None:
    """The CT model's case: slices along z, rows flipped to anterior, 0.7 mm pixels and 1.5 mm slices to 2 mm."""
    source = _smooth((60, 64, 64))
    to_source = torch.tensor(
        [[0.0, 0.0, 1.33, 0.2], [0.0, -2.86, 0.0, 63.1], [2.86, 0.0, 0.0, 0.4], [0.0, 0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    size = [23, 23, 45]
    found = resample_along_axes(source, to_source, size)
    assert found is not None
    assert torch.allclose(found, _grid_sample(source, to_source, size), rtol=0, atol=2e-3)


def test_an_oblique_grid_is_left_to_grid_sample() -> None:
    to_source = torch.eye(4, dtype=torch.float64)
    to_source[0, 1] = 0.05  # a gantry tilt shears slices against rows
    assert resample_along_axes(_smooth((8, 8, 8)), to_source, [8, 8, 8]) is None
