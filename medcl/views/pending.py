"""Views drawn but not rendered yet: provenance plus a render plan, so views can be rendered on the GPU.

A sampler's random draws are all small: crop centres, flips, rotations and scales (folded into one
``vox_map`` per view), intensity parameters, one noise seed per render call, block masks. ``sampler.plan``
draws them from the stream's generator and returns a :class:`PendingViews`: every
:class:`~medcl.core.provenance.ViewBatch` field but ``views``, the source images and one
:class:`RenderJob` per render call. :meth:`PendingViews.render` turns it into the ViewBatch, wherever the
images are; ``sampler(...)`` is ``sampler.plan(...).render()``.

The pretraining stream (:mod:`medcl.pretrain.data`) ships a plan instead of views: the images are cut
down to the sub-boxes the views read (:meth:`PendingViews.crop`: one box per view, boxes of one image merged
while the merged box is no larger than the two, maps shifted by whole voxels), the data workers render
nothing, and the training step renders the batch on its device after the transfer. The same draws happen
in both paths (DESIGN.md, idea 6), and the renderer's gathers compute positions in float64 on the CPU, so on
the CPU both give the same views bit for bit (oblique maps, which no sampler makes, go through
``grid_sample`` and differ by float rounding).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace

import torch

from medcl.core.provenance import ViewBatch, cat_groups
from medcl.views.augment import apply_intensity
from medcl.views.crop import PaddingMode, render
from medcl.views.masking import MaskDraw


@dataclass
class RenderJob:
    """One render call: views of one image at ``vox_map``, then their intensity augmentation.

    Attributes:
        image: index in :attr:`PendingViews.images` of each view's source image (``n`` ints; an int is
            expanded to all views).
        vox_map: ``[n, 4, 4]`` float64 (CPU) view voxel -> image voxel.
        out_shape: view shape ``(D, H, W)``.
        padding_mode: ``grid_sample``'s padding outside the image.
        intensity: per-view :meth:`~medcl.views.augment.IntensityAugment.draw` parameters (CPU, identity
            rows for views that are not augmented), or ``None``.
        noise_seed: the seed of the intensity noise (drawn from the sampler's generator with the parameters).
    """

    image: int | tuple[int, ...]
    vox_map: torch.Tensor
    out_shape: tuple[int, int, int]
    padding_mode: PaddingMode = "border"
    intensity: dict[str, torch.Tensor] | None = None
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        n = int(self.vox_map.shape[0])
        self.image = (int(self.image),) * n if isinstance(self.image, int) else tuple(int(i) for i in self.image)
        if len(self.image) != n:
            raise ValueError(f"RenderJob: {len(self.image)} image indices for {n} views")

    def __len__(self) -> int:
        return int(self.vox_map.shape[0])

    def render(self, images: list[torch.Tensor]) -> torch.Tensor:
        """``[n, C, D, H, W]`` views (on the device of the first view's image), then their intensity
        augmentation (one call for the whole job: the noise of a seed does not depend on the images)."""
        used = sorted(set(self.image))
        if len(used) == 1:
            views = render(images[used[0]], self.vox_map, self.out_shape, padding_mode=self.padding_mode)
        else:
            first = images[self.image[0]]
            views = first.new_empty((len(self), first.shape[0], *self.out_shape))
            which = torch.tensor(self.image)
            for k in used:
                rows = (which == k).nonzero().squeeze(1)
                part = render(images[k], self.vox_map[rows], self.out_shape, padding_mode=self.padding_mode)
                views[rows.to(views.device)] = part.to(views.device)
        if self.intensity is not None:
            views = apply_intensity(views, self.intensity, self.noise_seed)
        return views

    def boxes(self, shapes: list[tuple[int, int, int]], margin: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n, 3], [n, 3])`` start and stop (int64) of the voxels each view reads in its image.

        Trilinear sampling at ``x`` reads voxels ``floor(x)`` and ``floor(x) + 1``; ``margin`` more on each side
        absorbs rounding. Clamped to the image: what lies beyond is padding, which a sub-box reproduces
        because it keeps the image's face there (for ``reflection`` it keeps the whole axis).
        """
        corners = torch.tensor(list(itertools.product(*[(0.0, s - 1.0) for s in self.out_shape])), dtype=torch.float64)
        corners = torch.cat([corners, torch.ones(8, 1, dtype=torch.float64)], dim=1)
        p = (corners @ self.vox_map.double().transpose(1, 2))[..., :3]  # [n, 8, 3]
        lo_x, hi_x = p.amin(dim=1), p.amax(dim=1)
        size = torch.tensor([shapes[i] for i in self.image], dtype=torch.float64)  # [n, 3]
        lo = lo_x.floor() - margin
        hi = hi_x.floor() + 1 + margin  # inclusive
        if self.padding_mode == "reflection":
            out = (lo_x < 0) | (hi_x > size - 1)
            lo = torch.where(out, torch.zeros_like(lo), lo)
            hi = torch.where(out, size - 1, hi)
        lo = torch.minimum(torch.maximum(lo, torch.zeros_like(lo)), size - 1)
        hi = torch.minimum(torch.maximum(hi, torch.zeros_like(hi)), size - 1)
        return lo.long(), hi.long() + 1


def merge_boxes(image: list[int], start: torch.Tensor, stop: torch.Tensor) -> list[tuple[int, list[int], list[int], list[int]]]:
    """Group views (``image`` index, box ``start``/``stop`` ``[n, 3]``) into sub-boxes to ship.

    Greedy: two boxes of the same image merge while their bounding box holds no more voxels than the two
    together (copies of one crop, overlapping candidates), so the voxels shipped never grow by merging.
    Returns ``[(image, start, stop, rows)]``.
    """
    groups = [(image[r], start[r].tolist(), stop[r].tolist(), [r]) for r in range(len(image))]

    def size(lo: list[int], hi: list[int]) -> int:
        return (hi[0] - lo[0]) * (hi[1] - lo[1]) * (hi[2] - lo[2])

    merged = True
    while merged:
        merged = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            ga, gb = groups[a], groups[b]
            if ga[0] != gb[0]:
                continue
            lo = [min(x, y) for x, y in zip(ga[1], gb[1])]
            hi = [max(x, y) for x, y in zip(ga[2], gb[2])]
            if size(lo, hi) <= size(ga[1], ga[2]) + size(gb[1], gb[2]):
                groups[a] = (ga[0], lo, hi, ga[3] + gb[3])
                del groups[b]
                merged = True
                break
    return groups


@dataclass
class PendingViews:
    """A :class:`ViewBatch` whose views are not rendered yet (see the module docstring).

    Attributes:
        images: source images ``[C, X, Y, Z]`` (whole volumes, or the sub-boxes of :meth:`crop`).
        jobs: render calls, in row order (job ``k`` gives the next ``len(jobs[k])`` views).
        source_id, partition, affine, norm, role, targets, match: as :class:`ViewBatch`.
        masking: block masks to apply after rendering, or ``None``.
    """

    images: list[torch.Tensor]
    jobs: list[RenderJob]
    source_id: torch.Tensor
    partition: torch.Tensor
    affine: torch.Tensor
    norm: torch.Tensor
    role: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    match: torch.Tensor | None = None
    masking: MaskDraw | None = None

    _PROVENANCE = ("source_id", "partition", "affine", "norm", "role", "targets", "match")

    def __post_init__(self) -> None:
        if not self.jobs:
            raise ValueError("PendingViews needs at least one render job")
        rows = sum(len(j) for j in self.jobs)
        if rows != self.source_id.shape[0]:
            raise ValueError(f"PendingViews: the jobs render {rows} views, the provenance has {self.source_id.shape[0]}")
        if len({tuple(j.out_shape) for j in self.jobs}) != 1:
            raise ValueError("PendingViews: the views of one batch share a shape")

    def __len__(self) -> int:
        return int(self.source_id.shape[0])

    @property
    def views(self) -> torch.Tensor:
        raise AttributeError(
            "PendingViews holds no views yet: render it first (.render(), or medcl.pretrain.data.render_views for a "
            "collated pretraining batch)"
        )

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """The views' shape ``(D, H, W)``."""
        return tuple(int(s) for s in self.jobs[0].out_shape)  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------- rendering
    def render(self) -> ViewBatch:
        """The :class:`ViewBatch`: views rendered on the images' device (the first image's), masks applied."""
        parts = [job.render(self.images) for job in self.jobs]
        dev = parts[0].device
        views = parts[0] if len(parts) == 1 else torch.cat([p.to(dev) for p in parts])
        prov = {k: (v.to(dev) if v is not None else None) for k, v in self._provenance().items()}
        batch = ViewBatch(views=views, **prov)
        return self.masking.apply(batch) if self.masking is not None else batch

    def crop(self, margin: int = 1) -> PendingViews:
        """The same plan on sub-boxes of the images: the voxels the views read (:meth:`RenderJob.boxes`,
        grouped by :func:`merge_boxes`), copied (so a worker ships only those), each view's map shifted by its
        box's start (whole voxels: exact)."""
        shapes = [tuple(int(v) for v in im.shape[1:]) for im in self.images]
        images: list[torch.Tensor] = []
        jobs = []
        for job in self.jobs:
            start, stop = job.boxes(shapes, margin)  # type: ignore[arg-type]
            vox = job.vox_map.clone()
            which = list(job.image)
            for src, lo, hi, rows in merge_boxes(list(job.image), start, stop):
                im = self.images[src]
                images.append(im[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].clone())
                for r in rows:
                    vox[r, :3, 3] -= torch.tensor(lo, dtype=vox.dtype)
                    which[r] = len(images) - 1
            jobs.append(replace(job, image=tuple(which), vox_map=vox))
        return replace(self, images=images, jobs=jobs)

    # ------------------------------------------------------------------------------------- transfer
    def _provenance(self) -> dict[str, torch.Tensor | None]:
        return {k: getattr(self, k) for k in self._PROVENANCE}

    def _map(self, fn) -> PendingViews:
        prov = {k: (fn(v) if v is not None else None) for k, v in self._provenance().items()}
        masking = replace(self.masking, coarse=fn(self.masking.coarse)) if self.masking is not None else None
        return replace(self, images=[fn(im) for im in self.images], masking=masking, **prov)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PendingViews:
        """Images, provenance and masks on ``device``; the render plan stays on the CPU (the renderer
        decides there which views are exact gathers, without a host sync). Pinned tensors move
        asynchronously to a GPU."""
        dev = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(dev, non_blocking=non_blocking or (dev.type == "cuda" and t.is_pinned()))

        return self._map(move)

    def pin_memory(self) -> PendingViews:
        """A copy in pinned host memory (what a ``DataLoader`` with ``pin_memory=True`` calls)."""
        return self._map(lambda t: t.pin_memory())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it holds (images, provenance, masks, render plans)."""
        out = list(self.images) + [v for v in self._provenance().values() if v is not None]
        if self.masking is not None:
            out.append(self.masking.coarse)
        for job in self.jobs:
            out.append(job.vox_map)
            out.extend((job.intensity or {}).values())
        return out

    @staticmethod
    def cat(batches: list[PendingViews]) -> PendingViews:
        """Concatenate along the views (the collate function of deferred batches)."""
        if not batches:
            raise ValueError("PendingViews.cat needs at least one batch")
        images: list[torch.Tensor] = []
        jobs: list[RenderJob] = []
        for b in batches:
            jobs.extend(replace(j, image=tuple(i + len(images) for i in j.image)) for j in b.jobs)
            images.extend(b.images)
        kw: dict = {}
        for f in fields(PendingViews):
            if f.name in ("images", "jobs", "masking"):
                continue
            vals = [getattr(b, f.name) for b in batches]
            if all(v is None for v in vals):
                kw[f.name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"PendingViews.cat: field '{f.name}' is set in some batches only")
            elif f.name == "match":
                kw[f.name] = cat_groups(vals, [len(b) for b in batches])
            else:
                kw[f.name] = torch.cat(vals, dim=0)
        masks = [b.masking for b in batches]
        masking = None
        if any(m is not None for m in masks):
            if any(m is None for m in masks) or len({(m.block, m.fill) for m in masks}) != 1:  # type: ignore[union-attr]
                raise ValueError("PendingViews.cat: every batch needs the same block masking")
            masking = replace(masks[0], coarse=torch.cat([m.coarse for m in masks]))  # type: ignore[union-attr]
        return PendingViews(images=images, jobs=jobs, masking=masking, **kw)
