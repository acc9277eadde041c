"""Geometric SSL view samplers: views plus provenance (DESIGN.md, idea 2).

A sampler turns one :class:`SourceVolume` (``image [C, X, Y, Z]``, ``affine`` voxel -> mm, foreground
box, source id) into a :class:`~medcl.core.provenance.ViewBatch`: views ``[N, C, D, H, W]`` and, per view,
the source id, partition index (or -1) and one 4x4 affine from view voxel to source mm with crop, flips,
90-degree rotations and scaling folded in (correspondence between two views of a volume is
``inv(A_b) @ A_a``)::

    sampler(volume, generator) -> ViewBatch                       # single-volume samplers
    pair_sampler(vol_a, vol_b, generator) -> (ViewBatch, info)    # cross-volume positives

* :class:`RandomViewSampler` -- G^R (SimCLR in 3D; Chaitanya et al., 2020);
* :class:`PartitionViewSampler` -- G^D / G^D- (Chaitanya et al., NeurIPS 2020), partitions along the
  patient's S axis (or any axis / a 3D grid) of the normalised foreground box;
* :class:`PositionViewSampler` -- VoCo base-crop grid and random crops with overlap targets (Wu et al.,
  CVPR 2024);
* :class:`CrossVolumePairSampler` with :class:`NormalisedMatcher` (geometric correspondence) or
  :class:`SSIMMatcher` (structural positives, checked by :func:`ssim3d`);
* :class:`BlockMasking` / :func:`block_mask` -- block masking for reconstruction.

All randomness comes from the ``torch.Generator`` passed in (per-sample seeds:
:func:`medcl.engine.seeding.generator_for`); voxel work runs on the image's device. ``sampler.plan(...)``
makes every draw of ``sampler(...)`` without rendering: a :class:`PendingViews` (provenance, render jobs,
block masks) that renders later, e.g. on the GPU from the sub-boxes a data worker shipped
(:mod:`medcl.views.pending`), giving the same views.
"""

from medcl.views.augment import IntensityAugment, SpatialAugment, apply_intensity, augment_affine
from medcl.views.crop import CropSpec, place_crops, render
from medcl.views.masking import BlockMasking, block_mask
from medcl.views.mining import CrossVolumePairSampler, Matcher, MatchResult, NormalisedMatcher, SSIMMatcher
from medcl.views.partition import PartitionViewSampler
from medcl.views.pending import PendingViews, RenderJob
from medcl.views.position import PositionViewSampler
from medcl.views.random import RandomViewSampler
from medcl.views.source import SourceVolume
from medcl.views.ssim import ssim3d

__all__ = [
    "SourceVolume",
    "CropSpec",
    "SpatialAugment",
    "IntensityAugment",
    "apply_intensity",
    "augment_affine",
    "place_crops",
    "render",
    "RandomViewSampler",
    "PartitionViewSampler",
    "PositionViewSampler",
    "CrossVolumePairSampler",
    "Matcher",
    "MatchResult",
    "NormalisedMatcher",
    "SSIMMatcher",
    "ssim3d",
    "block_mask",
    "BlockMasking",
    "PendingViews",
    "RenderJob",
]
