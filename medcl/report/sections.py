"""What each run kind contributes to the report, and the walk over nested run folders.

:func:`build_section` turns one run folder into a :class:`~medcl.report.blocks.Section`: the builder of its kind
(pretraining, fine-tuning, label-efficiency benchmark here; MIL and whole-slide runs in
:mod:`medcl.report.sections_mil`; anything else generically) adds what the run wrote, every PNG not shown yet
is embedded, and the run folders inside it become child sections. The builders read files only: the report
imports no job module, so it works on runs of other medcl versions and on runs copied from other machines.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medcl.core.runfolder import test_metrics_path
from medcl.report.blocks import Facts, Group, Section, Table
from medcl.report.common import (
    Options,
    add_config,
    add_csv,
    add_markdown,
    add_png,
    add_remaining_pngs,
    add_run_facts,
    add_step_metrics,
    flatten,
    fmt_num,
    guard,
    load_record,
)
from medcl.report.detect import find_runs, record_kind
from medcl.report.readers import ReadError, better, read_csv, read_json, read_png, read_series
from medcl.report.sections_mil import mil_encoder_section, mil_section, wsi_tiles_section

DONE_FILE = "summary.json"
"""What a finished pretraining / fine-tuning run writes last (``medcl.segment.finetune.DONE_FILE``)."""
_PRETRAIN_CURVES = ("train/", "probe/")
_PRETRAIN_HIDDEN = ("_anchors", "_dropped", "seconds", "chance")


def files_facts(sec: Section, patterns: tuple[str, ...]) -> None:
    """A table of the weight files and checkpoints (name and size), which the page cannot show otherwise."""
    rows = []
    for pat in patterns:
        for p in sorted(sec.path.glob(pat)):
            if p.is_file():
                rows.append((str(p.relative_to(sec.path)), f"{p.stat().st_size / 2**20:.2f} MB"))
    if rows:
        sec.blocks.append(Facts("Weights and checkpoints", rows))


def _json(sec: Section, name: str) -> Any:
    d = guard(sec, name, lambda: read_json(sec.path / name))
    if d is not None:
        sec.shown.add(name)
    return d


# ---- pretraining ---------------------------------------------------------------------------------------

def pretrain_section(sec: Section, opts: Options) -> None:
    """``medcl pretrain``: summary (step time, memory, probes), config, per-step metrics, loss curves, health."""
    rec = load_record(sec, ["backbone.pt"])
    summary = _json(sec, "summary.json")
    summary = summary if isinstance(summary, dict) else None
    method = (summary or {}).get("method") or ((rec or {}).get("config") or {}).get("method")
    add_run_facts(sec, rec, [("method", method)], written_by=["config.yaml", "metrics.csv", "summary.json"])
    if summary is None:
        sec.problems.append("no summary.json: the run has not finished (still running, killed or failed); "
                            "`medcl pretrain --resume --out DIR` continues it")
    else:
        sec.blocks.append(Facts("Summary (summary.json)", [
            (label, fmt_num(summary[k])) for k, label in (
                ("steps", "steps"), ("world_size", "processes"), ("volumes_per_step", "volumes per step"),
                ("step_seconds_median", "median time per step (s)"), ("peak_rss_mb", "peak host memory (MB)"),
                ("peak_gpu_mb", "peak GPU memory (MB)")) if k in summary]))
        _probe_table(sec, summary)
    cfg = add_config(sec, fallback=(rec or {}).get("config")) or {}
    max_steps = (cfg.get("trainer") or {}).get("max_steps")
    if summary and isinstance(max_steps, int) and isinstance(summary.get("steps"), int) and summary["steps"] < max_steps:
        sec.problems.append(f"stopped at step {summary['steps']} of trainer.max_steps = {max_steps}")
    name = "metrics.csv" if (sec.path / "metrics.csv").is_file() else "logs/metrics.csv"
    series = add_step_metrics(sec, name, "loss.png", lambda k: k.startswith(_PRETRAIN_CURVES)
                              and not k.endswith(_PRETRAIN_HIDDEN), title="Loss terms and probes",
                              direction=_pretrain_direction)
    sec.problems += embedding_health(series)
    files_facts(sec, ("backbone.pt", "checkpoints/*.ckpt"))


def _pretrain_direction(metric: str) -> str | None:
    """``train/{term}`` is a loss term (lower is better); its statistics (``_anchors``, ``_eff_rank``...) and the
    probes' bookkeeping have no better direction; other names as :func:`~medcl.report.readers.better` says."""
    if metric.endswith(("_anchors", "_dropped", "_eff_rank", "_emb_std", "seconds", "chance")):
        return None
    if metric.startswith("train/"):
        return "min"
    return better(metric)


