"""The ``medcl benchmark label-efficiency`` config schema (``configs/benchmark/*.yaml``).

Layout::

    finetune_config: ../finetune/hippocampus.yaml   # the fine-tuning YAML every run starts from
    finetune: {threads: 1, ...}                     # fine-tuning keys on top of it
    steps: 250                                      # the step budget of every run
    full_label: true                                # also train on every labelled pool volume (the ceiling)
    random_init: true
    inits:                                          # pretrained initialisations
      - {name: gd_local, checkpoint: runs/pretrain_gd_local}            # an existing checkpoint / run folder
      - {name: voco, method: voco, overrides: [trainer.max_steps=2000]}  # pretrained here on the pool
    seeds: [0, 1, 2]
    split: {file: null, test: 16, budgets: [1, 2, 4], combinations: 3, seed: 0}
    lr: {values: [3.0e-4, 1.0e-3, 3.0e-3], selection: validation, validation_cases: 1, fallback: null}
    bootstrap: 2000
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

__all__ = ["RANDOM", "InitSpec", "BenchSplitConfig", "LRConfig", "LabelEfficiencyConfig", "load_benchmark_config"]

RANDOM = "random"
"""The name of the random initialisation (the reference of the paired differences)."""


@dataclass
class InitSpec:
    """One initialisation. Exactly one of ``checkpoint`` or ``method``/``config`` (pretrain it here).

    Attributes:
        name: label in the tables (``random`` is reserved).
        checkpoint: a pretraining checkpoint or run folder.
        method: a pretraining method name, pretrained here on the unlabelled pool.
        config: a pretraining config YAML, pretrained here on the pool.
        overrides: ``key=value`` overrides of the pretraining config (e.g. ``trainer.max_steps=2000``).
        load: stages to load (default: the fine-tuning config's ``init.load``).
    """

    name: str
    checkpoint: str | None = None
    method: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    load: list[str] | None = None

    def validate(self) -> None:
        if self.name == RANDOM:
            raise MedclConfigError("inits.name", f"'{RANDOM}' is reserved for the random initialisation")
        if bool(self.checkpoint) == bool(self.method or self.config):
            raise MedclConfigError(f"inits.{self.name}", "give either checkpoint, or method / config to pretrain")


@dataclass
class BenchSplitConfig:
    """The split: an existing file, or drawn here (see :func:`medcl.data.splits.make_label_budget_split`)."""

    file: str | None = None
    test: int = 16
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4])
    combinations: int = 3
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
        full_label: also run each init on every labelled volume of the pool (the ceiling).
        full_steps: step budget of the full-label runs (default ``steps``).
        random_init: include the random initialisation (the reference of the paired differences).
        inits: the pretrained initialisations.
        seeds: fine-tuning seeds.
        split, lr: see :class:`BenchSplitConfig`, :class:`LRConfig`.
        bootstrap, bootstrap_seed: replicates and seed of the paired intervals.
        allow_test_overlap: pass-through of the leakage guard's override (off: refuse).
        jobs: fine-tunes run in parallel processes (each with ``finetune.threads`` threads; on a CPU machine
            ``jobs`` = cores and ``threads: 1`` is the fastest layout).
    """

    finetune_config: str | None = None
    finetune: dict[str, Any] = field(default_factory=dict)
    steps: int = 250
    full_label: bool = True
    full_steps: int | None = None
    random_init: bool = True
    inits: list[InitSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    split: BenchSplitConfig = field(default_factory=BenchSplitConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    bootstrap: int = 2000
    bootstrap_seed: int = 0
    allow_test_overlap: bool = False
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
