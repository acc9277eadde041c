"""Whole-slide subcommands of ``medcl mil``: ``tile``, ``extract``, ``pretrain-encoder``.

They live under ``medcl mil`` (slides -> tiles -> patch features -> bags); :mod:`medcl.cli` calls
:func:`register` with the ``mil`` command's subparsers. ``heatmap`` needs a trained MIL model and is registered
by :mod:`medcl.mil.cli`. This module stays light: the handlers import torch, h5py, openslide and scikit-image
when they run.
"""

from __future__ import annotations

import argparse


def register(mil_subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tile``, ``extract`` and ``pretrain-encoder`` subparsers."""
    _register_tile(mil_subparsers)
    _register_extract(mil_subparsers)
    _register_pretrain(mil_subparsers)


def _register_tile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tile",
        help="tile whole slides at a target microns per pixel, keeping tissue tiles (h5 coordinates)",
        description="Detect tissue on a thumbnail (Otsu on saturation + morphology) and write, per slide, "
        "{slide_id}.h5 with level-0 tile coordinates and {slide_id}_tiles.png with the mask and the grid. "
        "Bad slides are reported in summary.json/csv and skipped; exit code 1 only when no slide was tiled.",
    )
    p.add_argument("slides", nargs="+", help="slide files or folders of slides")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mpp", type=float, default=0.5, help="target microns per pixel (default 0.5, i.e. 20x)")
    p.add_argument("--size", type=int, default=256, help="tile side in pixels at the target mpp (default 256)")
    p.add_argument("--overlap", type=int, default=0, help="overlap between tiles in target pixels (default 0)")
    p.add_argument(
        "--tissue-threshold", type=float, default=0.25, help="minimum tissue fraction of a kept tile (default 0.25)"
    )
    p.add_argument("--assume-mpp", type=float, default=None, help="level-0 mpp for slides without mpp metadata")
    p.add_argument(
        "--mpp-tolerance", type=float, default=0.1, help="relative tolerance for matching a level's mpp (default 0.1)"
    )
    p.add_argument("--thumbnail-size", type=int, default=2048, help="longest side of the tissue thumbnail")
    p.add_argument("--force", action="store_true", help="re-tile slides that are already done")
    p.set_defaults(func=_run_tile)


def _register_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="patch features for tiled slides ({slide_id}.h5 with features [N, D] and coords [N, 2])",
        description="Encoders: 'builtin-cnn' (random init, seed 0: a baseline only), a checkpoint of "
        "'medcl mil pretrain-encoder', 'torchvision:ARCH:WEIGHTS' or 'timm:ARCH:WEIGHTS' (local weights file).",
    )
    p.add_argument("tiles", nargs="+", help="tile h5 files or folders written by 'medcl mil tile'")
    p.add_argument("--encoder", required=True, help="encoder name or checkpoint path")
    p.add_argument("--out", required=True, help="output folder for feature h5 files")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes reading tiles")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--input-size", type=int, default=None, help="resize tiles to this side before encoding")
    p.add_argument(
        "--encoder-kwargs", default=None, help="JSON dict of extra torchvision/timm constructor arguments"
    )
    p.add_argument("--slide-dir", default=None, help="look for slides here when the recorded path moved")
    p.add_argument("--force", action="store_true", help="recompute slides that already have features")
    p.set_defaults(func=_run_extract)


def _register_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain-encoder",
        help="contrastive pretraining of the 2D patch encoder on tiles (SimCLR-style, stain augmentation)",
    )
    p.add_argument("tiles", nargs="+", help="tile h5 files or folders written by 'medcl mil tile'")
    p.add_argument("--out", required=True, help="output folder (encoder.pt, metrics.csv)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32, help="tiles per step (two views each)")
    p.add_argument("--crop", type=int, default=96, help="side of the augmented views in pixels")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--width", type=int, default=32, help="channels of the first stage of the built-in CNN")
    p.add_argument(
        "--stain-sigma", type=float, default=0.1, help="HED stain jitter: scale U(1-s, 1+s), shift U(-s/5, s/5)"
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes reading tiles")
    p.add_argument("--log-every", type=int, default=10, help="steps between metric rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--slide-dir", default=None, help="look for slides here when the recorded path moved")
    p.set_defaults(func=_run_pretrain)


def _run_tile(args: argparse.Namespace) -> int:
    from medcl.wsi.tiling import TilingParams, tile_slides

    params = TilingParams(
        mpp=args.mpp,
        size=args.size,
        overlap=args.overlap,
        tissue_threshold=args.tissue_threshold,
        assume_mpp=args.assume_mpp,
        mpp_tolerance=args.mpp_tolerance,
        thumbnail_size=args.thumbnail_size,
    )
    summary = tile_slides(args.slides, args.out, params, force=args.force)
    return 0 if any(r.status in ("done", "skipped") for r in summary) else 1


def _run_extract(args: argparse.Namespace) -> int:
    import json

    from medcl.core.errors import MedclConfigError
    from medcl.wsi.extract import extract_features

    kwargs = None
    if args.encoder_kwargs:
        try:
            kwargs = json.loads(args.encoder_kwargs)
        except json.JSONDecodeError as exc:
            raise MedclConfigError("encoder-kwargs", f"not valid JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise MedclConfigError("encoder-kwargs", "must be a JSON object, e.g. '{\"init_values\": 1e-5}'")

    results = extract_features(
        args.tiles,
        args.out,
        encoder=args.encoder,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        input_size=args.input_size,
        slide_dir=args.slide_dir,
        force=args.force,
        encoder_kwargs=kwargs,
    )
    return 1 if any(r.status == "failed" for r in results) else 0


def _run_pretrain(args: argparse.Namespace) -> int:
    from medcl.wsi.pretrain_encoder import PretrainParams, pretrain_encoder

    params = PretrainParams(
        steps=args.steps,
        batch_size=args.batch_size,
        crop=args.crop,
        lr=args.lr,
        temperature=args.temperature,
        width=args.width,
        stain_sigma=args.stain_sigma,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
        log_every=args.log_every,
    )
    pretrain_encoder(args.tiles, args.out, params, slide_dir=args.slide_dir)
    return 0