def _probe_table(sec: Section, summary: dict[str, Any]) -> None:
    first, last = summary.get("probe_first") or {}, summary.get("probe_last") or {}
    keys = [k for k in dict.fromkeys([*first, *last]) if k not in ("step", "probe/seconds")]
    if not keys:
        return
    rows = [[k, fmt_num(first.get(k)), fmt_num(last.get(k))] for k in keys]
    sec.blocks.append(Table("Label-free probes (held-out volumes)",
                            ["probe", f"first (step {first.get('step', '?')})", f"last (step {last.get('step', '?')})"],
                            rows))
    acc, chance = last.get("probe/knn_partition"), last.get("probe/chance")
    if isinstance(acc, float) and isinstance(chance, float) and acc <= chance:
        sec.problems.append(f"the k-NN position probe ends at chance level or below ({acc:.3f} <= chance {chance:.3f}): "
                            "the encoder has not learnt where crops come from")


def embedding_health(series: dict[str, list[tuple[float, float]]]) -> list[str]:
    """Signs of collapse in the logged embedding statistics (``*_eff_rank``, ``*_emb_std``) and anchors
    dropped for want of a positive (``*_dropped``)."""
    out = []
    for k, pts in series.items():
        vals = [v for _, v in pts if math.isfinite(v)]
        if not vals:
            continue
        if k.endswith("_eff_rank") and vals[-1] < 1.5:
            out.append(f"{k} ends at {vals[-1]:.2f}: the embeddings of the batch span about one direction (collapse)")
        elif k.endswith("_emb_std") and len(vals) > 1 and vals[0] > 0 and vals[-1] < 0.2 * vals[0]:
            out.append(f"{k} fell from {vals[0]:.3g} to {vals[-1]:.3g}: the embeddings are collapsing")
        elif k.endswith("_dropped") and sum(vals) > 0:
            out.append(f"{k}: anchors without a positive were dropped at {sum(v > 0 for v in vals)} of "
                       f"{len(vals)} logged steps (views without a partner in the batch)")
    return out


# ---- fine-tuning ---------------------------------------------------------------------------------------

def finetune_section(sec: Section, opts: Options) -> None:
    """``medcl finetune``: summary, cases, leakage, weights loaded, test metrics per case, config, curves."""
    rec = load_record(sec, ["model.pt"])
    summary = _json(sec, DONE_FILE)
    summary = summary if isinstance(summary, dict) else None
    s = summary or {}
    init = s.get("init") if isinstance(s.get("init"), dict) else None
    test = s.get("test") or {}
    add_run_facts(sec, rec, [
        ("status", s.get("status")), ("steps", s.get("steps")), ("label budget", s.get("budget")),
        ("combination", s.get("combination")), ("trained on", s.get("n_train")), ("validation", s.get("n_validation")),
        ("tested on", s.get("n_test")), ("init", (init or {}).get("checkpoint", "random") if summary else None),
        ("learning rate", s.get("lr")), ("mode", s.get("mode")), ("seed", s.get("seed")),
        ("test Dice (mean +- std)", f"{test['dice_mean']:.4f} +- {test['dice_std']:.4f}" if "dice_mean" in test else None),
        ("wall time (s)", s.get("seconds"))], written_by=["config.yaml", "cases.json", DONE_FILE])
    sec.problems += finetune_problems(summary)
    cases = _json(sec, "cases.json")
    if isinstance(cases, dict):
        sec.blocks.append(Facts("Cases (cases.json)", [
            (part, f"{len(cases[part])}: {', '.join(map(str, cases[part][:20]))}"
             + (" ..." if len(cases[part]) > 20 else "")) for part in ("train", "validation", "test")
            if isinstance(cases.get(part), list)] + [("source", str(cases.get("source", "")))]))
    add_markdown(sec, "summary.md", "Test summary (summary.md)")
    tm = test_metrics_path(sec.path).name  # test_metrics.csv (metrics.csv in legacy folders)
    add_csv(sec, tm, opts, f"Test metrics per case and class ({tm})")
    add_csv(sec, "validation.csv", opts, "Validation metrics per case and class (validation.csv)")
    _load_report(sec)
    add_config(sec, fallback=(rec or {}).get("config"))
    curves = "metrics.csv" if tm != "metrics.csv" and (sec.path / "metrics.csv").is_file() else "logs/metrics.csv"
    add_step_metrics(sec, curves, "loss.png", title="Training losses")
    preds = sorted((sec.path / "predictions").glob("*.nii*")) if (sec.path / "predictions").is_dir() else []
    if preds:
        sec.blocks.append(Facts("Predictions", [("predictions/", f"{len(preds)} NIfTI segmentations "
                                                                  "in the original geometry")]))
    files_facts(sec, ("model.pt", "checkpoints/*.ckpt"))


