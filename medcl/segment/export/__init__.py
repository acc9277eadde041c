"""``medcl export``: a medcl checkpoint written in another tool's format.

One registry names every format (``medcl export --format NAME``); each lives in its own module, imported only
when used, that exposes::

    HELP: str                                   # one line for --help
    def export(ckpt: InitCheckpoint, out: Path, options: ExportOptions) -> dict   # the figures for summary.json

``ckpt`` has been read with :func:`medcl.segment.init.read_checkpoint` and accepted with
:func:`medcl.segment.init.accept_checkpoint` (provenance and completeness: an incomplete run is refused unless
``--allow-incomplete``). Writers use :mod:`medcl.core.files` (atomic) and never write over the checkpoint.

======================  ==============================================  ====================================
format                  what                                            module
======================  ==============================================  ====================================
``nnunet``              weights that nnU-Net v2's ``-pretrained_weights``  ``medcl.segment.export.nnunet``
                        loads, with a plans file beside them
``monai-bundle``        a MONAI bundle (configs/, models/model.pt)       ``medcl.segment.export.monai_bundle``
======================  ==============================================  ====================================
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcl.core.errors import MedclConfigError

__all__ = ["FORMATS", "ExportOptions", "format_names", "format_help", "run_export"]

# format name -> module (imported when used, so ``medcl --help`` stays light)
FORMATS: dict[str, str] = {
    "nnunet": "medcl.segment.export.nnunet",
    "monai-bundle": "medcl.segment.export.monai_bundle",
}


@dataclass
class ExportOptions:
    """What the user asked beyond the checkpoint and the output.

    Attributes:
        overwrite: replace an existing output.
        allow_incomplete, allow_unknown_provenance: as in :func:`medcl.segment.init.accept_checkpoint`.
        extra: format-specific ``key=value`` options from the command line.
    """

    overwrite: bool = False
    allow_incomplete: bool = False
    allow_unknown_provenance: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def format_names() -> list[str]:
    """Every export format, sorted."""
    return sorted(FORMATS)


def _module(fmt: str) -> Any:
    if fmt not in FORMATS:
        raise MedclConfigError("--format", f"unknown export format {fmt!r}; choose one of {format_names()}")
    return importlib.import_module(FORMATS[fmt])


def format_help(fmt: str) -> str:
    """The format's one-line description."""
    return str(getattr(_module(fmt), "HELP", ""))


def run_export(ckpt_path: str | Path, fmt: str, out: str | Path, options: ExportOptions | None = None) -> dict[str, Any]:
    """Read and accept ``ckpt_path``, write it as ``fmt`` to ``out``; returns the writer's summary.

    Raises:
        MedclConfigError: unknown format.
        MedclDataError: the checkpoint is refused, or the output would replace the checkpoint or an existing
            output without ``overwrite``.
    """
    from medcl.core.errors import MedclDataError
    from medcl.segment.init import accept_checkpoint, read_checkpoint

    options = options or ExportOptions()
    module = _module(fmt)
    ckpt = read_checkpoint(ckpt_path)
    accept_checkpoint(ckpt, allow_incomplete=options.allow_incomplete,
                      allow_unknown_provenance=options.allow_unknown_provenance)
    out = Path(out)
    src = ckpt.path.resolve()
    if out.resolve() == src or src.is_relative_to(out.resolve()):
        raise MedclDataError(out, "the export would replace or contain the checkpoint it reads; choose another --out")
    if out.exists() and not options.overwrite and (out.is_file() or any(out.iterdir())):
        raise MedclDataError(out, "already exists; pass --overwrite to replace it")
    return dict(module.export(ckpt, out, options))
