"""Drawing per-tile scores over a slide: a heatmap PNG on the thumbnail and the tiles as QuPath GeoJSON.

The drawing half of ``medcl mil heatmap`` (the model half, which computes the scores, is
:mod:`medcl.mil.heatmap`); it knows tiles, coordinates and scores, never a model:

* :func:`score_map` -- a ``[h, w]`` map of the tile scores at thumbnail resolution (mean where tiles overlap);
* :func:`render_heatmap` -- the thumbnail with the map blended in and a colour bar drawn inside the image:
  **the PNG has exactly the thumbnail's size**, so it overlays the thumbnail pixel for pixel;
* :func:`tiles_geojson` -- a ``FeatureCollection`` QuPath imports (File > Import objects): one ``Feature`` per
  tile, a ``Polygon`` in level-0 pixels (QuPath's coordinates), ``properties`` with ``objectType`` (``"tile"``
  by default), ``name``, ``color`` (the heatmap colour) and ``measurements`` (``{score name: value}``, the map
  form of QuPath >= 0.4), so *Measure > Show measurement maps* works too;
* :func:`draw_tile_scores` -- all of it for one slide file.

A tile's footprint is its level-0 square ``coords[i] + [0, tile_size_level0)``; :func:`tile_side_level0` reads it
from the feature file's attributes (written by ``medcl mil tile``) or, for CLAM feature files, from
``patch_size`` times the downsample of ``patch_level``.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.core.files import atomic_path, atomic_write_text
from medcl.io.slide import open_slide

__all__ = ["OBJECT_TYPES", "TileGrid", "tile_side_level0", "score_map", "render_heatmap", "tiles_geojson",
           "draw_tile_scores", "DrawnHeatmap"]

OBJECT_TYPES = ("tile", "detection", "annotation")


@dataclass
class TileGrid:
    """Where a slide's tiles are: ``coords`` ``[N, 2]`` level-0 top-left corners (x, y), and the tile side in
    level-0 pixels or, failing that, CLAM's ``patch_size`` at ``patch_level``."""

    coords: np.ndarray
    tile_size_level0: float | None = None
    patch_level: int | None = None
    patch_size: int | None = None
    slide_fingerprint: str | None = None  # of the slide the tiles were cut from (None: a file of an older medcl)


def tile_side_level0(grid: TileGrid, level_downsamples: list[float], source: str | os.PathLike | None = None) -> float:
    """The tile side in level-0 pixels; ``source`` (the feature file) names the problem when it is unknown."""
    if grid.tile_size_level0 is not None:
        return float(grid.tile_size_level0)
    if grid.patch_size is None or grid.patch_level is None or grid.patch_level >= len(level_downsamples):
        raise MedclDataError(source, "no 'tile_size_level0' attribute nor CLAM patch_size/patch_level on coords")
    return float(grid.patch_size * level_downsamples[grid.patch_level])


