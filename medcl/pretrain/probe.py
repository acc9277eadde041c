"""Label-free probes on volumes held back from pretraining (a Lightning callback).

* **Partition k-NN** (always): crops at each of ``S`` partitions of every held-back volume, embedded
  by the flattened bottleneck of the backbone (no projection head; a spatial mean would be nearly
  constant after instance normalisation), classified by
  leave-one-volume-out k-NN (:func:`medcl.engine.monitor.knn_accuracy`). Chance is ``1 / S``. An encoder
  that knows where in the body a crop comes from scores high; a random or collapsed one near chance.
* **VoCo position** (when the method has a VoCo term): mean absolute error of the predicted overlap
  (``ReLU(cos)`` of random-crop vs base-crop embeddings) against the true overlap targets, next to the
  error of the best constant predictor (the mean target).

Probe views are drawn once with a fixed generator and no augmentation, so the numbers are comparable
across steps (and with the step-0 value of the random initialisation).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor

from medcl.core.provenance import ViewBatch
from medcl.engine.monitor import knn_accuracy
from medcl.views import CropSpec, PartitionViewSampler, PositionViewSampler, SourceVolume


def partition_probe_views(
    volumes: list[SourceVolume], crop: tuple[int, int, int], partitions: int, per_partition: int = 4, seed: int = 0
) -> ViewBatch:
    """``per_partition`` un-augmented crops per partition of every volume (deterministic)."""
    sampler = PartitionViewSampler(CropSpec(tuple(crop)), partitions=partitions, n_aug=0, augment=None, intensity=None)
    g = torch.Generator().manual_seed(seed)
    return ViewBatch.cat([sampler(v, g) for v in volumes for _ in range(per_partition)])


class ProbeCallback(L.Callback):
    """Runs the probes at the start, every ``every`` steps and at the end; logs ``probe/*``.

    Args:
        volumes: held-back volumes (never trained on).
        crop, partitions, k: partition k-NN settings.
        per_partition: probe crops per partition and volume.
        every: probe interval in optimiser steps.
        voco_term: name of the VoCo term whose head is probed, or None.
        voco_sampler: the VoCo position sampler (its augmentation is switched off for the probe).
    """

    def __init__(
        self,
        volumes: list[SourceVolume],
        crop: tuple[int, int, int],
        partitions: int,
        k: int,
        every: int,
        voco_term: str | None = None,
        voco_sampler: PositionViewSampler | None = None,
        per_partition: int = 4,
    ) -> None:
        self.every = every
        self.k = k
        self.partitions = partitions
        self.history: list[dict[str, float]] = []
        self.views = partition_probe_views(volumes, crop, partitions, per_partition) if len(volumes) >= 2 else None
        self.voco_term = voco_term
        self.voco_views = None
        if voco_term is not None and voco_sampler is not None and volumes:
            s = PositionViewSampler(
                voco_sampler.crop, grid=voco_sampler.grid, n_random=voco_sampler.n_random, augment=None, intensity=None
            )
            g = torch.Generator().manual_seed(1)
            self.voco_views = ViewBatch.cat([s(v, g) for v in volumes for _ in range(2)])

    @torch.no_grad()
    def _embed(self, pl_module: Any, x: Tensor, batch: int = 16) -> Tensor:
        outs = []
        for i in range(0, x.shape[0], batch):
            xb = pl_module._prepare(x[i : i + batch].to(pl_module.device))
            outs.append(pl_module.backbone(xb, upto="bottleneck").bottleneck.flatten(1).float().cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def measure(self, pl_module: Any) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        out: dict[str, float] = {}
        try:
            if self.views is not None:
                emb = self._embed(pl_module, self.views.views)
                out["probe/knn_partition"] = knn_accuracy(emb, self.views.partition, self.views.source_id, self.k)
                out["probe/chance"] = 1.0 / self.partitions
            if self.voco_views is not None:
                out.update(self._voco(pl_module))
        finally:
            pl_module.train(was_training)
        return out

    def _voco(self, pl_module: Any) -> dict[str, float]:
        from medcl.pretrain.terms import VoCoTerm

        term: VoCoTerm = pl_module.terms[self.voco_term]
        vb = self.voco_views
        x = pl_module._prepare(vb.views.to(pl_module.device))
        emb = term.embed(pl_module.backbone(x, upto="bottleneck")).float().cpu()
        base_idx, rand_idx, targets = VoCoTerm.split(vb)
        zb = torch.nn.functional.normalize(emb[base_idx], dim=-1)
        zr = torch.nn.functional.normalize(emb[rand_idx], dim=-1)
        pred = torch.relu(zr @ zb.transpose(1, 2))
        const = targets.mean()
        return {
            "probe/voco_mae": float((pred - targets).abs().mean()),
            "probe/voco_const_mae": float((const - targets).abs().mean()),
        }

    def _log(self, trainer: L.Trainer, pl_module: Any) -> None:
        t0 = time.perf_counter()
        values = self.measure(pl_module)
        if not values:
            return
        values["probe/seconds"] = time.perf_counter() - t0
        self.history.append({"step": trainer.global_step, **values})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_step == 0:
            self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0 and not trainer.fit_loop._should_accumulate():
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self._log(trainer, pl_module)
