"""Cross-validated comparison of MIL heads: what ``medcl mil train`` runs.

For every config (head), every seed and every fold: train on the other folds (optionally with the
positive class subsampled, :func:`medcl.mil.cv.subsample_class`), standardise features with statistics of
the training folds only, predict the held-out fold. Folds depend on the seed only, so all heads see the
same splits (paired comparison). Writes into ``out`` (the run-folder contract, :mod:`medcl.core.runfolder`):

* ``record.json`` -- the run record (kind ``mil``; ``complete: true`` only once everything below is written;
  ``step``: optimiser steps of all fits so far; ``extra``: data, heads, their config files);
* ``config.yaml`` -- the first config's resolved config (``--config`` order; it loads with
  :data:`medcl.mil.config.MILConfig`); ``config_{head}.yaml`` -- every head's resolved config (same schema);
* ``summary.json`` -- per head, mean and std over all folds and seeds of each metric, the out-of-fold metrics
  pooled per seed (mean and std over seeds), runs, seconds per run (the figures of ``results.md``);
* ``results.csv`` -- one row per head, seed and fold: sizes, accuracy, balanced accuracy, AUC, F1, seconds;
* ``results.md`` -- per head, mean +- std over all folds and seeds, and the out-of-fold metrics pooled per
  seed (mean +- std over seeds);
* ``predictions.csv`` -- every held-out bag's probabilities, per head, seed and fold;
* ``instance_scores/{head}.h5`` -- ``/seed{s}/fold{f}/{slide_id}`` ``[n]`` for heads with instance scores;
* ``model.pt`` (one config) or ``model_{head}.pt`` (several): the head retrained on all bags
  (:func:`medcl.mil.train.load_mil_model` reads it; its run record says ``complete: true``); ``run.json``;
* ``units/{head}/seed{s}_fold{f}.json`` (+ ``.h5`` with the instance scores): each finished fit's results.

**Resume** (``resume=True``, ``--resume``): a rerun into the same folder with the same heads, configs and bags
skips every (head, seed, fold) whose unit file exists and every final model already written, and rebuilds the
tables from the unit files. Each fit is a pure function of its seed (``seed * 1000 + fold``; the final model:
the first seed), so a resumed run gives the same tables as an uninterrupted one (the ``seconds`` column keeps
the time of the run that did the fit). Only ``device``, ``threads``, ``data.workers`` and ``train.fast`` may
change (they do not change results).

**Stacking** (``train.stack_models: S >= 2``): the (seed, fold) fits of a head, in table order, are cut into fixed
chunks of ``S`` and each chunk is trained as one stacked model (:func:`medcl.mil.stacked.fit_heads`; each fit
equals its one-by-one fit up to float rounding). The outputs are the same files; a fit's ``seconds`` is its
chunk's time divided by the fits in it. A resumed run retrains an unfinished chunk whole, so it stacks the same
models as the uninterrupted run and gives the same tables.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcl.config import save_config, to_dict
from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.core.files import atomic_path, atomic_write_json, atomic_write_text, write_csv
from medcl.core.record import RunRecord
from medcl.core.runfolder import RunFolder, config_differences, prepare_run_folder, read_record
from medcl.mil.bags import BagDataset
from medcl.mil.config import MILConfig
from medcl.mil.cv import stratified_group_kfold, subsample_class
from medcl.mil.fast import fast_path_choice
from medcl.mil.metrics import bag_metrics
from medcl.mil.stacked import fit_heads, stack_support
from medcl.mil.train import FitResult, evaluate, fit_head, save_mil_model

METRICS = ("accuracy", "balanced_accuracy", "auc", "f1")
RESUME_FREE = ("device", "threads", "data.workers", "train.fast")  # keys a resumed run may change

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


def _read_instance_scores(path: Path, seed: int, fold: int, ids: list[str]) -> list[np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return [np.asarray(f[f"seed{seed}/fold{fold}/{sid}"][()]) for sid in ids]


def _data_inputs(ds: BagDataset) -> list[str]:
    """The paths ``--out`` must not be nor hold: the data file and the folders of the bags' h5 files."""
    paths = {ds.source} if ds.source else set()
    paths |= {str(Path(b.path).parent) for b in ds.bags if b.path and Path(b.path) != Path(ds.source)}
    return sorted(paths)


