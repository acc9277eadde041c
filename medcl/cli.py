"""The ``medcl`` command. Each job registers its subcommands from a light module (heavy imports
happen inside the handlers, so ``medcl --help`` stays fast)."""

from __future__ import annotations

import argparse
import importlib
import sys

from medcl import __version__
from medcl.core.errors import MedclError, MedclInterrupted
from medcl.core.logs import configure_logging

# Modules exposing ``register(subparsers)``; each adds one top-level subcommand.
_JOB_MODULES = [
    "medcl.data.cli",
    "medcl.pretrain.cli",
    "medcl.mil.cli",
    "medcl.segment.cli",
    "medcl.segment.export.cli",
    "medcl.report.cli",
    "medcl.demo_cli",
]
# Modules whose ``register(group)`` adds subcommands to another job's command: (module, command).
_GROUP_MODULES = [("medcl.wsi.cli", "mil")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medcl",
        description="Label-efficient medical imaging: contrastive pretraining, few-label segmentation, MIL.",
    )
    parser.add_argument("--version", action="version", version=f"medcl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    groups = {}
    for name in _JOB_MODULES:
        group = importlib.import_module(name).register(sub)
        if group is not None:
            groups[name.split(".")[1]] = group
    for name, command in _GROUP_MODULES:
        importlib.import_module(name).register(groups[command])
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    if getattr(args, "accepts_overrides", False):
        args.overrides = [e.lstrip("-") for e in extra]
    try:
        rc = args.func(args)
    except MedclInterrupted as exc:
        print(f"medcl: {exc}", file=sys.stderr)
        return exc.exit_code
    except MedclError as exc:
        print(f"medcl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medcl: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
