"""Tables and figure of the label-efficiency benchmark: ``results.md`` and ``dice_vs_labels.png``.

Inputs are the rows of ``results.csv`` (one per fine-tuning run and test case, with ``init``, ``budget``,
``combination``, ``seed``, ``lr`` and ``dice``).

Statistics:

* **mean +- std Dice per init x budget**: each run's mean Dice over the test cases, then mean and standard
  deviation over the runs (combinations x seeds);
* **paired difference to random init**: for each (budget, combination, seed, test case) present for both
  inits, ``d = Dice_init - Dice_random``. The 95% interval is a percentile bootstrap over *both* sources of
  variation, crossed: each replicate resamples the paired runs (combination x seed) and the test cases with
  replacement and averages ``d`` over the resampled grid (so neither a lucky combination nor a few easy test
  cases can make the interval narrow);
* **fraction of the full-label Dice**: mean Dice at budget ``N`` over the mean Dice of the same
  initialisation trained on every labelled volume of the pool (the ceiling of the same model and schedule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcl.core.files import atomic_write_text
from medcl.data.splits import FULL
from medcl.segment.bench_config import RANDOM

__all__ = ["run_means", "paired_bootstrap", "budget_order", "write_report", "plot_dice_vs_labels"]



def budget_order(budgets: Sequence[Any]) -> list[Any]:
    """Numeric budgets ascending, then ``"full"``."""
    nums = sorted({int(b) for b in budgets if str(b) != FULL})
    return nums + ([FULL] if any(str(b) == FULL for b in budgets) else [])


def _key(b: Any) -> str:
    return str(b)


def run_means(rows: list[dict[str, Any]], metric: str = "dice") -> dict[tuple[str, str, str], dict[tuple, float]]:
    """``(init, budget, lr) -> {(combination, seed): mean metric over test cases}``."""
    acc: dict[tuple[str, str, str], dict[tuple, list[float]]] = {}
    for r in rows:
        v = float(r[metric])
        if math.isnan(v):
            continue
        k = (str(r["init"]), _key(r["budget"]), str(r["lr"]))
        acc.setdefault(k, {}).setdefault((str(r["combination"]), str(r["seed"])), []).append(v)
    return {k: {run: float(np.mean(v)) for run, v in d.items()} for k, d in acc.items()}


def paired_bootstrap(diff: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``diff [R runs, C cases]`` and its crossed percentile-bootstrap 95% interval (see module doc)."""
    d = np.asarray(diff, dtype=np.float64)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    r, c = d.shape
    rng = np.random.default_rng(seed)
    ri = rng.integers(0, r, size=(n_boot, r))
    ci = rng.integers(0, c, size=(n_boot, c))
    stats = d[ri[:, :, None], ci[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def _paired_matrix(rows: list[dict[str, Any]], init: str, budget: str, lr_of: dict[tuple[str, str], str]
                   ) -> np.ndarray:
    """``[R, C]`` differences init - random over the runs and cases both have (at each init's own LR)."""
    def table(name: str) -> dict[tuple[str, str], dict[str, float]]:
        t: dict[tuple[str, str], dict[str, float]] = {}
        for r in rows:
            if str(r["init"]) == name and _key(r["budget"]) == budget and str(r["lr"]) == lr_of.get((name, budget)):
                t.setdefault((str(r["combination"]), str(r["seed"])), {})[str(r["case"])] = float(r["dice"])
        return t

    a, b = table(init), table(RANDOM)
    runs = sorted(set(a) & set(b))
    if not runs:
        return np.zeros((0, 0))
    cases = sorted(set.intersection(*[set(a[k]) & set(b[k]) for k in runs]))
    m = np.array([[a[k][c] - b[k][c] for c in cases] for k in runs], dtype=np.float64)
    return m[:, ~np.isnan(m).any(axis=0)] if m.size else m


def _fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None or math.isnan(std) else f" +- {std:.{digits}f}")


def write_report(rows: list[dict[str, Any]], path: str | Path, *, inits: list[str], lr_of: dict[tuple[str, str], str],
                 header: list[str], n_boot: int = 2000, boot_seed: int = 0) -> str:
    """Write ``results.md``: the Dice table, the paired differences, the full-label fractions, the LRs used.

    ``lr_of`` maps ``(init, budget)`` to the learning rate whose runs are reported (the selected one).
    """
    means = run_means(rows)
    budgets = budget_order({r["budget"] for r in rows})
    num = [b for b in budgets if b != FULL]
    cols = [str(b) for b in budgets]

    def cell(init: str, b: Any) -> tuple[float, float, int]:
        runs = means.get((init, _key(b), lr_of.get((init, _key(b)), "")), {})
        v = np.array(list(runs.values()), dtype=np.float64)
        if v.size == 0:
            return math.nan, math.nan, 0
        return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)

    lines = list(header) + ["", "## Mean Dice (mean +- std over runs = combinations x seeds)", "",
                            "| init | " + " | ".join(f"N={c}" for c in cols) + " |",
                            "|---|" + "---|" * len(cols)]
    for init in inits:
        cells = []
        for b in budgets:
            m, s, n = cell(init, b)
            cells.append(f"{_fmt(m, s)} (n={n})" if n else "-")
        lines.append(f"| {init} | " + " | ".join(cells) + " |")

    if RANDOM in inits and len(inits) > 1:
        lines += ["", "## Paired per-case difference to random init (Dice; mean [bootstrap 95% interval])", "",
                  "Pairs share the budget, combination, seed and test case; the interval resamples runs and "
                  "test cases (crossed bootstrap, "
                  f"{n_boot} replicates).", "",
                  "| init | " + " | ".join(f"N={c}" for c in cols) + " |", "|---|" + "---|" * len(cols)]
        for init in inits:
            if init == RANDOM:
                continue
            cells = []
            for b in budgets:
                d = _paired_matrix(rows, init, _key(b), lr_of)
                m, lo, hi = paired_bootstrap(d, n_boot, boot_seed)
                cells.append("-" if math.isnan(m) else f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            lines.append(f"| {init} | " + " | ".join(cells) + " |")

    if FULL in budgets and num:
        lines += ["", "## Fraction of the full-label Dice of the same initialisation", "",
                  "| init | full-label Dice | " + " | ".join(f"N={b}" for b in num) + " |",
                  "|---|---|" + "---|" * len(num)]
        for init in inits:
            full, _, n_full = cell(init, FULL)
            fr = [(_fmt(cell(init, b)[0] / full) if n_full and full > 0 else "-") for b in num]
            lines.append(f"| {init} | {_fmt(full)} | " + " | ".join(fr) + " |")

    lines += ["", "## Learning rate of the reported runs", "", "| init | " + " | ".join(f"N={c}" for c in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for init in inits:
        lines.append(f"| {init} | " + " | ".join(lr_of.get((init, _key(b)), "-") for b in budgets) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(text, path)
    return text


def plot_dice_vs_labels(rows: list[dict[str, Any]], path: str | Path, *, inits: list[str],
                        lr_of: dict[tuple[str, str], str], title: str = "") -> Path | None:
    """``dice_vs_labels.png``: mean Dice against labelled volumes, a line per init with std error bars; the
    full-label Dice of each init as a dashed line of its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medcl.engine.plots import save_figure

    means = run_means(rows)
    budgets = budget_order({r["budget"] for r in rows})
    num = [b for b in budgets if b != FULL]
    if not num and FULL not in budgets:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for i, init in enumerate(inits):
        color = f"C{i}"
        xs, ys, es = [], [], []
        for b in num:
            v = np.array(list(means.get((init, str(b), lr_of.get((init, str(b)), "")), {}).values()))
            if v.size:
                xs.append(b)
                ys.append(v.mean())
                es.append(v.std(ddof=1) if v.size > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=color, label=init)
        full = np.array(list(means.get((init, FULL, lr_of.get((init, FULL), "")), {}).values()))
        if full.size:
            ax.axhline(full.mean(), ls="--", lw=1, color=color, label=f"{init}, all labels")
    if num:
        ax.set_xscale("log", base=2)
        ax.set_xticks(num)
        ax.set_xticklabels([str(b) for b in num])
    ax.set_xlabel("labelled volumes")
    ax.set_ylabel("test Dice (mean over foreground classes)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    save_figure(fig, out, dpi=120)
    return out
