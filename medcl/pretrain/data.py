"""The pretraining data stream: preprocessed volumes -> per-sample views with provenance.

Stream position ``p`` (see :mod:`medcl.engine.stream`) picks a volume and a generator seeded by
``(seed, epoch, p)``; every view set of the method is drawn from that volume with that generator (a pair
view set also draws a partner volume from it), so the views of a position are a pure function of the
seed: exact resume and DDP equivalence follow. View ids are ``p * UID_STRIDE + j``.

Where views are rendered is ``render`` (``data.render`` of the config, default ``device``):

* ``device`` -- an item holds no rendered view: per view set a :class:`~medcl.views.pending.PendingViews`
  (provenance, the drawn render plan -- view maps, intensity parameters, noise seeds, block masks -- and
  the sub-boxes of the volumes that its views read). The batch is rendered on the training device right
  after the transfer (:func:`render_views` in :meth:`PretrainDataModule.on_after_batch_transfer`; a batch of
  another loader at the start of the step, ``PretrainModule.rendered``), so the data workers only load cached
  volumes and cut sub-boxes, and the GPU does the resampling;
* ``worker`` -- the views are rendered in the data workers (on the CPU), the reference path.

The draws are the same in both (the plan is drawn first, then rendered), so the views are too: bit for bit
on the CPU (``tests/test_render_on_device.py``); on a GPU up to float rounding, and the intensity noise of a
seed comes from the GPU's generator.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import Dataset

from medcl.core.errors import MedclConfigError
from medcl.core.provenance import ViewBatch
from medcl.engine.seeding import generator_for
from medcl.engine.stream import StreamIndex, StreamLoader, StreamSampler
from medcl.pretrain.config import PretrainConfig, ViewConfig
from medcl.pretrain.terms import UID_STRIDE
from medcl.views import (
    BlockMasking,
    CropSpec,
    CrossVolumePairSampler,
    IntensityAugment,
    NormalisedMatcher,
    PartitionViewSampler,
    PositionViewSampler,
    RandomViewSampler,
    SourceVolume,
    SpatialAugment,
    SSIMMatcher,
)
from medcl.views.candidates import CandidatePairSampler
from medcl.views.pending import PendingViews

RenderAt = Literal["device", "worker"]
RENDER_MODES = ("device", "worker")

_AXIS = {"SI": "S", "LR": "R", "AP": "A"}


def build_sampler(cfg: ViewConfig, ssim_threshold_key: str = "") -> Any:
    """The view sampler of a ``views`` entry."""
    crop = CropSpec(tuple(cfg.crop), unit=cfg.unit, out_shape=tuple(cfg.crop))
    aug = cfg.augment
    spatial = SpatialAugment(
        flip_prob=aug.flip_prob, rot90_prob=aug.rot90_prob, scale_prob=aug.scale_prob, scale_range=tuple(aug.scale_range)
    )
    intensity = IntensityAugment() if aug.intensity else None
    if cfg.kind == "random":
        return RandomViewSampler(crop, n_views=cfg.copies, fg_prob=cfg.fg_prob, augment=spatial, intensity=intensity)
    if cfg.kind == "partition":
        parts: Any = tuple(cfg.partition_grid) if cfg.partition_axis == "grid" else cfg.partitions
        axis = "grid" if cfg.partition_axis == "grid" else _AXIS[cfg.partition_axis]
        return PartitionViewSampler(
            crop, partitions=parts, axis=axis, n_aug=cfg.copies - 1, augment=spatial, intensity=intensity
        )
    if cfg.kind == "position":
        return PositionViewSampler(
            crop, grid=tuple(cfg.grid), n_random=cfg.n_random, fg_prob=cfg.fg_prob, augment=spatial, intensity=intensity
        )
    if cfg.kind == "pair":
        if cfg.matcher == "feature":
            return CandidatePairSampler(
                crop, n_crops=cfg.crops_per_volume, candidates=cfg.candidates, search_mm=cfg.search_mm,
                fg_prob=cfg.fg_prob, intensity=intensity,
            )
        step = max(1.0, cfg.search_mm / 2.0)
        matcher = NormalisedMatcher() if cfg.matcher == "normalised" else SSIMMatcher(threshold=cfg.ssim_threshold, step=step)
        return CrossVolumePairSampler(
            crop, n_crops=cfg.crops_per_volume, matcher=matcher, fg_prob=cfg.fg_prob, augment=spatial, intensity=intensity
        )
    raise ValueError(f"unknown view kind {cfg.kind!r}")


class PretrainStream(Dataset):
    """Map-style dataset over stream positions; item = the views of one volume for every view set.

    Args:
        volumes: a :class:`medcl.data.CaseDataset` (without labels) of the training volumes.
        cfg: the pretraining config (``views``, ``seed`` and ``data.render`` are used).
        view_sets: which ``views`` entries to draw (those used by the terms).
        render: ``device`` (items carry :class:`PendingViews`, rendered after the transfer) or ``worker``
            (items carry rendered :class:`ViewBatch` es); ``None``: the config's ``data.render`` (``device``
            when the config has no such key).
    """

    def __init__(self, volumes: Dataset, cfg: PretrainConfig, view_sets: list[str], render: RenderAt | None = None) -> None:
        render = render or getattr(cfg.data, "render", "device")
        if render not in RENDER_MODES:
            raise MedclConfigError("data.render", f"expected one of {', '.join(RENDER_MODES)}, got {render!r}")
        self.render: RenderAt = render
        self.volumes = volumes
        self.seed = cfg.seed
        self.index = StreamIndex(len(volumes), cfg.seed)
        self.view_sets = view_sets
        self.samplers = {name: build_sampler(cfg.views[name]) for name in view_sets}
        self.masking = {
            name: BlockMasking(cfg.views[name].mask_ratio, cfg.views[name].mask_block)
            for name in view_sets
            if cfg.views[name].mask_ratio > 0
        }
        self.kinds = {name: cfg.views[name].kind for name in view_sets}

    def __len__(self) -> int:
        return 1 << 40  # positions are unbounded; the sampler decides how many are read

    def source(self, index: int) -> SourceVolume:
        return SourceVolume.from_item(self.volumes[index], source_id=index)

    def __getitem__(self, position: int) -> dict[str, Any]:
        epoch, index = self.index(position)
        g = generator_for(self.seed, epoch, position)
        vol = self.source(index)
        views: dict[str, ViewBatch | PendingViews] = {}
        stats: dict[str, torch.Tensor] = {}
        info: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.view_sets:
            sampler = self.samplers[name]
            if self.kinds[name] == "pair":
                n = len(self.volumes)
                partner = (index + 1 + int(torch.randint(max(1, n - 1), (1,), generator=g))) % n if n > 1 else index
                vb, pair_info = sampler.plan(vol, self.source(partner), g)
                if "acceptance_rate" in pair_info:
                    stats[f"{name}_acceptance"] = pair_info["acceptance_rate"].reshape(1).float()
                if "inside" in pair_info:
                    info[name] = {"inside": pair_info["inside"]}
            else:
                vb = sampler.plan(vol, g)
            if name in self.masking:
                vb = self.masking[name].plan(vb, g)
            views[name] = vb.render() if self.render == "worker" else vb.crop()
        uid = {name: position * UID_STRIDE + torch.arange(len(vb), dtype=torch.long) for name, vb in views.items()}
        return {"views": views, "uid": uid, "stats": stats, "info": info}


def _cat(batches: list[Any]) -> ViewBatch | PendingViews:
    return PendingViews.cat(batches) if isinstance(batches[0], PendingViews) else ViewBatch.cat(batches)


def collate_views(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate the per-volume view batches of each view set (``ViewBatch.cat`` / ``PendingViews.cat``)."""
    names = items[0]["views"].keys()
    out: dict[str, Any] = {
        "views": {n: _cat([it["views"][n] for it in items]) for n in names},
        "uid": {n: torch.cat([it["uid"][n] for it in items]) for n in names},
        "stats": {k: torch.cat([it["stats"][k] for it in items]) for k in items[0]["stats"]},
        "info": {
            n: {k: torch.cat([it["info"][n][k] for it in items]) for k in items[0]["info"][n]} for n in items[0]["info"]
        },
    }
    return out


