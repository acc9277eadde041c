"""Bags of instance features, padded batches with masks.

A *bag* is a slide (or a classic MIL bag): ``n`` instances with ``D`` features each and one bag label.
:class:`BagDataset` holds bags in memory or reads them lazily from their h5 files; :func:`collate_bags`
pads bags of different sizes into one batch and returns the mask that every MIL head takes, so batches
larger than one bag work (``True`` = a real instance)::

    features [B, N, D] float32   (N = largest bag of the batch; padding rows are zero)
    mask     [B, N]    bool
    labels   [B]       int64     (class indices, see :func:`medcl.mil.bag_io.label_index`)

Readers for the two input layouts (slide CSV + one h5 per slide, and instance tables) are in
:mod:`medcl.mil.bag_io`; :func:`load_bags` re-exports the entry point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from medcl.core.errors import MedclDataError


@dataclass
class Bag:
    """One bag.

    Attributes:
        id: the bag (slide) id, unique in a dataset.
        label: class index in ``[0, K)``.
        n: number of instances (>= 1).
        features: ``[n, D]`` float32, or ``None`` when read lazily from ``path``.
        coords: ``[n, 2]`` instance coordinates (level-0 pixels for slides) or ``None``.
        path: the h5 file (slide bags) or the table the bag came from.
        patient: patient id (folds never split a patient), or ``None``.
        split: the CSV's split column, if any (kept for the user; CV makes its own folds).
    """

    id: str
    label: int
    n: int
    features: torch.Tensor | None = None
    coords: torch.Tensor | None = None
    path: str | None = None
    patient: str | None = None
    split: str | None = None


class BagDataset(Dataset):
    """Map-style dataset of bags; item ``i`` is a dict ready for :func:`collate_bags`.

    Args:
        bags: the bags (ids unique, each with ``n >= 1``).
        classes: label names in index order (``classes[k]`` is the name of class ``k``).
        in_dim: number of features per instance ``D``.
        source: the file the dataset was read from (for error messages and the run record).
        features_key / coords_key: h5 dataset names used when bags are read lazily.

    Item: ``{"features": [n, D] float32, "coords": [n, 2] | None, "label": int, "index": int (position in this
    dataset), "offset": int (global index of the bag's first instance in this dataset), "id": str}``.
    Instance ``j`` of bag ``i`` has the dataset-wide id ``offset_i + j`` (INS keys its pseudo-labels on it).
    """

    def __init__(
        self,
        bags: Sequence[Bag],
        classes: Sequence[str],
        in_dim: int,
        source: str = "",
        features_key: str = "features",
        coords_key: str = "coords",
    ) -> None:
        self.bags = list(bags)
        self.classes = [str(c) for c in classes]
        self.in_dim = int(in_dim)
        self.source = str(source)
        self.features_key = features_key
        self.coords_key = coords_key
        seen: set[str] = set()
        for b in self.bags:
            if b.n < 1:
                raise MedclDataError(b.path or self.source, f"bag '{b.id}' has zero instances")
            if b.id in seen:
                raise MedclDataError(self.source, f"bag id '{b.id}' appears twice")
            if not 0 <= b.label < len(self.classes):
                raise MedclDataError(self.source, f"bag '{b.id}': label index {b.label} outside [0, {len(self.classes)})")
            seen.add(b.id)
        sizes = torch.tensor([b.n for b in self.bags], dtype=torch.long)
        self.offsets = torch.cumsum(sizes, 0) - sizes

    def __len__(self) -> int:
        return len(self.bags)

    @property
    def labels(self) -> torch.Tensor:
        """``[n_bags]`` int64 class indices."""
        return torch.tensor([b.label for b in self.bags], dtype=torch.long)

    @property
    def ids(self) -> list[str]:
        return [b.id for b in self.bags]

    @property
    def patients(self) -> list[str] | None:
        """Patient id per bag, or ``None`` when no bag has one."""
        if all(b.patient is None for b in self.bags):
            return None
        return [b.patient if b.patient is not None else f"bag:{b.id}" for b in self.bags]

    @property
    def n_instances(self) -> int:
        return int(sum(b.n for b in self.bags))

    @property
    def in_memory(self) -> bool:
        return all(b.features is not None for b in self.bags)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> BagDataset:
        """A dataset of the bags at ``indices`` (instance offsets recomputed for the subset)."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        return BagDataset(
            [self.bags[i] for i in idx], self.classes, self.in_dim, self.source, self.features_key, self.coords_key
        )

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features ``[n, D]`` and coords of bag ``i`` (from memory or its h5 file)."""
        b = self.bags[i]
        if b.features is not None:
            return b.features, b.coords
        from medcl.mil.bag_io import read_h5_bag

        feats, coords = read_h5_bag(b.path, b.id, self.features_key, self.coords_key, expect_dim=self.in_dim)
        if feats.shape[0] != b.n:
            raise MedclDataError(b.path, f"bag '{b.id}' changed size on disk ({b.n} -> {feats.shape[0]} instances)")
        return feats, coords

    def load_all(self) -> BagDataset:
        """The same dataset with every bag's features read into memory."""
        bags = []
        for i, b in enumerate(self.bags):
            feats, coords = self.read(i)
            bags.append(replace(b, features=feats, coords=coords))
        return BagDataset(bags, self.classes, self.in_dim, self.source, self.features_key, self.coords_key)

    def __getitem__(self, i: int) -> dict:
        feats, coords = self.read(i)
        b = self.bags[i]
        return {"features": feats, "coords": coords, "label": b.label, "index": i, "offset": int(self.offsets[i]), "id": b.id}


@dataclass
class BagBatch:
    """A padded batch of bags.

    Attributes:
        features: ``[B, N, D]`` float32, zero at padding.
        mask: ``[B, N]`` bool, ``True`` for real instances.
        labels: ``[B]`` int64 class indices.
        index: ``[B]`` int64 position of each bag in its dataset.
        instance_index: ``[B, N]`` int64 dataset-wide instance ids, ``-1`` at padding.
        coords: ``[B, N, 2]`` float32 (zero at padding) or ``None`` if any bag has no coordinates.
        ids: the bag ids.
    """

    features: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    instance_index: torch.Tensor
    coords: torch.Tensor | None
    ids: list[str]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BagBatch:
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return BagBatch(**kw)

    def __len__(self) -> int:
        return int(self.features.shape[0])


def collate_bags(items: Sequence[dict]) -> BagBatch:
    """Pad a list of :class:`BagDataset` items into a :class:`BagBatch` (vectorised copy per bag)."""
    if not items:
        raise ValueError("collate_bags needs at least one bag")
    sizes = [int(it["features"].shape[0]) for it in items]
    b, n, d = len(items), max(sizes), int(items[0]["features"].shape[1])
    for it, s in zip(items, sizes):
        if s == 0:
            raise MedclDataError(None, f"bag '{it['id']}' has zero instances")
        if it["features"].shape[1] != d:
            raise MedclDataError(None, f"bag '{it['id']}' has {it['features'].shape[1]} features, expected {d}")
    dtype = items[0]["features"].dtype if items[0]["features"].is_floating_point() else torch.float32
    features = torch.zeros(b, n, d, dtype=dtype)
    sizes_t = torch.tensor(sizes)
    mask = torch.arange(n)[None, :] < sizes_t[:, None]
    has_coords = all(it.get("coords") is not None for it in items)
    coords = torch.zeros(b, n, 2, dtype=torch.float32) if has_coords else None
    for i, (it, s) in enumerate(zip(items, sizes)):
        features[i, :s] = it["features"]
        if coords is not None:
            coords[i, :s] = it["coords"].to(torch.float32)
    offsets = torch.tensor([int(it.get("offset", 0)) for it in items])
    instance_index = torch.where(mask, offsets[:, None] + torch.arange(n)[None, :], torch.full((b, n), -1))
    return BagBatch(
        features=features,
        mask=mask,
        labels=torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
        index=torch.tensor([int(it.get("index", i)) for i, it in enumerate(items)], dtype=torch.long),
        instance_index=instance_index,
        coords=coords,
        ids=[str(it["id"]) for it in items],
    )


def load_bags(path: str | Path, **kwargs) -> BagDataset:
    """Read bags from a slide CSV (+ h5 folder) or an instance table; see :func:`medcl.mil.bag_io.load_bags`."""
    from medcl.mil.bag_io import load_bags as _load

    return _load(path, **kwargs)
