"""The ``medcl finetune`` config schema (YAML in ``configs/finetune/``, validated by :mod:`medcl.config`).

Layout (every section optional; unknown keys fail before training with the dotted key named)::

    seed: 0
    threads: null              # torch CPU threads (null = default; 1 on a shared CPU)
    backbone: {...}            # medcl.models.BackboneConfig; ignored (except dropout) when --init gives one
    init:     {checkpoint, load: [encoder, bottleneck, decoder], require_encoder: true, adapt: mean}
    device: auto               # auto | cpu | cuda | cuda:N (--device)
    optim:    {mode: full|frozen|warmup, lr, encoder_lr, freeze_steps, lr_warmup_steps, optimizer, schedule,
               weight_decay}
    loss:     {dice_weight, ce_weight, include_background, batch_dice}
    mixup:    {alpha, prob}
    sampling: {patch_size, batch_size, class_ratios}
    augment:  {flip, rot90, affine_prob, rotate_deg, scale, intensity_prob, noise_prob, noise_std}
    data:     {plan, cache, cache_dir, ignore_label, num_classes}
    split:    {file, labelled, combination, validation}
    inference: {roi_size, overlap, sw_batch_size, mode, tta, mirror_axes}
    eval:     {nsd_tolerance_mm, save_predictions}
    converge: {enabled, min_steps, tail, tolerance, check_every}   # train until converged (max_steps = the cap)
    semi:     {enabled, mode: pseudo|mse, threshold, weight, rampup_steps, ema, ema_warmup, unlabelled_batch, cutmix_prob}
    trainer:  {max_steps, ckpt_every, ...}   # medcl.engine.trainer.TrainerConfig
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from medcl.core.errors import MedclConfigError
from medcl.engine.trainer import TrainerConfig, check_common
from medcl.models.backbone import BackboneConfig

STAGE_GROUPS = ("encoder", "bottleneck", "decoder", "head")


@dataclass
class InitConfig:
    """Where the weights come from.

    Attributes:
        checkpoint: a pretraining checkpoint (``RUN/checkpoints/last.ckpt``), a ``backbone.pt`` written by
            :func:`medcl.models.save_backbone`, or a run folder holding one; ``None`` = random init.
        load: stages copied from it (``encoder``, ``bottleneck``, ``decoder``; ``head`` only from a
            segmentation model with the same classes).
        require_encoder: refuse a checkpoint that leaves any encoder or bottleneck weight missing or
            mismatched (a wrong architecture would otherwise silently train from scratch).
        adapt: first-layer rule when the input channels differ (:func:`medcl.models.adapt_first_layer`).
        key_map: how to read a foreign checkpoint's keys: a registered key map (:mod:`medcl.models.keymaps`,
            e.g. ``monai-dynunet``), ``medcl`` for medcl's own names, ``None`` = the reading that matches most keys.
    """

    checkpoint: str | None = None
    load: list[str] = field(default_factory=lambda: ["encoder", "bottleneck", "decoder"])
    require_encoder: bool = True
    adapt: Literal["mean", "repeat"] = "mean"
    key_map: str | None = None

    def validate(self) -> None:
        bad = [s for s in self.load if s not in STAGE_GROUPS]
        if bad:
            raise MedclConfigError("init.load", f"unknown stage(s) {bad}; choose from {list(STAGE_GROUPS)}")
        if self.key_map not in (None, "medcl"):
            from medcl.models.keymaps import get_keymap

            get_keymap(self.key_map)


@dataclass
class FinetuneOptimConfig:
    """Optimiser, learning rates and which layers train.

    Attributes:
        mode: ``full`` (everything trains), ``frozen`` (encoder + bottleneck frozen, in eval mode), or
            ``warmup`` (frozen for ``freeze_steps`` steps, then trained with ``encoder_lr``).
        lr: learning rate of the decoder and head (and of the encoder in ``full`` mode unless
            ``encoder_lr`` is set).
        encoder_lr: learning rate of encoder + bottleneck once they train; ``None`` = ``lr``.
        freeze_steps: steps the encoder stays frozen in ``warmup`` mode (an error in the other modes).
        lr_warmup_steps: linear learning-rate warm-up at the start (the same key in every job).
        optimizer: ``adamw`` or ``sgd`` (Nesterov, ``momentum``; nnU-Net's choice).
        schedule: ``poly`` (``(1 - t / T) ** 0.9``, nnU-Net), ``cosine`` or ``constant``; the encoder's
            schedule runs on the same global step.
    """

    RENAMED: ClassVar[dict[str, str]] = {
        "warmup_steps": "renamed: the frozen-encoder phase of mode 'warmup' is optim.freeze_steps (a learning-rate "
                        "warm-up is optim.lr_warmup_steps)",
    }

    mode: Literal["full", "frozen", "warmup"] = "full"
    lr: float = 1e-3
    encoder_lr: float | None = None
    freeze_steps: int = 0
    lr_warmup_steps: int = 0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.99
    weight_decay: float = 1e-5
    schedule: Literal["poly", "cosine", "constant"] = "poly"

    def validate(self) -> None:
        if self.lr <= 0 or (self.encoder_lr is not None and self.encoder_lr < 0):
            raise MedclConfigError("optim.lr", f"learning rates must be positive, got lr={self.lr}, "
                                               f"encoder_lr={self.encoder_lr}")
        if self.freeze_steps < 0 or self.lr_warmup_steps < 0:
            raise MedclConfigError("optim.freeze_steps", "freeze_steps and lr_warmup_steps must be >= 0")
        if self.mode == "warmup" and self.freeze_steps == 0:
            raise MedclConfigError("optim.freeze_steps", "mode 'warmup' needs freeze_steps > 0")
        if self.mode != "warmup" and self.freeze_steps:
            raise MedclConfigError("optim.freeze_steps", f"only mode 'warmup' freezes the encoder for some steps; "
                                                         f"mode is '{self.mode}'")


@dataclass
class LossConfig:
    """Dice + cross-entropy (MONAI ``DiceLoss`` soft-label form + CE), nnU-Net defaults.

    Attributes:
        dice_weight, ce_weight: weights of the two terms.
        include_background: count the background class in the Dice term.
        batch_dice: one Dice over the whole batch per class (nnU-Net) instead of per sample.
    """

    dice_weight: float = 1.0
    ce_weight: float = 1.0
    include_background: bool = False
    batch_dice: bool = True


@dataclass
class MixupConfig:
    """Mixup (Zhang et al., 2018) of image patches and their one-hot labels, as Chaitanya et al. (2020) used
    for fine-tuning: ``x = l x_i + (1 - l) x_j``, ``y = l y_i + (1 - l) y_j``, ``l ~ Beta(alpha, alpha)``.

    Attributes:
        alpha: Beta parameter; ``0`` = off.
        prob: probability that a batch is mixed.
    """

    alpha: float = 0.0
    prob: float = 1.0

    def validate(self) -> None:
        if self.alpha < 0 or not 0.0 <= self.prob <= 1.0:
            raise MedclConfigError("mixup", f"need alpha >= 0 and prob in [0, 1], got {self.alpha}, {self.prob}")


@dataclass
class SamplingConfig:
    """Class-balanced patch sampling.

    Attributes:
        patch_size: training patch ``(X, Y, Z)`` in preprocessed voxels; multiples of the backbone stride.
        batch_size: patches per step.
        class_ratios: relative frequency of patch centres per class (background first); ``None`` = every
            class equally often (classes absent from a volume are skipped for that volume).
    """

    patch_size: tuple[int, int, int] = (32, 32, 32)
    batch_size: int = 2
    class_ratios: list[float] | None = None

    def validate(self) -> None:
        if min(self.patch_size) < 1 or self.batch_size < 1:
            raise MedclConfigError("sampling", f"patch_size and batch_size must be positive, got "
                                               f"{list(self.patch_size)}, {self.batch_size}")
        if self.class_ratios is not None and (not self.class_ratios or min(self.class_ratios) < 0
                                              or sum(self.class_ratios) <= 0):
            raise MedclConfigError("sampling.class_ratios", f"need non-negative weights with a positive sum, "
                                                            f"got {self.class_ratios}")


@dataclass
class StrongAugmentConfig:
    """Strong intensity augmentation (applied on the training device, batched; geometry is untouched, so a strong
    view stays voxel-aligned with its weak view). Each transform is applied to a patch with probability ``prob``.

    Attributes:
        prob: probability of each transform per patch.
        labelled: also apply it to the labelled patches (the fair supervised baseline of a semi-supervised
            comparison gets the same augmentation).
        gamma: range of the gamma exponent (on intensities rescaled to [0, 1] per patch, then rescaled back).
        brightness: multiplicative factor in ``1 +- brightness``.
        contrast: contrast change ``mean + (x - mean) * f``, ``f`` in ``1 +- contrast``.
        noise_std: additive Gaussian noise, standard deviation drawn in ``[0, noise_std]``.
        blur_sigma: Gaussian blur, sigma (voxels) drawn in this range.
    """

    prob: float = 0.5
    labelled: bool = False
    gamma: tuple[float, float] = (0.7, 1.5)
    brightness: float = 0.25
    contrast: float = 0.25
    noise_std: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.0)

    def validate(self) -> None:
        if not 0 <= self.prob <= 1:
            raise MedclConfigError("augment.strong.prob", f"must be in [0, 1], got {self.prob}")
        if not 0 < self.gamma[0] <= self.gamma[1] or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise MedclConfigError("augment.strong", "gamma and blur_sigma need 0 < low <= high")
        if not 0 <= self.brightness < 1 or not 0 <= self.contrast < 1 or self.noise_std < 0:
            raise MedclConfigError("augment.strong", "brightness and contrast in [0, 1), noise_std >= 0")


@dataclass
class SemiConfig:
    """Semi-supervised fine-tuning on the unlabelled pool (off by default): a mean teacher and a consistency
    loss between its prediction on a weak view and the student's on a strong view of unlabelled patches
    (:mod:`medcl.segment.semi`).

    Attributes:
        enabled: train with the unlabelled cases too (the split's pool minus validation volumes; never a test
            case; loaded without labels).
        mode: ``pseudo`` (default: FixMatch-style hard pseudo-labels of the teacher, cross-entropy on the voxels
            whose teacher confidence reaches ``threshold``) or ``mse`` (mean-teacher soft consistency: squared
            difference of the class probabilities, every voxel).
        threshold: confidence of a pseudo-labelled voxel (``pseudo``).
        weight: the consistency weight after the ramp-up.
        rampup_steps: sigmoid ramp-up of the weight, ``w(t) = weight * exp(-5 (1 - t / T)^2)`` (Laine & Aila,
            2017; Tarvainen & Valpola, 2017).
        ema: momentum of the mean teacher (evaluated and saved as the model).
        ema_warmup: the mean teacher's warm-up (Tarvainen & Valpola): update ``t`` uses ``min(1 - 1/(t+1), ema)``,
            so the teacher starts as the student and holds nothing of the initial weights after a short run;
            ``false`` = constant ``ema`` from the first step.
        unlabelled_batch: unlabelled patches per step.
        cutmix_prob: probability of pasting a box of a labelled patch (with its labels) into an unlabelled patch
            (copy-paste / CutMix, as bidirectional copy-paste, Bai et al., CVPR 2023); the box's target is the
            true label, the rest the teacher's.
        cutmix_size: side of the box as a fraction of the patch side.
    """

    enabled: bool = False
    mode: Literal["pseudo", "mse"] = "pseudo"
    threshold: float = 0.9
    weight: float = 1.0
    rampup_steps: int = 200
    ema: float = 0.99
    ema_warmup: bool = True
    unlabelled_batch: int = 2
    cutmix_prob: float = 0.5
    cutmix_size: float = 0.66

    def validate(self) -> None:
        if not 0 <= self.threshold < 1 or not 0 <= self.ema < 1 or not 0 <= self.cutmix_prob <= 1:
            raise MedclConfigError("semi", "threshold and ema in [0, 1), cutmix_prob in [0, 1]")
        if self.weight < 0 or self.rampup_steps < 0 or self.unlabelled_batch < 1 or not 0 < self.cutmix_size < 1:
            raise MedclConfigError("semi", "weight, rampup_steps >= 0, unlabelled_batch >= 1, cutmix_size in (0, 1)")


@dataclass
class PatchAugmentConfig:
    """Training augmentation (MONAI transforms), applied to each patch.

    Attributes:
        flip: random flips along each axis (p = 0.5 each).
        rot90: random 90-degree rotations in the (X, Y) plane (isotropic in-plane data only).
        affine_prob: probability of a random rotation (``rotate_deg``) and scaling (``1 +- scale``).
        intensity_prob: probability of a random intensity scaling (``1 +- 0.1``) and shift (``+- 0.1``).
        noise_prob, noise_std: additive Gaussian noise.
        strong: strong intensity augmentation (:class:`StrongAugmentConfig`): the student's view of unlabelled
            patches, and of the labelled ones with ``strong.labelled``.
    """

    flip: bool = True
    rot90: bool = False
    affine_prob: float = 0.2
    rotate_deg: float = 15.0
    scale: float = 0.1
    intensity_prob: float = 0.5
    noise_prob: float = 0.1
    noise_std: float = 0.05
    strong: StrongAugmentConfig = field(default_factory=StrongAugmentConfig)


@dataclass
class FinetuneDataConfig:
    """Dataset handling.

    Attributes:
        plan: keys of :class:`medcl.data.PreprocessingPlan` overriding the base plan (the pretraining
            checkpoint's plan with ``--init``, else the dataset's default plan), e.g. ``{spacing: [1, 1, 1]}``.
        cache: ``ram`` (default), ``disk`` or ``none`` (see :class:`medcl.data.CaseDataset`).
        cache_dir: folder of the disk cache.
        ignore_label: label value excluded from the loss (sparse annotations, nnU-Net style); ``None`` = the
            value named ``ignore`` in the dataset's labels, if any.
        num_classes: classes including background; ``None`` = from the dataset's declared labels.
    """

    plan: dict[str, Any] | None = None
    cache: Literal["ram", "disk", "none"] = "ram"
    cache_dir: str | None = None
    ignore_label: int | None = None
    num_classes: int | None = None


@dataclass
class SplitConfig:
    """Which cases train, validate and test.

    Attributes:
        file: a label-budget split (:mod:`medcl.data.splits`); test cases are its test set.
        labelled: ``N``, the budget to use (``--labelled``); with no file, ``N`` labelled cases are drawn
            with the seed and there is no test set.
        combination: which of the split's combinations of ``N``.
        validation: how many of the ``N`` labelled volumes are held out for validation (counted *inside*
            the label budget, reported as such); 0 = none (the default: fixed schedule, last checkpoint).
    """

    file: str | None = None
    labelled: int | None = None
    combination: int = 0
    validation: int = 0

    def validate(self) -> None:
        if self.labelled is not None and self.labelled < 1:
            raise MedclConfigError("split.labelled", f"must be >= 1, got {self.labelled}")
        if self.validation < 0 or self.combination < 0:
            raise MedclConfigError("split", "validation and combination must be >= 0")


@dataclass
class InferenceConfig:
    """Sliding-window inference (MONAI ``sliding_window_inference``).

    Attributes:
        roi_size: window size; ``None`` = the training patch size.
        overlap: fraction of overlap between windows.
        sw_batch_size: windows per forward pass.
        mode: ``gaussian`` (windows weighted towards their centre, nnU-Net) or ``constant``.
        tta: mirror test-time augmentation: average the probabilities over every flip of ``mirror_axes``.
        mirror_axes: spatial axes (0, 1, 2) flipped by ``tta``.
    """

    roi_size: tuple[int, int, int] | None = None
    overlap: float = 0.5
    sw_batch_size: int = 4
    mode: Literal["gaussian", "constant"] = "gaussian"
    tta: bool = False
    mirror_axes: list[int] = field(default_factory=lambda: [0, 1, 2])

    def validate(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise MedclConfigError("inference.overlap", f"must be in [0, 1), got {self.overlap}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise MedclConfigError("inference.mirror_axes", f"spatial axes are 0, 1, 2; got {self.mirror_axes}")


@dataclass
class EvalConfig:
    """Test metrics.

    Attributes:
        nsd_tolerance_mm: tolerance of the normalised surface distance (Nikolov et al., 2021), in mm.
        save_predictions: write each test case's prediction (original geometry) to ``OUT/predictions/``.
    """

    nsd_tolerance_mm: float = 1.0
    save_predictions: bool = False


@dataclass
class ConvergeConfig:
    """Train until converged instead of a fixed number of steps (:mod:`medcl.engine.convergence`).

    Attributes:
        enabled: stop when the window means of the training loss improve by less than ``tolerance`` over the last
            ``tail`` of the steps (checked every ``check_every`` steps from ``min_steps`` on); ``trainer.max_steps``
            is the cap and the learning-rate schedule runs over it.
    """

    enabled: bool = False
    min_steps: int = 1000
    tail: float = 0.2
    tolerance: float = 0.01
    check_every: int = 50

    def validate(self) -> None:
        if not 0 < self.tail <= 0.5:
            raise MedclConfigError("converge.tail", f"must be in (0, 0.5], got {self.tail}")
        if self.min_steps < 1 or self.check_every < 1 or self.tolerance < 0:
            raise MedclConfigError("converge", "min_steps and check_every must be >= 1, tolerance >= 0")


def _default_trainer() -> TrainerConfig:
    return TrainerConfig(max_steps=250, ckpt_every=50, keep_checkpoints=1, log_every=10, num_workers=0)


@dataclass
class FinetuneConfig:
    """The whole fine-tuning config (see the module docstring).

    ``threads``: CPU threads for torch during the run (``None`` = torch's default). On a CPU shared with
    other jobs, 1 thread per process is often several times faster than the default (OpenMP threads wait
    for each other whenever one is descheduled).
    """

    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(filters=(16, 32, 64, 128)))
    init: InitConfig = field(default_factory=InitConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: PatchAugmentConfig = field(default_factory=PatchAugmentConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    converge: ConvergeConfig = field(default_factory=ConvergeConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    trainer: TrainerConfig = field(default_factory=_default_trainer)

    @property
    def roi_size(self) -> tuple[int, int, int]:
        return tuple(self.inference.roi_size or self.sampling.patch_size)  # type: ignore[return-value]

    def validate(self) -> None:
        check_common(self)
