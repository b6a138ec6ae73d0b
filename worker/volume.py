"""Volume: a series as a 3D array with its geometry and the source headers, in one consistent slice order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset


@dataclass(frozen=True, slots=True)
class Volume:
    """Axis order of `array` is (slice, row, column); slice k comes from `datasets[k]`.

    `affine` maps a voxel index (slice, row, column, 1) to patient coordinates in mm (DICOM LPS).
    `array` holds modality values (rescale slope/intercept applied, e.g. HU for CT) as float32.
    `datasets` are the source headers without pixel data, sorted along the slice normal (ascending).
    """

    array: NDArray[np.float32]
    affine: NDArray[np.float64]
    datasets: tuple[Dataset, ...]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing along (slice, row, column) in mm."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0
