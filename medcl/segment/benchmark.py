"""``medcl benchmark label-efficiency``: how much does each initialisation help, at each label budget?

For each initialisation (random, every pretraining checkpoint named in the config, and every pretraining
method it pretrains itself on the unlabelled pool) x each budget ``N`` x each combination x each seed, one
fine-tune with the **same step budget** and the **same learning-rate sweep**, then a test on the split's
fixed test set. Outputs in ``out``: ``split.json``, ``results.csv`` (one row per run and test case),
``results.md`` and ``dice_vs_labels.png`` (:mod:`medcl.segment.bench_report`), ``sweep.csv`` and
``lr_selection.json``; every run in ``runs/{init}/n{N}/c{k}/s{seed}/lr{lr}/`` (finished runs are skipped on a
rerun, a killed run resumes from its last checkpoint).

Learning rate (``lr.selection``), the same procedure for every initialisation, never on test labels:

* ``validation`` (default): for each init and budget ``N > lr.validation_cases``, every LR of the sweep is
  trained on ``N - v`` volumes of each combination and scored on the other ``v`` (the validation volumes are
  *part of the budget*), with the first seed; the LR with the best mean validation Dice is used for the
  reported runs, trained on all ``N`` volumes. Where ``N <= v`` there is nothing to validate on and the LR
  fixed in advance, ``lr.fallback`` (default: the middle of the sweep), is used. ``results.md`` lists the LR
  of every cell.
* ``report_all``: every LR is a full arm (all combinations and seeds); ``results.csv`` holds them all and
  ``results.md`` reports the LR fixed in advance (``lr.fallback``), with every LR's table in ``results_lr*.md``.

Pretraining methods: an init with ``method``/``config`` is pretrained once on the pool (never on the test
set) by the ``pretrain_fn`` the caller passes (the CLI passes ``medcl.pretrain.run_pretrain``); see
:func:`pretrain_init`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medcl.core.errors import MedclConfigError
from medcl.data import load_manifest
from medcl.data.splits import FULL, LabelBudgetSplit, load_split, make_label_budget_split
from medcl.segment.bench_config import RANDOM, InitSpec, LabelEfficiencyConfig, load_benchmark_config
from medcl.segment.bench_report import budget_order, plot_dice_vs_labels, write_report
from medcl.segment.finetune import DONE_FILE, run_finetune
from medcl.segment.prepare import CaseSelection, finetune_config_from_dict, merge_config

__all__ = ["InitSpec", "LabelEfficiencyConfig", "load_benchmark_config", "run_label_efficiency", "pretrain_init",
           "method_config"]

PretrainFn = Callable[..., Any]


def method_config(method: str) -> Path:
    """The pretraining YAML of a method name: ``configs/pretrain/{name}.yaml`` (``+`` -> ``_``, a trailing ``-``
    -> ``_minus``: ``gd+local`` -> ``gd_local.yaml``, ``gd-`` -> ``gd_minus.yaml``), looked up in the working
    directory and in the medcl source tree."""
    import medcl

    stem = method.strip().lower().replace("+", "_")
    stem = stem[:-1] + "_minus" if stem.endswith("-") else stem
    roots = [Path.cwd() / "configs" / "pretrain", Path(medcl.__file__).resolve().parents[1] / "configs" / "pretrain"]
    for root in roots:
        if (root / f"{stem}.yaml").is_file():
            return root / f"{stem}.yaml"
    known = sorted({p.stem for r in roots if r.is_dir() for p in r.glob("*.yaml")})
    raise MedclConfigError("inits.method", f"no pretraining config for method '{method}' (looked for {stem}.yaml in "
                                           f"{', '.join(str(r) for r in roots)}; known: {', '.join(known) or 'none'})")


def pretrain_init(spec: InitSpec, data: str, out: Path, pool: list[str], seed: int, pretrain_fn: PretrainFn,
                  device: str = "auto") -> str:
    """The seam to the pretraining job: pretrain ``spec`` on the ``pool`` cases into ``out`` (once).

    Calls ``pretrain_fn(config, data, out, overrides=..., seed=..., cases=pool, resume=..., device=...,
    progress=False)`` (the signature of :func:`medcl.pretrain.run_pretrain`), ``config`` being ``spec.config``
    or the YAML of ``spec.method`` (:func:`method_config`); it returns the run folder. Skipped when ``out``
    already holds ``backbone.pt``; resumed when it holds a checkpoint. The leakage guard of every fine-tune
    still checks the result's ``cases_seen`` against the test set.
    """
    if (out / "backbone.pt").is_file():
        return str(out / "backbone.pt")
    config = spec.config or str(method_config(spec.method or ""))
    resume = (out / "checkpoints" / "last.ckpt").is_file()
    result = pretrain_fn(config, data, out, overrides=list(spec.overrides), seed=seed, cases=list(pool),
                         resume=resume, device=device, progress=False)
    return str(result) if result is not None else str(out)


def _arm_dir(out: Path, init: str, budget: Any, comb: int, seed: int, lr: float, sweep: bool) -> Path:
    base = out / ("sweep" if sweep else "runs") / init / f"n{budget}" / f"c{comb}" / f"s{seed}" / f"lr{lr:g}"
    return base


def _read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _case_rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``metrics.csv`` of a run -> per case: ``dice`` (mean over classes), ``hd95``, ``nsd``, per-class values."""
    out: dict[str, dict[str, Any]] = {}
    for r in _read_rows(run_dir / "metrics.csv"):
        c = out.setdefault(r["case"], {"_dice": [], "_hd95": [], "_nsd": []})
        for m in ("dice", "hd95", "nsd"):
            v = float(r[m]) if r[m] not in ("", None) else math.nan
            c[f"{m}_{r['name']}"] = v
            c[f"_{m}"].append(v)
    for c in out.values():
        for m in ("dice", "hd95", "nsd"):
            vals = [v for v in c.pop(f"_{m}") if not math.isnan(v)]
            c[m] = sum(vals) / len(vals) if vals else math.nan
    return out


