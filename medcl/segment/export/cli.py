"""``medcl export --ckpt RUN --format FORMAT --out PATH`` (light: the writers import their libraries when run)."""

from __future__ import annotations

import argparse

from medcl.segment.export import FORMATS

_EPILOG = """\
formats:
  nnunet         weights nnU-Net v2 loads with -pretrained_weights (every key but the segmentation layers),
                 and a plans file beside them
  monai-bundle   a MONAI bundle folder (configs/metadata.json, configs/inference.json, models/model.pt)

Format options go as key=value after the flags (see README, "Export").
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` to the top-level ``medcl`` parser."""
    p = subparsers.add_parser("export", help="write a checkpoint in another tool's format (nnU-Net, MONAI bundle)",
                              description="Write a medcl checkpoint (a run folder, model.pt, backbone.pt or a "
                              "Lightning .ckpt) in another tool's format.", epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint file")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="output format")
    p.add_argument("--out", required=True, help="output file or folder (never the checkpoint itself)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--allow-incomplete", action="store_true", help="accept the checkpoint of an unfinished run")
    p.add_argument("--allow-unknown-provenance", action="store_true",
                   help="accept a checkpoint without a run record or provenance sidecar")
    p.set_defaults(func=_run_export, accepts_overrides=True)


def _run_export(args: argparse.Namespace) -> int:
    from medcl.core.errors import MedclConfigError
    from medcl.segment.export import ExportOptions, run_export

    extra: dict[str, str] = {}
    for item in getattr(args, "overrides", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MedclConfigError(item, "format options are key=value")
        extra[key] = value
    opts = ExportOptions(overwrite=args.overwrite, allow_incomplete=args.allow_incomplete,
                         allow_unknown_provenance=args.allow_unknown_provenance, extra=extra)
    summary = run_export(args.ckpt, args.format, args.out, opts)
    print(f"medcl export: {args.format} written to {summary.get('written', args.out)}")
    return 0
