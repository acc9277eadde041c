"""Feature matching of cross-volume crops with the EMA encoder (the anatomical method's miner).

Alice (Jiang et al., ICCV 2023) pairs crops of different volumes that show the same anatomy, found by
matching embeddings. Here the data pipeline renders, for every anchor crop of volume A, ``M`` candidate
crops of volume B around the normalised-position proposal
(:class:`medcl.views.candidates.CandidatePairSampler`); :class:`FeatureMatcher` embeds anchors and
candidates with the EMA teacher's flattened bottleneck, and keeps the most similar candidate
as the anchor's positive **only** if its cosine similarity is at least ``threshold`` and beats the
runner-up by ``margin`` (a low-confidence match is rejected, not accepted after some tries). Before
``warmup_steps`` (the teacher knows nothing yet) the geometric proposal, candidate 0, is used, accepted
when it lies mostly inside B.

The result is an ordinary pair batch (anchors, then their chosen candidates, ``match`` = the pair's group
or -1) that the contrastive term consumes with ``strategy: match``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from medcl.core.provenance import ViewBatch
from medcl.views.candidates import ROLE_ANCHOR


class FeatureMatcher:
    """Select each anchor's positive among its candidates by EMA-encoder similarity.

    Args:
        threshold: minimum cosine similarity of an accepted match.
        margin: minimum lead of the best candidate over the second best (ambiguous matches rejected).
        warmup_steps: steps during which the geometric proposal (candidate 0) is used.
        min_inside: during warm-up, minimum fraction of the proposal inside volume B.
    """

    def __init__(self, threshold: float = 0.5, margin: float = 0.0, warmup_steps: int = 0, min_inside: float = 0.5):
        self.threshold = threshold
        self.margin = margin
        self.warmup_steps = warmup_steps
        self.min_inside = min_inside

    @torch.no_grad()
    def scores(self, teacher_backbone, views: Tensor, anchor: Tensor, cand: Tensor) -> Tensor:
        """``[n, M]`` cosine similarity of each anchor's candidates to the anchor (teacher bottleneck)."""
        z = F.normalize(teacher_backbone(views, upto="bottleneck").bottleneck.flatten(1).float(), dim=1)
        return torch.einsum("nd,nmd->nm", z[anchor], z[cand])

    def __call__(
        self, vb: ViewBatch, uid: Tensor, step: int, teacher_backbone, inside: Tensor | None = None
    ) -> tuple[ViewBatch, Tensor, dict[str, Tensor]]:
        """``(pair batch [2n], its uids, stats)`` from a candidate batch.

        Args:
            vb: a collated :class:`CandidatePairSampler` batch (``role``: 0 anchors, ``1 + j`` candidates).
            uid: ``[N]`` global view ids.
            step: the global step (warm-up).
            teacher_backbone: the EMA teacher's backbone.
            inside: ``[n, M]`` fraction of each candidate inside its volume (from the sampler's info).
        """
        anchor = (vb.role == ROLE_ANCHOR).nonzero().squeeze(1)  # [n]
        n = anchor.numel()
        cand = (vb.role != ROLE_ANCHOR).nonzero().squeeze(1).view(n, -1)  # [n, M], anchor-major
        m = cand.shape[1]
        if step < self.warmup_steps:
            best = torch.zeros(n, dtype=torch.long, device=cand.device)
            ok = inside[:, 0] >= self.min_inside if inside is not None else torch.ones(n, dtype=torch.bool, device=cand.device)
            score = inside[:, 0] if inside is not None else torch.ones(n, device=cand.device)
        else:
            s = self.scores(teacher_backbone, vb.views, anchor, cand)
            top = s.topk(min(2, m), dim=1)
            best = top.indices[:, 0]
            score = top.values[:, 0]
            lead = top.values[:, 0] - top.values[:, 1] if m > 1 else torch.full_like(score, float("inf"))
            ok = (score >= self.threshold) & (lead >= self.margin)
        chosen = cand.gather(1, best[:, None]).squeeze(1)
        rows = torch.cat([anchor, chosen])
        out = vb.select(rows)
        # pair k = rows k and n + k of the output (the ViewBatch convention: a group is named by a row)
        group = torch.where(ok, torch.arange(n, device=ok.device), torch.full((n,), -1, device=ok.device))
        out = replace(out, match=torch.cat([group, group]), role=None)
        stats = {"acceptance": ok.float().mean(), "score": score.float().mean()}
        return out, uid[rows], stats
