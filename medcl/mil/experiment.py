"""Cross-validated comparison of MIL heads: what ``medcl mil train`` runs.

For every config (head), every seed and every fold: train on the other folds (optionally with the
positive class subsampled, :func:`medcl.mil.cv.subsample_class`), standardise features with statistics of
the training folds only, predict the held-out fold. Folds depend on the seed only, so all heads see the
same splits (paired comparison). Writes into ``out``:

* ``results.csv`` -- one row per head, seed and fold: sizes, accuracy, balanced accuracy, AUC, F1, seconds;
* ``results.md`` -- per head, mean +- std over all folds and seeds, and the out-of-fold metrics pooled per
  seed (mean +- std over seeds);
* ``predictions.csv`` -- every held-out bag's probabilities, per head, seed and fold;
* ``instance_scores/{head}.h5`` -- ``/seed{s}/fold{f}/{slide_id}`` ``[n]`` for heads with instance scores;
* ``model.pt`` (one config) or ``model_{head}.pt`` (several): the head retrained on all bags
  (:func:`medcl.mil.train.load_mil_model` reads it); ``config_{head}.yaml``, ``run.json``.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcl.config import save_config, to_dict
from medcl.core.errors import MedclConfigError
from medcl.core.files import atomic_path, atomic_write_json, atomic_write_text, write_csv
from medcl.core.record import RunRecord
from medcl.mil.bags import BagDataset
from medcl.mil.config import MILConfig
from medcl.mil.cv import stratified_group_kfold, subsample_class
from medcl.mil.metrics import bag_metrics
from medcl.mil.train import evaluate, fit_head, save_mil_model

METRICS = ("accuracy", "balanced_accuracy", "auc", "f1")

log = logging.getLogger(__name__)


def positive_index(cfg: MILConfig, classes: list[str]) -> int:
    """Index of the class ``--imbalance`` subsamples (``cv.positive_class``, default the second class)."""
    if cfg.cv.positive_class is None:
        return 1
    if cfg.cv.positive_class not in classes:
        raise MedclConfigError("cv.positive_class", f"'{cfg.cv.positive_class}' is not one of the classes {classes}")
    return classes.index(cfg.cv.positive_class)


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _write_instance_scores(path: Path, entries: list[tuple[int, int, list[str], list[np.ndarray]]]) -> None:
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for seed, fold, ids, scores in entries:
            g = f.require_group(f"seed{seed}/fold{fold}")
            for sid, s in zip(ids, scores):
                g.create_dataset(sid, data=s.astype(np.float32))


def cross_validate(
    cfgs: list[MILConfig],
    ds: BagDataset,
    out: str | Path,
    *,
    device: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the CV of every config on ``ds``, write the outputs listed in the module docstring, return the rows.

    A progress bar counts the fits (heads x seeds x folds, plus one final model per head).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [c.label for c in cfgs]
    if len(set(names)) != len(names):
        raise MedclConfigError("name", f"two configs share a name: {names} (set 'name' in each)")
    total = sum(len(c.cv.seeds) * c.cv.folds + int(c.cv.final_model) for c in cfgs)
    bar = tqdm(total=total, desc="mil train", unit="fit", disable=not progress, file=sys.stderr)
    cv = _CVOutputs()
    try:
        for cfg in cfgs:
            save_config(cfg, out / f"config_{cfg.label}.yaml")
            _cross_validate_head(cfg, ds, out, cv, bar, device)
            if cfg.cv.final_model:
                bar.set_postfix_str(f"{cfg.label} final model")
                fit = fit_head(cfg, ds, seed=cfg.cv.seeds[0], device=device)
                record = RunRecord(kind="mil", config=to_dict(cfg), cases_seen=ds.ids).to_dict()
                path = out / ("model.pt" if len(cfgs) == 1 else f"model_{cfg.label}.pt")
                save_mil_model(path, fit.head, cfg, ds.classes, record)
                bar.update(1)
                log.info("[%s] final model on all %d bags -> %s", cfg.label, len(ds), path)
    finally:
        bar.close()
    write_csv(out / "results.csv", cv.rows)
    write_csv(out / "predictions.csv", cv.pred_rows)
    atomic_write_text(results_markdown(cfgs, ds, cv.rows, cv.pooled), out / "results.md")
    atomic_write_json({
        "data": ds.source, "n_bags": len(ds), "classes": ds.classes, "in_dim": ds.in_dim,
        "grouped_by_patient": ds.patients is not None, "heads": names,
    }, out / "run.json", indent=2)
    return cv.rows


@dataclass
class _CVOutputs:
    """What the folds of all heads accumulate: metric rows, prediction rows, pooled out-of-fold metrics."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    pred_rows: list[dict[str, Any]] = field(default_factory=list)
    pooled: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def _cross_validate_head(cfg: MILConfig, ds: BagDataset, out: Path, cv: _CVOutputs, bar: Any,
                         device: str | None) -> None:
    """Every seed and fold of one head: train, predict the held-out fold, record rows and instance scores."""
    name = cfg.label
    labels = ds.labels.numpy()
    pos = positive_index(cfg, ds.classes)
    score_entries = []
    cv.pooled[name] = []
    for seed in cfg.cv.seeds:
        folds = stratified_group_kfold(labels, cfg.cv.folds, seed, ds.patients)
        oof = np.zeros((len(ds), len(ds.classes)))
        for f, test_idx in enumerate(folds):
            bar.set_postfix_str(f"{name} seed {seed} fold {f}")
            train_idx = np.setdiff1d(np.arange(len(ds)), test_idx)
            if cfg.cv.imbalance is not None:
                train_idx = subsample_class(train_idx, labels, pos, cfg.cv.imbalance, seed * 1000 + f)
            fit = fit_head(cfg, ds.subset(train_idx), seed=seed * 1000 + f, device=device)
            test_ds = ds.subset(test_idx)
            pred = evaluate(fit.head, test_ds, batch_size=cfg.train.batch_size, workers=cfg.data.workers)
            oof[test_idx] = pred.probs
            m = bag_metrics(labels[test_idx], pred.probs)
            cv.rows.append({
                "head": name, "seed": seed, "fold": f, "n_train": len(train_idx),
                "n_train_positive": int((labels[train_idx] == pos).sum()), "n_test": len(test_idx),
                **{k: round(v, 6) for k, v in m.items()}, "seconds": round(fit.seconds, 3),
            })
            for j, i in enumerate(test_idx):
                cv.pred_rows.append({"head": name, "seed": seed, "fold": f, "bag": ds.bags[i].id,
                                     "label": ds.classes[labels[i]], "pred": ds.classes[int(pred.probs[j].argmax())],
                                     **{f"p_{c}": round(float(p), 6) for c, p in zip(ds.classes, pred.probs[j])}})
            if pred.instance_scores is not None:
                score_entries.append((seed, f, test_ds.ids, pred.instance_scores))
            bar.update(1)
        pooled_m = bag_metrics(labels, oof)
        cv.pooled[name].append(pooled_m)
        fold_rows = [r for r in cv.rows if r["head"] == name and r["seed"] == seed]
        log.info("[%s] seed %s: accuracy %.3f (mean of %d folds), pooled AUC %.3f, %.1f s", name, seed,
                 np.mean([r["accuracy"] for r in fold_rows]), len(fold_rows), pooled_m["auc"],
                 sum(r["seconds"] for r in fold_rows))
    if score_entries:
        _write_instance_scores(out / "instance_scores" / f"{name}.h5", score_entries)


