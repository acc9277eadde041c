"""VoCo: a grid of base crops and random crops whose overlaps are the position targets."""

from __future__ import annotations

import torch

from medcl.core.errors import MedclConfigError
from medcl.core.provenance import ROLE_BASE, ROLE_RANDOM, ViewBatch
from medcl.losses.position import voco_overlap_targets
from medcl.views import _rng
from medcl.views.augment import IntensityAugment, SpatialAugment, identity_draw
from medcl.views.base import (
    Default,
    Orient,
    ViewSamplerBase,
    check_count,
    fg_biased_points,
)
from medcl.views.crop import CropSpec, PaddingMode, place_crops
from medcl.views.pending import PendingViews
from medcl.views.source import SourceVolume


class PositionViewSampler(ViewSamplerBase):
    """Base crops tiling a region, plus random crops with their overlap targets (VoCo).

    Wu, Zhuang and Chen, "VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for 3D
    Medical Image Analysis" (CVPR 2024). A region of the volume is tiled by a grid of ``grid = (n1, n2,
    n3)`` non-overlapping base crops (VoCo hard-codes 4 x 4 x 1 in the axial plane; here any grid, along
    the view axes, which are R, A, S with ``orient="ras"``); random crops of the same size are drawn in
    the region, and each random crop's target for base crop ``j`` is the fraction of its volume inside
    ``j``, computed from the view affines by :func:`medcl.losses.position.voco_overlap_targets` (so it
    stays exact under the random crops' flips, rotations and scaling). The defaults, a 2 x 2 x 2 grid of
    16^3-voxel crops (a 32^3 region), fit the ~36 x 50 x 36 hippocampus crops; for CT use e.g.
    ``grid=(4, 4, 1)`` with ``CropSpec(64)`` or mm crops.

    The region's centre is drawn inside the foreground box (probability ``fg_prob``) and the region is
    kept inside the volume when it fits. Random crops are placed on the voxel grid with their whole
    (un-augmented) extent inside the region (``inside=True``) or with their centre anywhere in the region
    (``inside=False``, so part of a crop may lie outside: its targets then sum to less than 1).

    Args:
        crop: base (and random) crop size and output shape.
        grid: base crops per view axis.
        n_random: random crops per volume.
        inside: see above.
        fg_prob: probability that the region centre is drawn in the foreground box.
        augment: spatial augmentation of the random crops (default: flips and rotations, no scaling);
            base crops are never spatially augmented.
        intensity: intensity augmentation (all crops).
        orient, padding_mode: see :class:`~medcl.views.base.ViewSamplerBase`.

    Call: ``sampler(volume, generator) -> ViewBatch`` with ``views [N, C, D, H, W]``, ``N = G + n_random``,
    ``G = n1 n2 n3``, ``affine [N, 4, 4]`` view voxel -> source mm:
    first the base crops in C-order of the grid (``partition`` = grid cell index, ``role`` =
    ``ROLE_BASE``), then the random crops (``partition = -1``, ``role = ROLE_RANDOM``); ``targets``
    ``[N, G]`` (float32; one-hot rows for base crops).
    """

    def __init__(
        self,
        crop: CropSpec | None = None,
        grid: tuple[int, int, int] = (2, 2, 2),
        n_random: int = 4,
        inside: bool = True,
        fg_prob: float = 1.0,
        augment: SpatialAugment | Default | None = "default",
        intensity: IntensityAugment | Default | None = "default",
        orient: Orient = "ras",
        padding_mode: PaddingMode = "border",
    ) -> None:
        super().__init__(
            crop if crop is not None else CropSpec(16),
            augment,
            intensity,
            orient,
            padding_mode,
            fg_prob,
            default_augment=lambda: SpatialAugment(scale_prob=0.0),
        )
        grid = tuple(int(g) for g in grid)
        if len(grid) != 3 or any(g < 1 for g in grid) or grid[0] * grid[1] * grid[2] < 2:
            raise MedclConfigError("views.grid", f"expected three ints >= 1 with at least 2 cells, got {grid}")
        self.grid = grid
        self.n_random = check_count("n_random", n_random)
        self.inside = inside

    @property
    def n_base(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def __call__(self, volume: SourceVolume, generator: torch.Generator) -> ViewBatch:
        return self.plan(volume, generator).render()

    def plan(self, volume: SourceVolume, generator: torch.Generator) -> PendingViews:
        """Every draw of :meth:`__call__`, views not rendered (:class:`~medcl.views.pending.PendingViews`)."""
        o = torch.tensor(self.crop.shape, dtype=torch.float64)
        g = torch.tensor(self.grid, dtype=torch.float64)
        region_shape = tuple(int(s) for s in (o * g).tolist())
        # the region: one big un-augmented crop, placed on the voxel grid inside the volume
        lin0 = self.linear(volume, identity_draw(1))
        centre = fg_biased_points(volume, 1, self.fg_prob, generator)
        region = place_crops(lin0, region_shape, centre, volume.shape, clamp=True)[0]  # region voxel -> source voxel
        # base crops: the region's cells, i.e. the region map shifted by whole cells
        cells = torch.stack(
            torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in self.grid), indexing="ij"), dim=-1
        ).reshape(-1, 3)
        shift = torch.eye(4, dtype=torch.float64).repeat(self.n_base, 1, 1)
        shift[:, :3, 3] = cells * o
        base_vox = region @ shift
        # random crops: a start on the region's voxel grid, then augmented about their centre
        r = self.n_random
        if self.inside:
            start = (_rng.uniform(generator, r, 3) * (o * (g - 1) + 1)).floor()
        else:
            start = (_rng.uniform(generator, r, 3) * (o * g) - o / 2).round()
        centre_r = torch.cat([start + (o - 1) / 2, torch.ones(r, 1, dtype=torch.float64)], dim=1) @ region.T
        draw = self.draw_spatial(volume, r, generator)
        rand_vox = place_crops(self.linear(volume, draw), self.crop.shape, centre_r[:, :3], volume.shape, clamp=False)
        vox = torch.cat([base_vox, rand_vox])
        job = self.job(vox, generator)
        affine = volume.affine @ vox
        targets = voco_overlap_targets(affine, self.crop.shape, affine[: self.n_base], self.crop.shape)
        partition = torch.cat([torch.arange(self.n_base), torch.full((r,), -1)]).long()
        role = torch.cat([torch.full((self.n_base,), ROLE_BASE), torch.full((r,), ROLE_RANDOM)]).long()
        return self.pending(volume, job, partition, role=role, targets=targets.float())
