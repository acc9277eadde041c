"""Patch features for tiled slides: tiles are read by DataLoader workers and encoded in batches.

Input: the ``{slide_id}.h5`` tile files of ``medcl mil tile`` (:mod:`medcl.wsi.tiling`). Each tile is read at
the recorded ``level`` as ``read_size`` pixels and resized to ``tile_size`` when the level did not match the
target mpp, so the encoder sees tiles at the target microns per pixel.

Output, per slide, ``{slide_id}.h5`` (the CLAM / torchmil layout ``medcl mil train`` reads):

- ``features``: float32 ``[N, D]``, row ``i`` the encoding of tile ``i``;
- ``coords``: int64 ``[N, 2]``, the tile file's coordinates in the same order (level-0 top-left ``(x, y)``);
- attributes: every attribute of the tile file plus ``encoder`` (the spec), ``feature_dim``,
  ``encoder_input_size`` (side the tiles were resized to), ``tiles_file`` and ``complete``.

Resumable: a slide whose feature file is complete and was made by the same encoder is skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medcl.config import to_dict
from medcl.core.device import resolve_device, torch_threads
from medcl.core.errors import MedclDataError
from medcl.core.files import atomic_path
from medcl.core.record import RunRecord
from medcl.core.runfolder import RunFolder, prepare_run_folder
from medcl.io.slide import Slide, open_slide
from medcl.wsi.config import ExtractParams
from medcl.wsi.tile_io import TileSet, find_h5, is_complete, load_tile_set

log = logging.getLogger(__name__)


class TileDataset(Dataset):
    """Tiles of one or more slides, read on demand.

    Each process (the main one or a DataLoader worker) opens its own slide handles, lazily, and keeps at
    most ``max_open`` of them (least recently used closed first): OpenSlide / TiffSlide handles must not
    cross a fork.

    Args:
        tile_sets: the slides' tile files (:func:`medcl.wsi.tiling.load_tile_set`).
        max_open: slide handles kept open per process.

    Item ``i`` (tiles of the first set first, in file order): ``{"image": uint8 [3, S, S], "index": i}``
    with ``S`` the tile set's ``tile_size``.
    """

    def __init__(self, tile_sets: Sequence[TileSet], max_open: int = 8) -> None:
        if not tile_sets:
            raise MedclDataError(None, "no tile sets given")
        self.tile_sets = list(tile_sets)
        self.offsets = np.cumsum([0] + [len(t.coords) for t in self.tile_sets])
        self.max_open = max_open
        self._handles: OrderedDict[int, Slide] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def _slide(self, k: int) -> Slide:
        if self._pid != os.getpid():  # forked: the parent's handles are not ours
            self._handles = OrderedDict()
            self._pid = os.getpid()
        if k in self._handles:
            self._handles.move_to_end(k)
            return self._handles[k]
        ts = self.tile_sets[k]
        slide = open_slide(ts.slide_path, backend=str(ts.attrs.get("backend", "auto")),
                           assume_mpp=float(ts.attrs["mpp_level0"][0]))
        self._handles[k] = slide
        while len(self._handles) > self.max_open:
            self._handles.popitem(last=False)[1].close()
        return slide

    def locate(self, i: int) -> tuple[int, int]:
        """``(tile set index, tile index within it)`` of global index ``i``."""
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, i - int(self.offsets[k])

    def read(self, i: int) -> np.ndarray:
        """Tile ``i`` as RGB uint8 ``[S, S, 3]`` at the target mpp."""
        k, j = self.locate(i)
        ts = self.tile_sets[k]
        x, y = ts.coords[j]
        arr = self._slide(k).read_region((int(x), int(y)), ts.level, (ts.read_size, ts.read_size))
        if ts.read_size != ts.tile_size:
            from PIL import Image

            # PIL's bilinear filter widens its support when shrinking: an antialiased resize
            arr = np.asarray(Image.fromarray(arr).resize((ts.tile_size, ts.tile_size), Image.Resampling.BILINEAR))
        return arr

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(np.ascontiguousarray(self.read(i).transpose(2, 0, 1))), "index": i}

    def close(self) -> None:
        while self._handles:
            self._handles.popitem()[1].close()


def tile_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device, **kw) -> DataLoader:
    """The DataLoader tiles are read through (workers read and decode; the main process encodes)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
        **kw,
    )


@dataclass
class ExtractResult:
    """One slide of an extraction run."""

    slide_id: str
    status: str  # "done" | "skipped" | "failed"
    n_tiles: int = 0
    dim: int = 0
    seconds: float = 0.0
    patches_per_s: float = 0.0
    path: str = ""
    message: str = ""


