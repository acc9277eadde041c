"""Feature-space views of bags (no pixels to augment once features are extracted).

* :func:`subsample_instances` keeps a random fraction of each bag's real instances (at least one);
* :func:`feature_augment` applies feature dropout and Gaussian noise (on standardised features, so the noise
  scale is in units of a feature's standard deviation).

All vectorised over the padded batch; randomness from the global torch RNG (seeded per run) or ``generator``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def subsample_instances(mask: Tensor, keep: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random subset of each bag's real instances.

    Args:
        mask: ``[B, N]`` bool, real instances.
        keep: fraction kept, a float or ``[B]`` per bag; bag ``b`` keeps ``max(1, round(keep_b * n_b))``.

    Returns:
        ``[B, N]`` bool, a subset of ``mask`` with at least one instance per bag.
    """
    b, n = mask.shape
    r = torch.rand(b, n, device=mask.device, generator=generator).masked_fill(~mask, 2.0)
    order = r.argsort(1).argsort(1)  # rank of each instance's random number (padding ranks last)
    keep_t = torch.as_tensor(keep, dtype=torch.float32, device=mask.device).expand(b)
    k = (keep_t * mask.sum(1)).round().long().clamp_min(1)
    return (order < k[:, None]) & mask


def feature_augment(
    x: Tensor, mask: Tensor, dropout: float = 0.0, noise: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Inverted feature dropout with probability ``dropout`` and additive ``N(0, noise^2)``; padding stays zero."""
    if dropout > 0:
        keep = torch.rand(x.shape, device=x.device, generator=generator) >= dropout
        x = x * keep / (1.0 - dropout)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, device=x.device, generator=generator)
    return x * mask.unsqueeze(-1)
