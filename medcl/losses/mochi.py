"""MoCHi hard-negative mixing (Kalantidis, Sariyildiz, Pion, Weinzaepfel and Larlus, NeurIPS 2020).

"Hard Negative Mixing for Contrastive Learning": for every query, synthesise extra negatives by mixing its
``N`` hardest negatives pairwise (``s`` of them), and by mixing the query itself with one of them
(``s'`` harder ones, the query's share kept below 1/2 so they stay negatives). The synthetic negatives
belong to one query each; pass them to :func:`medcl.losses.info_nce` as ``extra_negatives`` (memory
``Nq * (s + s')``), or, for small batches, append them as keys with :func:`mochi_as_keys`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class MochiNegatives(NamedTuple):
    """Synthetic negatives per query.

    Attributes:
        negatives: ``[Nq, s + s', D]`` L2-normalised (pairwise mixes first, then query mixes).
        valid: ``[Nq, s + s']`` bool, False for queries without any real negative to mix.
    """

    negatives: torch.Tensor
    valid: torch.Tensor


def mochi_negatives(
    query: torch.Tensor,
    keys: torch.Tensor,
    pos_mask: torch.Tensor,
    exclude_mask: torch.Tensor | None = None,
    *,
    n_hard: int = 64,
    n_mix: int = 32,
    n_query_mix: int = 16,
    beta_max: float = 0.5,
    generator: torch.Generator | None = None,
    detach: bool = True,
) -> MochiNegatives:
    """Synthesise hard negatives for each query (Kalantidis et al., 2020).

    With ``q`` and keys L2-normalised and ``Q_N(q)`` the ``n_hard`` negatives of ``q`` most similar to it
    (negatives: neither positive nor excluded, as in :func:`medcl.losses.info_nce`):

    * ``n_mix`` negatives ``h = normalize(a * n_i + (1 - a) * n_j)``, ``n_i, n_j`` drawn from ``Q_N(q)``,
      ``a ~ U(0, 1)``;
    * ``n_query_mix`` negatives ``h' = normalize(b * q + (1 - b) * n_j)``, ``b ~ U(0, beta_max)``.

    Args:
        query: ``[Nq, D]``; keys: ``[Nk, D]``.
        pos_mask, exclude_mask: ``[Nq, Nk]`` bool, the masks used for the loss.
        n_hard: ``N``, how many hardest negatives to mix from (fewer if a query has fewer negatives).
        n_mix: ``s``; n_query_mix: ``s'``.
        beta_max: upper bound of the query's share (the paper uses 0.5).
        generator: for reproducible draws (its device is used for drawing).
        detach: synthetic negatives carry no gradient (default, as the paper's memory negatives).

    Returns:
        :class:`MochiNegatives`.
    """
    if query.ndim != 2 or keys.ndim != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(
            f"query must be [Nq, D] and keys [Nk, D], got {tuple(query.shape)}, {tuple(keys.shape)}"
        )
    nq, nk = query.shape[0], keys.shape[0]
    if pos_mask.shape != (nq, nk) or (exclude_mask is not None and exclude_mask.shape != (nq, nk)):
        raise ValueError(f"pos_mask and exclude_mask must be [Nq, Nk] = {(nq, nk)}")
    if n_hard <= 0 or n_mix < 0 or n_query_mix < 0 or not (0.0 < beta_max <= 1.0):
        raise ValueError(
            f"need n_hard > 0, n_mix >= 0, n_query_mix >= 0, 0 < beta_max <= 1; got {n_hard}, {n_mix}, "
            f"{n_query_mix}, {beta_max}"
        )
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = F.normalize(query.float(), dim=-1)
        k = F.normalize(keys.float(), dim=-1)
        if detach:
            q, k = q.detach(), k.detach()
        neg = ~pos_mask if exclude_mask is None else ~(pos_mask | exclude_mask)
        n_top = max(1, min(n_hard, nk))
        sims = (q @ k.T).masked_fill(~neg, float("-inf"))
        top = sims.topk(n_top, dim=1).indices  # [Nq, n_top]
        n_avail = neg.sum(1).clamp(max=n_top)  # [Nq]
        hard = k[top]  # [Nq, n_top, D]
        gdev = generator.device if generator is not None else q.device

        def draw(n: int) -> torch.Tensor:
            return torch.rand(nq, n, generator=generator, device=gdev).to(q.device)

        def pick(n: int) -> torch.Tensor:
            i = (draw(n) * n_avail[:, None]).long().clamp(max=n_top - 1).clamp_min(0)
            return hard.gather(1, i[..., None].expand(-1, -1, hard.shape[-1]))  # [Nq, n, D]

        parts = []
        if n_mix:
            a = draw(n_mix)[..., None]
            parts.append(F.normalize(a * pick(n_mix) + (1 - a) * pick(n_mix), dim=-1))
        if n_query_mix:
            b = beta_max * draw(n_query_mix)[..., None]
            parts.append(F.normalize(b * q[:, None] + (1 - b) * pick(n_query_mix), dim=-1))
        out = torch.cat(parts, dim=1) if parts else q.new_zeros(nq, 0, q.shape[1])
        valid = (n_avail > 0)[:, None].expand(nq, out.shape[1])
    return MochiNegatives(out, valid)


def mochi_as_keys(
    keys: torch.Tensor,
    pos_mask: torch.Tensor,
    exclude_mask: torch.Tensor | None,
    mochi: MochiNegatives,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append the synthetic negatives as ordinary keys, with the masks that keep them per query.

    Key ``Nk + i * E + e`` is synthetic negative ``e`` of query ``i``: a negative for query ``i`` (when
    valid) and excluded for every other query. Equivalent to ``info_nce(..., extra_negatives=...)`` but
    with ``Nq * Nq * E`` logits, so only for small batches.

    Returns:
        ``(keys [Nk + Nq * E, D], pos [Nq, Nk + Nq * E], exclude [Nq, Nk + Nq * E])``.
    """
    nq, e, d = mochi.negatives.shape
    if pos_mask.shape[0] != nq:
        raise ValueError(f"mochi has {nq} queries but pos_mask has {pos_mask.shape[0]} rows")
    exclude_mask = torch.zeros_like(pos_mask) if exclude_mask is None else exclude_mask
    own = (
        torch.eye(nq, dtype=torch.bool, device=keys.device)[:, :, None] & mochi.valid[:, None, :]
    )  # [Nq, Nq, E]
    new_keys = torch.cat([keys, mochi.negatives.reshape(nq * e, d).to(keys.dtype)], dim=0)
    pos = torch.cat([pos_mask, torch.zeros(nq, nq * e, dtype=torch.bool, device=keys.device)], dim=1)
    exclude = torch.cat([exclude_mask, ~own.reshape(nq, nq * e)], dim=1)
    return new_keys, pos, exclude
