"""The ``medcl mil train`` config schema (YAML in :mod:`configs/mil`, validated by :mod:`medcl.config`).

One file describes one head; ``medcl mil train --config a.yaml b.yaml`` compares several on the same folds.
Unknown keys fail before training with the dotted key named. Layout::

    name: abmil                  # the head's label in results.csv / results.md (default: the head kind)
    head: abmil                  # a registered head (medcl.mil.heads.head_names())
    encoder: {hidden: [256, 128], dropout: 0.25}   # instance MLP in front of every head
    abmil: {...}  transmil: {...}  dsmil: {...}  clam: {...}  ins: {...}  scmil: {...}   # head sections
    train: {epochs: 60, batch_size: 16, lr: 5.0e-4, ...}
    cv: {folds: 10, seeds: [0, 1, 2, 3, 4], imbalance: null, ...}
    data: {h5_dir: null, classes: null, ...}

Only the section of the chosen head is used; the others keep their defaults. The head sections are not listed
here: each head's module defines its section and registers it (:mod:`medcl.mil.heads.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Literal

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
class MILTrainConfig:
    epochs: int = 60
    batch_size: int = 16
    lr: float = 5.0e-4
    weight_decay: float = 1.0e-4
    scheduler: Literal["none", "cosine"] = "cosine"
    sampler: Literal["random", "balanced"] = "random"
    # feature standardisation fitted on the training fold: 'global' centres each feature and divides all by
    # one scale (the mean per-feature std), keeping the features' relative spreads; 'feature' z-scores each
    # feature, its std floored at std_floor x the mean std (sparse features would otherwise explode); 'none'
    standardize: Literal["global", "feature", "none"] = "global"
    std_floor: float = 0.1
    instance_keep: float = 1.0  # augmentation: fraction of each bag's instances kept in a training step
    grad_clip: float | None = 5.0
    device: str = "auto"
    # CPU threads for torch during 'medcl mil train' (restored afterwards). 1 is fastest for classic MIL bags
    # and on a busy machine; raise it for large slide bags on an idle CPU; null leaves torch's default.
    threads: int | None = 1


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
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
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
            ("train.lr", self.train.lr > 0, "must be > 0"),
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
