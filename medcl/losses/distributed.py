"""Gathering embeddings and ids across DDP ranks, with gradients, for unequal view counts.

Ranks often hold different numbers of views (partition samplers, dropped views, the last batch). Each
gather first exchanges the counts, pads to the largest, all-gathers, and drops the padding; the backward
pass sums the gradients every rank computed for a row and hands them to the rank that owns it.

Getting the gradient exactly right under :class:`torch.nn.parallel.DistributedDataParallel` (which
*averages* parameter gradients over ``W`` ranks): with global loss ``L = (1 / A) sum_a l_a`` over the ``A``
kept anchors of all ranks, rank ``r`` returns ``L_r = W / A * sum_{a on r} l_a``. Then
``mean_r L_r = L`` (what Lightning logs with ``sync_dist=True``) and, because the gather's backward sums
over ranks, DDP's average ``1/W sum_r dL_r/dtheta`` equals ``dL/dtheta`` of one process on the whole
batch. (Returning the plain local mean instead weights ranks with few views too much, and a gather
whose backward keeps only the local gradient loses the terms where other ranks used this rank's keys:
the classic ``1 / world_size`` scaling bug.) Without an initialised process group every function here
is the single-process identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from medcl.losses.contrastive import InfoNCEResult, Mode, info_nce_terms
from medcl.losses.ids import ContrastIds, Strategy, build_masks


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when torch.distributed is initialised with more than one rank (in ``group``)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _counts(n: int, device: torch.device, group: dist.ProcessGroup | None) -> list[int]:
    w = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(mine) for _ in range(w)]
    dist.all_gather(out, mine, group=group)
    return [int(c) for c in torch.cat(out).tolist()]  # one host sync per step, needed to slice


def rank_counts(
    n_local: int, device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None
) -> list[int]:
    """Rows held by each rank (``[n_local]`` when not distributed)."""
    if not is_distributed(group):
        return [int(n_local)]
    return _counts(int(n_local), torch.device(device), group)


class _AllGatherPadded(torch.autograd.Function):
    """``[n_max, ...]`` per rank -> ``[W, n_max, ...]``; backward: sum over ranks, keep the own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x, group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        group = ctx.group
        grad = grad.contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            own = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(own, grad, op=dist.ReduceOp.SUM, group=group)
        else:  # gloo has no reduce_scatter
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
            own = grad[dist.get_rank(group)]
        return own, None


def _pad(x: torch.Tensor, n_max: int) -> torch.Tensor:
    if x.shape[0] == n_max:
        return x
    return torch.cat([x, x.new_zeros(n_max - x.shape[0], *x.shape[1:])], dim=0)


def _unpad(stacked: torch.Tensor, counts: list[int]) -> torch.Tensor:
    keep = torch.zeros(stacked.shape[:2], dtype=torch.bool, device=stacked.device)
    for r, c in enumerate(counts):  # loop over ranks, not over views
        keep[r, :c] = True
    return stacked[keep]


def gather_with_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, counts: list[int] | None = None
) -> torch.Tensor:
    """All-gather rows of ``x`` ``[n_r, ...]`` from every rank, in rank order, with gradients.

    Ranks may hold different ``n_r``: rows are padded to ``max n_r`` (a validity mask drops the padding
    again). The backward pass sums the row gradients of all ranks and returns this rank's rows.

    Args:
        x: ``[n_r, ...]`` local rows.
        group: process group (default: the world).
        counts: ``n_r`` of every rank if already known (:func:`rank_counts`), saving one collective.

    Returns:
        ``[sum_r n_r, ...]``; ``x`` itself when not distributed.
    """
    if not is_distributed(group):
        return x
    counts = _counts(x.shape[0], x.device, group) if counts is None else counts
    stacked = _AllGatherPadded.apply(_pad(x, max(counts)), group)
    return _unpad(stacked, counts)


@torch.no_grad()
def gather_no_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, counts: list[int] | None = None
) -> torch.Tensor:
    """:func:`gather_with_grad` without autograd (ids, masks, labels)."""
    if not is_distributed(group):
        return x
    counts = _counts(x.shape[0], x.device, group) if counts is None else counts
    xp = _pad(x, max(counts)).contiguous()
    out = [torch.empty_like(xp) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, xp, group=group)
    return _unpad(torch.stack(out), counts)


