"""Crops as affines, and one batched resampling that turns them into views.

Every view in medcl is described by one 4x4 map ``M`` from view voxel index ``v`` to (continuous)
source voxel coordinates::

    p = c + L @ (v - (o - 1) / 2)

with ``o`` the output shape, ``c`` the crop centre in source voxels and ``L`` (3x3) a signed permutation
(orientation, flips, 90-degree rotations) times the per-axis step in source voxels (crop size over output
size, times the scaling augmentation). The view's world affine is ``source.affine @ M``. The view covers
``[-0.5, o - 0.5]`` in its own voxels, i.e. the same convention MONAI's ``Resize``/``Zoom`` use when they
update a ``MetaTensor``'s affine, so an unscaled view is an exact copy of source voxels (as MONAI's
``SpatialCrop`` + ``Flip`` + ``Rotate90``) and a scaled one is the crop resampled to the output size.

All views of one volume are rendered at once on the image's device (:func:`render`: one flat gather for
the whole-voxel views, a separable trilinear gather for the other axis-aligned ones -- every view the
samplers make -- and one ``torch.nn.functional.grid_sample`` call for any other map); the (tiny) geometry
is planned in float64 on the CPU. The two gathers compute sample positions in float64, so they give the
same values on any sub-box of the image that holds the views (maps shifted by whole voxels), which lets
views be rendered from the sub-box a data worker ships (:mod:`medcl.views.pending`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from medcl.core.errors import MedclConfigError

Unit = Literal["voxel", "mm"]
PaddingMode = Literal["zeros", "border", "reflection"]


def _triple(value, key: str, kind=float) -> tuple:
    if isinstance(value, (int, float)):
        value = (value,) * 3
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise MedclConfigError(key, f"expected a number or three numbers, got {value!r}") from exc
    if len(out) != 3:
        raise MedclConfigError(key, f"expected three values (one per axis), got {len(out)}")
    if any(v <= 0 for v in out):
        raise MedclConfigError(key, f"values must be positive, got {out}")
    return out


@dataclass(frozen=True)
class CropSpec:
    """Size of the region a view covers and the shape it is resampled to.

    Args:
        size: crop size per view axis, one number or three, in ``unit``.
        unit: ``"voxel"`` (source voxels) or ``"mm"`` (physical size, the same anatomy scale for every
            spacing).
        out_shape: view shape ``(D, H, W)``; defaults to ``size`` for voxel crops (no resampling) and is
            required for mm crops (the views of one batch must share a shape).

    Source voxels per view voxel along view axis ``d`` (before the scaling augmentation):
    ``size[d] / out_shape[d]`` for voxel crops, ``size[d] / out_shape[d] / spacing`` for mm crops.
    """

    size: tuple[float, float, float] | float = 32
    unit: Unit = "voxel"
    out_shape: tuple[int, int, int] | int | None = None

    def __post_init__(self) -> None:
        if self.unit not in ("voxel", "mm"):
            raise MedclConfigError("crop.unit", f"expected 'voxel' or 'mm', got {self.unit!r}")
        object.__setattr__(self, "size", _triple(self.size, "crop.size"))
        if self.out_shape is None:
            if self.unit == "mm":
                raise MedclConfigError("crop.out_shape", "is required when crop.unit is 'mm' (views of a batch share a shape)")
            object.__setattr__(self, "out_shape", tuple(max(1, round(s)) for s in self.size))
        else:
            object.__setattr__(self, "out_shape", _triple(self.out_shape, "crop.out_shape", int))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The view shape ``(D, H, W)``."""
        return self.out_shape  # type: ignore[return-value]

    def step(self, spacing_along: torch.Tensor) -> torch.Tensor:
        """``[..., 3]`` source voxels per view voxel, given the source spacing along each view axis."""
        ratio = torch.tensor(self.size, dtype=torch.float64) / torch.tensor(self.shape, dtype=torch.float64)
        return ratio.expand_as(spacing_along).clone() if self.unit == "voxel" else ratio / spacing_along

    def view_spacing(self, spacing_along: torch.Tensor) -> torch.Tensor:
        """``[..., 3]`` mm per view voxel (before scaling), given the source spacing along each view axis."""
        return self.step(spacing_along) * spacing_along


def spacing_along(lin: torch.Tensor, spacing: torch.Tensor) -> torch.Tensor:
    """``[N, 3]`` spacing of the source axis each view axis runs along (``lin`` ``[N, 3, 3]``).

    The source axis of view axis ``d`` is the one with the largest ``|lin[:, d]|`` (exact for the signed
    permutations the samplers use; the nearest axis otherwise).
    """
    axis = lin.abs().argmax(dim=1)  # [N, 3]
    return spacing[axis]