def run_label_efficiency(
    cfg: LabelEfficiencyConfig,
    finetune_base: dict[str, Any],
    data: str,
    out: str | os.PathLike,
    *,
    device: str = "auto",
    pretrain_fn: PretrainFn | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run (or resume) the benchmark; returns the rows of ``results.csv``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(data)
    split = _get_split(cfg, manifest, out)
    split.check_manifest(manifest, str(out / "split.json"))

    inits: list[tuple[str, str | None, list[str] | None]] = [(RANDOM, None, None)] if cfg.random_init else []
    for spec in cfg.inits:
        if spec.checkpoint:
            inits.append((spec.name, spec.checkpoint, spec.load))
            continue
        if pretrain_fn is None:
            raise MedclConfigError(f"inits.{spec.name}", "pretraining a method needs medcl.pretrain.run_pretrain, which "
                                                         "is not available here; give a checkpoint instead")
        log(f"pretraining '{spec.name}' on the unlabelled pool ({len(split.pool)} cases, test set excluded)")
        ckpt = pretrain_init(spec, data, out / "pretrain" / spec.name, split.pool, cfg.split.seed, pretrain_fn,
                             device)
        inits.append((spec.name, ckpt, spec.load))

    from medcl.segment.init import check_leakage, read_checkpoint

    for name, ckpt, _ in inits:  # refuse leaky checkpoints before any run, not at their first fine-tune
        if ckpt is not None:
            overlap = check_leakage(read_checkpoint(ckpt), split.test, cfg.allow_test_overlap)
            if overlap:
                log(f"WARNING: init '{name}' saw {len(overlap)} test case(s) (allow_test_overlap): {overlap}")
    finetune_base = _same_architecture(finetune_base, inits, log)
    budgets: list[Any] = list(budget_order(split.budgets)) + ([FULL] if cfg.full_label else [])
    lrs = sorted(cfg.lr.values)
    validate = cfg.lr.selection == "validation"
    v = cfg.lr.validation_cases
    sweep_jobs, final_jobs = [], []
    for name, ckpt, load in inits:
        for b in budgets:
            n = len(split.labelled(b, 0)) if b == FULL else int(b)
            if validate and n > v and len(lrs) > 1:
                for c in range(split.n_combinations(b)):
                    sweep_jobs += [(name, ckpt, load, b, c, cfg.seeds[0], lr) for lr in lrs]
            arm_lrs = lrs if not validate else [None]
            for lr in arm_lrs:
                for c in range(split.n_combinations(b)):
                    final_jobs += [(name, ckpt, load, b, c, s, lr) for s in cfg.seeds]
    total = len(sweep_jobs) + len(final_jobs)
    counter = [0]

    def prepare(job: tuple, sweep: bool) -> tuple[str, Path, dict[str, Any] | None]:
        """(progress tag, run folder, worker arguments or None when the run is finished)."""
        name, ckpt, load, b, c, seed, lr = job
        counter[0] += 1
        run_dir = _arm_dir(out, name, b, c, seed, lr, sweep)
        tag = (f"[{counter[0]}/{total}] {'sweep ' if sweep else ''}init={name} N={b} combination={c} seed={seed} "
               f"lr={lr:g}")
        if (run_dir / DONE_FILE).is_file():
            return tag, run_dir, None
        labelled = split.labelled(b, c)
        sel = CaseSelection(train=labelled[:-v] if sweep else labelled, validation=labelled[-v:] if sweep else [],
                            test=[] if sweep else list(split.test), budget=b, combination=c, source="benchmark")
        over = {"seed": seed, "optim": {"lr": lr},
                "trainer": {"max_steps": (cfg.full_steps or cfg.steps) if b == FULL else cfg.steps},
                "init": {"checkpoint": ckpt, **({"load": load} if load else {})}}
        return tag, run_dir, {"config": merge_config(finetune_base, over), "manifest": manifest, "out": str(run_dir),
                              "selection": sel, "allow": cfg.allow_test_overlap, "device": device,
                              "part": "validation" if sweep else "test"}

    def run_all(jobs: list[tuple], sweep: bool) -> list[Path]:
        todo = [prepare(job, sweep) for job in jobs]
        for tag, _, kw in todo:
            if kw is None:
                log(f"{tag}: done before, skipped")
        pending = [(tag, kw) for tag, _, kw in todo if kw is not None]
        if cfg.jobs <= 1 or len(pending) <= 1:
            for tag, kw in pending:
                log(f"{tag}: training")
                log(f"{tag}: {_finetune_job(kw)}")
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_finetune_job, kw): tag for tag, kw in pending}
                log(f"running {len(pending)} fine-tune(s) in {cfg.jobs} processes")
                for fut in as_completed(futures):
                    log(f"{futures[fut]}: {fut.result()}")
        return [run_dir for _, run_dir, _ in todo]

    # ---- LR selection (validation inside the budget) --------------------------------------------------
    chosen: dict[tuple[str, str], float] = {}
    rule: dict[tuple[str, str], str] = {}
    sweep_rows = []
    for job, run_dir in zip(sweep_jobs, run_all(sweep_jobs, sweep=True)):
        s = json.loads((run_dir / DONE_FILE).read_text())
        sweep_rows.append({"init": job[0], "budget": job[3], "combination": job[4], "seed": job[5], "lr": job[6],
                           "val_dice": s.get("validation", {}).get("dice_mean", math.nan)})
    if sweep_rows:
        _write_csv(out / "sweep.csv", sweep_rows)
    for name, _, _ in inits:
        for b in budgets:
            rs = [r for r in sweep_rows if r["init"] == name and str(r["budget"]) == str(b)]
            if rs:
                score = {lr: _mean([r["val_dice"] for r in rs if r["lr"] == lr]) for lr in lrs}
                chosen[(name, str(b))] = max(lrs, key=lambda lr: (score[lr], -lr))
                rule[(name, str(b))] = "validation"
            else:
                chosen[(name, str(b))] = cfg.lr.default
                rule[(name, str(b))] = "fallback" if validate else "sweep arm"
    (out / "lr_selection.json").write_text(json.dumps(
        {"selection": cfg.lr.selection, "fallback": cfg.lr.default, "validation_cases": v,
         "chosen": {f"{k[0]}|{k[1]}": lr for k, lr in chosen.items()}}, indent=1))

    # ---- the reported runs ---------------------------------------------------------------------------
    rows: list[dict[str, Any]] = []
    final_jobs = [(*job[:6], job[6] if job[6] is not None else chosen[(job[0], str(job[3]))]) for job in final_jobs]
    for job, run_dir in zip(final_jobs, run_all(final_jobs, sweep=False)):
        lr = job[6]
        for case, m in _case_rows(run_dir).items():
            rows.append({"init": job[0], "budget": job[3], "combination": job[4], "seed": job[5], "lr": f"{lr:g}",
                         "lr_rule": rule[(job[0], str(job[3]))],
                         "run": str(run_dir.relative_to(out)), "case": case, **m})
    _write_csv(out / "results.csv", rows)
    _report(cfg, rows, out, [n for n, _, _ in inits], chosen, split, data)
    return rows