def extract_slide(
    tile_set: TileSet,
    encoder: torch.nn.Module,
    out_path: Path,
    batch_size: int = 64,
    workers: int = 2,
    device: torch.device | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Encode every tile of one slide and write the feature file (atomically)."""
    import h5py
    from tqdm.auto import tqdm

    device = device or torch.device("cpu")
    ds = TileDataset([tile_set], max_open=1)
    loader = tile_loader(ds, batch_size, workers, device)
    n = len(ds)
    dim = int(encoder.dim)
    amp = device.type == "cuda"
    t0 = time.perf_counter()
    try:
        with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", shape=(n, dim), dtype="float32")
            f.create_dataset("coords", data=tile_set.coords.astype(np.int64))
            for k, v in tile_set.attrs.items():
                if k != "complete":
                    f.attrs[k] = v
            f.attrs["encoder"] = getattr(encoder, "name", "")
            f.attrs["feature_dim"] = dim
            f.attrs["encoder_input_size"] = int(getattr(encoder, "input_size", None) or tile_set.tile_size)
            f.attrs["tiles_file"] = str(tile_set.path.resolve())
            bar = tqdm(total=n, desc=tile_set.slide_id[:24], unit="tile", disable=not progress, file=sys.stderr)
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                for batch in loader:
                    idx = batch["index"].numpy()
                    z = encoder(batch["image"].to(device, non_blocking=True)).float().cpu().numpy()
                    if not np.isfinite(z).all():
                        raise MedclDataError(tile_set.path, "the encoder produced NaN or infinite features")
                    feats[int(idx[0]) : int(idx[-1]) + 1] = z  # batches are contiguous (no shuffling)
                    bar.update(len(idx))
            bar.close()
            f.attrs["complete"] = True
    finally:
        ds.close()
    dt = time.perf_counter() - t0
    return ExtractResult(tile_set.slide_id, "done", n, dim, dt, n / max(dt, 1e-9), str(out_path))


def _same_encoder(path: Path, name: str) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return str(f.attrs.get("encoder", "")) == name and "features" in f


def extract_features(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    params: ExtractParams | None = None,
    *,
    encoder: torch.nn.Module | None = None,
    slide_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> list[ExtractResult]:
    """Extract features for every tile file in ``inputs`` (files or folders) into ``out_dir``.

    Args:
        params: the encoder spec and settings (:class:`medcl.wsi.config.ExtractParams`).
        encoder: a built :class:`PatchEncoder` instead of ``params.encoder``.
        slide_dir: where to find the slides when they moved since tiling.
        force: recompute slides whose feature file is already complete.

    A slide that cannot be read is reported and skipped; the batch goes on. Logs per-slide and overall
    patches/s. The folder follows the run-folder contract (``record.json`` of kind ``wsi-features``,
    ``config.yaml``, ``summary.json``). Returns one :class:`ExtractResult` per tile file.
    """
    from medcl.wsi.encoders import build_encoder

    p = params or ExtractParams(encoder="builtin-cnn" if encoder is None else getattr(encoder, "name", "custom"))
    if encoder is None:
        p.validate()
    dev = resolve_device(p.device)
    out = prepare_run_folder(out_dir, "wsi-features", overwrite=overwrite, rerun_resumes=True, inputs=inputs)
    files = find_h5(inputs)
    if not files:
        raise MedclDataError(", ".join(map(str, inputs)), "no tile files (.h5) found")
    if any(f.parent.resolve() == out.resolve() for f in files):
        raise MedclDataError(out, "the output folder holds the tile files: features and the run record would "
                                  "overwrite them; choose another --out")
    with torch_threads(p.threads):
        enc = encoder if encoder is not None else build_encoder(p.encoder, input_size=p.input_size,
                                                                encoder_kwargs=p.encoder_kwargs or None)
        enc = enc.to(dev).eval()
        folder = RunFolder(out, RunRecord(kind="wsi-features", config=to_dict(p),
                                          cases_seen=sorted(f.stem for f in files)))
        folder.begin(p)
        results = [_extract_one(h5, out, enc, p, dev, slide_dir, force, progress) for h5 in files]
    done = [r for r in results if r.status == "done"]
    n = sum(r.n_tiles for r in done)
    secs = sum(r.seconds for r in done)
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    log.info(f"extracted {n} tiles from {len(done)} slides ({counts['skipped']} skipped, {counts['failed']} failed) "
             f"with {enc.name} on {dev}: {n / secs if secs > 0 else 0.0:.1f} patches/s")
    folder.finish({"encoder": enc.name, "feature_dim": int(enc.dim), "device": str(dev), "counts": counts,
                   "tiles": n, "patches_per_s": n / secs if secs > 0 else 0.0,
                   "slides": [dataclasses.asdict(r) for r in results]}, step=len(results))
    return results


def _extract_one(h5: Path, out: Path, enc: torch.nn.Module, p: ExtractParams, dev: torch.device,
                 slide_dir: str | os.PathLike | None, force: bool, progress: bool) -> ExtractResult:
    """One tile file: skipped when done with this encoder, failed with a message, or extracted."""
    try:
        ts = load_tile_set(h5, slide_dir=slide_dir)
    except MedclDataError as exc:
        log.warning("%s: failed: %s", h5.stem, exc)
        return ExtractResult(h5.stem, "failed", message=exc.problem)
    target = out / f"{ts.slide_id}.h5"
    if target.resolve() == h5.resolve():
        raise MedclDataError(target, "the output folder is the tile folder: features would overwrite the tiles")
    if not force and is_complete(target) and _same_encoder(target, enc.name):
        log.info("%s: already extracted, skipped", ts.slide_id)
        return ExtractResult(ts.slide_id, "skipped", len(ts.coords), enc.dim, path=str(target),
                             message="already extracted (use --force to redo)")
    if not Path(ts.slide_path).is_file():
        msg = f"slide not found at {ts.slide_path} (recorded in {h5.name}); pass --slide-dir if it moved"
        log.warning("%s: failed: %s", ts.slide_id, msg)
        return ExtractResult(ts.slide_id, "failed", len(ts.coords), message=msg)
    try:
        r = extract_slide(ts, enc, target, p.batch_size, p.workers, dev, progress)
    except MedclDataError as exc:
        r = ExtractResult(ts.slide_id, "failed", len(ts.coords), message=exc.problem)
    except RuntimeError as exc:  # a worker's MedclDataError arrives re-raised as RuntimeError
        r = ExtractResult(ts.slide_id, "failed", len(ts.coords), message=str(exc).strip().splitlines()[-1])
    if r.status == "done":
        log.info("%s: %d tiles -> [%d, %d] features, %.1f patches/s", r.slide_id, r.n_tiles, r.n_tiles, r.dim,
                 r.patches_per_s)
    else:
        log.warning("%s: failed: %s", r.slide_id, r.message)
    return r
