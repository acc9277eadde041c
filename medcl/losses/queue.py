"""A queue of keys with their provenance ids (MoCo's memory queue, He et al. 2020), so masks stay right.

A plain queue of embeddings forgets where each key came from; then a key of the anchor's own volume, or
the anchor's own stale copy (an INS instance seen an epoch ago), turns into a negative. :class:`KeyQueue`
stores, with every key, its ``uid``, ``source_id``, ``partition`` and ``label`` and builds the masks of
queries against ``[batch keys; queue keys]`` with the same builders as everything else.
"""

from __future__ import annotations

import torch
from torch import nn

from medcl.losses.ids import ContrastIds, Strategy, build_masks

_ID_FIELDS = ("uid", "source_id", "partition", "label")


def queue_size_for(requested: int, n_instances: int, batch_size: int) -> int:
    """Queue length that never holds two copies of one instance, nor a copy of the current batch.

    When a dataset of ``n_instances`` is visited once per epoch, ``batch_size`` at a time, a queue of
    ``K <= n_instances - batch_size`` keys only holds keys of the ``K`` most recent other instances: an
    instance cannot meet its own stale copy (as a wrongly labelled negative, or twice in the denominator).
    Returns ``max(0, min(requested, n_instances - batch_size))``. (The uid exclusion of the masks is kept
    regardless; this sizing also stops duplicates of *other* instances from doubling their weight.)
    """
    if requested < 0 or n_instances < 0 or batch_size <= 0:
        raise ValueError(
            f"queue_size_for needs requested >= 0, n_instances >= 0, batch_size > 0; got "
            f"{requested}, {n_instances}, {batch_size}"
        )
    return max(0, min(int(requested), int(n_instances) - int(batch_size)))


class KeyQueue(nn.Module):
    """Ring buffer of ``size`` keys ``[K, D]`` with their ids ``[K]`` (uid, source, partition, label).

    State lives in buffers (``keys``, the four id tensors, ``filled``, ``ptr``), so ``state_dict()`` holds
    tensors only: a checkpoint loads with ``torch.load(weights_only=True)`` and a resumed run continues with
    the exact same queue. Pushed keys are detached (they come from a momentum encoder or an earlier step).
    Slots not yet filled are never used as keys.

    Args:
        size: number of keys ``K`` kept (see :func:`queue_size_for`).
        dim: embedding size ``D``.
        dtype: storage dtype of the keys (float32 default; float16/bfloat16 halves memory).

    Example (MoCo with G^R masks)::

        queue = KeyQueue(4096, 128)
        keys, key_ids, pos, excl = queue.masks_with_batch("gr", q_ids, k, k_ids)
        loss = info_nce(q, keys, pos, excl).loss
        queue.push(k, k_ids)
    """

    keys: torch.Tensor
    uid: torch.Tensor
    source_id: torch.Tensor
    partition: torch.Tensor
    label: torch.Tensor
    filled: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if size < 0 or dim <= 0:
            raise ValueError(f"KeyQueue needs size >= 0 and dim > 0, got size={size}, dim={dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.register_buffer("keys", torch.zeros(self.size, self.dim, dtype=dtype))
        for name in _ID_FIELDS:
            self.register_buffer(name, torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer("filled", torch.zeros(self.size, dtype=torch.bool))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.filled.sum())

    @torch.no_grad()
    def push(self, keys: torch.Tensor, ids: ContrastIds) -> None:
        """Enqueue ``keys`` ``[B, D]`` with their ids (the oldest keys are overwritten).

        With ``B > K`` only the last ``K`` keys are kept. Vectorised: one scatter, no host sync.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [B, {self.dim}], got {tuple(keys.shape)}")
        if len(ids) != keys.shape[0]:
            raise ValueError(f"ids have {len(ids)} rows but keys have {keys.shape[0]}")
        if self.size == 0:
            return
        b = keys.shape[0]
        start = max(0, b - self.size)
        idx = (self.ptr + torch.arange(b - start, device=self.keys.device)) % self.size
        self.keys[idx] = keys[start:].detach().to(self.keys.dtype)
        full = ids.filled()
        for name in _ID_FIELDS:
            getattr(self, name)[idx] = full[name][start:].to(self.keys.device)
        self.filled[idx] = True
        self.ptr.copy_((self.ptr + (b - start)) % self.size)

    def contents(self) -> tuple[torch.Tensor, ContrastIds, torch.Tensor]:
        """All ``K`` slots: ``(keys [K, D], ids, filled [K] bool)`` (unfilled slots have uid -1)."""
        ids = ContrastIds(uid=self.uid, source_id=self.source_id, partition=self.partition, label=self.label)
        return self.keys, ids, self.filled

    def masks_with_batch(
        self,
        strategy: Strategy,
        query_ids: ContrastIds,
        batch_keys: torch.Tensor,
        batch_ids: ContrastIds,
        *,
        queue_positives: bool = True,
    ) -> tuple[torch.Tensor, ContrastIds, torch.Tensor, torch.Tensor]:
        """Keys ``[batch; queue]`` and the masks of the queries against them, in one go.

        Args:
            strategy: mask builder name (``"gr"``, ``"gd"``, ``"gd_minus"``, ``"label"``).
            query_ids: ids of the ``Nq`` queries.
            batch_keys: ``[B, D]`` this step's keys (e.g. the momentum encoder's), kept attached.
            batch_ids: their ids.
            queue_positives: if False, queue keys that would be positives are excluded instead (MoCo's
                setting where only the current key is the positive); the anchor's own stale copy (same
                uid) is excluded either way.

        Returns:
            ``(keys [B + K, D], key_ids, pos [Nq, B + K], exclude [Nq, B + K])``; unfilled queue slots are
            excluded for every query. Keys are in ``batch_keys``' dtype.
        """
        if batch_keys.ndim != 2 or batch_keys.shape[1] != self.dim:
            raise ValueError(f"batch_keys must be [B, {self.dim}], got {tuple(batch_keys.shape)}")
        qk, qids, qfilled = self.contents()
        keys = torch.cat([batch_keys, qk.to(batch_keys.dtype)], dim=0)
        key_ids = ContrastIds.cat([batch_ids, qids])
        pos, exclude = build_masks(strategy, query_ids, key_ids)
        b = batch_keys.shape[0]
        in_queue = torch.zeros(keys.shape[0], dtype=torch.bool, device=keys.device)
        in_queue[b:] = True
        bad = in_queue & ~torch.cat([torch.ones(b, dtype=torch.bool, device=keys.device), qfilled])
        exclude = exclude | bad[None, :]
        if not queue_positives:
            exclude = exclude | (pos & in_queue[None, :])
        pos = pos & ~exclude
        return keys, key_ids, pos, exclude
