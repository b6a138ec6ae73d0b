"""Trilinear resampling axis by axis, when each axis of the target grid lies along one axis of the source.

A CT or MR series in its scanner's axes reaches the network grid by flips, an axis order and a scale per axis: the
trilinear weights then factor into one linear interpolation per axis, outermost axis first, one output plane at a
time (0.13–0.15 s instead of ~0.4 s for 300 × 512² → the CT model's grid, docs/benchmarks.md). Same sample points,
same border rule (coordinates clamped to the first and last voxel, as `grid_sample` with padding "border" does),
equal to float32 rounding. An oblique grid (gantry tilt, rotated acquisitions) returns None: the caller resamples in
3-D.
"""

from __future__ import annotations

import torch

AXIS_TOLERANCE = 1e-9  # off-axis terms of the voxel mapping smaller than this (relative) count as zero


def resample_along_axes(source: torch.Tensor, to_source: torch.Tensor, size: list[int]) -> torch.Tensor | None:
    """`source` (3-D float32) sampled at `to_source` @ (i, j, k, 1) for every voxel of a grid of `size`; None when
    the mapping (4 × 4, target voxel → source voxel, float64) mixes axes."""
    linear, offset = to_source[:3, :3], to_source[:3, 3]
    magnitude = linear.abs()
    significant = magnitude > AXIS_TOLERANCE * float(magnitude.max())
    if not (significant.sum(dim=0) == 1).all() or not (significant.sum(dim=1) == 1).all():
        return None
    source_axis = [int(torch.nonzero(significant[:, target]).item()) for target in range(3)]
    result = source
    for axis in range(3):  # outermost first: whole slabs, then rows, then single voxels on the smallest array
        target = source_axis.index(axis)
        step, start = float(linear[axis, target]), float(offset[axis])
        result = _along(result, axis, step, start, size[target])
    return result.permute(*source_axis).contiguous()


def _along(volume: torch.Tensor, axis: int, step: float, start: float, count: int) -> torch.Tensor:
    """Linear interpolation of `volume` along `axis` at start + step · n for n < count (clamped to its ends), one
    output plane at a time: no gathered copies of the input."""
    positions = (torch.arange(count, dtype=torch.float64) * step + start).clamp(0.0, float(volume.shape[axis] - 1))
    shape = list(volume.shape)
    shape[axis] = count
    result = torch.empty(shape, dtype=volume.dtype)
    last = volume.shape[axis] - 1
    for n, position in enumerate(positions.tolist()):
        lower = int(position)  # positions are ≥ 0: int() is floor
        weight = position - lower
        plane = result.select(axis, n)
        if weight == 0.0:
            plane.copy_(volume.select(axis, lower))
        else:
            torch.lerp(volume.select(axis, lower), volume.select(axis, min(lower + 1, last)), weight, out=plane)
    return result
