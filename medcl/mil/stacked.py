"""Several independent fits of one head trained together as one stacked model (``train.stack_models``).

Cross-validation trains many small models that never interact: every (seed, fold) of a head. One such model's
epoch is mostly per-operation overhead (Python, dispatch, the optimiser) and arithmetic on padding. ``K`` models
stacked along a leading axis share every operation::

    weights   W_l [K, out, in], b_l [K, out]     (torch.func.stack_module_state of the K built heads)
    rows      X [K, M, D]    model k's real instances of its current batch in slots 0 .. M_k - 1 (M = max_k M_k),
                             standardised with model k's own fold statistics
    encoder   h = act(X W_l^T + b_l) (* dropout noise)          one baddbmm per layer for all models
    pooling   per bag over its real rows only: attention  a = softmax_bag(w^T tanh(V h) [* sigmoid(U h)]),
              z = sum_bag a h;  mean  z = sum_bag h / n;  max  z = max_bag h   (segment ops, no [B, N, E] padding)
    loss      L = sum_k CE_k with CE_k model k's mean over its own B_k bags: one backward gives every model the
              gradient of its own loss (the models share no weight); clipping by each model's own gradient norm;
              one AdamW over the stacked tensors (elementwise, so equal to K AdamWs with the same schedule).

Each model keeps what makes it the sequential fit of its seed (:func:`medcl.mil.train.fit_head`): its
initialisation, feature standardisation and sampler (:func:`medcl.mil.train.prepare_fit`), its training bags and
batch order, and its own random stream. The global RNG state right after building model k is saved and swapped
back in (:class:`_RngStreams`) to draw exactly the sequential fit's noise, in its order and over its padded
shapes: instance subsampling on ``[B_k, N_k]``, then each dropout's noise over ``[B_k, N_k, E]``
(:func:`medcl.mil.heads.base.dropout_noise`, what :func:`~medcl.mil.heads.base.packed_apply` and ``nn.Dropout`` on the
padded batch draw). The stacked model thus
equals the sequential one up to float rounding only: the segment sums, the per-bag softmax table and the elementwise
kernels on ``[K, ...]`` tensors round in another order, so a model's last bits also depend on its stack partners.
``benchmarks/mil.py --sections stacked`` and ``tests/test_mil_stacked.py`` measure how far: probabilities within
1e-5 and the same predicted classes after a few epochs. Over long runs the rounding can grow (MUSK1, 60 epochs, 30
fits: identical metrics and classes, one bag off by 3e-4).

Stacked: ``abmil``, ``gated_abmil`` (attention dropout included), ``meanpool``, ``maxpool`` (the heads that are a
row-wise MLP, a pooling and a linear classifier, trained with the plain bag cross-entropy). Every other head (its
own training step, instance-level losses, queues, data-dependent layers) and bags that are not preloaded
(:func:`medcl.mil.fast.fast_path_choice`) train sequentially, with one log line saying why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import stack_module_state

from medcl.core.device import resolve_device, torch_threads
from medcl.mil.augment import subsample_instances
from medcl.mil.bags import BagDataset
from medcl.mil.config import MILConfig
from medcl.mil.fast import fast_path_choice
from medcl.mil.heads import ABMIL, MaxPoolMIL, MeanPoolMIL, MILHead, head_spec
from medcl.mil.heads.base import _row_wise_layers, dropout_noise
from medcl.mil.sampling import BagBatchSampler
from medcl.mil.train import FitResult, fit_head, make_optimizer, prepare_fit

__all__ = ["fit_heads", "stack_support", "StackedFit"]

log = logging.getLogger(__name__)

_POOLS = {ABMIL: "attention", MeanPoolMIL: "mean", MaxPoolMIL: "max"}
_ACTIVATIONS = {nn.ReLU: F.relu, nn.GELU: F.gelu, nn.Tanh: torch.tanh}


def stack_support(cfg: MILConfig, ds: BagDataset) -> str | None:
    """``None`` when the fits of ``cfg`` on (subsets of) ``ds`` can be stacked, else why not (for the log)."""
    cls = head_spec(cfg.head).cls
    if cls not in _POOLS:
        return f"head '{cfg.head}' has no stacked forward (only {', '.join(c.__name__ for c in _POOLS)})"
    use, why = fast_path_choice(ds, True, cfg.data.max_memory_gb)
    return None if use else f"the bags are not preloaded: {why}"


def fit_heads(
    cfg: MILConfig, jobs: Sequence[tuple[BagDataset, int]], device: str | torch.device | None = None
) -> list[FitResult]:
    """Fit ``cfg``'s head once per ``(train_ds, seed)`` of ``jobs``; results in ``jobs`` order.

    With ``cfg.train.stack_models = S >= 2`` and a head and data that allow it (:func:`stack_support`), the jobs are
    cut into consecutive chunks of ``S`` and the jobs of a chunk with the same optimiser steps per epoch (the same
    learning-rate schedule) are trained as one :class:`StackedFit`. A job alone in its group, and every job
    otherwise, is :func:`~medcl.mil.train.fit_head`'s fit (bit for bit). The ``train_ds`` must share their
    :class:`~medcl.mil.bags.Bag` objects where they share bags (``BagDataset.subset`` of one data set does).
    """
    size = cfg.train.stack_models
    why = None if size < 2 else stack_support(cfg, jobs[0][0])
    if size < 2 or why is not None:
        if why is not None:
            log.info("[%s] training %d fits one by one: %s", cfg.label, len(jobs), why)
        return [fit_head(cfg, ds, seed=seed, device=device) for ds, seed in jobs]
    results: list[FitResult | None] = [None] * len(jobs)
    with torch_threads(cfg.threads):
        for start in range(0, len(jobs), size):
            groups: dict[int, list[int]] = {}
            for j in range(start, min(start + size, len(jobs))):
                steps = len(BagBatchSampler(jobs[j][0].labels, cfg.train.batch_size))  # the sampler's own rule
                groups.setdefault(steps, []).append(j)
            for members in groups.values():
                if len(members) == 1:
                    fits = [fit_head(cfg, jobs[members[0]][0], seed=jobs[members[0]][1], device=device)]
                else:
                    log.debug("[%s] training %d fits as one stacked model", cfg.label, len(members))
                    fits = StackedFit(cfg, [jobs[j] for j in members], device).run()
                for j, fit in zip(members, fits):
                    results[j] = fit
    return results  # type: ignore[return-value]


class _RngStreams:
    """One saved global RNG state per model (CPU, plus the CUDA generator on a CUDA device), swapped in around
    that model's draws so each model draws the sequence its sequential fit draws."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.states: list[tuple[Tensor, Tensor | None]] = []

    def _get(self) -> tuple[Tensor, Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def save(self) -> None:
        """Append the current global state as the next model's stream."""
        self.states.append(self._get())

    def enter(self, k: int) -> None:
        cpu, cuda = self.states[k]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.dev)

    def leave(self, k: int) -> None:
        self.states[k] = self._get()


