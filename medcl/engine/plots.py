"""Plots every run writes (PNG, matplotlib's headless Agg backend)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

from medcl.core.files import atomic_path

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Lightning CSVLogger ``metrics.csv`` -> {metric: [(step, value), ...]} skipping empty cells."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step", "")
            if step in ("", None):
                continue
            for k, v in row.items():
                if k in ("step", "epoch", None) or v in ("", None):  # None: the extra fields of a malformed row
                    continue
                try:
                    series.setdefault(k, []).append((float(step), float(v)))
                except (TypeError, ValueError):
                    continue
    return series


def plot_curves(
    metrics_csv: str | Path,
    out_png: str | Path,
    keys: Sequence[str] | None = None,
    title: str = "",
    smooth: int = 1,
) -> Path | None:
    """One panel per metric (loss terms, probes...) against step; returns the PNG path, None if no data."""
    series = read_metrics_csv(metrics_csv)
    if keys is not None:
        series = {k: v for k, v in series.items() if k in keys}
    if not series:
        return None
    names = sorted(series)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        pts = sorted(series[name])
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        marker = "o" if len(xs) <= 20 else None  # a metric logged a few times (probes) stays visible
        ax.plot(xs, ys, lw=0.8, alpha=0.45 if smooth > 1 else 1.0, color="tab:blue", marker=marker, ms=3)
        if smooth > 1 and len(ys) > max(smooth, 20):
            k = smooth
            sm = [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, lw=1.5, color="tab:blue")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=110)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically and close it (every plot medcl writes goes through here)."""
    out = Path(path)
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return out
