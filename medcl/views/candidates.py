"""Candidate crops for a model-based cross-volume matcher (the anatomical method's feature matching).

A matcher that needs the network (Alice, Jiang et al., ICCV 2023, matches crops across volumes by
anatomical embeddings) cannot run in data-loader workers. :class:`CandidatePairSampler` therefore does the
geometric part in the data pipeline: for each anchor crop of volume A it renders ``M`` candidate crops of
volume B around the normalised-position proposal (:class:`~medcl.views.mining.NormalisedMatcher`;
candidate 0 *is* the proposal, the others are shifted by up to ``search_mm`` along each world axis).
The training step embeds anchors and candidates with the EMA teacher and keeps the best candidate only when
its similarity passes a threshold (:class:`medcl.pretrain.matching.FeatureMatcher`), giving the same
``match`` groups as :class:`~medcl.views.mining.CrossVolumePairSampler`.

Views are not spatially augmented (anchor and candidates must share orientation for the similarity to
mean anything); intensity augmentation is applied independently to every view.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from medcl.core.provenance import ViewBatch
from medcl.views import _rng
from medcl.views.augment import IntensityAugment, identity_draw
from medcl.views.base import Orient, ViewSamplerBase, check_count, check_non_negative, fg_biased_points
from medcl.views.crop import CropSpec, PaddingMode, inside_fraction
from medcl.views.mining import NormalisedMatcher, snap_to_grid
from medcl.views.pending import PendingViews
from medcl.views.source import SourceVolume

ROLE_ANCHOR = 0
"""``ViewBatch.role`` of an anchor crop of volume A; candidate ``j`` of volume B has role ``1 + j``."""


class CandidatePairSampler(ViewSamplerBase):
    """Anchor crops of volume A and ``candidates`` crops of volume B per anchor.

    Args:
        crop: view size and output shape.
        n_crops: anchor crops of A per call.
        candidates: ``M`` candidate crops of B per anchor (candidate 0 = the normalised proposal).
        search_mm: candidates are shifted uniformly within ``+-search_mm`` along each world axis.
        fg_prob: probability of centring an anchor in A's foreground box.
        intensity: intensity augmentation of every view (``None`` for none).

    Call: ``sampler(vol_a, vol_b, generator) -> (ViewBatch, info)`` with ``N = n (1 + M)`` views: the ``n``
    anchors, then the ``n M`` candidates (anchor-major); ``role`` is 0 for anchors and ``1 + j`` for
    candidate ``j``; ``match`` is the anchor's row ``k`` for the anchor and all its candidates (the step
    rewrites it after matching). ``info["inside"]``: ``[n, M]`` fraction of each candidate inside B.
    """

    def __init__(
        self,
        crop: CropSpec | None = None,
        n_crops: int = 2,
        candidates: int = 8,
        search_mm: float = 8.0,
        fg_prob: float = 0.9,
        intensity: IntensityAugment | None = None,
        orient: Orient = "ras",
        padding_mode: PaddingMode = "border",
    ) -> None:
        super().__init__(crop, None, intensity, orient, padding_mode, fg_prob)
        self.n_crops = check_count("n_crops", n_crops)
        self.candidates = check_count("candidates", candidates)
        self.search_mm = check_non_negative("search_mm", search_mm)
        self.proposer = NormalisedMatcher()

    def __call__(
        self, vol_a: SourceVolume, vol_b: SourceVolume, generator: torch.Generator
    ) -> tuple[ViewBatch, dict[str, torch.Tensor]]:
        pending, info = self.plan(vol_a, vol_b, generator)
        return pending.render(), info

    def plan(
        self, vol_a: SourceVolume, vol_b: SourceVolume, generator: torch.Generator
    ) -> tuple[PendingViews, dict[str, torch.Tensor]]:
        """Every draw of :meth:`__call__`, views not rendered (:class:`~medcl.views.pending.PendingViews`)."""
        n, m, shape = self.n_crops, self.candidates, self.crop.shape
        centres = fg_biased_points(vol_a, n, self.fg_prob, generator)
        vox_a = self.vox_maps(vol_a, centres, identity_draw(n), clamp=True)
        affine_a = vol_a.affine @ vox_a
        proposal = self.proposer.propose(vol_a, vol_b, affine_a, shape)  # [n, 4, 4] view voxel -> B mm
        shift = _rng.uniform_between(generator, -self.search_mm, self.search_mm, n, m, 3)
        shift[:, 0] = 0.0
        cand = proposal[:, None].repeat(1, m, 1, 1)
        cand[..., :3, 3] += shift
        cand = cand.reshape(n * m, 4, 4)
        vox_b = snap_to_grid(torch.linalg.inv(vol_b.affine) @ cand, shape, vol_b.shape)
        inside = inside_fraction(vox_b, shape, vol_b.shape).reshape(n, m)
        job_a = self.job(vox_a, generator)
        job_b = self.job(vox_b, generator)
        batch = PendingViews.cat([self.pending(vol_a, job_a), self.pending(vol_b, job_b)])
        anchor = torch.arange(n)
        role = torch.cat([torch.full((n,), ROLE_ANCHOR), 1 + torch.arange(m).repeat(n)])
        match = torch.cat([anchor, anchor.repeat_interleave(m)])
        return replace(batch, role=role.long(), match=match.long()), {"inside": inside}
