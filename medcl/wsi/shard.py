"""Slides sharded across processes: ``torchrun`` (one or several nodes) or SLURM ``srun`` ranks.

Extraction runs one process per GPU (or per CPU share). Each process learns its rank from the launcher's
environment (:func:`ranks_from_env`), joins a ``torch.distributed`` process group (gloo, also on GPUs: only
small Python objects are exchanged, never tensors), and processes the slides rank 0 assigned to it
(:func:`assign`). Nothing here schedules work dynamically: the assignment is fixed before extraction starts.

Protocol of a sharded job (:class:`ShardGroup`):

1. rank 0 alone prepares the run folder and plans (:meth:`ShardGroup.from_rank0`); the plan is broadcast, and an
   error there stops every rank with the same message;
2. every rank builds what it needs (:meth:`ShardGroup.run`) and works on its share (:meth:`ShardGroup.gather`):
   each rank's result -- or its error -- reaches every rank, so one rank's failure stops all of them instead of
   leaving the others waiting;
3. rank 0 writes the one summary.

The group's timeout is long (:data:`TIMEOUT`) because ranks wait for the slowest one in step 2.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from medcl.core.errors import MedclConfigError, MedclDataError, MedclError

log = logging.getLogger(__name__)

__all__ = ["Ranks", "ranks_from_env", "rank_device", "assign", "ShardGroup", "TIMEOUT"]

T = TypeVar("T")
TIMEOUT = timedelta(hours=24)
"""How long a rank waits for the others in a collective (extraction of one rank's share can take hours)."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, and the launcher."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # "torchrun" | "slurm" | "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def tag(self) -> str:
        """``"rank 1/4: "`` in a sharded run, ``""`` otherwise (a prefix for log lines)."""
        return f"rank {self.rank}/{self.world_size}: " if self.distributed else ""


def ranks_from_env(environ: Mapping[str, str] | None = None) -> Ranks:
    """The rank of this process from its launcher's environment.

    * ``torchrun`` (and anything speaking its protocol): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``;
    * SLURM ``srun``: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (the tasks of this job step), ``SLURM_LOCALID``.
      Only a job *step* counts: a batch script runs as one process although its ``SLURM_NTASKS`` says more;
    * otherwise one process.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)),
                     "slurm")
    return Ranks()


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """A rank's GPU: ``cuda:LOCAL_RANK`` (modulo the GPUs it sees) when ``device`` is an unnumbered CUDA device in a
    sharded run; ``device`` otherwise."""
    if device.type != "cuda" or not ranks.distributed or device.index is not None:
        return device
    return torch.device("cuda", ranks.local_rank % max(1, torch.cuda.device_count()))


def assign(weights: Sequence[float], world_size: int) -> list[int]:
    """Rank of each item: longest-processing-time-first (Graham 1969) on ``weights`` (tile counts; 0 for work
    already done), ties broken by position and rank number, so every process computes the same answer.

    The heaviest remaining item goes to the least loaded rank; the busiest rank ends at most one item's work
    above the mean."""
    load = [0.0] * world_size
    count = [0] * world_size
    out = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-float(weights[i]), i)):
        r = min(range(world_size), key=lambda r: (load[r], count[r], r))
        out[i] = r
        load[r] += float(weights[i])
        count[r] += 1
    return out


def _error_record(exc: BaseException) -> tuple[str, str, str]:
    if isinstance(exc, MedclConfigError):
        return "config", exc.key, exc.problem
    if isinstance(exc, MedclDataError):
        return "data", exc.path, exc.problem
    return "other", "", f"{type(exc).__name__}: {exc}".strip().splitlines()[-1]


class ShardGroup:
    """The process group of a sharded job (a no-op for one process); use as a context manager.

    Joins the group when launched with several ranks and no group exists yet (and leaves it at the end). The
    backend is ``gloo`` whatever the device: the plan, errors and per-slide results are small Python objects, and
    NCCL would refuse two ranks sharing one GPU. ``torchrun`` provides ``MASTER_ADDR`` / ``MASTER_PORT``; under
    SLURM the job script exports them.
    """

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self._owned = False

    def __enter__(self) -> ShardGroup:
        import torch.distributed as dist

        if not self.ranks.distributed or dist.is_initialized():
            return self
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise MedclConfigError(
                missing[0], f"{self.ranks.world_size} {self.ranks.launcher} ranks need MASTER_ADDR and MASTER_PORT "
                "to meet (torchrun sets them; under SLURM export MASTER_ADDR=$(scontrol show hostnames "
                "\"$SLURM_JOB_NODELIST\" | head -n 1) and MASTER_PORT=29500)")
        backend = "gloo"
        dist.init_process_group(backend, init_method="env://", rank=self.ranks.rank,
                                world_size=self.ranks.world_size, timeout=TIMEOUT)
        self._owned = True
        log.info("%sjoined the %s process group (%s)", self.ranks.tag(), backend, self.ranks.launcher)
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist

        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
        self._owned = False

    def _all_gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        if not self.ranks.distributed:
            return [obj]
        out: list[Any] = [None] * self.ranks.world_size
        dist.all_gather_object(out, obj)
        return out

    def _raise_first(self, errors: Sequence[tuple[str, str, str] | None], own: BaseException | None) -> None:
        for r, err in enumerate(errors):
            if err is None:
                continue
            if r == self.ranks.rank and isinstance(own, MedclError):
                raise own
            kind, where, problem = err
            prefix = f"rank {r} of {self.ranks.world_size}: " if self.ranks.distributed else ""
            if kind == "config":
                raise MedclConfigError(where, prefix + problem) from own
            raise MedclDataError(where or None, prefix + problem) from own

    def from_rank0(self, fn: Callable[[], T]) -> T:
        """``fn()`` evaluated on rank 0 only, its value broadcast to every rank; an error raised there is raised on
        every rank."""
        import torch.distributed as dist

        value, err, own = None, None, None
        if self.ranks.rank == 0:
            try:
                value = fn()
            except Exception as exc:  # every rank must learn of it, whatever it is
                err, own = _error_record(exc), exc
                if not self.ranks.distributed and not isinstance(exc, MedclError):
                    raise
        if self.ranks.distributed:
            box = [(value, err)]
            dist.broadcast_object_list(box, src=0)
            value, err = box[0]
        self._raise_first([err], own if self.ranks.rank == 0 else None)
        return value  # type: ignore[return-value]

    def _call(self, fn: Callable[[], T]) -> tuple[T | None, tuple[str, str, str] | None, BaseException | None]:
        try:
            return fn(), None, None
        except Exception as exc:  # reported to every rank below
            if not self.ranks.distributed and not isinstance(exc, MedclError):
                raise
            return None, _error_record(exc), exc

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank, returning this rank's value (not sent anywhere); if it raised on any rank, every
        rank raises (the first failing rank's error) -- a synchronisation point."""
        value, err, own = self._call(fn)
        self._raise_first(self._all_gather(err), own)
        return value  # type: ignore[return-value]

    def gather(self, fn: Callable[[], T]) -> list[T]:
        """``fn()`` on every rank; the (picklable, small) values of all ranks in rank order, on every rank. If ``fn``
        raised on any rank, every rank raises (the first failing rank's error)."""
        value, err, own = self._call(fn)
        gathered = self._all_gather((value, err))
        self._raise_first([e for _, e in gathered], own)
        return [v for v, _ in gathered]  # type: ignore[misc]
