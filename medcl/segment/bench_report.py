"""Tables and figure of the label-efficiency benchmark: ``results.md`` and ``dice_vs_labels.png``.

Inputs are the rows of ``results.csv`` (one per fine-tuning run and test case, with ``init``, ``reference``,
``budget``, ``combination``, ``seed``, ``lr`` and ``dice``) and of ``ceiling.csv`` (the converged full-label
runs, with the steps each trained).

Statistics:

* **mean +- SD Dice per init x budget**: each run's mean Dice over the test cases, then mean and standard
  deviation over the runs (combinations x seeds): a description of the spread, not an interval;
* **paired difference to the init's random arm** (``reference``: the random init of the same architecture): per
  (budget, combination, seed, test case) ``d = Dice_init - Dice_reference``, shaped ``[K combinations, S seeds,
  C test cases]``. The interval is :func:`medcl.segment.intervals.hierarchical_interval`: the independent units
  are the **labelled-volume combinations** (seeds of one combination share its volumes and are averaged inside
  it) crossed with the **test cases**; a variance-components t interval with Satterthwaite degrees of freedom.
  A cell is called a gain only when its whole interval lies above 0;
* **ceiling**: every labelled pool volume, trained until the training loss converges (``ceiling.csv``; steps
  used are reported), per seed;
* **fraction of the full-label Dice**: mean Dice at budget ``N`` over the converged ceiling of the init's random
  arm (the ``N = full`` column of the Dice table is the same-schedule full-label run, not a ceiling).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcl.core.files import atomic_write_text
from medcl.data.splits import FULL
from medcl.segment.bench_config import RANDOM
from medcl.segment.intervals import IntervalResult, hierarchical_interval

__all__ = ["run_means", "paired_differences", "budget_order", "write_report", "plot_dice_vs_labels",
           "difference_intervals", "plot_paired_differences",
           "UNIT_SENTENCE"]

UNIT_SENTENCE = ("the resampling unit is the labelled-volume combination (seeds of a combination share its volumes "
                 "and are averaged inside it), crossed with the test cases; 95% variance-components t interval with "
                 "Satterthwaite degrees of freedom (medcl.segment.intervals.hierarchical_interval)")


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


def paired_differences(rows: list[dict[str, Any]], init: str, reference: str, budget: str,
                       lr_of: Mapping[tuple[str, str], str]) -> np.ndarray:
    """``[K, S, C]`` differences ``init - reference`` by combination, seed and test case (NaN where a run or a case
    is missing on either side), each init at its own reported learning rate."""
    def table(name: str) -> dict[tuple[str, str, str], float]:
        lr = lr_of.get((name, budget))
        return {(str(r["combination"]), str(r["seed"]), str(r["case"])): float(r["dice"]) for r in rows
                if str(r["init"]) == name and _key(r["budget"]) == budget and str(r["lr"]) == lr}

    a, b = table(init), table(reference)
    keys = set(a) & set(b)
    if not keys:
        return np.zeros((0, 0, 0))
    combos = sorted({k[0] for k in keys}, key=_num)
    seeds = sorted({k[1] for k in keys}, key=_num)
    cases = sorted({k[2] for k in keys})
    d = np.full((len(combos), len(seeds), len(cases)), np.nan)
    for (c, s, case) in keys:
        d[combos.index(c), seeds.index(s), cases.index(case)] = a[(c, s, case)] - b[(c, s, case)]
    return d


def _num(x: str) -> Any:
    return (0, int(x)) if str(x).lstrip("-").isdigit() else (1, str(x))


def _fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None or math.isnan(std) else f" +- {std:.{digits}f}")


def _interval_cell(r: IntervalResult) -> str:
    if math.isnan(r.mean):
        return "-"
    if not math.isfinite(r.lo) or not math.isfinite(r.hi):
        return f"{r.mean:+.3f} [no interval: {r.n_combinations} combination]"
    mark = " **gain**" if r.lo > 0 else " **loss**" if r.hi < 0 else ""
    return f"{r.mean:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}]{mark}"


def _ceiling_stats(ceiling_rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per init: mean and SD over seeds of each run's mean Dice, the steps trained, how many runs converged."""
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for r in ceiling_rows:
        d = runs.setdefault(str(r["init"]), {}).setdefault(str(r["seed"]), {"dice": [], "steps": r.get("steps"),
                                                                           "max_steps": r.get("max_steps"),
                                                                           "converged": r.get("converged")})
        v = float(r["dice"])
        if not math.isnan(v):
            d["dice"].append(v)
    out = {}
    for init, by_seed in runs.items():
        means = np.array([np.mean(v["dice"]) for v in by_seed.values() if v["dice"]])
        steps = [int(float(v["steps"])) for v in by_seed.values() if v["steps"] not in (None, "")]
        conv = [str(v["converged"]).lower() == "true" for v in by_seed.values()]
        caps = [int(float(v["max_steps"])) for v in by_seed.values() if v["max_steps"] not in (None, "")]
        out[init] = {"mean": float(means.mean()) if means.size else math.nan,
                     "std": float(means.std(ddof=1)) if means.size > 1 else math.nan, "n": int(means.size),
                     "steps": steps, "converged": sum(conv), "cap": max(caps) if caps else None}
    return out


