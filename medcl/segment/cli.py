"""``medcl finetune``, ``medcl predict``, ``medcl benchmark KIND`` and ``medcl split``.

Light module: the handlers import torch, MONAI and Lightning when they run. ``medcl benchmark`` is
extensible: a module listed in :data:`BENCHMARK_MODULES` exposes ``register_benchmark(subparsers)`` and adds
its own kind next to ``label-efficiency``.
"""

from __future__ import annotations

import argparse
import importlib

# Modules exposing ``register_benchmark(subparsers)``; each adds one ``medcl benchmark KIND``.
BENCHMARK_MODULES = [
    "medcl.segment.cli",
]

_FINETUNE_EPILOG = """\
data (--data): an MSD or nnU-Net v2 folder (or its dataset.json), a CSV, a folder of volumes with labels.
Sparse labels: a label value named "ignore" in dataset.json, or data.ignore_label=255, is left out of the loss.

cases: with --split FILE (a label-budget split, `medcl split`), the labelled volumes are combination
--combination of budget --labelled N (without --labelled: every labelled volume of the split's pool) and the
split's test set is tested after training; with --labelled N alone, N labelled cases are drawn with the seed
(no test); otherwise every labelled case trains.
split.validation=V holds V of the N labelled volumes out for validation (inside the budget).

outputs (--out): model.pt, checkpoints/ (last.ckpt, resumable with --resume), load_report.json (with --init),
record.json (the run record: kind, complete, step), test_metrics.csv (per test case and class: Dice, HD95 mm,
NSD), metrics.csv (training curves), summary.json, summary.md, loss.png, config.yaml, cases.json.

examples:
  medcl finetune --config configs/finetune/default.yaml --data ../shared/data/hippocampus --out runs/ft \\
      --init runs/pretrain/backbone.pt --split runs/split.json --labelled 2 --combination 0
  medcl finetune --data runs/phantoms --out runs/ft_ph --labelled 2 --max-steps 100 optim.mode=warmup \\
      optim.freeze_steps=50 mixup.alpha=0.4
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``finetune``, ``predict``, ``benchmark`` and ``split`` to the top-level ``medcl`` parser."""
    _register_finetune(subparsers)
    _register_predict(subparsers)
    b = subparsers.add_parser("benchmark", help="benchmarks (label-efficiency, ...)",
                              description="Benchmarks that run many training jobs and report them.")
    bsub = b.add_subparsers(dest="benchmark_kind", metavar="KIND")
    bsub.required = True
    for name in BENCHMARK_MODULES:
        importlib.import_module(name).register_benchmark(bsub)
    _register_split(subparsers)


def _register_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a segmentation network from few labels",
                       description="Fine-tune a 3D segmentation network (random init or a pretraining checkpoint) "
                       "on few labelled volumes, keep the last model, test on the split's test set. Extra key=value "
                       "arguments override config keys (e.g. optim.lr=3e-3 optim.mode=frozen mixup.alpha=0.4).",
                       epilog=_FINETUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="fine-tuning YAML (configs/finetune/*.yaml; default: built-in)")
    p.add_argument("--data", required=True, help="dataset (see below)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--init", default=None, metavar="CKPT", help="pretraining checkpoint, backbone.pt or run folder")
    p.add_argument("--labelled", type=int, default=None, metavar="N", help="number of labelled volumes (split.labelled)")
    p.add_argument("--split", default=None, metavar="FILE", help="label-budget split JSON (split.file)")
    p.add_argument("--combination", type=int, default=None, metavar="K", help="combination of the budget (default 0)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (trainer.max_steps)")
    p.add_argument("--seed", type=int, default=None, help="seed (init, patches, augmentation)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (config key device; default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a shared CPU)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="empty a non-empty --out first (otherwise it is refused)")
    p.add_argument("--allow-test-overlap", action="store_true",
                   help="accept a pretraining checkpoint whose run saw test cases (the test score is then biased)")
    p.add_argument("--allow-unknown-provenance", action="store_true",
                   help="accept an --init checkpoint without a run record (e.g. a plain state dict); the run records "
                   "provenance: unknown")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="accept an --init checkpoint of a run that did not finish (killed or still running)")
    p.set_defaults(func=_run_finetune, accepts_overrides=True)


def _run_finetune(args: argparse.Namespace) -> int:
    from medcl.segment.finetune import run_finetune
    from medcl.segment.prepare import load_finetune_config

    over = list(getattr(args, "overrides", []) or [])
    for flag, key in (("init", "init.checkpoint"), ("labelled", "split.labelled"), ("split", "split.file"),
                      ("combination", "split.combination"), ("max_steps", "trainer.max_steps"), ("seed", "seed"),
                      ("threads", "threads"), ("device", "device")):
        value = getattr(args, flag)
        if value is not None:
            over.append(f"{key}={value}")
    cfg = load_finetune_config(args.config, over)
    run_finetune(cfg, args.data, args.out, resume=args.resume, allow_test_overlap=args.allow_test_overlap,
                 allow_unknown_provenance=args.allow_unknown_provenance, allow_incomplete=args.allow_incomplete,
                 overwrite=args.overwrite)
    print(f"medcl finetune: model in {args.out}/model.pt")
    return 0


