"""Heatmaps of a trained MIL model over the slide, and the tiles as GeoJSON for QuPath: the model half.

``medcl mil heatmap --slide S --features F --ckpt C --out PNG [--geojson G]``:

1. load the model written by ``medcl mil train`` (:func:`medcl.mil.train.load_mil_model`) and the slide's
   feature file (``features`` ``[N, D]``, ``coords`` ``[N, 2]``, from ``medcl mil extract``);
2. run the head on the whole bag and take one score per tile (:func:`tile_scores`): the head's
   ``instance_scores`` (attention weights for ABMIL / CLAM, instance logits or probabilities for the
   others; the registry names each head's score, :func:`medcl.mil.heads.instance_score_name`), or a named
   ``extras`` tensor (``[1, N]``, or ``[1, N, K]`` at one class);
3. draw them (:func:`medcl.wsi.heatmap.draw_tile_scores`: the PNG has exactly the thumbnail's size; the GeoJSON
   holds one polygon per tile with its score as a QuPath measurement).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.wsi.heatmap import TileGrid, draw_tile_scores

log = logging.getLogger(__name__)


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
    from medcl.io.slide import slide_id_from_path
    from medcl.mil.heads import instance_score_name
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
    given = slide_id_from_path(slide)
    sid = str(bag.attrs.get("slide_id", given))
    if sid != given and not bag.attrs.get("slide_fingerprint"):  # with a fingerprint the drawing checks the slide
        warnings.warn(f"{features}: the feature file is for slide '{sid}', the slide given is '{given}'", stacklevel=2)
    kind = str(info.get("head", ""))
    name = instance_score_name(kind) if res.source == "instance_scores" else res.source
    if res.score_class is not None:
        name = f"{name} [class {classes[res.score_class]}]"
    title = f"{sid}: predicted {classes[res.predicted]} (p = {res.probs[res.predicted]:.2f}), {len(res.scores)} tiles"
    fp = bag.attrs.get("slide_fingerprint")
    grid = TileGrid(bag.coords, bag.tile_size_level0, bag.patch_level, bag.patch_size, str(fp) if fp else None)
    drawn = draw_tile_scores(slide, grid, res.scores, out, score_name=name.replace("'", ""),
                             label=f"{kind or 'MIL'} {name}", title=title, geojson=geojson,
                             thumbnail_size=thumbnail_size, alpha=alpha, cmap=cmap, vmin=vmin, vmax=vmax,
                             object_type=object_type, slide_id=sid, source=features)
    log.info("%s: %d tiles, predicted %s (p = %.3f); %s in [%.4g, %.4g]; wrote %s%s", sid, len(res.scores),
             classes[res.predicted], res.probs[res.predicted], name, res.scores.min(), res.scores.max(), out,
             f" and {drawn.geojson}" if drawn.geojson else "")
    return HeatmapResult(drawn.png, drawn.geojson, len(res.scores), drawn.thumbnail_shape, res.scores, res.probs,
                         classes[res.predicted], name, drawn.vmin, drawn.vmax)