class _Union:
    """The distinct bags of all jobs preloaded once on the device (as :class:`medcl.mil.fast.PackedBags`), and per
    job the map from its local bag index to the union's."""

    def __init__(self, datasets: Sequence[BagDataset], dev: torch.device) -> None:
        where: dict[int, int] = {}
        bags = []
        self.maps = []
        for ds in datasets:
            for b in ds.bags:
                if id(b) not in where:
                    where[id(b)] = len(bags)
                    bags.append(b)
            self.maps.append(torch.tensor([where[id(b)] for b in ds.bags], dtype=torch.long))
        first = bags[0].features
        dtype = first.dtype if first.is_floating_point() else torch.float32  # collate_bags' rule
        self.features = torch.cat([b.features.to(dtype) for b in bags]).to(dev)  # [M, D]
        self.sizes_host = torch.tensor([b.n for b in bags], dtype=torch.long)
        self.sizes = self.sizes_host.to(dev)
        self.offsets = (torch.cumsum(self.sizes_host, 0) - self.sizes_host).to(dev)
        self.labels = torch.tensor([b.label for b in bags], dtype=torch.long, device=dev)
        self.positions = torch.arange(int(self.sizes_host.max()), device=dev)


class StackedFit:
    """``K`` fits of one stackable head (:func:`stack_support`) with the same steps per epoch, trained together.

    Args:
        cfg: the head's config (the same for every model).
        jobs: ``(train_ds, seed)`` per model.
        device: the training device (default ``cfg.device``).
    """

    def __init__(self, cfg: MILConfig, jobs: Sequence[tuple[BagDataset, int]],
                 device: str | torch.device | None = None) -> None:
        t0 = time.perf_counter()
        self.cfg = cfg
        self.dev = resolve_device(device if device is not None else cfg.device)
        self.rng = _RngStreams(self.dev)
        self.heads: list[MILHead] = []
        self.samplers = []
        for ds, seed in jobs:
            head, sampler = prepare_fit(cfg, ds, seed, self.dev)
            self.rng.save()  # the state the sequential fit's first training draw starts from
            self.heads.append(head)
            self.samplers.append(sampler)
        steps = {len(s) for s in self.samplers}
        if len(steps) != 1:
            raise ValueError(f"stacked fits need the same steps per epoch, got {sorted(steps)}")
        self.steps_per_epoch = steps.pop()
        head = self.heads[0]
        self.pool = _POOLS[type(head)]
        self.plan = _encoder_plan(head)
        self.att_p = 0.0
        if self.pool == "attention":
            drop = head.pool.drop
            self.att_p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        self.params, buffers = stack_module_state(self.heads)  # [K, ...] leaves
        self.mean, self.std = buffers["feature_mean"], buffers["feature_std"]  # [K, D]
        self.data = _Union([ds for ds, _ in jobs], self.dev)
        self.maps = self.data.maps
        self.setup_seconds = time.perf_counter() - t0

    @property
    def k(self) -> int:
        return len(self.heads)

    def run(self) -> list[FitResult]:
        """Train every model for ``train.epochs``; the heads (in eval mode) with their loss histories."""
        t0 = time.perf_counter()
        tc, oc = self.cfg.train, self.cfg.optim
        total = tc.epochs * self.steps_per_epoch
        params = list(self.params.values())
        opt, sched = make_optimizer(self.cfg, params, total)
        history: list[list[dict[str, float]]] = [[] for _ in range(self.k)]
        for epoch in range(tc.epochs):
            epochs = [s.epoch_index(epoch) for s in self.samplers]
            starts = [0] * self.k
            sums = torch.zeros(self.k, device=self.dev)
            for step in range(self.steps_per_epoch):
                picks = []
                for k, (order, lengths) in enumerate(epochs):
                    picks.append(self.maps[k][order[starts[k] : starts[k] + lengths[step]]])
                    starts[k] += lengths[step]
                losses = self.losses(picks)
                opt.zero_grad(set_to_none=True)
                losses.sum().backward()
                if oc.grad_clip:
                    _clip_per_model(params, oc.grad_clip)
                opt.step()
                if sched is not None:
                    sched.step()
                sums += losses.detach()
            for k, v in enumerate((sums / self.steps_per_epoch).tolist()):  # one host sync per epoch
                history[k].append({"loss": v, "ce": v})
        with torch.no_grad():
            for k, head in enumerate(self.heads):
                for name, p in head.named_parameters():
                    p.copy_(self.params[name][k])
                head.eval()
        seconds = (self.setup_seconds + time.perf_counter() - t0) / self.k  # the group's time, shared out
        return [FitResult(h, history[k], seconds, total, True) for k, h in enumerate(self.heads)]

    def _draws(self, k: int, bags: Tensor) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Model ``k``'s mask ``[B_k, N_k]`` of this step and its noise on its real rows (per encoder dropout
        ``[M_k, E]``, attention dropout ``[M_k, L]``), drawn from its own stream in its sequential fit's order."""
        n = int(self.data.sizes_host[bags].max())  # host tensors: no device sync
        mask = self.data.positions[:n][None, :] < self.data.sizes[bags.to(self.dev)][:, None]
        self.rng.enter(k)
        if self.cfg.train.instance_keep < 1:
            mask = subsample_instances(mask, self.cfg.train.instance_keep)
        noise = [dropout_noise((*mask.shape, arg[1]), arg[0], mask) for op, arg in self.plan if op == "dropout"]
        att = None
        if self.att_p > 0:
            att = dropout_noise((*mask.shape, self.params["pool.V.weight"].shape[1]), self.att_p, mask)
        self.rng.leave(k)
        return mask, noise, att

    def losses(self, picks: list[Tensor]) -> Tensor:
        """``[K]`` each model's mean bag cross-entropy on its batch ``picks[k]`` (union bag indices ``[B_k]``)."""
        d = self.data
        rows, segs, poss, noises, atts = [], [], [], [], []
        base, n_max = 0, 1
        for k, bags in enumerate(picks):
            mask, noise, att = self._draws(k, bags)
            n_max = max(n_max, mask.shape[1])
            bi, ni = mask.nonzero(as_tuple=True)  # real rows in x[mask] order
            rows.append(d.offsets[bags.to(self.dev)][bi] + ni)
            segs.append(base + bi)
            poss.append(ni)
            noises.append(noise)
            atts.append(att)
            base += len(bags)
        split = [len(r) for r in rows]  # M_k (host ints: nonzero has synchronised already)
        n_host = [len(b) for b in picks]
        n_bags = torch.tensor(n_host, device=self.dev)
        model = torch.repeat_interleave(torch.arange(self.k, device=self.dev), torch.tensor(split, device=self.dev))
        h = (d.features[torch.cat(rows)] - self.mean[model]) / self.std[model]  # [R, D] as MILHead.prepare_input
        j = 0
        for op, arg in self.plan:
            if op == "linear":
                h = self._linear(str(arg), h, split)
            elif op == "act":
                h = arg(h)
            else:
                h = h * torch.cat([nz[j] for nz in noises])
                j += 1
        seg = torch.cat(segs)
        z = self._pool(h, split, seg, torch.cat(poss), (base, n_max), atts)  # [T, E]
        logits = self._linear("classifier", z, n_host)  # [T, C]
        labels = torch.cat([d.labels[b.to(self.dev)] for b in picks])
        ce = F.cross_entropy(logits, labels, reduction="none")
        bag_model = torch.repeat_interleave(torch.arange(self.k, device=self.dev), n_bags)
        return ce.new_zeros(self.k).index_add(0, bag_model, ce) / n_bags.to(ce.dtype)

    def _linear(self, name: str, x: Tensor, split: list[int]) -> Tensor:
        """Model k's ``Linear`` ``name`` on its ``split[k]`` consecutive rows of ``x [R, in]`` -> ``[R, out]``.

        One ``addmm`` per model on its own rows (as ``F.linear`` in its sequential fit), not one ``baddbmm`` on rows
        padded to the longest model's: on a CPU the padding would cost more arithmetic than the calls save.
        """
        w, b = self.params[f"{name}.weight"].unbind(0), self.params[f"{name}.bias"].unbind(0)
        return torch.cat([torch.addmm(b[k], part, w[k].t()) for k, part in enumerate(x.split(split))])

    def _pool(self, h: Tensor, split: list[int], seg: Tensor, pos: Tensor, shape: tuple[int, int], atts: list
              ) -> Tensor:
        """Bag embeddings ``[T, E]`` of the ``T`` bags of all models from their rows ``h [R, E]`` (row r in bag
        ``seg[r]`` at position ``pos[r] < N``; ``shape = (T, N)``)."""
        t = shape[0]
        if self.pool == "attention":
            hid = torch.tanh(self._linear("pool.V", h, split))
            if "pool.U.weight" in self.params:
                hid = hid * torch.sigmoid(self._linear("pool.U", h, split))
            if self.att_p > 0:
                hid = hid * torch.cat(atts)
            e = self._linear("pool.w", hid, split)[:, 0]
            e_pad = e.new_full(shape, float("-inf")).index_put((seg, pos), e)  # -inf at padding, as masked_softmax
            a = torch.softmax(e_pad, dim=1)[seg, pos]
            return h.new_zeros(t, h.shape[1]).index_add(0, seg, a[:, None] * h)
        if self.pool == "mean":
            n = torch.bincount(seg, minlength=t).to(h.dtype).clamp_min(1.0)
            return h.new_zeros(t, h.shape[1]).index_add(0, seg, h) / n[:, None]
        idx = seg[:, None].expand_as(h)
        return h.new_zeros(t, h.shape[1]).scatter_reduce(0, idx, h, "amax", include_self=False)


def _encoder_plan(head: MILHead) -> list[tuple[str, object]]:
    """The instance MLP as ``("linear", parameter prefix)``, ``("act", fn)``, ``("dropout", (p, width))`` steps."""
    if _row_wise_layers(head.encoder) is None:
        raise ValueError("the instance encoder is not a row-wise MLP")
    plan: list[tuple[str, object]] = []
    width = head.in_dim
    for name, m in head.encoder.named_modules(prefix="encoder"):
        if isinstance(m, nn.Linear):
            plan.append(("linear", name))
            width = m.out_features
        elif type(m) in _ACTIVATIONS:
            plan.append(("act", _ACTIVATIONS[type(m)]))
        elif isinstance(m, nn.Dropout) and m.p > 0:
            plan.append(("dropout", (m.p, width)))
    return plan


@torch.no_grad()
def _clip_per_model(params: list[Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` applied to each model's slice ``[k]`` of the stacked gradients on its own."""
    grads = [q.grad for q in params if q.grad is not None]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads])  # [P, K]
    total = norms.norm(dim=0)  # [K]
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))
