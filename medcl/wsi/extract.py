"""Patch features for tiled slides: tiles are read by DataLoader workers and encoded in batches.

Input: the ``{slide_id}.h5`` tile files of ``medcl mil tile`` (:mod:`medcl.wsi.tiling`). Each tile is read at
the recorded ``level`` as ``read_size`` pixels and resized to ``tile_size`` when the level did not match the
target mpp, so the encoder sees tiles at the target microns per pixel.

Output, per slide, ``{slide_id}.h5`` (the CLAM / torchmil layout ``medcl mil train`` reads):

- ``features``: float32 ``[N, D]``, row ``i`` the encoding of tile ``i``;
- ``coords``: int64 ``[N, 2]``, the tile file's coordinates in the same order (level-0 top-left ``(x, y)``);
- attributes: every attribute of the tile file plus ``encoder`` (the spec), ``feature_dim``,
  ``encoder_input_size`` (side the tiles were resized to), ``encoder_mean`` / ``encoder_std``, ``encoder_preset``
  and ``encoder_mpp`` (for a preset), ``stain`` (``none`` / ``macenko``; with Macenko also the slide's
  ``stain_matrix`` and ``stain_max_conc`` and the reference's: :meth:`medcl.wsi.stain.StainFit.attrs`),
  ``tiles_file`` and ``complete``.

Resumable: a slide whose feature file is complete, was made by the same encoder with the same stain setting, and
from a tile file of the same slide (same ``slide_fingerprint``) is skipped.

Sharded (:mod:`medcl.wsi.shard`): under ``torchrun`` or ``srun`` each rank extracts the slides rank 0 assigned to
it (balanced by the tiles left to encode), on ``cuda:LOCAL_RANK``; each slide is written by one rank, atomically;
rank 0 alone prepares the run folder and writes the one summary, which lists the rank of every slide.
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
from medcl.wsi.shard import Ranks, ShardGroup, assign, rank_device, ranks_from_env
from medcl.wsi.stain import StainFit, fit_tiles, normalize_macenko
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
    """One slide of an extraction run (``rank``: the process that handled it)."""

    slide_id: str
    status: str  # "done" | "skipped" | "failed"
    n_tiles: int = 0
    dim: int = 0
    seconds: float = 0.0
    patches_per_s: float = 0.0
    path: str = ""
    message: str = ""
    rank: int = 0


def _encoder_attrs(encoder: torch.nn.Module, tile_set: TileSet) -> dict:
    attrs = {"encoder": getattr(encoder, "name", ""), "feature_dim": int(encoder.dim),
             "encoder_input_size": int(getattr(encoder, "input_size", None) or tile_set.tile_size)}
    if hasattr(encoder, "mean"):
        attrs["encoder_mean"] = np.asarray(encoder.mean.flatten().cpu(), np.float64)
        attrs["encoder_std"] = np.asarray(encoder.std.flatten().cpu(), np.float64)
    if getattr(encoder, "preset", None):
        attrs["encoder_preset"] = encoder.preset
        attrs["encoder_mpp"] = float(encoder.mpp) if encoder.mpp else 0.0
    return attrs


def extract_slide(
    tile_set: TileSet,
    encoder: torch.nn.Module,
    out_path: Path,
    batch_size: int = 64,
    workers: int = 2,
    device: torch.device | None = None,
    progress: bool = True,
    stain: StainFit | None = None,
) -> ExtractResult:
    """Encode every tile of one slide and write the feature file (atomically); with ``stain`` (the slide's Macenko
    fit) the tiles are stain-normalised on the device first."""
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
            stain_attrs = stain.attrs() if stain else {"stain": "none"}
            for k, v in {**_encoder_attrs(encoder, tile_set), **stain_attrs}.items():
                f.attrs[k] = v
            f.attrs["tiles_file"] = str(tile_set.path.resolve())
            bar = tqdm(total=n, desc=tile_set.slide_id[:24], unit="tile", disable=not progress, file=sys.stderr)
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                for batch in loader:
                    idx = batch["index"].numpy()
                    x = batch["image"].to(device, non_blocking=True)
                    if stain is not None:
                        x = normalize_macenko(x, stain.stain_matrix, stain.max_conc)
                    z = encoder(x).float().cpu().numpy()
                    if z.shape[1] != dim:
                        raise MedclDataError(tile_set.path, f"the encoder gave {z.shape[1]}-d features, expected {dim}")
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


def _done(target: Path, tiles: Path, name: str, stain: str) -> bool:
    """Whether ``target`` is a complete feature file of ``name`` with ``stain``, made from the slide the tile file
    ``tiles`` was made from (same slide fingerprint)."""
    import h5py

    if not is_complete(target):
        return False
    with h5py.File(target, "r") as f, h5py.File(tiles, "r") as t:
        same_slide = f.attrs.get("slide_fingerprint") == t.attrs.get("slide_fingerprint")
        return (str(f.attrs.get("encoder", "")) == name and "features" in f and same_slide
                and str(f.attrs.get("stain", "none")) == stain)


@dataclass
class _Plan:
    """What rank 0 decides before any rank works: the run folder, the tile files and who encodes each."""

    out: Path
    folder: RunFolder
    files: list[Path]
    ranks: list[int]


def _plan(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, p: ExtractParams, name: str,
          world_size: int, overwrite: bool, force: bool) -> _Plan:
    """Rank 0's part: check and prepare ``--out`` (record.json, config.yaml), remove a killed run's temporary files,
    and assign the tile files to ranks by the tiles each still has to encode."""
    import h5py

    out = prepare_run_folder(out_dir, "wsi-features", overwrite=overwrite, rerun_resumes=True, inputs=inputs)
    files = find_h5(inputs)
    if not files:
        raise MedclDataError(", ".join(map(str, inputs)), "no tile files (.h5) found")
    if any(f.parent.resolve() == out.resolve() for f in files):
        raise MedclDataError(out, "the output folder holds the tile files: features and the run record would "
                                  "overwrite them; choose another --out")
    folder = RunFolder(out, RunRecord(kind="wsi-features", config=to_dict(p), cases_seen=sorted(f.stem for f in files),
                                      extra={"world_size": world_size}))
    folder.begin(p)
    for stale in out.glob(".*.h5.*.tmp*"):  # temporary feature files of a killed run
        stale.unlink(missing_ok=True)
    weights = []
    for h5 in files:
        try:
            with h5py.File(h5, "r") as f:
                n = int(f["coords"].shape[0]) if "coords" in f else 0
            left = force or not _done(out / f"{h5.stem}.h5", h5, name, p.stain)
        except OSError:
            n, left = 0, True  # unreadable: its rank reports it
        weights.append(float(n) if left else 0.0)
    return _Plan(out, folder, files, assign(weights, world_size))


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
    ``config.yaml``, ``summary.json``). Launched by ``torchrun`` / ``srun`` with several ranks, the slides are
    sharded (module docstring). Returns one :class:`ExtractResult` per tile file (of every rank).
    """
    from medcl.wsi.encoders import build_encoder

    p = params or ExtractParams(encoder="builtin-cnn" if encoder is None else getattr(encoder, "name", "custom"))
    if encoder is None:
        p.validate()
    ranks = ranks_from_env()
    dev = rank_device(resolve_device(p.device), ranks)
    if dev.type == "cuda" and ranks.distributed:
        torch.cuda.set_device(dev)  # else every rank's DataLoader pinning thread opens a context on GPU 0
    name = getattr(encoder, "name", "custom") if encoder is not None else p.encoder
    with ShardGroup(ranks) as group, torch_threads(p.threads):
        plan = group.from_rank0(lambda: _plan(inputs, out_dir, p, name, ranks.world_size, overwrite, force))

        def build() -> torch.nn.Module:
            enc = encoder if encoder is not None else build_encoder(p.encoder, input_size=p.input_size,
                                                                    encoder_kwargs=p.encoder_kwargs or None)
            return enc.to(dev).eval()

        enc = group.run(build)  # every rank has its encoder before any rank extracts
        mine = [h5 for h5, r in zip(plan.files, plan.ranks) if r == ranks.rank]
        t0 = time.perf_counter()
        shares = group.gather(lambda: ([_extract_one(h5, plan.out, enc, p, dev, slide_dir, force,
                                                     progress and ranks.rank == 0, ranks) for h5 in mine],
                                       time.perf_counter() - t0))
    order = {h5.stem: i for i, h5 in enumerate(plan.files)}
    results = sorted((r for share, _ in shares for r in share), key=lambda r: order.get(r.slide_id, len(order)))
    if ranks.rank == 0:
        _finish(plan.folder, results, enc, dev, [secs for _, secs in shares])
    return results


