"""Reading what runs wrote, defensively: a report of a broken run must still render, with the breakage listed.

Every reader returns ``None`` (or an empty result) for a missing file and raises nothing for a malformed one;
malformed files are reported as problems by the callers through :class:`ReadError` messages.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medcl.report.blocks import Figure, Table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 16 * 2**20
"""Larger PNGs are left out of the page (it is meant to be mailed) and named in the problems."""
MAX_TEXT_BYTES = 2 * 2**20


def short_number(v: float) -> str:
    """A number for a table: integers in full, ``|v| >= 1000`` with one decimal, others to 4 significant digits."""
    if not math.isfinite(v):
        return str(v)
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if 1000 <= abs(v) < 1e6:
        return f"{v:.1f}"
    return f"{v:.4g}"


class ReadError(Exception):
    """A file exists but cannot be used; the message names the file and the problem."""


def read_text(path: Path, limit: int = MAX_TEXT_BYTES) -> str | None:
    """The file's text (UTF-8, undecodable bytes replaced), ``None`` if absent; refuses files over ``limit``."""
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > limit:
        raise ReadError(f"{path.name}: {size / 2**20:.1f} MB, too large to show (limit {limit / 2**20:.0f} MB)")
    return path.read_text(encoding="utf-8", errors="replace")


