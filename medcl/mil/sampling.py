"""Batch samplers over bags: plain shuffling, class-balanced sampling, a minimum of bags per class.

SC-MIL's supervised contrastive loss needs every batch to hold at least two bags of each class (else a
bag has no positive); :class:`BagBatchSampler` with ``min_per_class=2`` guarantees it, drawing extra bags of
a rare class with replacement when there are not enough to go round.
"""

from __future__ import annotations

import math

import torch

from medcl.core.errors import MedclConfigError


class BagBatchSampler:
    """Lists of bag indices per epoch, a pure function of ``(seed, epoch)``.

    Args:
        labels: ``[n]`` int64 class index per bag.
        batch_size: bags per batch (the last batch of a ``random`` epoch may be smaller).
        mode: ``"random"`` (each bag once per epoch, shuffled) or ``"balanced"`` (each batch draws classes
            uniformly, then a bag of the class; ``ceil(n / batch_size)`` batches per epoch).
        min_per_class: every batch holds at least this many bags of every class present.
        seed: base seed.
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, mode: str = "random", min_per_class: int = 0, seed: int = 0):
        self.labels = labels.long().cpu()
        self.batch_size = int(batch_size)
        self.mode = mode
        self.min_per_class = int(min_per_class)
        self.seed = int(seed)
        self.classes = torch.unique(self.labels).tolist()
        self.by_class = {c: torch.nonzero(self.labels == c).flatten() for c in self.classes}
        if mode not in ("random", "balanced"):
            raise MedclConfigError("train.sampler", f"must be 'random' or 'balanced', got {mode!r}")
        if self.min_per_class * len(self.classes) > self.batch_size:
            raise MedclConfigError(
                "train.batch_size",
                f"{self.batch_size} is too small for {self.min_per_class} bags of each of {len(self.classes)} classes",
            )

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.labels) / self.batch_size))

    def _gen(self, epoch: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return g

    def epoch_index(self, epoch: int) -> tuple[torch.Tensor, list[int]]:
        """The batches of :meth:`epoch` concatenated into one int64 tensor, and the length of each batch.

        The same draws as :meth:`epoch` (the plain shuffle is not turned into Python lists at all).
        """
        if self.mode == "random" and self.min_per_class == 0:
            perm = torch.randperm(len(self.labels), generator=self._gen(epoch))
            n, b = len(perm), self.batch_size
            return perm, [min(b, n - i) for i in range(0, n, b)]
        batches = self.epoch(epoch)
        return torch.tensor([i for bt in batches for i in bt], dtype=torch.long), [len(bt) for bt in batches]

    def epoch(self, epoch: int) -> list[list[int]]:
        """Lists of bag indices of epoch ``epoch``."""
        g = self._gen(epoch)
        n_batches = len(self)
        if self.mode == "random" and self.min_per_class == 0:
            perm = torch.randperm(len(self.labels), generator=g)
            return [perm[i : i + self.batch_size].tolist() for i in range(0, len(perm), self.batch_size)]
        batches: list[list[int]] = [[] for _ in range(n_batches)]
        if self.mode == "random":
            # deal each class round-robin over the batches (stratified batches), then top up rare classes
            start = 0
            for c in self.classes:
                idx = self.by_class[c][torch.randperm(len(self.by_class[c]), generator=g)]
                for j, i in enumerate(idx.tolist()):
                    batches[(start + j) % n_batches].append(i)
                start += len(idx)
            for bt in batches:
                for c in self.classes:
                    have = sum(1 for i in bt if int(self.labels[i]) == c)
                    pool = self.by_class[c]
                    for _ in range(self.min_per_class - have):
                        bt.append(int(pool[torch.randint(len(pool), (1,), generator=g)]))
        else:
            k = len(self.classes)
            for bt in batches:
                cls = [c for c in self.classes for _ in range(self.min_per_class)]
                rest = self.batch_size - len(cls)
                cls += [self.classes[int(j)] for j in torch.randint(k, (rest,), generator=g)]
                for c in cls:
                    pool = self.by_class[c]
                    bt.append(int(pool[torch.randint(len(pool), (1,), generator=g)]))
        return [bt for bt in batches if bt]
