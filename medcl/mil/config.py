"""The ``medcl mil train`` config schema (YAML in :mod:`configs/mil`, validated by :mod:`medcl.config`).

One file describes one head; ``medcl mil train --config a.yaml --config b.yaml`` compares several on the same
folds. Unknown keys fail before training with the dotted key named; keys of an earlier medcl fail with their new
name (``train.lr`` -> ``optim.lr``, ``train.scheduler`` -> ``optim.schedule``, ``train.device`` -> ``device``
...). Layout::

    name: abmil                  # the head's label in results.csv / results.md (default: the head kind)
    head: abmil                  # a registered head (medcl.mil.heads.head_names())
    device: auto                 # auto | cpu | cuda | cuda:N (--device)
    threads: 1                   # torch CPU threads during the run (null: torch's default)
    encoder: {hidden: [256, 128], dropout: 0.25}   # instance MLP in front of every head
    abmil: {...}  transmil: {...}  dsmil: {...}  clam: {...}  ins: {...}  scmil: {...}   # head sections
    optim: {lr: 5.0e-4, weight_decay: 1.0e-4, schedule: cosine, lr_warmup_steps: 0, grad_clip: 5.0}
    train: {epochs: 60, batch_size: 16, sampler: random, standardize: global, instance_keep: 1.0, fast: true,
           pack_instances: true, stack_models: 0}
    cv: {folds: 10, seeds: [0, 1, 2, 3, 4], imbalance: null, ...}
    data: {h5_dir: null, classes: null, ...}

There is no top-level ``seed``: every ``cv.seeds`` entry is a seed (folds and initialisation). Only the section of
the chosen head is used; the others keep their defaults. The head sections are not listed here: each head's
module defines its section and registers it (:mod:`medcl.mil.heads.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import ClassVar, Literal

from medcl.core.errors import MedclConfigError
from medcl.mil.heads import config_sections, head_spec


@dataclass
class EncoderConfig:
    """Instance MLP ``Linear -> ReLU -> Dropout`` per entry of ``hidden`` (empty: features used as they are)."""

    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0

    def validate(self) -> None:
        if not 0 <= self.dropout < 1:
            raise MedclConfigError("encoder.dropout", "must be in [0, 1)")
        if any(h < 1 for h in self.hidden):
            raise MedclConfigError("encoder.hidden", "every width must be >= 1")


@dataclass
class MILOptimConfig:
    """AdamW and its learning-rate schedule (:mod:`medcl.engine.schedules`), per optimiser step.

    Attributes:
        lr, weight_decay: AdamW's.
        schedule: ``cosine`` (decay to 0 over the run), ``poly`` or ``constant``.
        lr_warmup_steps: linear learning-rate warm-up over the first steps (the same key in every job).
        grad_clip: gradient-norm clipping; ``null`` or 0 = off.
    """

    lr: float = 5.0e-4
    weight_decay: float = 1.0e-4
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    lr_warmup_steps: int = 0
    grad_clip: float | None = 5.0

    def validate(self) -> None:
        if not self.lr > 0:
            raise MedclConfigError("optim.lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise MedclConfigError("optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.lr_warmup_steps < 0:
            raise MedclConfigError("optim.lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise MedclConfigError("optim.grad_clip", f"must be >= 0 or null, got {self.grad_clip}")


@dataclass
class MILTrainConfig:
    """Epochs, batches, feature standardisation and augmentation of each fit.

    ``fast``: train from the fold's bags preloaded on the training device (one gather per batch; bit-identical to
    the streaming path) when they fit (``data.in_memory`` and at most ``data.max_memory_gb``); ``false`` always
    streams (collates every batch on the host), the reference path.

    ``pack_instances``: run the instance MLP (``encoder``) on the real instances of a batch only, not on its
    padding (:func:`medcl.mil.heads.base.packed_apply`; the same random draws, results equal to the padded
    computation up to float rounding); ``false``: every padded row, bit-identical to earlier medcl. Prediction
    always runs padded.

    ``stack_models``: cross-validation trains up to this many fits of a head (its seeds x folds, in that order)
    together as one stacked model (:mod:`medcl.mil.stacked`: one batched step for all, each model with its own
    initialisation, data, batch order and random stream); each equals its one-by-one fit up to float rounding.
    ``0`` (default) or ``1``: one by one, bit-identical to earlier medcl. Stacked fits always preload their bags
    (``train.fast`` does not apply); heads without a stacked forward, and bags that cannot be preloaded, train one
    by one whatever the value (logged). Memory grows with the value (every model's batch activations at once).
    """

    RENAMED: ClassVar[dict[str, str]] = {
        "lr": "renamed: the learning rate is optim.lr",
        "weight_decay": "renamed: the weight decay is optim.weight_decay",
        "scheduler": "renamed: the learning-rate schedule is optim.schedule (cosine | poly | constant; 'none' is "
                     "constant)",
        "grad_clip": "renamed: gradient clipping is optim.grad_clip",
        "device": "renamed: the device is the top-level key device (the same key in every job)",
        "threads": "renamed: the CPU threads are the top-level key threads (the same key in every job)",
    }

    epochs: int = 60
    batch_size: int = 16
    sampler: Literal["random", "balanced"] = "random"
    # feature standardisation fitted on the training fold: 'global' centres each feature and divides all by
    # one scale (the mean per-feature std), keeping the features' relative spreads; 'feature' z-scores each
    # feature, its std floored at std_floor x the mean std (sparse features would otherwise explode); 'none'
    standardize: Literal["global", "feature", "none"] = "global"
    std_floor: float = 0.1
    instance_keep: float = 1.0  # augmentation: fraction of each bag's instances kept in a training step
    fast: bool = True
    pack_instances: bool = True
    stack_models: int = 0


@dataclass
class CVConfig:
    folds: int = 10
    seeds: list[int] = field(default_factory=lambda: [0])
    imbalance: float | None = None
    positive_class: str | None = None  # class subsampled by 'imbalance' (default: the second class)
    final_model: bool = True


@dataclass
class BagDataConfig:
    h5_dir: str | None = None
    features_key: str = "features"
    coords_key: str = "coords"
    classes: list[str] | None = None  # label names in index order; default: sorted (numerically if numbers)
    in_memory: bool | None = None  # None: in memory when the features take less than max_memory_gb
    max_memory_gb: float = 4.0
    workers: int = 0


@dataclass
class MILConfigBase:
    """The sections every head shares; :data:`MILConfig` adds one section per registered head."""

    name: str | None = None
    head: str = "abmil"
    device: str = "auto"
    # CPU threads for torch during 'medcl mil train' (restored afterwards). 1 is fastest for classic MIL bags
    # and on a busy machine; raise it for large slide bags on an idle CPU; null leaves torch's default.
    threads: int | None = 1
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    optim: MILOptimConfig = field(default_factory=MILOptimConfig)
    train: MILTrainConfig = field(default_factory=MILTrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    data: BagDataConfig = field(default_factory=BagDataConfig)

    @property
    def label(self) -> str:
        return self.name or self.head

    def validate(self) -> None:
        head_spec(self.head, "head")
        checks = [
            ("train.epochs", self.train.epochs >= 1, "must be >= 1"),
            ("train.batch_size", self.train.batch_size >= 1, "must be >= 1"),
            ("train.stack_models", self.train.stack_models >= 0, "must be >= 0 (0: no stacking)"),
            ("threads", self.threads is None or self.threads >= 0, "must be >= 0 or null"),
            ("cv.folds", self.cv.folds >= 2, "must be >= 2"),
            ("cv.seeds", len(self.cv.seeds) >= 1, "needs at least one seed"),
            ("cv.imbalance", self.cv.imbalance is None or 0 < self.cv.imbalance < 1, "must be in (0, 1)"),
            ("train.instance_keep", 0 < self.train.instance_keep <= 1, "must be in (0, 1]"),
            ("data.max_memory_gb", self.data.max_memory_gb > 0, "must be > 0"),
        ]
        for key, ok, problem in checks:
            if not ok:
                raise MedclConfigError(key, problem)


def _assemble() -> type:
    """``MILConfig``: :class:`MILConfigBase` plus one field per config section of the registered heads."""
    sections = [(name, cls, field(default_factory=cls)) for name, cls in config_sections().items()]
    cls = make_dataclass("MILConfig", sections, bases=(MILConfigBase,))
    cls.__module__ = __name__
    cls.__doc__ = ("The ``medcl mil train`` config: the shared sections of :class:`MILConfigBase` and one section "
                   f"per registered head ({', '.join(name for name, _, _ in sections)}).")
    return cls


MILConfig = _assemble()
