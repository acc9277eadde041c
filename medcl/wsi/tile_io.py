"""Tile files of ``medcl mil tile``: atomic writing, completeness, reading back (layout: :mod:`medcl.wsi.tiling`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcl.core.errors import MedclDataError
from medcl.core.files import atomic_path


def slide_fingerprint(path: str | os.PathLike) -> str:
    """A cheap content fingerprint of a slide file: SHA-256 of its size, first and last MiB. It tells a replaced
    slide (same name, other content) from the one a tile or feature file was made from, without reading the whole
    slide; a DICOM-WSI folder is fingerprinted by its files' names and sizes."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size};".encode())
        return h.hexdigest()[:32]
    size = p.stat().st_size
    h.update(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(2**20))
        if size > 2**21:
            f.seek(-(2**20), os.SEEK_END)
            h.update(f.read(2**20))
    return h.hexdigest()[:32]


def made_from(h5_path: Path, slide: str | os.PathLike) -> str | None:
    """``None`` when the tile / feature file ``h5_path`` was made from ``slide`` (its recorded fingerprint matches,
    or the file predates fingerprints); else why not."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        recorded = f.attrs.get("slide_fingerprint")
    if recorded is None:
        return None
    recorded = recorded.decode() if isinstance(recorded, bytes) else str(recorded)
    now = slide_fingerprint(slide)
    return None if now == recorded else f"made from another file than {slide} (slide fingerprint {recorded}, now {now})"


def is_complete(h5_path: Path) -> bool:
    """True when ``h5_path`` is a fully written tile or feature file."""
    if not h5_path.is_file():
        return False
    import h5py

    try:
        with h5py.File(h5_path, "r") as f:
            return bool(f.attrs.get("complete", False)) and "coords" in f
    except OSError:
        return False


def write_tiles_h5(path: Path, coords: np.ndarray, fractions: np.ndarray, attrs: dict) -> None:
    """Write a tile file atomically: ``coords`` [N, 2] int64, ``tissue_fraction`` [N], ``attrs``, ``complete``."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset("coords", data=coords.astype(np.int64))
            d.attrs["patch_level"] = attrs["level"]
            d.attrs["patch_size"] = attrs["read_size"]
            f.create_dataset("tissue_fraction", data=fractions.astype(np.float32))
            for k, v in attrs.items():
                f.attrs[k] = v
            f.attrs["complete"] = True


@dataclass
class TileSet:
    """A tile file read back: coordinates ``[N, 2]`` int64 and the attributes (see :mod:`medcl.wsi.tiling`)."""

    path: Path
    slide_id: str
    slide_path: str
    coords: np.ndarray
    attrs: dict

    @property
    def level(self) -> int:
        return int(self.attrs["level"])

    @property
    def read_size(self) -> int:
        return int(self.attrs["read_size"])

    @property
    def tile_size(self) -> int:
        return int(self.attrs["tile_size"])


def load_tile_set(path: str | os.PathLike, slide_dir: str | os.PathLike | None = None) -> TileSet:
    """Read a tile (or feature) h5 written by :func:`tile_slides`.

    The slide is looked up at the recorded ``slide_path``, or, when ``slide_dir`` is given, by its file
    name there (slides moved to another machine). Raises :class:`MedclDataError` naming the file."""
    import h5py

    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            if "coords" not in f:
                raise MedclDataError(p, "no 'coords' dataset: not a tile file of 'medcl mil tile'")
            coords = np.asarray(f["coords"][()], dtype=np.int64)
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise MedclDataError(p, f"cannot read h5 file: {exc}") from exc
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise MedclDataError(p, f"'coords' must be [N, 2], got shape {list(coords.shape)}")
    missing = [k for k in ("slide_path", "level", "read_size", "tile_size", "tile_size_level0") if k not in attrs]
    if missing:
        raise MedclDataError(p, f"missing tiling attributes {missing}; re-run 'medcl mil tile'")
    slide_path = str(attrs["slide_path"])
    if slide_dir is not None:
        slide_path = str(Path(slide_dir) / Path(slide_path).name)
    sid = str(attrs.get("slide_id", p.stem))
    return TileSet(p, sid, slide_path, coords, attrs)


def find_h5(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """h5 files named by ``inputs`` (files, or folders scanned non-recursively), sorted, no duplicates."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.glob("*.h5") if q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise MedclDataError(p, "no such file or folder")
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]
