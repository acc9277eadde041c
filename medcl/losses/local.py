"""Bounded, geometric local (dense) contrastive loss (Chaitanya et al., NeurIPS 2020; DESIGN.md ideas 2, 3).

Chaitanya et al.'s local loss contrasts decoder features of two augmented copies of one 2D image at the
*same* grid positions, which silently assumes no spatial augmentation and an unstrided map. Here the two
views are related by their affines: ``K`` points are sampled inside the overlap of the two views,
mapped with ``inv(A_b) @ A_a``, and features are read with ``grid_sample`` at continuous coordinates, so
flips, 90-degree rotations, scaling, crops of any offset and strided decoder stages are all handled.
Memory grows with ``B * K^2``, not with voxels squared.

Coordinate convention (``align_corners=False`` everywhere): a view of shape ``(D, H, W)`` covers the
continuous voxel box ``[-0.5, D - 0.5] x [-0.5, H - 0.5] x [-0.5, W - 0.5]`` (voxel centres at integers).
A feature map of size ``d`` along an axis has stride ``s = D / d`` and feature voxel ``f`` sits at view
voxel ``(f + 0.5) * s - 0.5``; both give the normalised ``grid_sample`` coordinate ``2 (v + 0.5) / D - 1``
for view voxel coordinate ``v``, whatever the stride.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from medcl.core.provenance import ViewBatch
from medcl.losses.contrastive import Mode, info_nce

_TOL = 1e-6


class OverlapPoints(NamedTuple):
    """Points sampled in the overlap of view pairs (see :func:`sample_overlap_points`).

    Attributes:
        pa: ``[B, K, 3]`` float64 voxel coordinates (i, j, k) in view a.
        pb: ``[B, K, 3]`` float64 corresponding voxel coordinates in view b.
        mm: ``[B, K, 3]`` float64 positions in view a's source millimetres (for the radius).
        valid: ``[B, K]`` bool, False for points that could not be placed (pair without overlap, or an
            oblique pair whose rejection sampling ran short).
        pair_ok: ``[B]`` bool, False where the two views do not overlap at all.
    """

    pa: torch.Tensor
    pb: torch.Tensor
    mm: torch.Tensor
    valid: torch.Tensor
    pair_ok: torch.Tensor


class LocalLossResult(NamedTuple):
    """What :func:`local_contrastive_loss` returns.

    Attributes:
        loss: scalar, mean over kept anchor points of all pairs (0 with a gradient path if none).
        n_anchors: 0-dim int64, anchor points kept (each sampled point in both views is an anchor).
        n_dropped: 0-dim int64, anchor points dropped (no positive, or in ``dcl`` no negative).
        n_pairs_dropped: 0-dim int64, view pairs without overlap (contributing nothing).
    """

    loss: torch.Tensor
    n_anchors: torch.Tensor
    n_dropped: torch.Tensor
    n_pairs_dropped: torch.Tensor


def _shape(shape: Sequence[int] | torch.Tensor, name: str) -> torch.Tensor:
    s = torch.as_tensor(shape, dtype=torch.float64)
    if s.shape != (3,) or bool((s <= 0).any()):
        raise ValueError(f"{name} must be a positive (D, H, W), got {shape!r}")
    return s


def _interp_box(
    shape: Sequence[int], feat_shape: Sequence[int] | None, name: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    s = _shape(shape, f"shape_{name}").to(device)
    f = s if feat_shape is None else _shape(feat_shape, f"feat_shape_{name}").to(device)
    stride = s / f
    return 0.5 * stride - 0.5, s - 0.5 - 0.5 * stride


def _apply(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[B, 4, 4]`` affine applied to ``[B, K, 3]`` points."""
    return p @ m[:, :3, :3].transpose(1, 2) + m[:, None, :3, 3]


