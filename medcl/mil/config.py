"""The ``medcl mil train`` config schema (YAML in :mod:`configs/mil`, validated by :mod:`medcl.config`).

One file describes one head; ``medcl mil train --config a.yaml b.yaml`` compares several on the same folds.
Unknown keys fail before training with the dotted key named. Layout::

    name: abmil                  # the head's label in results.csv / results.md (default: the head kind)
    head: abmil                  # meanpool | maxpool | abmil | gated_abmil | transmil | dsmil | clam_sb | ins | scmil
    encoder: {hidden: [256, 128], dropout: 0.25}   # instance MLP in front of every head
    abmil: {...}  transmil: {...}  dsmil: {...}  clam: {...}  ins: {...}  scmil: {...}   # head sections
    train: {epochs: 60, batch_size: 16, lr: 5.0e-4, ...}
    cv: {folds: 10, seeds: [0, 1, 2, 3, 4], imbalance: null, ...}
    data: {h5_dir: null, classes: null, ...}

Only the section of the chosen head is used; the others keep their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medcl.core.errors import MedclConfigError

HeadKind = Literal["meanpool", "maxpool", "abmil", "gated_abmil", "transmil", "dsmil", "clam_sb", "ins", "scmil"]


@dataclass
class EncoderConfig:
    """Instance MLP ``Linear -> ReLU -> Dropout`` per entry of ``hidden`` (empty: features used as they are)."""

    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


@dataclass
class ABMILConfig:
    attention_dim: int = 128
    gated: bool = False
    dropout: float = 0.0  # on the attention branch


@dataclass
class TransMILConfig:
    dim: int = 256
    heads: int = 8
    layers: int = 2
    landmarks: int = 128
    pinv_iterations: int = 6
    dropout: float = 0.1


@dataclass
class DSMILConfig:
    query_dim: int = 128
    value_dropout: float = 0.0
    instance_weight: float = 0.5  # weight of the max-instance CE; the bag CE gets 1 - instance_weight


@dataclass
class CLAMConfig:
    attention_dim: int = 128
    dropout: float = 0.25
    k: int = 8
    instance_loss: bool = True
    bag_weight: float = 0.7
    subtyping: bool = False


@dataclass
class INSConfig:
    proj_dim: int = 64
    queue_size: int = 4096  # capped at the number of training instances (see medcl.mil.ins)
    momentum: float = 0.99  # momentum encoder
    proto_momentum: float = 0.99
    conf_momentum: tuple[float, float] = (0.95, 0.8)  # pseudo-label EMA, linear from first to last epoch
    temperature: float = 0.1
    negative_class: int | None = 0  # class of bags that hold only negative instances (None: no such class)
    warmup: float = 0.1  # fraction of training before pseudo-labels start moving
    instance_weight: float = 1.0
    contrastive_weight: float = 0.5
    bag_weight: float = 1.0
    feature_dropout: float = 0.1
    noise: float = 0.1
    keep: float = 0.8  # instance subsampling: fraction of a bag's instances kept in a training step


@dataclass
class SCMILConfig:
    base: Literal["meanpool", "maxpool", "abmil", "gated_abmil", "transmil", "dsmil", "clam_sb"] = "abmil"
    proj_dim: int = 64
    temperature: float = 0.1
    schedule: Literal["parabolic", "linear", "cosine", "step"] = "parabolic"
    switch: float = 0.5  # 'step' schedule: fraction of training spent on the contrastive loss alone
    keep: tuple[float, float] = (0.5, 0.9)  # range of the fraction of instances kept in each view


@dataclass
class TrainConfig:
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
class DataConfig:
    h5_dir: str | None = None
    features_key: str = "features"
    coords_key: str = "coords"
    classes: list[str] | None = None  # label names in index order; default: sorted (numerically if numbers)
    in_memory: bool | None = None  # None: in memory when the features take less than max_memory_gb
    max_memory_gb: float = 4.0
    workers: int = 0


@dataclass
class MILConfig:
    name: str | None = None
    head: HeadKind = "abmil"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    abmil: ABMILConfig = field(default_factory=ABMILConfig)
    transmil: TransMILConfig = field(default_factory=TransMILConfig)
    dsmil: DSMILConfig = field(default_factory=DSMILConfig)
    clam: CLAMConfig = field(default_factory=CLAMConfig)
    ins: INSConfig = field(default_factory=INSConfig)
    scmil: SCMILConfig = field(default_factory=SCMILConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def label(self) -> str:
        return self.name or self.head

    def validate(self) -> None:
        checks = [
            ("train.epochs", self.train.epochs >= 1, "must be >= 1"),
            ("train.batch_size", self.train.batch_size >= 1, "must be >= 1"),
            ("train.lr", self.train.lr > 0, "must be > 0"),
            ("cv.folds", self.cv.folds >= 2, "must be >= 2"),
            ("cv.seeds", len(self.cv.seeds) >= 1, "needs at least one seed"),
            ("cv.imbalance", self.cv.imbalance is None or 0 < self.cv.imbalance < 1, "must be in (0, 1)"),
            ("encoder.dropout", 0 <= self.encoder.dropout < 1, "must be in [0, 1)"),
            ("transmil.dim", self.transmil.dim % self.transmil.heads == 0, "must be divisible by transmil.heads"),
            ("transmil.landmarks", self.transmil.landmarks >= 1, "must be >= 1"),
            ("clam.k", self.clam.k >= 1, "must be >= 1"),
            ("clam.bag_weight", 0 <= self.clam.bag_weight <= 1, "must be in [0, 1]"),
            ("dsmil.instance_weight", 0 <= self.dsmil.instance_weight <= 1, "must be in [0, 1]"),
            ("ins.keep", 0 < self.ins.keep <= 1, "must be in (0, 1]"),
            ("train.instance_keep", 0 < self.train.instance_keep <= 1, "must be in (0, 1]"),
            ("ins.queue_size", self.ins.queue_size >= 1, "must be >= 1"),
            ("scmil.keep", 0 < self.scmil.keep[0] <= self.scmil.keep[1] <= 1, "must be 0 < low <= high <= 1"),
            ("scmil.switch", 0 <= self.scmil.switch <= 1, "must be in [0, 1]"),
            ("data.max_memory_gb", self.data.max_memory_gb > 0, "must be > 0"),
        ]
        for key, ok, problem in checks:
            if not ok:
                raise MedclConfigError(key, problem)
        if any(h < 1 for h in self.encoder.hidden):
            raise MedclConfigError("encoder.hidden", "every width must be >= 1")
