"""DICOM series folders with pydicom: grouping, slice ordering, geometry checks, decoding.

How a folder becomes a volume
-----------------------------
1. Every file under the folder (recursively; hidden files skipped, any or no extension) is opened with
   ``stop_before_pixels``: files that are not DICOM (a ``README.txt``) or hold no image (``DICOMDIR``,
   structured reports) are ignored; a DICOM file whose header cannot be parsed is an error.
2. Image files are grouped by ``SeriesInstanceUID``; several series and no ``series_uid`` is an error
   listing them (uid, number of files, modality, description; never patient fields).
3. Slices are ordered by ``ImagePositionPatient`` projected on the slice normal
   ``n = row x col`` (the two ``ImageOrientationPatient`` direction cosines). The slice spacing comes from
   those positions, not from ``SliceThickness``; a step clearly larger than the median step is a missing
   slice; orientation, pixel spacing and matrix size must agree across slices.
4. Pixels are decoded once per file (compressed transfer syntaxes through pydicom's decoders, e.g.
   pylibjpeg-openjpeg for JPEG 2000) and ``RescaleSlope`` / ``RescaleIntercept`` are applied per slice
   (slices may declare different ones). A zero or non-finite slope, or a non-finite intercept, is an
   error naming the slice's file.

Geometry: the LPS affine has columns ``row * PixelSpacing[1]`` (array axis i = DICOM column index),
``col * PixelSpacing[0]`` (axis j = row index) and the slice step (axis k), and origin the position of
the first slice in that order; it is converted to RAS with :func:`medcl.core.geometry.lps_to_ras`.
This matches ITK/GDCM's reading of the same series. A gantry-tilted series (positions drifting in the
slice plane) keeps its true geometry through a sheared third column (``meta["gantry_tilt_deg"]``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medcl.core.errors import MedclDataError
from medcl.core.geometry import lps_to_ras
from medcl.io.dicom_scan import (
    SliceHeader,
    is_dicom_file,
    list_dicom_series,
    reason,
    scan_folder,
    select_series,
    series_uid_of_file,
)

__all__ = ["is_dicom_file", "list_dicom_series", "read_dicom_series", "series_uid_of_file"]

_GAP_FACTOR = 1.5  # a step this many times the median step means a missing slice


def _rel(folder: Path, path: Path) -> str:
    """A slice's name relative to the series folder (series may span subfolders)."""
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return path.name


def _check_consistent(folder: Path, hs: list[SliceHeader]) -> None:
    """Same matrix size, pixel spacing, orientation and samples in every slice; geometry present; a valid
    rescale in every slice (:func:`_check_rescale`)."""
    first = hs[0]
    for h in hs:
        for name, value in (
            ("ImagePositionPatient", h.position),
            ("ImageOrientationPatient", h.orientation),
            ("PixelSpacing", h.pixel_spacing),
        ):
            if value is None:
                raise MedclDataError(h.path, f"DICOM slice lacks a valid {name}: cannot build the geometry")
        if h.frames > 1:
            raise MedclDataError(
                h.path,
                f"multi-frame DICOM ({h.frames} frames in one file) is not supported; "
                "convert it to NIfTI first (e.g. dcm2niix)",
            )
        _check_rescale(h)
    for h in hs[1:]:
        if (h.rows, h.cols) != (first.rows, first.cols) or h.samples != first.samples:
            raise MedclDataError(
                folder,
                f"inconsistent Rows/Columns across slices: {_rel(folder, first.path)} is "
                f"{first.rows}x{first.cols} but {_rel(folder, h.path)} is {h.rows}x{h.cols}",
            )
        if not np.allclose(h.orientation, first.orientation, atol=1e-4):
            raise MedclDataError(
                folder,
                f"inconsistent ImageOrientationPatient across slices: {_rel(folder, first.path)} has "
                f"{np.round(first.orientation, 5).tolist()} but {_rel(folder, h.path)} has "
                f"{np.round(h.orientation, 5).tolist()}",
            )
        if not np.allclose(h.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-5):
            raise MedclDataError(
                folder,
                f"inconsistent PixelSpacing across slices: {_rel(folder, first.path)} has "
                f"{first.pixel_spacing.tolist()} but {_rel(folder, h.path)} has {h.pixel_spacing.tolist()}",
            )


def _check_rescale(h: SliceHeader) -> None:
    """A slice's ``RescaleSlope`` must be finite and non-zero, its ``RescaleIntercept`` finite.

    Slopes and intercepts that differ between slices are legal (they are applied per slice); a zero slope
    would turn the slice into a constant and a non-finite value every voxel into NaN/inf.
    """
    if not np.isfinite(h.slope) or h.slope == 0.0:
        if h.slope == 0.0:
            effect = "it turns every voxel of the slice into the intercept"
        else:
            effect = "it makes every voxel of the slice non-finite"
        raise MedclDataError(
            h.path, f"invalid RescaleSlope {h.slope:g}: it must be a finite, non-zero number ({effect})"
        )
    if not np.isfinite(h.intercept):
        raise MedclDataError(
            h.path,
            f"invalid RescaleIntercept {h.intercept:g}: it must be a finite number "
            "(it makes every voxel of the slice non-finite)",
        )


