"""``medcl data check`` / ``medcl data info``: load every case, describe it, and collect every problem.

A report is a plain dict (written as JSON by the CLI)::

    {"source": str, "kind": str | None, "n_cases": int,
     "cases": [{"id", "image", "label", "shape", "spacing", "orientation", "dtype", "channels",
                "intensity_range", "label_values", "problems": [{"path", "problem"}]}],
     "problems": [{"path", "problem", "case"}]}      # every problem: per case and of the manifest

Besides what stops training (:func:`~medcl.data.cases.load_case`), a check reports what trains but may be
wrong elsewhere: a NIfTI whose sform and qform disagree by more than 1e-3 mm (medcl uses the sform; ITK-based
tools may use the qform).

Nothing stops at the first problem: a broken manifest is one problem, a broken case is listed with its
problems and the scan goes on.
"""

from __future__ import annotations

import sys
from os import PathLike
from typing import Any

import numpy as np

from medcl.core.errors import MedclDataError
from medcl.core.geometry import Volume

__all__ = ["check_dataset", "inspect_volume", "format_report", "format_info"]

_MAX_LABEL_VALUES = 64
# meta keys of a readable volume that ``data check`` reports as problems and ``data info`` shows as warnings
_WARNING_KEYS = ("transform_warning",)


def _geometry(vol: Volume) -> dict[str, Any]:
    return {
        "shape": list(vol.shape),
        "channels": vol.channels,
        "spacing": [round(float(s), 6) for s in vol.spacing],
        "orientation": vol.orientation,
        "dtype": str(vol.array.dtype),
        "intensity_range": [float(vol.array.min()), float(vol.array.max())],
    }


def _integer_values(arr: np.ndarray) -> list[int] | None:
    """Sorted distinct values when ``arr`` holds few whole numbers (a label map), else ``None``."""
    if arr.dtype.kind in "iub":
        vals = np.unique(arr)
    else:
        if not np.array_equal(arr, np.round(arr)):
            return None
        vals = np.unique(arr)
    return [int(v) for v in vals] if len(vals) <= _MAX_LABEL_VALUES else None


def check_dataset(path: str | PathLike, *, progress: bool | None = None) -> dict[str, Any]:
    """Load every case of the dataset at ``path`` and report geometry, intensities, labels and problems.

    Args:
        path: anything :func:`~medcl.data.manifest.load_manifest` accepts.
        progress: show a tqdm bar on stderr (``None``: only on a terminal and for more than 10 cases).
    """
    from tqdm import tqdm

    from medcl.data.cases import inspect_case
    from medcl.data.manifest import load_manifest

    report: dict[str, Any] = {"source": str(path), "kind": None, "n_cases": 0, "cases": [], "problems": []}
    try:
        manifest = load_manifest(path)
    except MedclDataError as exc:
        report["problems"].append({"path": exc.path or str(path), "problem": exc.problem, "case": None})
        return report
    report["kind"] = manifest.kind
    report["n_cases"] = len(manifest.cases)
    report["channel_names"] = list(manifest.channel_names)
    report["labels"] = {str(k): v for k, v in manifest.labels.items()} if manifest.labels is not None else None
    for p, q in manifest.problems:
        report["problems"].append({"path": p, "problem": q, "case": None})
    if not manifest.cases:
        report["problems"].append({"path": str(path), "problem": "no cases found", "case": None})
    show = progress if progress is not None else (sys.stderr.isatty() and len(manifest.cases) > 10)
    for case in tqdm(manifest.cases, desc="checking", unit="case", disable=not show, file=sys.stderr):
        entry: dict[str, Any] = {"id": case.id, "image": ";".join(case.images), "label": case.label,
                                 "shape": None, "spacing": None, "orientation": None, "dtype": None,
                                 "channels": None, "intensity_range": None, "label_values": None}
        try:
            warnings: list[tuple[str, str]] = []
            image, label, problems = inspect_case(case, manifest, warnings=warnings)
            problems += warnings  # e.g. sform/qform disagreement: trains, but a problem to report
            if image is not None:
                entry.update(_geometry(image))
            if label is not None:
                entry["label_values"] = [int(v) for v in np.unique(label.array)]
        except Exception as exc:  # an unexpected failure on one case must not hide the others
            problems = [(case.images[0], f"unexpected error: {type(exc).__name__}: {exc}")]
        entry["problems"] = [{"path": p, "problem": q} for p, q in problems]
        report["cases"].append(entry)
        report["problems"].extend({"path": p, "problem": q, "case": case.id} for p, q in problems)
    return report


