"""Training and evaluating one MIL head; saving and loading a trained model.

A plain PyTorch loop rather than a Lightning ``Trainer``: cross-validation trains hundreds of small models
(10 folds x 5 seeds x heads) on whole-bag batches, where a Trainer's per-fit start-up and per-step hooks
would cost more than the training itself. Each step is one padded batch of whole bags (vectorised over bags
and instances); the loss is read back to the host once per epoch, not per step.

Two batch sources give the same batches (bit for bit) and so the same model for a seed: bags that fit
(``train.fast``, see :func:`medcl.mil.fast.fast_path_choice`) are preloaded on the training device once per fit
and gathered per batch (:class:`medcl.mil.fast.PackedBags`); the others stream, collated on the host (and read by
DataLoader workers from their h5 files when lazy). Independently, ``train.pack_instances`` runs each head's
instance MLP on the real instances only during training (:meth:`medcl.mil.heads.MILHead.encode`): the same model
up to float rounding, with the same random draws; prediction always runs the padded computation.

Cross-validation may train several fits of a head at once as one stacked model (``train.stack_models``,
:mod:`medcl.mil.stacked`), each starting from :func:`prepare_fit` as :func:`fit_head` does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medcl.config import from_dict, to_dict
from medcl.core.device import resolve_device, torch_threads
from medcl.core.errors import MedclDataError
from medcl.engine.checkpoint import atomic_torch_save, safe_torch_load
from medcl.engine.schedules import lr_schedule, make_lr_scheduler
from medcl.engine.seeding import seed_everything
from medcl.mil.augment import subsample_instances
from medcl.mil.bags import BagBatch, BagDataset, collate_bags
from medcl.mil.config import MILConfig
from medcl.mil.fast import PackedBags, fast_path_choice
from medcl.mil.heads import MILHead, TrainingInfo, build_head
from medcl.mil.heads.base import set_instance_packing
from medcl.mil.sampling import BagBatchSampler

log = logging.getLogger(__name__)

MODEL_FORMAT = "medcl-mil-model"
MODEL_VERSION = 1


def feature_stats(ds: BagDataset, mode: str = "global", std_floor: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scale ``[D]`` for standardising the features of ``ds`` (float64 accumulation over all instances).

    ``mode="global"``: per-feature mean, one common scale (the mean per-feature std). ``mode="feature"``:
    per-feature mean and std, each std floored at ``std_floor`` times the mean std of the non-constant
    features (std > 1e-8), so sparse features do not explode on held-out bags.
    """
    s = torch.zeros(ds.in_dim, dtype=torch.float64)
    ss = torch.zeros(ds.in_dim, dtype=torch.float64)
    n = 0
    for i in range(len(ds)):
        f = ds.read(i)[0].to(torch.float64)
        s += f.sum(0)
        ss += (f * f).sum(0)
        n += f.shape[0]
    mean = s / n
    std = (ss / n - mean * mean).clamp_min(0.0).sqrt()
    live = std > 1e-8
    typical = std[live].mean() if live.any() else torch.tensor(1.0, dtype=std.dtype)
    if mode == "global":
        std = torch.full_like(std, float(typical))
    elif mode == "feature":
        std = std.clamp_min(float(std_floor * typical))
    else:
        raise ValueError(f"unknown standardisation mode '{mode}'")
    return mean.float(), std.float()


def iterate_batches(ds: BagDataset, batches: list[list[int]], workers: int = 0):
    """Yield :class:`BagBatch` es for lists of bag indices (a DataLoader with workers for lazy h5 datasets)."""
    if ds.in_memory or workers == 0:
        for idx in batches:
            yield collate_bags([ds[i] for i in idx])
    else:
        yield from DataLoader(ds, batch_sampler=batches, collate_fn=collate_bags, num_workers=workers)


@dataclass
class FitResult:
    """A trained head, the per-epoch mean of each loss term, the training time in seconds, the optimiser steps
    and whether the bags were preloaded on the device (the fast path)."""

    head: MILHead
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    fast: bool = False


def fit_head(
    cfg: MILConfig, train_ds: BagDataset, *, seed: int, device: str | torch.device | None = None
) -> FitResult:
    """Train the head of ``cfg`` on ``train_ds`` (all of it; no early stopping) and return it in eval mode.

    Runs with ``cfg.threads`` CPU threads (restored afterwards) on ``device`` (default ``cfg.device``); the bags
    are preloaded on the device when ``cfg.train.fast`` and they fit, else streamed (same results).
    """
    with torch_threads(cfg.threads):
        return _fit(cfg, train_ds, seed, device)


def prepare_fit(cfg: MILConfig, train_ds: BagDataset, seed: int, dev: torch.device) -> tuple[MILHead, BagBatchSampler]:
    """A fit's start, in the order that fixes its random draws: seed everything, build the head (its
    initialisation), fit the feature standardisation on ``train_ds``, the fit's batch sampler, the head's
    :meth:`~medcl.mil.heads.MILHead.prepare_training`. Shared by :func:`fit_head` and the stacked fits
    (:mod:`medcl.mil.stacked`), so both start every model from the same state."""
    seed_everything(seed)
    k = len(train_ds.classes)
    head = build_head(cfg, train_ds.in_dim, k).to(dev)
    tc = cfg.train
    if tc.standardize != "none":
        head.set_standardization(*feature_stats(train_ds, tc.standardize, tc.std_floor))
    min_pc = int(getattr(head, "min_per_class", 0))
    sampler = BagBatchSampler(train_ds.labels, tc.batch_size, tc.sampler, min_pc, seed)
    sizes = sorted((b.n for b in train_ds.bags), reverse=True)
    head.prepare_training(
        TrainingInfo(
            n_bags=len(train_ds), n_instances=train_ds.n_instances, labels=train_ds.labels, epochs=tc.epochs,
            steps_per_epoch=len(sampler), max_batch_instances=int(sum(sizes[: tc.batch_size + min_pc * k])),
        )
    )
    return head, sampler


