"""Random 3D block masking of views for masked reconstruction."""

from __future__ import annotations

from dataclasses import replace

import torch

from medcl.core.errors import MedclConfigError
from medcl.core.provenance import ViewBatch
from medcl.views import _rng


def _block(block: int | tuple[int, int, int]) -> tuple[int, int, int]:
    b = (block,) * 3 if isinstance(block, int) else tuple(int(v) for v in block)
    if len(b) != 3 or any(v < 1 for v in b):
        raise MedclConfigError("masking.block", f"expected an int or three ints >= 1, got {block!r}")
    return b  # type: ignore[return-value]


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
    if not 0.0 <= ratio <= 1.0:
        raise MedclConfigError("masking.ratio", f"must be in [0, 1], got {ratio}")
    b = _block(block)
    n = views.shape[0]
    spatial = views.shape[2:]
    grid = [-(-s // k) for s, k in zip(spatial, b)]
    n_blocks = grid[0] * grid[1] * grid[2]
    n_masked = int(round(ratio * n_blocks))
    rank = _rng.uniform(generator, n, n_blocks).argsort(dim=1).argsort(dim=1)  # a random permutation per view
    coarse = (rank < n_masked).reshape(n, 1, *grid).to(views.device)
    mask = coarse
    for axis, k in enumerate(b):
        mask = mask.repeat_interleave(k, dim=2 + axis)
    mask = mask[:, :, : spatial[0], : spatial[1], : spatial[2]].contiguous()
    masked = views.masked_fill(mask, fill)
    return masked, mask, views


class BlockMasking:
    """Adds block masking to a :class:`ViewBatch` (see :func:`block_mask`).

    ``masking(batch, generator) -> ViewBatch`` with ``views`` masked, ``mask [N, 1, D, H, W]`` and
    ``target [N, C, D, H, W]`` set; geometry unchanged.
    """

    def __init__(self, ratio: float = 0.6, block: int | tuple[int, int, int] = 4, fill: float = 0.0) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise MedclConfigError("masking.ratio", f"must be in [0, 1], got {ratio}")
        self.ratio = ratio
        self.block = _block(block)
        self.fill = fill

    def __call__(self, batch: ViewBatch, generator: torch.Generator) -> ViewBatch:
        masked, mask, target = block_mask(batch.views, self.ratio, self.block, generator, self.fill)
        return replace(batch, views=masked, mask=mask, target=target)
