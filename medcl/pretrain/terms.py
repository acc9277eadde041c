"""Loss terms of a pretraining method: each term owns its head and turns backbone outputs into a loss.

A term reads one view set (``TermConfig.views``) and one backbone stage (``TermConfig.stage``):

* :class:`ContrastiveTerm` -- global InfoNCE on pooled, projected embeddings (Chaitanya et al., 2020:
  G^R, G^D, G^D-; mined cross-volume positives for the structural and anatomical methods), negatives
  gathered across DDP ranks, optional key queue (MoCo, keys from the EMA teacher) and MoCHi;
* :class:`LocalTerm` -- dense InfoNCE between corresponding points of two views (copies of one crop, or
  the same normalised position in two volumes of one partition);
* :class:`VoCoTerm` -- VoCo position prediction (Wu et al., CVPR 2024);
* :class:`ReconstructionTerm` -- masked-voxel reconstruction.

Every ``compute`` returns ``(loss, logs)``; logs are tensors (no host sync in the step).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from medcl.core.provenance import ROLE_BASE, ROLE_RANDOM, ViewBatch
from medcl.engine.monitor import effective_rank, embedding_std
from medcl.losses import (
    ContrastIds,
    KeyQueue,
    block_normalised,
    build_masks,
    distributed_info_nce,
    gather_ids,
    gather_no_grad,
    info_nce_terms,
    is_distributed,
    local_contrastive_loss,
    masked_reconstruction_loss,
    mochi_negatives,
    voco_loss,
)
from medcl.models import ConvProjection, ProjectionMLP, ReconstructionHead, VoCoHead
from medcl.pretrain.config import TermConfig

if TYPE_CHECKING:
    from medcl.models import Backbone, BackboneOutput

_STRATEGY = {"gr": "gr", "gd": "gd", "gd-": "gd_minus", "match": "label"}

UID_STRIDE = 1 << 12
"""View ids are ``stream position * UID_STRIDE + view index``: unique across ranks and steps, and the
sample (one volume's views) of a view is ``uid // UID_STRIDE``."""


@dataclass
class StepContext:
    """Everything a term may read in one training step.

    Attributes:
        views: view set name -> :class:`ViewBatch` (this rank's views).
        uid: view set name -> ``[N]`` int64 globally unique view ids.
        student: view set name -> the backbone's :class:`BackboneOutput` on those views.
        teacher: a callable ``(view set name) -> BackboneOutput`` of the EMA teacher (cached), or None.
        generator: the step's generator (point sampling), derived from ``(seed, step, rank)``.
        step: the global step.
        log_stats: compute the (costlier) embedding statistics this step.
    """

    views: dict[str, ViewBatch]
    uid: dict[str, Tensor]
    student: dict[str, BackboneOutput]
    teacher: Any
    generator: torch.Generator
    step: int
    log_stats: bool = False
    teacher_heads: nn.ModuleDict | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _ids(vb: ViewBatch, uid: Tensor, strategy: str) -> ContrastIds:
    label = None
    if strategy == "match":
        # a pair group is named by a row of this rank's batch; its uid names it globally (DDP gathers)
        label = torch.where(vb.match >= 0, uid[vb.match.clamp_min(0)], torch.full_like(uid, -1))
    return ContrastIds(uid=uid, source_id=vb.source_id, partition=vb.partition, label=label)


class Term(nn.Module, abc.ABC):
    """Base class: ``head`` reads ``cfg.stage``; subclasses implement :meth:`compute`."""

    def __init__(self, name: str, cfg: TermConfig) -> None:
        super().__init__()
        self.name = name
        self.cfg = cfg

    @abc.abstractmethod
    def compute(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, logs)`` of this term for the step."""

    def after_step(self, ctx: StepContext) -> None:
        """Stateful updates after the optimiser step (queues)."""


class ContrastiveTerm(Term):
    """Global InfoNCE on ``ProjectionMLP(global_pool(stage))`` embeddings.

    Positives by ``cfg.strategy`` (mask builders of :mod:`medcl.losses.contrastive`); negatives are all
    other views of the global batch (gathered with gradients across ranks), plus the queue and MoCHi
    negatives when configured. Without a queue the loss of each rank is its share of the global loss
    (:func:`medcl.losses.distributed_info_nce`), so DDP gradients equal one process on the whole batch.
    """

    def __init__(self, name: str, cfg: TermConfig, in_dim: int) -> None:
        super().__init__(name, cfg)
        self.head = ProjectionMLP(in_dim, cfg.hidden_dim, cfg.proj_dim)
        self.strategy = _STRATEGY[cfg.strategy]
        self.queue = KeyQueue(cfg.queue, cfg.proj_dim) if cfg.queue > 0 else None
        self._pending: tuple[Tensor, ContrastIds] | None = None

    def features(self, out: BackboneOutput) -> Tensor:
        """``[N, C]`` (``pool: avg``) or ``[N, C * d * h * w]`` (``pool: flatten``) head input."""
        return pooled(out.stage(self.cfg.stage), self.cfg.pool)

    def embed(self, out: BackboneOutput) -> Tensor:
        return self.head(self.features(out))

    def compute(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        vb, uid = ctx.views[self.cfg.views], ctx.uid[self.cfg.views]
        z = self.embed(ctx.student[self.cfg.views])
        ids = _ids(vb, uid, self.cfg.strategy)
        if self.queue is None and self.cfg.mochi == 0:
            res = distributed_info_nce(z, ids, self.strategy, temperature=self.cfg.temperature, mode=self.cfg.mode)
            loss, n_anchor, n_drop = res.loss, res.n_anchors, res.n_dropped
        else:
            loss, n_anchor, n_drop = self._with_teacher_keys(z, ids, ctx)
        logs = {"anchors": n_anchor.float(), "dropped": n_drop.float()}
        if ctx.log_stats:
            zd = z.detach()
            logs["emb_std"] = embedding_std(zd)
            logs["eff_rank"] = effective_rank(zd)
        return loss, logs

    def _with_teacher_keys(self, z: Tensor, ids: ContrastIds, ctx: StepContext) -> tuple[Tensor, Tensor, Tensor]:
        """MoCo-style: queries from the student, keys from the EMA teacher (all ranks) plus the queue."""
        if ctx.teacher is None or ctx.teacher_heads is None:
            raise RuntimeError(f"term {self.name!r}: a queue or MoCHi needs the EMA teacher")
        with torch.no_grad():
            zt = ctx.teacher_heads[self.name](self.features(ctx.teacher(self.cfg.views)))
        batch_keys = gather_no_grad(zt.float())
        batch_ids = gather_ids(ids)
        keys, key_ids = batch_keys, batch_ids
        if self.queue is not None and len(self.queue) > 0:
            qk, qids, _ = self.queue.contents()
            keys = torch.cat([keys, qk.to(keys)])
            key_ids = ContrastIds.cat([key_ids, qids])
        self._pending = (batch_keys, batch_ids)
        q = nn.functional.normalize(z.float(), dim=-1)
        k = nn.functional.normalize(keys, dim=-1)
        pos, exclude = build_masks(self.strategy, ids, key_ids)
        logits = q @ k.T / self.cfg.temperature
        extra = extra_mask = None
        if self.cfg.mochi > 0:
            # MoCHi (Kalantidis et al., 2020): half pairwise mixes of hard negatives, half query mixes
            syn = mochi_negatives(
                q, k, pos, exclude, n_hard=max(2 * self.cfg.mochi, 8), n_mix=self.cfg.mochi,
                n_query_mix=max(1, self.cfg.mochi // 2), generator=ctx.generator,
            )
            extra = (q[:, None, :] * syn.negatives).sum(-1) / self.cfg.temperature
            extra_mask = syn.valid
        per_anchor, kept = info_nce_terms(
            logits, pos, exclude, self.cfg.mode, extra_logits=extra, extra_mask=extra_mask
        )
        n_local = kept.sum()
        # each rank averages over its own anchors; with equal per-rank batches that is the global mean
        loss = per_anchor.sum() / n_local.clamp_min(1)
        return loss, n_local, (~kept).sum()

    def after_step(self, ctx: StepContext) -> None:
        if self.queue is not None and self._pending is not None:
            keys, ids = self._pending
            self.queue.push(keys, ids)
        self._pending = None


def _copy_pairs(vb: ViewBatch, uid: Tensor, copies: int) -> tuple[Tensor, Tensor]:
    """Indices ``(a, b)`` of the first two copies of every crop (same sample and partition)."""
    sample = torch.div(uid, UID_STRIDE, rounding_mode="floor")
    key = sample * 4096 + vb.partition.clamp_min(0) * 16 + (vb.partition < 0).long()
    order = torch.sort(key * (uid.max() + 1) + uid).indices
    return order[0::copies], order[1::copies]


def _cross_volume_pairs(vb: ViewBatch, uid: Tensor, copies: int) -> tuple[Tensor, Tensor]:
    """Indices ``(a, b)``: first copy of each partition crop paired with the same partition of the next
    volume of the batch (cyclic); empty when the batch holds one volume."""
    sample = torch.div(uid, UID_STRIDE, rounding_mode="floor")
    first = torch.ones_like(uid, dtype=torch.bool)
    a, _ = _copy_pairs(vb, uid, copies)
    first[:] = False
    first[a] = True
    idx = first.nonzero().squeeze(1)
    n_samples = int(torch.unique(sample[idx]).numel())
    if n_samples < 2:
        return idx[:0], idx[:0]
    order = idx[torch.sort(vb.partition[idx] * (sample.max() + 1) + sample[idx]).indices]
    part = vb.partition[order]
    nxt = torch.roll(order, -1)
    same = torch.roll(part, -1) == part
    # close each partition's cycle: the last of a group pairs with the first of that group
    starts = torch.ones_like(same)
    starts[1:] = part[1:] != part[:-1]
    group_first = order[torch.cummax(torch.where(starts, torch.arange(len(order), device=order.device), 0), 0).values]
    nxt = torch.where(same, nxt, group_first)
    keep = nxt != order
    return order[keep], nxt[keep]


class LocalTerm(Term):
    """Dense InfoNCE between corresponding points of view pairs (:func:`medcl.losses.local_contrastive_loss`)."""

    def __init__(self, name: str, cfg: TermConfig, in_dim: int, copies: int) -> None:
        super().__init__(name, cfg)
        self.head = ConvProjection(in_dim, cfg.hidden_dim // 2, cfg.proj_dim // 2)
        self.copies = copies

    def compute(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        vb, uid = ctx.views[self.cfg.views], ctx.uid[self.cfg.views]
        feat = self.head(ctx.student[self.cfg.views].stage(self.cfg.stage))
        pairs = _cross_volume_pairs if self.cfg.cross_volume else _copy_pairs
        a, b = pairs(vb, uid, self.copies)
        shape = tuple(vb.views.shape[2:])
        res = local_contrastive_loss(
            feat[a],
            feat[b],
            vb.affine[a],
            vb.affine[b],
            shape,
            n_points=self.cfg.points,
            radius_mm=self.cfg.radius_mm or None,
            temperature=self.cfg.temperature,
            mode=self.cfg.mode,
            norm_a=vb.norm[a] if self.cfg.cross_volume else None,
            norm_b=vb.norm[b] if self.cfg.cross_volume else None,
            generator=ctx.generator,
        )
        return res.loss, {"pairs_dropped": res.n_pairs_dropped.float()}


class VoCoTerm(Term):
    """VoCo: predict each random crop's overlap with the base crops from embedding similarity."""

    def __init__(self, name: str, cfg: TermConfig, in_channels: list[int], stages: list[str]) -> None:
        super().__init__(name, cfg)
        self.stages = stages
        self.head = VoCoHead(in_channels, cfg.hidden_dim, cfg.proj_dim)

    def features(self, out: BackboneOutput) -> list[Tensor]:
        return [pooled(out.stage(s), self.cfg.pool) for s in self.stages]

    def embed(self, out: BackboneOutput) -> Tensor:
        return self.head(self.features(out))

    @staticmethod
    def split(vb: ViewBatch) -> tuple[Tensor, Tensor, Tensor]:
        """``(base_idx [B, Nb], rand_idx [B, Nr], targets [B, Nr, Nb])`` of a collated VoCo batch."""
        base = (vb.role == ROLE_BASE).nonzero().squeeze(1)
        rand = (vb.role == ROLE_RANDOM).nonzero().squeeze(1)
        nb = vb.targets.shape[1]
        b = base.numel() // nb
        base_idx = base.view(b, nb)
        rand_idx = rand.view(b, -1)
        return base_idx, rand_idx, vb.targets[rand_idx].float()

    def compute(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        vb = ctx.views[self.cfg.views]
        emb = self.embed(ctx.student[self.cfg.views])
        base_idx, rand_idx, targets = self.split(vb)
        t_rand = t_base = None
        if ctx.teacher is not None and self.cfg.form == "code":
            with torch.no_grad():
                t_emb = ctx.teacher_heads[self.name](self.features(ctx.teacher(self.cfg.views)))
            t_rand, t_base = t_emb[rand_idx], t_emb[base_idx]
        res = voco_loss(
            emb[rand_idx],
            emb[base_idx],
            targets,
            form=self.cfg.form,
            teacher_rand_emb=t_rand,
            teacher_base_emb=t_base,
            reg_weight=self.cfg.reg_weight,
        )
        return res.loss, {"pred_pos": res.pred_pos.detach(), "pred_neg": res.pred_neg.detach(), "reg": res.reg.detach()}


class ReconstructionTerm(Term):
    """Masked-voxel reconstruction from a decoder stage (:func:`medcl.losses.masked_reconstruction_loss`)."""

    def __init__(self, name: str, cfg: TermConfig, in_dim: int, out_channels: int, stride,
                 block: tuple[int, int, int] = (4, 4, 4)) -> None:
        super().__init__(name, cfg)
        self.head = ReconstructionHead(in_dim, out_channels, stride)
        self.block = tuple(int(b) for b in block)

    def compute(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        vb = ctx.views[self.cfg.views]
        pred = self.head(ctx.student[self.cfg.views].stage(self.cfg.stage))
        target = block_normalised(vb.target, self.block) if self.cfg.target_norm == "block" else vb.target
        loss = masked_reconstruction_loss(pred, target, vb.mask, kind=self.cfg.loss)
        return loss, {}


def pooled(x: Tensor, pool: str) -> Tensor:
    """Head input from a stage map ``[N, C, d, h, w]``: spatial mean ``[N, C]`` or flattened ``[N, C d h w]``.

    Why flatten by default: after instance normalisation (nnU-Net's DynUNet) every channel of a map has
    the same spatial mean for every input, so a spatial average carries almost nothing to contrast;
    Chaitanya et al.'s global head also flattens the encoder output.
    """
    return x.flatten(1) if pool == "flatten" else x.mean(dim=(2, 3, 4))


def head_in_dim(backbone: Backbone, stage: str, crop, pool: str) -> int:
    """Input size of a head reading ``stage`` of views of size ``crop`` with ``pool``."""
    c = backbone.stage_channels[stage]
    if pool != "flatten":
        return c
    stride = backbone.stage_strides[stage]
    n = 1
    for size, s in zip(crop, stride):
        n *= int(size) // int(s)
    return c * n


def build_term(name: str, cfg: TermConfig, backbone: Backbone, view_cfg) -> Term:
    """The term for ``cfg`` with its head sized from ``backbone``'s stage channels."""
    if cfg.kind == "contrastive":
        return ContrastiveTerm(name, cfg, head_in_dim(backbone, cfg.stage, view_cfg.crop, cfg.pool))
    if cfg.kind == "local":
        return LocalTerm(name, cfg, backbone.stage_channels[cfg.stage], view_cfg.copies)
    if cfg.kind == "voco":
        stages = [*backbone.encoder_stage_names, "bottleneck"] if cfg.pool == "avg" else [cfg.stage]
        return VoCoTerm(name, cfg, [head_in_dim(backbone, s, view_cfg.crop, cfg.pool) for s in stages], stages)
    if cfg.kind == "reconstruction":
        block = view_cfg.mask_block
        return ReconstructionTerm(
            name, cfg, backbone.stage_channels[cfg.stage], backbone.in_channels, backbone.stage_strides[cfg.stage],
            block=(block,) * 3 if isinstance(block, int) else tuple(block),
        )
    raise ValueError(f"unknown term kind {cfg.kind!r}")


def uses_teacher(term: Term) -> bool:
    return isinstance(term, VoCoTerm | ContrastiveTerm) and (
        isinstance(term, VoCoTerm) or term.queue is not None or term.cfg.mochi > 0
    )


__all__ = ["StepContext", "Term", "build_term", "is_distributed"]
