"""Whole-slide subcommands of ``medcl mil``: ``tile``, ``extract``, ``pretrain-encoder``.

They live under ``medcl mil`` (slides -> tiles -> patch features -> bags); :mod:`medcl.cli` calls
:func:`register` with the ``mil`` command's subparsers. ``heatmap`` needs a trained MIL model and is registered
by :mod:`medcl.mil.cli`.

Their parameters are typed configs (:mod:`medcl.wsi.config`) like every other job's: ``--config FILE.yaml``, then
``key=value`` overrides, then the flags (each sets the config key of the same name); the flags' defaults are read
from the dataclasses, never copied. This module stays light: the handlers import torch, h5py, openslide and
scikit-image when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from medcl.wsi.config import ExtractParams, PretrainParams, TilingParams


def register(mil_subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tile``, ``extract`` and ``pretrain-encoder`` subparsers."""
    _register_tile(mil_subparsers)
    _register_extract(mil_subparsers)
    _register_pretrain(mil_subparsers)


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
            for f in dataclasses.fields(cls)}


def _flag(p: argparse.ArgumentParser, cls: type, key: str, help: str, type: Any = None, flag: str | None = None,
          **kw: Any) -> None:
    """A flag that sets config key ``key`` of ``cls`` (``None`` = not given: the config's value stands)."""
    default = _defaults(cls)[key]
    p.add_argument(flag or "--" + key.replace("_", "-"), dest=key, type=type, default=None,
                   help=f"{help} (config key {key}; default {default})", **kw)


def _params(cls: type, args: argparse.Namespace) -> Any:
    """``cls`` from ``--config``, the ``key=value`` overrides and the flags, validated."""
    from medcl.config import load_config

    over = list(getattr(args, "overrides", []) or [])
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            over.append(f"{f.name}={value!r}" if isinstance(value, str) else f"{f.name}={value}")
    return load_config(cls, args.config, over)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML of the command's parameters (flags and key=value override it)")


def _register_tile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tile",
        help="tile whole slides at a target microns per pixel, keeping tissue tiles (h5 coordinates)",
        description="Detect tissue on a thumbnail (Otsu on saturation + morphology) and write, per slide, "
        "{slide_id}.h5 with level-0 tile coordinates and {slide_id}_tiles.png with the mask and the grid. "
        "Bad slides are reported in summary.json/csv and skipped; exit code 1 only when no slide was tiled. "
        "The folder also gets record.json (kind wsi-tiles) and config.yaml.",
    )
    p.add_argument("slides", nargs="+", help="slide files or folders of slides")
    p.add_argument("--out", required=True, help="output folder")
    _common(p)
    _flag(p, TilingParams, "mpp", "target microns per pixel (0.5 ~ 20x)", float)
    _flag(p, TilingParams, "size", "tile side in pixels at the target mpp", int)
    _flag(p, TilingParams, "overlap", "overlap between tiles in target pixels", int)
    _flag(p, TilingParams, "tissue_threshold", "minimum tissue fraction of a kept tile", float)
    _flag(p, TilingParams, "assume_mpp", "level-0 mpp for slides without mpp metadata", float)
    _flag(p, TilingParams, "mpp_tolerance", "relative tolerance for matching a level's mpp", float)
    _flag(p, TilingParams, "thumbnail_size", "longest side of the tissue thumbnail", int)
    _flag(p, TilingParams, "preset", "encoder preset the tiles are for: warns when --mpp differs from its "
          "magnification by more than 10%")
    p.add_argument("--force", action="store_true", help="re-tile slides that are already done")
    p.add_argument("--overwrite", action="store_true", help="empty --out first (a rerun otherwise skips done slides)")
    p.set_defaults(func=_run_tile, accepts_overrides=True)


