"""Readers for bags: slide CSV + one feature h5 per slide, or an instance table.

**Slide CSV** (header required)::

    slide_id,label[,split][,patient_id]

``patient_id`` may also be called ``patient`` or ``case_id`` (CLAM's name). Each slide's features are in
``{slide_id}.h5`` with datasets ``features`` ``[N, D]`` and ``coords`` ``[N, 2]`` (optional; the layout CLAM
and torchmil write). The h5 folder is, in this order: ``h5_dir`` (the ``data.h5_dir`` config key; relative
paths are relative to the CSV's folder), else the first of ``features/``, ``h5_files/`` (CLAM) and the CSV's
own folder that holds at least one ``.h5`` file.

**Instance table** (the classic MIL layout of MUSK / Elephant / Fox / Tiger, no header): one row per
instance, column 0 the bag label, column 1 the bag id, then the instance features. Every row of a bag must
carry the same label.

**Labels** are read as strings. When every label is a number with an integer value (``0``, ``1``, ``2.0``)
the classes are sorted numerically, otherwise alphabetically; class ``k`` is the ``k``-th of that order
(``0/1`` labels therefore stay ``0/1``). ``classes=[...]`` (config ``data.classes``) fixes the order and
rejects any other label.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medcl.core.errors import MedclDataError
from medcl.mil.bags import Bag, BagDataset

_PATIENT_COLUMNS = ("patient_id", "patient", "case_id")


def _norm_label(raw: str) -> str:
    s = str(raw).strip()
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if math.isfinite(v) and v.is_integer() else s


def label_index(labels: Sequence[str], classes: Sequence[str] | None = None, source: str = "") -> tuple[list[int], list[str]]:
    """Map label strings to class indices; returns ``(indices, classes)`` (see the module docstring)."""
    normed = [_norm_label(x) for x in labels]
    if classes is not None:
        order = [_norm_label(c) for c in classes]
        if len(set(order)) != len(order):
            raise MedclDataError(source, f"data.classes has duplicates: {list(classes)}")
        unknown = sorted(set(normed) - set(order))
        if unknown:
            raise MedclDataError(source, f"labels {unknown} are not in data.classes {list(classes)}")
    else:
        uniq = set(normed)
        try:
            order = sorted(uniq, key=lambda s: int(s))
        except ValueError:
            order = sorted(uniq)
    if len(order) < 2:
        raise MedclDataError(source, f"MIL needs at least two classes, found {order}")
    pos = {c: i for i, c in enumerate(order)}
    return [pos[x] for x in normed], order


def read_h5_bag(
    path: str | Path | None,
    bag_id: str,
    features_key: str = "features",
    coords_key: str = "coords",
    expect_dim: int | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read one slide's ``features`` ``[N, D]`` (float32) and ``coords`` ``[N, 2]`` (or ``None``)."""
    import h5py

    if path is None or not Path(path).is_file():
        raise MedclDataError(path, f"feature file of bag '{bag_id}' not found")
    try:
        with h5py.File(path, "r") as f:
            if features_key not in f:
                raise MedclDataError(path, f"bag '{bag_id}': no '{features_key}' dataset (found {sorted(f.keys())})")
            feats = np.asarray(f[features_key][()], dtype=np.float32)
            coords = np.asarray(f[coords_key][()]) if coords_key in f else None
    except OSError as exc:
        raise MedclDataError(path, f"bag '{bag_id}': cannot read h5 file: {exc}") from exc
    if feats.ndim != 2:
        raise MedclDataError(path, f"bag '{bag_id}': '{features_key}' must be [N, D], got shape {feats.shape}")
    if feats.shape[0] == 0:
        raise MedclDataError(path, f"bag '{bag_id}' has zero instances")
    if expect_dim is not None and feats.shape[1] != expect_dim:
        raise MedclDataError(path, f"bag '{bag_id}': {feats.shape[1]} features per instance, other bags have {expect_dim}")
    if check_finite and not np.isfinite(feats).all():
        raise MedclDataError(path, f"bag '{bag_id}': '{features_key}' holds NaN or infinite values")
    ct = None
    if coords is not None:
        if coords.ndim != 2 or coords.shape[0] != feats.shape[0] or coords.shape[1] < 2:
            raise MedclDataError(
                path, f"bag '{bag_id}': '{coords_key}' must be [{feats.shape[0]}, 2], got shape {coords.shape}"
            )
        ct = torch.from_numpy(coords[:, :2].astype(np.float32))
    return torch.from_numpy(feats), ct


def _h5_shape(path: Path, bag_id: str, features_key: str) -> tuple[int, int]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if features_key not in f:
                raise MedclDataError(path, f"bag '{bag_id}': no '{features_key}' dataset (found {sorted(f.keys())})")
            shape = f[features_key].shape
    except OSError as exc:
        raise MedclDataError(path, f"bag '{bag_id}': cannot read h5 file: {exc}") from exc
    if len(shape) != 2:
        raise MedclDataError(path, f"bag '{bag_id}': '{features_key}' must be [N, D], got shape {shape}")
    if shape[0] == 0:
        raise MedclDataError(path, f"bag '{bag_id}' has zero instances")
    return int(shape[0]), int(shape[1])


