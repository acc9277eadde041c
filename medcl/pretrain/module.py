"""The pretraining LightningModule: backbone + terms (+ EMA teacher), phases, the optimiser schedule."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from medcl.core.errors import MedclConfigError
from medcl.core.provenance import ViewBatch
from medcl.engine.schedules import lr_schedule, make_lr_scheduler
from medcl.engine.seeding import sample_seed
from medcl.models import EMATeacher, build_backbone
from medcl.models.backbone import key_in_prefixes
from medcl.pretrain.config import PretrainConfig
from medcl.pretrain.data import render_views
from medcl.pretrain.matching import FeatureMatcher
from medcl.pretrain.terms import StepContext, Term, build_term, uses_teacher


class PretrainModule(L.LightningModule):
    """Self-supervised pretraining of a :class:`~medcl.models.Backbone` with the configured terms.

    Args:
        cfg: the resolved :class:`PretrainConfig`.
        record: the run record (plain dict) stored in every checkpoint as ``checkpoint["medcl_record"]``.
        channels_last: use the channels-last-3d memory format for the backbone and its inputs.

    Checkpoint layout (what fine-tuning reads): ``state_dict`` keys ``backbone.*`` (the backbone with its
    named stages), ``terms.NAME.head.*`` (heads), ``teacher.*`` (EMA teacher) and queues under their term;
    ``checkpoint["medcl_record"]`` the run record.
    """

    def __init__(self, cfg: PretrainConfig, record: dict[str, Any], channels_last: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.record = record
        self.channels_last = channels_last
        self.backbone = build_backbone(cfg.backbone)
        last = self.backbone.decoder_stage_names[-1]
        cfg = replace(cfg, terms={n: replace(t, stage=last if t.stage == "decoder.last" else t.stage) for n, t in cfg.terms.items()})
        self.cfg = cfg
        for name, t in cfg.terms.items():
            if t.stage not in self.backbone.stage_names:
                raise MedclConfigError(f"terms.{name}.stage", f"unknown stage {t.stage!r}; the backbone has {self.backbone.stage_names} (or decoder.last)")
        self.terms = nn.ModuleDict(
            {name: build_term(name, t, self.backbone, cfg.views[t.views]) for name, t in cfg.terms.items()}
        )
        self.teacher: EMATeacher | None = None
        if cfg.ema.momentum > 0:
            self.teacher = EMATeacher(
                self._student_view(),
                momentum=cfg.ema.momentum,
                final_momentum=cfg.ema.final_momentum,
                total_steps=cfg.trainer.max_steps if cfg.ema.final_momentum is not None else None,
            )
        elif any(uses_teacher(t) for t in self.terms.values()):
            needs = [n for n, t in self.terms.items() if uses_teacher(t) and not _teacher_optional(t)]
            if needs:
                raise ValueError(f"terms {needs} need the EMA teacher: set ema.momentum > 0")
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last_3d)
        self.matchers = {
            name: FeatureMatcher(
                v.feature_threshold, v.feature_margin, round(v.feature_warmup * cfg.trainer.max_steps)
            )
            for name, v in cfg.views.items()
            if v.kind == "pair" and v.matcher == "feature"
        }
        self._phases = self._phase_table()
        self._frozen_now: tuple[str, ...] | None = None

    # ----------------------------------------------------------------------------------------- structure
    def _student_view(self) -> nn.ModuleDict:
        """The modules the teacher follows: backbone and term heads (not queues)."""
        return nn.ModuleDict({"backbone": self.backbone, "heads": nn.ModuleDict({n: t.head for n, t in self.terms.items()})})

    def _phase_table(self) -> list[tuple[int, list[str], tuple[str, ...]]]:
        total = self.cfg.trainer.max_steps
        if not self.cfg.phases:
            return [(total, list(self.cfg.terms), ())]
        return [
            (round(ph.until * total), ph.terms or list(self.cfg.terms), tuple(ph.frozen)) for ph in self.cfg.phases
        ]

    def phase_at(self, step: int) -> tuple[list[str], tuple[str, ...]]:
        """``(active term names, frozen stage prefixes)`` at ``step``."""
        for end, terms, frozen in self._phases:
            if step < end:
                return terms, frozen
        return self._phases[-1][1], self._phases[-1][2]

    def _apply_freeze(self, frozen: tuple[str, ...]) -> None:
        if frozen == self._frozen_now:
            return
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(not key_in_prefixes(name, frozen) if frozen else True)
        self._frozen_now = frozen

    def _upto(self, view_set: str, active: list[str]) -> str | None:
        """The shallowest backbone output that serves every active term on ``view_set``."""
        stages = [self.terms[n].cfg.stage for n in active if self.terms[n].cfg.views == view_set]
        dec = [int(s.split(".")[1]) for s in stages if s.startswith("decoder.")]
        if not dec:
            return "bottleneck"
        return f"decoder.{max(dec)}"

    def _prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    # ----------------------------------------------------------------------------------------- training
    def rendered(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with its deferred views rendered where they are (:func:`medcl.pretrain.data.render_views`),
        outside autocast. :class:`~medcl.pretrain.data.PretrainDataModule` renders right after the transfer
        (its ``on_after_batch_transfer``); this catches batches of any other loader, at the start of the step."""
        with torch.autocast(self.device.type, enabled=False):
            return render_views(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        batch = self.rendered(batch)
        step = self.global_step
        active, frozen = self.phase_at(step)
        self._apply_freeze(frozen)
        views: dict[str, ViewBatch] = dict(batch["views"])
        uids: dict[str, Tensor] = dict(batch["uid"])
        sets = sorted({self.terms[n].cfg.views for n in active})
        match_stats: dict[str, Tensor] = {}
        for s in sets:
            if s in self.matchers:
                inside = batch.get("info", {}).get(s, {}).get("inside")
                views[s], uids[s], st = self.matchers[s](views[s], uids[s], step, self.teacher.module["backbone"], inside)
                match_stats.update({f"{s}_{k}": v for k, v in st.items()})
        student = {s: self.backbone(self._prepare(views[s].views), upto=self._upto(s, active)) for s in sets}
        teacher_cache: dict[str, Any] = {}

        def teacher(view_set: str):
            if view_set not in teacher_cache:
                with torch.no_grad():
                    teacher_cache[view_set] = self.teacher.module["backbone"](
                        self._prepare(views[view_set].views), upto=self._upto(view_set, active)
                    )
            return teacher_cache[view_set]

        g = torch.Generator(device="cpu")
        g.manual_seed(sample_seed(self.cfg.seed, step, self.global_rank, "step"))
        log_stats = step % self.cfg.trainer.log_every == 0
        ctx = StepContext(
            views=views,
            uid=uids,
            student=student,
            teacher=teacher if self.teacher is not None else None,
            teacher_heads=self.teacher.module["heads"] if self.teacher is not None else None,
            generator=g,
            step=step,
            log_stats=log_stats,
        )
        total = torch.zeros((), device=self.device)
        n_views = sum(len(views[s]) for s in sets)
        # under DDP a term returns this rank's share of the global loss: log the mean over ranks
        sync = self.trainer.world_size > 1
        for name in active:
            term: Term = self.terms[name]
            loss, logs = term.compute(ctx)
            total = total + term.cfg.weight * loss
            self.log(f"train/{name}", loss.detach(), on_step=True, batch_size=n_views, sync_dist=sync)
            for k, v in logs.items():
                self.log(f"train/{name}_{k}", v, on_step=True, batch_size=n_views, sync_dist=sync)
        for k, v in {**batch.get("stats", {}), **match_stats}.items():
            self.log(f"train/{k}", v.float().mean(), on_step=True, batch_size=n_views)
        self.log("train/loss", total.detach(), on_step=True, prog_bar=True, batch_size=n_views, sync_dist=sync)
        self._last_ctx = ctx
        return total

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimiser step, then the EMA teacher and the key queues.

        They are updated here rather than in ``on_train_batch_end`` because checkpoint callbacks run
        before the module's own ``on_train_batch_end``: a checkpoint written at this step must already hold
        this step's teacher and queue, or a resumed run would miss one update.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.teacher is not None:
            self.teacher.update(self._student_view())
        ctx = getattr(self, "_last_ctx", None)
        if ctx is not None:
            for name in self.phase_at(ctx.step)[0]:
                self.terms[name].after_step(ctx)
        self._last_ctx = None

    def configure_optimizers(self):
        o = self.cfg.optim
        params = [p for n, p in self.named_parameters() if not n.startswith("teacher.")]
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        sched = make_lr_scheduler(
            opt, lr_schedule(self.cfg.trainer.max_steps, "cosine", warmup=o.lr_warmup_steps, min_ratio=o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ----------------------------------------------------------------------------------------- records
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the checkpoint's own record says how far it is (a checkpoint path alone can be judged)
        step = int(self.global_step)
        checkpoint["medcl_record"] = {**self.record, "step": step, "complete": step >= self.cfg.trainer.max_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._frozen_now = None


def _teacher_optional(term: Term) -> bool:
    """VoCo's code form uses a teacher when there is one and runs without one otherwise."""
    from medcl.pretrain.terms import VoCoTerm

    return isinstance(term, VoCoTerm)