def _register_extract(sub: argparse._SubParsersAction) -> None:
    from medcl.wsi.presets import PRESETS

    p = sub.add_parser(
        "extract",
        help="patch features for tiled slides ({slide_id}.h5 with features [N, D] and coords [N, 2])",
        description="Encoders: 'builtin-cnn' (random init, seed 0: a baseline only), a checkpoint of "
        "'medcl mil pretrain-encoder', 'torchvision:ARCH:WEIGHTS', 'timm:ARCH:WEIGHTS' or 'preset:NAME:WEIGHTS' "
        f"(a local weights file; presets: {', '.join(PRESETS)}). "
        "Under 'torchrun --nproc_per_node K -m medcl mil extract ...' (or srun) the slides are sharded across the "
        "ranks, one GPU each. The folder also gets record.json (kind wsi-features), config.yaml and summary.json.",
    )
    p.add_argument("tiles", nargs="+", help="tile h5 files or folders written by 'medcl mil tile'")
    p.add_argument("--out", required=True, help="output folder for feature h5 files")
    _common(p)
    _flag(p, ExtractParams, "encoder", "encoder name or checkpoint path")
    _flag(p, ExtractParams, "batch_size", "tiles per forward pass", int)
    _flag(p, ExtractParams, "workers", "DataLoader worker processes reading tiles", int)
    _flag(p, ExtractParams, "device", "cpu, cuda, cuda:1 or auto")
    _flag(p, ExtractParams, "threads", "torch CPU threads", int)
    _flag(p, ExtractParams, "input_size", "resize tiles to this side before encoding", int)
    _flag(p, ExtractParams, "stain", "stain normalisation before encoding: none or macenko (one fit per slide)")
    _flag(p, ExtractParams, "stain_fit_tiles", "tiles per slide the Macenko stain matrix is estimated from", int)
    p.add_argument("--encoder-kwargs", default=None,
                   help="JSON dict of extra torchvision/timm constructor arguments (config key encoder_kwargs)")
    p.add_argument("--slide-dir", default=None, help="look for slides here when the recorded path moved")
    p.add_argument("--force", action="store_true", help="recompute slides that already have features")
    p.add_argument("--overwrite", action="store_true", help="empty --out first (a rerun otherwise skips done slides)")
    p.set_defaults(func=_run_extract, accepts_overrides=True)


def _register_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain-encoder",
        help="contrastive pretraining of the 2D patch encoder on tiles (SimCLR-style, stain augmentation)",
        description="The folder gets encoder.pt, metrics.csv, curves.png, record.json (kind mil-encoder), "
        "config.yaml and summary.json.",
    )
    p.add_argument("tiles", nargs="+", help="tile h5 files or folders written by 'medcl mil tile'")
    p.add_argument("--out", required=True, help="output folder (encoder.pt, metrics.csv)")
    _common(p)
    _flag(p, PretrainParams, "steps", "optimiser steps", int)
    _flag(p, PretrainParams, "batch_size", "tiles per step (two views each)", int)
    _flag(p, PretrainParams, "crop", "side of the augmented views in pixels", int)
    _flag(p, PretrainParams, "lr", "learning rate", float)
    _flag(p, PretrainParams, "temperature", "InfoNCE temperature", float)
    _flag(p, PretrainParams, "width", "channels of the first stage of the built-in CNN", int)
    _flag(p, PretrainParams, "stain_sigma", "HED stain jitter: scale U(1-s, 1+s), shift U(-s/5, s/5)", float)
    _flag(p, PretrainParams, "stain", "stain normalisation of the tiles before the views: none or macenko")
    _flag(p, PretrainParams, "stain_fit_tiles", "tiles per slide the Macenko stain matrix is estimated from", int)
    _flag(p, PretrainParams, "workers", "DataLoader worker processes reading tiles", int)
    _flag(p, PretrainParams, "log_every", "steps between metric rows", int)
    _flag(p, PretrainParams, "seed", "seed", int)
    _flag(p, PretrainParams, "device", "cpu, cuda, cuda:1 or auto")
    _flag(p, PretrainParams, "threads", "torch CPU threads", int)
    p.add_argument("--slide-dir", default=None, help="look for slides here when the recorded path moved")
    p.add_argument("--overwrite", action="store_true", help="empty a non-empty --out first (otherwise refused)")
    p.set_defaults(func=_run_pretrain, accepts_overrides=True)


def _run_tile(args: argparse.Namespace) -> int:
    from medcl.wsi.tiling import tile_slides

    summary = tile_slides(args.slides, args.out, _params(TilingParams, args), force=args.force,
                          overwrite=args.overwrite)
    return 0 if any(r.status in ("done", "skipped") for r in summary) else 1


def _run_extract(args: argparse.Namespace) -> int:
    import json

    from medcl.core.errors import MedclConfigError
    from medcl.wsi.extract import extract_features

    params = _params(ExtractParams, args)
    if args.encoder_kwargs:
        try:
            kwargs = json.loads(args.encoder_kwargs)
        except json.JSONDecodeError as exc:
            raise MedclConfigError("encoder-kwargs", f"not valid JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise MedclConfigError("encoder-kwargs", "must be a JSON object, e.g. '{\"init_values\": 1e-5}'")
        params = dataclasses.replace(params, encoder_kwargs=kwargs)
    results = extract_features(args.tiles, args.out, params, slide_dir=args.slide_dir, force=args.force,
                               overwrite=args.overwrite)
    return 1 if any(r.status == "failed" for r in results) else 0


def _run_pretrain(args: argparse.Namespace) -> int:
    from medcl.wsi.pretrain_encoder import pretrain_encoder

    pretrain_encoder(args.tiles, args.out, _params(PretrainParams, args), slide_dir=args.slide_dir,
                     overwrite=args.overwrite)
    return 0
