"""NIfTI-1/-2 reading and writing with nibabel, in medcl's ``[C, X, Y, Z]`` + voxel->RAS convention.

Channels: a 4D NIfTI ``[X, Y, Z, C]`` (the Medical Segmentation Decathlon's multi-modal layout) and a 5D
vector NIfTI ``[X, Y, Z, 1, C]`` (what ITK writes for vector pixels) both become ``[C, X, Y, Z]``.

Writing keeps the affine bit for bit while staying NIfTI-1 (NIfTI-2 is unreadable by SimpleITK/ITK,
hence by nnU-Net and most viewers): NIfTI-1 stores ``srow`` as float32, so the exact float64 affine is
also stored as JSON in a ``comment`` header extension. :func:`read_nifti` uses that copy only when it
rounds to the stored sform exactly, so a file re-oriented by another tool afterwards falls back to its
own sform. Other readers see the float32 sform (about 1e-5 mm off at 100 mm).

Reading uses the sform when its code is > 0, else the qform (nibabel's rule). A file whose sform and qform
are both set but place the voxels more than 1e-3 mm apart is still read (with the sform): the choice is
deterministic, but ITK-based tools may pick the qform, so ``meta["transform_warning"]`` says so and
``medcl data check`` reports it as a problem (``medcl data info`` shows it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medcl.core.errors import MedclDataError
from medcl.core.files import atomic_path

_AFFINE_SOURCE = {True: "sform", False: "qform"}
_EXACT_KEY = "medcl_affine_float64"  # JSON key of the exact-affine comment extension
_NIFTI1_MAX_DIM = 32767  # NIfTI-1 stores dims as int16
SFORM_QFORM_TOL_MM = 1e-3  # sform and qform placing a voxel further apart than this disagree


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def nifti_layout(path: Path, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Split a NIfTI data shape into (spatial shape, number of channels) without decoding voxels.

    A 2D shape is returned as is (``check_shape`` then reports it as not 3D).

    Raises:
        MedclDataError: a 5D+ layout other than ITK's vector ``[X, Y, Z, 1, C]``.
    """
    if len(shape) <= 3:
        return tuple(shape), 1
    if len(shape) == 4:
        return tuple(shape[:3]), int(shape[3])
    if len(shape) == 5 and shape[3] == 1:
        return tuple(shape[:3]), int(shape[4])
    raise MedclDataError(
        path,
        f"unsupported NIfTI layout: {len(shape)}D data of shape {tuple(shape)} (expected 3D, or 4D channels)",
    )


