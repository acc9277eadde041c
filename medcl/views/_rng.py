"""Random draws from a caller's ``torch.Generator`` (never the global RNG, never NumPy).

Small parameters (crop centres, flips, scales, intensity factors) are drawn on the generator's device
in float64 and planned on the CPU, so a seed gives the same geometry whatever device the image is on.
Voxel-sized noise is drawn on the image's device: directly from the generator when it lives there, else
from a generator on that device seeded from the caller's.
"""

from __future__ import annotations

import torch


def uniform(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """``shape`` float64 draws from U[0, 1), on the CPU."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).cpu()


def uniform_between(generator: torch.Generator, low, high, *shape: int) -> torch.Tensor:
    """``shape`` float64 draws from U[low, high) (``low``/``high`` broadcast), on the CPU."""
    low = torch.as_tensor(low, dtype=torch.float64)
    high = torch.as_tensor(high, dtype=torch.float64)
    return low + (high - low) * uniform(generator, *shape)


def randint(generator: torch.Generator, low: int, high: int, *shape: int) -> torch.Tensor:
    """``shape`` int64 draws from ``[low, high)``, on the CPU."""
    return torch.randint(low, high, shape, generator=generator, device=generator.device).cpu()


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The caller's generator if it lives on ``device``, else a new one there seeded from it."""
    if torch.device(generator.device) == torch.device(device):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).cpu())
    out = torch.Generator(device=device)
    out.manual_seed(seed)
    return out
