"""Heatmaps of a trained MIL model over the slide, and the tiles as GeoJSON for QuPath.

``medcl mil heatmap --slide S --features F --ckpt C --out PNG [--geojson G]``:

1. load the model written by ``medcl mil train`` (:func:`medcl.mil.train.load_mil_model`) and the slide's
   feature file (``features`` ``[N, D]``, ``coords`` ``[N, 2]``, from ``medcl mil extract``);
2. run the head on the whole bag and take one score per tile (:func:`tile_scores`): the head's
   ``instance_scores`` (attention weights for ABMIL / CLAM, instance logits or probabilities for the
   others, see each head), or a named ``extras`` tensor (``[1, N]``, or ``[1, N, K]`` at one class);
3. paint each tile's footprint on the slide thumbnail with a colour map, blended over the tissue, with a
   colour bar and the bag prediction drawn inside the image: **the PNG has exactly the thumbnail's size**,
   so it overlays the thumbnail pixel for pixel;
4. optionally write a GeoJSON ``FeatureCollection`` that QuPath imports (File > Import objects): one
   ``Feature`` per tile, a ``Polygon`` in level-0 pixels (QuPath's coordinates), ``properties`` with
   ``objectType`` (``"tile"`` by default), ``name``, ``color`` (the heatmap colour) and ``measurements``
   (``{score name: value}``, the map form of QuPath >= 0.4), so *Measure > Show measurement maps* works too.

A tile's footprint is its level-0 square ``coords[i] + [0, tile_size_level0)``, read from the feature
file's attributes (written by ``medcl mil tile``); CLAM feature files without it fall back to
``coords.attrs["patch_size"]`` times the downsample of ``coords.attrs["patch_level"]``.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.io.slide import open_slide

OBJECT_TYPES = ("tile", "detection", "annotation")
# what ``instance_scores`` means for each head of :mod:`medcl.mil.heads` (colour bar label)
_INSTANCE_SCORE_NAMES = {
    "abmil": "attention", "gated_abmil": "attention", "clam_sb": "attention", "transmil": "attention",
    "dsmil": "instance score", "meanpool": "instance logit", "maxpool": "instance logit",
    "ins": "instance probability", "scmil": "instance score",
}


@dataclass
class BagFeatures:
    """A slide's features read back: ``features`` ``[N, D]`` float32, ``coords`` ``[N, 2]`` int64 (level-0
    top-left corners) and the tile side in level-0 pixels (None when the file does not say)."""

    path: Path
    features: np.ndarray
    coords: np.ndarray
    tile_size_level0: float | None
    patch_level: int | None
    patch_size: int | None
    attrs: dict = field(default_factory=dict)


def read_bag_features(path: str | os.PathLike) -> BagFeatures:
    """Read a feature h5 (``features`` and ``coords`` required); errors name the file."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise MedclDataError(p, "feature file does not exist")
    try:
        with h5py.File(p, "r") as f:
            for key in ("features", "coords"):
                if key not in f:
                    raise MedclDataError(p, f"no '{key}' dataset (found {sorted(f.keys())}); write it with 'medcl mil extract'")
            feats = np.asarray(f["features"][()], dtype=np.float32)
            coords = np.asarray(f["coords"][()])
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            cattrs = dict(f["coords"].attrs)
    except OSError as exc:
        raise MedclDataError(p, f"cannot read h5 file: {exc}") from exc
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise MedclDataError(p, f"'features' must be a non-empty [N, D] array, got shape {list(feats.shape)}")
    if coords.ndim != 2 or coords.shape[0] != feats.shape[0] or coords.shape[1] < 2:
        raise MedclDataError(p, f"'coords' must be [{feats.shape[0]}, 2], got shape {list(coords.shape)}")
    t0 = attrs.get("tile_size_level0")
    return BagFeatures(
        p, feats, coords[:, :2].astype(np.int64), None if t0 is None else float(t0),
        int(cattrs["patch_level"]) if "patch_level" in cattrs else None,
        int(cattrs["patch_size"]) if "patch_size" in cattrs else None, attrs,
    )


@dataclass
class TileScores:
    """Per-tile scores ``[N]``, the bag's class probabilities ``[K]``, the predicted class index, the class
    the scores refer to (None when class-free), and where the scores came from."""

    scores: np.ndarray
    probs: np.ndarray
    predicted: int
    score_class: int | None
    source: str


