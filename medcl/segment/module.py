"""The fine-tuning LightningModule: a backbone with a segmentation head, Dice + CE, three training modes.

Modes (``optim.mode``):

* ``full`` -- every stage trains (encoder + bottleneck at ``encoder_lr``, default ``lr``);
* ``frozen`` -- encoder + bottleneck are frozen and kept in eval mode (a linear-probe-like transfer test);
* ``warmup`` -- frozen for ``freeze_steps`` steps so the new decoder/head adapt first, then released with
  their own learning rate ``encoder_lr`` (a common remedy for pretrained features being destroyed by the
  large early gradients of a random head).

The optimiser has two parameter groups, ``encoder`` (encoder + bottleneck) and ``decoder`` (decoder +
head), each scheduled on the global step, so a resumed run continues the same schedule. The run record
(:class:`medcl.core.record.RunRecord`, plain dict) is written into every checkpoint as
``checkpoint["medcl_record"]``, with the backbone config as ``checkpoint["backbone_config"]``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch

from medcl.config import to_dict
from medcl.engine.schedules import lr_schedule, make_lr_scheduler
from medcl.engine.seeding import sample_seed
from medcl.models import Backbone, EMATeacher
from medcl.segment.config import FinetuneConfig
from medcl.segment.loss import MaskedDiceCELoss, mixup, one_hot_with_ignore
from medcl.segment.semi import consistency_loss, paste_boxes, rampup, strong_intensity

ENCODER_STAGES = ("encoder", "bottleneck")


class SegmentationModule(L.LightningModule):
    """Trains ``backbone`` (a :class:`medcl.models.Backbone` with a head of ``num_classes``).

    Args:
        backbone: the network; its logits are ``[B, K, *P]`` for a ``[B, C, *P]`` patch.
        cfg: the fine-tuning config (optim, loss, mixup, trainer sections are used).
        num_classes: ``K`` including background.
        ignore_label: label value excluded from the loss, or ``None``.
        record: the run record (plain dict) stored in every checkpoint.
        channels_last: use the channels-last-3d memory format (faster convolutions on CPU and GPU).

    Batch: ``{"image": [B, C, *P] float32, "label": [B, 1, *P] int64}``.
    """

    def __init__(self, backbone: Backbone, cfg: FinetuneConfig, num_classes: int, ignore_label: int | None,
                 record: dict[str, Any], channels_last: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg, self.k, self.ignore_label = cfg, int(num_classes), ignore_label
        self.record = record
        self.channels_last = channels_last
        lc = cfg.loss
        self.loss_fn = MaskedDiceCELoss(include_background=lc.include_background, batch_dice=lc.batch_dice,
                                        dice_weight=lc.dice_weight, ce_weight=lc.ce_weight)
        self._encoder_frozen: bool | None = None
        self.teacher: EMATeacher | None = EMATeacher(backbone, momentum=cfg.semi.ema,
                                                         warmup=cfg.semi.ema_warmup) if cfg.semi.enabled else None

    # ---- which layers train -------------------------------------------------------------------------
    def encoder_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.backbone.named_parameters() if n.split(".")[0] in ENCODER_STAGES]

    def decoder_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.backbone.named_parameters() if n.split(".")[0] not in ENCODER_STAGES]

    def encoder_frozen_at(self, step: int) -> bool:
        mode = self.cfg.optim.mode
        return mode == "frozen" or (mode == "warmup" and step < self.cfg.optim.freeze_steps)

    def _apply_freeze(self, frozen: bool) -> None:
        if frozen != self._encoder_frozen:
            for p in self.encoder_parameters():
                p.requires_grad_(not frozen)
            self._encoder_frozen = frozen
        if frozen:  # Lightning puts the model in train mode each epoch: keep the frozen stages in eval
            for name in ENCODER_STAGES:
                getattr(self.backbone, name).eval()

    def on_fit_start(self) -> None:
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last_3d)
        self._apply_freeze(self.encoder_frozen_at(self.global_step))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._apply_freeze(self.encoder_frozen_at(self.global_step))

    # ---- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg.optim
        enc_lr = o.lr if o.encoder_lr is None else o.encoder_lr
        groups = [{"params": self.decoder_parameters(), "lr": o.lr, "name": "decoder"}]
        if o.mode != "frozen":
            groups.append({"params": self.encoder_parameters(), "lr": enc_lr, "name": "encoder"})
        if o.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        dec = lr_schedule(self.cfg.trainer.max_steps, o.schedule, warmup=o.lr_warmup_steps)

        def enc(step: int) -> float:
            return 0.0 if self.encoder_frozen_at(step) else dec(step)

        sched = make_lr_scheduler(opt, [dec] + ([enc] if o.mode != "frozen" else []))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ---- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        g = torch.Generator().manual_seed(sample_seed(self.cfg.seed, 0, int(self.global_step), "strong"))
        if self.cfg.augment.strong.labelled:
            x = strong_intensity(x, self.cfg.augment.strong, g)
        target, valid = one_hot_with_ignore(y, self.k, self.ignore_label)
        m = self.cfg.mixup
        if m.alpha > 0 and x.shape[0] > 1:
            rng = np.random.default_rng(sample_seed(self.cfg.seed, 0, int(self.global_step), "mixup"))
            if rng.random() < m.prob:
                x, target, valid = mixup(x, target, valid, rng, m.alpha)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        logits = self.backbone(x).logits
        loss, dice, ce = self.loss_fn(logits, target, valid)
        bs = x.shape[0]
        if self.teacher is not None:
            cons, frac, w = self._consistency(batch, x, target, g)
            self.log("semi/consistency", cons.detach(), batch_size=bs)
            self.log("semi/mask_fraction", frac, batch_size=bs)
            self.log("semi/weight", w, batch_size=bs)
            loss = loss + w * cons
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/dice_loss", dice, batch_size=bs)
        self.log("train/ce", ce, batch_size=bs)
        return loss

    def _consistency(self, batch: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor,
                     g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The semi-supervised term (:mod:`medcl.segment.semi`): teacher on weak views, student on strong
        (mixed) views of the unlabelled patches; returns (loss, fraction of voxels used, current weight)."""
        s = self.cfg.semi
        u = batch["u_image"].flatten(0, 1)  # [B * per_sample, C, *P]
        if self.channels_last:
            u = u.contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            probs = torch.softmax(self.teacher.module(u).logits.float(), dim=1)
        strong = strong_intensity(u, self.cfg.augment.strong, g)
        strong, box, box_target = paste_boxes(strong, x, target, s.cutmix_prob, s.cutmix_size, g)
        student = self.backbone(strong).logits
        cons, frac = consistency_loss(student, probs, s.mode, s.threshold, box, box_target)
        return cons, frac, s.weight * rampup(int(self.global_step), s.rampup_steps)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimiser step, then the mean teacher (before checkpoint callbacks run: a checkpoint of this step
        holds this step's teacher)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.teacher is not None:
            self.teacher.update(self.backbone)

    def evaluation_network(self) -> Backbone:
        """What is evaluated and saved: the mean teacher when semi-supervised, else the trained network."""
        return self.teacher.module if self.teacher is not None else self.backbone

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the checkpoint's own record says how far it is (a checkpoint path alone can be judged)
        step = int(self.global_step)
        checkpoint["medcl_record"] = {**self.record, "step": step, "complete": step >= self.cfg.trainer.max_steps}
        checkpoint["backbone_config"] = to_dict(self.backbone.config)
