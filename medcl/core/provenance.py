"""View provenance: where each SSL view came from, as tensors (DESIGN.md, idea 2).

A view sampler returns a :class:`ViewBatch`. Every view carries

* ``source_id``  ``[N]`` int64: the id of the volume it was cut from (global across ranks when the
  sampler is given global ids);
* ``partition``  ``[N]`` int64: its partition index (G^D strategies) or ``-1``;
* ``affine``     ``[N, 4, 4]`` float64: view voxel index -> source-volume world millimetres, with the
  crop, flips, 90-degree rotations and scaling folded in;
* ``norm``       ``[N, 4, 4]`` float64: source-volume world millimetres -> normalised coordinates of that
  volume's foreground box (``[0, 1]^3`` inside the box), so positions compare across volumes.

The views themselves may be rendered later, on another device: :class:`medcl.views.pending.PendingViews`
holds every field but ``views`` plus the render plan, and renders into a :class:`ViewBatch`.

Correspondence between views ``a`` and ``b`` of one volume: ``inv(A_b) @ A_a`` maps a voxel of ``a`` to
(continuous) voxel coordinates of ``b``. Across volumes, ``inv(norm_b @ A_b) @ norm_a @ A_a`` maps
by normalised anatomical position.

Optional fields, set by the samplers that need them (``None`` otherwise):

* ``role``    ``[N]`` int64: VoCo view role, :data:`ROLE_BASE` (a base crop of the grid) or
  :data:`ROLE_RANDOM` (a random crop whose position is predicted);
* ``targets`` ``[N, G]`` float: VoCo overlap targets, the fraction of the view's volume inside each of
  the ``G`` base crops of its volume (base crops: one-hot);
* ``match``   ``[N]`` int64: cross-volume positive group (mined pairs): views with the same non-negative
  group are positives, ``-1`` means no mined positive. Groups are kept ``< N`` (a group is named by a
  row of the batch), so :meth:`ViewBatch.cat` offsets them by the rows before and stays unique.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

ROLE_BASE = 0
"""``ViewBatch.role`` of a VoCo base crop."""
ROLE_RANDOM = 1
"""``ViewBatch.role`` of a VoCo random crop."""


@dataclass
class ViewBatch:
    """A batch of SSL views with their geometric provenance.

    Attributes:
        views: ``[N, C, D, H, W]`` view intensities (D, H, W are the view's voxel axes i, j, k).
        source_id: ``[N]`` int64 source volume id.
        partition: ``[N]`` int64 partition index, ``-1`` when not partitioned.
        affine: ``[N, 4, 4]`` float64 view voxel -> source mm.
        norm: ``[N, 4, 4]`` float64 source mm -> normalised foreground-box coordinates.
        mask: optional ``[N, 1, D, H, W]`` bool, True where a voxel was masked out (reconstruction).
        target: optional ``[N, C, D, H, W]`` unmasked intensities (reconstruction target).
        role: optional ``[N]`` int64 VoCo role (:data:`ROLE_BASE` / :data:`ROLE_RANDOM`).
        targets: optional ``[N, G]`` float VoCo overlap fractions with the ``G`` base crops of the view's
            volume (rows of base crops are one-hot; rows of random crops sum to the fraction of the crop
            inside the base region).
        match: optional ``[N]`` int64 cross-volume positive group, ``-1`` for none (see module docstring).
    """

    views: torch.Tensor
    source_id: torch.Tensor
    partition: torch.Tensor
    affine: torch.Tensor
    norm: torch.Tensor
    mask: torch.Tensor | None = None
    target: torch.Tensor | None = None
    role: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    match: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.views.shape[0]
        if self.views.ndim != 5:
            raise ValueError(f"views must be [N, C, D, H, W], got shape {tuple(self.views.shape)}")
        for name, shape in (("source_id", (n,)), ("partition", (n,)), ("affine", (n, 4, 4)), ("norm", (n, 4, 4))):
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"ViewBatch.{name} must have shape {shape}, got {tuple(t.shape)}")
        spatial = tuple(self.views.shape[2:])
        optional = (
            ("mask", (n, 1, *spatial)),
            ("target", (n, self.views.shape[1], *spatial)),
            ("role", (n,)),
            ("match", (n,)),
        )
        for name, shape in optional:
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"ViewBatch.{name} must have shape {shape}, got {tuple(t.shape)}")
        if self.targets is not None and (self.targets.ndim != 2 or self.targets.shape[0] != n):
            raise ValueError(f"ViewBatch.targets must have shape ({n}, G), got {tuple(self.targets.shape)}")

    def __len__(self) -> int:
        return int(self.views.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ViewBatch:
        """Move every tensor (the float64 affines too) to ``device``."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return ViewBatch(**kw)

    def pin_memory(self) -> ViewBatch:
        """A copy in pinned host memory (what a ``DataLoader`` with ``pin_memory=True`` calls)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return ViewBatch(**{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})

    def correspondence(self, a: torch.Tensor | int, b: torch.Tensor | int) -> torch.Tensor:
        """``[..., 4, 4]`` map from voxels of views ``a`` to voxel coordinates of views ``b``."""
        return torch.linalg.inv(self.affine[b]) @ self.affine[a]

    def select(self, index: torch.Tensor | Sequence[int]) -> ViewBatch:
        """A sub-batch (rows ``index``)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.views.device)
        kw = {f.name: (getattr(self, f.name)[idx] if getattr(self, f.name) is not None else None) for f in fields(self)}
        if kw["match"] is not None:
            kw["match"] = _renumber_groups(kw["match"])
        return replace(self, **kw)

    @staticmethod
    def cat(batches: Sequence[ViewBatch]) -> ViewBatch:
        """Concatenate batches along N (used as a collate function)."""
        if not batches:
            raise ValueError("ViewBatch.cat needs at least one batch")
        kw = {}
        for f in fields(ViewBatch):
            vals = [getattr(b, f.name) for b in batches]
            if all(v is None for v in vals):
                kw[f.name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"ViewBatch.cat: field '{f.name}' is set in some batches only")
            elif f.name == "match":
                kw[f.name] = cat_groups(vals, [len(b) for b in batches])
            else:
                kw[f.name] = torch.cat(vals, dim=0)
        return ViewBatch(**kw)


def cat_groups(matches: Sequence[torch.Tensor], lengths: Sequence[int]) -> torch.Tensor:
    """Concatenate ``match`` groups of batches with ``lengths`` rows: groups are ``< len(batch)``, so offsetting
    each by the rows before keeps them unique (``-1`` stays)."""
    offsets = [0, *itertools.accumulate(lengths[:-1])]
    return torch.cat([torch.where(v >= 0, v + o, v) for v, o in zip(matches, offsets)], dim=0)


def _renumber_groups(match: torch.Tensor) -> torch.Tensor:
    """Renumber non-negative groups to ``0..U-1`` (``< N``), keeping ``-1``; same grouping."""
    valid = match >= 0
    _, inverse = torch.unique(torch.where(valid, match, match.new_full((), -1)), return_inverse=True)
    # -1 (if present) is the smallest unique value and takes rank 0: shift the others down by one
    has_neg = (~valid).any()
    return torch.where(valid, inverse - has_neg.long(), match.new_full((), -1))