def read_json(path: Path) -> Any:
    """Parsed JSON, ``None`` if absent; :class:`ReadError` if it does not parse."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReadError(f"{path.name}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc


def read_png(path: Path, title: str | None = None, caption: str = "") -> Figure:
    """A :class:`Figure` with the file's bytes; :class:`ReadError` unless it is a PNG of a sendable size."""
    size = path.stat().st_size
    if size > MAX_PNG_BYTES:
        raise ReadError(f"{path.name}: {size / 2**20:.1f} MB, too large to embed (limit {MAX_PNG_BYTES // 2**20} MB)")
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        raise ReadError(f"{path.name}: not a valid PNG file")
    return Figure(title if title is not None else path.name, data, caption)


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)``; :class:`ReadError` if it has no header."""
    text = read_text(path, limit=64 * 2**20)
    if text is None:
        return [], []
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header:
        raise ReadError(f"{path.name}: empty CSV (no header)")
    return header, [r for r in reader if r]


def csv_table(path: Path, title: str | None = None, max_rows: int = 200, collapsed: bool = False) -> Table:
    """A CSV file as a :class:`Table` of at most ``max_rows`` rows (the note says how many were left out)."""
    header, rows = read_csv(path)
    note = f"first {max_rows} of {len(rows)} rows; the whole table is in {path.name}" if len(rows) > max_rows else ""
    return Table(title if title is not None else path.name, header, rows[:max_rows], note, collapsed)


# ---- per-step metrics --------------------------------------------------------------------------------------

_LOWER = ("loss", "mae", "hd95", "/ce", "error")
_HIGHER = ("knn", "acc", "dice", "auc", "f1", "nsd")


def better(metric: str) -> str | None:
    """``"min"`` / ``"max"`` when lower / higher values of ``metric`` are better, ``None`` when neither."""
    m = metric.lower()
    if any(k in m for k in _LOWER):
        return "min"
    if any(k in m for k in _HIGHER):
        return "max"
    return None


def read_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """A per-step metrics CSV (``step`` column, one column per metric, empty cells allowed) ->
    ``{metric: [(step, value), ...]}`` sorted by step. ``nan``/``inf`` cells are kept (they are findings)."""
    from medcl.engine.plots import read_metrics_csv

    header, _ = read_csv(path)
    if "step" not in header:
        raise ReadError(f"{path.name}: no 'step' column")
    return {k: sorted(v) for k, v in read_metrics_csv(path).items()}


def malformed_rows(path: Path) -> str | None:
    """A one-line description of the rows of a per-step metrics CSV that cannot be read (wrong number of fields,
    a cell that is not a number, NUL bytes), or ``None`` when every row is well formed."""
    text = read_text(path, limit=64 * 2**20) or ""
    bad, first = 0, None
    if "\x00" in text:
        return f"{path.name}: holds NUL bytes (a damaged file); the readable rows are shown"
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return None
    width = len(rows[0])
    for i, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        ok = len(r) == width
        for cell in r if ok else ():
            try:
                if cell != "":
                    float(cell)
            except ValueError:
                ok = False
        if not ok:
            bad += 1
            first = first or i
    return f"{path.name}: {bad} malformed row(s) (first at line {first}); the readable rows are shown" if bad else None


def _fmt(v: float) -> str:
    return "" if v is None else f"{v:.6g}"


def summarise_series(series: dict[str, list[tuple[float, float]]], title: str,
                     direction: Callable[[str], str | None] = better) -> tuple[Table, list[str]]:
    """One row per metric: points, steps, first, last, min, max, best (by ``direction``: ``"min"``, ``"max"``
    or ``None``), non-finite count.

    Returns the table and the problems found: non-finite values of a loss or a training metric.
    """
    header = ["metric", "points", "steps", "first", "last", "min", "max", "best", "non-finite"]
    rows, problems = [], []
    for name in sorted(series):
        pts = series[name]
        vals = [v for _, v in pts]
        finite = [(s, v) for s, v in pts if math.isfinite(v)]
        bad = [(s, v) for s, v in pts if not math.isfinite(v)]
        best_is = direction(name)
        best = ""
        if finite and best_is:
            s, v = (min if best_is == "min" else max)(finite, key=lambda p: p[1])
            best = f"{short_number(v)} ({best_is}, step {s:g})"
        rows.append([
            name, str(len(vals)), f"{pts[0][0]:g}-{pts[-1][0]:g}", _fmt(vals[0]), _fmt(vals[-1]),
            _fmt(min(v for _, v in finite)) if finite else "", _fmt(max(v for _, v in finite)) if finite else "",
            best, str(len(bad)) if bad else "",
        ])
        if bad and (name.startswith("train/") or "loss" in name.lower()):
            problems.append(f"{name}: {len(bad)} non-finite value(s) ({bad[0][1]} first at step {bad[0][0]:g})")
    return Table(title, header, rows), problems


def draw_curves(metrics_csv: Path, keys: Sequence[str] | None, title: str) -> Figure | None:
    """Loss curves drawn from ``metrics_csv`` (for runs that wrote no plot), via the plot every run uses."""
    from medcl.engine.plots import plot_curves

    with tempfile.TemporaryDirectory(prefix="medcl-report-") as tmp:
        png = plot_curves(metrics_csv, Path(tmp) / "curves.png", keys=keys, title=title)
        if png is None:
            return None
        return Figure(f"curves drawn from {metrics_csv.name}", png.read_bytes(),
                      "drawn for this report: the run wrote no plot of these values")


# ---- run records ---------------------------------------------------------------------------------------

RECORD_KEYS = ("medcl_record", "record")


def embedded_record(path: Path) -> dict[str, Any] | None:
    """The run record inside a medcl weights file (``backbone.pt``, ``model.pt``: key ``medcl_record``; MIL
    models and patch encoders: ``record``), read with ``torch.load(weights_only=True)`` (memory-mapped, so a
    large file costs little); ``None`` if the file has none. :class:`ReadError` if it cannot be read."""
    import torch

    try:
        try:
            d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files written in the legacy (non-zip) format cannot be memory-mapped
            d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unpickler errors all mean the same to the reader
        raise ReadError(f"{path.name}: cannot read the run record (not a weights-only checkpoint: {exc})") from exc
    if not isinstance(d, dict):
        return None
    for key in RECORD_KEYS:
        rec = d.get(key)
        if isinstance(rec, dict) and rec.get("kind"):
            return rec
    return None
