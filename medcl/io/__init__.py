"""Readers and writers that keep geometry: NIfTI, DICOM series, NRRD/MHA/MHD (and whole-slide images).

Every volume reader returns a :class:`medcl.core.geometry.Volume`: a channel-first ``[C, X, Y, Z]``
array (float32 for images, an integer dtype for labels) and a 4x4 voxel -> RAS+ mm affine.

Public API::

    read_volume(path, *, series_uid=None, allow_multichannel=False, is_label=False) -> Volume
    write_nifti(volume, path) -> None
    list_dicom_series(folder) -> list[dict]
    detect_format(path) -> "nifti" | "dicom" | "itk"

The names are loaded lazily (PEP 562) so that ``import medcl.io`` does not import pydicom or SimpleITK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medcl.core.lazy import lazy_exports

if TYPE_CHECKING:
    from medcl.io.dicom import list_dicom_series
    from medcl.io.volume import detect_format, read_volume, write_nifti

# public name -> module defining it
_LAZY = {
    "read_volume": "medcl.io.volume",
    "write_nifti": "medcl.io.volume",
    "detect_format": "medcl.io.volume",
    "list_dicom_series": "medcl.io.dicom",
}

__all__ = ["detect_format", "list_dicom_series", "read_volume", "write_nifti"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