def finetune_problems(summary: dict[str, Any] | None) -> list[str]:
    """Unfinished run, leakage override, undefined metrics."""
    if summary is None:
        return ["no summary.json: the run has not finished (still running, killed or failed); "
                "`medcl finetune ... --resume` continues it"]
    out = []
    init = summary.get("init") if isinstance(summary.get("init"), dict) else {}
    overlap = init.get("test_overlap") or []
    if overlap:
        out.append(f"leakage override (--allow-test-overlap): the pretraining checkpoint {init.get('checkpoint', '')} "
                   f"saw {len(overlap)} of the test cases, so the test scores are biased upwards")
    for part in ("validation", "test"):
        m = summary.get(part) or {}
        for k, v in m.items():
            if k.endswith("_n_undefined") and v:
                out.append(f"{part}: {k[:-12]} undefined for {v} case/class pair(s) (empty reference or prediction)")
    return out


def _load_report(sec: Section) -> None:
    rep = _json(sec, "load_report.json")
    if not isinstance(rep, dict):
        return
    rows = [("source", str(rep.get("source", ""))), ("format", str(rep.get("source_format", ""))),
            ("stages requested", ", ".join(rep["prefixes"]) if rep.get("prefixes") else "all")]
    for k in ("loaded", "adapted", "missing", "unexpected", "mismatched", "ignored"):
        v = rep.get(k) or []
        rows.append((k, str(len(v))))
    sec.blocks.append(Facts("Weights loaded (load_report.json)", rows))
    if rep.get("mismatched") or rep.get("unexpected"):
        sec.problems.append(f"weight load: {len(rep.get('mismatched') or [])} shape-mismatched and "
                            f"{len(rep.get('unexpected') or [])} unexpected tensor(s) were not loaded")
    if not rep.get("loaded") and not rep.get("adapted"):
        sec.problems.append("weight load: no tensor was loaded from the pretraining checkpoint")


# ---- label-efficiency benchmark ------------------------------------------------------------------------

def benchmark_section(sec: Section, opts: Options) -> None:
    """``medcl benchmark label-efficiency``: results, figure, split, LR selection, a table of its fine-tunes."""
    split = _json(sec, "split.json")
    extra: list[tuple[str, Any]] = []
    if isinstance(split, dict):
        budgets = split.get("budgets") or {}
        extra = [("dataset", split.get("dataset")), ("test cases (fixed)", len(split.get("test") or [])),
                 ("unlabelled pool", len(split.get("pool") or [])),
                 ("budgets (combinations)", ", ".join(f"{b} ({len(c)})" for b, c in budgets.items())),
                 ("split seed", split.get("seed")), ("patient-aware split", split.get("patient_aware"))]
    add_run_facts(sec, None, extra, written_by=["results.csv", "results.md"])
    add_markdown(sec, "results.md", "Results (results.md)")
    add_png(sec, "dice_vs_labels.png", "Dice against labelled volumes")
    for p in sorted(sec.path.glob("results_lr*.md")):
        add_markdown(sec, p.name)
    lr = _json(sec, "lr_selection.json")
    if isinstance(lr, dict) and isinstance(lr.get("chosen"), dict):
        sec.blocks.append(Table(f"Learning rates used (lr_selection.json: {lr.get('selection', '')})",
                                ["init", "budget", "learning rate"],
                                [[*k.split("|", 1), fmt_num(v)] for k, v in lr["chosen"].items()]))
    add_csv(sec, "results.csv", opts, "Per run and test case (results.csv)", collapsed=True)
    add_csv(sec, "sweep.csv", opts, "Learning-rate sweep on validation volumes (sweep.csv)", collapsed=True)
    for part in ("runs", "sweep"):
        if (sec.path / part).is_dir():
            _runs_table(sec, part, opts)


