"""G^R: random augmented crops of each volume (SimCLR's two views, in 3D)."""

from __future__ import annotations

import torch

from medcl.core.provenance import ViewBatch
from medcl.views import _rng
from medcl.views.augment import IntensityAugment, SpatialAugment
from medcl.views.base import (
    Default,
    Orient,
    ViewSamplerBase,
    check_count,
    check_non_negative,
    fg_biased_points,
)
from medcl.views.crop import CropSpec, PaddingMode
from medcl.views.pending import PendingViews
from medcl.views.source import SourceVolume


class RandomViewSampler(ViewSamplerBase):
    """Random 3D crops of one volume, each with its own augmentation (G^R).

    The global strategy G^R of Chaitanya et al. (NeurIPS 2020), i.e. SimCLR (Chen et al., ICML 2020) in
    3D: the views of one volume are positives of each other, views of other volumes negatives. Crop
    centres are drawn uniformly inside the foreground box with probability ``fg_prob`` (else anywhere in
    the volume) and the crop is then moved inside the volume when it fits.

    Args:
        crop: view size (voxels or mm) and output shape ``(D, H, W)``.
        n_views: views per volume (2 for SimCLR).
        fg_prob: probability that a crop centre is drawn inside the foreground box.
        max_offset: if set, views after the first are centred within ``max_offset`` times the crop
            extent of the first view's centre (per axis), so the views overlap (for dense local losses);
            ``None`` draws every centre independently.
        augment, intensity, orient, padding_mode: see :class:`~medcl.views.base.ViewSamplerBase`.

    Call: ``sampler(volume, generator) -> ViewBatch`` with ``views [n_views, C, D, H, W]``,
    ``source_id [n_views]`` (all ``volume.source_id``), ``partition`` all ``-1``, ``affine``
    ``[n_views, 4, 4]`` view voxel -> source mm and ``norm`` ``[n_views, 4, 4]``.
    """

    def __init__(
        self,
        crop: CropSpec | None = None,
        n_views: int = 2,
        fg_prob: float = 0.9,
        max_offset: float | None = None,
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
        self.n_views = check_count("n_views", n_views)
        self.max_offset = check_non_negative("max_offset", max_offset) if max_offset is not None else None

    def __call__(self, volume: SourceVolume, generator: torch.Generator) -> ViewBatch:
        return self.plan(volume, generator).render()

    def plan(self, volume: SourceVolume, generator: torch.Generator) -> PendingViews:
        """Every draw of :meth:`__call__`, views not rendered (:class:`~medcl.views.pending.PendingViews`)."""
        n = self.n_views
        centres = fg_biased_points(volume, n, self.fg_prob, generator)
        draw = self.draw_spatial(volume, n, generator)
        if self.max_offset is not None and n > 1:
            reach = self.linear(volume, draw).abs() @ torch.tensor(self.crop.shape, dtype=torch.float64)
            jitter = _rng.uniform_between(generator, -1.0, 1.0, n, 3) * self.max_offset * reach[:1]
            centres = centres[:1] + torch.cat([torch.zeros(1, 3, dtype=torch.float64), jitter[1:]])
        vox = self.vox_maps(volume, centres, draw, clamp=True)
        return self.pending(volume, self.job(vox, generator))