def correspondence(
    affine_a: torch.Tensor,
    affine_b: torch.Tensor,
    norm_a: torch.Tensor | None = None,
    norm_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, 4, 4]`` float64 map from voxels of view a to voxel coordinates of view b.

    Same volume: ``inv(A_b) @ A_a``. Across volumes (``norm_*`` given, source mm -> normalised
    foreground-box coordinates): ``inv(norm_b @ A_b) @ norm_a @ A_a``, i.e. by normalised anatomical position.
    """
    a = affine_a.to(torch.float64)
    b = affine_b.to(torch.float64)
    if (norm_a is None) != (norm_b is None):
        raise ValueError("give both norm_a and norm_b (cross-volume correspondence) or neither")
    if norm_a is not None:
        a = norm_a.to(torch.float64) @ a
        b = norm_b.to(torch.float64) @ b
    return torch.linalg.inv(b) @ a


def sample_overlap_points(
    affine_a: torch.Tensor,
    shape_a: Sequence[int],
    affine_b: torch.Tensor,
    shape_b: Sequence[int],
    n_points: int,
    *,
    feat_shape_a: Sequence[int] | None = None,
    feat_shape_b: Sequence[int] | None = None,
    norm_a: torch.Tensor | None = None,
    norm_b: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    oversample: int = 4,
) -> OverlapPoints:
    """Sample ``K`` points uniformly inside the overlap of each pair of views (vectorised over pairs).

    Each view contributes its *interpolation box*, the hull of its feature-voxel centres,
    ``[s/2 - 1/2, D - 1/2 - s/2]`` per axis with stride ``s = D / d`` (``[0, D - 1]`` at stride 1), so
    features are interpolated, never extrapolated. The overlap box in view a's voxels is a's box
    intersected with the bounding box of b's box mapped back by ``inv(M)``, ``M`` = :func:`correspondence`.
    ``oversample * K`` candidates are drawn uniformly in that box and the first ``K`` that fall inside b's
    box are kept. When ``M`` is axis-aligned (crops, flips, 90-degree rotations, scaling) the box *is* the
    overlap and every candidate is valid; for oblique pairs the oversampling leaves room for rejections
    (points still missing are marked invalid). No host synchronisation.

    Args:
        affine_a, affine_b: ``[B, 4, 4]`` float64 view voxel -> source mm.
        shape_a, shape_b: spatial shapes ``(D, H, W)`` of the views.
        n_points: ``K``.
        feat_shape_a, feat_shape_b: spatial shapes ``(d, h, w)`` of the feature maps read at the points
            (default: the view shapes, stride 1).
        norm_a, norm_b: ``[B, 4, 4]`` source mm -> normalised coordinates, for cross-volume pairs.
        generator: a ``torch.Generator`` for reproducible sampling (its device is used for drawing).
        oversample: candidates drawn per point (rejection margin for oblique pairs).

    Returns:
        :class:`OverlapPoints`.
    """
    if affine_a.ndim != 3 or tuple(affine_a.shape[1:]) != (4, 4) or affine_a.shape != affine_b.shape:
        raise ValueError(
            f"affine_a and affine_b must both be [B, 4, 4], got {tuple(affine_a.shape)}, {tuple(affine_b.shape)}"
        )
    if n_points <= 0:
        raise ValueError(f"n_points must be positive, got {n_points}")
    device = affine_a.device
    box_a = _interp_box(shape_a, feat_shape_a, "a", device)  # ([3], [3]) lo, hi in view-a voxels
    box_b = _interp_box(shape_b, feat_shape_b, "b", device)
    m = correspondence(affine_a, affine_b, norm_a, norm_b)  # [B, 4, 4]
    m_inv = torch.linalg.inv(m)
    bsz = m.shape[0]

    corners = torch.stack(
        torch.meshgrid(*([torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)] * 3), indexing="ij"),
        -1,
    ).reshape(1, 8, 3)
    b_corners = box_b[0] + corners * (box_b[1] - box_b[0])  # [1, 8, 3] corners of b's box
    in_a = _apply(m_inv, b_corners.expand(bsz, 8, 3))  # [B, 8, 3]
    lo = torch.maximum(in_a.amin(1), box_a[0])  # [B, 3]
    hi = torch.minimum(in_a.amax(1), box_a[1])
    pair_ok = (hi >= lo - _TOL).all(-1)

    n_cand = n_points * max(1, int(oversample))
    gdev = generator.device if generator is not None else device
    u = torch.rand(bsz, n_cand, 3, generator=generator, dtype=torch.float64, device=gdev).to(device)
    pa = lo[:, None] + u * (hi - lo).clamp_min(0)[:, None]
    pb = _apply(m, pa)
    valid = ((pb >= box_b[0] - _TOL) & (pb <= box_b[1] + _TOL)).all(-1) & pair_ok[:, None]
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :n_points]  # valid ones first
    pa = pa.gather(1, order[..., None].expand(-1, -1, 3))
    pb = pb.gather(1, order[..., None].expand(-1, -1, 3))
    valid = valid.gather(1, order)
    pair_ok = pair_ok & valid.any(1)
    mm = _apply(affine_a.to(torch.float64), pa)
    return OverlapPoints(pa, pb, mm, valid, pair_ok)


def read_features(feat: torch.Tensor, points: torch.Tensor, view_shape: Sequence[int]) -> torch.Tensor:
    """Trilinear features at continuous view-voxel coordinates (the convention of this module).

    Args:
        feat: ``[B, C, d, h, w]`` feature map of views of spatial shape ``view_shape = (D, H, W)``
            (any stride ``D / d``, ``H / h``, ``W / w``).
        points: ``[B, K, 3]`` view voxel coordinates (i, j, k).
        view_shape: ``(D, H, W)``.

    Returns:
        ``[B, K, C]`` features (float32, or float64 for float64 maps), border-clamped outside the map.
    """
    if feat.ndim != 5 or points.ndim != 3 or points.shape[0] != feat.shape[0] or points.shape[2] != 3:
        raise ValueError(
            f"feat must be [B, C, d, h, w] and points [B, K, 3], got {tuple(feat.shape)}, {tuple(points.shape)}"
        )
    s = _shape(view_shape, "view_shape").to(points.device)
    g = 2.0 * (points.to(torch.float64) + 0.5) / s - 1.0  # [B, K, 3] in (i, j, k) order
    # at least float32: half-precision grid coordinates would be off by ~0.1 voxel on large views
    dt = torch.promote_types(feat.dtype, torch.float32)
    g = g.flip(-1).to(dt)[:, None, None]  # grid_sample wants (x=k, y=j, z=i): [B, 1, 1, K, 3]
    out = F.grid_sample(feat.to(dt), g, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0, 0].transpose(1, 2)  # [B, K, C]


def feature_voxel_mm(
    affine: torch.Tensor, view_shape: Sequence[int], feat_shape: Sequence[int]
) -> torch.Tensor:
    """``[B]`` the longest edge, in mm, of one feature-map voxel of each view."""
    spacing = affine[:, :3, :3].to(torch.float64).norm(dim=1)  # [B, 3] mm per view voxel along i, j, k
    stride = _shape(view_shape, "view_shape").to(affine.device) / _shape(feat_shape, "feat_shape").to(
        affine.device
    )
    return (spacing * stride).amax(-1)


def local_contrastive_loss(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    affine_a: torch.Tensor,
    affine_b: torch.Tensor,
    shape_a: Sequence[int],
    shape_b: Sequence[int] | None = None,
    *,
    n_points: int = 64,
    radius_mm: float | None = None,
    temperature: float = 0.1,
    mode: Mode = "per_pair",
    norm_a: torch.Tensor | None = None,
    norm_b: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    oversample: int = 4,
) -> LocalLossResult:
    """Local contrastive loss between corresponding points of view pairs (Chaitanya et al., 2020).

    For each pair ``(a_n, b_n)``, ``K`` points are sampled in the overlap (:func:`sample_overlap_points`),
    and features read at them in both views (:func:`read_features`), giving ``2K`` embeddings. Each point
    in one view is an anchor; its positive is the same point in the other view; its negatives are the
    other points (in both views) farther than ``radius_mm`` from it, measured in view a's source mm;
    points within the radius are excluded (neither positive nor negative). The InfoNCE is
    :func:`medcl.losses.info_nce` on ``[B, 2K, 2K]`` similarities (per pair, no cross-pair negatives,
    as in Chaitanya et al.), averaged over all kept anchor points.

    Domain-specific variant (Chaitanya et al.'s partition idea made dense): pass ``norm_a``/``norm_b``
    (``ViewBatch.norm``) and views of *different* volumes from the same partition; points then correspond
    by normalised foreground-box position, ``inv(norm_b @ A_b) @ norm_a @ A_a``.

    Args:
        feat_a, feat_b: ``[B, C, d, h, w]`` decoder features of views a and b (may differ in size).
        affine_a, affine_b: ``[B, 4, 4]`` float64 view voxel -> source mm (``ViewBatch.affine``).
        shape_a: ``(D, H, W)`` of the views a (input size, so the feature stride is ``D / d``).
        shape_b: ``(D, H, W)`` of the views b (default ``shape_a``).
        n_points: ``K`` points per pair; memory and time grow with ``B * K^2``.
        radius_mm: negatives must be farther than this; None: one feature voxel's longest edge in mm.
        temperature: InfoNCE temperature.
        mode: InfoNCE denominator mode (``"per_pair"`` default).
        norm_a, norm_b: ``[B, 4, 4]`` source mm -> normalised coordinates, for the cross-volume variant.
        generator: sampling generator (reproducibility).
        oversample: candidates drawn per point (rejection margin for oblique pairs).

    Returns:
        :class:`LocalLossResult`; pairs without overlap are dropped and counted.
    """
    if feat_a.ndim != 5 or feat_b.ndim != 5:
        raise ValueError(
            f"feat_a and feat_b must be [B, C, d, h, w], got {tuple(feat_a.shape)}, {tuple(feat_b.shape)}"
        )
    if feat_a.shape[:2] != feat_b.shape[:2]:
        raise ValueError(f"feat_a {tuple(feat_a.shape)} and feat_b {tuple(feat_b.shape)} differ in B or C")
    if affine_a.shape[0] != feat_a.shape[0]:
        raise ValueError(f"affine_a has {affine_a.shape[0]} rows but feat_a has batch {feat_a.shape[0]}")
    shape_b = shape_a if shape_b is None else shape_b
    pts = sample_overlap_points(
        affine_a,
        shape_a,
        affine_b,
        shape_b,
        n_points,
        feat_shape_a=tuple(feat_a.shape[2:]),
        feat_shape_b=tuple(feat_b.shape[2:]),
        norm_a=norm_a,
        norm_b=norm_b,
        generator=generator,
        oversample=oversample,
    )
    fa = read_features(feat_a, pts.pa, shape_a)  # [B, K, C]
    fb = read_features(feat_b, pts.pb, shape_b)
    z = torch.cat([fa, fb], dim=1)  # [B, 2K, C]

    if radius_mm is None:
        r = feature_voxel_mm(affine_a, shape_a, feat_a.shape[2:])  # [B]
    else:
        if radius_mm < 0:
            raise ValueError(f"radius_mm must be >= 0, got {radius_mm}")
        r = torch.full((feat_a.shape[0],), float(radius_mm), dtype=torch.float64, device=feat_a.device)
    near = torch.cdist(pts.mm, pts.mm) <= r[:, None, None]  # [B, K, K], includes the diagonal
    near2 = near.repeat(1, 2, 2)  # [B, 2K, 2K]
    k = pts.pa.shape[1]
    idx = torch.arange(2 * k, device=feat_a.device)
    partner = (idx + k) % (2 * k)
    pos = torch.zeros(2 * k, 2 * k, dtype=torch.bool, device=feat_a.device)
    pos[idx, partner] = True
    pos = pos.expand_as(near2)
    eye = torch.eye(2 * k, dtype=torch.bool, device=feat_a.device)
    valid2 = pts.valid.repeat(1, 2)  # [B, 2K]
    exclude = (near2 & ~pos) | eye | ~valid2[:, None, :] | ~valid2[:, :, None]
    res = info_nce(z, z, pos & ~exclude, exclude, temperature=temperature, mode=mode)
    return LocalLossResult(res.loss, res.n_anchors, res.n_dropped, (~pts.pair_ok).sum())


def view_pairs(
    source_id: torch.Tensor, partition: torch.Tensor | None = None, *, cross_volume: bool = False
) -> torch.Tensor:
    """``[P, 2]`` int64 index pairs ``(a, b)``, ``a < b``, of views to contrast locally.

    Default: every two views of the same source volume. ``cross_volume=True``: every two views of
    *different* volumes with the same partition ``>= 0`` (the domain-specific variant; needs
    ``partition``). Uses boolean indexing (one host sync).
    """
    n = int(source_id.shape[0])
    iu = torch.triu_indices(n, n, 1, device=source_id.device)
    same_src = source_id[iu[0]] == source_id[iu[1]]
    if cross_volume:
        if partition is None:
            raise ValueError("cross_volume pairs need the partition ids")
        keep = ~same_src & (partition[iu[0]] == partition[iu[1]]) & (partition[iu[0]] >= 0)
    else:
        keep = same_src
    return iu[:, keep].T.contiguous()


def local_loss_for_views(
    feat: torch.Tensor,
    views: ViewBatch,
    pairs: torch.Tensor,
    *,
    cross_volume: bool = False,
    **kwargs,
) -> LocalLossResult:
    """:func:`local_contrastive_loss` on pairs of one :class:`~medcl.core.provenance.ViewBatch`.

    Args:
        feat: ``[N, C, d, h, w]`` decoder features of ``views.views`` (``[N, C', D, H, W]``).
        views: the batch (its ``affine``, and ``norm`` when ``cross_volume``).
        pairs: ``[P, 2]`` view indices (:func:`view_pairs`).
        cross_volume: correspond by normalised position (``views.norm``) instead of by millimetres.
        **kwargs: passed on (``n_points``, ``radius_mm``, ``temperature``, ``mode``, ``generator``, ...).
    """
    if feat.ndim != 5 or feat.shape[0] != len(views):
        raise ValueError(f"feat must be [N, C, d, h, w] with N = {len(views)} views, got {tuple(feat.shape)}")
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [P, 2], got {tuple(pairs.shape)}")
    a, b = pairs[:, 0], pairs[:, 1]
    shape = tuple(int(s) for s in views.views.shape[2:])
    norm_a = views.norm[a] if cross_volume else None
    norm_b = views.norm[b] if cross_volume else None
    return local_contrastive_loss(
        feat[a], feat[b], views.affine[a], views.affine[b], shape, norm_a=norm_a, norm_b=norm_b, **kwargs
    )
