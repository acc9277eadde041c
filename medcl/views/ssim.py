"""Batched 3D SSIM in torch, numerically the same as ``skimage.metrics.structural_similarity``."""

from __future__ import annotations

import torch


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """``[2r + 1]`` normalised sampled Gaussian, ``r = int(truncate * sigma + 0.5)`` (scipy's kernel)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).to(device=device, dtype=dtype)


def _valid_band(window: torch.Tensor, length: int) -> torch.Tensor:
    """``[length - 2r, length]`` matrix of a 'valid' correlation with ``window`` (``2r + 1`` taps)."""
    k = window.numel()
    rows = torch.arange(length - k + 1, device=window.device)
    tap = torch.arange(length, device=window.device)[None, :] - rows[:, None]  # [out, in]
    inside = (tap >= 0) & (tap < k)
    return window[tap.clamp(0, k - 1)] * inside


def _blur_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of ``[B, D, H, W]``, keeping only voxels whose window is inside.

    Each axis is one matmul with a banded matrix (fast for the small crops mined here, and free of the
    per-shape kernel selection of a 3D convolution).
    """
    d, h, w = x.shape[1:]
    x = torch.einsum("ij,bjhw->bihw", _valid_band(window, d), x)
    x = torch.einsum("ij,bdjw->bdiw", _valid_band(window, h), x)
    return torch.einsum("ij,bdhj->bdhi", _valid_band(window, w), x)


def ssim3d(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float | torch.Tensor,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean structural similarity of 3D images, for many pairs at once (Wang et al., IEEE TIP 2004).

    Follows ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)``: local means, variances and covariance under a
    normalised Gaussian window (radius ``int(truncate * sigma + 0.5)``, 5 voxels by default), the SSIM map
    ``(2 mx my + C1)(2 sxy + C2) / ((mx^2 + my^2 + C1)(sx + sy + C2))`` with ``C1 = (k1 L)^2`` and
    ``C2 = (k2 L)^2``, averaged over the voxels at least one radius from the border (scikit-image crops
    the same border), then over channels (as ``channel_axis`` does).

    Args:
        x: ``[..., C, D, H, W]`` images.
        y: ``[..., C, D, H, W]``, broadcastable with ``x`` over the leading dims (e.g. ``x [n, 1, C, ...]``
            against ``y [n, K, C, ...]`` scores ``K`` candidates per image without copying ``x``).
        data_range: ``L``, a float or a tensor broadcastable to the leading dims.
        sigma, truncate: the Gaussian window.
        k1, k2: the SSIM constants.

    Returns:
        ``[...]`` SSIM per pair (the broadcast leading shape), in ``x``'s dtype (at least float32).

    Raises:
        ValueError: when a spatial side is shorter than the window (``2 r + 1``).
    """
    if x.ndim < 4 or y.ndim < 4 or x.shape[-4:] != y.shape[-4:]:
        raise ValueError(f"ssim3d needs [..., C, D, H, W] images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    window = gaussian_window(sigma, truncate, dtype=dtype, device=x.device)
    if min(x.shape[-3:]) < window.numel():
        raise ValueError(f"ssim3d: images {tuple(x.shape[-3:])} are smaller than the {window.numel()}-voxel window")
    lead = torch.broadcast_shapes(x.shape[:-4], y.shape[:-4])
    spatial = x.shape[-3:]

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype)
        flat = _blur_valid(t.reshape(-1, *spatial), window)
        return flat.reshape(*t.shape[:-3], *flat.shape[-3:])

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    rng = torch.as_tensor(data_range, dtype=dtype, device=x.device)
    rng = rng.reshape(*rng.shape, 1, 1, 1, 1) if rng.ndim else rng
    c1 = (k1 * rng) ** 2
    c2 = (k2 * rng) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(-4, -3, -2, -1)).expand(lead)
