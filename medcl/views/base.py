"""What every view sampler shares: orientation, augmentation, placement, the render plan, the batch.

A sampler's ``plan(volume, generator)`` draws everything (geometry, intensity parameters, a noise seed)
and returns a :class:`~medcl.views.pending.PendingViews`; ``sampler(volume, generator)`` renders it at
once. The draws are the same either way, so views rendered later on another device are the same views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch

from medcl.core.errors import MedclConfigError
from medcl.core.provenance import ViewBatch
from medcl.views import _rng
from medcl.views.augment import IntensityAugment, SpatialAugment, SpatialDraw, identity_draw
from medcl.views.crop import CropSpec, PaddingMode, place_crops, spacing_along
from medcl.views.pending import PendingViews, RenderJob
from medcl.views.source import SourceVolume

Orient = Literal["ras", "source"]
Default = Literal["default"]
"""Samplers take ``augment="default"`` / ``intensity="default"`` for their default augmentation and
``None`` for none."""


def resolve(value, factory):
    """``factory()`` for ``"default"``, else ``value`` (``None`` disables)."""
    return factory() if isinstance(value, str) and value == "default" else value


def check_count(key: str, value: int, minimum: int = 1) -> int:
    """``value`` as an int, or a config error naming ``views.{key}`` when it is below ``minimum``."""
    if int(value) != value or value < minimum:
        raise MedclConfigError(f"views.{key}", f"must be an integer >= {minimum}, got {value}")
    return int(value)


def check_probability(key: str, value: float) -> float:
    """``value`` as a float, or a config error naming ``views.{key}`` when it is not in ``[0, 1]``."""
    if not 0.0 <= float(value) <= 1.0:
        raise MedclConfigError(f"views.{key}", f"must be a probability in [0, 1], got {value}")
    return float(value)


def check_non_negative(key: str, value: float) -> float:
    """``value`` as a float, or a config error naming ``views.{key}`` when it is negative."""
    if float(value) < 0:
        raise MedclConfigError(f"views.{key}", f"must be >= 0, got {value}")
    return float(value)


def base_axes(volume: SourceVolume, orient: Orient) -> torch.Tensor:
    """``[3, 3]`` un-augmented view axes -> source voxel axes.

    ``"ras"``: view axes D, H, W run along the voxel axes nearest to world R, A, S (so views of volumes
    stored in different orientations look alike); ``"source"``: the array axes i, j, k.
    """
    if orient == "ras":
        return volume.ras_axes
    if orient == "source":
        return torch.eye(3, dtype=torch.float64)
    raise MedclConfigError("views.orient", f"expected 'ras' or 'source', got {orient!r}")


def fg_biased_points(volume: SourceVolume, n: int, fg_prob: float, generator: torch.Generator) -> torch.Tensor:
    """``[n, 3]`` source voxel positions: uniform in the foreground box with probability ``fg_prob``,
    else uniform in the whole volume (the extent from the outer face of the first voxel to the last)."""
    box = volume.fg_box.double()
    shape = torch.tensor(volume.shape, dtype=torch.float64)
    in_fg = _rng.uniform(generator, n, 1) < fg_prob
    u = _rng.uniform(generator, n, 3)
    lo = torch.where(in_fg, box[0], torch.zeros(3, dtype=torch.float64)) - 0.5
    hi = torch.where(in_fg, box[1], shape) - 0.5
    return lo + u * (hi - lo)


class ViewSamplerBase:
    """Shared configuration of the samplers.

    Args:
        crop: size of each view (voxels or mm) and its output shape.
        augment: spatial augmentation (flips, 90-degree rotations in equal-spacing planes, scaling),
            or ``None``. The samplers take ``"default"`` for their default :class:`SpatialAugment`.
        intensity: intensity augmentation, or ``None`` (samplers: ``"default"`` for
            :class:`IntensityAugment` with its defaults).
        orient: ``"ras"`` (view axes along R, A, S) or ``"source"`` (array axes).
        padding_mode: value of view voxels outside the volume (``grid_sample``'s ``"border"``,
            ``"zeros"``, ``"reflection"``).
        fg_prob: for samplers that place crops: the probability of centring one in the foreground box
            (``None``: the sampler does not place crops that way).
        default_augment: what ``augment="default"`` builds (a sampler's own default, e.g. no scaling).

    Every argument is checked here, once for all samplers; samplers check only their own arguments, with
    :func:`check_count`, :func:`check_probability` and :func:`check_non_negative`.
    """

    def __init__(
        self,
        crop: CropSpec | None = None,
        augment: SpatialAugment | Default | None = None,
        intensity: IntensityAugment | Default | None = None,
        orient: Orient = "ras",
        padding_mode: PaddingMode = "border",
        fg_prob: float | None = None,
        default_augment: Callable[[], SpatialAugment] | None = SpatialAugment,
    ) -> None:
        self.crop = crop if crop is not None else CropSpec(32)
        self.fg_prob = check_probability("fg_prob", fg_prob) if fg_prob is not None else None
        self.augment = resolve(augment, default_augment or SpatialAugment)
        self.intensity = resolve(intensity, IntensityAugment)
        if orient not in ("ras", "source"):
            raise MedclConfigError("views.orient", f"expected 'ras' or 'source', got {orient!r}")
        if padding_mode not in ("zeros", "border", "reflection"):
            raise MedclConfigError("views.padding_mode", f"expected zeros, border or reflection, got {padding_mode!r}")
        self.orient = orient
        self.padding_mode = padding_mode

    # ------------------------------------------------------------------ geometry
    def draw_spatial(self, volume: SourceVolume, n: int, generator: torch.Generator, augment: bool = True) -> SpatialDraw:
        """Per-view spatial augmentation for ``n`` views of ``volume`` (identity when disabled)."""
        if not augment or self.augment is None:
            return identity_draw(n)
        r0 = base_axes(volume, self.orient)
        along = volume.spacing[r0.abs().argmax(dim=0)]
        return self.augment.sample(n, self.crop.view_spacing(along), along, generator)

    def linear(self, volume: SourceVolume, draw: SpatialDraw) -> torch.Tensor:
        """``[N, 3, 3]`` source voxels per view voxel: orientation, augmentation and step folded in."""
        r = base_axes(volume, self.orient) @ draw.linear  # view axes -> source axes (signed)
        along = spacing_along(r, volume.spacing)  # [N, 3] spacing of the source axis of each view axis
        step = self.crop.step(along) * draw.scale
        return r * step[:, None, :]

    def vox_maps(
        self, volume: SourceVolume, centres: torch.Tensor, draw: SpatialDraw, clamp: bool
    ) -> torch.Tensor:
        """``[N, 4, 4]`` view voxel -> source voxel for crops centred at ``centres`` ``[N, 3]``."""
        return place_crops(self.linear(volume, draw), self.crop.shape, centres, volume.shape, clamp=clamp)

    # ------------------------------------------------------------------ output
    def job(
        self, vox_map: torch.Tensor, generator: torch.Generator, intensity: bool = True, plain_first: int = 0, image: int = 0
    ) -> RenderJob:
        """The render plan of views at ``vox_map``: intensity parameters and a noise seed drawn here, from
        ``generator``, when intensity augmentation is configured (``plain_first`` leading views get identity
        parameters: not augmented)."""
        n = int(vox_map.shape[0])
        params, seed = None, None
        if intensity and self.intensity is not None and n > plain_first:
            params = self.intensity.draw(n - plain_first, generator)
            if plain_first:
                ident = IntensityAugment.identity(plain_first)
                params = {k: torch.cat([ident[k], v]) for k, v in params.items()}
            seed = _rng.seed(generator)
        return RenderJob(image, vox_map.detach().double().cpu(), self.crop.shape, self.padding_mode, params, seed)

    def render(
        self, volume: SourceVolume, vox_map: torch.Tensor, generator: torch.Generator, intensity: bool = True
    ) -> torch.Tensor:
        """``[N, C, D, H, W]`` views of ``volume`` at ``vox_map``, intensity-augmented if configured."""
        return self.job(vox_map, generator, intensity).render([volume.image])

    @staticmethod
    def pending(
        volume: SourceVolume, job: RenderJob, partition: torch.Tensor | None = None, **extra: torch.Tensor | None
    ) -> PendingViews:
        """The :class:`PendingViews` of one job on ``volume`` (provenance on the CPU, float64 affines)."""
        n = len(job)
        if partition is None:
            partition = torch.full((n,), -1, dtype=torch.long)
        return PendingViews(
            images=[volume.image],
            jobs=[replace(job, image=0)],
            source_id=torch.full((n,), int(volume.source_id), dtype=torch.long),
            partition=partition.cpu(),
            affine=volume.affine @ job.vox_map,
            norm=volume.norm.expand(n, 4, 4).contiguous(),
            **{k: (v.cpu() if v is not None else None) for k, v in extra.items()},
        )

    @staticmethod
    def batch(
        volume: SourceVolume,
        views: torch.Tensor,
        vox_map: torch.Tensor,
        partition: torch.Tensor | None = None,
        **extra: torch.Tensor | None,
    ) -> ViewBatch:
        """A :class:`ViewBatch` on the views' device (affines float64: ``volume.affine @ vox_map``)."""
        n = views.shape[0]
        dev = views.device
        affine = (volume.affine.to(vox_map.device) @ vox_map.double()).to(dev)
        if partition is None:
            partition = torch.full((n,), -1, dtype=torch.long)
        return ViewBatch(
            views=views,
            source_id=torch.full((n,), int(volume.source_id), dtype=torch.long, device=dev),
            partition=partition.to(dev),
            affine=affine,
            norm=volume.norm.to(dev).expand(n, 4, 4).contiguous(),
            **{k: (v.to(dev) if v is not None else None) for k, v in extra.items()},
        )
