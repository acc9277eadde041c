"""NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) reading with SimpleITK.

SimpleITK's numpy view is ``[Z, Y, X]`` (``[Z, Y, X, C]`` for vector pixels); medcl wants ``[C, X, Y, Z]``
with ITK's physical index ``(x, y, z)`` as our ``(i, j, k)``, and the LPS geometry converted to RAS by
:func:`medcl.core.geometry.affine_from_itk`. Vector pixels (and a 4th image axis) are channels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medcl.core.errors import MedclDataError
from medcl.core.geometry import affine_from_itk


def _itk_reason(exc: BaseException) -> str:
    """The informative line of an ITK exception (they span several lines with C++ locations)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Description:") or "ERROR" in ln.upper():
            text = ln.removeprefix("Description:").strip()
            break
    else:
        text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def read_itk(
    path: Path, check_shape: Callable[[tuple[int, ...], int], None]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read an NRRD / MetaImage file once.

    Args:
        path: the file.
        check_shape: called with ``(spatial_shape, channels)`` from the header before the voxels are read.

    Returns:
        ``(array [C, X, Y, Z] in the stored dtype, affine [4, 4] voxel->RAS, meta)``.
    """
    import SimpleITK as sitk

    kind = "NRRD" if path.name.lower().endswith((".nrrd", ".nhdr")) else "MetaImage"
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise MedclDataError(path, f"unreadable {kind} file ({_itk_reason(exc)})") from exc

    dim = reader.GetDimension()
    size = tuple(int(s) for s in reader.GetSize())
    ncomp = int(reader.GetNumberOfComponents())
    if dim < 3:
        check_shape(size, ncomp)  # raises "not a 3D volume"
    if dim > 4 or (dim == 4 and ncomp > 1):
        raise MedclDataError(
            path, f"unsupported {kind} layout: {dim}D image of size {size} with {ncomp} components"
        )
    spatial = size[:3]
    channels = size[3] if dim == 4 else ncomp
    check_shape(spatial, channels)

    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise MedclDataError(path, f"unreadable or truncated {kind} file ({_itk_reason(exc)})") from exc
    view = sitk.GetArrayViewFromImage(image)
    if dim == 4:  # [T, Z, Y, X] -> [C, X, Y, Z]
        data = np.transpose(view, (0, 3, 2, 1))
    elif ncomp > 1:  # [Z, Y, X, C] -> [C, X, Y, Z]
        data = np.transpose(view, (3, 2, 1, 0))
    else:  # [Z, Y, X] -> [1, X, Y, Z]
        data = np.transpose(view, (2, 1, 0))[None]
    data = np.array(data, order="C", copy=True)  # owns its memory: the view dies with ``image``

    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = affine_from_itk(image.GetOrigin()[:3], image.GetSpacing()[:3], direction.ravel())
    meta: dict[str, Any] = {
        "format": kind.lower(),
        "pixel_type": image.GetPixelIDTypeAsString(),
    }
    return data, affine, meta
