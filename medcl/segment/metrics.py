"""Segmentation metrics per case and class: Dice, HD95 (mm) and normalised surface distance (MONAI).

All three are computed on the **original grid** of the case (the prediction mapped back, the label as
read), with the voxel spacing of that grid, so distances are millimetres.

* Dice (``monai.metrics.compute_dice``);
* HD95: the 95th percentile of the symmetric surface distances (``compute_hausdorff_distance``,
  ``percentile=95``), in mm;
* NSD: normalised surface Dice at a tolerance in mm (``compute_surface_dice``; Nikolov et al., 2021).

Empty structures follow one convention (as in Metrics Reloaded, Maier-Hein et al., 2024): when both the
reference and the prediction lack a class, Dice = NSD = 1 and HD95 = 0; when exactly one lacks it, Dice =
NSD = 0 and HD95 is undefined (``nan``: left out of means, counted in the summary).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.networks.utils import one_hot

from medcl.core.files import write_csv

__all__ = ["case_metrics", "summarise", "write_metrics_csv", "METRIC_NAMES"]

METRIC_NAMES = ("dice", "hd95", "nsd")


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
    class_names: dict[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Metrics of one case, one dict per foreground class.

    Args:
        pred, ref: ``[X, Y, Z]`` (or ``[1, X, Y, Z]``) integer label maps on the same grid.
        num_classes: ``K`` including background.
        spacing: voxel size in mm along X, Y, Z.
        nsd_tolerance_mm: NSD tolerance.
        class_names: value -> name, for the ``name`` field.

    Returns:
        ``[{"class": k, "name", "dice", "hd95", "nsd", "ref_voxels", "pred_voxels"}, ...]`` for k = 1..K-1.
    """
    p = torch.as_tensor(np.asarray(pred)).long().reshape(1, 1, *np.asarray(pred).shape[-3:])
    r = torch.as_tensor(np.asarray(ref)).long().reshape(1, 1, *np.asarray(ref).shape[-3:])
    if p.shape != r.shape:
        raise ValueError(f"prediction {tuple(p.shape[2:])} and reference {tuple(r.shape[2:])} differ in shape")
    ph, rh = one_hot(p, num_classes), one_hot(r, num_classes)
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI warns on every empty class; handled by the convention below
        warnings.simplefilter("ignore")
        dice = compute_dice(ph, rh, include_background=False, ignore_empty=False)[0]
        hd = compute_hausdorff_distance(ph, rh, include_background=False, percentile=95, spacing=sp)[0]
        nsd = compute_surface_dice(ph, rh, class_thresholds=[float(nsd_tolerance_mm)] * (num_classes - 1),
                                   include_background=False, spacing=sp)[0]
    n_ref = rh[0, 1:].flatten(1).sum(1)
    n_pred = ph[0, 1:].flatten(1).sum(1)
    rows = []
    for j in range(num_classes - 1):
        k = j + 1
        both_empty = n_ref[j] == 0 and n_pred[j] == 0
        one_empty = (n_ref[j] == 0) != (n_pred[j] == 0)
        row = {
            "class": k,
            "name": (class_names or {}).get(k, str(k)),
            "dice": float(dice[j]),
            "hd95": 0.0 if both_empty else (math.nan if one_empty else float(hd[j])),
            "nsd": 1.0 if both_empty else (0.0 if one_empty else float(nsd[j])),
            "ref_voxels": int(n_ref[j]),
            "pred_voxels": int(n_pred[j]),
        }
        rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean (and std over cases) of each metric, overall and per class, from ``case_metrics`` rows that
    carry a ``case`` key. ``nan`` values are left out and counted in ``n_undefined``."""
    out: dict[str, Any] = {"n_cases": len({r["case"] for r in rows})}
    classes = sorted({(r["class"], r["name"]) for r in rows})
    for m in METRIC_NAMES:
        per_case: dict[str, list[float]] = {}
        for r in rows:
            per_case.setdefault(r["case"], []).append(r[m])
        case_means = [_nanmean(v) for v in per_case.values()]
        out[f"{m}_mean"], out[f"{m}_std"] = _nanmean(case_means), _nanstd(case_means)
        out[f"{m}_n_undefined"] = sum(1 for r in rows if math.isnan(r[m]))
        for k, name in classes:
            vals = [r[m] for r in rows if r["class"] == k]
            out[f"{m}_{name}"] = _nanmean(vals)
    return out


def _nanmean(v: Sequence[float]) -> float:
    a = np.asarray([x for x in v if not math.isnan(x)], dtype=np.float64)
    return float(a.mean()) if a.size else math.nan


def _nanstd(v: Sequence[float]) -> float:
    a = np.asarray([x for x in v if not math.isnan(x)], dtype=np.float64)
    return float(a.std(ddof=1)) if a.size > 1 else (0.0 if a.size == 1 else math.nan)


def write_metrics_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """One row per case and class: ``case, class, name, dice, hd95, nsd, ref_voxels, pred_voxels``."""
    return write_csv(path, rows, ["case", "class", "name", *METRIC_NAMES, "ref_voxels", "pred_voxels"])
