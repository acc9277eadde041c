"""The ``medcl benchmark label-efficiency`` config schema (``configs/benchmark/*.yaml``).

Layout::

    finetune_config: ../finetune/hippocampus.yaml   # the fine-tuning YAML every run starts from
    finetune: {threads: 1, ...}                     # fine-tuning keys on top of it
    steps: 250                                      # the step budget of every run
    full_label: true                                # also train on every labelled pool volume, same schedule
    ceiling: {inits: [random], min_steps: 1000, max_steps: 4000}    # converged full-label runs
    random_init: true                               # the random arm "random" (the fine-tuning architecture)
    inits:
      - {name: gd_local, checkpoint: runs/pretrain_gd_local}            # an existing checkpoint / run folder
      - {name: random_bn, random: true}                                 # a random arm of another architecture
      - {name: voco, method: voco, reference: random_bn}               # pretrained here on the pool
    seeds: [0, 1, 2]
    split: {file: null, test: 16, budgets: [1, 2, 4], combinations: 5, seed: 0}
    lr: {values: [3.0e-4, 1.0e-3, 3.0e-3], selection: validation, validation_cases: 1, fallback: null}
    jobs: 1                                         # fine-tunes in parallel processes
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medcl.config import apply_overrides, from_dict, read_yaml
from medcl.core.errors import MedclConfigError
from medcl.segment.prepare import finetune_config_from_dict, merge_config

__all__ = ["RANDOM", "SUPERVISED", "RECIPES", "recipe_overrides", "InitSpec", "BenchSplitConfig", "CeilingConfig", "LRConfig", "LabelEfficiencyConfig",
           "load_benchmark_config"]

RANDOM = "random"
"""The name of the random initialisation (the reference of the paired differences)."""
SUPERVISED = "supervised"
RECIPES = ("supervised", "semi")
"""Fine-tuning recipes: ``supervised`` (the labelled volumes only) and ``semi`` (plus the unlabelled pool,
:mod:`medcl.segment.semi`)."""


def recipe_overrides(cfg: LabelEfficiencyConfig, recipe: str) -> dict[str, Any]:
    """The fine-tuning keys a recipe sets over the base (``semi.enabled: true`` for ``semi``), plus the config's
    ``recipe_overrides`` for it."""
    base: dict[str, Any] = {"semi": {"enabled": True}} if recipe == "semi" else {}
    return merge_config(base, dict(cfg.recipe_overrides.get(recipe, {})))


@dataclass
class InitSpec:
    """One initialisation: pretrained (exactly one of ``checkpoint`` or ``method``/``config``) or, with
    ``random: true``, another random-init arm (for pretrained inits of another architecture).

    Attributes:
        name: label in the tables (``random`` is reserved for the default random arm).
        checkpoint: a pretraining checkpoint or run folder.
        method: a pretraining method name, pretrained here on the unlabelled pool.
        config: a pretraining config YAML, pretrained here on the pool.
        overrides: ``key=value`` overrides of the pretraining config (e.g. ``trainer.max_steps=2000``).
        load: stages to load (default: the fine-tuning config's ``init.load``).
        random: a random-init arm; its architecture is the one of the pretrained inits that name it as their
            ``reference`` (they must agree).
        reference: the random arm this init is compared with (paired differences); it must have the same
            architecture (e.g. ``random_bn`` for a batch-norm backbone).
    """

    name: str
    checkpoint: str | None = None
    method: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    load: list[str] | None = None
    random: bool = False
    reference: str = "random"

    def validate(self) -> None:
        if self.name == RANDOM:
            raise MedclConfigError("inits.name", f"'{RANDOM}' is reserved for the random initialisation")
        if self.random:
            if self.checkpoint or self.method or self.config:
                raise MedclConfigError(f"inits.{self.name}", "a random arm has no checkpoint, method or config")
        elif bool(self.checkpoint) == bool(self.method or self.config):
            raise MedclConfigError(f"inits.{self.name}", "give either checkpoint, or method / config to pretrain")


@dataclass
class CeilingConfig:
    """Converged full-label runs: the ceiling the "fraction of the full-label Dice" divides by.

    Attributes:
        inits: the initialisations that get one (by name; ``[]`` = none). Each is trained on every labelled pool
            volume until its training loss converges (:mod:`medcl.engine.convergence`), one run per seed.
        min_steps: no convergence check before this step.
        max_steps: the cap (the learning-rate schedule runs over it).
        tolerance, tail: the convergence rule (window means improve by less than ``tolerance`` over the last
            ``tail`` of the steps).
    """

    inits: list[str] = field(default_factory=lambda: [RANDOM])
    min_steps: int = 1000
    max_steps: int = 4000
    tolerance: float = 0.01
    tail: float = 0.2

    def validate(self) -> None:
        if self.min_steps < 1 or self.max_steps < self.min_steps:
            raise MedclConfigError("ceiling", "need 1 <= min_steps <= max_steps")


@dataclass
class BenchSplitConfig:
    """The split: an existing file, or drawn here (see :func:`medcl.data.splits.make_label_budget_split`)."""

    file: str | None = None
    test: int = 16
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4])
    combinations: int = 5
    seed: int = 0


@dataclass
class LRConfig:
    """The learning-rate sweep (see the module docstring)."""

    values: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    selection: Literal["validation", "report_all"] = "validation"
    validation_cases: int = 1
    fallback: float | None = None

    def validate(self) -> None:
        if not self.values or min(self.values) <= 0:
            raise MedclConfigError("lr.values", f"need positive learning rates, got {self.values}")
        if self.validation_cases < 1:
            raise MedclConfigError("lr.validation_cases", "must be >= 1")

    @property
    def default(self) -> float:
        return self.fallback if self.fallback is not None else sorted(self.values)[len(self.values) // 2]


@dataclass
class LabelEfficiencyConfig:
    """The benchmark config (``configs/benchmark/*.yaml``).

    Attributes:
        finetune_config: the fine-tuning YAML every run starts from (relative to this file's folder).
        finetune: fine-tuning keys on top of it (a partial :class:`FinetuneConfig` mapping).
        steps: the step budget of every run (all inits, all budgets).
        full_label: also run each init on every labelled volume of the pool with the same schedule (``steps``).
        full_steps: step budget of those full-label runs (default ``steps``: the same schedule as every budget).
        ceiling: converged full-label runs (:class:`CeilingConfig`).
        random_init: include the random initialisation (the reference of the paired differences).
        inits: the pretrained initialisations.
        seeds: fine-tuning seeds.
        split, lr: see :class:`BenchSplitConfig`, :class:`LRConfig`.
        recipes: fine-tuning recipes, each a column of rows in the tables (``supervised``, ``semi``); every
            (init, recipe) gets the same steps, the same augmentation and the same learning-rate rule.
        recipe_overrides: fine-tuning keys per recipe (e.g. ``{semi: {semi: {threshold: 0.8}}}``).
        recipe_inits: which inits get a non-supervised recipe (e.g. ``{semi: [random, mae]}``); a recipe not named
            here runs on every init. The supervised recipe always runs on every init (it is every row's reference).
        allow_test_overlap, allow_unknown_provenance, allow_incomplete: the overrides of the acceptance rule for
            init checkpoints (:func:`medcl.segment.init.accept_checkpoint`; off: refuse).
        jobs: fine-tunes run in parallel processes (each with ``finetune.threads`` threads; on a CPU machine
            ``jobs`` = cores and ``threads: 1`` is the fastest layout).
    """

    finetune_config: str | None = None
    finetune: dict[str, Any] = field(default_factory=dict)
    steps: int = 250
    full_label: bool = True
    full_steps: int | None = None
    ceiling: CeilingConfig = field(default_factory=CeilingConfig)
    random_init: bool = True
    inits: list[InitSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    recipes: list[str] = field(default_factory=lambda: [SUPERVISED])
    recipe_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    recipe_inits: dict[str, list[str]] = field(default_factory=dict)
    split: BenchSplitConfig = field(default_factory=BenchSplitConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    allow_test_overlap: bool = False
    allow_unknown_provenance: bool = False
    allow_incomplete: bool = False
    jobs: int = 1

    def validate(self) -> None:
        names = [i.name for i in self.inits]
        if len(set(names)) != len(names):
            raise MedclConfigError("inits", f"init names must be unique, got {names}")
        if not self.seeds or self.steps < 1:
            raise MedclConfigError("seeds", "need at least one seed and steps >= 1")
        if self.jobs < 1:
            raise MedclConfigError("jobs", f"must be >= 1, got {self.jobs}")
        if not self.random_init and not self.inits:
            raise MedclConfigError("inits", "nothing to benchmark: no init and random_init is false")
        bad = [r for r in self.recipes if r not in RECIPES] + [r for r in self.recipe_overrides if r not in RECIPES]
        if bad or not self.recipes or len(set(self.recipes)) != len(self.recipes):
            raise MedclConfigError("recipes", f"expected distinct recipes among {list(RECIPES)}, got {self.recipes}")
        for recipe, names in self.recipe_inits.items():
            if recipe == SUPERVISED or recipe not in self.recipes:
                raise MedclConfigError(f"recipe_inits.{recipe}", f"expected one of the non-supervised recipes of "
                                                                 f"'recipes' {[r for r in self.recipes if r != SUPERVISED]}")
            unknown = sorted(set(names) - {i.name for i in self.inits} - ({RANDOM} if self.random_init else set()))
            if unknown:
                raise MedclConfigError(f"recipe_inits.{recipe}", f"unknown init(s) {unknown}")
        randoms = {i.name for i in self.inits if i.random} | ({RANDOM} if self.random_init else set())
        for i in self.inits:
            if not i.random and i.reference not in randoms:
                raise MedclConfigError(f"inits.{i.name}.reference", f"'{i.reference}' is not a random arm of this "
                                       f"benchmark ({', '.join(sorted(randoms)) or 'none'})")
        known = {i.name for i in self.inits} | ({RANDOM} if self.random_init else set())
        known |= {f"{n}+{r}" for n in known for r in self.recipes if r != SUPERVISED}
        unknown = sorted(set(self.ceiling.inits) - known)
        if unknown:
            raise MedclConfigError("ceiling.inits", f"unknown init(s) {unknown} (known: {sorted(known)})")


def load_benchmark_config(path: str | os.PathLike | None, overrides: list[str] | None = None
                          ) -> tuple[LabelEfficiencyConfig, dict[str, Any]]:
    """The benchmark config and the resolved fine-tuning base mapping (``finetune_config`` + ``finetune``)."""
    data = read_yaml(path) if path is not None else {}
    if overrides:
        data = apply_overrides(data, overrides)
    cfg = from_dict(LabelEfficiencyConfig, data)
    base: dict[str, Any] = {}
    if cfg.finetune_config:
        p = Path(cfg.finetune_config)
        if not p.is_absolute() and path is not None and not p.is_file():
            p = Path(path).parent / p
        base = read_yaml(p)
    base = merge_config(base, cfg.finetune)
    finetune_config_from_dict(base)  # validate now, before any training
    return cfg, base
