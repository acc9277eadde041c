"""``medcl pretrain``: contrastive / positional / reconstruction pretraining of a 3D backbone.

::

    medcl pretrain --config configs/pretrain/gd_local.yaml --data PATH --out DIR
                   [--max-steps N] [--device auto|cpu|cuda] [--seed K] [--resume] [--split FILE]
                   [key.sub=value ...]

Any config key can be overridden on the command line (``optim.lr=3e-4 trainer.num_workers=0``); an unknown
key or a value of the wrong type fails before training with a message naming it.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining of a 3D encoder-decoder on unlabelled volumes",
        description="Pretrain a 3D backbone with contrastive (G^R, G^D, G^D-, local), positional (VoCo), "
        "structural / anatomical cross-volume and masked-reconstruction losses. Extra key.sub=value "
        "arguments override config keys.",
    )
    p.add_argument("--config", help="pretraining config YAML (configs/pretrain/*.yaml); optional with --resume")
    p.add_argument("--data", required=True, help="dataset: folder, CSV, dataset.json, file or DICOM folder")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, plots, backbone.pt)")
    p.add_argument("--max-steps", type=int, help="override trainer.max_steps")
    p.add_argument("--device", default=None, help="auto (GPU when available), cpu, cuda or cuda:N (config key device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (config key threads)")
    p.add_argument("--seed", type=int, help="override the config seed")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its latest checkpoint (a --config must match the run's)")
    p.add_argument("--overwrite", action="store_true", help="empty a non-empty OUT first (otherwise it is refused)")
    p.add_argument(
        "--split",
        help="label-budget split JSON (medcl split): pretrain on its pool only, never on its test cases",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_pretrain, accepts_overrides=True)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from medcl.core.errors import MedclConfigError
    from medcl.pretrain.run import run_pretrain

    if args.config is None and not args.resume:
        raise MedclConfigError("--config", "a config is required (see configs/pretrain/)")
    over = list(getattr(args, "overrides", []) or [])
    if args.threads is not None:
        over.append(f"threads={args.threads}")
    cases = None
    if args.split:
        from medcl.data.splits import load_split

        cases = list(load_split(args.split).pool)
    out = run_pretrain(
        args.config,
        args.data,
        args.out,
        overrides=over,
        max_steps=args.max_steps,
        device=args.device,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        cases=cases,
        progress=not args.no_progress,
    )
    print(f"medcl pretrain: done, results in {out}")
    return 0