def place_crops(
    lin: torch.Tensor,
    out_shape: tuple[int, int, int],
    centre: torch.Tensor,
    volume_shape: tuple[int, int, int],
    clamp: bool = True,
) -> torch.Tensor:
    """View voxel -> source voxel maps ``[N, 4, 4]`` (float64) for crops with linear part ``lin``.

    Args:
        lin: ``[N, 3, 3]`` source voxels per view voxel (column ``d``: the step of view axis ``d``).
        out_shape: view shape ``(D, H, W)``.
        centre: ``[N, 3]`` wanted crop centres in source voxel coordinates.
        volume_shape: ``(X, Y, Z)``.
        clamp: move each crop inside the volume when it fits (centred when it does not); otherwise the
            centre is kept and voxels outside the volume are padded by the renderer.

    Where every step along a source axis is a whole number of voxels (unscaled crops), the first sample
    is moved (by at most half a voxel) onto a voxel centre, so those views copy voxels exactly.
    """
    lin = lin.double()
    o = torch.tensor(out_shape, dtype=torch.float64)
    size = torch.tensor(volume_shape, dtype=torch.float64)
    reach = lin.abs()  # [N, 3(source), 3(view)]
    half = reach @ o / 2  # half extent along each source axis
    c = centre.double().clone()
    if clamp:
        lo, hi = half - 0.5, size - 0.5 - half
        c = torch.where(lo <= hi, torch.minimum(torch.maximum(c, lo), hi), ((size - 1) / 2).expand_as(c))
    first = c - reach @ (o - 1) / 2
    integral = ((reach - reach.round()).abs() < 1e-6).all(dim=2)
    c = c + torch.where(integral, first.round() - first, torch.zeros_like(first))
    m = torch.eye(4, dtype=torch.float64).repeat(lin.shape[0], 1, 1)
    m[:, :3, :3] = lin
    m[:, :3, 3] = c - lin @ ((o - 1) / 2)
    return m