def _same_architecture(base: dict[str, Any], inits: list[tuple[str, str | None, Any]], log: Callable[[str], None]
                       ) -> dict[str, Any]:
    """Every init must fine-tune the same network on the same preprocessing: the random init takes the pretrained
    checkpoints' backbone (which must agree with each other) and plan (the config's ``data.plan`` keys on top)."""
    from medcl.segment.init import read_checkpoint

    archs, plans = {}, {}
    for name, ckpt, _ in inits:
        if ckpt is not None:
            c = read_checkpoint(ckpt)
            if c.backbone is not None:
                archs[name] = {k: v for k, v in c.backbone.items() if k not in ("in_channels", "out_channels")}
            if c.plan is not None:
                plans[name] = {k: v for k, v in c.plan.items() if k not in ("channel_names", "labels")}
    out = base
    if archs:
        first = next(iter(archs.values()))
        if any(a != first for a in archs.values()):
            raise MedclConfigError("inits", f"the pretrained checkpoints have different backbones ({', '.join(archs)}); a "
                                   "label-efficiency comparison needs one architecture")
        log(f"every init fine-tunes the pretrained architecture: {first}")
        out = merge_config(out, {"backbone": dict(first)})
    if plans:
        first_plan = next(iter(plans.values()))
        if any(p != first_plan for p in plans.values()):
            log(f"WARNING: the pretrained checkpoints were made with different preprocessing plans ({', '.join(plans)}); "
                "each fine-tunes with its own, the random init with the first")
        user = dict((base.get("data") or {}).get("plan") or {})
        out = merge_config(out, {"data": {"plan": {**first_plan, **user}}})
    return out