def cross_validate(
    cfgs: list[MILConfig],
    ds: BagDataset,
    out: str | Path,
    *,
    device: str | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run the CV of every config on ``ds``, write the outputs listed in the module docstring, return the rows.

    ``out`` must be new or empty unless ``resume`` (continue the run there, see the module docstring) or
    ``overwrite`` (empty it first); it may not be or hold the data. A progress bar counts the fits (heads x
    seeds x folds, plus one final model per head).
    """
    from tqdm.auto import tqdm

    if resume and overwrite:
        raise MedclConfigError("--overwrite", "cannot be combined with --resume (one continues the run, the other "
                                              "empties the folder)")
    names = [c.label for c in cfgs]
    if len(set(names)) != len(names):
        raise MedclConfigError("name", f"two configs share a name: {names} (set 'name' in each)")
    out = prepare_run_folder(out, "mil", resume=resume, overwrite=overwrite, inputs=_data_inputs(ds))
    if resume:
        _check_resume(out, cfgs, ds)
    extra = {"data": ds.source, "heads": names, "configs": {n: f"config_{n}.yaml" for n in names},
             "n_bags": len(ds), "classes": ds.classes, "in_dim": ds.in_dim}
    patients = sorted({b.patient for b in ds.bags if b.patient is not None})
    folder = RunFolder(out, RunRecord(kind="mil", config=to_dict(cfgs[0]), cases_seen=ds.ids, patients_seen=patients,
                                      extra=extra))
    folder.begin(cfgs[0])
    for cfg in cfgs:
        save_config(cfg, out / f"config_{cfg.label}.yaml")
    total = sum(len(c.cv.seeds) * c.cv.folds + int(c.cv.final_model) for c in cfgs)
    bar = tqdm(total=total, desc="mil train", unit="fit", disable=not progress, file=sys.stderr)
    cv = _CVOutputs()
    try:
        for cfg in cfgs:
            log.info("[%s] training path: %s", cfg.label, fast_path_choice(ds, cfg.train.fast, cfg.data.max_memory_gb)[1])
            _cross_validate_head(cfg, ds, out, cv, bar, device, folder)
            if cfg.cv.final_model:
                _final_model(cfg, ds, out, len(cfgs) == 1, cv, bar, device)
                folder.stopped_at(cv.steps)
    finally:
        bar.close()
    write_csv(out / "results.csv", cv.rows)
    write_csv(out / "predictions.csv", cv.pred_rows)
    atomic_write_text(results_markdown(cfgs, ds, cv.rows, cv.pooled), out / "results.md")
    atomic_write_json({
        "data": ds.source, "n_bags": len(ds), "classes": ds.classes, "in_dim": ds.in_dim,
        "grouped_by_patient": ds.patients is not None, "heads": names,
    }, out / "run.json", indent=2)
    folder.finish(run_summary(cfgs, ds, cv.rows, cv.pooled), step=cv.steps)
    return cv.rows


def _check_resume(out: Path, cfgs: list[MILConfig], ds: BagDataset) -> None:
    """Refuse ``--resume`` into a folder whose run differs in kind, heads, configs or bags (one line each)."""
    rec = read_record(out)
    if rec is None:
        if any(not p.name.startswith(".") for p in out.iterdir()):
            raise MedclDataError(out, "--resume: this folder holds no run record (record.json); nothing to resume")
        return
    if rec.get("kind") != "mil":
        raise MedclConfigError("--resume", f"{out} holds a {rec.get('kind')} run, not a 'medcl mil train' run")
    heads = list((rec.get("extra") or {}).get("heads") or [])
    names = [c.label for c in cfgs]
    if heads != names:
        raise MedclConfigError("--config", f"--resume continues the run in {out}, which compared heads {heads}; "
                                           f"got {names}")
    if list(rec.get("cases_seen") or []) != ds.ids:
        raise MedclConfigError("--data", f"--resume continues the run in {out}, which used other bags")
    for cfg in cfgs:
        saved = out / f"config_{cfg.label}.yaml"
        if not saved.is_file():
            raise MedclDataError(saved, "--resume: the run's config of this head is missing")
        diff = config_differences(saved, to_dict(cfg), free=RESUME_FREE)
        if diff:
            raise MedclConfigError(diff[0], f"--resume continues the run in {out}, whose config of '{cfg.label}' "
                                            f"differs in {', '.join(diff)}")


@dataclass
class _CVOutputs:
    """What the folds of all heads accumulate: metric rows, prediction rows, pooled out-of-fold metrics, steps."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    pred_rows: list[dict[str, Any]] = field(default_factory=list)
    pooled: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    steps: int = 0


@dataclass
class _Unit:
    """One finished (head, seed, fold) fit: its results row, prediction rows, held-out probabilities ``[n, K]``,
    optimiser steps and instance scores (``None`` for heads without)."""

    row: dict[str, Any]
    pred_rows: list[dict[str, Any]]
    probs: np.ndarray
    steps: int
    scores: list[np.ndarray] | None

    def save(self, path: Path, ids: list[str], seed: int, fold: int) -> None:
        if self.scores is not None:  # scores first: a unit counts as done once its JSON exists
            _write_instance_scores(path.with_suffix(".h5"), [(seed, fold, ids, self.scores)])
        atomic_write_json({"row": self.row, "pred_rows": self.pred_rows, "probs": self.probs.tolist(),
                           "steps": self.steps, "has_scores": self.scores is not None}, path, indent=None)

    @classmethod
    def load(cls, path: Path, ids: list[str], seed: int, fold: int) -> _Unit:
        try:
            d = json.loads(path.read_text())
            scores = _read_instance_scores(path.with_suffix(".h5"), seed, fold, ids) if d["has_scores"] else None
            return cls(d["row"], d["pred_rows"], np.asarray(d["probs"], dtype=np.float64), int(d["steps"]), scores)
        except (OSError, ValueError, KeyError) as exc:
            raise MedclDataError(path, f"unreadable unit of a resumed run ({exc}); rerun with --overwrite") from exc


def _unit_from_fit(cfg: MILConfig, ds: BagDataset, fit: FitResult, train_idx: np.ndarray, test_idx: np.ndarray,
                   seed: int, fold: int) -> _Unit:
    """Predict ``test_idx`` with a head trained on ``train_idx``: the rows and scores of one fold."""
    labels = ds.labels.numpy()
    pos = positive_index(cfg, ds.classes)
    pred = evaluate(fit.head, ds.subset(test_idx), batch_size=cfg.train.batch_size, workers=cfg.data.workers)
    m = bag_metrics(labels[test_idx], pred.probs)
    row = {"head": cfg.label, "seed": seed, "fold": fold, "n_train": len(train_idx),
           "n_train_positive": int((labels[train_idx] == pos).sum()), "n_test": len(test_idx),
           **{k: round(v, 6) for k, v in m.items()}, "seconds": round(fit.seconds, 3)}
    pred_rows = [{"head": cfg.label, "seed": seed, "fold": fold, "bag": ds.bags[i].id,
                  "label": ds.classes[labels[i]], "pred": ds.classes[int(pred.probs[j].argmax())],
                  **{f"p_{c}": round(float(p), 6) for c, p in zip(ds.classes, pred.probs[j])}}
                 for j, i in enumerate(test_idx)]
    return _Unit(row, pred_rows, pred.probs, fit.steps, pred.instance_scores)


@dataclass
class _Planned:
    """One (seed, fold) fit of a head: its training and held-out bags and its unit file."""

    seed: int
    fold: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    path: Path
    test_ids: list[str]


def _plan_units(cfg: MILConfig, ds: BagDataset, out: Path) -> list[_Planned]:
    """Every (seed, fold) of ``cfg`` in table order (folds depend on the seed only)."""
    labels = ds.labels.numpy()
    pos = positive_index(cfg, ds.classes)
    plan = []
    for seed in cfg.cv.seeds:
        for f, test_idx in enumerate(stratified_group_kfold(labels, cfg.cv.folds, seed, ds.patients)):
            train_idx = np.setdiff1d(np.arange(len(ds)), test_idx)
            if cfg.cv.imbalance is not None:
                train_idx = subsample_class(train_idx, labels, pos, cfg.cv.imbalance, seed * 1000 + f)
            plan.append(_Planned(seed, f, train_idx, test_idx, out / "units" / cfg.label / f"seed{seed}_fold{f}.json",
                                 [ds.bags[i].id for i in test_idx]))
    return plan


def _fit_chunk(cfg: MILConfig, ds: BagDataset, plan: list[_Planned], first: int, size: int, device: str | None
               ) -> dict[int, _Unit]:
    """Train the chunk of ``size`` fits (``train.stack_models``, 1: no stacking) that holds ``plan[first]``, save
    its units not yet on disk, and return its units from ``first`` on.

    Chunks are fixed slices of the plan and a chunk is retrained whole, so a resumed run stacks exactly the models
    the uninterrupted run stacked (the same float rounding).
    """
    start = first - first % size
    part = plan[start : start + size]
    jobs = [(ds.subset(p.train_idx), p.seed * 1000 + p.fold) for p in part]
    fits = [fit_head(cfg, jobs[0][0], seed=jobs[0][1], device=device)] if size < 2 else fit_heads(cfg, jobs, device)
    units = {}
    for i, (p, fit) in enumerate(zip(part, fits), start):
        if i < first:
            continue
        units[i] = _unit_from_fit(cfg, ds, fit, p.train_idx, p.test_idx, p.seed, p.fold)
        if not p.path.is_file():
            units[i].save(p.path, p.test_ids, p.seed, p.fold)
    return units


def _cross_validate_head(cfg: MILConfig, ds: BagDataset, out: Path, cv: _CVOutputs, bar: Any,
                         device: str | None, folder: RunFolder) -> None:
    """Every seed and fold of one head (finished ones read back): rows, pooled metrics, instance scores."""
    name = cfg.label
    labels = ds.labels.numpy()
    score_entries = []
    cv.pooled[name] = []
    plan = _plan_units(cfg, ds, out)
    size = max(1, cfg.train.stack_models)
    if size >= 2 and (why := stack_support(cfg, ds)) is not None:
        log.info("[%s] train.stack_models = %d: training one by one, %s", name, size, why)
        size = 1
    fresh: dict[int, _Unit] = {}
    oof = np.zeros((len(ds), len(ds.classes)))
    for i, p in enumerate(plan):
        bar.set_postfix_str(f"{name} seed {p.seed} fold {p.fold}")
        if i not in fresh and not p.path.is_file():
            fresh = _fit_chunk(cfg, ds, plan, i, size, device)
        unit = fresh.pop(i) if i in fresh else _Unit.load(p.path, p.test_ids, p.seed, p.fold)
        oof[p.test_idx] = unit.probs
        cv.rows.append(unit.row)
        cv.pred_rows += unit.pred_rows
        cv.steps += unit.steps
        if unit.scores is not None:
            score_entries.append((p.seed, p.fold, p.test_ids, unit.scores))
        folder.stopped_at(cv.steps)
        bar.update(1)
        if i + 1 == len(plan) or plan[i + 1].seed != p.seed:  # the seed's last fold: its pooled out-of-fold metrics
            pooled_m = bag_metrics(labels, oof)
            cv.pooled[name].append(pooled_m)
            fold_rows = [r for r in cv.rows if r["head"] == name and r["seed"] == p.seed]
            log.info("[%s] seed %s: accuracy %.3f (mean of %d folds), pooled AUC %.3f, %.1f s", name, p.seed,
                     np.mean([r["accuracy"] for r in fold_rows]), len(fold_rows), pooled_m["auc"],
                     sum(r["seconds"] for r in fold_rows))
            oof = np.zeros((len(ds), len(ds.classes)))
    if score_entries:
        _write_instance_scores(out / "instance_scores" / f"{name}.h5", score_entries)


def _final_model(cfg: MILConfig, ds: BagDataset, out: Path, single: bool, cv: _CVOutputs, bar: Any,
                 device: str | None) -> None:
    """The head trained on all bags (kept when a resumed run finds it written)."""
    path = out / ("model.pt" if single else f"model_{cfg.label}.pt")
    bar.set_postfix_str(f"{cfg.label} final model")
    if path.is_file():  # written atomically: present means complete
        from medcl.engine.checkpoint import safe_torch_load

        cv.steps += int((safe_torch_load(path).get("record") or {}).get("step", 0))
    else:
        fit = fit_head(cfg, ds, seed=cfg.cv.seeds[0], device=device)
        record = RunRecord(kind="mil", config=to_dict(cfg), cases_seen=ds.ids, complete=True, step=fit.steps,
                           extra={"final_model": True, "data": ds.source}).to_dict()
        save_mil_model(path, fit.head, cfg, ds.classes, record)
        cv.steps += fit.steps
        log.info("[%s] final model on all %d bags -> %s", cfg.label, len(ds), path)
    bar.update(1)


def head_figures(rows: list[dict[str, Any]], pooled: list[dict[str, float]]) -> dict[str, Any]:
    """One head's figures: per metric mean and std over all folds and seeds (``folds``) and of the out-of-fold
    metrics pooled per seed over seeds (``pooled``); NaN (e.g. AUC of single-class folds only) is ``None``."""

    def ms(values: list[float]) -> dict[str, float | None]:
        m, s = _mean_std(values)
        return {"mean": None if math.isnan(m) else m, "std": None if math.isnan(s) else s}

    return {"runs": len(rows), "seeds": len(pooled),
            "folds": {k: ms([float(r[k]) for r in rows]) for k in METRICS},
            "pooled": {k: ms([float(p[k]) for p in pooled]) for k in METRICS},
            "seconds_per_run": float(np.mean([r["seconds"] for r in rows])) if rows else None}


def run_summary(cfgs: list[MILConfig], ds: BagDataset, rows: list[dict[str, Any]],
                pooled: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """``summary.json``: the data, the CV settings and :func:`head_figures` of every head."""
    c0 = cfgs[0].cv
    return {"data": ds.source, "n_bags": len(ds), "n_instances": ds.n_instances, "classes": ds.classes,
            "folds": c0.folds, "seeds": list(c0.seeds), "imbalance": c0.imbalance,
            "grouped_by_patient": ds.patients is not None,
            "heads": {c.label: head_figures([r for r in rows if r["head"] == c.label], pooled[c.label])
                      for c in cfgs}}


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