def inspect_volume(path: str | PathLike) -> dict[str, Any]:
    """Describe one volume (file or DICOM folder): format, geometry, affine, intensities, problems.

    ``problems`` (the volume cannot be read) leaves the description out; ``warnings`` are facts about a
    readable volume that ``data check`` reports as problems, e.g. a NIfTI whose sform and qform disagree.
    """
    import medcl.io as mio

    info: dict[str, Any] = {"path": str(path), "format": None, "problems": []}
    try:
        info["format"] = mio.detect_format(path)
        vol = mio.read_volume(path, allow_multichannel=True)
    except MedclDataError as exc:
        info["problems"].append({"path": exc.path or str(path), "problem": exc.problem})
        return info
    info.update(_geometry(vol))
    info["affine"] = [[float(x) for x in row] for row in vol.affine]
    info["label_values"] = _integer_values(vol.array) if vol.channels == 1 else None
    info["meta"] = {k: v for k, v in vol.meta.items()
                    if isinstance(v, str | int | float | bool) and k not in _WARNING_KEYS}
    info["warnings"] = [{"path": str(path), "problem": str(vol.meta[k])} for k in _WARNING_KEYS if vol.meta.get(k)]
    return info


def _fmt_range(r: list[float] | None) -> str:
    return "-" if r is None else f"{r[0]:.4g}..{r[1]:.4g}"


def _fmt_vec(v: list[Any] | None, fmt: str = "{}") -> str:
    return "-" if v is None else "x".join(fmt.format(x) for x in v)


def format_report(report: dict[str, Any]) -> str:
    """The table of cases and the list of problems, as ``medcl data check`` prints them."""
    rows = [("id", "shape", "spacing (mm)", "orient", "dtype", "intensity", "labels", "status")]
    for c in report["cases"]:
        labels = "-" if c["label_values"] is None else ",".join(str(v) for v in c["label_values"])
        shape = _fmt_vec(c["shape"])
        if c.get("channels") and c["channels"] > 1:
            shape = f"{c['channels']}x{shape}"
        status = "ok" if not c["problems"] else f"{len(c['problems'])} problem(s)"
        rows.append((c["id"], shape, _fmt_vec(c["spacing"], "{:.3g}"), c["orientation"] or "-", c["dtype"] or "-",
                     _fmt_range(c["intensity_range"]), labels, status))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_bad = sum(1 for c in report["cases"] if c["problems"])
    head = f"{report['source']}: {report['kind'] or 'unreadable'} dataset, {len(report['cases'])} case(s)"
    out = [head, *lines] if report["cases"] else [head]
    probs = report["problems"]
    if probs:
        out.append("")
        out.append(f"{len(probs)} problem(s) ({n_bad} case(s) affected):")
        out.extend(f"  {p['path']}: {p['problem']}" for p in probs)
    else:
        out.append("no problems found")
    return "\n".join(out)


def format_info(info: dict[str, Any]) -> str:
    """``medcl data info`` text."""
    if info["problems"]:
        return "\n".join(f"{p['path']}: {p['problem']}" for p in info["problems"])
    lines = [
        f"path         {info['path']}",
        f"format       {info['format']}",
        f"shape        {_fmt_vec(info['shape'])} ({info['channels']} channel(s))",
        f"spacing      {_fmt_vec(info['spacing'], '{:.4g}')} mm",
        f"orientation  {info['orientation']}",
        f"dtype        {info['dtype']}",
        f"intensity    {_fmt_range(info['intensity_range'])}",
    ]
    if info.get("label_values") is not None:
        lines.append(f"values       {', '.join(str(v) for v in info['label_values'])}")
    lines.append("affine       " + "\n             ".join(
        "[" + ", ".join(f"{x:10.4f}" for x in row) + "]" for row in info["affine"]))
    for k, v in info.get("meta", {}).items():
        if k in ("format", "dtype") or v == "":
            continue
        lines.append(f"{k:<12} {v}")
    lines.extend(f"warning      {w['problem']}" for w in info.get("warnings", []))
    return "\n".join(lines)


def write_json(obj: dict[str, Any], path: str | PathLike) -> None:
    """Write a report as JSON (parent folders created)."""
    from medcl.core.files import atomic_write_json

    atomic_write_json(obj, path)