def _finish(folder: RunFolder, results: list[ExtractResult], enc: torch.nn.Module, dev: torch.device,
            rank_seconds: list[float]) -> None:
    """The one summary (rank 0): counts, throughput, and every slide with the rank that handled it."""
    done = [r for r in results if r.status == "done"]
    n = sum(r.n_tiles for r in done)
    wall = max(rank_seconds) if rank_seconds else 0.0
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    world = len(rank_seconds)
    log.info(f"extracted {n} tiles from {len(done)} slides ({counts['skipped']} skipped, {counts['failed']} failed) "
             f"with {enc.name} on {world} process(es) ({dev.type}): {n / wall if wall > 0 else 0.0:.1f} patches/s")
    per_rank = [{"rank": k, "slides": [r.slide_id for r in results if r.rank == k],
                 "tiles": sum(r.n_tiles for r in done if r.rank == k), "seconds": round(rank_seconds[k], 3)}
                for k in range(world)]
    folder.finish({"encoder": enc.name, "feature_dim": int(enc.dim), "device": str(dev), "world_size": world,
                   "counts": counts, "tiles": n, "patches_per_s": n / wall if wall > 0 else 0.0, "ranks": per_rank,
                   "slides": [dataclasses.asdict(r) for r in results]}, step=len(results))