def _order_and_step(folder: Path, hs: list[SliceHeader]) -> tuple[list[SliceHeader], np.ndarray, dict]:
    """Sort slices along the normal; check for gaps; return the LPS step vector between slices."""
    iop = hs[0].orientation
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise MedclDataError(
            folder, f"invalid ImageOrientationPatient {iop.tolist()}: not two orthonormal direction cosines"
        )
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    positions = np.stack([h.position for h in hs])
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    hs = [hs[i] for i in order]
    positions, dist = positions[order], dist[order]
    n = len(hs)
    if n < 2:
        raise MedclDataError(folder, f"not a 3D volume: the series has 1 slice of {hs[0].cols}x{hs[0].rows}")

    steps = np.diff(dist)
    median = float(np.sort(steps)[(len(steps) - 1) // 2])  # lower median: with steps (2, 4) the gap is 4
    tol = max(1e-3, 0.01 * median)
    dup = np.flatnonzero(steps <= tol)
    if median <= tol or dup.size:
        i = int(dup[0]) if dup.size else 0
        raise MedclDataError(
            folder,
            f"duplicate slice position {dist[i]:.3f} mm along the normal ({_rel(folder, hs[i].path)} and "
            f"{_rel(folder, hs[i + 1].path)}): several acquisitions share one series",
        )
    gaps = np.flatnonzero(steps > _GAP_FACTOR * median)
    if gaps.size:
        where = "; ".join(
            f"between {_rel(folder, hs[i].path)} ({dist[i]:.3f} mm) and "
            f"{_rel(folder, hs[i + 1].path)} ({dist[i + 1]:.3f} mm), "
            f"step {steps[i]:.3f} mm"
            for i in gaps[:3]
        )
        more = f" and {gaps.size - 3} more" if gaps.size > 3 else ""
        raise MedclDataError(
            folder,
            f"missing slice: gap in slice positions along the normal {where}{more}; "
            f"median step {median:.3f} mm",
        )
    if np.abs(steps - median).max() > tol:
        raise MedclDataError(
            folder,
            f"inconsistent slice spacing: steps along the normal range from {steps.min():.4f} to "
            f"{steps.max():.4f} mm (median {median:.4f} mm)",
        )

    spacing = (dist[-1] - dist[0]) / (n - 1)
    step = (positions[-1] - positions[0]) / (n - 1)
    drift = step - spacing * normal  # in-plane drift per slice: gantry tilt
    # every position must lie on the line p0 + t * step
    predicted = positions[0] + np.outer((dist - dist[0]) / spacing, step)
    off_line = float(np.abs(positions - predicted).max())
    if off_line > max(1e-2, 0.1 * float(hs[0].pixel_spacing.min())):
        raise MedclDataError(
            folder,
            f"inconsistent slice positions: they do not lie on one line (off by up to {off_line:.3f} mm)",
        )
    info: dict[str, Any] = {"slice_spacing_mm": float(spacing)}
    if np.linalg.norm(drift) > 1e-3:
        info["gantry_tilt_deg"] = float(np.degrees(np.arctan2(np.linalg.norm(drift), spacing)))
    else:
        step = spacing * normal
    return hs, step, info


def read_dicom_series(
    folder: Path,
    check_shape: Callable[[tuple[int, ...], int], None],
    series_uid: str | None = None,
    keep_integer: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read one DICOM series from a folder.

    Args:
        folder: the series folder (searched recursively).
        check_shape: called with ``(spatial_shape, channels)`` before any pixel is decoded.
        series_uid: the ``SeriesInstanceUID`` to read when the folder holds several series.
        keep_integer: keep the stored integer dtype when no rescale changes the values (labels).

    Returns:
        ``(array [C, X, Y, Z] float32 with RescaleSlope/Intercept applied (or the stored integer dtype if
        ``keep_integer`` and the rescale is the identity), affine [4, 4] voxel->RAS mm, meta)``.
    """
    import pydicom

    headers, ignored = scan_folder(folder)
    hs = select_series(folder, headers, series_uid)
    _check_consistent(folder, hs)
    if len(hs) < 2:
        check_shape((hs[0].cols, hs[0].rows, 1), hs[0].samples)
    hs, step, info = _order_and_step(folder, hs)
    first = hs[0]
    check_shape((first.cols, first.rows, len(hs)), first.samples)

    iop, ps = first.orientation, first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * ps[1]
    lps[:3, 1] = iop[3:] * ps[0]
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    affine = lps_to_ras(lps)

    identity = all(h.slope == 1.0 and h.intercept == 0.0 for h in hs)
    out: np.ndarray | None = None
    for k, h in enumerate(hs):
        try:
            ds = pydicom.dcmread(h.path, force=h.forced)
            pixels = ds.pixel_array
        except Exception as exc:
            raise MedclDataError(
                h.path,
                f"cannot decode DICOM pixel data ({h.transfer_syntax or 'unknown syntax'}): {reason(exc)}",
            ) from exc
        if pixels.shape[:2] != (first.rows, first.cols):
            raise MedclDataError(
                h.path,
                f"pixel data of shape {pixels.shape} does not match Rows/Columns {first.rows}x{first.cols}",
            )
        # [rows, cols(, samples)] -> [samples, cols, rows] = [C, X, Y]
        plane = pixels.T if pixels.ndim == 2 else np.transpose(pixels, (2, 1, 0))
        if out is None:
            dtype = pixels.dtype if (keep_integer and identity) else np.float32
            out = np.empty((first.samples, first.cols, first.rows, len(hs)), dtype=dtype)
        if out.dtype == np.float32:
            out[..., k] = plane.astype(np.float64) * h.slope + h.intercept
        else:
            out[..., k] = plane

    slopes = {h.slope for h in hs}
    intercepts = {h.intercept for h in hs}
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": first.modality,
        "series_uid": first.series_uid,
        "series_description": first.description,
        "n_slices": len(hs),
        "transfer_syntax": first.transfer_syntax,
        "rescale_applied": any(h.has_rescale for h in hs) or not identity,
        "rescale_slope": slopes.pop() if len(slopes) == 1 else "per slice",
        "rescale_intercept": intercepts.pop() if len(intercepts) == 1 else "per slice",
        "slice_thickness_mm": first.slice_thickness,
        "ignored_files": ignored,
        **info,
    }
    return out, affine, meta