def _finetune_job(kw: dict[str, Any]) -> str:
    """One fine-tune (in this process or a worker process); returns a one-line result for the progress log."""
    t0 = time.time()
    cfg = finetune_config_from_dict(kw["config"])
    res = run_finetune(cfg, kw["manifest"], kw["out"], selection=kw["selection"], resume=True,
                       allow_test_overlap=kw["allow"], device=kw["device"], progress=False, log=lambda s: None)
    part = res.summary.get(kw["part"], {})
    return f"{kw['part']} Dice {part.get('dice_mean', float('nan')):.3f} ({time.time() - t0:.0f} s)"


def _mean(v: list[float]) -> float:
    vals = [x for x in v if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else -math.inf


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k, "")) for k in cols})
    os.replace(tmp, path)


def _get_split(cfg: LabelEfficiencyConfig, manifest: Any, out: Path) -> LabelBudgetSplit:
    target = out / "split.json"
    if cfg.split.file:
        split = load_split(cfg.split.file)
        split.save(target)
        return split
    if target.is_file():  # a resumed benchmark keeps its split (and checks it is the one the config draws)
        split = load_split(target)
    else:
        split = make_label_budget_split(manifest, cfg.split.budgets, cfg.split.combinations, cfg.split.test,
                                        cfg.split.seed)
        split.save(target)
    fresh = make_label_budget_split(manifest, cfg.split.budgets, cfg.split.combinations, cfg.split.test,
                                    cfg.split.seed)
    if fresh.to_dict() != split.to_dict():
        raise MedclConfigError("split", f"{target} was drawn with other split settings than the config's; use "
                                        "another --out or set split.file to it")
    return split


def _report(cfg: LabelEfficiencyConfig, rows: list[dict[str, Any]], out: Path, inits: list[str],
            chosen: dict[tuple[str, str], float], split: LabelBudgetSplit, data: str) -> None:
    budgets = budget_order({r["budget"] for r in rows})
    header = [
        "# Label-efficiency benchmark", "",
        f"- data: `{data}`; test set: {len(split.test)} cases (fixed); unlabelled pool: {len(split.pool)} cases; "
        f"split seed {split.seed}" + (" (patient-aware)" if split.patient_aware else ""),
        f"- budgets: {', '.join(str(b) for b in budgets)} labelled volumes"
        + (f" (full = all {len(split.labelled_pool)} labelled pool volumes)" if FULL in budgets else "") + ", "
        f"{max(split.n_combinations(b) for b in split.budgets)} combination(s) each; seeds {cfg.seeds}",
        f"- every run: {cfg.steps} steps" + (f" ({cfg.full_steps} for full-label runs)" if cfg.full_steps else "")
        + "; last model (no selection on labels)",
        "- learning rate: " + (
            f"selected per init and budget among {cfg.lr.values} by the mean Dice on {cfg.lr.validation_cases} "
            f"validation volume(s) held out *inside* each labelled combination (first seed); where the budget is "
            f"too small to hold one out, the value fixed in advance ({cfg.lr.default:g})"
            if cfg.lr.selection == "validation" else
            f"every LR of {cfg.lr.values} was run; the tables report the LR fixed in advance ({cfg.lr.default:g}); "
            "results_lr*.md show each LR"),
        "- Dice: per test case the mean over the foreground classes, in the original geometry",
    ]
    lr_of = {(i, str(b)): f"{chosen.get((i, str(b)), cfg.lr.default):g}" for i in inits for b in budgets}
    if cfg.lr.selection == "report_all":
        lr_of = {k: f"{cfg.lr.default:g}" for k in lr_of}
        for lr in sorted(cfg.lr.values):
            write_report(rows, out / f"results_lr{lr:g}.md", inits=inits,
                         lr_of={k: f"{lr:g}" for k in lr_of}, header=header + [f"- this file: lr = {lr:g}"],
                         n_boot=cfg.bootstrap, boot_seed=cfg.bootstrap_seed)
    write_report(rows, out / "results.md", inits=inits, lr_of=lr_of, header=header, n_boot=cfg.bootstrap,
                 boot_seed=cfg.bootstrap_seed)
    plot_dice_vs_labels(rows, out / "dice_vs_labels.png", inits=inits, lr_of=lr_of,
                        title=f"{Path(data).name}: Dice vs labelled volumes")