def _extract_one(h5: Path, out: Path, enc: torch.nn.Module, p: ExtractParams, dev: torch.device,
                 slide_dir: str | os.PathLike | None, force: bool, progress: bool, ranks: Ranks | None = None
                 ) -> ExtractResult:
    """One tile file: skipped when done with this encoder, failed with a message, or extracted."""
    import warnings

    from medcl.wsi.presets import get_preset, mpp_mismatch

    ranks = ranks or Ranks()
    tag = ranks.tag()
    try:
        ts = load_tile_set(h5, slide_dir=slide_dir)
    except MedclDataError as exc:
        log.warning("%s%s: failed: %s", tag, h5.stem, exc)
        return ExtractResult(h5.stem, "failed", message=exc.problem, rank=ranks.rank)
    target = out / f"{ts.slide_id}.h5"
    if target.resolve() == h5.resolve():
        raise MedclDataError(target, "the output folder is the tile folder: features would overwrite the tiles")
    if not force and _done(target, h5, enc.name, p.stain):
        log.info("%s%s: already extracted, skipped", tag, ts.slide_id)
        return ExtractResult(ts.slide_id, "skipped", len(ts.coords), enc.dim, path=str(target),
                             message="already extracted (use --force to redo)", rank=ranks.rank)
    if not Path(ts.slide_path).is_file():
        msg = f"slide not found at {ts.slide_path} (recorded in {h5.name}); pass --slide-dir if it moved"
        log.warning("%s%s: failed: %s", tag, ts.slide_id, msg)
        return ExtractResult(ts.slide_id, "failed", len(ts.coords), message=msg, rank=ranks.rank)
    if getattr(enc, "preset", None):
        mismatch = mpp_mismatch(get_preset(enc.preset), float(ts.attrs.get("mpp_effective", ts.attrs.get("mpp", 0))))
        if mismatch:
            warnings.warn(mismatch, stacklevel=2)
    try:
        stain = None
        if p.stain == "macenko":
            ds = TileDataset([ts], max_open=1)
            try:
                stain = fit_tiles(ds.read, len(ds), p.stain_fit_tiles)
            finally:
                ds.close()
        r = extract_slide(ts, enc, target, p.batch_size, p.workers, dev, progress, stain)
    except MedclDataError as exc:
        r = ExtractResult(ts.slide_id, "failed", len(ts.coords), message=exc.problem)
    except RuntimeError as exc:  # a worker's MedclDataError arrives re-raised as RuntimeError
        r = ExtractResult(ts.slide_id, "failed", len(ts.coords), message=str(exc).strip().splitlines()[-1])
    r.rank = ranks.rank
    if r.status == "done":
        log.info("%s%s: %d tiles -> [%d, %d] features, %.1f patches/s", tag, r.slide_id, r.n_tiles, r.n_tiles, r.dim,
                 r.patches_per_s)
    else:
        log.warning("%s%s: failed: %s", tag, r.slide_id, r.message)
    return r
