"""Label-free health checks of self-supervised embeddings (logged next to the loss).

Collapse shows in these numbers before it shows in the loss:

* :func:`embedding_std` -- the per-dimension standard deviation of L2-normalised embeddings, averaged
  over dimensions (Chen & He, SimSiam, 2021): about ``1 / sqrt(D)`` for well-spread embeddings, 0 when
  every view maps to the same point.
* :func:`effective_rank` -- ``exp(H(p))`` with ``p`` the normalised singular values of the centred
  embedding matrix (Roy & Vetterli, 2007): how many directions the batch really uses (1 when collapsed
  to a line, up to ``min(N, D)``).
* :func:`knn_accuracy` -- leave-one-group-out k-nearest-neighbour accuracy (cosine similarity, majority
  vote): with partition indices as labels and volumes as groups it is the label-free probe of whether the
  encoder knows *where* in the body a crop comes from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised embeddings ``z [N, D]`` -> scalar tensor (no sync)."""
    if z.shape[0] < 2:
        return torch.zeros((), device=z.device)
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def effective_rank(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, 2007) of ``z [N, D]`` -> scalar tensor in ``[1, min(N, D)]``."""
    if z.shape[0] < 2:
        return torch.ones((), device=z.device)
    zc = z.float() - z.float().mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(zc)
    p = s / s.sum().clamp_min(eps)
    entropy = -(p * torch.log(p.clamp_min(eps))).sum()
    return torch.exp(entropy)


@torch.no_grad()
def knn_accuracy(emb: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, k: int = 5) -> float:
    """Leave-one-group-out k-NN accuracy.

    Args:
        emb: ``[N, D]`` embeddings.
        labels: ``[N]`` int64 class of each embedding (e.g. partition index).
        groups: ``[N]`` int64 group (e.g. volume id); neighbours come only from *other* groups, so a crop
            is never matched with its own volume.
        k: neighbours (clamped to the number of candidates).

    Returns:
        The fraction of embeddings whose majority-vote label (ties broken by summed similarity) is right;
        ``nan`` when no embedding has a neighbour in another group.
    """
    z = F.normalize(emb.float(), dim=1)
    sim = z @ z.T
    sim.masked_fill_(groups[:, None] == groups[None, :], float("-inf"))
    n_cand = int((groups[:, None] != groups[None, :]).sum(dim=1).min())
    if n_cand == 0:
        return float("nan")
    k = max(1, min(k, n_cand))
    top_sim, top_idx = sim.topk(k, dim=1)
    n_cls = int(labels.max()) + 1
    votes = torch.zeros(z.shape[0], n_cls, dtype=torch.float64)
    # one vote per neighbour plus a tiny similarity-weighted term that only breaks ties
    weight = 1.0 + 1e-6 * top_sim.double().clamp(-1, 1)
    votes.scatter_add_(1, labels[top_idx], weight)
    pred = votes.argmax(dim=1)
    return float((pred == labels).double().mean())
