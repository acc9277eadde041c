"""Cross-volume positives: geometric correspondences and SSIM-mined structural matches.

A *matcher* maps crops of volume A to crops of volume B that show the same anatomy::

    matcher(vol_a, vol_b, affine_a [n, 4, 4], shape (D, H, W), generator) -> MatchResult

with ``affine_a`` view voxel -> A mm. :class:`NormalisedMatcher` (the geometric baseline) and
:class:`SSIMMatcher` (refined by structural similarity) live here; the model-based feature-matching
miner of the anatomical method (Alice, Jiang et al., ICCV 2023, which matches crops across volumes with
self-supervised anatomical embeddings, SAM of Yan et al., 2022) belongs to that pretraining method and has the same interface.
:class:`CrossVolumePairSampler` turns any matcher into a pair sampler with a :class:`ViewBatch` whose
``match`` field marks the accepted pairs. A rejected match is never turned into a positive.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple, Protocol

import torch

from medcl.core.errors import MedclConfigError
from medcl.core.provenance import ViewBatch
from medcl.views.augment import IntensityAugment, SpatialAugment, augment_affine, identity_draw
from medcl.views.base import (
    Default,
    Orient,
    ViewSamplerBase,
    check_count,
    fg_biased_points,
)
from medcl.views.crop import CropSpec, PaddingMode, inside_fraction, place_crops, render
from medcl.views.pending import PendingViews, RenderJob
from medcl.views.source import SourceVolume
from medcl.views.ssim import ssim3d


class MatchResult(NamedTuple):
    """What a matcher returns for ``n`` crops of volume A.

    Attributes:
        affine: ``[n, 4, 4]`` float64 view voxel -> B mm, the matched crop in B (also when rejected: the
            best candidate, for inspection).
        score: ``[n]`` the match score (matcher-specific; higher is better).
        accepted: ``[n]`` bool, the score passed the matcher's threshold.
    """

    affine: torch.Tensor
    score: torch.Tensor
    accepted: torch.Tensor


class Matcher(Protocol):
    """``(vol_a, vol_b, affine_a [n, 4, 4], shape, generator) -> MatchResult``."""

    def __call__(
        self,
        vol_a: SourceVolume,
        vol_b: SourceVolume,
        affine_a: torch.Tensor,
        shape: tuple[int, int, int],
        generator: torch.Generator | None = None,
    ) -> MatchResult: ...


def _centre_h(shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(s - 1) / 2 for s in shape] + [1.0], dtype=torch.float64)


def snap_to_grid(vox_map: torch.Tensor, shape: tuple[int, int, int], volume_shape: tuple[int, int, int]) -> torch.Tensor:
    """Move each crop ``[N, 4, 4]`` (view voxel -> source voxel) by < 1 voxel so that unscaled,
    axis-aligned crops sample voxel centres exactly (other crops are returned unchanged)."""
    centre = (vox_map.double() @ _centre_h(shape).to(vox_map.device))[:, :3]
    return place_crops(vox_map[:, :3, :3].double().cpu(), shape, centre.cpu(), volume_shape, clamp=False).to(vox_map.device)


class NormalisedMatcher:
    """Geometric baseline: the crop of B at the same normalised foreground-box position.

    The centre of A's crop is mapped to normalised coordinates ``u = norm_a(x)`` (see
    :class:`~medcl.views.source.SourceVolume`) and back into B with ``inv(norm_b)``. With
    ``scale_to_box=False`` the B crop keeps A's size and orientation in mm (a translation); with
    ``scale_to_box=True`` it is A's crop mapped through ``inv(norm_b) @ norm_a`` (stretched per axis by
    the ratio of the foreground boxes). A match is accepted when at least ``min_inside`` of the B crop
    lies inside B; the score is that fraction.
    """

    def __init__(self, scale_to_box: bool = False, min_inside: float = 0.5) -> None:
        if not 0.0 <= min_inside <= 1.0:
            raise MedclConfigError("mining.min_inside", f"must be in [0, 1], got {min_inside}")
        self.scale_to_box = scale_to_box
        self.min_inside = min_inside

    def propose(
        self, vol_a: SourceVolume, vol_b: SourceVolume, affine_a: torch.Tensor, shape: tuple[int, int, int]
    ) -> torch.Tensor:
        """``[n, 4, 4]`` view voxel -> B mm at the same normalised position (on ``affine_a``'s device)."""
        dev = affine_a.device
        affine_a = affine_a.double()
        to_b = torch.linalg.inv(vol_b.norm).to(dev) @ vol_a.norm.to(dev)  # A mm -> B mm by normalised position
        if self.scale_to_box:
            return to_b @ affine_a
        centre_a = affine_a @ _centre_h(shape).to(dev)  # [n, 4]
        move = centre_a @ to_b.T - centre_a
        out = affine_a.clone()
        out[:, :3, 3] += move[:, :3]
        return out

    def __call__(
        self,
        vol_a: SourceVolume,
        vol_b: SourceVolume,
        affine_a: torch.Tensor,
        shape: tuple[int, int, int],
        generator: torch.Generator | None = None,
    ) -> MatchResult:
        affine_b = self.propose(vol_a, vol_b, affine_a, shape)
        vox_b = snap_to_grid(torch.linalg.inv(vol_b.affine).to(affine_b.device) @ affine_b, shape, vol_b.shape)
        affine_b = vol_b.affine.to(vox_b.device) @ vox_b
        score = inside_fraction(vox_b, shape, vol_b.shape)
        return MatchResult(affine_b, score, score >= self.min_inside)


class SSIMMatcher:
    """Structural-similarity search around a geometric proposal (structural positives).

    For each crop of A, the candidates are B crops at the proposal of ``base`` (default
    :class:`NormalisedMatcher`) shifted by a search grid of offsets, ``step * {-radius, ..., radius}``
    view voxels along each view axis (``(2 radius + 1)^3`` candidates). All candidates of all crops are
    resampled by one ``grid_sample`` and scored against the un-augmented A crop by one batched
    :func:`~medcl.views.ssim.ssim3d` call; the best is accepted only if its SSIM is at least
    ``threshold`` (and at least ``min_inside`` of it lies in B): a poor best match is rejected, never
    accepted for lack of a better one.

    Args:
        threshold: minimum SSIM for a positive.
        radius: search radius per axis (int or three ints), in steps.
        step: offset step in view voxels.
        base: the proposal matcher.
        data_range: SSIM's ``L``; ``None`` uses each A crop's own intensity range.
        sigma: SSIM Gaussian window sigma (in view voxels; crops need ``>= 2 int(3.5 sigma + 0.5) + 1``
            voxels a side, 11 for the default).
        min_inside: minimum fraction of a candidate inside B.
        padding_mode: padding of candidates reaching outside B.

    Memory: ``n * (2 radius + 1)^3`` candidate crops at once.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        radius: int | tuple[int, int, int] = 1,
        step: float = 4.0,
        base: NormalisedMatcher | None = None,
        data_range: float | None = None,
        sigma: float = 1.5,
        min_inside: float = 0.5,
        padding_mode: PaddingMode = "border",
    ) -> None:
        r = (radius,) * 3 if isinstance(radius, int) else tuple(int(v) for v in radius)
        if len(r) != 3 or any(v < 0 for v in r):
            raise MedclConfigError("mining.radius", f"expected an int or three ints >= 0, got {radius!r}")
        if step <= 0:
            raise MedclConfigError("mining.step", f"must be > 0, got {step}")
        self.threshold = float(threshold)
        self.radius = r
        self.step = float(step)
        self.base = base if base is not None else NormalisedMatcher(min_inside=min_inside)
        self.data_range = data_range
        self.sigma = sigma
        self.min_inside = min_inside
        self.padding_mode = padding_mode

    def offsets(self) -> torch.Tensor:
        """``[K, 3]`` candidate offsets in view voxels (the zero offset included)."""
        axes = [torch.arange(-r, r + 1, dtype=torch.float64) * self.step for r in self.radius]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    def __call__(
        self,
        vol_a: SourceVolume,
        vol_b: SourceVolume,
        affine_a: torch.Tensor,
        shape: tuple[int, int, int],
        generator: torch.Generator | None = None,
    ) -> MatchResult:
        n = affine_a.shape[0]
        dev = vol_b.device
        proposal = self.base.propose(vol_a, vol_b, affine_a.to(dev), shape)  # [n, 4, 4]
        off = self.offsets().to(dev)
        k = off.shape[0]
        shift = torch.eye(4, dtype=torch.float64, device=dev).repeat(k, 1, 1)
        shift[:, :3, 3] = off
        cand = (proposal[:, None] @ shift[None]).reshape(n * k, 4, 4)
        vox_b = snap_to_grid(torch.linalg.inv(vol_b.affine).to(dev) @ cand, shape, vol_b.shape)
        cand = vol_b.affine.to(dev) @ vox_b
        vox_a = torch.linalg.inv(vol_a.affine).to(vol_a.device) @ affine_a.to(vol_a.device).double()
        views_a = render(vol_a.image, vox_a, shape, padding_mode=self.padding_mode)  # [n, C, D, H, W]
        views_b = render(vol_b.image, vox_b, shape, padding_mode=self.padding_mode)  # [n*K, C, D, H, W]
        views_b = views_b.reshape(n, k, *views_b.shape[1:]).to(views_a.device)
        if self.data_range is None:
            dr = (views_a.amax(dim=(1, 2, 3, 4)) - views_a.amin(dim=(1, 2, 3, 4))).clamp_min(1e-6)[:, None]
        else:
            dr = self.data_range
        ssim = ssim3d(views_a[:, None], views_b, dr, sigma=self.sigma)  # [n, K]
        inside = inside_fraction(vox_b, shape, vol_b.shape).reshape(n, k).to(ssim.device)
        ssim = torch.where(inside >= self.min_inside, ssim, torch.full_like(ssim, -2.0))
        score, best = ssim.max(dim=1)
        affine_b = cand.reshape(n, k, 4, 4)[torch.arange(n, device=dev), best.to(dev)]
        return MatchResult(affine_b, score, score >= self.threshold)


class CrossVolumePairSampler(ViewSamplerBase):
    """Crops of volume A and their matched crops in volume B, as one :class:`ViewBatch`.

    ``n_crops`` crops of A are drawn (centres in A's foreground box with probability ``fg_prob``, kept
    inside A), matched in B by ``matcher`` on the un-augmented crops, and then both sides are augmented
    independently (spatial augmentation folded into the affines, intensity augmentation on the voxels).
    With :class:`SSIMMatcher` these are the structural-similarity positives; with
    :class:`NormalisedMatcher` the geometric correspondences of the anatomical method (Alice, Jiang et
    al., ICCV 2023, mines such cross-volume pairs; its feature-matching miner plugs in as ``matcher``).

    Call: ``sampler(vol_a, vol_b, generator) -> (ViewBatch, info)``; the batch holds ``views [2n, C, D, H,
    W]`` (the ``n`` crops of A, then their ``n`` matches in B) with ``source_id [2n]``, ``affine
    [2n, 4, 4]`` (each view voxel -> its own source's mm), ``norm [2n, 4, 4]`` and ``match [2n]`` = ``k`` for both views of pair ``k``
    when accepted and ``-1`` when rejected (a rejected B crop stays in the batch as an ordinary view of
    B, never as a positive of the A crop). ``info``: ``"score" [n]``, ``"accepted" [n]`` bool and
    ``"acceptance_rate"`` (a 0-dim tensor: no host sync).
    """

    def __init__(
        self,
        crop: CropSpec | None = None,
        n_crops: int = 4,
        matcher: Matcher | None = None,
        fg_prob: float = 0.9,
        augment: SpatialAugment | Default | None = "default",
        intensity: IntensityAugment | Default | None = "default",
        orient: Orient = "ras",
        padding_mode: PaddingMode = "border",
    ) -> None:
        super().__init__(
            crop,
            augment,
            intensity,
            orient,
            padding_mode,
            fg_prob,
        )
        self.n_crops = check_count("n_crops", n_crops)
        self.matcher = matcher if matcher is not None else SSIMMatcher()

    def _augmented(self, volume: SourceVolume, affine: torch.Tensor, generator: torch.Generator) -> RenderJob:
        """Spatially augment crops given as ``affine`` (view voxel -> mm): their render job."""
        affine = affine.double()
        if self.augment is None:
            draw = identity_draw(affine.shape[0])
        else:
            lin = torch.linalg.inv(volume.affine)[:3, :3] @ affine[:, :3, :3].cpu()  # view -> source voxel steps
            along = volume.spacing[lin.abs().argmax(dim=1)]  # [n, 3]
            view_spacing = affine[:, :3, :3].cpu().norm(dim=1)  # [n, 3] mm per view voxel
            draw = self.augment.sample(affine.shape[0], view_spacing, along, generator)
        aug = augment_affine(affine, self.crop.shape, draw)
        vox = torch.linalg.inv(volume.affine).to(aug.device) @ aug
        return self.job(vox, generator)

    def __call__(
        self, vol_a: SourceVolume, vol_b: SourceVolume, generator: torch.Generator
    ) -> tuple[ViewBatch, dict[str, torch.Tensor]]:
        pending, info = self.plan(vol_a, vol_b, generator)
        return pending.render(), info

    def plan(
        self, vol_a: SourceVolume, vol_b: SourceVolume, generator: torch.Generator
    ) -> tuple[PendingViews, dict[str, torch.Tensor]]:
        """Every draw of :meth:`__call__` (the matcher runs here, on the un-augmented crops), the views not
        rendered (:class:`~medcl.views.pending.PendingViews`)."""
        n = self.n_crops
        centres = fg_biased_points(vol_a, n, self.fg_prob, generator)
        vox_a = self.vox_maps(vol_a, centres, identity_draw(n), clamp=True)
        affine_a = vol_a.affine @ vox_a
        match = self.matcher(vol_a, vol_b, affine_a, self.crop.shape, generator)
        job_a = self._augmented(vol_a, affine_a, generator)
        job_b = self._augmented(vol_b, match.affine, generator)
        batch = PendingViews.cat([self.pending(vol_a, job_a), self.pending(vol_b, job_b)])
        accepted = match.accepted.cpu()
        group = torch.where(accepted, torch.arange(n), torch.full_like(accepted, -1, dtype=torch.long))
        batch = replace(batch, match=torch.cat([group, group]))
        info = {
            "score": match.score,
            "accepted": match.accepted,
            "acceptance_rate": match.accepted.float().mean(),
        }
        return batch, info
