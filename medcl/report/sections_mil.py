"""What multiple-instance-learning and whole-slide runs contribute to the report.

* ``medcl mil train`` (kind ``mil``): ``run.json``, ``results.md``/``results.csv`` (per head, seed and fold),
  ``predictions.csv``, ``config_{head}.yaml``, ``instance_scores/{head}.h5``, ``model*.pt`` (run record inside);
* ``medcl mil tile`` (kind ``wsi-tiles``): ``summary.json``/``summary.csv``, ``{slide_id}_tiles.png`` thumbnails;
* ``medcl mil pretrain-encoder`` (kind ``mil-encoder``): ``metrics.csv``, ``curves.png``, ``encoder.pt``.

Heatmaps (``medcl mil heatmap --out PNG``) are PNGs wherever the user put them: every section embeds the PNGs
of its folder.
"""

from __future__ import annotations

import math
from typing import Any

from medcl.report.blocks import Facts, Section
from medcl.report.common import (
    Options,
    add_config,
    add_csv,
    add_markdown,
    add_png,
    add_run_facts,
    add_step_metrics,
    flatten,
    fmt_num,
    guard,
    load_record,
)
from medcl.report.readers import read_csv, read_json

MIL_METRICS = ("accuracy", "balanced_accuracy", "auc", "f1")


def mil_section(sec: Section, opts: Options) -> None:
    """``medcl mil train``: data, per-head results, folds, predictions, configs, instance scores, models."""
    rec = load_record(sec, ["model.pt", "model_*.pt"])
    run = guard(sec, "run.json", lambda: read_json(sec.path / "run.json"))
    run = run if isinstance(run, dict) else {}
    if run:
        sec.shown.add("run.json")
    add_run_facts(sec, rec, [
        ("data", run.get("data") if not (rec or {}).get("data") else None), ("bags", run.get("n_bags")),
        ("classes", ", ".join(map(str, run["classes"])) if isinstance(run.get("classes"), list) else None),
        ("feature width", run.get("in_dim")), ("folds grouped by patient", run.get("grouped_by_patient")),
        ("heads", ", ".join(map(str, run["heads"])) if isinstance(run.get("heads"), list) else None),
    ], written_by=["results.csv", "results.md", "run.json"])
    add_markdown(sec, "results.md", "Results (results.md)")
    if add_csv(sec, "results.csv", opts, "Per head, seed and fold (results.csv)", collapsed=True) is not None:
        sec.problems += _undefined_metrics(sec)
    add_csv(sec, "predictions.csv", opts, "Held-out predictions (predictions.csv)", collapsed=True,
            max_rows=min(opts.max_rows, 50))
    for p in sorted(sec.path.glob("config_*.yaml")):
        add_config(sec, p.name, title=f"Config of head '{p.stem[len('config_'):]}'")
    if not any(sec.path.glob("config_*.yaml")):
        add_config(sec, fallback=(rec or {}).get("config"))
    scores = sorted((sec.path / "instance_scores").glob("*.h5")) if (sec.path / "instance_scores").is_dir() else []
    models = sorted(sec.path.glob("model*.pt"))
    rows = [(f"instance_scores/{p.name}", f"{p.stat().st_size / 2**20:.2f} MB: per-instance scores of the held-out "
                                          "bags (/seed{s}/fold{f}/{bag})") for p in scores]
    rows += [(p.name, f"{p.stat().st_size / 2**20:.2f} MB: head trained on all bags") for p in models]
    if rows:
        sec.blocks.append(Facts("Files", rows))


def _undefined_metrics(sec: Section) -> list[str]:
    """Folds where a metric is empty or NaN (e.g. AUC of a test fold holding a single class)."""
    header, rows = read_csv(sec.path / "results.csv")
    out = []
    for m in MIL_METRICS:
        if m not in header:
            continue
        j = header.index(m)
        bad = sum(1 for r in rows if j >= len(r) or r[j] in ("", "nan") or not _finite(r[j]))
        if bad:
            out.append(f"results.csv: {m} undefined in {bad} of {len(rows)} folds (a test fold with a single class?)")
    return out


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def wsi_tiles_section(sec: Section, opts: Options) -> None:
    """``medcl mil tile``: parameters, counts, per-slide table, thumbnails with the kept tiles; failed slides."""
    summary: dict[str, Any] = guard(sec, "summary.json", lambda: read_json(sec.path / "summary.json")) or {}
    sec.shown.add("summary.json")
    counts = summary.get("counts") or {}
    add_run_facts(sec, None, [("tiles kept" if k == "tiles" else f"slides {k.replace('_', ' ')}", v)
                              for k, v in counts.items()],
                  written_by=["summary.json", "summary.csv"])
    if isinstance(summary.get("params"), dict):
        sec.blocks.append(Facts("Tiling parameters", flatten(summary["params"])))
    add_csv(sec, "summary.csv", opts, "Slides (summary.csv)")
    for s in summary.get("slides") or []:
        if not isinstance(s, dict):
            continue
        sid = str(s.get("slide_id", ""))
        if s.get("status") in ("failed", "no_tissue"):
            sec.problems.append(f"slide {sid}: {s.get('status')}" + (f" ({s['message']})" if s.get("message") else ""))
        add_png(sec, f"{sid}_tiles.png", f"{sid}: tissue (green) and kept tiles (blue)",
                f"{fmt_num(s.get('n_tiles'))} tiles at level {fmt_num(s.get('level'))}, "
                f"{fmt_num(s.get('mpp_effective'))} um/px")


def mil_encoder_section(sec: Section, opts: Options) -> None:
    """``medcl mil pretrain-encoder``: settings (from the record in ``encoder.pt``), loss and cosine curves."""
    rec = load_record(sec, ["encoder.pt"])
    add_run_facts(sec, rec, written_by=["metrics.csv", "encoder.pt"])
    add_config(sec, title="Settings", fallback=(rec or {}).get("config"))
    add_step_metrics(sec, "metrics.csv", "curves.png", lambda k: k in ("loss", "pos_cosine", "neg_cosine"),
                     title="Contrastive loss and cosines")
