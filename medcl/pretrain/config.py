"""The pretraining config: one typed schema, YAML in, validated before anything runs.

A method is *views + heads + weighted loss terms* (DESIGN.md): ``views`` names the view samplers a
step draws from each volume, ``terms`` the losses computed on them (each with its head and weight), and
``phases`` which terms are active over which part of the run and which stages are frozen then. The
named methods (``gr``, ``gd``, ``gd-``, ``local``, ``gd+local``, ``voco``, ``structural``,
``anatomical``) are YAML files in ``configs/pretrain/``; a weighted combination is a config that lists
several terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from medcl.core.errors import MedclConfigError
from medcl.data.plan import PreprocessingPlan
from medcl.engine.trainer import TrainerConfig, check_common
from medcl.models.backbone import BackboneConfig

ViewKind = Literal["random", "partition", "position", "pair"]
TermKind = Literal["contrastive", "local", "voco", "reconstruction"]


@dataclass
class ViewAugmentConfig:
    """Spatial and intensity augmentation of views.

    Attributes:
        flip_prob: probability of flipping each view axis.
        rot90_prob: probability of a 90-degree rotation (only in planes whose spacing is equal).
        scale_prob: probability of scaling a view.
        scale_range: ``(low, high)`` isotropic extent multiplier of the crop before resampling.
        intensity: intensity augmentation (smoothing, contrast, scale/shift, noise; MONAI's parameters).
    """

    flip_prob: float = 0.5
    rot90_prob: float = 0.0
    scale_prob: float = 0.5
    scale_range: tuple[float, float] = (0.85, 1.15)
    intensity: bool = True


@dataclass
class ViewConfig:
    """One view sampler (section ``views.NAME``).

    Attributes:
        kind: ``random`` (G^R: two crops per volume), ``partition`` (G^D / G^D-: one crop per partition,
            ``copies`` augmented copies), ``position`` (VoCo: base-crop grid + random crops with overlap
            targets) or ``pair`` (cross-volume positives: a crop of volume A and its match in volume B).
        crop: view size ``(D, H, W)``.
        unit: ``voxel`` or ``mm`` (crop extent in millimetres, resampled to the preprocessed spacing).
        copies: augmented copies per crop (``partition``, ``pair``: 2 gives the local loss its pairs).
        partitions: number of partitions S (``partition``).
        partition_axis: ``SI`` (patient superior-inferior, default), ``LR``, ``AP``, or ``grid`` with
            ``partition_grid``.
        partition_grid: partitions per axis for ``grid`` (e.g. ``[2, 2, 2]``).
        grid: VoCo base-crop grid ``(n, n, k)``.
        n_random: VoCo random crops per volume.
        matcher: ``normalised`` (same normalised position in B), ``ssim`` (SSIM-refined, structural
            positives) or ``feature`` (anatomical: candidates in B matched by the EMA encoder in the step).
        ssim_threshold: minimum SSIM for an accepted structural match.
        candidates: crops of volume B searched around the normalised position (``ssim``, ``feature``).
        search_mm: half-width of the search region in millimetres.
        feature_threshold: minimum teacher cosine similarity of an accepted feature match.
        feature_margin: minimum lead of the best candidate over the runner-up (feature matching).
        feature_warmup: fraction of the run using the geometric proposal before feature matching starts.
        crops_per_volume: anchor crops of volume A per step (``pair``).
        fg_prob: probability of centring a random crop inside the foreground box.
        augment: spatial and intensity augmentation.
        mask_ratio: fraction of voxels masked for reconstruction (0 = no masking).
        mask_block: masking block edge in voxels.
    """

    kind: ViewKind = "partition"
    crop: tuple[int, int, int] = (32, 32, 32)
    unit: Literal["voxel", "mm"] = "voxel"
    copies: int = 2
    partitions: int = 4
    partition_axis: Literal["SI", "LR", "AP", "grid"] = "SI"
    partition_grid: tuple[int, int, int] = (2, 2, 2)
    grid: tuple[int, int, int] = (2, 2, 2)
    n_random: int = 4
    matcher: Literal["normalised", "ssim", "feature"] = "normalised"
    ssim_threshold: float = 0.5
    candidates: int = 8
    search_mm: float = 8.0
    feature_threshold: float = 0.5
    feature_margin: float = 0.0
    feature_warmup: float = 0.2
    crops_per_volume: int = 2
    fg_prob: float = 0.9
    augment: ViewAugmentConfig = field(default_factory=ViewAugmentConfig)
    mask_ratio: float = 0.0
    mask_block: int = 8

    def validate(self) -> None:
        if any(c < 4 for c in self.crop):
            raise MedclConfigError("views.crop", f"crop edges must be >= 4, got {list(self.crop)}")
        if self.copies < 1 or self.partitions < 1 or self.n_random < 1 or self.candidates < 1:
            raise MedclConfigError("views", "copies, partitions, n_random and candidates must be >= 1")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise MedclConfigError("views.mask_ratio", f"must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.fg_prob <= 1.0:
            raise MedclConfigError("views.fg_prob", f"must be in [0, 1], got {self.fg_prob}")


@dataclass
class TermConfig:
    """One weighted loss term (section ``terms.NAME``).

    Attributes:
        kind: ``contrastive`` (global InfoNCE on pooled embeddings), ``local`` (dense InfoNCE on a
            decoder stage), ``voco`` (position prediction) or ``reconstruction`` (masked voxels).
        views: which ``views`` entry feeds the term.
        weight: weight in the total loss.
        stage: backbone stage the head reads (``bottleneck``, ``encoder.2``, ``decoder.1``, ...;
            ``decoder.last`` is the full-resolution decoder stage, e.g. for ``reconstruction``).
        strategy: positives of a ``contrastive`` term: ``gr``, ``gd``, ``gd-`` (Chaitanya et al.),
            ``match`` (mined cross-volume positives of ``pair`` views; augmented copies too).
        temperature: InfoNCE temperature.
        mode: InfoNCE denominator: ``per_pair``, ``supcon`` or ``dcl``.
        proj_dim, hidden_dim: projection head sizes.
        pool: how a ``contrastive`` / ``voco`` head reads its stage: ``flatten`` (default: instance
            normalisation makes spatial means nearly input-independent) or ``avg`` (spatial mean; for VoCo
            the multi-scale pooling of the released code over every encoder stage and the bottleneck).
        queue: size of a key queue (0 = none; needs ``ema.momentum > 0``: keys come from the teacher).
        mochi: MoCHi synthetic hard negatives per anchor (0 = none).
        points: sampled points per view pair (``local``).
        radius_mm: negatives farther than this (``local``; 0 = one feature voxel).
        cross_volume: ``local`` between volumes of the same partition by normalised position
            (Chaitanya et al.'s domain-specific local variant) instead of between copies of one crop.
        form: VoCo loss form: ``code`` (released code, with teacher when EMA is on) or ``paper``.
        reg_weight: VoCo base-crop regulariser weight.
        loss: reconstruction loss ``l1`` or ``l2``.
        target_norm: reconstruction target: ``none`` (intensities) or ``block`` (each masking block normalised to
            zero mean and unit variance, MAE's normalised-pixel target; the view must be tiled by the blocks).
    """

    kind: TermKind = "contrastive"
    views: str = ""
    weight: float = 1.0
    stage: str = "bottleneck"
    strategy: Literal["gr", "gd", "gd-", "match"] = "gd"
    temperature: float = 0.1
    mode: Literal["per_pair", "supcon", "dcl"] = "per_pair"
    proj_dim: int = 128
    hidden_dim: int = 256
    pool: Literal["flatten", "avg"] = "flatten"
    queue: int = 0
    mochi: int = 0
    points: int = 64
    radius_mm: float = 0.0
    cross_volume: bool = False
    form: Literal["code", "paper"] = "code"
    reg_weight: float = 1.0
    loss: Literal["l1", "l2"] = "l1"
    target_norm: Literal["none", "block"] = "none"

    def validate(self) -> None:
        if self.temperature <= 0:
            raise MedclConfigError("terms.temperature", f"must be > 0, got {self.temperature}")
        if self.weight < 0:
            raise MedclConfigError("terms.weight", f"must be >= 0, got {self.weight}")
        if self.points < 2 and self.kind == "local":
            raise MedclConfigError("terms.points", "the local loss needs at least 2 points per pair")


@dataclass
class PhaseConfig:
    """A part of the run (``phases`` list, in order).

    Attributes:
        until: end of the phase as a fraction of ``trainer.max_steps`` (the last phase ends at 1.0).
        terms: names of the terms active in the phase (empty = all).
        frozen: stage prefixes frozen in the phase (``encoder``, ``bottleneck``, ``decoder``, ``encoder.0``).
    """

    until: float = 1.0
    terms: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)


@dataclass
class PretrainOptimConfig:
    """AdamW with a linear learning-rate warm-up over ``lr_warmup_steps``, then cosine decay to ``min_lr_ratio * lr``
    (:mod:`medcl.engine.schedules`)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "warmup_steps": "renamed: the learning-rate warm-up is optim.lr_warmup_steps (the same key in every job)"}

    lr: float = 1e-3
    weight_decay: float = 1e-5
    lr_warmup_steps: int = 20
    min_lr_ratio: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)

    def validate(self) -> None:
        if not self.lr > 0:
            raise MedclConfigError("optim.lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.lr_warmup_steps < 0:
            raise MedclConfigError("optim", "weight_decay and lr_warmup_steps must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise MedclConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not all(0 <= b < 1 for b in self.betas):
            raise MedclConfigError("optim.betas", f"must be in [0, 1), got {list(self.betas)}")


@dataclass
class EMAConfig:
    """EMA teacher: ``momentum`` 0 disables it; ``final_momentum`` set -> cosine schedule to it."""

    momentum: float = 0.0
    final_momentum: float | None = None

    def validate(self) -> None:
        for key, v in (("ema.momentum", self.momentum), ("ema.final_momentum", self.final_momentum)):
            if v is not None and not 0 <= v < 1:
                raise MedclConfigError(key, f"must be in [0, 1), got {v}")


@dataclass
class PretrainDataConfig:
    """What the stream of volumes looks like.

    Attributes:
        plan: the preprocessing plan (orientation, spacing, intensity, crop to foreground).
        cache: ``ram``, ``disk`` or ``none`` (decoded, preprocessed volumes).
        cache_dir: disk-cache folder (default: medcl's user cache).
        volumes_per_step: volumes per optimiser step and process.
        probe_volumes: volumes held back from training for the label-free probes.
        render: where views are rendered: ``device`` (default: workers ship the drawn plan and the sub-boxes of
            the volumes it reads; the batch is rendered on the training device after the transfer) or ``worker``
            (rendered in the data workers; the reference path). The draws are the same; on the CPU the views are
            bit-identical, on a GPU equal up to float rounding.
    """

    plan: PreprocessingPlan = field(default_factory=PreprocessingPlan)
    cache: Literal["ram", "disk", "none"] = "ram"
    cache_dir: str | None = None
    volumes_per_step: int = 4
    probe_volumes: int = 4
    render: Literal["device", "worker"] = "device"

    def validate(self) -> None:
        if self.volumes_per_step < 1:
            raise MedclConfigError("data.volumes_per_step", "must be >= 1")
        if self.probe_volumes < 0:
            raise MedclConfigError("data.probe_volumes", "must be >= 0")


@dataclass
class MonitorConfig:
    """Label-free monitoring: embedding statistics every log step, probes every ``probe_every`` steps."""

    probe_every: int = 50
    probe_crop: tuple[int, int, int] = (32, 32, 32)
    probe_partitions: int = 4
    probe_crops_per_partition: int = 4
    knn_k: int = 5


@dataclass
class PretrainConfig:
    """The whole pretraining config (``configs/pretrain/*.yaml``)."""

    method: str = "custom"
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    views: dict[str, ViewConfig] = field(default_factory=dict)
    terms: dict[str, TermConfig] = field(default_factory=dict)
    phases: list[PhaseConfig] = field(default_factory=list)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> None:
        check_common(self)
        if not self.terms:
            raise MedclConfigError("terms", "a pretraining method needs at least one loss term")
        for name, term in self.terms.items():
            if term.views not in self.views:
                raise MedclConfigError(
                    f"terms.{name}.views", f"unknown view sampler {term.views!r} (defined: {sorted(self.views)})"
                )
            view = self.views[term.views]
            need = {"voco": "position", "reconstruction": None, "local": None, "contrastive": None}[term.kind]
            if need and view.kind != need:
                raise MedclConfigError(f"terms.{name}.views", f"a {term.kind} term needs '{need}' views, got '{view.kind}'")
            if term.kind == "local" and view.copies < 2 and not term.cross_volume:
                raise MedclConfigError(f"views.{term.views}.copies", "the local loss pairs copies of a crop: need copies >= 2")
            if term.kind == "local" and term.cross_volume and view.kind != "partition":
                raise MedclConfigError(f"terms.{name}.cross_volume", "cross-volume local needs 'partition' views")
            if term.kind == "reconstruction" and view.mask_ratio <= 0:
                raise MedclConfigError(f"views.{term.views}.mask_ratio", "a reconstruction term needs masked views")
            if term.kind == "contrastive" and term.strategy == "match" and view.kind != "pair":
                raise MedclConfigError(f"terms.{name}.strategy", "'match' positives need 'pair' views")
            if term.kind == "contrastive" and term.strategy in ("gd", "gd-") and view.kind != "partition":
                raise MedclConfigError(f"terms.{name}.strategy", f"'{term.strategy}' needs 'partition' views")
            if term.queue and self.ema.momentum <= 0:
                raise MedclConfigError(f"terms.{name}.queue", "a key queue needs the EMA teacher (ema.momentum > 0)")
            if view.matcher == "feature" and view.kind == "pair" and self.ema.momentum <= 0:
                raise MedclConfigError(f"views.{term.views}.matcher", "feature matching needs the EMA teacher")
        last = 0.0
        for i, ph in enumerate(self.phases):
            if not last < ph.until <= 1.0:
                raise MedclConfigError(f"phases[{i}].until", "phases must end in increasing order within (0, 1]")
            last = ph.until
            for t in ph.terms:
                if t not in self.terms:
                    raise MedclConfigError(f"phases[{i}].terms", f"unknown term {t!r} (defined: {sorted(self.terms)})")
        if self.phases and last != 1.0:
            raise MedclConfigError("phases", "the last phase must end at until: 1.0")
        if self.backbone.out_channels:
            raise MedclConfigError("backbone.out_channels", "pretraining builds no segmentation head: leave it empty")
