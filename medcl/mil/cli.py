"""``medcl mil``: MIL subcommands. ``train`` and ``heatmap`` live here; the whole-slide ones (``tile``,
``extract``, ``pretrain-encoder``) are registered into the same command group by :mod:`medcl.wsi.cli` (see
:mod:`medcl.cli`). Light module: the handlers import torch and the rest when they run."""

from __future__ import annotations

import argparse

_TRAIN_EPILOG = """\
data (--data):
  a slide CSV with header slide_id,label[,split][,patient_id] and one {slide_id}.h5 per slide (datasets
  'features' [N, D] and 'coords' [N, 2]); the h5 folder is data.h5_dir (relative to the CSV's folder), else
  'features/' or 'h5_files/' beside the CSV, else the CSV's folder. Or an instance table (no header: bag label,
  bag id, then the features; e.g. MUSK1). Labels may be strings or integers: classes are sorted (numerically
  when all labels are integers) and class k is the k-th; data.classes=[a,b,...] fixes the order.
  Folds are grouped by patient when the CSV has a patient_id (or patient / case_id) column.

outputs (--out, new or empty; --resume continues a run there, --overwrite empties it): record.json (the run
  record; complete: true once everything is written), config.yaml (the first config) and config_{head}.yaml
  (every head's resolved config), summary.json (per head: mean and std of each metric over folds and seeds, and
  of the out-of-fold metrics pooled per seed), results.csv (a row per head, seed and fold), results.md (the
  same as tables), predictions.csv, instance_scores/{head}.h5, model.pt (one config; model_{head}.pt for
  several) trained on all bags, units/ (each finished fit: what --resume skips).

examples:
  medcl mil train --config configs/mil/abmil.yaml --data ../shared/data/mil/musk1.csv --out runs/musk1 \\
      --folds 10 --seeds 0,1,2,3,4
  medcl mil train --config configs/mil/abmil.yaml --config configs/mil/scmil.yaml --data slides.csv \\
      --out runs/imb --imbalance 0.1 train.epochs=40 optim.lr=1e-3
"""


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the top-level ``mil`` command with ``train`` and ``heatmap``; returns its subparsers (the group the
    whole-slide commands join)."""
    p = subparsers.add_parser("mil", help="multiple-instance learning on slides / bags of features")
    sub = p.add_subparsers(dest="mil_command", metavar="MIL_COMMAND")
    sub.required = True
    _register_train(sub)
    _register_heatmap(sub)
    return sub


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="cross-validate MIL heads on bags of features and train a final model",
        description="Stratified k-fold cross-validation (seeded, grouped by patient when known) of one or more "
        "MIL heads, then a final model on all bags. Extra key=value arguments override config keys "
        "(e.g. train.epochs=40 abmil.gated=true); they apply to every --config.",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", action="append", default=None, metavar="CFG",
                   help="YAML config of one head (configs/mil/*.yaml); repeat to compare heads on the same folds "
                   "(default: the built-in ABMIL config)")
    p.add_argument("--data", required=True, help="slide CSV or instance table (see below)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--folds", type=int, default=None, help="number of CV folds (cv.folds, default 10)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2,3,4 (cv.seeds); each seed "
                   "draws its own folds and initialisation")
    p.add_argument("--imbalance", type=float, default=None, metavar="R",
                   help="subsample the positive class (cv.positive_class, default the second class) of every "
                   "training fold so that it makes up the fraction R of the training bags: all other bags are "
                   "kept and round(R / (1 - R) * n_other) positive bags (at least 2) are drawn at random; test "
                   "folds are untouched. E.g. 0.1 = 10%% positives")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (the config's device)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (same heads, configs and data): finished folds and final models "
                   "are kept, the rest is trained; the tables equal an uninterrupted run's")
    p.add_argument("--overwrite", action="store_true", help="empty a non-empty --out first (otherwise it is refused)")
    p.set_defaults(func=_run_train, accepts_overrides=True)


def _run_train(args: argparse.Namespace) -> int:
    from medcl.config import load_config, parse_int_list
    from medcl.core.device import torch_threads
    from medcl.mil.bag_io import load_bags
    from medcl.mil.config import MILConfig
    from medcl.mil.experiment import cross_validate

    overrides = list(getattr(args, "overrides", []) or [])
    if args.folds is not None:
        overrides.append(f"cv.folds={args.folds}")
    if args.seeds is not None:
        overrides.append(f"cv.seeds={parse_int_list(args.seeds, '--seeds')}")
    if args.imbalance is not None:
        overrides.append(f"cv.imbalance={args.imbalance}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    cfgs = [load_config(MILConfig, path, overrides) for path in (args.config or [None])]
    d = cfgs[0].data
    ds = load_bags(args.data, h5_dir=d.h5_dir, classes=d.classes, features_key=d.features_key,
                   coords_key=d.coords_key, in_memory=d.in_memory, max_memory_gb=d.max_memory_gb)
    print(f"medcl mil train: {len(ds)} bags, {ds.n_instances} instances, {ds.in_dim} features, classes {ds.classes}"
          + (", folds grouped by patient" if ds.patients is not None else ""))
    with torch_threads(cfgs[0].threads):
        cross_validate(cfgs, ds, args.out, resume=args.resume, overwrite=args.overwrite)
    print(f"medcl mil train: results in {args.out}/results.md")
    return 0


def _register_heatmap(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "heatmap",
        help="overlay a trained MIL model's attention / instance scores on the slide thumbnail",
    )
    p.add_argument("--slide", required=True, help="the slide file")
    p.add_argument("--features", required=True, help="the slide's feature h5 (from 'medcl mil extract')")
    p.add_argument("--ckpt", required=True, help="a checkpoint written by 'medcl mil train'")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--geojson", default=None, help="also write the tiles with their scores as GeoJSON (QuPath)")
    p.add_argument("--thumbnail-size", type=int, default=1024, help="longest side of the thumbnail")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the overlay")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map")
    p.add_argument(
        "--score", default="instance",
        help="'instance' (the head's instance_scores: attention for ABMIL/CLAM) or a per-instance extras key",
    )
    p.add_argument("--class", dest="class_index", type=int, default=None,
                   help="class of a per-class score (default: the predicted class)")
    p.add_argument("--vmin", type=float, default=None, help="colour range minimum (default: lowest score)")
    p.add_argument("--vmax", type=float, default=None, help="colour range maximum (default: highest score)")
    p.add_argument("--geojson-type", default="tile", choices=["tile", "detection", "annotation"],
                   help="QuPath objectType of the GeoJSON features (default tile)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_heatmap)


def _run_heatmap(args: argparse.Namespace) -> int:
    from medcl.mil.heatmap import draw_heatmap

    draw_heatmap(
        args.slide,
        args.features,
        args.ckpt,
        args.out,
        geojson=args.geojson,
        thumbnail_size=args.thumbnail_size,
        alpha=args.alpha,
        cmap=args.cmap,
        score=args.score,
        class_index=args.class_index,
        vmin=args.vmin,
        vmax=args.vmax,
        object_type=args.geojson_type,
        device=args.device,
    )
    return 0