def write_report(rows: list[dict[str, Any]], path: str | Path, *, inits: list[str], lr_of: dict[tuple[str, str], str],
                 header: list[str], references: Mapping[str, str | None] | None = None,
                 ceiling_rows: list[dict[str, Any]] | None = None, n_labelled_pool: int | None = None,
                 costs: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """Write ``results.md``: the Dice table, the paired differences with their intervals, the ceiling, the
    fractions of the ceiling, the LRs used and the pretraining cost; returns the text.

    Args:
        rows: rows of ``results.csv``.
        inits: init names in table order.
        lr_of: ``(init, budget) -> lr`` of the reported runs.
        header: lines above the tables.
        references: init -> its random arm (``None`` for random arms); default: ``random`` for every other init.
        ceiling_rows: rows of ``ceiling.csv``.
        n_labelled_pool: the labelled pool size (the ceiling's data).
        costs: pretraining cost per init (``steps``, ``seconds``, ``step_seconds``).
    """
    refs = dict(references) if references is not None else {i: (None if i == RANDOM else RANDOM) for i in inits}
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

    lines = list(header) + ["", "## Mean Dice (mean +- SD over runs = combinations x seeds)", "",
                            "| init | " + " | ".join(f"N={c}" for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for init in inits:
        cells = []
        for b in budgets:
            m, s, n = cell(init, b)
            cells.append(f"{_fmt(m, s)} (n={n})" if n else "-")
        lines.append(f"| {init} | " + " | ".join(cells) + " |")

    compared = [i for i in inits if refs.get(i)]
    gains, no_evidence = [], []
    if compared:
        lines += ["", "## Paired per-case difference to the random init of the same architecture (Dice; mean "
                  "[95% interval])", "", f"Pairs share the budget, combination, seed and test case; {UNIT_SENTENCE}. "
                  "**gain** marks a cell whose whole interval lies above 0; any other cell is not distinguishable from "
                  "no difference at this sample size.", "",
                  "| init (vs) | " + " | ".join(f"N={c}" for c in cols) + " |", "|---|" + "---|" * len(cols)]
        found = {(i, b): r for i, _, b, r in difference_intervals(rows, inits=compared, references=refs, lr_of=lr_of)}
        for init in compared:
            cells = []
            for b in budgets:
                r = found.get((init, _key(b)))
                if r is None:
                    cells.append("-")
                    continue
                cells.append(_interval_cell(r))
                (gains if r.lo > 0 else no_evidence).append(f"{init} N={b}")
            lines.append(f"| {init} (vs {refs[init]}) | " + " | ".join(cells) + " |")
        lines += ["", "Gains the intervals support: " + (", ".join(gains) if gains else "none") + "."]

    stats = _ceiling_stats(ceiling_rows or [])
    if stats:
        pool = f"all {n_labelled_pool} labelled pool volumes" if n_labelled_pool else "every labelled pool volume"
        lines += ["", "## Ceiling: full labels, trained to convergence", "",
                  f"Data: {pool}; trained until the window means of the training loss improved by less than 1% over "
                  "the last fifth of the steps (at least the minimum steps, at most the cap); one run per seed.", "",
                  "| init | Dice (mean +- SD over seeds) | steps used | converged before the cap |", "|---|---|---|---|"]
        for init in inits:
            if init in stats:
                st = stats[init]
                steps = st["steps"]
                rng = f"{min(steps)}-{max(steps)}" if steps else "-"
                lines.append(f"| {init} | {_fmt(st['mean'], st['std'])} (n={st['n']}) | {rng} | "
                             f"{st['converged']}/{st['n']} (cap {st['cap']}) |")
    if stats and num:
        lines += ["", "## Fraction of the converged full-label Dice of the random init of the same architecture", "",
                  "| init | ceiling used | " + " | ".join(f"N={b}" for b in num) + " |", "|---|---|" + "---|" * len(num)]
        for init in inits:
            ref = refs.get(init) or init
            if ref not in stats or not stats[ref]["n"]:
                continue
            full = stats[ref]["mean"]
            fr = [_fmt(cell(init, b)[0] / full) if cell(init, b)[2] and full > 0 else "-" for b in num]
            lines.append(f"| {init} | {ref} ({_fmt(full)}) | " + " | ".join(fr) + " |")

    lines += ["", "## Learning rate of the reported runs", "", "| init | " + " | ".join(f"N={c}" for c in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for init in inits:
        lines.append(f"| {init} | " + " | ".join(lr_of.get((init, _key(b)), "-") for b in budgets) + " |")
    secs: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("seconds") not in (None, ""):
            secs.setdefault(str(r["init"]), {})[str(r.get("run", ""))] = float(r["seconds"])
    if secs:
        lines += ["", "## Fine-tuning wall-clock per run (this machine)", "", "| init | median s | runs |", "|---|---|---|"]
        for init in inits:
            if init in secs:
                v = sorted(secs[init].values())
                lines.append(f"| {init} | {v[len(v) // 2]:.0f} | {len(v)} |")
    if costs:
        lines += ["", "## Pretraining cost (this machine)", "", "| init | steps | s/step (median) | wall-clock |",
                  "|---|---|---|---|"]
        for init in inits:
            c = costs.get(init)
            if c:
                lines.append(f"| {init} | {c.get('steps', '-')} | {_fmt(float(c.get('step_seconds', math.nan)), digits=2)} "
                             f"| {_fmt(float(c.get('seconds', math.nan)) / 60, digits=1)} min |")
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
    return _save(fig, ax, path, title)


def _save(fig: Any, ax: Any, path: str | Path, title: str) -> Path:
    from medcl.engine.plots import save_figure

    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    save_figure(fig, out, dpi=120)
    return out


def difference_intervals(rows: list[dict[str, Any]], *, inits: Sequence[str], references: Mapping[str, str],
                         lr_of: Mapping[tuple[str, str], str]) -> list[tuple[str, str, str, IntervalResult]]:
    """``(init, reference, budget, interval)`` of every paired difference the report tables, in table order (the
    same :func:`paired_differences` and :func:`hierarchical_interval` as the table)."""
    budgets = budget_order({r["budget"] for r in rows})
    out = []
    for init in inits:
        ref = references.get(init)
        for b in budgets if ref else []:
            d = paired_differences(rows, init, ref, _key(b), lr_of)
            if d.size:
                out.append((init, ref, _key(b), hierarchical_interval(d)))
    return out


def plot_paired_differences(rows: list[dict[str, Any]], path: str | Path, *, inits: Sequence[str],
                            references: Mapping[str, str], lr_of: Mapping[tuple[str, str], str],
                            title: str = "") -> Path | None:
    """``paired_differences.png``: a forest plot of the paired Dice difference of every init to its random arm,
    per budget, with the 95% interval over combinations x test cases (green: gain, red: loss, grey: neither)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in difference_intervals(rows, inits=inits, references=references, lr_of=lr_of)
               if math.isfinite(e[3].mean)]
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 1.1 + 0.36 * len(entries)))
    for y, (*_, r) in enumerate(reversed(entries)):
        lo, hi = (r.lo, r.hi) if math.isfinite(r.lo) and math.isfinite(r.hi) else (r.mean, r.mean)
        color = "tab:green" if r.lo > 0 else "tab:red" if r.hi < 0 else "0.45"
        ax.plot([lo, hi], [y, y], color=color, lw=2)
        ax.plot(r.mean, y, "o", color=color)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(entries)))
    ax.set_yticklabels([f"{i} vs {ref}, N={b}" for i, ref, b, _ in reversed(entries)], fontsize=8)
    ax.set_xlabel("paired Dice difference, 95% interval (combinations x test cases)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, ax, path, title)