@torch.no_grad()
def tile_scores(
    head: torch.nn.Module, features: torch.Tensor, score: str = "instance", class_index: int | None = None
) -> TileScores:
    """One score per instance of one bag.

    Args:
        head: a MIL head (``head(x [1, N, D], mask [1, N]) -> MILOutput``), in eval mode.
        features: ``[N, D]``.
        score: ``"instance"`` for ``output.instance_scores``, or the name of an ``extras`` tensor
            (``[1, N]`` or ``[1, N, K]``; e.g. ``attention_logits``, ``instance_logits``, ``attention``).
        class_index: the class of a ``[1, N, K]`` tensor (default: the predicted class).
    """
    dev = next((p.device for p in head.parameters()), torch.device("cpu"))
    x = features.to(dev, torch.float32)[None]
    mask = torch.ones(x.shape[:2], dtype=torch.bool, device=dev)
    out = head(x, mask)
    probs = torch.softmax(out.logits.float(), dim=-1)[0].cpu().numpy()
    pred = int(probs.argmax())
    tensors = {k: v for k, v in out.extras.items() if torch.is_tensor(v) and v.ndim in (2, 3) and v.shape[:2] == x.shape[:2]}
    if score == "instance":
        if out.instance_scores is None:
            raise MedclConfigError(
                "score", f"this head gives no instance scores; choose one of its per-instance extras {sorted(tensors)}"
            )
        t, source = out.instance_scores, "instance_scores"
    elif score in tensors:
        t, source = tensors[score], f"extras['{score}']"
    else:
        raise MedclConfigError("score", f"unknown score {score!r}; use 'instance' or one of {sorted(tensors)}")
    k = None
    if t.ndim == 3:
        k = pred if class_index is None else int(class_index)
        if not 0 <= k < t.shape[2]:
            raise MedclConfigError("class", f"class index {k} outside [0, {t.shape[2]})")
        t = t[..., k]
    s = t[0].float().cpu().numpy()
    if not np.isfinite(s).all():
        raise MedclDataError(None, f"the model produced non-finite {source}")
    return TileScores(s, probs, pred, k, source)


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

    Image.fromarray(np.ascontiguousarray(img)).save(out)
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
class HeatmapResult:
    """What :func:`draw_heatmap` wrote and found."""

    png: str
    geojson: str | None
    n_tiles: int
    thumbnail_shape: tuple[int, int]
    scores: np.ndarray
    probs: np.ndarray
    predicted_class: str
    source: str
    vmin: float
    vmax: float


def draw_heatmap(
    slide: str | os.PathLike,
    features: str | os.PathLike,
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    geojson: str | os.PathLike | None = None,
    thumbnail_size: int = 1024,
    alpha: float = 0.5,
    cmap: str = "jet",
    score: str = "instance",
    class_index: int | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    object_type: str = "tile",
    device: str = "cpu",
) -> HeatmapResult:
    """The whole ``medcl mil heatmap`` command (see the module docstring)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    from medcl.mil.train import load_mil_model

    if not 0.0 <= alpha <= 1.0:
        raise MedclConfigError("alpha", f"must be in [0, 1], got {alpha}")
    bag = read_bag_features(features)
    head, info = load_mil_model(ckpt, device=device)
    if bag.features.shape[1] != int(info["in_dim"]):
        raise MedclDataError(
            features, f"features have {bag.features.shape[1]} dimensions, the model {ckpt} expects {info['in_dim']}"
        )
    res = tile_scores(head, torch.from_numpy(bag.features), score, class_index)
    classes = [str(c) for c in info["classes"]]
    with open_slide(slide, assume_mpp=None) as s:
        tile0 = bag.tile_size_level0
        if tile0 is None:
            if bag.patch_size is None or bag.patch_level is None or bag.patch_level >= s.level_count:
                raise MedclDataError(features, "no 'tile_size_level0' attribute nor CLAM patch_size/patch_level on coords")
            tile0 = bag.patch_size * s.level_downsamples[bag.patch_level]
        sid = str(bag.attrs.get("slide_id", s.slide_id))
        if sid != s.slide_id:
            print(f"note: feature file is for slide '{sid}', the slide given is '{s.slide_id}'")
        if (bag.coords.max(0) > np.array(s.dimensions)).any():
            raise MedclDataError(features, f"tile coordinates exceed the slide's size {s.dimensions}: wrong slide?")
        thumb = s.thumbnail(thumbnail_size)
        scale = (thumb.shape[1] / s.dimensions[0], thumb.shape[0] / s.dimensions[1])
    smap = score_map(bag.coords, tile0, res.scores, scale, thumb.shape[:2])
    kind = str(info.get("head", ""))
    name = _INSTANCE_SCORE_NAMES.get(kind, "instance score") if res.source == "instance_scores" else res.source
    if res.score_class is not None:
        name = f"{name} [class {classes[res.score_class]}]"
    label = f"{kind or 'MIL'} {name}"
    title = f"{sid}: predicted {classes[res.predicted]} (p = {res.probs[res.predicted]:.2f}), {len(res.scores)} tiles"
    lo, hi = render_heatmap(thumb, smap, out, cmap, alpha, vmin, vmax, label, title)
    gj_path = None
    if geojson is not None:
        cm = colormaps[cmap]
        colours = (np.asarray(cm(Normalize(lo, hi, clip=True)(res.scores)))[:, :3] * 255).round().astype(np.uint8)
        doc = tiles_geojson(bag.coords, tile0, res.scores, name.replace("'", ""), sid, colours, object_type)
        gj_path = str(geojson)
        Path(gj_path).parent.mkdir(parents=True, exist_ok=True)
        Path(gj_path).write_text(json.dumps(doc))
    print(
        f"{sid}: {len(res.scores)} tiles, predicted {classes[res.predicted]} "
        f"(p = {res.probs[res.predicted]:.3f}); {name} in [{res.scores.min():.4g}, {res.scores.max():.4g}]; "
        f"wrote {out}" + (f" and {gj_path}" if gj_path else "")
    )
    return HeatmapResult(str(out), gj_path, len(res.scores), thumb.shape[:2], res.scores, res.probs,
                         classes[res.predicted], name, lo, hi)
