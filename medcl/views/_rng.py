"""Random draws from a caller's ``torch.Generator`` (never the global RNG, never NumPy).

Small parameters (crop centres, flips, scales, intensity factors) are drawn on the generator's device
in float64 and planned on the CPU, so a seed gives the same geometry whatever device the image is on.
Voxel-sized noise is never drawn from the caller's generator: a sampler draws one :func:`seed` from it and
the noise comes from a generator on the image's device seeded by that number, so the caller's generator
advances by the same draws whether the views are rendered at once or later on another device
(:mod:`medcl.views.pending`), and on the CPU both give the same noise.
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


def seed(generator: torch.Generator) -> int:
    """One int64 seed in ``[0, 2**62)`` drawn from ``generator`` (one draw, whatever the device)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).cpu())


def seeded(seed_value: int, device: torch.device | str) -> torch.Generator:
    """A new generator on ``device`` seeded by ``seed_value``."""
    out = torch.Generator(device=torch.device(device))
    out.manual_seed(int(seed_value))
    return out


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The caller's generator if it lives on ``device``, else a new one there seeded from it."""
    if torch.device(generator.device) == torch.device(device):
        return generator
    return seeded(seed(generator), device)