def _register_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment volumes with a fine-tuned model, in their own geometry",
                       description="Segment a volume file, a folder of volumes, a DICOM series folder or a dataset "
                       "with a fine-tuned model (model.pt, a finetune checkpoint, or the run folder). The "
                       "preprocessing comes from the checkpoint's run record; each output OUT/{case}.nii.gz has "
                       "the input's shape and affine (a DICOM series: its own grid, in RAS). With --format dicom-seg "
                       "a DICOM series gives OUT/{case}.dcm, a DICOM Segmentation of that series instead.")
    p.add_argument("--ckpt", required=True, help="model.pt, checkpoints/last.ckpt of a finetune run, or the run folder")
    p.add_argument("--input", required=True, help="volume file, folder of volumes, DICOM series folder or dataset")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--format", dest="out_format", choices=["nifti", "dicom-seg"], default="nifti",
                   help="nifti: OUT/{case}.nii.gz (default); dicom-seg: OUT/{case}.dcm, a DICOM Segmentation that "
                   "references the input DICOM series (one segment per class, named after it)")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None, help="mirror test-time augmentation")
    tta.add_argument("--no-tta", dest="tta", action="store_false", help="no test-time augmentation")
    p.add_argument("--keep-going", action="store_true",
                   help="when a volume fails, predict the others and report the failures at the end")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="accept the checkpoint of a fine-tuning run that did not finish")
    p.add_argument("--probabilities", action="store_true",
                   help="also write OUT/{case}_probabilities.nii.gz ([X, Y, Z, K] float32, original grid)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a shared CPU)")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from medcl.core.device import resolve_device, torch_threads
    from medcl.segment.predict import load_model, predict_to_folder

    with torch_threads(args.threads):
        device = resolve_device(args.device)
        model = load_model(args.ckpt, device=device, allow_incomplete=args.allow_incomplete)
        written = predict_to_folder(model, args.input, args.output, tta=args.tta, probabilities=args.probabilities,
                                    device=device, keep_going=args.keep_going, fmt=args.out_format)
    print(f"medcl predict: {len(written)} segmentation(s) in {args.output}")
    return 0


def register_benchmark(bsub: argparse._SubParsersAction) -> None:
    """Add ``medcl benchmark label-efficiency``."""
    p = bsub.add_parser(
        "label-efficiency", help="fine-tune every init x label budget x combination x seed, with paired statistics",
        description="For each initialisation (random, pretraining checkpoints, pretraining methods run on the "
        "unlabelled pool) x labelled budget x combination x seed: fine-tune with the same step budget and the same "
        "learning-rate sweep (selected on validation volumes inside the budget), test on the fixed test set. "
        "Writes results.csv, results.md (mean +- std Dice, paired differences to random init with hierarchical "
        "intervals, fraction of the full-label Dice) and dice_vs_labels.png. Rerunning skips finished runs. "
        "Extra key=value arguments override config keys (e.g. steps=100 seeds=[0] finetune.threads=1).")
    p.add_argument("--config", default=None, help="benchmark YAML (configs/benchmark/*.yaml)")
    p.add_argument("--data", required=True, help="dataset")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an emptied --out (by default a rerun resumes the benchmark there)")
    p.add_argument("--jobs", type=int, default=None,
                   help="fine-tunes in parallel processes (jobs; on a CPU: the core count with finetune.threads=1)")
    p.set_defaults(func=_run_label_efficiency, accepts_overrides=True)


def _run_label_efficiency(args: argparse.Namespace) -> int:
    from medcl.segment.benchmark import load_benchmark_config, run_label_efficiency

    over = list(getattr(args, "overrides", []) or [])
    if args.jobs is not None:
        over.append(f"jobs={args.jobs}")
    cfg, base = load_benchmark_config(args.config, over)
    pretrain_fn = None
    if any(not i.checkpoint for i in cfg.inits):
        # the one place where a job calls another: the CLI layer hands the pretraining entry point over
        try:
            pretrain_fn = importlib.import_module("medcl.pretrain").run_pretrain
        except (ImportError, AttributeError) as exc:
            from medcl.core.errors import MedclConfigError

            raise MedclConfigError("inits", f"pretraining methods need medcl.pretrain.run_pretrain ({exc})") from exc
    run_label_efficiency(cfg, base, args.data, args.out, device=args.device, pretrain_fn=pretrain_fn,
                         overwrite=args.overwrite)
    print(f"medcl benchmark label-efficiency: {args.out}/results.md, results.csv, dice_vs_labels.png")
    return 0


def _register_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="draw a label-budget split (test set, pool, labelled combinations)",
                       description="Draw a fixed test set (by patient when the dataset has a patient column), "
                       "K combinations of N labelled volumes for each budget N, and the unlabelled pool (every "
                       "non-test case), reproducibly from --seed; write them as JSON for finetune --split.")
    p.add_argument("data", help="dataset")
    p.add_argument("--out", required=True, help="split JSON to write")
    p.add_argument("--budgets", default="1,2,4", help="comma-separated numbers of labelled volumes (default 1,2,4)")
    p.add_argument("--combinations", type=int, default=3, help="combinations per budget (default 3)")
    p.add_argument("--test", default="16", help="test cases: a number, or a fraction such as 0.25 (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.set_defaults(func=_run_split)


def _run_split(args: argparse.Namespace) -> int:
    from medcl.config import parse_int_list
    from medcl.core.errors import MedclConfigError
    from medcl.data import load_manifest
    from medcl.data.splits import make_label_budget_split

    budgets = parse_int_list(args.budgets, "--budgets")
    try:
        test: int | float = float(args.test) if "." in args.test else int(args.test)
    except ValueError as exc:
        raise MedclConfigError("--test", f"expected a number of cases or a fraction, got {args.test!r}") from exc
    split = make_label_budget_split(load_manifest(args.data), budgets, args.combinations, test, args.seed)
    split.save(args.out)
    print(f"medcl split: {len(split.test)} test, {len(split.pool)} pool ({len(split.labelled_pool)} labelled), "
          f"budgets {sorted(split.budgets)} x {args.combinations} -> {args.out}")
    return 0
