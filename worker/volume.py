"""Volume: a series as a 3D array with its geometry and the source headers, in one consistent slice order."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

SHEAR_TOLERANCE = 1e-4  # |cos| of the angle between slice step and normal may fall short of 1 by this (≈0.8°)


@dataclass(frozen=True, slots=True)
class Volume:
    """Axis order of `array` is (slice, row, column); slice k comes from `datasets[k]`.

    `affine` maps a voxel index (slice, row, column, 1) to patient coordinates in mm (DICOM LPS). Its slice column
    is the measured step between slice origins, which a gantry tilt makes oblique to the image plane (a sheared
    grid); rows and columns follow ImageOrientationPatient and PixelSpacing.
    `array` holds modality values (rescale slope/intercept applied, e.g. HU for CT) as float32.
    `datasets` are the source headers without pixel data, sorted along the slice normal (ascending).
    `frame_numbers` is empty when each slice is a single-frame instance; for an enhanced multi-frame source it
    holds the 1-based frame number of slice k, and every `datasets[k]` is that one instance's header.
    """

    array: NDArray[np.float32]
    affine: NDArray[np.float64]
    datasets: tuple[Dataset, ...]
    frame_numbers: tuple[int, ...] = ()

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing along (slice, row, column) in mm; the slice value is the step between slice origins."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def sheared(self) -> bool:
        """True when slice origins do not advance along the image normal (gantry tilt): the grid is not orthogonal."""
        step, rows, columns = (self.affine[:3, axis] for axis in range(3))
        normal = np.cross(columns, rows)
        cosine = abs(float(np.dot(step, normal))) / float(np.linalg.norm(step) * np.linalg.norm(normal))
        return cosine < 1.0 - SHEAR_TOLERANCE

    @property
    def instances(self) -> tuple[Dataset, ...]:
        """The distinct source instances in slice order (one for a multi-frame source)."""
        seen: dict[int, Dataset] = {}
        for ds in self.datasets:
            seen.setdefault(id(ds), ds)
        return tuple(seen.values())


def release_freed_memory() -> None:
    """Give the heap's freed pages back to the system (glibc's malloc_trim): after decoding a series, the freed file
    and pixel buffers would otherwise stay in the worker's resident memory, which its peak then builds on."""
    if sys.platform.startswith("linux") and (name := ctypes.util.find_library("c")):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            ctypes.CDLL(name).malloc_trim(0)
