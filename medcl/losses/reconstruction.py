"""Masked reconstruction loss: the error is taken on the masked voxels only, as in masked autoencoders
(He et al., CVPR 2022), here on 3D views masked by block masking (``ViewBatch.mask``), optionally against
per-block normalised targets (MAE's ``norm_pix_loss``; :func:`block_normalised`)."""

from __future__ import annotations

from typing import Literal

import torch


def masked_reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    kind: Literal["l1", "l2"] = "l2",
) -> torch.Tensor:
    """L1 or L2 reconstruction error on the masked voxels only.

    ``loss = sum_{n,c,v} mask[n,0,v] * |pred - target|^p / (C * sum_{n,v} mask[n,0,v])`` with ``p = 1``
    (``"l1"``) or ``p = 2`` (``"l2"``): the mean over masked voxels and channels. When no voxel is masked
    the loss is 0, still attached to ``pred``'s graph. Computed in float32.

    Args:
        pred: ``[N, C, D, H, W]`` reconstruction.
        target: ``[N, C, D, H, W]`` the unmasked intensities (``ViewBatch.target``).
        mask: ``[N, 1, D, H, W]`` bool, True where the voxel was masked out of the input (``ViewBatch.mask``).
        kind: ``"l1"`` or ``"l2"``.

    Returns:
        Scalar tensor.
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
    if pred.ndim != 5 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must both be [N, C, D, H, W], got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    n, c = pred.shape[:2]
    if mask.dtype != torch.bool or tuple(mask.shape) != (n, 1, *pred.shape[2:]):
        raise ValueError(
            f"mask must be a bool [N, 1, D, H, W] = {(n, 1, *pred.shape[2:])} tensor, got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    with torch.autocast(device_type=pred.device.type, enabled=False):
        diff = pred.float() - target.to(pred.device).float()
        err = diff.abs() if kind == "l1" else diff * diff
        err = err.masked_fill(~mask, 0.0)  # masked_fill, not multiply: non-finite values outside stay out
        count = mask.sum() * c
        return err.sum() / count.clamp_min(1).to(err.dtype)


def block_normalised(target: torch.Tensor, block: tuple[int, int, int], eps: float = 1e-6) -> torch.Tensor:
    """``target`` with each ``block`` box normalised to zero mean and unit variance (per view and channel), the
    target form of MAE (He et al., CVPR 2022, "normalised pixels": each masked patch is predicted relative to its
    own statistics, which made the learnt features better for downstream tasks).

    Args:
        target: ``[N, C, D, H, W]`` with ``D, H, W`` multiples of ``block``.
        block: the masking block ``(bd, bh, bw)``.
        eps: added to the variance.

    Returns:
        ``[N, C, D, H, W]`` float32.

    Raises:
        ValueError: the view is not tiled exactly by the blocks.
    """
    n, c, *sp = target.shape
    if any(s % b for s, b in zip(sp, block)):
        raise ValueError(f"per-block normalisation needs views tiled by the blocks: shape {tuple(sp)}, block {block}")
    g = [s // b for s, b in zip(sp, block)]
    x = target.float().reshape(n, c, g[0], block[0], g[1], block[1], g[2], block[2])
    mean = x.mean(dim=(3, 5, 7), keepdim=True)
    var = x.var(dim=(3, 5, 7), keepdim=True, unbiased=False)
    return ((x - mean) / torch.sqrt(var + eps)).reshape(target.shape)
