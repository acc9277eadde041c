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
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medcl.config import to_dict
from medcl.core.errors import MedclConfigError
from medcl.core.files import atomic_write_json, write_csv
from medcl.core.record import RunRecord
from medcl.core.runfolder import RunFolder, prepare_run_folder, run_is_complete, test_metrics_path
from medcl.data import load_manifest
from medcl.data.splits import FULL, LabelBudgetSplit, load_split, make_label_budget_split
from medcl.segment.bench_config import (
    RANDOM,
    SUPERVISED,
    InitSpec,
    LabelEfficiencyConfig,
    load_benchmark_config,
    recipe_overrides,
)
from medcl.segment.bench_report import (
    UNIT_SENTENCE,
    budget_order,
    plot_dice_vs_labels,
    plot_paired_differences,
    write_report,
)
from medcl.segment.finetune import DONE_FILE, run_finetune
from medcl.segment.prepare import CaseSelection, finetune_config_from_dict, merge_config

__all__ = ["InitSpec", "LabelEfficiencyConfig", "load_benchmark_config", "run_label_efficiency", "pretrain_init",
           "method_config"]

PretrainFn = Callable[..., Any]

log = logging.getLogger(__name__)


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

    Calls ``pretrain_fn(config, data, out, overrides=..., seed=..., cases=pool, resume=..., overwrite=...,
    device=..., progress=False)`` (the signature of :func:`medcl.pretrain.run_pretrain`), ``config`` being ``spec.config``
    or the YAML of ``spec.method`` (:func:`method_config`); it returns the run folder. Skipped when ``out``
    already holds a complete run (``backbone.pt``); resumed when it holds a checkpoint. The acceptance rule of
    every fine-tune still checks the result against the test set.
    """
    if run_is_complete(out) and (out / "backbone.pt").is_file():
        return str(out / "backbone.pt")
    config = spec.config or str(method_config(spec.method or ""))
    from medcl.engine.trainer import last_checkpoint

    resume = last_checkpoint(out) is not None
    # a run killed before its first checkpoint left files but nothing to resume: start it again
    result = pretrain_fn(config, data, out, overrides=list(spec.overrides), seed=seed, cases=list(pool),
                         resume=resume, overwrite=not resume, device=device, progress=False)
    return str(result) if result is not None else str(out)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _case_rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The test metrics of a run (``test_metrics.csv``, ``metrics.csv`` in older folders) -> per case: ``dice`` (mean
    over classes), ``hd95``, ``nsd``, per-class values."""
    out: dict[str, dict[str, Any]] = {}
    for r in _read_rows(test_metrics_path(run_dir)):
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


@dataclass
class Init:
    """An initialisation of the benchmark: its table name, its checkpoint (``None``: a random arm), the stages to
    load, and the random arm it is compared with (``None`` for random arms)."""

    name: str
    checkpoint: str | None = None
    load: tuple[str, ...] | None = None
    reference: str | None = None
    provenance: str = field(default="recorded", compare=False)
    recipe: str = "supervised"
    base: str | None = None  # the init this (init, recipe) row comes from (its architecture); None: itself


@dataclass(frozen=True)
class Arm:
    """One fine-tuning run of the benchmark.

    ``lr`` is ``None`` for a reported run whose learning rate the sweep selects; ``sweep`` runs train on all but
    the validation volumes of their combination and are scored on those.
    """

    init: Init
    budget: Any
    combination: int
    seed: int
    lr: float | None
    sweep: bool = False
    ceiling: bool = False

    def folder(self, out: Path) -> Path:
        lr = f"lr{self.lr:g}" if self.lr is not None else "lr"
        kind = "sweep" if self.sweep else "ceiling" if self.ceiling else "runs"
        return out / kind / self.init.name / f"n{self.budget}" / f"c{self.combination}" / f"s{self.seed}" / lr

    def tag(self) -> str:
        lr = f"{self.lr:g}" if self.lr is not None else "?"
        kind = "sweep " if self.sweep else "ceiling " if self.ceiling else ""
        return f"{kind}init={self.init.name} N={self.budget} combination={self.combination} seed={self.seed} lr={lr}"


