"""One entry point for every volume format: format detection, reading with validation, NIfTI writing.

Contract of :func:`read_volume` (the convention of :mod:`medcl.core.geometry`):

* ``Volume.array`` is ``[C, X, Y, Z]``, C-contiguous; ``float32`` for images, an integer dtype for
  labels (``is_label=True``; ``C == 1``).
* ``Volume.affine`` is a ``[4, 4]`` float64 voxel index -> RAS+ mm matrix.
* Every problem is a :class:`~medcl.core.errors.MedclDataError` whose ``path`` is the file (or DICOM
  folder / slice) and whose ``problem`` says what is wrong; each file is decoded at most once.
"""

from __future__ import annotations

from functools import partial
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from medcl.core.errors import MedclDataError
from medcl.core.geometry import Volume
from medcl.io.nifti import write_nifti

__all__ = ["detect_format", "read_volume", "write_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_EXPECTED = (
    "expected NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), "
    "a DICOM file or a DICOM series folder"
)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def detect_format(path: str | PathLike) -> str:
    """The reader a path needs: ``"nifti"``, ``"dicom"`` (a folder or one DICOM file) or ``"itk"``.

    Files are recognised by extension (case-insensitive); a file with another or no extension is DICOM
    when it carries the ``DICM`` preamble or is a preamble-less DICOM stream. A folder is ``"dicom"``
    (whether it holds a readable series is the reader's job).

    Raises:
        MedclDataError: the path does not exist, is an empty file, or is not a supported format.
    """
    path = Path(path)
    if not path.exists():
        raise MedclDataError(path, "does not exist")
    if path.is_dir():
        return "dicom"
    suffix = _suffix(path)
    if path.stat().st_size == 0:
        raise MedclDataError(path, "empty file (0 bytes)")
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in ITK_SUFFIXES:
        return "itk"
    from medcl.io.dicom import is_dicom_file

    if suffix in DICOM_SUFFIXES or is_dicom_file(path):
        return "dicom"
    shown = f"'{suffix}'" if suffix else "(no extension, not DICOM)"
    raise MedclDataError(path, f"unsupported format {shown}: {_EXPECTED}")


def _check_shape(
    path: Path, spatial: tuple[int, ...], channels: int, *, allow_multichannel: bool, is_label: bool
) -> None:
    """Refuse non-3D volumes and unwanted channels from header information, before decoding."""
    if len(spatial) < 3:
        raise MedclDataError(
            path, f"not a 3D volume: the image is {len(spatial)}D with shape {tuple(spatial)}"
        )
    thin = [ax for ax, n in enumerate(spatial) if n < 2]
    if thin:
        raise MedclDataError(
            path,
            f"not a 3D volume: spatial shape {tuple(spatial)} has fewer than 2 voxels along axis {thin[0]}",
        )
    if is_label and channels != 1:
        raise MedclDataError(path, f"a label volume must have 1 channel, found {channels}")
    if channels > 1 and not allow_multichannel:
        raise MedclDataError(
            path, f"has {channels} channels; pass allow_multichannel=True to read a multi-channel volume"
        )


def _label_array(path: Path, data: np.ndarray) -> np.ndarray:
    """Integer, C-contiguous label array; float-stored labels must hold whole numbers."""
    if data.dtype == np.bool_:
        return np.ascontiguousarray(data, dtype=np.uint8)
    if np.issubdtype(data.dtype, np.integer):
        return np.ascontiguousarray(data)
    rounded = np.round(data)
    bad = rounded != data
    if bad.any():
        examples = sorted({float(v) for v in data[bad][:1000]})[:3]
        raise MedclDataError(
            path, f"label values are not integers ({int(bad.sum())} voxels, e.g. {examples})"
        )
    lo, hi = (float(rounded.min()), float(rounded.max())) if rounded.size else (0.0, 0.0)
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.ascontiguousarray(rounded, dtype=dtype)
    raise MedclDataError(path, f"label values out of the int64 range ({lo}, {hi})")


def _finalise(
    path: Path, data: np.ndarray, affine: np.ndarray, meta: dict[str, Any], *, is_label: bool
) -> Volume:
    if data.dtype.kind == "c":
        raise MedclDataError(path, f"complex voxel type {data.dtype} is not supported")
    # min/max propagate NaN and expose inf without allocating a mask; count only when there is one
    if data.dtype.kind == "f" and data.size and not (np.isfinite(data.min()) and np.isfinite(data.max())):
        n_bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        raise MedclDataError(
            path, f"contains {n_bad} non-finite voxel value{'s' * (n_bad != 1)} (NaN or inf)"
        )
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise MedclDataError(path, f"invalid geometry: singular or non-finite affine {affine.tolist()}")
    array = _label_array(path, data) if is_label else np.ascontiguousarray(data, dtype=np.float32)
    meta = {**meta, "dtype": str(array.dtype)}
    return Volume(array=array, affine=np.asarray(affine, dtype=np.float64), path=str(path), meta=meta)


def read_volume(
    path: str | PathLike,
    *,
    series_uid: str | None = None,
    allow_multichannel: bool = False,
    is_label: bool = False,
) -> Volume:
    """Read an image or label volume with its geometry.

    Args:
        path: a NIfTI file (``.nii``, ``.nii.gz``), an NRRD / MetaImage file (``.nrrd``, ``.nhdr``,
            ``.mha``, ``.mhd``), a DICOM series folder, or one DICOM file (its series is read from its
            folder).
        series_uid: the DICOM ``SeriesInstanceUID`` to read when the folder holds several series
            (ignored for other formats).
        allow_multichannel: accept more than one channel (4D NIfTI as in MSD, vector NRRD/MHA, RGB DICOM).
        is_label: read a label map: one channel, whole-number values, returned in an integer dtype
            (the stored one, or the smallest of uint8/int16/int32/int64 holding float-stored labels).

    Returns:
        :class:`~medcl.core.geometry.Volume` with ``array [C, X, Y, Z]`` (float32 for images; DICOM
        values after RescaleSlope/Intercept, e.g. Hounsfield units) and ``affine [4, 4]`` voxel->RAS mm.
        ``meta`` holds non-identifying facts: ``format``, and e.g. ``modality``, ``series_uid``,
        ``rescale_applied`` for DICOM; never patient fields.

    Raises:
        MedclDataError: naming the file and the problem: does not exist; empty, unreadable or truncated
            file; unsupported format; not 3D; more than one channel unless allowed; non-finite voxels;
            non-integer label values; DICOM missing slice, inconsistent spacing / orientation / matrix
            size, mixed series.
    """
    path = Path(path)
    fmt = detect_format(path)
    check = partial(_check_shape, path, allow_multichannel=allow_multichannel, is_label=is_label)
    if fmt == "nifti":
        from medcl.io.nifti import read_nifti

        data, affine, meta = read_nifti(path, check)
    elif fmt == "itk":
        from medcl.io.itk import read_itk

        data, affine, meta = read_itk(path, check)
    else:
        from medcl.io.dicom import read_dicom_series, series_uid_of_file

        folder = path
        if path.is_file():
            folder = path.parent
            if series_uid is None:
                series_uid = series_uid_of_file(path)
        data, affine, meta = read_dicom_series(folder, check, series_uid=series_uid, keep_integer=is_label)
        path = folder
    return _finalise(path, data, affine, meta, is_label=is_label)