def find_h5_dir(csv_path: Path, h5_dir: str | None) -> Path:
    """The folder of the per-slide h5 files (see the module docstring for the search order)."""
    base = csv_path.parent
    if h5_dir is not None:
        d = Path(h5_dir)
        d = d if d.is_absolute() else base / d
        if not d.is_dir():
            raise MedclDataError(d, "data.h5_dir is not a folder")
        return d
    for cand in (base / "features", base / "h5_files", base):
        if cand.is_dir() and any(cand.glob("*.h5")):
            return cand
    raise MedclDataError(
        csv_path, "no h5 folder found: set data.h5_dir, or put {slide_id}.h5 files in 'features/' beside the CSV"
    )


def _is_instance_table(path: Path) -> bool:
    with open(path, newline="") as f:
        first = next(csv.reader(f), None)
    if first is None:
        raise MedclDataError(path, "the file is empty")
    cells = [c.strip() for c in first]
    if "slide_id" in cells:
        return False
    if len(cells) >= 3:
        try:
            [float(c) for c in cells[2:]]
            return True
        except ValueError:
            pass
    raise MedclDataError(
        path,
        "neither a slide CSV (header 'slide_id,label[,split][,patient_id]') nor an instance table "
        "(no header; bag label, bag id, then numeric features)",
    )


def load_slide_csv(
    path: Path,
    h5_dir: str | None = None,
    classes: Sequence[str] | None = None,
    features_key: str = "features",
    coords_key: str = "coords",
    in_memory: bool | None = None,
    max_memory_gb: float = 4.0,
) -> BagDataset:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        for need in ("slide_id", "label"):
            if need not in header:
                raise MedclDataError(path, f"slide CSV has no '{need}' column (header: {header})")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    if not rows:
        raise MedclDataError(path, "slide CSV lists no slides")
    pcol = next((c for c in _PATIENT_COLUMNS if c in header), None)
    for i, r in enumerate(rows):
        if not r["slide_id"] or not r["label"]:
            raise MedclDataError(path, f"line {i + 2}: empty slide_id or label")
    idx, order = label_index([r["label"] for r in rows], classes, str(path))
    folder = find_h5_dir(path, h5_dir)
    bags, dim, total = [], None, 0
    for r, lab in zip(rows, idx):
        sid = r["slide_id"]
        h5 = folder / f"{sid}.h5"
        if not h5.is_file():
            raise MedclDataError(h5, f"feature file of slide '{sid}' not found (looked in {folder})")
        n, d = _h5_shape(h5, sid, features_key)
        if dim is None:
            dim = d
        elif d != dim:
            raise MedclDataError(h5, f"bag '{sid}': {d} features per instance, other bags have {dim}")
        total += n
        bags.append(
            Bag(id=sid, label=lab, n=n, path=str(h5), patient=(r.get(pcol) or None) if pcol else None,
                split=r.get("split") or None)
        )
    ds = BagDataset(bags, order, int(dim), str(path), features_key, coords_key)
    if in_memory is None:
        in_memory = total * int(dim) * 4 < max_memory_gb * 1024**3
    return ds.load_all() if in_memory else ds


def load_instance_table(path: Path, classes: Sequence[str] | None = None) -> BagDataset:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    width = len(rows[0])
    if width < 3:
        raise MedclDataError(path, "an instance table needs a label, a bag id and at least one feature per row")
    for i, r in enumerate(rows):
        if len(r) != width:
            raise MedclDataError(path, f"line {i + 1} has {len(r)} columns, the first line has {width}")
    try:
        feats = np.asarray([r[2:] for r in rows], dtype=np.float32)
    except ValueError as exc:
        raise MedclDataError(path, f"non-numeric feature value: {exc}") from exc
    if not np.isfinite(feats).all():
        bad = int(np.nonzero(~np.isfinite(feats).all(1))[0][0])
        raise MedclDataError(path, f"line {bad + 1}: NaN or infinite feature value")
    bag_ids = [_norm_label(r[1]) for r in rows]
    labels = [_norm_label(r[0]) for r in rows]
    order_ids: list[str] = []
    members: dict[str, list[int]] = {}
    for i, b in enumerate(bag_ids):
        if b not in members:
            members[b] = []
            order_ids.append(b)
        members[b].append(i)
    bag_labels = []
    for b in order_ids:
        labs = {labels[i] for i in members[b]}
        if len(labs) != 1:
            raise MedclDataError(path, f"bag '{b}' has rows with different labels {sorted(labs)}")
        bag_labels.append(labs.pop())
    idx, order = label_index(bag_labels, classes, str(path))
    ft = torch.from_numpy(feats)
    bags = [
        Bag(id=b, label=lab, n=len(members[b]), features=ft[torch.tensor(members[b])].contiguous(), path=str(path))
        for b, lab in zip(order_ids, idx)
    ]
    return BagDataset(bags, order, feats.shape[1], str(path))


def load_bags(
    path: str | Path,
    *,
    h5_dir: str | None = None,
    classes: Sequence[str] | None = None,
    features_key: str = "features",
    coords_key: str = "coords",
    in_memory: bool | None = None,
    max_memory_gb: float = 4.0,
) -> BagDataset:
    """Read a bag dataset from a slide CSV (+ h5 files) or an instance table (detected from the first line).

    Raises:
        MedclDataError: naming the file (and the bag) for a missing h5, a bag with zero instances, a feature
            width that differs between bags, non-finite features, inconsistent labels inside a bag ...
    """
    p = Path(path)
    if p.is_dir():
        raise MedclDataError(p, "expected a slide CSV or an instance table, got a folder")
    if not p.is_file():
        raise MedclDataError(p, "file not found")
    if _is_instance_table(p):
        return load_instance_table(p, classes)
    return load_slide_csv(p, h5_dir, classes, features_key, coords_key, in_memory, max_memory_gb)
