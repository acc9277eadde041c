"""``medcl demo``: the whole label-efficient pipeline on phantoms (or ``--data``); the job is :mod:`medcl.demo`."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """The ``medcl demo`` subcommand."""
    p = subparsers.add_parser(
        "demo",
        help="the whole label-efficient pipeline on synthetic phantoms (or --data) in a few minutes",
        description="Generate phantoms (or read --data), pretrain gd+local on the unlabelled volumes, fine-tune "
        "with 2 labelled volumes from the pretrained and from random weights, test, and write a table, "
        "dice.png and examples.png.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")
    p.add_argument("--data", help="an MSD-style dataset instead of the phantoms (e.g. ../shared/data/hippocampus)")
    p.add_argument("--pretrain-steps", type=int, help="override the recipe's pretraining steps")
    p.add_argument("--finetune-steps", type=int, help="override the recipe's fine-tuning steps")
    p.add_argument("--seeds", default="0,1", help="fine-tuning seeds, comma-separated (default 0,1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an emptied --out (by default a rerun resumes the demo there)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: Any) -> int:
    from medcl.config import parse_int_list
    from medcl.demo import run_demo

    seeds = parse_int_list(args.seeds, "--seeds")
    run_demo(args.out, args.device, args.data, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
             seeds=seeds, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"medcl demo: done; see {args.out}/summary.md, dice.png, examples.png (medcl report {args.out} for one page)")
    return 0
