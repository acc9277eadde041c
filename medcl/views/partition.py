"""G^D / G^D-: one crop per anatomical partition of each volume (Chaitanya et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Literal

import torch

from medcl.core.errors import MedclConfigError
from medcl.core.provenance import ViewBatch
from medcl.views import _rng
from medcl.views.augment import IntensityAugment, SpatialAugment, identity_draw
from medcl.views.base import Default, Orient, ViewSamplerBase, base_axes, check_count
from medcl.views.crop import CropSpec, PaddingMode
from medcl.views.pending import PendingViews
from medcl.views.source import SourceVolume

_AXES = {"R": 0, "L": 0, "LR": 0, "RL": 0, "A": 1, "P": 1, "AP": 1, "PA": 1, "S": 2, "I": 2, "SI": 2, "IS": 2}


def partition_grid(partitions: int | tuple[int, int, int], axis: str | int = "S") -> tuple[int, int, int]:
    """Cells per normalised axis ``(R, A, S)``: an int splits along ``axis``, a triple is a 3D grid."""
    if isinstance(partitions, int):
        if partitions < 1:
            raise MedclConfigError("views.partitions", f"must be >= 1, got {partitions}")
        if isinstance(axis, str):
            if axis.upper() not in _AXES:
                raise MedclConfigError("views.axis", f"expected one of R, A, S (or LR, AP, SI) or 0-2, got {axis!r}")
            a = _AXES[axis.upper()]
        elif axis in (0, 1, 2):
            a = int(axis)
        else:
            raise MedclConfigError("views.axis", f"expected one of R, A, S (or LR, AP, SI) or 0-2, got {axis!r}")
        grid = [1, 1, 1]
        grid[a] = partitions
        return tuple(grid)  # type: ignore[return-value]
    grid = tuple(int(g) for g in partitions)
    if len(grid) != 3 or any(g < 1 for g in grid):
        raise MedclConfigError("views.partitions", f"expected an int or three ints >= 1, got {partitions!r}")
    return grid  # type: ignore[return-value]


class PartitionViewSampler(ViewSamplerBase):
    """One crop per partition of each volume, plus augmented copies (G^D and G^D-).

    Chaitanya et al., "Contrastive learning of global and local features for medical image segmentation
    with limited annotations" (NeurIPS 2020): each volume is split into ``S`` partitions along the
    patient's superior-inferior axis; crops from the same partition of different volumes are positives
    (G^D), or, in G^D-, the copies of one crop are the positives and the same partition of other volumes
    is removed from the negatives. The two differ only in the loss masks (:mod:`medcl.losses`); the
    views are the same. Here, unlike the reference code (2D slices, 4 partitions hard-coded):

    * partitions are cells of a grid in the **normalised foreground-box coordinates** of
      :class:`~medcl.views.source.SourceVolume` (``u`` in ``[0, 1]^3`` along R, A, S), so "superior" is
      found from the affine whatever array axis it is stored along; ``partitions=S`` splits along
      ``axis`` (default ``"S"``), a triple ``(nR, nA, nS)`` gives a 3D grid. Partition index = flat
      C-order index over ``(R, A, S)`` cells; along S, partition 0 is the most inferior;
    * per volume and partition one 3D crop, centred at a uniform random position inside the cell
      (``within="centre"``) or placed so the whole (un-scaled) crop lies inside the cell when it fits
      (``within="crop"``; centred in the cell when it does not), plus ``n_aug`` augmented copies of it (same centre, their own flips,
      rotations, scaling and intensity draws). Crops are not moved to stay inside the volume (that
      would move them out of their partition): voxels outside are padded (``padding_mode``).
      A centre may move by up to half a voxel so that unscaled views copy voxels exactly.

    Args:
        crop: view size (voxels or mm) and output shape.
        partitions: ``S`` (along ``axis``) or a grid ``(nR, nA, nS)``.
        axis: ``"S"`` (default), ``"A"``, ``"R"`` (or ``"SI"``, ``"AP"``, ``"LR"``, or 0, 1, 2).
        n_aug: augmented copies per partition crop (views per volume: ``cells * (1 + n_aug)``).
        within: ``"centre"`` or ``"crop"`` (see above).
        augment_first: augment the first copy too (else it is the plain crop).
        augment, intensity, orient, padding_mode: see :class:`~medcl.views.base.ViewSamplerBase`.

    Call: ``sampler(volume, generator) -> ViewBatch`` with ``views [N, C, D, H, W]``,
    ``N = cells * (1 + n_aug)``, in copy-major order (copy 0 of cells 0..P-1, then copy 1, ...);
    ``partition [N]`` the cell index, ``source_id [N]``, ``affine [N, 4, 4]`` view voxel -> source mm,
    ``norm [N, 4, 4]``.
    """

    def __init__(
        self,
        crop: CropSpec | None = None,
        partitions: int | tuple[int, int, int] = 4,
        axis: str | int = "S",
        n_aug: int = 1,
        within: Literal["centre", "crop"] = "centre",
        augment_first: bool = True,
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
        )
        self.grid = partition_grid(partitions, axis)
        n_aug = check_count("n_aug", n_aug, minimum=0)
        if within not in ("centre", "crop"):
            raise MedclConfigError("views.within", f"expected 'centre' or 'crop', got {within!r}")
        self.n_aug = n_aug
        self.within = within
        self.augment_first = augment_first

    @property
    def n_partitions(self) -> int:
        g = self.grid
        return g[0] * g[1] * g[2]

    def cell_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([P, 3], [P, 3])`` lower and upper normalised ``u`` bounds of each partition cell."""
        g = torch.tensor(self.grid, dtype=torch.float64)
        idx = torch.stack(
            torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in self.grid), indexing="ij"), dim=-1
        ).reshape(-1, 3)
        return idx / g, (idx + 1) / g

    def __call__(self, volume: SourceVolume, generator: torch.Generator) -> ViewBatch:
        return self.plan(volume, generator).render()

    def plan(self, volume: SourceVolume, generator: torch.Generator) -> PendingViews:
        """Every draw of :meth:`__call__`, views not rendered (:class:`~medcl.views.pending.PendingViews`)."""
        p = self.n_partitions
        copies = 1 + self.n_aug
        lo, hi = self.cell_bounds()
        if self.within == "crop":
            r0 = base_axes(volume, self.orient)
            along = volume.spacing[r0.abs().argmax(dim=0)]
            extent = (r0 * self.crop.step(along)).abs() @ torch.tensor(self.crop.shape, dtype=torch.float64)
            half_u = volume.vox_to_norm[:3, :3].abs() @ extent / 2
            fits = (hi - lo) >= 2 * half_u
            lo, hi = (
                torch.where(fits, lo + half_u, (lo + hi) / 2),
                torch.where(fits, hi - half_u, (lo + hi) / 2),
            )
        u = lo + _rng.uniform(generator, p, 3) * (hi - lo)
        u_h = torch.cat([u, torch.ones(p, 1, dtype=torch.float64)], dim=1)
        centres = (u_h @ torch.linalg.inv(volume.vox_to_norm).T)[:, :3].repeat(copies, 1)
        draw = self.draw_spatial(volume, p * copies, generator)
        if not self.augment_first:
            draw = type(draw)(*(torch.cat([a[:p], b[p:]]) for a, b in zip(identity_draw(p), draw)))
        vox = self.vox_maps(volume, centres, draw, clamp=False)
        job = self.job(vox, generator, plain_first=0 if self.augment_first else p)  # copy 0 plain unless augment_first
        partition = torch.arange(p, dtype=torch.long).repeat(copies)
        return self.pending(volume, job, partition)
