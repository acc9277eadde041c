"""Tiling whole slides at a target resolution in microns per pixel, keeping tissue tiles.

For each slide: pick the pyramid level by microns per pixel (:func:`choose_level`), detect tissue on a
thumbnail (:func:`tissue_mask`: Otsu threshold on HSV saturation, then morphology), lay a regular grid of
tiles over the slide in level-0 pixels, keep the tiles whose tissue fraction reaches the threshold, and
write the coordinates and a picture of what was kept.

Level choice (what CLAM users ask for: CLAM tiles by level index). Let ``m_l`` be the mpp of level ``l``
and ``t`` the target. The chosen level is the coarsest one with ``m_l <= t * (1 + tolerance)`` (the
finest level when none is fine enough, which then means upsampling). If ``|t / m_l - 1| <= tolerance`` the
level matches: tiles are read at ``size`` pixels with no resampling (the tile's real mpp is ``m_l``).
Otherwise a tile is read as ``round(size * t / m_l)`` pixels at that level and resized to ``size``.

Output layout, per slide, in the output folder:

``{slide_id}.h5``
    ``coords``: int64 ``[N, 2]``, ``(x, y)`` level-0 pixel coordinates of each tile's top-left corner, in
    row-major grid order (CLAM / torchmil layout). ``tissue_fraction``: float32 ``[N]``.
    File attributes: ``slide_path`` (absolute), ``slide_fingerprint`` (:func:`medcl.wsi.tile_io.slide_fingerprint`:
    a replaced slide is tiled again, and heatmaps refuse features of another slide), ``slide_id``, ``backend``,
    ``mpp`` (target),
    ``mpp_effective`` (the mpp the tiles really have), ``mpp_level0`` (x, y), ``mpp_source``
    (``metadata``/``assumed``), ``level`` (level read), ``level_mpp``, ``downsample`` (of that level),
    ``tile_size`` (tile side in pixels at the target mpp, what extraction yields), ``read_size`` (pixels
    read at ``level``), ``tile_size_level0`` (tile side in level-0 pixels, float), ``step_level0``,
    ``overlap``, ``resampled`` (bool), ``tissue_threshold``, ``slide_dimensions`` (level-0 w, h),
    ``thumbnail_size`` and ``complete`` (True once fully written). ``coords`` also carries CLAM's
    ``patch_level`` (= ``level``) and ``patch_size`` (= ``read_size``) attributes.
``{slide_id}_tiles.png``
    The thumbnail with the tissue mask tinted green and the kept tiles outlined in blue.
``summary.json`` / ``summary.csv``
    One row per slide of the batch: status ``done`` (tiled now), ``skipped`` (already done: resumed),
    ``no_tissue`` or ``failed`` (with the reason), tile count, level, read size.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medcl.core.errors import MedclDataError, MedclError
from medcl.core.files import atomic_path, write_csv
from medcl.core.record import RunRecord
from medcl.core.runfolder import RunFolder, prepare_run_folder
from medcl.io.slide import SLIDE_EXTENSIONS, Slide, open_slide, slide_id_from_path
from medcl.wsi.config import TilingParams
from medcl.wsi.tile_io import (
    TileSet,
    find_h5,
    is_complete,
    load_tile_set,
    made_from,
    slide_fingerprint,
    write_tiles_h5,
)
from medcl.wsi.tissue import draw_tiles, tile_tissue_fraction, tissue_mask

log = logging.getLogger(__name__)

__all__ = [
    "TilingParams", "LevelChoice", "TileResult", "choose_level", "tile_grid", "tile_slide", "tile_slides",
    "find_slides", "TileSet", "load_tile_set", "find_h5", "is_complete", "tissue_mask",
    "tile_tissue_fraction", "draw_tiles",
]

STATUSES = ("done", "skipped", "no_tissue", "failed")


@dataclass
class LevelChoice:
    """Where tiles are read: ``level``, its mpp, whether it matches the target, pixels read per tile."""

    level: int
    level_mpp: float
    ratio: float  # target mpp / level mpp; > 1 means the read is downsampled to ``size``
    matched: bool
    read_size: int


def choose_level(level_mpps: Sequence[float], target_mpp: float, size: int, tolerance: float = 0.1) -> LevelChoice:
    """Pick the pyramid level for ``target_mpp`` (see the module docstring).

    Args:
        level_mpps: mpp of each level, finest first (level 0).
        target_mpp: wanted microns per pixel.
        size: tile side in pixels at the target mpp.
        tolerance: relative tolerance for a level to count as the target.
    """
    candidates = [i for i, m in enumerate(level_mpps) if m <= target_mpp * (1.0 + tolerance)]
    level = max(candidates, key=lambda i: level_mpps[i]) if candidates else int(np.argmin(level_mpps))
    m = float(level_mpps[level])
    ratio = target_mpp / m
    matched = abs(ratio - 1.0) <= tolerance
    read_size = size if matched else max(1, round(size * ratio))
    return LevelChoice(level=level, level_mpp=m, ratio=ratio, matched=matched, read_size=read_size)


def tile_grid(
    extent: tuple[int, int], tile0: float, step0: float, origin: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Top-left corners ``[N, 2]`` int64 ``(x, y)`` of whole tiles of side ``tile0`` at stride ``step0`` (level-0
    pixels) inside the rectangle ``origin + extent``; row-major (y outer, x inner)."""
    w, h = extent
    nx = int(math.floor((w - tile0) / step0)) + 1 if w >= tile0 else 0
    ny = int(math.floor((h - tile0) / step0)) + 1 if h >= tile0 else 0
    xs = origin[0] + np.floor(np.arange(nx) * step0 + 1e-9).astype(np.int64)
    ys = origin[1] + np.floor(np.arange(ny) * step0 + 1e-9).astype(np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


@dataclass
class TileResult:
    """One row of the tiling summary."""

    slide: str
    slide_id: str
    status: str
    n_tiles: int = 0
    level: int | None = None
    read_size: int | None = None
    mpp_effective: float | None = None
    seconds: float = 0.0
    message: str = ""
    outputs: list[str] = field(default_factory=list)


def find_slides(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[TileResult]]:
    """Slides named by ``inputs``: files as given, folders scanned recursively for slide endings (a
    folder holding ``.dcm`` files counts as one DICOM-WSI slide). Missing inputs come back as failures."""
    found: list[Path] = []
    missing: list[TileResult] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                dcm = sorted(f for f in files if f.lower().endswith(".dcm"))
                if dcm:
                    found.append(Path(root) / dcm[0])
                for f in sorted(files):
                    if f.lower().endswith(SLIDE_EXTENSIONS):
                        found.append(Path(root) / f)
        else:
            missing.append(TileResult(str(p), slide_id_from_path(p), "failed", message="no such file or folder"))
    return found, missing


def tile_slide(slide_path: str | os.PathLike, out_dir: str | os.PathLike, params: TilingParams) -> TileResult:
    """Tile one slide (see the module docstring); raises :class:`MedclDataError` for a bad slide."""
    from PIL import Image

    from medcl import __version__

    t0 = time.perf_counter()
    out = Path(out_dir)
    with open_slide(slide_path, backend=params.backend, assume_mpp=params.assume_mpp) as slide:
        sid = slide.slide_id
        level_mpps = [float(np.mean(slide.level_mpp(i))) for i in range(slide.level_count)]
        choice = choose_level(level_mpps, params.mpp, params.size, params.mpp_tolerance)
        ds = slide.level_downsamples[choice.level]
        tile0 = choice.read_size * ds  # tile side in level-0 pixels
        step0 = tile0 * (params.size - params.overlap) / params.size
        origin, extent = _bounds(slide)
        coords = tile_grid(extent, tile0, step0, origin)

        thumb = slide.thumbnail(params.thumbnail_size)
        th, tw = thumb.shape[:2]
        scale = (tw / slide.dimensions[0], th / slide.dimensions[1])
        thumb_mpp = float(np.mean(slide.mpp)) / float(np.mean(scale))  # type: ignore[arg-type]
        mask, _thr = tissue_mask(
            thumb, thumb_mpp, params.min_saturation, params.closing_um, params.min_tissue_um2, params.max_hole_um2
        )
        frac = tile_tissue_fraction(mask, coords, tile0, scale)
        keep = frac >= params.tissue_threshold if mask.any() else np.zeros(len(coords), bool)
        coords, frac = coords[keep], frac[keep]
        mpp_eff = choice.level_mpp * choice.read_size / params.size
        result = TileResult(
            str(slide.path), sid, "done", int(len(coords)), choice.level, choice.read_size, mpp_eff
        )
        png = out / f"{sid}_tiles.png"
        with atomic_path(png, suffix=".png") as tmp:
            Image.fromarray(draw_tiles(thumb, mask, coords, tile0, scale)).save(tmp, format="PNG")
        result.outputs.append(str(png))
        if len(coords) == 0:
            (out / f"{sid}.h5").unlink(missing_ok=True)  # a --force re-run must not leave stale tiles
            result.status = "no_tissue"
            result.message = (
                f"no tile reaches tissue fraction {params.tissue_threshold} "
                f"(tissue mask covers {100 * mask.mean():.1f}% of the thumbnail)"
            )
        else:
            attrs = {
                "slide_path": str(slide.path.resolve()),
                "slide_fingerprint": slide_fingerprint(slide.path),
                "slide_id": sid,
                "backend": slide.backend,
                "mpp": params.mpp,
                "mpp_effective": mpp_eff,
                "mpp_level0": np.asarray(slide.mpp, np.float64),
                "mpp_source": slide.mpp_source or "",
                "level": choice.level,
                "level_mpp": choice.level_mpp,
                "downsample": ds,
                "tile_size": params.size,
                "read_size": choice.read_size,
                "tile_size_level0": tile0,
                "step_level0": step0,
                "overlap": params.overlap,
                "resampled": not choice.matched,
                "tissue_threshold": params.tissue_threshold,
                "slide_dimensions": np.asarray(slide.dimensions, np.int64),
                "thumbnail_size": params.thumbnail_size,
                "medcl_version": __version__,
            }
            h5 = out / f"{sid}.h5"
            write_tiles_h5(h5, coords, frac, attrs)
            result.outputs.insert(0, str(h5))
            if choice.ratio < 1.0 - params.mpp_tolerance:
                result.message = (
                    f"no level is as fine as {params.mpp} um/px (finest {choice.level_mpp:.3g}): tiles are upsampled"
                )
    result.seconds = time.perf_counter() - t0
    return result


def _bounds(slide: Slide) -> tuple[tuple[int, int], tuple[int, int]]:
    """Scanned area ``((x, y), (w, h))`` in level-0 pixels: OpenSlide's ``bounds-*`` properties (MRXS,
    some NDPI) when present, else the whole level 0."""
    p = slide.properties
    try:
        x, y = int(p["openslide.bounds-x"]), int(p["openslide.bounds-y"])
        w, h = int(p["openslide.bounds-width"]), int(p["openslide.bounds-height"])
        if w > 0 and h > 0:
            return (x, y), (w, h)
    except (KeyError, ValueError):
        pass
    return (0, 0), slide.dimensions


def tile_slides(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    params: TilingParams | None = None,
    force: bool = False,
    progress: bool = True,
    verbose: bool = True,
    overwrite: bool = False,
) -> list[TileResult]:
    """Tile a batch of slides; a bad slide is reported and skipped, never stops the batch.

    Slides whose ``{slide_id}.h5`` is complete are skipped (resume) unless ``force``. Writes
    ``summary.json`` and ``summary.csv`` into ``out_dir`` and prints the summary (when ``verbose``).
    """
    from tqdm.auto import tqdm

    params = params or TilingParams()
    params.validate()
    if params.preset is not None:
        import warnings

        from medcl.wsi.presets import get_preset, mpp_mismatch

        mismatch = mpp_mismatch(get_preset(params.preset), params.mpp, what="--mpp asks for tiles")
        if mismatch:
            warnings.warn(mismatch, stacklevel=2)
    out = prepare_run_folder(out_dir, "wsi-tiles", overwrite=overwrite, rerun_resumes=True, inputs=inputs)
    slides, results = find_slides(inputs)
    if not slides and not results:
        raise MedclDataError(", ".join(map(str, inputs)), f"no slide files found (endings: {', '.join(SLIDE_EXTENSIONS)})")
    folder = RunFolder(out, RunRecord(kind="wsi-tiles", config=asdict(params),
                                      cases_seen=sorted(slide_id_from_path(s) for s in slides)))
    folder.begin(params)
    for stale in out.glob(".*.h5.*.tmp*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    seen: dict[str, str] = {}
    bar = tqdm(slides, desc="tiling", unit="slide", disable=not progress, file=sys.stderr)
    for path in bar:
        sid = slide_id_from_path(path)
        bar.set_postfix_str(sid)
        if sid in seen:
            results.append(TileResult(str(path), sid, "failed", message=f"duplicate slide id (also {seen[sid]})"))
            continue
        seen[sid] = str(path)
        h5 = out / f"{sid}.h5"
        if not force and is_complete(h5):
            replaced = made_from(h5, path)
            if replaced is None:
                results.append(_resumed(path, sid, h5))
                continue
            log.warning("%s: the tiles were %s: tiling it again", sid, replaced)
        try:
            results.append(tile_slide(path, out, params))
        except MedclError as exc:
            results.append(TileResult(str(path), sid, "failed", message=str(getattr(exc, "problem", exc))))
        except Exception as exc:  # a backend failing mid-read (truncated file): report, go on with the batch
            results.append(TileResult(str(path), sid, "failed", message=f"{type(exc).__name__}: {exc}"))
    folder.finish(write_summary(results, out, params), step=len(results))
    if verbose:
        log.info("%s", format_summary(results))
    return results


def _resumed(path: Path, sid: str, h5: Path) -> TileResult:
    import h5py

    with h5py.File(h5, "r") as f:
        return TileResult(
            str(path), sid, "skipped", int(f["coords"].shape[0]), int(f.attrs["level"]), int(f.attrs["read_size"]),
            float(f.attrs["mpp_effective"]), message="already tiled (use --force to redo)", outputs=[str(h5)],
        )


def write_summary(results: Sequence[TileResult], out: Path, params: TilingParams) -> dict:
    """``summary.csv`` (a row per slide); returns the ``summary.json`` document (params, counts, slides)."""
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    counts["tiles"] = sum(r.n_tiles for r in results if r.status in ("done", "skipped"))
    cols = ["slide_id", "status", "n_tiles", "level", "read_size", "mpp_effective", "seconds", "message", "slide"]
    write_csv(out / "summary.csv", [asdict(r) for r in results], cols)
    return {"params": asdict(params), "counts": counts, "slides": [asdict(r) for r in results]}


def format_summary(results: Sequence[TileResult]) -> str:
    """The per-slide table and the counts, as text."""
    lines = [f"{'slide':<32} {'status':<10} {'tiles':>7} {'level':>5}  message"]
    for r in results:
        lvl = "" if r.level is None else str(r.level)
        lines.append(f"{r.slide_id[:32]:<32} {r.status:<10} {r.n_tiles:>7} {lvl:>5}  {r.message}")
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    lines.append(
        f"{len(results)} slides: {counts['done']} tiled, {counts['skipped']} already done, "
        f"{counts['no_tissue']} without tissue, {counts['failed']} failed; "
        f"{sum(r.n_tiles for r in results if r.status in ('done', 'skipped'))} tiles"
    )
    return "\n".join(lines)


