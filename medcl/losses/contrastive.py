"""One masked InfoNCE over rectangular similarities, and the mask builders (DESIGN.md, idea 1).

Every contrastive objective of medcl is the same function, :func:`info_nce`, called with a different
positive mask and exclusion mask:

==============  ===========================================================  ==================
builder         positives of an anchor                                        excluded
==============  ===========================================================  ==================
``gr``          same source volume, another view (SimCLR / Chaitanya G^R)     itself
``gd``          same partition index (>= 0), any volume (Chaitanya G^D)       itself
``gd_minus``    same source *and* same partition (Chaitanya G^D-)             itself, same
                                                                              partition of other
                                                                              volumes
``label``       same label (>= 0) (Khosla SupCon, INS, SC-MIL)                itself
==============  ===========================================================  ==================

``uid`` identifies a view (or a MIL instance) itself: a key with the anchor's uid is the anchor (or its
own stale copy in a queue) and is never a positive nor a negative. Ids are ``[N]`` integer tensors and
must be global across ranks when keys are gathered (see :mod:`medcl.losses.distributed`); where ids travel
with embeddings (queue, DDP) they are bundled as :class:`medcl.losses.ids.ContrastIds`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

Mode = Literal["per_pair", "supcon", "dcl"]
MODES: tuple[str, ...] = ("per_pair", "supcon", "dcl")


class InfoNCEResult(NamedTuple):
    """What :func:`info_nce` returns.

    Attributes:
        loss: scalar, the mean over kept anchors (0 with a gradient path when none is kept).
        n_anchors: 0-dim int64 tensor, anchors kept.
        n_dropped: 0-dim int64 tensor, anchors dropped (no positive; in ``dcl`` also no negative).
    """

    loss: torch.Tensor
    n_anchors: torch.Tensor
    n_dropped: torch.Tensor


def _check_inputs(
    query: torch.Tensor,
    keys: torch.Tensor,
    pos_mask: torch.Tensor,
    exclude_mask: torch.Tensor | None,
    temperature: float,
    mode: str,
    extra_negatives: torch.Tensor | None,
    extra_mask: torch.Tensor | None = None,
) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if query.ndim < 2 or keys.ndim != query.ndim:
        raise ValueError(
            f"query must be [..., Nq, D] and keys [..., Nk, D] with the same leading dims, got "
            f"{tuple(query.shape)} and {tuple(keys.shape)}"
        )
    if query.shape[:-2] != keys.shape[:-2] or query.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"query {tuple(query.shape)} and keys {tuple(keys.shape)} disagree on batch dims or embedding size D"
        )
    expected = (*query.shape[:-1], keys.shape[-2])
    for name, m in (("pos_mask", pos_mask), ("exclude_mask", exclude_mask)):
        if m is None:
            continue
        if m.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor, got {m.dtype}")
        if tuple(m.shape) != tuple(expected):
            raise ValueError(
                f"{name} must have shape [..., Nq, Nk] = {tuple(expected)}, got {tuple(m.shape)}"
            )
    if extra_negatives is not None:
        if (
            extra_negatives.ndim != query.ndim + 1
            or extra_negatives.shape[:-2] != query.shape[:-1]
            or (extra_negatives.shape[-1] != query.shape[-1])
        ):
            raise ValueError(
                f"extra_negatives must be [..., Nq, E, D] matching query {tuple(query.shape)}, "
                f"got {tuple(extra_negatives.shape)}"
            )
        if extra_mask is not None and (
            extra_mask.dtype != torch.bool or tuple(extra_mask.shape) != tuple(extra_negatives.shape[:-1])
        ):
            raise ValueError(
                f"extra_mask must be a bool [..., Nq, E] = {tuple(extra_negatives.shape[:-1])} tensor, got "
                f"{extra_mask.dtype} {tuple(extra_mask.shape)}"
            )
    elif extra_mask is not None:
        raise ValueError("extra_mask given without extra_negatives")


def info_nce_terms(
    logits: torch.Tensor,
    pos_mask: torch.Tensor,
    exclude_mask: torch.Tensor | None = None,
    mode: Mode = "per_pair",
    extra_logits: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor InfoNCE losses from already-scaled logits (the core of :func:`info_nce`).

    Args:
        logits: ``[..., Nq, Nk]`` similarities divided by the temperature (any float dtype; computed in
            float32 or float64).
        pos_mask: ``[..., Nq, Nk]`` bool, True where key ``k`` is a positive of anchor ``q``.
        exclude_mask: ``[..., Nq, Nk]`` bool or None, True where the pair is neither positive nor negative.
        mode: ``"per_pair"``, ``"supcon"`` or ``"dcl"`` (see :func:`info_nce`).
        extra_logits: ``[..., Nq, E]`` logits of per-anchor extra negatives (MoCHi) or None.
        extra_mask: ``[..., Nq, E]`` bool, True where an extra negative is real (None: all are).

    Returns:
        ``(per_anchor, kept)``: ``[..., Nq]`` float loss of each anchor (0 where not kept, always finite) and
        ``[..., Nq]`` bool, the anchors kept.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if pos_mask.shape != logits.shape or (exclude_mask is not None and exclude_mask.shape != logits.shape):
        raise ValueError(f"masks must have the logits' shape {tuple(logits.shape)}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype)
    # A large finite fill instead of -inf: logsumexp over an all-filled row stays finite, so gradients
    # never see inf - inf (the filled entries get zero gradient through masked_fill anyway).
    fill = torch.finfo(dtype).min / 4
    pos = pos_mask if exclude_mask is None else pos_mask & ~exclude_mask
    neg = ~pos_mask if exclude_mask is None else ~(pos_mask | exclude_mask)
    n_pos = pos.sum(-1)
    has_neg = neg.any(-1)
    if extra_logits is not None:
        extra_logits = extra_logits.to(dtype)
        if extra_mask is not None:
            extra_logits = extra_logits.masked_fill(~extra_mask, fill)
            has_neg = has_neg | extra_mask.any(-1)
        else:
            has_neg = has_neg | (extra_logits.shape[-1] > 0)
    kept = n_pos > 0
    if mode == "dcl":
        kept = kept & has_neg
    n_pos_f = n_pos.clamp_min(1).to(dtype)

    if mode == "supcon":
        allowed = pos | neg
        z = logits.masked_fill(~allowed, fill)
        if extra_logits is not None:
            z = torch.cat([z, extra_logits], dim=-1)
        log_den = torch.logsumexp(z, dim=-1)  # [..., Nq]
        mean_pos = (logits.masked_fill(~pos, 0.0)).sum(-1) / n_pos_f
        per_anchor = log_den - mean_pos
    else:
        zn = logits.masked_fill(~neg, fill)
        if extra_logits is not None:
            zn = torch.cat([zn, extra_logits], dim=-1)
        neg_lse = torch.logsumexp(zn, dim=-1, keepdim=True)  # [..., Nq, 1]
        if mode == "per_pair":
            # -log(e^{s_p} / (e^{s_p} + sum_n e^{s_n})) = logaddexp(s_p, lse_neg) - s_p
            per_pair = torch.logaddexp(logits, neg_lse) - logits
        else:  # dcl: -log(e^{s_p} / sum_n e^{s_n})
            per_pair = neg_lse - logits
        per_anchor = per_pair.masked_fill(~pos, 0.0).sum(-1) / n_pos_f
    per_anchor = torch.where(kept, per_anchor, torch.zeros_like(per_anchor))
    return per_anchor, kept


def info_nce(
    query: torch.Tensor,
    keys: torch.Tensor,
    pos_mask: torch.Tensor,
    exclude_mask: torch.Tensor | None = None,
    temperature: float = 0.1,
    mode: Mode = "per_pair",
    normalize: bool = True,
    *,
    extra_negatives: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> InfoNCEResult:
    """Masked InfoNCE of queries against keys, with three denominator modes.

    With ``s_qk = <q, k> / temperature`` (cosine similarity when ``normalize``), ``P(q)`` the positives
    of anchor ``q`` (``pos_mask`` and not ``exclude_mask``) and ``N(q)`` its negatives (neither positive nor
    excluded), the loss of anchor ``q`` is

    * ``per_pair`` (Chaitanya et al., NeurIPS 2020, the form of their G^D loss; with exactly one positive
      per anchor it *is* SimCLR's NT-Xent, Chen et al. 2020)::

          l_q = 1/|P(q)| sum_{p in P(q)} -log( e^{s_qp} / (e^{s_qp} + sum_{n in N(q)} e^{s_qn}) )

    * ``supcon`` (Khosla et al., NeurIPS 2020, L_out; the denominator holds every non-excluded key)::

          l_q = 1/|P(q)| sum_{p in P(q)} -log( e^{s_qp} / sum_{a in P(q) u N(q)} e^{s_qa} )

    * ``dcl`` (decoupled contrastive learning, Yeh et al., ECCV 2022; positives out of the denominator)::

          l_q = 1/|P(q)| sum_{p in P(q)} -log( e^{s_qp} / sum_{n in N(q)} e^{s_qn} )

    Averaging: per anchor over its positives (as above), then the plain mean over the kept anchors (all
    leading batch dims pooled). An anchor with no positive (in ``dcl`` also one with no negative) is
    dropped and counted in ``n_dropped``; it never produces NaN. When no anchor is kept the loss is 0 and
    still attached to the graph. Computed in float32 (float64 inputs stay float64) with masked
    ``logsumexp``, so it is stable under fp16/bf16 autocast and for small temperatures.

    Args:
        query: ``[..., Nq, D]`` anchor embeddings (optional leading batch dims, e.g. ``[B, Nq, D]`` for one
            independent problem per image in the dense loss).
        keys: ``[..., Nk, D]`` key embeddings (the same views, a queue, other ranks' views, ...).
        pos_mask: ``[..., Nq, Nk]`` bool, True where key ``k`` is a positive of anchor ``q``.
        exclude_mask: ``[..., Nq, Nk]`` bool, True where the pair counts neither as positive nor as negative
            (the anchor itself, a stale copy, same partition of another volume in G^D-). None: nothing.
        temperature: softmax temperature ``> 0``.
        mode: ``"per_pair"`` (default), ``"supcon"`` or ``"dcl"``.
        normalize: L2-normalise query, keys and extra negatives along D first (cosine similarity).
        extra_negatives: ``[..., Nq, E, D]`` per-anchor extra negatives (MoCHi's synthetic hard negatives,
            :func:`medcl.losses.mochi.mochi_negatives`), or None. They join every denominator of their anchor
            and never count as positives; memory ``Nq * E``.
        extra_mask: ``[..., Nq, E]`` bool, which extra negatives are real (None: all).

    Returns:
        :class:`InfoNCEResult` ``(loss, n_anchors, n_dropped)``; the counts are tensors (no host sync).

    Raises:
        ValueError: on a bad mode or temperature, or when shapes or mask dtypes disagree.

    Example::

        # SimCLR / G^R on 2 views per volume: z [2B, D], src [2B] (volume ids), uid = arange(2B)
        pos, excl = gr_masks(src, uid, src, uid)
        loss = info_nce(z, z, pos, excl, temperature=0.1).loss
    """
    _check_inputs(query, keys, pos_mask, exclude_mask, temperature, mode, extra_negatives, extra_mask)
    with torch.autocast(device_type=query.device.type, enabled=False):
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        q = query.to(dtype)
        k = keys.to(dtype)
        if normalize:
            q = F.normalize(q, dim=-1)
            k = F.normalize(k, dim=-1)
        logits = (q @ k.transpose(-1, -2)) / temperature  # [..., Nq, Nk]
        extra_logits = None
        if extra_negatives is not None:
            e = extra_negatives.to(dtype)
            if normalize:
                e = F.normalize(e, dim=-1)
            extra_logits = (e @ q.unsqueeze(-1)).squeeze(-1) / temperature  # [..., Nq, E]
        per_anchor, kept = info_nce_terms(logits, pos_mask, exclude_mask, mode, extra_logits, extra_mask)
        n_kept = kept.sum()
        loss = per_anchor.sum() / n_kept.clamp_min(1).to(per_anchor.dtype)
    return InfoNCEResult(loss, n_kept, kept.numel() - n_kept)


# --------------------------------------------------------------------------------------------- masks


def check_ids(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 1-D integer id tensor; ValueError naming ``name`` otherwise."""
    t = torch.as_tensor(t)
    if t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D [N] id tensor, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    return t


def _same(name_q: str, a: torch.Tensor, name_k: str, b: torch.Tensor) -> torch.Tensor:
    a = check_ids(name_q, a)
    b = check_ids(name_k, b)
    if a.device != b.device:
        raise ValueError(f"{name_q} and {name_k} are on different devices ({a.device}, {b.device})")
    return a[:, None] == b[None, :]


def _check_len(**ids: torch.Tensor) -> None:
    q = {k: int(v.shape[0]) for k, v in ids.items() if k.endswith("_q")}
    k = {n: int(v.shape[0]) for n, v in ids.items() if n.endswith("_k")}
    for group in (q, k):
        if len(set(group.values())) > 1:
            raise ValueError(f"id tensors of one side must have equal length, got {group}")


def gr_masks(
    src_q: torch.Tensor, uid_q: torch.Tensor, src_k: torch.Tensor, uid_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """G^R (SimCLR) masks: positives are other views of the same source volume.

    Args:
        src_q, uid_q: ``[Nq]`` source ids and view uids of the queries.
        src_k, uid_k: ``[Nk]`` the same for the keys.

    Returns:
        ``(pos, exclude)`` ``[Nq, Nk]`` bool: ``pos = same source & other uid``, ``exclude = same uid``.
    """
    _check_len(src_q=src_q, uid_q=uid_q, src_k=src_k, uid_k=uid_k)
    self_ = _same("uid_q", uid_q, "uid_k", uid_k)
    return _same("src_q", src_q, "src_k", src_k) & ~self_, self_


def gd_masks(
    part_q: torch.Tensor, uid_q: torch.Tensor, part_k: torch.Tensor, uid_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """G^D masks (Chaitanya et al., 2020): positives share the partition index, from any volume.

    A partition of ``-1`` (not partitioned) is never a positive of anything; such keys are negatives.

    Args:
        part_q, uid_q: ``[Nq]`` partition indices and uids of the queries.
        part_k, uid_k: ``[Nk]`` the same for the keys.

    Returns:
        ``(pos, exclude)`` ``[Nq, Nk]`` bool: ``pos = same partition >= 0 & other uid``, ``exclude = same uid``.
    """
    _check_len(part_q=part_q, uid_q=uid_q, part_k=part_k, uid_k=uid_k)
    self_ = _same("uid_q", uid_q, "uid_k", uid_k)
    same_part = _same("part_q", part_q, "part_k", part_k) & (part_q >= 0)[:, None]
    return same_part & ~self_, self_


def gd_minus_masks(
    src_q: torch.Tensor,
    part_q: torch.Tensor,
    uid_q: torch.Tensor,
    src_k: torch.Tensor,
    part_k: torch.Tensor,
    uid_k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """G^D- masks (Chaitanya et al., 2020): positives share source *and* partition; the same partition of
    other volumes is excluded (neither positive nor negative); other partitions are negatives.

    Args:
        src_q, part_q, uid_q: ``[Nq]`` source ids, partitions and uids of the queries.
        src_k, part_k, uid_k: ``[Nk]`` the same for the keys.

    Returns:
        ``(pos, exclude)`` ``[Nq, Nk]`` bool: ``pos = same source & same partition >= 0 & other uid``,
        ``exclude = same uid | (same partition >= 0 & other source)``.
    """
    _check_len(src_q=src_q, part_q=part_q, uid_q=uid_q, src_k=src_k, part_k=part_k, uid_k=uid_k)
    self_ = _same("uid_q", uid_q, "uid_k", uid_k)
    same_src = _same("src_q", src_q, "src_k", src_k)
    same_part = _same("part_q", part_q, "part_k", part_k) & (part_q >= 0)[:, None]
    pos = same_src & same_part & ~self_
    exclude = self_ | (same_part & ~same_src)
    return pos, exclude


def label_masks(
    label_q: torch.Tensor, uid_q: torch.Tensor, label_k: torch.Tensor, uid_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label masks (SupCon, Khosla et al. 2020; INS and SC-MIL pseudo labels): positives share the label.

    A negative label (e.g. ``-1``, unlabelled) is never a positive of anything; such keys are negatives.

    Args:
        label_q, uid_q: ``[Nq]`` integer labels and uids of the queries.
        label_k, uid_k: ``[Nk]`` the same for the keys.

    Returns:
        ``(pos, exclude)`` ``[Nq, Nk]`` bool: ``pos = same label >= 0 & other uid``, ``exclude = same uid``.
    """
    _check_len(label_q=label_q, uid_q=uid_q, label_k=label_k, uid_k=uid_k)
    self_ = _same("uid_q", uid_q, "uid_k", uid_k)
    same = _same("label_q", label_q, "label_k", label_k) & (label_q >= 0)[:, None]
    return same & ~self_, self_