def read_nifti(
    path: Path, check_shape: Callable[[tuple[int, ...], int], None]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a ``.nii`` / ``.nii.gz`` file once.

    Args:
        path: the file.
        check_shape: called with ``(spatial_shape, channels)`` from the header, before any voxel is
            decoded, so a 2D or multi-channel file is refused without reading its data.

    Returns:
        ``(array [C, X, Y, Z] in the decoded dtype (scl_slope/scl_inter applied), affine [4, 4] voxel->RAS,
        meta)``.
    """
    try:
        img = nib.load(str(path), mmap=False)
    except Exception as exc:  # nibabel raises several types for bad headers
        raise MedclDataError(path, f"unreadable NIfTI file ({_reason(exc)})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise MedclDataError(path, f"unreadable NIfTI file (nibabel read it as {type(img).__name__})")
    hdr = img.header
    spatial, channels = nifti_layout(path, tuple(int(s) for s in img.shape))
    check_shape(spatial, channels)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # EOFError, zlib.error, ValueError ... on truncated data
        raise MedclDataError(path, f"unreadable or truncated NIfTI file ({_reason(exc)})") from exc
    data = np.asarray(data)
    if data.ndim == 5:
        data = data[:, :, :, 0, :]
    data = np.moveaxis(data, -1, 0) if data.ndim == 4 else data.reshape((1, *data.shape))

    sform_code, qform_code = int(hdr["sform_code"]), int(hdr["qform_code"])
    affine = np.asarray(img.affine, dtype=np.float64)
    if sform_code > 0 or qform_code > 0:
        source = _AFFINE_SOURCE[sform_code > 0]
    else:
        source = "pixdim (no qform/sform: orientation unknown)"
    exact = _exact_affine(hdr) if sform_code > 0 else None
    stored = hdr.get_sform()
    if exact is not None and np.array_equal(exact.astype(hdr["srow_x"].dtype).astype(np.float64), stored):
        affine, source = exact, "sform (exact float64 copy)"
    meta: dict[str, Any] = {
        "format": "nifti",
        "nifti_version": 2 if isinstance(img, nib.Nifti2Image) else 1,
        "dtype_on_disk": str(hdr.get_data_dtype()),
        "sform_code": sform_code,
        "qform_code": qform_code,
        "affine_source": source,
    }
    if sform_code > 0 and qform_code > 0:
        meta.update(sform_qform_mismatch(hdr, spatial))
    return data, affine, meta


def sform_qform_mismatch(hdr: Any, spatial: tuple[int, ...]) -> dict[str, Any]:
    """How far a header's sform and qform (both set) place the voxels apart.

    Returns ``{"sform_qform_diff_mm": d}``, ``d`` the largest distance (mm) between where the two transforms
    put a voxel centre of the grid (at a corner: the difference is affine), and, when ``d`` exceeds
    :data:`SFORM_QFORM_TOL_MM`, ``"transform_warning"``: a sentence for ``medcl data check`` / ``info``.

    Such a file is *not* refused: medcl (like nibabel) reads it with the sform, deterministically, while an
    ITK-based tool may use the qform depending on the codes (SimpleITK does when ``sform_code`` is not 1), so
    the same file lands ``d`` mm elsewhere there.
    """
    sform = np.asarray(hdr.get_sform(), dtype=np.float64)
    qform = np.asarray(hdr.get_qform(), dtype=np.float64)
    delta = sform - qform
    extent = [max(int(n) - 1, 0) for n in (*spatial, 1, 1, 1)[:3]]
    corners = np.array([[i, j, k, 1.0] for i in (0, extent[0]) for j in (0, extent[1]) for k in (0, extent[2])])
    dist = float(np.linalg.norm(corners @ delta[:3].T, axis=1).max())
    out: dict[str, Any] = {"sform_qform_diff_mm": dist}
    if not np.isfinite(dist) or dist > SFORM_QFORM_TOL_MM:
        origin = float(np.linalg.norm(delta[:3, 3]))
        out["transform_warning"] = (
            f"sform and qform disagree: voxel centres differ by up to {dist:.4g} mm (origin offset {origin:.4g} mm, "
            f"largest matrix entry difference {float(np.abs(delta).max()):.4g}); medcl uses the sform, "
            f"ITK-based tools may use the qform (sform_code {int(hdr['sform_code'])}, "
            f"qform_code {int(hdr['qform_code'])})"
        )
    return out


def _exact_affine(hdr: Any) -> np.ndarray | None:
    """The float64 affine stored by :func:`write_nifti` in a comment extension, if any."""
    for ext in hdr.extensions:
        if ext.get_code() != 6:
            continue
        try:
            obj = json.loads(ext.get_content())
            aff = np.asarray(obj[_EXACT_KEY], dtype=np.float64)
        except (ValueError, TypeError, KeyError, IndexError):
            continue
        if aff.shape == (4, 4) and np.isfinite(aff).all():
            return aff
    return None


def _storable(array: np.ndarray, path: Path) -> np.ndarray:
    """bool -> uint8; 64-bit integers -> the smallest integer type holding the values (nibabel refuses
    int64 without an explicit request and many viewers cannot open it); other dtypes unchanged."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.int32):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return array.astype(dtype)
        raise MedclDataError(path, f"integer values {lo}..{hi} do not fit the int32 range NIfTI viewers read")
    return array


def _has_shear(affine: np.ndarray) -> bool:
    rzs = affine[:3, :3]
    gram = rzs.T @ rzs
    off = gram - np.diag(np.diag(gram))
    return bool(np.abs(off).max() > 1e-8 * max(float(np.abs(gram).max()), 1e-12))


def write_nifti(volume: Any, path: str | PathLike) -> None:
    """Write a :class:`~medcl.core.geometry.Volume` as NIfTI-1 (``.nii`` or ``.nii.gz``).

    The array ``[C, X, Y, Z]`` is written as ``[X, Y, Z]`` when ``C == 1`` and as ``[X, Y, Z, C]``
    otherwise; its dtype is kept (label volumes stay integer; no scaling). The affine goes to the sform
    (code 1, scanner) and, when it has no shear, to the qform (code 1, the float32 quaternion best fit;
    code 0 with shear, which a quaternion cannot hold). The exact float64 affine is also stored in a
    comment extension, so ``read_volume`` returns it bit for bit. NIfTI-2 is used only when a dimension
    exceeds NIfTI-1's 32767. ``bool`` is stored as uint8 and int64/uint64 (e.g. a torch ``argmax``) as
    the smallest of uint8/int16/int32 holding the values.

    Args:
        volume: the volume to write (``array [C, X, Y, Z]``, ``affine [4, 4]`` voxel->RAS mm).
        path: destination ending in ``.nii`` or ``.nii.gz``; parent folders are created.

    Raises:
        MedclDataError: bad extension, array not ``[C, X, Y, Z]``, affine not a finite invertible 4x4,
            or the file cannot be written.
    """
    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise MedclDataError(path, "write_nifti needs a .nii or .nii.gz file name")
    array = np.asarray(volume.array)
    if array.ndim != 4:
        raise MedclDataError(path, f"write_nifti expects a [C, X, Y, Z] array, got shape {array.shape}")
    affine = np.asarray(volume.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise MedclDataError(path, "write_nifti needs a finite, invertible 4x4 affine")
    array = _storable(array, path)
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)

    cls = nib.Nifti1Image if max(data.shape) <= _NIFTI1_MAX_DIM else nib.Nifti2Image
    img = cls(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=0 if _has_shear(affine) else 1)
    payload = json.dumps({_EXACT_KEY: affine.tolist()})  # json writes floats with repr: exact
    hdr.extensions.append(nib.nifti1.Nifti1Extension("comment", payload.encode()))
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    try:
        with atomic_path(path, suffix=suffix) as tmp:
            nib.save(img, str(tmp))
    except OSError as exc:
        raise MedclDataError(path, f"cannot write NIfTI file ({_reason(exc)})") from exc
