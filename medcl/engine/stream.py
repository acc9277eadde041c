"""A resumable, rank-aware data stream for step-based training.

Training jobs are step-based (``max_steps``), so the data is one long *stream* of positions
``p = 0, 1, 2, ...``. Position ``p`` stands for item ``perm_e[p mod n]`` of epoch ``e = p div n``, where
``perm_e`` is a permutation drawn from ``(seed, e)``; every random draw for that sample (crops,
augmentations, masks) comes from a generator seeded by ``(seed, e, p)`` (see
:func:`medcl.engine.seeding.generator_for`). The stream is therefore a pure function of the seed:

* **exact resume** -- a checkpoint stores how many global batches were consumed; the resumed sampler
  starts there and the remaining batches are bit-identical to those of an uninterrupted run, however
  many data workers there are and wherever the run was killed;
* **DDP** -- global batch ``b`` holds positions ``[b * B * W, (b + 1) * B * W)``; rank ``r`` takes the
  ``r``-th slice of ``B``. The union over ranks is exactly the single-process batch of size ``B * W``, so
  a 2-process run sees the same samples (and the same views) as one process on the whole batch.

Lightning restores the stream through :class:`StreamLoader`, a ``DataLoader`` with ``state_dict`` /
``load_state_dict`` (Lightning's ``_Stateful`` protocol), loaded before the first ``iter()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from medcl.engine.seeding import sample_seed


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """``[n]`` int64 permutation of the items for ``epoch`` (pure function of ``seed`` and ``epoch``)."""
    g = torch.Generator()
    g.manual_seed(sample_seed(seed, epoch, -1, "perm"))
    return torch.randperm(n, generator=g)


class StreamIndex:
    """Maps a stream position to ``(epoch, item index)``, caching the current epoch's permutation."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("a data stream needs at least one item")
        self.n = int(n)
        self.seed = int(seed)
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def __call__(self, position: int) -> tuple[int, int]:
        epoch, slot = divmod(int(position), self.n)
        if epoch != self._epoch:
            self._perm = epoch_permutation(self.n, self.seed, epoch)
            self._epoch = epoch
        return epoch, int(self._perm[slot])


class StreamSampler(Sampler[int]):
    """Yields this rank's stream positions for global batches ``start_batch .. total_batches - 1``.

    Args:
        batch_size: samples per rank per batch (the global batch is ``batch_size * world_size``).
        total_batches: global batches in the whole run (``max_steps * accumulate``).
        world_size, rank: the DDP layout (1, 0 without DDP).
        start_batch: global batches already consumed (set on resume).
    """

    def __init__(self, batch_size: int, total_batches: int, world_size: int = 1, rank: int = 0, start_batch: int = 0):
        if batch_size < 1 or total_batches < 0:
            raise ValueError("batch_size must be >= 1 and total_batches >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.batch_size = int(batch_size)
        self.total_batches = int(total_batches)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.start_batch = int(start_batch)

    def __iter__(self) -> Iterator[int]:
        b, w, r = self.batch_size, self.world_size, self.rank
        for batch in range(self.start_batch, self.total_batches):
            base = batch * b * w + r * b
            yield from range(base, base + b)

    def __len__(self) -> int:
        # The whole run, not what is left: Lightning restores how many batches of the epoch were already
        # fetched and counts on from there, so a shorter length would end the epoch early on resume.
        return self.total_batches * self.batch_size


class StreamLoader(DataLoader):
    """A ``DataLoader`` over a :class:`StreamSampler` whose position survives checkpoints.

    ``consumed`` returns the number of global batches the training loop has consumed so far (the job
    binds it to ``trainer.global_step * accumulate``: checkpoints are written on optimiser-step
    boundaries, so batches prefetched by workers but not yet trained on are not counted).
    """

    def __init__(self, dataset: Any, sampler: StreamSampler, consumed: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, shuffle=False, **kwargs)
        self._stream_sampler = sampler
        self._consumed = consumed

    def bind(self, consumed: Callable[[], int]) -> None:
        self._consumed = consumed

    def state_dict(self) -> dict[str, int]:
        done = self._consumed() if self._consumed is not None else self._stream_sampler.start_batch
        return {"batches_consumed": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._stream_sampler.start_batch = int(state["batches_consumed"])