def _integral_axes(vox_map: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """``[N]`` bool: the map is a signed permutation with whole-voxel steps and offsets (a pure gather)."""
    lin = vox_map[:, :3, :3]
    nz = lin.abs() > tol
    perm = (nz.sum(dim=1) == 1).all(dim=1) & (nz.sum(dim=2) == 1).all(dim=1)
    whole = ((vox_map[:, :3, :] - vox_map[:, :3, :].round()).abs() < tol).flatten(1).all(dim=1)
    return perm & whole


def _axis_aligned(vox_map: torch.Tensor, rtol: float = 1e-9) -> torch.Tensor:
    """``[N]`` bool: each view axis runs along one source axis (a signed, scaled permutation; any offset)."""
    lin = vox_map[:, :3, :3]
    nz = lin.abs() > rtol * lin.abs().amax(dim=(1, 2), keepdim=True)
    return (nz.sum(dim=1) == 1).all(dim=1) & (nz.sum(dim=2) == 1).all(dim=1)


def _reflect(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Continuous coordinates reflected into ``[0, size - 1]`` as ``grid_sample`` (align_corners=True)."""
    span = (size - 1).double()
    safe = span.clamp(min=1.0)
    x = x.abs()
    flips = torch.floor(x / safe)
    extra = x - flips * safe
    out = torch.where(flips % 2 == 0, extra, safe - extra)
    return torch.where(span > 0, out, torch.zeros_like(out))


def _linear_views(
    image: torch.Tensor, vox_map: torch.Tensor, out_shape: tuple[int, int, int], padding_mode: str
) -> torch.Tensor:
    """Trilinear resampling of axis-aligned views (:func:`_axis_aligned`) as eight flat gathers.

    View axis ``d`` runs along source axis ``e(d)``, so the sample positions, the two neighbours and the
    weights are 1D per view axis, computed in float64 on the CPU (padding as ``grid_sample``: ``border``
    clamps the position, ``reflection`` reflects then clamps, ``zeros`` drops neighbours outside). The
    result is ``grid_sample``'s trilinear interpolation without its float32 coordinate rounding, and it does
    not depend on where the image starts: the same views from a sub-box (map shifted by whole voxels) are
    bit-identical. Corners whose weights are all zero (unscaled axes) are skipped.
    """
    n, c = vox_map.shape[0], image.shape[0]
    dev, dt = image.device, image.dtype
    m = vox_map.double()
    src_axis = m[:, :3, :3].abs().argmax(dim=1)  # [N, 3] source axis of each view axis
    step = m[:, :3, :3].gather(1, src_axis[:, None, :]).squeeze(1)  # [N, 3]
    offset = m[:, :3, 3].gather(1, src_axis)  # [N, 3]
    size = torch.tensor(image.shape[1:], dtype=torch.long)
    strides = torch.tensor([image.shape[2] * image.shape[3], image.shape[3], 1], dtype=torch.long)
    index: list[list[torch.Tensor]] = []
    weight: list[list[torch.Tensor | None]] = []
    for d, o in enumerate(out_shape):
        s = size[src_axis[:, d]][:, None]  # [N, 1]
        x = offset[:, d, None] + step[:, d, None] * torch.arange(o, dtype=torch.float64)[None, :]  # [N, o]
        if padding_mode == "reflection":
            x = _reflect(x, s)
        if padding_mode in ("border", "reflection"):
            x = torch.minimum(torch.maximum(x, torch.zeros_like(x)), (s - 1).double())
        i0 = torch.floor(x)
        f = x - i0
        i0 = i0.long()
        idx, wts = [], []
        for k, w in ((i0, 1.0 - f), (i0 + 1, f)):
            valid = (k >= 0) & (k < s)
            w = torch.where(valid, w, torch.zeros_like(w))
            idx.append((k.clamp(min=0).minimum(s - 1) * strides[src_axis[:, d]][:, None]).to(dev))
            wts.append(w.to(dev, dt) if bool((w != 0).any()) else None)
        index.append(idx)
        weight.append(wts)
    flat_image = image.reshape(c, -1)
    out = torch.zeros((c, n, *out_shape), dtype=dt, device=dev)
    for a, b, e in itertools.product((0, 1), repeat=3):
        wa, wb, we = weight[0][a], weight[1][b], weight[2][e]
        if wa is None or wb is None or we is None:
            continue
        flat = index[0][a][:, :, None, None] + index[1][b][:, None, :, None] + index[2][e][:, None, None, :]
        w = wa[:, :, None, None] * wb[:, None, :, None] * we[:, None, None, :]
        out += flat_image.index_select(1, flat.reshape(-1)).reshape(c, n, *out_shape) * w
    return out.transpose(0, 1)


def _pad_index(idx: torch.Tensor, size: torch.Tensor, padding_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-voxel indices ``[N, L]`` into ``[0, size)`` as ``grid_sample`` pads (align_corners=True)."""
    valid = (idx >= 0) & (idx < size)
    if padding_mode == "reflection":
        period = (2 * (size - 1)).clamp(min=1)
        idx = (size - 1) - ((idx % period) - (size - 1)).abs()
    idx = torch.minimum(torch.maximum(idx, torch.zeros_like(idx)), size - 1)
    return idx, valid


def _gather_views(
    image: torch.Tensor, vox_map: torch.Tensor, out_shape: tuple[int, int, int], padding_mode: str
) -> torch.Tensor:
    """Views whose maps pass :func:`_integral_axes`, as one flat gather (exact voxel copies).

    Each view axis ``d`` runs along one source axis ``e(d)`` with a whole step, so the flat source index
    is a sum of three 1D terms, one per view axis, padded per axis exactly as ``grid_sample`` would.
    """
    n = vox_map.shape[0]
    c = image.shape[0]
    dev = image.device
    m = vox_map.round().long()  # [N, 4, 4]
    src_axis = vox_map[:, :3, :3].abs().argmax(dim=1)  # [N, 3] source axis of each view axis
    step = m[:, :3, :3].gather(1, src_axis[:, None, :]).squeeze(1)  # [N, 3]
    offset = m[:, :3, 3].gather(1, src_axis)  # [N, 3]
    size = torch.tensor(image.shape[1:], dtype=torch.long)
    strides = torch.tensor([image.shape[2] * image.shape[3], image.shape[3], 1], dtype=torch.long)
    terms, valids = [], []
    for d, o in enumerate(out_shape):
        idx = offset[:, d, None] + step[:, d, None] * torch.arange(o)[None, :]  # [N, o]
        idx, valid = _pad_index(idx, size[src_axis[:, d]][:, None], padding_mode)
        terms.append((idx * strides[src_axis[:, d]][:, None]).to(dev))
        valids.append(valid.to(dev))
    flat = terms[0][:, :, None, None] + terms[1][:, None, :, None] + terms[2][:, None, None, :]
    views = image.reshape(c, -1).index_select(1, flat.reshape(-1)).reshape(c, n, *out_shape).transpose(0, 1)
    if padding_mode == "zeros":
        keep = valids[0][:, :, None, None] & valids[1][:, None, :, None] & valids[2][:, None, None, :]
        views = views * keep[:, None].to(views.dtype)
    return views


def _sample_views(
    image: torch.Tensor, vox_map: torch.Tensor, out_shape: tuple[int, int, int], padding_mode: str, mode: str
) -> torch.Tensor:
    """Trilinear (or nearest) resampling of any views with one ``grid_sample`` call."""
    n = vox_map.shape[0]
    d, h, w = out_shape
    size = image.shape[1:]
    # source voxel (i, j, k) -> grid_sample's normalised (x, y, z) = (k, j, i), align_corners=True
    to_grid = torch.zeros(3, 4, dtype=torch.float64)
    for g, axis in enumerate((2, 1, 0)):
        to_grid[g, axis] = 2.0 / max(float(size[axis]) - 1.0, 1.0)
        to_grid[g, 3] = -1.0
    dev, dt = image.device, image.dtype
    theta = (to_grid.to(dev) @ vox_map.detach().to(dev, torch.float64)).to(dt)  # [N, 3, 4]
    # grid = theta @ (d, h, w, 1), as a sum of one term per view axis (cheaper than a matmul)
    axes = [torch.arange(s, device=dev, dtype=dt) for s in out_shape]
    grid = (
        (theta[:, None, :, 3] + axes[0][None, :, None] * theta[:, None, :, 0])[:, :, None, None, :]
        + (axes[1][None, :, None] * theta[:, None, :, 1])[:, None, :, None, :]
        + (axes[2][None, :, None] * theta[:, None, :, 2])[:, None, None, :, :]
    )  # [N, D, H, W, 3]
    out = F.grid_sample(
        image.unsqueeze(0), grid.reshape(1, n * d, h, w, 3), mode=mode, padding_mode=padding_mode, align_corners=True
    )  # [1, C, N*D, H, W]
    return out.reshape(image.shape[0], n, d, h, w).transpose(0, 1)


def render(
    image: torch.Tensor,
    vox_map: torch.Tensor,
    out_shape: tuple[int, int, int],
    padding_mode: PaddingMode = "border",
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> torch.Tensor:
    """Resample all views of one volume at once.

    Views whose map is a signed permutation with whole-voxel steps and offsets (unscaled crops, flips,
    90-degree rotations, whole-voxel strides) are one flat gather -- exact voxel copies, what
    ``grid_sample`` returns at voxel centres, several times faster; other axis-aligned views (scaled) are a
    separable trilinear gather with float64 positions (:func:`_linear_views`); any other map (oblique) goes
    through one trilinear ``grid_sample`` call. The split is decided on the CPU when the maps are there;
    maps on an accelerator always use ``grid_sample`` (no host sync).

    Args:
        image: ``[C, X, Y, Z]`` source intensities (any device, float).
        vox_map: ``[N, 4, 4]`` view voxel -> source voxel (float64, any device; any affine, not only the
            axis-aligned ones the samplers make).
        out_shape: ``(D, H, W)``.
        padding_mode: value outside the volume (``grid_sample``'s modes; ``"border"`` repeats the edge).
        mode: ``"bilinear"`` (trilinear) or ``"nearest"`` (``grid_sample`` for every non-integral view).

    Returns:
        ``[N, C, D, H, W]`` views on ``image``'s device and dtype.
    """
    out_shape = tuple(int(s) for s in out_shape)  # type: ignore[assignment]
    if vox_map.device.type != "cpu":
        return _sample_views(image, vox_map, out_shape, padding_mode, mode).contiguous()
    vm = vox_map.double()
    fast = _integral_axes(vm)
    aligned = ~fast & _axis_aligned(vm) if mode == "bilinear" else torch.zeros_like(fast)
    groups = [
        (fast, lambda m: _gather_views(image, m, out_shape, padding_mode)),
        (aligned, lambda m: _linear_views(image, m, out_shape, padding_mode)),
        (~fast & ~aligned, lambda m: _sample_views(image, m, out_shape, padding_mode, mode)),
    ]
    for sel, fn in groups:
        if bool(sel.all()):
            return fn(vm).contiguous()
    out = image.new_empty((vox_map.shape[0], image.shape[0], *out_shape))
    for sel, fn in groups:
        if bool(sel.any()):
            idx = sel.nonzero().squeeze(1)
            out[idx.to(image.device)] = fn(vm[idx])
    return out


def inside_fraction(
    vox_map: torch.Tensor, out_shape: tuple[int, int, int], volume_shape: tuple[int, int, int], points: int = 5
) -> torch.Tensor:
    """``[N]`` fraction of a ``points^3`` lattice of each view that falls inside the source volume."""
    dev = vox_map.device
    lattice = [torch.linspace(-0.5, s - 0.5, points + 2, dtype=torch.float64, device=dev)[1:-1] for s in out_shape]
    mesh = torch.stack([*(m.reshape(-1) for m in torch.meshgrid(*lattice, indexing="ij"))], dim=1)
    mesh = torch.cat([mesh, torch.ones(mesh.shape[0], 1, dtype=torch.float64, device=dev)], dim=1)
    p = (mesh @ vox_map.double().transpose(1, 2))[..., :3]  # [N, P, 3]
    size = torch.tensor(volume_shape, dtype=torch.float64, device=dev)
    inside = ((p >= -0.5) & (p <= size - 0.5)).all(dim=-1)
    return inside.double().mean(dim=1)
