"""Augmentations of SSL views: spatial ones folded into the view affine, intensity ones batched.

Spatial (:class:`SpatialAugment`): flips, 90-degree rotations and scaling. They are not applied to
voxels; they change the view's linear map (see :mod:`medcl.views.crop`), so the view stays one exact
``grid_sample`` of the source and its affine stays exact. A rotation is only drawn in a plane whose two
axes have the same source spacing *and* the same view spacing, so a rotated view never mixes a thick
slice direction into an in-plane one.

Intensity (:class:`IntensityAugment`): the transforms and parameterisation of MONAI's
``RandGaussianSmooth``, ``RandAdjustContrast``, ``RandScaleIntensity``, ``RandShiftIntensity`` and
``RandGaussianNoise`` (same formulas: erf Gaussian kernel truncated at 4 sigma with zero padding,
``((x - min) / (range + 1e-7)) ** gamma * range + min``, ``x * (1 + f)``, ``x + offset``,
``x + N(0, U(0, std))``), applied to a whole ``[N, C, D, H, W]`` batch at once with per-view parameters
drawn from a ``torch.Generator``. MONAI's random transforms draw from a per-transform NumPy
``RandomState`` one image at a time, which is neither reproducible from the engine's per-sample generator
nor batched on the GPU; :func:`apply_intensity` is checked against MONAI's deterministic transforms
(``GaussianSmooth``, ``AdjustContrast``, ...) in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from medcl.core.errors import MedclConfigError
from medcl.views import _rng

PLANES = ((0, 1), (0, 2), (1, 2))
"""The three view-axis planes a 90-degree rotation can turn, indexed 0, 1, 2."""


def _rot90_table() -> torch.Tensor:
    """``[3, 4, 3, 3]`` view -> pre-rotation maps for plane ``p`` and ``k`` quarter turns.

    The convention of ``torch.rot90(x, k, dims=plane)`` (and MONAI's ``Rotate90``): the view is
    ``rot90(crop, k, plane)``, so a view voxel offset maps back to the crop by this matrix.
    """
    table = torch.zeros(3, 4, 3, 3, dtype=torch.float64)
    cos = (1.0, 0.0, -1.0, 0.0)
    sin = (0.0, 1.0, 0.0, -1.0)
    for p, (a, b) in enumerate(PLANES):
        for k in range(4):
            q = torch.eye(3, dtype=torch.float64)
            q[a, a] = q[b, b] = cos[k]
            q[a, b] = sin[k]
            q[b, a] = -sin[k]
            table[p, k] = q
    return table


_ROT90 = _rot90_table()


class SpatialDraw(NamedTuple):
    """Per-view spatial augmentation.

    Attributes:
        linear: ``[N, 3, 3]`` signed permutation ``flip @ rot90``: augmented view axes -> un-augmented
            view axes (the view is ``rot90(flip(crop))``, as MONAI's ``Flip`` then ``Rotate90``).
        scale: ``[N, 3]`` extent multipliers (``> 1`` zooms out: a larger crop resampled to the same shape).
        plane: ``[N]`` rotation plane index into :data:`PLANES`, ``-1`` when not rotated.
        k: ``[N]`` quarter turns (0 when not rotated).
        flip: ``[N, 3]`` bool, flipped view axes.
    """

    linear: torch.Tensor
    scale: torch.Tensor
    plane: torch.Tensor
    k: torch.Tensor
    flip: torch.Tensor


def rotation_planes(view_spacing: torch.Tensor, source_spacing: torch.Tensor, rtol: float = 1e-3) -> torch.Tensor:
    """``[..., 3]`` bool: may view plane ``p`` (:data:`PLANES`) be rotated by 90 degrees?

    Args:
        view_spacing: ``[..., 3]`` mm per view voxel along each view axis.
        source_spacing: ``[..., 3]`` spacing of the source axis each view axis runs along.
    """

    def equal(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return (x[..., a] - x[..., b]).abs() <= rtol * torch.maximum(x[..., a], x[..., b])

    return torch.stack(
        [equal(view_spacing, a, b) & equal(source_spacing, a, b) for a, b in PLANES], dim=-1
    )


@dataclass
class SpatialAugment:
    """Random flips, 90-degree rotations and scaling of views, as geometry (no voxel is moved).

    Args:
        flip_prob: probability of flipping each view axis (independently).
        rot90_prob: probability of a rotation by 1, 2 or 3 quarter turns in one allowed plane (chosen
            uniformly among the planes of equal spacing; none if there is none).
        scale_prob: probability of scaling a view (unscaled views copy source voxels exactly and are
            rendered by a fast gather).
        scale_range: ``(low, high)`` extent multiplier drawn uniformly; ``(1, 1)`` disables scaling.
        isotropic_scale: one multiplier for the three axes (else one per axis).
        spacing_rtol: relative tolerance for "equal spacing".
    """

    flip_prob: float = 0.5
    rot90_prob: float = 0.5
    scale_prob: float = 0.5
    scale_range: tuple[float, float] = (0.8, 1.25)
    isotropic_scale: bool = True
    spacing_rtol: float = 1e-3

    def __post_init__(self) -> None:
        for key in ("flip_prob", "rot90_prob", "scale_prob"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise MedclConfigError(f"augment.{key}", f"must be a probability in [0, 1], got {v}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise MedclConfigError("augment.scale_range", f"needs 0 < low <= high, got {self.scale_range}")

    def sample(
        self, n: int, view_spacing: torch.Tensor, source_spacing: torch.Tensor, generator: torch.Generator
    ) -> SpatialDraw:
        """Draw the augmentation of ``n`` views.

        Args:
            n: number of views.
            view_spacing: ``[3]`` or ``[n, 3]`` mm per (un-augmented) view voxel.
            source_spacing: ``[3]`` or ``[n, 3]`` source spacing along each (un-augmented) view axis.
            generator: the only source of randomness.
        """
        allowed = rotation_planes(view_spacing.double(), source_spacing.double(), self.spacing_rtol)
        allowed = allowed.expand(n, 3)
        flip = _rng.uniform(generator, n, 3) < self.flip_prob
        rotate = _rng.uniform(generator, n) < self.rot90_prob
        pick = _rng.uniform(generator, n)
        k = _rng.randint(generator, 1, 4, n)
        lo, hi = self.scale_range
        scale = _rng.uniform_between(generator, lo, hi, n, 1 if self.isotropic_scale else 3).expand(n, 3)
        scaled = _rng.uniform(generator, n, 1) < self.scale_prob
        scale = torch.where(scaled, scale, torch.ones_like(scale))
        # the j-th allowed plane, j uniform among the allowed ones
        count = allowed.sum(dim=1)
        target = (pick * count).floor() + 1
        plane = (allowed.long().cumsum(dim=1) >= target[:, None]).long().argmax(dim=1)
        rotate = rotate & (count > 0)
        k = torch.where(rotate, k, torch.zeros_like(k))
        plane = torch.where(rotate, plane, torch.full_like(plane, -1))
        return make_draw(flip, plane, k, scale)


def make_draw(
    flip: torch.Tensor | None = None,
    plane: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    n: int | None = None,
) -> SpatialDraw:
    """A chosen (not random) spatial augmentation, e.g. to reproduce a MONAI ``Flip`` + ``Rotate90``.

    Args:
        flip: ``[N, 3]`` bool flipped view axes.
        plane: ``[N]`` plane index into :data:`PLANES` (``-1``: no rotation).
        k: ``[N]`` quarter turns, as ``torch.rot90``.
        scale: ``[N, 3]`` extent multipliers.
        n: number of views when every argument is left out.
    """
    given = [t for t in (flip, plane, k, scale) if t is not None]
    n = int(given[0].shape[0]) if given else int(n or 1)
    flip = torch.zeros(n, 3, dtype=torch.bool) if flip is None else torch.as_tensor(flip, dtype=torch.bool)
    plane = torch.full((n,), -1, dtype=torch.long) if plane is None else torch.as_tensor(plane, dtype=torch.long)
    k = torch.zeros(n, dtype=torch.long) if k is None else torch.as_tensor(k, dtype=torch.long) % 4
    k = torch.where(plane >= 0, k, torch.zeros_like(k))
    scale = torch.ones(n, 3, dtype=torch.float64) if scale is None else torch.as_tensor(scale, dtype=torch.float64)
    signs = torch.where(flip, -1.0, 1.0).double()
    linear = torch.diag_embed(signs) @ _ROT90[plane.clamp(min=0), k]
    return SpatialDraw(linear, scale.expand(n, 3).contiguous(), plane, k, flip)


def identity_draw(n: int) -> SpatialDraw:
    """No augmentation for ``n`` views."""
    return SpatialDraw(
        torch.eye(3, dtype=torch.float64).repeat(n, 1, 1),
        torch.ones(n, 3, dtype=torch.float64),
        torch.full((n,), -1, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, 3, dtype=torch.bool),
    )


def augment_affine(affine: torch.Tensor, out_shape: tuple[int, int, int], draw: SpatialDraw) -> torch.Tensor:
    """Fold a spatial draw into existing view affines ``[N, 4, 4]`` (view voxel -> mm or -> voxel).

    The augmented view is the un-augmented one flipped, rotated and scaled about its centre:
    ``affine @ T(c) @ linear @ diag(scale) @ T(-c)`` with ``c = (o - 1) / 2``.
    """
    dev = affine.device
    c = (torch.tensor(out_shape, dtype=torch.float64, device=dev) - 1) / 2
    w = torch.eye(4, dtype=torch.float64, device=dev).repeat(affine.shape[0], 1, 1)
    lin = draw.linear.to(dev) * draw.scale.to(dev)[:, None, :]
    w[:, :3, :3] = lin
    w[:, :3, 3] = c - lin @ c
    return affine.double() @ w


# --------------------------------------------------------------------------------------- intensity
@dataclass
class IntensityAugment:
    """Random intensity augmentations of a view batch, one draw per view (MONAI's parameterisation).

    Applied in this order, each with its own probability: Gaussian smoothing (``sigma`` per axis
    ~ U(``smooth_sigma``), as ``RandGaussianSmooth``), contrast (``gamma`` ~ U(``gamma``), as
    ``RandAdjustContrast``), scaling (``x * (1 + f)``, ``f`` ~ U(``scale_factors``), as
    ``RandScaleIntensity``), shifting (``x + o``, ``o`` ~ U(``shift_offsets``), as ``RandShiftIntensity``)
    and additive Gaussian noise (std ~ U(0, ``noise_std``), as ``RandGaussianNoise``). Geometry is never
    changed. Contrast uses each view's own min and range over all its channels, as ``AdjustContrast``.
    """

    smooth_prob: float = 0.2
    smooth_sigma: tuple[float, float] = (0.25, 1.0)
    contrast_prob: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    scale_prob: float = 0.5
    scale_factors: tuple[float, float] = (-0.1, 0.1)
    shift_prob: float = 0.5
    shift_offsets: tuple[float, float] = (-0.1, 0.1)
    noise_prob: float = 0.3
    noise_std: float = 0.05

    def __post_init__(self) -> None:
        for key in ("smooth_prob", "contrast_prob", "scale_prob", "shift_prob", "noise_prob"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise MedclConfigError(f"intensity.{key}", f"must be a probability in [0, 1], got {v}")
        if self.smooth_sigma[0] <= 0 or self.smooth_sigma[1] < self.smooth_sigma[0]:
            raise MedclConfigError("intensity.smooth_sigma", f"needs 0 < low <= high, got {self.smooth_sigma}")
        if self.gamma[0] <= 0 or self.gamma[1] < self.gamma[0]:
            raise MedclConfigError("intensity.gamma", f"needs 0 < low <= high, got {self.gamma}")

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-view parameters (CPU float64), with the identity where a transform is not drawn.

        Returns ``{"sigma": [n, 3] (0 = no smoothing), "gamma": [n] (1 = none), "factor": [n],
        "offset": [n], "noise_std": [n]}``.
        """
        u = _rng.uniform(generator, n, 5)
        sigma = _rng.uniform_between(generator, *self.smooth_sigma, n, 3)
        gamma = _rng.uniform_between(generator, *self.gamma, n)
        factor = _rng.uniform_between(generator, *self.scale_factors, n)
        offset = _rng.uniform_between(generator, *self.shift_offsets, n)
        std = _rng.uniform_between(generator, 0.0, self.noise_std, n)
        probs = torch.tensor(
            [self.smooth_prob, self.contrast_prob, self.scale_prob, self.shift_prob, self.noise_prob], dtype=torch.float64
        )
        on = u < probs
        zero = torch.zeros((), dtype=torch.float64)
        return {
            "sigma": torch.where(on[:, :1], sigma, zero),
            "gamma": torch.where(on[:, 1], gamma, torch.ones((), dtype=torch.float64)),
            "factor": torch.where(on[:, 2], factor, zero),
            "offset": torch.where(on[:, 3], offset, zero),
            "noise_std": torch.where(on[:, 4], std, zero),
        }

    @staticmethod
    def identity(n: int) -> dict[str, torch.Tensor]:
        """Parameters that leave ``n`` views unchanged (the rows of views that are not augmented)."""
        zero = torch.zeros(n, dtype=torch.float64)
        return {"sigma": torch.zeros(n, 3, dtype=torch.float64), "gamma": torch.ones(n, dtype=torch.float64),
                "factor": zero, "offset": zero.clone(), "noise_std": zero.clone()}

    def __call__(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[N, C, D, H, W]`` -> augmented ``[N, C, D, H, W]`` (same device and dtype).

        Draws the parameters, then one noise seed (:func:`medcl.views._rng.seed`), from ``generator``.
        """
        params = self.draw(views.shape[0], generator)
        return apply_intensity(views, params, _rng.seed(generator))


def gaussian_kernels(sigma: torch.Tensor, truncated: float = 4.0) -> torch.Tensor:
    """``[N, 3, L]`` MONAI ``gaussian_1d(approx="erf")`` kernels for per-view, per-axis ``sigma`` ``[N, 3]``.

    Each kernel is truncated at its own tail ``int(max(4 sigma, 0.5) + 0.5)`` (zero beyond, as MONAI's
    shorter kernel) and not renormalised; ``sigma == 0`` gives the identity (a unit impulse).
    """
    sigma = sigma.double()
    tail = torch.floor(torch.clamp(sigma * truncated, min=0.5) + 0.5)
    tail = torch.where(sigma > 0, tail, torch.zeros_like(tail))
    t_max = int(tail.max()) if tail.numel() else 0
    x = torch.arange(-t_max, t_max + 1, dtype=torch.float64)
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))[..., None]
    t = 0.70710678 / safe
    k = (0.5 * (torch.erf(t * (x + 0.5)) - torch.erf(t * (x - 0.5)))).clamp(min=0)
    k = torch.where(x.abs() <= tail[..., None], k, torch.zeros_like(k))
    impulse = (x == 0).double().expand_as(k)
    return torch.where((sigma > 0)[..., None], k, impulse)


def _banded(kernels: torch.Tensor, length: int) -> torch.Tensor:
    """``[N, L, L]`` matrices applying 1D kernels ``[N, 2T + 1]`` with zero padding along an axis of ``L``."""
    t = kernels.shape[-1] // 2
    pos = torch.arange(length)
    offset = pos[None, :] - pos[:, None] + t  # [L, L] kernel tap of (out i, in j)
    inside = (offset >= 0) & (offset <= 2 * t)
    taps = kernels[:, offset.clamp(0, 2 * t)]  # [N, L, L]
    return taps * inside


def smooth(views: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian smoothing with a different ``sigma`` ``[N, 3]`` per view (zero padding).

    ``[N, C, D, H, W]`` -> same shape. Along each axis the per-view 1D kernel is applied as a banded
    ``[L, L]`` matrix (one batched matmul for all views: the zero padding is the band's truncation).
    """
    if not bool((sigma > 0).any()):
        return views
    kernels = gaussian_kernels(sigma)  # [N, 3, K]
    x = views
    for axis, eq in enumerate(("nij,ncjhw->ncihw", "nij,ncdjw->ncdiw", "nij,ncdhj->ncdhi")):
        if not bool((sigma[:, axis] > 0).any()):
            continue
        mat = _banded(kernels[:, axis], views.shape[2 + axis]).to(views.device, views.dtype)
        x = torch.einsum(eq, mat, x)
    return x


def apply_intensity(
    views: torch.Tensor, params: dict[str, torch.Tensor], noise: torch.Generator | int | None = None
) -> torch.Tensor:
    """Apply :meth:`IntensityAugment.draw` parameters to ``[N, C, D, H, W]`` views (vectorised).

    Each transform runs only on the views that drew it (the selection is known on the CPU, so there is
    no host sync on an accelerator). ``noise`` is where the noise comes from (needed only when some
    ``noise_std > 0``): a seed (an ``int``: a generator on the views' device seeded by it, what the
    samplers use, so the noise of a seed is the same whenever the views are rendered) or a generator
    (used directly on its own device, else a generator on the views' device seeded from it).
    """
    dev, dt = views.device, views.dtype
    x = views.clone()

    def rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        idx = mask.nonzero().squeeze(1)
        return (idx, idx.to(dev)) if idx.numel() else None

    sel = rows((params["sigma"] > 0).any(dim=1))
    if sel is not None:
        x[sel[1]] = smooth(x[sel[1]], params["sigma"][sel[0]])
    sel = rows(params["gamma"] != 1)
    if sel is not None:
        sub = x[sel[1]]
        gamma = params["gamma"][sel[0]].to(dev, dt).reshape(-1, 1, 1, 1, 1)
        lo = sub.amin(dim=(1, 2, 3, 4), keepdim=True)
        rng = sub.amax(dim=(1, 2, 3, 4), keepdim=True) - lo
        x[sel[1]] = ((sub - lo) / (rng + 1e-7)).clamp(min=0) ** gamma * rng + lo
    if bool((params["factor"] != 0).any() or (params["offset"] != 0).any()):
        scale = (1 + params["factor"]).to(dev, dt).reshape(-1, 1, 1, 1, 1)
        shift = params["offset"].to(dev, dt).reshape(-1, 1, 1, 1, 1)
        x = torch.addcmul(shift, x, scale)
    sel = rows(params["noise_std"] > 0)
    if sel is not None:
        if noise is None:
            raise ValueError("apply_intensity: a noise seed or generator is needed to draw the noise")
        g = _rng.seeded(noise, dev) if isinstance(noise, int) else _rng.device_generator(noise, dev)
        noise = torch.randn((sel[0].numel(), *views.shape[1:]), generator=g, device=dev, dtype=dt)
        x[sel[1]] += noise * params["noise_std"][sel[0]].to(dev, dt).reshape(-1, 1, 1, 1, 1)
    return x