@torch.no_grad()
def render_views(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with every :class:`PendingViews` rendered where its images are (a batch of rendered views is
    returned as it is), after the transfer to the training device."""
    views = batch.get("views", {})
    if not any(isinstance(v, PendingViews) for v in views.values()):
        return batch
    return {**batch, "views": {n: (v.render() if isinstance(v, PendingViews) else v) for n, v in views.items()}}


class PretrainDataModule(L.LightningDataModule):
    """Serves the stream with this process's rank and world size (known once the trainer exists), and renders
    deferred views on the training device right after the transfer (``on_after_batch_transfer``)."""

    def __init__(self, stream: PretrainStream, cfg: PretrainConfig) -> None:
        super().__init__()
        self.stream = stream
        self.cfg = cfg

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Render the views of a deferred batch where the transfer put it (the module's device): the data
        workers ship only the render plan and the sub-boxes of the volumes it reads."""
        return render_views(batch) if isinstance(batch, dict) else batch

    def train_dataloader(self) -> StreamLoader:
        t = self.trainer
        total = self.cfg.trainer.max_steps * self.cfg.trainer.accumulate
        sampler = StreamSampler(
            self.cfg.data.volumes_per_step, total, world_size=t.world_size, rank=t.global_rank
        )
        workers = self.cfg.trainer.num_workers
        loader = StreamLoader(
            self.stream,
            sampler,
            collate_fn=collate_views,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=t.accelerator.__class__.__name__ == "CUDAAccelerator",
            prefetch_factor=4 if workers > 0 else None,
        )
        loader.bind(lambda: t.global_step * t.accumulate_grad_batches)
        return loader