def _runs_table(sec: Section, part: str, opts: Options) -> None:
    """One row per fine-tune under ``part`` (status, steps, Dice, non-finite losses), their problems, and
    their loss curves (at most ``opts.max_run_figures``)."""
    runs = [p for p, kind in find_runs(sec.path / part) if kind == "finetune"]
    rows, figures, unfinished, nonfinite, leaks = [], [], [], [], []
    for run in runs:
        rel = str(run.relative_to(sec.path))
        try:
            s = read_json(run / DONE_FILE)
        except (ReadError, OSError):
            s = None
        s = s if isinstance(s, dict) else None
        bad = _nonfinite_losses(run / "logs" / "metrics.csv")
        if s is None:
            unfinished.append(rel)
        elif (s.get("init") or {}).get("test_overlap"):
            leaks.append(rel)
        if bad:
            nonfinite.append(f"{rel} ({', '.join(bad)})")
        s = s or {}
        rows.append([rel, str(s.get("status", "unfinished")), fmt_num(s.get("steps")),
                     fmt_num((s.get("test") or {}).get("dice_mean")), fmt_num((s.get("validation") or {}).get("dice_mean")),
                     ", ".join(bad)])
        if (run / "loss.png").is_file() and len(figures) < opts.max_run_figures:
            try:
                figures.append(read_png(run / "loss.png", rel))
            except (ReadError, OSError) as exc:
                sec.problems.append(f"could not use {rel}/loss.png: {exc}")
    what = "fine-tuning runs" if part == "runs" else "learning-rate sweep runs"
    sec.blocks.append(Table(f"The {len(runs)} {what} ({part}/)", ["run", "status", "steps", "test Dice",
                                                                   "validation Dice", "non-finite losses"],
                            rows, collapsed=len(rows) > 12))
    if figures:
        pngs = sum((run / "loss.png").is_file() for run in runs)
        sec.blocks.append(Group(f"Training losses of the {what}", list(figures), collapsed=True,
                                note=f"{pngs - len(figures)} more loss plots not embedded" if pngs > len(figures) else ""))
    for label, items in (("unfinished (no summary.json)", unfinished), ("with non-finite losses", nonfinite),
                         ("with a leakage override (pretraining saw test cases)", leaks)):
        if items:
            sec.problems.append(f"{len(items)} of {len(runs)} {what} {label}: {'; '.join(items[:5])}"
                                + (" ..." if len(items) > 5 else ""))


def _nonfinite_losses(metrics_csv: Path) -> list[str]:
    if not metrics_csv.is_file():
        return []
    try:
        series = read_series(metrics_csv)
    except (ReadError, OSError):
        return []
    return [k for k, pts in series.items() if "loss" in k and any(not math.isfinite(v) for _, v in pts)]


# ---- anything else -------------------------------------------------------------------------------------

def generic_section(sec: Section, opts: Options) -> None:
    """A demo folder, a run of a kind without a builder, or an unrecognised folder with plots and tables:
    its record (if any), ``summary.json`` (flattened), config, markdown, CSV tables (per-step CSVs
    summarised) and PNGs, as they are."""
    rec = load_record(sec, [])
    add_run_facts(sec, rec, written_by=[p.name for p in sec.path.iterdir() if p.is_file()])
    summary = _json(sec, "summary.json")
    if summary is not None:
        sec.blocks.append(Facts("Summary (summary.json)", flatten(summary)))
    add_config(sec, fallback=(rec or {}).get("config"))
    for p in sorted(sec.path.glob("*.md")):
        add_markdown(sec, p.name)
    for p in sorted(sec.path.glob("*.png")):
        add_png(sec, p.name)
    for p in sorted(sec.path.glob("*.csv")):
        header = guard(sec, p.name, lambda p=p: read_csv(p)[0]) or []
        if "step" in header:
            sec.shown.add(p.name)
            add_step_metrics(sec, p.name, None, title=f"Curves ({p.name})")
        else:
            add_csv(sec, p.name, opts)


SectionBuilder = Callable[[Section, Options], None]
BUILDERS: dict[str, tuple[SectionBuilder, frozenset[str]]] = {
    "pretrain": (pretrain_section, frozenset()),
    "finetune": (finetune_section, frozenset()),
    "label-efficiency": (benchmark_section, frozenset({"runs", "sweep"})),
    "mil": (mil_section, frozenset()),
    "wsi-tiles": (wsi_tiles_section, frozenset()),
    "mil-encoder": (mil_encoder_section, frozenset()),
}
"""Run kind -> (builder, sub-folders its children search skips because the builder summarises them)."""
KIND_ORDER = ["pretrain", "mil-encoder", "wsi-tiles", "finetune", "label-efficiency", "mil", "demo"]
"""Order of sibling runs on the page: what others start from comes first (a demo's pretraining, then its
fine-tunes); then by path."""


def build_section(path: Path, root: Path, kind: str, opts: Options) -> Section:
    """The section of the run folder ``path`` (of ``kind``) and, as children, of the run folders inside it."""
    title = path.name if path == root else str(path.relative_to(root))
    sec = Section(title or str(path), kind, path, legacy=kind != "folder" and record_kind(path) is None)
    builder, skip = BUILDERS.get(kind, (generic_section, frozenset()))
    builder(sec, opts)
    add_remaining_pngs(sec)
    found = sorted(find_runs(path, skip), key=lambda r: (KIND_ORDER.index(r[1]) if r[1] in KIND_ORDER
                                                          else len(KIND_ORDER), str(r[0])))
    sec.children = [build_section(sub, root, k, opts) for sub, k in found]
    if sec.children:
        sec.blocks.append(Table("Runs in this folder", ["run", "kind", "problems noticed"],
                                [[c.title, c.label, str(len(c.problems))] for c in sec.children]))
    return sec