def make_optimizer(
    cfg: MILConfig, params: list[torch.Tensor], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """AdamW over ``params`` and its per-step learning-rate scheduler (``None`` for a constant rate)."""
    oc = cfg.optim
    opt = torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay, foreach=True)
    sched = None
    if oc.schedule != "constant" or oc.lr_warmup_steps > 0:  # constant without warm-up: no scheduler at all
        sched = make_lr_scheduler(opt, lr_schedule(total_steps, oc.schedule, oc.lr_warmup_steps))
    return opt, sched


def _fit(cfg: MILConfig, train_ds: BagDataset, seed: int, device: str | torch.device | None) -> FitResult:
    t0 = time.perf_counter()
    dev = resolve_device(device if device is not None else cfg.device)
    head, sampler = prepare_fit(cfg, train_ds, seed, dev)
    tc, oc = cfg.train, cfg.optim
    total_steps = tc.epochs * len(sampler)
    params = [p for p in head.parameters() if p.requires_grad]
    opt, sched = make_optimizer(cfg, params, total_steps)
    fast, why = fast_path_choice(train_ds, tc.fast, cfg.data.max_memory_gb)
    log.debug("training %s on %d bags: %s", cfg.label, len(train_ds), why)
    packed = PackedBags(train_ds, dev) if fast else None
    set_instance_packing(head, tc.pack_instances)
    head.train()
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(tc.epochs):
        if packed is not None:
            batches = packed.epoch(*sampler.epoch_index(epoch))
        else:
            batches = (b.to(dev, non_blocking=True)
                       for b in iterate_batches(train_ds, sampler.epoch(epoch), cfg.data.workers))
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for batch in batches:
            if tc.instance_keep < 1:
                batch.mask = subsample_instances(batch.mask, tc.instance_keep)
            terms = head.training_loss(batch, progress=step / total_steps)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if oc.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, oc.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            head.after_step()
            for key, v in terms.items():
                sums[key] = sums.get(key, 0) + v.detach().float()
            n += 1
            step += 1
        history.append({key: float(v) / n for key, v in sums.items()})  # one host sync per epoch
    set_instance_packing(head, False)  # prediction: the padded reference computation
    head.eval()
    return FitResult(head, history, time.perf_counter() - t0, step, fast)


@dataclass
class Prediction:
    """Bag probabilities ``[n, K]`` in dataset order and, for heads that have them, instance scores per bag."""

    probs: np.ndarray
    instance_scores: list[np.ndarray] | None


@torch.no_grad()
def evaluate(
    head: MILHead, ds: BagDataset, device: str | torch.device | None = None, batch_size: int = 16, workers: int = 0
) -> Prediction:
    """Predict every bag of ``ds`` (eval mode; bags batched by size so padding stays small)."""
    dev = resolve_device(device) if device is not None else next(head.parameters()).device
    head.eval()
    order = sorted(range(len(ds)), key=lambda i: ds.bags[i].n)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    probs = np.zeros((len(ds), head.n_classes), dtype=np.float64)
    scores: list[np.ndarray | None] = [None] * len(ds)
    has_scores = True
    for idx, batch in zip(batches, iterate_batches(ds, batches, workers)):
        b: BagBatch = batch.to(dev)
        out = head(b.features, b.mask)
        probs[idx] = torch.softmax(out.logits.float(), -1).cpu().numpy()
        if out.instance_scores is None:
            has_scores = False
            continue
        s = out.instance_scores.float().cpu().numpy()
        m = b.mask.cpu().numpy()
        for j, i in enumerate(idx):
            scores[i] = s[j][m[j]]
    return Prediction(probs, scores if has_scores else None)  # type: ignore[arg-type]


def save_mil_model(
    path: str | Path, head: MILHead, cfg: MILConfig, classes: list[str], record: dict[str, Any] | None = None
) -> None:
    """Write a model ``torch.load(weights_only=True)`` can read: state dict, config, classes, feature width."""
    payload = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "head": cfg.head,
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "config": to_dict(cfg),
        "classes": [str(c) for c in classes],
        "in_dim": int(head.in_dim),
        "n_classes": int(head.n_classes),
        "record": record or {},
    }
    atomic_torch_save(payload, path)


def load_mil_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[MILHead, dict[str, Any]]:
    """Load a model written by ``medcl mil train`` (``model.pt``) in eval mode.

    Returns:
        ``(head, info)`` with ``info = {"config": MILConfig, "classes": [names in index order], "in_dim": D,
        "head": kind, "record": run record dict}``. ``head(x [B, N, D], mask)`` takes raw features (the
        training standardisation is inside the head).

    Raises:
        MedclDataError: naming the file when it is not a medcl MIL model or does not match its config.
    """
    d = safe_torch_load(path)
    if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
        raise MedclDataError(path, "not a medcl MIL model (written by 'medcl mil train')")
    if int(d.get("version", 0)) > MODEL_VERSION:
        raise MedclDataError(path, f"model version {d['version']} is newer than this medcl reads ({MODEL_VERSION})")
    cfg = from_dict(MILConfig, d["config"])
    head = build_head(cfg, int(d["in_dim"]), int(d["n_classes"]))
    try:
        head.load_state_dict(d["state_dict"])
    except RuntimeError as exc:
        raise MedclDataError(path, f"weights do not match the stored config: {exc}") from exc
    head.to(resolve_device(device)).eval()
    info = {"config": cfg, "classes": list(d["classes"]), "in_dim": int(d["in_dim"]), "head": d["head"],
            "record": d.get("record", {})}
    return head, info