def gather_ids(
    ids: ContrastIds, group: dist.ProcessGroup | None = None, counts: list[int] | None = None
) -> ContrastIds:
    """Gather :class:`ContrastIds` (all four fields in one collective)."""
    if not is_distributed(group):
        return ids
    f = ids.filled()
    packed = torch.stack([f["uid"], f["source_id"], f["partition"], f["label"]], dim=1)  # [n, 4]
    g = gather_no_grad(packed, group, counts)
    kw = {"uid": g[:, 0]}
    for i, name in enumerate(("source_id", "partition", "label"), start=1):
        kw[name] = None if getattr(ids, name) is None else g[:, i]
    return ContrastIds(**kw)


def global_offset(counts: list[int], group: dist.ProcessGroup | None = None) -> int:
    """Index of this rank's first row in the gathered order."""
    if not is_distributed(group):
        return 0
    return int(sum(counts[: dist.get_rank(group)]))


def distributed_info_nce(
    query: torch.Tensor,
    query_ids: ContrastIds,
    strategy: Strategy,
    keys: torch.Tensor | None = None,
    key_ids: ContrastIds | None = None,
    *,
    temperature: float = 0.1,
    mode: Mode = "per_pair",
    normalize: bool = True,
    group: dist.ProcessGroup | None = None,
) -> InfoNCEResult:
    """:func:`medcl.losses.info_nce` of local queries against the keys of *all* ranks, masks from global ids.

    ``keys=None`` means the keys are the queries themselves (SimCLR / G^R / G^D on one set of views). Ids
    must be global (source ids from a globally numbered sampler, uids unique across ranks, e.g.
    ``global_offset + arange``). The returned ``loss`` is this rank's share ``W / A * sum_{local} l_a``
    (module docstring): backpropagate it as is under DDP; its mean over ranks is the global loss. Counts
    are global. Works unchanged (single-process loss) when not distributed.

    Args:
        query: ``[n_r, D]`` local query embeddings.
        query_ids: their global ids.
        strategy: mask builder name (``"gr"``, ``"gd"``, ``"gd_minus"``, ``"label"``).
        keys: ``[m_r, D]`` local keys, or None (keys = queries).
        key_ids: ids of ``keys`` (needed when ``keys`` is given).
        temperature, mode, normalize: as in :func:`medcl.losses.info_nce`.
        group: process group.

    Returns:
        :class:`InfoNCEResult` with this rank's share of the loss and global anchor counts.
    """
    if query.ndim != 2:
        raise ValueError(f"query must be [n, D], got {tuple(query.shape)}")
    if len(query_ids) != query.shape[0]:
        raise ValueError(f"query_ids has {len(query_ids)} rows but query has {query.shape[0]}")
    if keys is None:
        keys, key_ids = query, query_ids
    elif key_ids is None or len(key_ids) != keys.shape[0]:
        raise ValueError("key_ids must be given with one row per key")
    distributed = is_distributed(group)
    counts = _counts(keys.shape[0], keys.device, group) if distributed else None
    all_keys = gather_with_grad(keys, group, counts)
    all_ids = gather_ids(key_ids, group, counts)
    pos, exclude = build_masks(strategy, query_ids, all_ids)
    # info_nce validates and normalises; use its core to get per-anchor terms for the global average
    with torch.autocast(device_type=query.device.type, enabled=False):
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        q = query.to(dtype)
        k = all_keys.to(dtype)
        if normalize:
            q = torch.nn.functional.normalize(q, dim=-1)
            k = torch.nn.functional.normalize(k, dim=-1)
        if not (temperature > 0):
            raise ValueError(f"temperature must be positive, got {temperature}")
        per_anchor, kept = info_nce_terms(q @ k.T / temperature, pos, exclude, mode)
        n = torch.stack([kept.sum(), torch.tensor(kept.numel(), device=kept.device)])
        if distributed:
            dist.all_reduce(n, op=dist.ReduceOp.SUM, group=group)
        world = dist.get_world_size(group) if distributed else 1
        loss = per_anchor.sum() * world / n[0].clamp_min(1).to(per_anchor.dtype)
    return InfoNCEResult(loss, n[0], n[1] - n[0])
