"""A label volume on a DICOM series' grid, written as a DICOM Segmentation (DICOM-SEG) with highdicom.

What is written
---------------
One ``BINARY`` Segmentation instance (highdicom's ``Segmentation``) that belongs to the source series' study and
frame of reference and references every source slice: the frame of slice ``k`` holds the labels of medcl's slice
``k`` (the slice order of :func:`medcl.io.dicom.read_dicom_series`) and carries the ``SOPInstanceUID`` of that
slice's file in its derivation and source image sequences. One segment per class but background, numbered as the
class (label ``i`` is segment ``i``) and named after it (``dataset.json`` / plan labels); every class has its segment
even when no voxel holds it (such a segment simply has no frame), and frames without any label are left out.
The segmented property codes are generic (SNOMED CT "Anatomical structure" / "Tissue"): medcl's datasets name their
classes in free text, the segment label carries the name.

Geometry contract
-----------------
``labels.array`` is ``[1, X, Y, Z]`` = ``[1, Columns, Rows, slices]`` (medcl's reading of the series), so frame ``k``
is ``labels.array[0, :, :, k].T`` (``[Rows, Columns]``). Before anything is written, the label volume's affine is
checked against every source slice: voxel ``(0, 0, k)`` must sit at slice ``k``'s ``ImagePositionPatient`` and the
first two axes must be its row / column directions times ``PixelSpacing``; a volume on any other grid is refused.

Source files whose ``SOPClassUID`` / ``SOPInstanceUID`` were blanked (some anonymisers do) are referenced by the
UIDs of their file meta (``MediaStorageSOPInstanceUID``, the same instance by the standard). A series without a
``StudyInstanceUID`` or ``SeriesInstanceUID`` gets UIDs derived from its slices' instance UIDs (the same for every
run on those files), with a warning: such files cannot be stored in a PACS as they are. Absent type 2 patient / study
attributes are taken as empty, an absent ``SliceThickness`` as the slice step. The SEG repeats the source's patient and study attributes, as a DICOM object of that
patient must (nothing of them is logged). The inputs are never written.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.core.geometry import Volume, lps_to_ras

log = logging.getLogger(__name__)

__all__ = ["series_slices", "check_on_series_grid", "write_dicom_seg"]

_SEGMENT_LABEL_MAX = 64  # DICOM LO
# type 2 attributes of the source's Patient / General Study modules that the SEG repeats (DICOM PS3.3 C.7.1.1, C.7.2.1)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def series_slices(folder: str | PathLike, series_uid: str | None = None) -> list[Any]:
    """The slice headers of a DICOM series folder in medcl's slice order (the Z axis of ``read_volume``).

    Raises:
        MedclDataError: not a folder, no DICOM image in it, several series without ``series_uid``, or a series
            medcl cannot read as a volume (the reader's own checks: gaps, inconsistent geometry, multi-frame).
    """
    from medcl.io.dicom import _check_consistent, _order_and_step
    from medcl.io.dicom_scan import scan_folder, select_series

    folder = Path(folder)
    if not folder.is_dir():
        raise MedclDataError(folder, "a DICOM-SEG needs its source DICOM series folder; "
                                     + ("this does not exist" if not folder.exists() else "this is a file"))
    headers, _ = scan_folder(folder)
    hs = select_series(folder, headers, series_uid)
    _check_consistent(folder, hs)
    hs, _, _ = _order_and_step(folder, hs)
    return hs


def check_on_series_grid(labels: Volume, slices: list[Any], folder: str | PathLike) -> None:
    """Refuse ``labels`` unless it lies voxel for voxel on the grid of ``slices`` (see the module docstring).

    Raises:
        MedclDataError: another shape, or an affine that puts a slice, or the row / column axes, elsewhere.
    """
    first = slices[0]
    want = (1, first.cols, first.rows, len(slices))
    if tuple(labels.array.shape) != want:
        raise MedclDataError(folder, f"the label volume has shape {tuple(labels.array.shape)}, the series is "
                                     f"{want} ([1, Columns, Rows, slices]): not a segmentation of this series")
    lps = lps_to_ras(labels.affine)  # voxel -> LPS, the DICOM patient space
    ps = first.pixel_spacing
    tol = max(1e-3, 0.01 * float(ps.min()))
    axes = np.stack([first.orientation[:3] * ps[1], first.orientation[3:] * ps[0]], axis=1)
    if not np.allclose(lps[:3, :2], axes, atol=tol):
        raise MedclDataError(folder, "the label volume's row / column axes are not the series' (ImageOrientationPatient "
                                     "x PixelSpacing): a flipped or resampled segmentation")
    for k, h in enumerate(slices):
        where = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
        if np.abs(where - h.position).max() > tol:
            raise MedclDataError(folder, f"slice {k} of the label volume lies at {np.round(where, 3).tolist()} mm, "
                                         f"the series' slice {h.path.name} at {np.round(h.position, 3).tolist()} "
                                         "(ImagePositionPatient): not this series' grid")


def _source_datasets(slices: list[Any]) -> list[Any]:
    """The source headers (no pixels) as pydicom datasets, in slice order, with their instance UIDs restored from
    the file meta where blanked and a study / series UID derived where missing (in memory only)."""
    import pydicom
    from pydicom.uid import generate_uid

    normal = np.cross(slices[0].orientation[:3], slices[0].orientation[3:])
    step = abs(float((slices[1].position - slices[0].position) @ normal))
    dss = []
    for h in slices:
        ds = pydicom.dcmread(h.path, stop_before_pixels=True, force=h.forced)
        meta = getattr(ds, "file_meta", None)
        for attr, meta_attr in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(ds.get(attr, "") or "") and meta is not None and str(meta.get(meta_attr, "") or ""):
                setattr(ds, attr, meta.get(meta_attr))
            if not str(ds.get(attr, "") or ""):
                raise MedclDataError(h.path, f"the slice has no {attr} (nor {meta_attr} in its file meta): a "
                                             "DICOM-SEG cannot reference it")
        for attr in _TYPE2:  # must be present, may be empty: absent in some exports, highdicom reads them
            if attr not in ds:
                setattr(ds, attr, "")
        if "SliceThickness" not in ds or ds.SliceThickness in (None, ""):
            # type 2 yet needed for the SEG's pixel measures: the slice step stands in for an unknown thickness
            ds.SliceThickness = f"{step:.6g}"
        dss.append(ds)
    instances = sorted(str(ds.SOPInstanceUID) for ds in dss)
    for attr in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not all(str(ds.get(attr, "") or "") for ds in dss):
            uid = generate_uid(entropy_srcs=[attr, *instances])
            log.warning("%s: the series has no %s (anonymised?); the DICOM-SEG uses %s, derived from its slices",
                        slices[0].path.parent, attr, uid)
            for ds in dss:
                setattr(ds, attr, uid)
    return dss


def _segment_descriptions(class_names: Mapping[int, str], algorithm: str, version: str) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    alg = hd.AlgorithmIdentificationSequence(name=algorithm[:_SEGMENT_LABEL_MAX], version=version,
                                             family=codes.cid7162.ArtificialIntelligence)
    out = []
    for i in range(1, max(class_names) + 1):
        name = str(class_names.get(i, str(i))).strip() or str(i)
        out.append(hd.seg.SegmentDescription(
            segment_number=i, segment_label=name[:_SEGMENT_LABEL_MAX],
            segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=codes.SCT.Tissue,
            algorithm_type="AUTOMATIC", algorithm_identification=alg))
    return out


def write_dicom_seg(
    labels: Volume,
    series: str | PathLike,
    out: str | PathLike,
    class_names: Mapping[int, str],
    *,
    series_uid: str | None = None,
    algorithm: str = "medcl",
    description: str = "medcl segmentation",
) -> Path:
    """Write ``labels`` as a DICOM Segmentation of the series in folder ``series`` to file ``out`` (atomically).

    Args:
        labels: ``array [1, X, Y, Z]`` integer class indices on the series' own grid (``affine`` voxel -> RAS, as
            :func:`medcl.io.read_volume` reads the series); 0 is background.
        series: the source DICOM series folder.
        out: the ``.dcm`` file to write; never inside ``series``.
        class_names: ``{class index: name}`` including background 0; classes ``1 .. max`` become segments.
        series_uid: the ``SeriesInstanceUID`` to reference when the folder holds several series.
        algorithm: the algorithm name recorded in each segment (e.g. the model).
        description: the SEG's ``SeriesDescription`` / content description.

    Returns:
        ``out``.

    Raises:
        MedclDataError: not a DICOM series, a label volume off the series' grid, label values without a class
            name, or an output inside the source folder.
        MedclConfigError: highdicom is not installed.
    """
    import medcl
    from medcl.core.files import atomic_write_bytes

    try:
        import highdicom as hd
    except ImportError as exc:  # a declared dependency; a broken install still gets one line
        raise MedclConfigError("--format", f"dicom-seg needs the highdicom package ({exc})") from exc

    series, out = Path(series), Path(out)
    if out.resolve().is_relative_to(series.resolve()):
        raise MedclDataError(out, f"would be written inside the source DICOM folder {series}; choose another output")
    names = {int(k): str(v) for k, v in class_names.items()}
    if not names or max(names) < 1 or min(names) < 0:
        raise MedclDataError(series, f"class names {names} name no foreground class: nothing to segment")
    slices = series_slices(series, series_uid)
    check_on_series_grid(labels, slices, series)
    values = np.unique(labels.array)
    if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() > max(names):
        raise MedclDataError(series, f"label values {values.tolist()[:10]} do not match the classes "
                                     f"{sorted(names)} ({', '.join(names.values())})")
    frames = np.ascontiguousarray(labels.array[0].transpose(2, 1, 0))  # [slices, Rows, Columns]
    frames = frames.astype(np.uint8 if max(names) < 256 else np.uint16)
    sources = _source_datasets(slices)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type="BINARY",
        segment_descriptions=_segment_descriptions(names, algorithm, medcl.__version__),
        series_instance_uid=hd.UID(), series_number=int(sources[0].get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medcl", manufacturer_model_name="medcl predict",
        software_versions=medcl.__version__, device_serial_number="none", content_description=description[:64],
        series_description=description[:64], omit_empty_frames=True)
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(buffer.getvalue(), out)
    return out
