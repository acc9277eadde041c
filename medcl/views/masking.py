"""Random 3D block masking of views for masked reconstruction.

Drawing a mask needs only the views' shape (:func:`draw_block_mask`: one coarse bool per block), applying
it needs the voxels (:func:`apply_block_mask`), so a data worker can draw the mask of views that are
rendered later on the training device (:mod:`medcl.views.pending`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from medcl.core.errors import MedclConfigError
from medcl.core.provenance import ViewBatch
from medcl.views import _rng


def _block(block: int | tuple[int, int, int]) -> tuple[int, int, int]:
    b = (block,) * 3 if isinstance(block, int) else tuple(int(v) for v in block)
    if len(b) != 3 or any(v < 1 for v in b):
        raise MedclConfigError("masking.block", f"expected an int or three ints >= 1, got {block!r}")
    return b  # type: ignore[return-value]


def _check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio <= 1.0:
        raise MedclConfigError("masking.ratio", f"must be in [0, 1], got {ratio}")
    return float(ratio)


def draw_block_mask(
    n: int, spatial: tuple[int, int, int], ratio: float, block: int | tuple[int, int, int], generator: torch.Generator
) -> torch.Tensor:
    """``[n, 1, gD, gH, gW]`` bool coarse masks (one value per block, ``g = ceil(spatial / block)``), on the CPU.

    Exactly ``round(ratio * n_blocks)`` blocks per view, chosen uniformly without replacement; one
    ``[n, n_blocks]`` draw from ``generator``.
    """
    ratio = _check_ratio(ratio)
    b = _block(block)
    grid = [-(-int(s) // k) for s, k in zip(spatial, b)]
    n_blocks = grid[0] * grid[1] * grid[2]
    n_masked = int(round(ratio * n_blocks))
    rank = _rng.uniform(generator, n, n_blocks).argsort(dim=1).argsort(dim=1)  # a random permutation per view
    return (rank < n_masked).reshape(n, 1, *grid)


def expand_block_mask(coarse: torch.Tensor, block: int | tuple[int, int, int], spatial: tuple[int, int, int]) -> torch.Tensor:
    """The voxel mask ``[n, 1, D, H, W]`` of coarse block masks (the last blocks cut by the border)."""
    mask = coarse
    for axis, k in enumerate(_block(block)):
        mask = mask.repeat_interleave(k, dim=2 + axis)
    return mask[:, :, : spatial[0], : spatial[1], : spatial[2]].contiguous()


def apply_block_mask(
    views: torch.Tensor, coarse: torch.Tensor, block: int | tuple[int, int, int], fill: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(masked, mask, target)`` of ``views`` ``[N, C, D, H, W]`` under coarse masks (see :func:`block_mask`)."""
    spatial = tuple(views.shape[2:])
    mask = expand_block_mask(coarse.to(views.device), block, spatial)  # type: ignore[arg-type]
    return views.masked_fill(mask, fill), mask, views


def block_mask(
    views: torch.Tensor,
    ratio: float,
    block: int | tuple[int, int, int],
    generator: torch.Generator,
    fill: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask random 3D blocks of each view (SimMIM, Xie et al., CVPR 2022, and MAE, He et al., CVPR 2022,
    in 3D as in the masked-volume pretraining of Swin UNETR, Tang et al., CVPR 2022).

    Each view is tiled by ``block`` boxes (the last ones cut by the border when the shape is not a
    multiple); exactly ``round(ratio * n_blocks)`` of them, chosen uniformly without replacement per
    view, are masked. The voxel ratio equals the block ratio when the shape is a multiple of ``block``.

    Args:
        views: ``[N, C, D, H, W]``.
        ratio: target fraction of masked blocks, in ``[0, 1]``.
        block: block size in view voxels (int or three ints).
        generator: the only source of randomness.
        fill: the value written into masked voxels.

    Returns:
        ``(masked [N, C, D, H, W], mask [N, 1, D, H, W] bool (True = masked), target [N, C, D, H, W])``,
        ``target`` being the unmasked views.
    """
    coarse = draw_block_mask(views.shape[0], tuple(views.shape[2:]), ratio, block, generator)  # type: ignore[arg-type]
    return apply_block_mask(views, coarse, block, fill)


@dataclass
class MaskDraw:
    """Block masks drawn for views not rendered yet: ``coarse`` ``[N, 1, gD, gH, gW]`` bool, the block size
    and the fill value (applied by :meth:`apply`)."""

    coarse: torch.Tensor
    block: tuple[int, int, int]
    fill: float = 0.0

    def apply(self, batch: ViewBatch) -> ViewBatch:
        masked, mask, target = apply_block_mask(batch.views, self.coarse, self.block, self.fill)
        return replace(batch, views=masked, mask=mask, target=target)


class BlockMasking:
    """Adds block masking to a :class:`ViewBatch` (see :func:`block_mask`).

    ``masking(batch, generator) -> ViewBatch`` with ``views`` masked, ``mask [N, 1, D, H, W]`` and
    ``target [N, C, D, H, W]`` set; geometry unchanged. ``masking.plan(pending, generator)`` draws the
    same masks for a :class:`~medcl.views.pending.PendingViews` (applied when it is rendered).
    """

    def __init__(self, ratio: float = 0.6, block: int | tuple[int, int, int] = 4, fill: float = 0.0) -> None:
        self.ratio = _check_ratio(ratio)
        self.block = _block(block)
        self.fill = fill

    def draw(self, n: int, spatial: tuple[int, int, int], generator: torch.Generator) -> MaskDraw:
        return MaskDraw(draw_block_mask(n, spatial, self.ratio, self.block, generator), self.block, self.fill)

    def plan(self, pending: Any, generator: torch.Generator) -> Any:
        """``pending`` (views not rendered yet, shape known) with its masks drawn."""
        return replace(pending, masking=self.draw(len(pending), pending.out_shape, generator))

    def __call__(self, batch: ViewBatch, generator: torch.Generator) -> ViewBatch:
        return self.draw(len(batch), tuple(batch.views.shape[2:]), generator).apply(batch)  # type: ignore[arg-type]
