"""Geometry conventions and helpers shared by every floor of medcl.

The one convention
------------------
* Voxel arrays are **channel first**, ``[C, X, Y, Z]`` (MONAI's layout): array axis 1 is voxel index
  ``i``, axis 2 is ``j``, axis 3 is ``k``.
* An **affine** is a 4x4 ``float64`` matrix mapping a voxel index ``(i, j, k, 1)`` to **RAS+ world
  millimetres** (the NIfTI / nibabel convention): world x increases towards the patient's Right,
  y towards Anterior, z towards Superior.
* DICOM and ITK use LPS+; readers convert with :func:`lps_to_ras` (negating the first two rows).
* ``spacing`` is the column norms of the affine's 3x3 part (mm per voxel step along i, j, k);
  ``orientation`` is nibabel's three-letter axis code (``"RAS"``, ``"LPS"``, ...): the world direction
  each array axis points to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Convert a voxel->LPS affine (ITK/DICOM) to voxel->RAS, or back (the map is its own inverse)."""
    return _LPS_RAS @ np.asarray(affine, dtype=np.float64)


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing in mm ``[3]`` along array axes i, j, k."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def orientation_from_affine(affine: np.ndarray) -> str:
    """nibabel axis codes of an affine, e.g. ``"RAS"``; ``"?"`` for a degenerate axis."""
    codes = nib.orientations.aff2axcodes(np.asarray(affine, dtype=np.float64))
    return "".join(c if c is not None else "?" for c in codes)


def affine_from_itk(origin, spacing, direction) -> np.ndarray:
    """Voxel->RAS affine from ITK's LPS origin ``[3]``, spacing ``[3]`` and row-major direction ``[9]``.

    ITK indexes arrays as (x, y, z) in its physical-point API, which matches our (i, j, k).
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return lps_to_ras(lps)


@dataclass
class Volume:
    """Voxels plus geometry, as every medcl reader returns them.

    Attributes:
        array: ``[C, X, Y, Z]`` voxel values (float32 for images; integer for labels).
        affine: ``[4, 4]`` voxel index -> RAS+ mm.
        path: where it was read from (a file or a DICOM folder).
        meta: non-identifying metadata (modality, series uid, rescale applied, ...). Readers never put
            DICOM patient fields here.
    """

    array: np.ndarray
    affine: np.ndarray
    path: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.array.shape[1:4])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spacing(self) -> np.ndarray:
        return spacing_from_affine(self.affine)

    @property
    def orientation(self) -> str:
        return orientation_from_affine(self.affine)