def results_markdown(
    cfgs: list[MILConfig], ds: BagDataset, rows: list[dict[str, Any]], pooled: dict[str, list[dict[str, float]]]
) -> str:
    """The ``results.md`` tables (see the module docstring)."""
    c0 = cfgs[0].cv
    imb = "none" if c0.imbalance is None else f"positive class subsampled to {c0.imbalance:.0%} of training bags"
    lines = [
        "# MIL cross-validation",
        "",
        f"Data: `{ds.source}` ({len(ds)} bags, classes {ds.classes}, {ds.in_dim} features). "
        f"{c0.folds}-fold CV, seeds {list(c0.seeds)}, imbalance: {imb}"
        + ("; folds grouped by patient." if ds.patients is not None else "."),
        "",
        "## Per fold (mean ± std over all folds and seeds)",
        "",
        "| head | runs | accuracy | balanced accuracy | AUC | F1 | s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for cfg in cfgs:
        rs = [r for r in rows if r["head"] == cfg.label]
        cells = []
        for k in METRICS:
            m, s = _mean_std([r[k] for r in rs])
            cells.append(f"{m:.3f} ± {s:.3f}")
        lines.append(f"| {cfg.label} | {len(rs)} | " + " | ".join(cells) + f" | {np.mean([r['seconds'] for r in rs]):.2f} |")
    lines += [
        "",
        "## Out-of-fold, pooled per seed (mean ± std over seeds)",
        "",
        "| head | seeds | accuracy | balanced accuracy | AUC | F1 |",
        "|---|---|---|---|---|---|",
    ]
    for cfg in cfgs:
        ps = pooled[cfg.label]
        cells = []
        for k in METRICS:
            m, s = _mean_std([p[k] for p in ps])
            cells.append(f"{m:.3f} ± {s:.3f}")
        lines.append(f"| {cfg.label} | {len(ps)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