def _footprints(coords: np.ndarray, tile0: float, scale: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """``[N, 4]`` (r0, r1, c0, c1) thumbnail pixel spans of the tiles, at least one pixel each."""
    h, w = shape
    c0 = np.clip(np.round(coords[:, 0] * scale[0]), 0, w - 1).astype(np.int64)
    r0 = np.clip(np.round(coords[:, 1] * scale[1]), 0, h - 1).astype(np.int64)
    c1 = np.clip(np.maximum(np.round((coords[:, 0] + tile0) * scale[0]), c0 + 1), 1, w).astype(np.int64)
    r1 = np.clip(np.maximum(np.round((coords[:, 1] + tile0) * scale[1]), r0 + 1), 1, h).astype(np.int64)
    return np.stack([r0, r1, c0, c1], 1)


def score_map(coords: np.ndarray, tile0: float, scores: np.ndarray, scale: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """``[h, w]`` float map: each pixel the mean score of the tiles covering it, NaN where none does."""
    acc = np.zeros(shape, np.float64)
    cnt = np.zeros(shape, np.int32)
    for (r0, r1, c0, c1), s in zip(_footprints(coords, tile0, scale, shape), scores):
        acc[r0:r1, c0:c1] += s
        cnt[r0:r1, c0:c1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)


def render_heatmap(
    thumb: np.ndarray,
    smap: np.ndarray,
    out_png: str | os.PathLike,
    cmap: str = "jet",
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    label: str = "score",
    title: str = "",
) -> tuple[float, float]:
    """Write ``thumb`` ``[h, w, 3]`` with ``smap`` ``[h, w]`` (NaN = no tile) blended in and a colour bar drawn
    inside the image; the PNG is exactly ``w x h`` pixels. Returns the colour range ``(vmin, vmax)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    h, w = smap.shape
    valid = np.isfinite(smap)
    lo = float(np.nanmin(smap)) if vmin is None else float(vmin)
    hi = float(np.nanmax(smap)) if vmax is None else float(vmax)
    if hi <= lo:
        hi = lo + 1e-12
    norm = Normalize(lo, hi, clip=True)
    try:
        cm = colormaps[cmap]
    except KeyError as exc:
        raise MedclConfigError("cmap", f"unknown matplotlib colour map {cmap!r}") from exc
    rgb = thumb.astype(np.float32) / 255.0
    colour = cm(norm(np.where(valid, smap, lo)))[..., :3].astype(np.float32)
    blend = np.where(valid[..., None], (1 - alpha) * rgb + alpha * colour, rgb)

    dpi = 100
    fig = plt.figure(figsize=(w / dpi, h / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(blend, interpolation="nearest", aspect="auto")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    font = max(6.0, min(11.0, min(w, h) / 60))
    from matplotlib.patches import Rectangle

    # the colour bar goes on a translucent panel on the side (left or right) that hides fewer tiles
    pw = min(0.35, (6.5 * font + 40) / w)
    covered = [valid[int(0.16 * h) : int(0.84 * h), int(x0 * w) : int((x0 + pw) * w)].mean() for x0 in (1 - pw, 0.0)]
    x0 = 1 - pw if covered[0] <= covered[1] else 0.0
    ax.add_patch(Rectangle((x0, 0.16), pw, 0.68, transform=ax.transAxes, facecolor="white", alpha=0.7,
                           edgecolor="none", zorder=2))
    cax = ax.inset_axes((x0 + (4.2 * font + 6) / w, 0.2, 1.2 * font / w, 0.6))
    cb = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cm), cax=cax)
    cb.ax.tick_params(labelsize=font * 0.8)
    cb.set_label(label, fontsize=font)
    cax.yaxis.set_ticks_position("left")
    cax.yaxis.set_label_position("right")
    if title:
        ax.text(0.01, 0.99, title, transform=ax.transAxes, va="top", ha="left", fontsize=font,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 2})
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    plt.close(fig)
    if img.shape[:2] != (h, w):  # float rounding of figsize * dpi: pad or crop to the exact size
        fixed = np.full((h, w, 3), 255, np.uint8)
        fixed[: min(h, img.shape[0]), : min(w, img.shape[1])] = img[:h, :w]
        img = fixed
    from PIL import Image

    with atomic_path(out, suffix=".png") as tmp:
        Image.fromarray(np.ascontiguousarray(img)).save(tmp, format="PNG")
    return lo, hi


def tiles_geojson(
    coords: np.ndarray,
    tile0: float,
    scores: np.ndarray,
    score_name: str,
    slide_id: str,
    colours: np.ndarray | None = None,
    object_type: str = "tile",
) -> dict:
    """A QuPath-readable GeoJSON ``FeatureCollection``: one ``Feature`` per tile, a closed square ``Polygon``
    in level-0 pixels, ``properties`` = ``{objectType, name, measurements: {score_name: score}, color}``,
    and a stable UUID ``id`` per tile (derived from the slide id and the tile's coordinates)."""
    if object_type not in OBJECT_TYPES:
        raise MedclConfigError("geojson-type", f"must be one of {OBJECT_TYPES}, got {object_type!r}")
    t = float(tile0)
    feats = []
    for i, ((x, y), s) in enumerate(zip(coords.tolist(), scores.tolist())):
        ring = [[x, y], [x + t, y], [x + t, y + t], [x, y + t], [x, y]]
        props: dict = {
            "objectType": object_type,
            "name": f"tile {i}",
            "measurements": {score_name: float(s)},
        }
        if colours is not None:
            props["color"] = [int(c) for c in colours[i]]
        feats.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"medcl:{slide_id}:{x}:{y}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": props,
        })
    return {"type": "FeatureCollection", "features": feats}


@dataclass
class DrawnHeatmap:
    """What :func:`draw_tile_scores` wrote: the files, the thumbnail's ``(h, w)`` and the colour range."""

    png: str
    geojson: str | None
    thumbnail_shape: tuple[int, int]
    vmin: float
    vmax: float


def draw_tile_scores(
    slide: str | os.PathLike,
    grid: TileGrid,
    scores: np.ndarray,
    out: str | os.PathLike,
    *,
    score_name: str,
    label: str,
    title: str = "",
    geojson: str | os.PathLike | None = None,
    thumbnail_size: int = 1024,
    alpha: float = 0.5,
    cmap: str = "jet",
    vmin: float | None = None,
    vmax: float | None = None,
    object_type: str = "tile",
    slide_id: str | None = None,
    source: str | os.PathLike | None = None,
) -> DrawnHeatmap:
    """Paint ``scores`` ``[N]`` of the tiles of ``grid`` over the thumbnail of ``slide`` into ``out`` (PNG), and
    optionally the tiles as GeoJSON. ``source`` (the feature file) is named in errors about the grid."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    if not 0.0 <= alpha <= 1.0:
        raise MedclConfigError("alpha", f"must be in [0, 1], got {alpha}")
    if object_type not in OBJECT_TYPES:
        raise MedclConfigError("geojson-type", f"must be one of {OBJECT_TYPES}, got {object_type!r}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(grid.coords),):
        raise MedclDataError(source, f"{len(scores)} scores for {len(grid.coords)} tiles")
    if grid.slide_fingerprint:
        from medcl.wsi.tile_io import slide_fingerprint

        now = slide_fingerprint(slide)
        if now != grid.slide_fingerprint:
            raise MedclDataError(source, f"was made from another slide than {slide} (slide fingerprint "
                                         f"{grid.slide_fingerprint}, the slide given has {now}): wrong slide?")
    with open_slide(slide, assume_mpp=None) as s:
        tile0 = tile_side_level0(grid, list(s.level_downsamples), source)
        if (grid.coords.max(0) > np.array(s.dimensions)).any():
            raise MedclDataError(source, f"tile coordinates exceed the slide's size {s.dimensions}: wrong slide?")
        thumb = s.thumbnail(thumbnail_size)
        scale = (thumb.shape[1] / s.dimensions[0], thumb.shape[0] / s.dimensions[1])
        sid = slide_id or s.slide_id
    smap = score_map(grid.coords, tile0, scores, scale, thumb.shape[:2])
    lo, hi = render_heatmap(thumb, smap, out, cmap, alpha, vmin, vmax, label, title)
    gj_path = None
    if geojson is not None:
        cm = colormaps[cmap]
        colours = (np.asarray(cm(Normalize(lo, hi, clip=True)(scores)))[:, :3] * 255).round().astype(np.uint8)
        doc = tiles_geojson(grid.coords, tile0, scores, score_name, sid, colours, object_type)
        gj_path = str(geojson)
        atomic_write_text(json.dumps(doc), gj_path)
    return DrawnHeatmap(str(out), gj_path, tuple(thumb.shape[:2]), lo, hi)
