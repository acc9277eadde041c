"""Provenance ids that travel with embeddings, and mask building by strategy name.

Where masks are built away from the caller (the queue, DDP gathering), the ids of every embedding travel
with it as a :class:`ContrastIds`, and :func:`build_masks` applies the named builder of
:mod:`medcl.losses.contrastive`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from medcl.losses.contrastive import check_ids, gd_masks, gd_minus_masks, gr_masks, label_masks


@dataclass
class ContrastIds:
    """Provenance ids of a set of embeddings, all ``[N]`` int64 (``-1`` where not applicable).

    Used where masks are built away from the caller (queue, DDP gathering, MoCHi): the ids travel with
    the embeddings and :func:`build_masks` picks the right builder.
    """

    uid: torch.Tensor
    source_id: torch.Tensor | None = None
    partition: torch.Tensor | None = None
    label: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = int(check_ids("uid", self.uid).shape[0])
        for name in ("source_id", "partition", "label"):
            v = getattr(self, name)
            if v is not None and tuple(check_ids(name, v).shape) != (n,):
                raise ValueError(f"ContrastIds.{name} must have shape ({n},), got {tuple(v.shape)}")

    def __len__(self) -> int:
        return int(self.uid.shape[0])

    def filled(self) -> dict[str, torch.Tensor]:
        """All four ids as tensors, ``-1`` for the missing ones."""
        out = {"uid": self.uid}
        for name in ("source_id", "partition", "label"):
            v = getattr(self, name)
            out[name] = v if v is not None else torch.full_like(self.uid, -1)
        return out

    @staticmethod
    def cat(items: list[ContrastIds]) -> ContrastIds:
        """Concatenate along N; a field missing in any item becomes ``-1`` there."""
        kw = {}
        for name in ("uid", "source_id", "partition", "label"):
            if name != "uid" and all(getattr(it, name) is None for it in items):
                kw[name] = None
            else:
                kw[name] = torch.cat([it.filled()[name] for it in items])
        return ContrastIds(**kw)


Strategy = Literal["gr", "gd", "gd_minus", "label"]
STRATEGIES: dict[str, tuple[tuple[str, ...], Callable[..., tuple[torch.Tensor, torch.Tensor]]]] = {
    "gr": (("source_id", "uid"), gr_masks),
    "gd": (("partition", "uid"), gd_masks),
    "gd_minus": (("source_id", "partition", "uid"), gd_minus_masks),
    "label": (("label", "uid"), label_masks),
}


def build_masks(
    strategy: Strategy, ids_q: ContrastIds, ids_k: ContrastIds
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, exclude)`` ``[Nq, Nk]`` for a named strategy (``"gr"``, ``"gd"``, ``"gd_minus"``, ``"label"``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
    fields_, fn = STRATEGIES[strategy]
    for f in fields_:
        if getattr(ids_q, f) is None or getattr(ids_k, f) is None:
            raise ValueError(f"strategy {strategy!r} needs ContrastIds.{f} on both queries and keys")
    args = [getattr(ids_q, f) for f in fields_] + [getattr(ids_k, f) for f in fields_]
    return fn(*args)