def run_label_efficiency(
    cfg: LabelEfficiencyConfig,
    finetune_base: dict[str, Any],
    data: str,
    out: str | os.PathLike,
    *,
    device: str = "auto",
    pretrain_fn: PretrainFn | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run (or resume: rerun into the same ``out``) the benchmark; returns the rows of ``results.csv``.
    ``overwrite`` starts again in an emptied ``out``.

    Steps: the split; the initialisations (pretraining methods on the pool, every checkpoint checked against the
    test set); one architecture for all; the learning-rate sweep inside the budget; the reported runs; the tables.
    """
    out = Path(out)
    prepare_run_folder(out, "label-efficiency", overwrite=overwrite, rerun_resumes=True, inputs=[data])
    manifest = load_manifest(data)
    # config.yaml is self-contained: the fine-tuning base is stored resolved (no path relative to the YAML)
    folder = RunFolder(out, RunRecord(kind="label-efficiency", config=to_dict(replace(
        cfg, finetune_config=None, finetune=finetune_base)), extra={"data": str(data)}))
    folder.begin(replace(cfg, finetune_config=None, finetune=finetune_base))
    split = _get_split(cfg, manifest, out)
    split.check_manifest(manifest, str(out / "split.json"))
    folder.record["test_cases"] = list(split.test)
    by_id = {c.id: c for c in manifest.cases}
    test_patients = sorted({by_id[t].patient for t in split.test if by_id[t].patient})
    inits = _prepare_inits(cfg, split, data, out, pretrain_fn, device, test_patients)
    bases = _architectures(finetune_base, inits)
    inits = _with_recipes(cfg, inits)
    budgets: list[Any] = list(budget_order(split.budgets)) + ([FULL] if cfg.full_label else [])
    sweep_arms, final_arms = _plan_arms(cfg, split, inits, budgets)
    ceiling_arms = [Arm(i, FULL, 0, s, None, ceiling=True) for i in inits if i.name in cfg.ceiling.inits
                    for s in cfg.seeds]
    total = len(sweep_arms) + len(final_arms) + len(ceiling_arms)
    runner = _ArmRunner(cfg, bases, manifest, split, out, device, total)

    chosen, rule = _select_learning_rates(cfg, inits, budgets, sweep_arms, runner.run_all(sweep_arms), out)

    def with_lr(a: Arm) -> Arm:
        return a if a.lr is not None else replace(a, lr=chosen.get((a.init.name, str(a.budget)), cfg.lr.default))

    final_arms = [with_lr(a) for a in final_arms]
    rows = _collect_rows(final_arms, runner.run_all(final_arms), rule, out)
    write_csv(out / "results.csv", rows)
    ceiling_arms = [with_lr(a) for a in ceiling_arms]
    ceiling_rows = _collect_rows(ceiling_arms, runner.run_all(ceiling_arms), rule, out, steps=True)
    if ceiling_rows:
        write_csv(out / "ceiling.csv", ceiling_rows)
    _report(cfg, rows, ceiling_rows, out, inits, chosen, split, data)
    folder.finish({"runs": len(final_arms) + len(sweep_arms) + len(ceiling_arms), "inits": [i.name for i in inits],
                   "budgets": [str(b) for b in budgets], "results": "results.md"}, step=total)
    return rows


def _prepare_inits(cfg: LabelEfficiencyConfig, split: LabelBudgetSplit, data: str, out: Path,
                   pretrain_fn: PretrainFn | None, device: str, test_patients: list[str]) -> list[Init]:
    """Random init, the given checkpoints and the methods pretrained here on the pool; every checkpoint is checked
    against the test set before any run (not at its first fine-tune)."""
    from medcl.segment.init import accept_checkpoint, read_checkpoint

    inits = [Init(RANDOM)] if cfg.random_init else []
    for spec in cfg.inits:
        load = tuple(spec.load) if spec.load else None
        if spec.random:
            inits.append(Init(spec.name))
            continue
        if spec.checkpoint:
            inits.append(Init(spec.name, spec.checkpoint, load, spec.reference))
            continue
        if pretrain_fn is None:
            raise MedclConfigError(f"inits.{spec.name}", "pretraining a method needs medcl.pretrain.run_pretrain, which "
                                                         "is not available here; give a checkpoint instead")
        log.info("pretraining '%s' on the unlabelled pool (%d cases, test set excluded)", spec.name, len(split.pool))
        ckpt = pretrain_init(spec, data, out / "pretrain" / spec.name, split.pool, cfg.split.seed, pretrain_fn, device)
        inits.append(Init(spec.name, ckpt, load, spec.reference))
    for init in inits:
        if init.checkpoint is not None:
            acc = accept_checkpoint(read_checkpoint(init.checkpoint), test_cases=split.test, test_patients=test_patients,
                                    **_allow(cfg))
            init.provenance = acc.provenance
            if acc.test_overlap or acc.patient_overlap:
                warnings.warn(f"init '{init.name}' saw test cases / patients (allow_test_overlap): "
                              f"{acc.test_overlap or acc.patient_overlap}", stacklevel=2)
    return inits


def _with_recipes(cfg: LabelEfficiencyConfig, inits: list[Init]) -> list[Init]:
    """One row per (init, recipe): ``NAME`` for the supervised recipe, ``NAME+RECIPE`` for the others; every row is
    paired with the supervised random arm of its architecture (so ``random+semi`` is compared with ``random``);
    ``recipe_inits`` restricts a recipe to the inits it names."""
    rows = []
    for recipe in cfg.recipes:
        for i in inits:
            if recipe == SUPERVISED:
                rows.append(i)
            elif recipe in cfg.recipe_inits and i.name not in cfg.recipe_inits[recipe]:
                continue
            else:
                rows.append(replace(i, name=f"{i.name}+{recipe}", recipe=recipe, base=i.name,
                                    reference=i.reference or i.name))
    return rows


def _allow(cfg: LabelEfficiencyConfig) -> dict[str, bool]:
    return {"allow_test_overlap": cfg.allow_test_overlap, "allow_unknown_provenance": cfg.allow_unknown_provenance,
            "allow_incomplete": cfg.allow_incomplete}


def _plan_arms(cfg: LabelEfficiencyConfig, split: LabelBudgetSplit, inits: list[Init], budgets: list[Any]
               ) -> tuple[list[Arm], list[Arm]]:
    """(sweep runs, reported runs): the sweep where a budget can spare ``lr.validation_cases`` volumes."""
    lrs = sorted(cfg.lr.values)
    validate = cfg.lr.selection == "validation"
    v = cfg.lr.validation_cases
    sweep, final = [], []
    for init in inits:
        for b in budgets:
            n = len(split.labelled(b, 0)) if b == FULL else int(b)
            combos = range(split.n_combinations(b))
            if validate and n > v and len(lrs) > 1:
                sweep += [Arm(init, b, c, cfg.seeds[0], lr, sweep=True) for c in combos for lr in lrs]
            for lr in (lrs if not validate else [None]):
                final += [Arm(init, b, c, s, lr) for c in combos for s in cfg.seeds]
    return sweep, final


class _ArmRunner:
    """Runs arms (skipping finished ones, resuming killed ones), in this process or ``cfg.jobs`` processes."""

    def __init__(self, cfg: LabelEfficiencyConfig, bases: dict[str, dict[str, Any]], manifest: Any,
                 split: LabelBudgetSplit, out: Path, device: str, total: int) -> None:
        self.cfg, self.bases, self.manifest, self.split, self.out, self.device = cfg, bases, manifest, split, out, device
        self.total, self.count = total, 0

    def job(self, arm: Arm) -> dict[str, Any]:
        """The worker arguments of ``arm`` (plain data: they cross a process boundary)."""
        cfg, v = self.cfg, self.cfg.lr.validation_cases
        labelled = self.split.labelled(arm.budget, arm.combination)
        val = labelled[-v:] if arm.sweep else []
        sel = CaseSelection(train=labelled[:-v] if arm.sweep else labelled, validation=val,
                            test=[] if arm.sweep else list(self.split.test), budget=arm.budget,
                            combination=arm.combination, source="benchmark",
                            unlabelled=[c for c in self.split.pool if c not in set(val)])
        steps = (cfg.full_steps or cfg.steps) if arm.budget == FULL else cfg.steps
        over: dict[str, Any] = {"seed": arm.seed, "optim": {"lr": arm.lr}, "trainer": {"max_steps": steps},
                                "init": {"checkpoint": arm.init.checkpoint,
                                         **({"load": list(arm.init.load)} if arm.init.load else {})}}
        if arm.ceiling:
            c = cfg.ceiling
            over["trainer"]["max_steps"] = c.max_steps
            over["converge"] = {"enabled": True, "min_steps": c.min_steps, "tolerance": c.tolerance, "tail": c.tail}
        over = merge_config(recipe_overrides(cfg, arm.init.recipe), over)
        base = self.bases[arm.init.base or arm.init.name]
        return {"config": merge_config(base, over), "manifest": self.manifest, "out": str(arm.folder(self.out)),
                "selection": sel, "allow": _allow(cfg), "device": self.device,
                "part": "validation" if arm.sweep else "test"}

    def run_all(self, arms: list[Arm]) -> list[Path]:
        pending = []
        for arm in arms:
            self.count += 1
            tag = f"[{self.count}/{self.total}] {arm.tag()}"
            if run_is_complete(arm.folder(self.out)):
                log.info("%s: done before, skipped", tag)
            else:
                pending.append((tag, self.job(arm)))
        if self.cfg.jobs <= 1 or len(pending) <= 1:
            for tag, kw in pending:
                log.info("%s: training", tag)
                log.info("%s: %s", tag, _finetune_job(kw))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=self.cfg.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_finetune_job, kw): tag for tag, kw in pending}
                log.info("running %d fine-tune(s) in %d processes", len(pending), self.cfg.jobs)
                for fut in as_completed(futures):
                    log.info("%s: %s", futures[fut], fut.result())
        return [arm.folder(self.out) for arm in arms]


def _select_learning_rates(cfg: LabelEfficiencyConfig, inits: list[Init], budgets: list[Any], sweep_arms: list[Arm],
                           folders: list[Path], out: Path
                           ) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], str]]:
    """The LR of each (init, budget): best mean validation Dice of the sweep, else the fallback; writes
    ``sweep.csv`` and ``lr_selection.json``."""
    lrs = sorted(cfg.lr.values)
    sweep_rows = []
    for arm, folder in zip(sweep_arms, folders):
        s = json.loads((folder / DONE_FILE).read_text())
        sweep_rows.append({"init": arm.init.name, "budget": arm.budget, "combination": arm.combination,
                           "seed": arm.seed, "lr": arm.lr,
                           "val_dice": s.get("validation", {}).get("dice_mean", math.nan)})
    if sweep_rows:
        write_csv(out / "sweep.csv", sweep_rows)
    chosen: dict[tuple[str, str], float] = {}
    rule: dict[tuple[str, str], str] = {}
    for init in inits:
        for b in budgets:
            key = (init.name, str(b))
            rs = [r for r in sweep_rows if r["init"] == init.name and str(r["budget"]) == str(b)]
            if rs:
                score = {lr: _mean([r["val_dice"] for r in rs if r["lr"] == lr]) for lr in lrs}
                chosen[key], rule[key] = max(lrs, key=lambda lr: (score[lr], -lr)), "validation"
            else:
                chosen[key] = cfg.lr.default
                rule[key] = "fallback" if cfg.lr.selection == "validation" else "sweep arm"
    atomic_write_json({"selection": cfg.lr.selection, "fallback": cfg.lr.default,
                       "validation_cases": cfg.lr.validation_cases,
                       "chosen": {f"{k[0]}|{k[1]}": lr for k, lr in chosen.items()}}, out / "lr_selection.json")
    return chosen, rule


def _collect_rows(arms: list[Arm], folders: list[Path], rule: dict[tuple[str, str], str], out: Path,
                  steps: bool = False) -> list[dict[str, Any]]:
    """One row per run and test case (the rows of ``results.csv``; with ``steps`` also the steps trained and
    whether the run converged, for ``ceiling.csv``)."""
    rows: list[dict[str, Any]] = []
    for arm, folder in zip(arms, folders):
        extra: dict[str, Any] = {}
        if steps:
            s = json.loads((folder / DONE_FILE).read_text())
            extra = {"steps": s.get("steps"), "max_steps": s.get("max_steps"), "converged": s.get("converged")}
        for case, m in _case_rows(folder).items():
            rows.append({"init": arm.init.name, "recipe": arm.init.recipe, "reference": arm.init.reference or "",
                         "seconds": json.loads((folder / DONE_FILE).read_text()).get("seconds"), "budget": arm.budget,
                         "combination": arm.combination, "seed": arm.seed, "lr": f"{arm.lr:g}",
                         "lr_rule": rule.get((arm.init.name, str(arm.budget)), "fallback"),
                         "run": str(folder.relative_to(out)), **extra, "case": case, **m})
    return rows


def _architectures(base: dict[str, Any], inits: list[Init]) -> dict[str, dict[str, Any]]:
    """The fine-tuning base config of each init. A pretrained init fine-tunes its checkpoint's architecture; a
    random arm takes the architecture (and preprocessing plan) of the pretrained inits that name it as their
    reference, which must agree: a paired difference compares one network with and without pretraining."""
    from medcl.segment.init import read_checkpoint

    archs: dict[str, dict[str, Any]] = {}
    plans: dict[str, dict[str, Any]] = {}
    for init in inits:
        if init.checkpoint is None:
            continue
        c = read_checkpoint(init.checkpoint)
        if c.backbone is not None:
            archs[init.name] = {k: v for k, v in c.backbone.items() if k not in ("in_channels", "out_channels")}
        if c.plan is not None:
            plans[init.name] = {k: v for k, v in c.plan.items() if k not in ("channel_names", "labels")}
    user_plan = dict((base.get("data") or {}).get("plan") or {})
    out: dict[str, dict[str, Any]] = {}
    for init in inits:
        if init.checkpoint is not None:
            out[init.name] = base
            continue
        members = [i.name for i in inits if i.reference == init.name]
        group = {n: archs[n] for n in members if n in archs}
        cfg = base
        if group:
            first = next(iter(group.values()))
            if any(a != first for a in group.values()):
                raise MedclConfigError("inits", f"the checkpoints compared with '{init.name}' have different backbones "
                                       f"({', '.join(group)}); give each architecture its own random arm")
            log.info("random arm '%s' fine-tunes the architecture of %s: %s", init.name, ", ".join(group), first)
            cfg = merge_config(cfg, {"backbone": dict(first)})
        group_plans = [plans[n] for n in members if n in plans]
        if group_plans:
            if any(p != group_plans[0] for p in group_plans):
                warnings.warn(f"the checkpoints compared with '{init.name}' were made with different preprocessing "
                              f"plans; each fine-tunes with its own, '{init.name}' with the first", stacklevel=2)
            cfg = merge_config(cfg, {"data": {"plan": {**group_plans[0], **user_plan}}})
        out[init.name] = cfg
    return out


def _finetune_job(kw: dict[str, Any]) -> str:
    """One fine-tune (in this process or a worker process); returns a one-line result for the progress log."""
    t0 = time.time()
    cfg = finetune_config_from_dict(kw["config"])
    res = run_finetune(cfg, kw["manifest"], kw["out"], selection=kw["selection"], resume=True,
                       device=kw["device"], progress=False, **kw["allow"])
    part = res.summary.get(kw["part"], {})
    return f"{kw['part']} Dice {part.get('dice_mean', float('nan')):.3f} ({time.time() - t0:.0f} s)"


def _mean(v: list[float]) -> float:
    vals = [x for x in v if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else -math.inf


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


def _pretrain_costs(inits: list[Init]) -> dict[str, dict[str, Any]]:
    """Steps, median seconds per step and wall-clock of each pretrained init (from its run's summary.json)."""
    costs = {}
    for init in inits:
        if init.checkpoint is None:
            continue
        p = Path(init.checkpoint)
        folder = p if p.is_dir() else p.parent.parent if p.parent.name == "checkpoints" else p.parent
        f = folder / "summary.json"
        if f.is_file():
            s = json.loads(f.read_text())
            costs[init.name] = {"steps": s.get("steps"), "step_seconds": s.get("step_seconds_median", math.nan),
                                "seconds": s.get("seconds", s.get("steps", 0) * s.get("step_seconds_median", math.nan))}
    return costs


def _report(cfg: LabelEfficiencyConfig, rows: list[dict[str, Any]], ceiling_rows: list[dict[str, Any]], out: Path,
            inits: list[Init], chosen: dict[tuple[str, str], float], split: LabelBudgetSplit, data: str) -> None:
    names = [i.name for i in inits]
    refs = {i.name: i.reference for i in inits}
    budgets = budget_order({r["budget"] for r in rows})
    full_steps = cfg.full_steps or cfg.steps
    header = [
        "# Label-efficiency benchmark", "",
        f"- data: `{data}`; test set: {len(split.test)} cases (fixed); unlabelled pool: {len(split.pool)} cases; "
        f"split seed {split.seed}" + (" (patient-aware)" if split.patient_aware else ""),
        f"- budgets: {', '.join(str(b) for b in budgets)} labelled volumes"
        + (f" (full = all {len(split.labelled_pool)} labelled pool volumes, {full_steps} steps"
           + (", the same schedule as every budget)" if full_steps == cfg.steps else ")") if FULL in budgets else "")
        + f", {max(split.n_combinations(b) for b in split.budgets)} combination(s) each; seeds {cfg.seeds}",
        f"- every run: {cfg.steps} steps; last model (no selection on labels)",
        "- learning rate: " + (
            f"selected per init and budget among {cfg.lr.values} by the mean Dice on {cfg.lr.validation_cases} "
            f"validation volume(s) held out *inside* each labelled combination (first seed); where the budget is "
            f"too small to hold one out, the value fixed in advance ({cfg.lr.default:g})"
            if cfg.lr.selection == "validation" else
            f"every LR of {cfg.lr.values} was run; the tables report the LR fixed in advance ({cfg.lr.default:g}); "
            "results_lr*.md show each LR"),
        "- paired differences: " + UNIT_SENTENCE,
        "- init provenance: " + "; ".join(f"{i.name}: {'random init' if i.checkpoint is None else i.provenance}"
                                          + (" (no run record: provenance unknown)" if i.provenance == "unknown" else "")
                                          for i in inits),
        "- Dice: per test case the mean over the foreground classes, in the original geometry",
    ]
    kw = {"references": refs, "ceiling_rows": ceiling_rows, "n_labelled_pool": len(split.labelled_pool),
          "costs": _pretrain_costs(inits)}
    lr_of = {(i, str(b)): f"{chosen.get((i, str(b)), cfg.lr.default):g}" for i in names for b in budgets}
    if cfg.lr.selection == "report_all":
        lr_of = {k: f"{cfg.lr.default:g}" for k in lr_of}
        for lr in sorted(cfg.lr.values):
            write_report(rows, out / f"results_lr{lr:g}.md", inits=names, lr_of={k: f"{lr:g}" for k in lr_of},
                         header=header + [f"- this file: lr = {lr:g}"], **kw)
    write_report(rows, out / "results.md", inits=names, lr_of=lr_of, header=header, **kw)
    plot_dice_vs_labels(rows, out / "dice_vs_labels.png", inits=names, lr_of=lr_of,
                        title=f"{Path(data).name}: Dice vs labelled volumes")
    plot_paired_differences(rows, out / "paired_differences.png", inits=names, references=refs, lr_of=lr_of,
                            title=f"{Path(data).name}: pretraining / recipe minus random init")
