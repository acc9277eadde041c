"""``CaseDataset``: preprocessed cases of a manifest, cached on disk or in RAM.

Why not MONAI's ``PersistentDataset``: it names a cache file by a hash of the *input item* (the file
paths) and, unless ``hash_transform`` is given, not of the transforms, so a changed plan or a file
rewritten in place silently serves stale volumes; it stages files in the system temp folder and
``shutil.move``\\s them (a copy, not atomic, when /tmp is another filesystem); and it stores whole
MetaTensors, which ``torch.load(weights_only=True)`` refuses unless MONAI's classes and the NumPy arrays
in the trace are allow-listed. Here a cache file (:mod:`medcl.data.blobfile`) holds the voxels as raw
tensor bytes and the metadata and MONAI trace as one JSON string: no unpickler runs on read (stricter than
``weights_only=True``, and a cached read costs a fraction of a decode); labels are stored as uint8 when
they fit. It is keyed by the plan (:meth:`PreprocessingPlan.cache_key`) and by the path, size and
modification time of every input file; it is written to a temp file in the cache folder and renamed
(``os.replace``), so a killed writer never leaves a truncated file under the final name; and a
file that cannot be read back is rebuilt, not fatal.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch.utils.data import Dataset

from medcl.data.blobfile import read_blob, write_blob
from medcl.data.cases import load_case
from medcl.data.manifest import Case, Manifest
from medcl.data.plan import PreprocessingPlan
from medcl.data.transforms import volume_to_metatensor

__all__ = ["CaseDataset", "default_cache_dir", "CACHE_FORMAT"]

CACHE_FORMAT = "medcl-case-cache-3"


def default_cache_dir() -> Path:
    """``$MEDCL_CACHE_DIR``, else ``~/.cache/medcl/preprocessed``."""
    env = os.environ.get("MEDCL_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "medcl" / "preprocessed"


# --- plain (weights-only loadable) form of MONAI metadata and traces --------------------------------


def to_plain(x: Any) -> Any:
    """Convert metadata / a MONAI trace to tensors, numbers, strings, lists, tuples and dicts."""
    if x is None or isinstance(x, bool | int | float) and not isinstance(x, enum.Enum):
        return x
    if isinstance(x, enum.Enum):
        return to_plain(x.value)
    if isinstance(x, str):
        return str(x)
    if isinstance(x, MetaTensor):
        return x.as_tensor().detach().clone()
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(x, copy=True))}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.dtype):
        return {"__dtype__": str(x).removeprefix("torch.")}
    if isinstance(x, dict):
        return {str(k): to_plain(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(to_plain(v) for v in x)
    if isinstance(x, list):
        return [to_plain(v) for v in x]
    raise TypeError(f"cannot store a {type(x).__name__} in a weights-only cache")


def from_plain(x: Any) -> Any:
    """Inverse of :func:`to_plain`."""
    if isinstance(x, dict):
        if set(x) == {"__ndarray__"}:
            return x["__ndarray__"].numpy()
        if set(x) == {"__dtype__"}:
            return getattr(torch, x["__dtype__"])
        return {k: from_plain(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(from_plain(v) for v in x)
    if isinstance(x, list):
        return [from_plain(v) for v in x]
    return x


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {"__tensor__": x.tolist(), "dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape)}
    raise TypeError(f"cannot store a {type(x).__name__} in a cache file")


def _json_hook(d: dict[str, Any]) -> Any:
    if "__tensor__" in d:
        return torch.tensor(d["__tensor__"], dtype=getattr(torch, d["dtype"])).reshape(d["shape"])
    return d


def _tuples_marked(x: Any) -> Any:
    """JSON has no tuples: wrap them so that the metadata round-trips with its exact container types."""
    if isinstance(x, tuple):
        return {"__tuple__": [_tuples_marked(v) for v in x]}
    if isinstance(x, list):
        return [_tuples_marked(v) for v in x]
    if isinstance(x, dict):
        return {k: _tuples_marked(v) for k, v in x.items()}
    return x


def _tuples_restored(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(_tuples_restored(v) for v in x["__tuple__"])
        return {k: _tuples_restored(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_tuples_restored(v) for v in x]
    return x


def _pack_metatensor(t: MetaTensor, small_ints: bool = False) -> dict[str, Any]:
    """Voxels as one tensor; metadata and trace as one JSON string (small arrays as nested lists).

    One string instead of a pickled tree of small tensors makes a cached case several times faster to
    load (the weights-only unpickler dominated). ``small_ints``: store integer-valued voxels in 0..255
    (labels) as uint8 and restore the dtype on load.
    """
    data = t.as_tensor().detach().contiguous()
    dtype = str(data.dtype).removeprefix("torch.")
    if small_ints and data.numel() and data.dtype not in (torch.bool, torch.uint8):
        lo, hi = data.aminmax()
        if lo >= 0 and hi <= 255 and (not data.is_floating_point() or torch.equal(data, data.round())):
            data = data.to(torch.uint8)
    text = json.dumps(_tuples_marked(to_plain({"meta": dict(t.meta), "ops": list(t.applied_operations)})),
                      default=_json_default, allow_nan=True)
    return {"data": data.clone(), "dtype": dtype, "meta_json": text}


def _unpack_metatensor(d: dict[str, Any]) -> MetaTensor:
    plain = _tuples_restored(json.loads(d["meta_json"], object_hook=_json_hook))
    plain = from_plain(plain)
    data = d["data"].to(getattr(torch, d["dtype"]))
    return MetaTensor(data, meta=plain["meta"], applied_operations=plain["ops"])


def _file_signature(path: str) -> list[Any]:
    """(path, size, mtime_ns) of a file, or of every file under a (DICOM) folder."""
    p = Path(path)
    try:
        if p.is_dir():
            sig: list[Any] = [str(p.resolve())]
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    st = os.stat(os.path.join(root, name))
                    sig.append((os.path.relpath(os.path.join(root, name), p), st.st_size, st.st_mtime_ns))
            return sig
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(p), None, None]  # missing: load_case will report it


class CaseDataset(Dataset):
    """Preprocessed cases of a manifest (a map-style torch ``Dataset``).

    Each item is ``{"image": MetaTensor [C, X, Y, Z] float32 (.affine = preprocessed voxel -> RAS mm,
    with MONAI's trace so :func:`~medcl.data.transforms.invert_to_original` works), "label": MetaTensor
    [1, X, Y, Z] int64 (if ``with_label`` and the case has one), "id": str, "fg_box": LongTensor [2, 3]}``.

    Args:
        manifest: the dataset (:func:`~medcl.data.manifest.load_manifest`).
        plan: the preprocessing plan.
        cases: case ids (or :class:`Case` objects) to use, in that order; default every case.
        with_label: read and return labels.
        cache: ``"disk"`` (files under ``cache_dir``, shared across runs and DataLoader workers),
            ``"ram"`` (kept in this process: with DataLoader workers use ``persistent_workers=True``) or
            ``"none"``. With a cache the second epoch decodes no file.
        cache_dir: folder of the disk cache (default :func:`default_cache_dir`); files are grouped by plan.
        transform: optional callable applied to every item *after* the cache (random augmentation).

    Raises (on access):
        MedclDataError: the case's problem (see :func:`~medcl.data.cases.load_case`).
    """

    def __init__(
        self,
        manifest: Manifest,
        plan: PreprocessingPlan,
        cases: Sequence[str | Case] | None = None,
        with_label: bool = True,
        cache: str = "disk",
        cache_dir: str | os.PathLike | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        if cache not in ("disk", "ram", "none"):
            raise ValueError(f"cache must be 'disk', 'ram' or 'none', got {cache!r}")
        self.manifest, self.plan = manifest, plan
        if cases is None:
            self.cases = list(manifest.cases)
        else:
            self.cases = [c if isinstance(c, Case) else manifest.case(c) for c in cases]
        self.with_label, self.cache, self.transform = with_label, cache, transform
        self._pipeline = plan.transforms(("image", "label"), load=False)
        self._plan_key = plan.cache_key()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._ram: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.cases]

    def cache_path(self, index: int) -> Path:
        """Where case ``index`` is cached on disk (its name changes with the plan and the input files)."""
        case = self.cases[index]
        files = list(case.images) + ([case.label] if (self.with_label and case.label) else [])
        sig = repr((self._plan_key, self.with_label, case.id, case.series_uid, [_file_signature(f) for f in files]))
        digest = hashlib.sha256(sig.encode()).hexdigest()[:20]
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", case.id)[:80]
        return self.cache_dir / self._plan_key[:16] / f"{safe}-{digest}.medcl"

    def preprocess(self, index: int) -> dict[str, Any]:
        """Read, validate and preprocess case ``index`` (no cache)."""
        case = self.cases[index]
        image, label = load_case(case, self.manifest, with_label=self.with_label)
        data: dict[str, Any] = {"image": volume_to_metatensor(image)}
        if label is not None:
            data["label"] = volume_to_metatensor(label)
        out = self._pipeline(data)
        out["id"] = case.id
        return out

    def _load_cached(self, path: Path) -> dict[str, Any] | None:
        try:
            blob = read_blob(path)
            if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
                raise ValueError("not a medcl cache file of this version")
            item: dict[str, Any] = {"image": _unpack_metatensor(blob["image"]), "id": blob["id"],
                                    "fg_box": blob["fg_box"]}
            if blob.get("label") is not None:
                item["label"] = _unpack_metatensor(blob["label"])
            return item
        except Exception as exc:  # truncated, corrupt or foreign: rebuild it
            warnings.warn(f"medcl: rebuilding unreadable cache file {path} ({type(exc).__name__}: {exc})",
                          stacklevel=3)
            try:
                path.unlink()
            except OSError:
                pass
            return None

    def _save_cached(self, path: Path, item: dict[str, Any]) -> None:
        blob: dict[str, Any] = {"format": CACHE_FORMAT, "id": item["id"], "fg_box": item["fg_box"].clone(),
                                "image": _pack_metatensor(item["image"]),
                                "label": _pack_metatensor(item["label"], small_ints=True) if "label" in item else None}
        write_blob(blob, path)

    def _get(self, index: int) -> dict[str, Any]:
        if self.cache == "ram" and index in self._ram:
            return _copy_item(self._ram[index])
        path = self.cache_path(index) if self.cache == "disk" else None
        item = self._load_cached(path) if path is not None and path.is_file() else None
        if item is None:
            item = self.preprocess(index)
            if path is not None:
                self._save_cached(path, item)
        if self.cache == "ram":
            self._ram[index] = item
            return _copy_item(item)
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._get(index)
        return self.transform(item) if self.transform is not None else item


def _copy_item(item: dict[str, Any]) -> dict[str, Any]:
    """A copy whose tensors can be modified in place without touching the RAM cache."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in item.items()}
