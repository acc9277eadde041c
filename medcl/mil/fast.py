"""A training fold's bags preloaded on the training device: the fast batch source of :func:`medcl.mil.train.fit_head`.

The streaming path collates every batch on the host (:func:`medcl.mil.bags.collate_bags`: a Python loop over the
bags, a fresh padded tensor, a host-to-device copy). :class:`PackedBags` instead holds the fold once, on the
training device::

    features  [M, D]  every instance of the fold, bags concatenated in dataset order (no padding stored)
    offsets   [n]     index of each bag's first instance in ``features``
    sizes     [n]     instances per bag
    labels    [n]     class indices

and turns a batch of bag indices into a :class:`~medcl.mil.bags.BagBatch` with a handful of tensor operations
(one gather of the rows, no per-bag Python work, no transfer). An epoch's batch order comes from the sampler's
same draws (:meth:`medcl.mil.sampling.BagBatchSampler.epoch_index`) and is copied to the device once per epoch.

**Bit-identical batches.** Each batch is padded to *its own* largest bag, exactly as ``collate_bags`` pads it,
and holds the same tensors (features zero at padding, ``mask``, ``labels``, ``index``, ``instance_index``). The
padded length is not a detail: TransMIL uses ``min(landmarks, N)`` landmarks, and reductions over the instance
axis (softmax sums, the weight gradients of every instance layer) round differently for another ``N``; random
draws over the padded batch (``train.instance_keep``, dropout) depend on its shape. Padding every batch to the
fold's longest bag would change results and waste compute, so it is not done. What a fast batch leaves out:
``coords`` (``None``) and ``ids`` (empty): training never reads them.

Memory: the fold's features once (not padded) on the device; :func:`fast_path_choice` keeps bags that do not fit
(read lazily from h5, or more than ``data.max_memory_gb``) on the streaming path.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from medcl.mil.bags import BagBatch, BagDataset

__all__ = ["PackedBags", "fast_path_choice"]


def fast_path_choice(ds: BagDataset, fast: bool, max_memory_gb: float) -> tuple[bool, str]:
    """Whether to train ``ds`` from :class:`PackedBags`, and why (a phrase for the log)."""
    if not fast:
        return False, "streaming (train.fast: false)"
    if not ds.in_memory:
        return False, "streaming (bags read lazily from their h5 files: data.in_memory)"
    gb = ds.n_instances * ds.in_dim * 4 / 2**30
    if gb > max_memory_gb:
        return False, f"streaming ({gb:.1f} GB of features > data.max_memory_gb = {max_memory_gb:g})"
    return True, f"preloaded on the device ({gb * 1024:.1f} MB of features)"


class PackedBags:
    """The bags of ``ds`` (all in memory) on ``device``; :meth:`batch` / :meth:`epoch` give padded batches.

    Args:
        ds: an in-memory :class:`~medcl.mil.bags.BagDataset` (``ds.in_memory``).
        device: the training device.
    """

    def __init__(self, ds: BagDataset, device: torch.device | str) -> None:
        if not ds.in_memory:
            raise ValueError("PackedBags needs the bags in memory (BagDataset.load_all())")
        first = ds.bags[0].features
        dtype = first.dtype if first.is_floating_point() else torch.float32  # collate_bags' rule
        self.device = torch.device(device)
        self.features = torch.cat([b.features.to(dtype) for b in ds.bags]).to(self.device)  # [M, D]
        self.sizes_host = torch.tensor([b.n for b in ds.bags], dtype=torch.long)
        self.sizes = self.sizes_host.to(self.device)
        self.offsets = ds.offsets.to(self.device)
        self.labels = ds.labels.to(self.device)
        self.positions = torch.arange(int(self.sizes_host.max()), device=self.device)
        self.n_bags = len(ds)

    def batch(self, idx: torch.Tensor, n: int) -> BagBatch:
        """The padded batch of the bags ``idx`` (``[B]`` int64 on the device) whose largest bag has ``n`` instances."""
        pos = self.positions[:n]
        mask = pos[None, :] < self.sizes[idx][:, None]  # [B, n]
        rows = self.offsets[idx][:, None] + pos[None, :]
        instance_index = torch.where(mask, rows, -1)
        feats = self.features[instance_index.clamp_min(0)]  # [B, n, D]; padding rows gather row 0, zeroed next
        feats = torch.where(mask[..., None], feats, torch.zeros((), dtype=feats.dtype, device=feats.device))
        return BagBatch(features=feats, mask=mask, labels=self.labels[idx], index=idx, instance_index=instance_index,
                        coords=None, ids=[])

    def epoch(self, order: torch.Tensor, lengths: list[int]) -> Iterator[BagBatch]:
        """The batches of one epoch: ``order`` holds the bag indices of all batches back to back (host tensor),
        ``lengths`` the number of bags in each (:meth:`~medcl.mil.sampling.BagBatchSampler.epoch_index`)."""
        longest = [int(s.max()) for s in self.sizes_host[order].split(lengths)]  # host ints: no device sync
        order = order.to(self.device, non_blocking=True)
        start = 0
        for length, n in zip(lengths, longest):
            yield self.batch(order[start : start + length], n)
            start += length
