"""DICOM folder scanning with pydicom: which files are DICOM images, their headers, their series.

Headers are read with ``stop_before_pixels`` (fast, no decoding). A file counts as a DICOM image when it
carries the ``DICM`` preamble (or is a preamble-less DICOM stream) and has ``Rows``/``Columns``; other
files (``README.txt``, ``DICOMDIR``, structured reports) are ignored. Only non-identifying fields are
kept: never PatientName, PatientID, BirthDate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from medcl.core.errors import MedclDataError

_DICOMDIR_SOP = "1.2.840.10008.1.3.10"


@dataclass
class SliceHeader:
    """What the reader needs from one file's header (no patient fields)."""

    path: Path
    forced: bool  # no "DICM" preamble: read with force=True
    series_uid: str
    modality: str
    description: str
    rows: int
    cols: int
    samples: int
    frames: int
    position: np.ndarray | None  # ImagePositionPatient [3], LPS mm
    orientation: np.ndarray | None  # ImageOrientationPatient [6]
    pixel_spacing: np.ndarray | None  # [row spacing, column spacing] mm
    slope: float
    intercept: float
    has_rescale: bool
    slice_thickness: float | None
    transfer_syntax: str


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM stream without the 128-byte preamble starts with a group 0x0002 or 0x0008 tag."""
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00")


def read_header(path: Path) -> SliceHeader | None:
    """Header of one image file, ``None`` when the file is not a DICOM image."""
    import pydicom

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    has_magic = len(head) >= 132 and head[128:132] == b"DICM"
    if not has_magic and not _looks_like_raw_dicom(head):
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_magic)
        sop = str(getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "") or "")
        if sop == _DICOMDIR_SOP or "DirectoryRecordSequence" in ds:
            return None
        if "Rows" not in ds or "Columns" not in ds:
            return None  # no image: structured report, presentation state, ...
        slope = ds.get("RescaleSlope")
        intercept = ds.get("RescaleIntercept")
        thickness = ds.get("SliceThickness")
        file_meta = ds.get("file_meta")
        syntax = getattr(file_meta, "TransferSyntaxUID", None) if file_meta is not None else None
        return SliceHeader(
            path=path,
            forced=not has_magic,
            series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
            modality=str(ds.get("Modality", "") or ""),
            description=str(ds.get("SeriesDescription", "") or ""),
            rows=int(ds.Rows),
            cols=int(ds.Columns),
            samples=int(ds.get("SamplesPerPixel", 1) or 1),
            frames=int(ds.get("NumberOfFrames", 1) or 1),
            position=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
            slope=float(slope) if slope not in (None, "") else 1.0,
            intercept=float(intercept) if intercept not in (None, "") else 0.0,
            has_rescale=slope not in (None, "") or intercept not in (None, ""),
            slice_thickness=float(thickness) if thickness not in (None, "") else None,
            transfer_syntax=(
                syntax.name if syntax is not None and hasattr(syntax, "name") else str(syntax or "")
            ),
        )
    except Exception as exc:  # pydicom raises many types on damaged headers
        if has_magic:
            raise MedclDataError(path, f"unreadable DICOM file ({reason(exc)})") from exc
        return None  # forced read of a non-DICOM file


def scan_folder(folder: Path) -> tuple[list[SliceHeader], int]:
    """Headers of every DICOM image file under ``folder`` and the number of files ignored."""
    headers: list[SliceHeader] = []
    ignored = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            header = read_header(Path(root) / name)
            if header is None:
                ignored += 1
            else:
                headers.append(header)
    return headers, ignored


def _group(headers: list[SliceHeader]) -> dict[str, list[SliceHeader]]:
    groups: dict[str, list[SliceHeader]] = {}
    for h in headers:
        groups.setdefault(h.series_uid, []).append(h)
    return groups


def _summaries(groups: dict[str, list[SliceHeader]]) -> list[dict[str, Any]]:
    return [
        {
            "series_uid": uid,
            "n_files": len(hs),
            "modality": hs[0].modality,
            "description": hs[0].description,
        }
        for uid, hs in groups.items()
    ]


def _describe(summaries: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{s['series_uid'] or '(empty uid)'} ({s['n_files']} files, {s['modality'] or '?'}, "
        f"'{s['description']}')"
        for s in summaries
    )


def list_dicom_series(folder: str | PathLike) -> list[dict[str, Any]]:
    """The DICOM image series under a folder (headers only, no pixel decoding).

    Returns:
        One dict per ``SeriesInstanceUID``, in order of first appearance: ``{"series_uid": str,
        "n_files": int, "modality": str, "description": str}``. ``series_uid`` may be ``""`` for
        anonymised files that dropped it. Empty list when the folder holds no DICOM image.

    Raises:
        MedclDataError: the folder does not exist, or a DICOM file's header is damaged.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MedclDataError(folder, "does not exist" if not folder.exists() else "is not a folder")
    headers, _ = scan_folder(folder)
    return _summaries(_group(headers))


def is_dicom_file(path: Path) -> bool:
    """Cheap test: the ``DICM`` preamble, or a preamble-less stream whose header pydicom can parse."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if not _looks_like_raw_dicom(head):
        return False
    try:
        return read_header(path) is not None
    except MedclDataError:
        return True


def series_uid_of_file(path: Path) -> str:
    """``SeriesInstanceUID`` of one DICOM file (to read the series it belongs to from its folder)."""
    header = read_header(path)
    if header is None:
        raise MedclDataError(path, "not a DICOM image file")
    return header.series_uid


def select_series(folder: Path, headers: list[SliceHeader], series_uid: str | None) -> list[SliceHeader]:
    groups = _group(headers)
    if not groups:
        raise MedclDataError(folder, "no DICOM image files found in the folder")
    summaries = _summaries(groups)
    if series_uid is not None:
        if series_uid not in groups:
            raise MedclDataError(
                folder, f"series_uid '{series_uid}' not found; series found: {_describe(summaries)}"
            )
        return groups[series_uid]
    if len(groups) > 1:
        raise MedclDataError(
            folder,
            f"mixed series: {len(groups)} DICOM series in the folder, choose one with series_uid: "
            f"{_describe(summaries)}",
        )
    return next(iter(groups.values()))
