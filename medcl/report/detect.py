"""Which kind of run a folder holds: the ``kind`` of its ``record.json`` (every job writes one, see
:mod:`medcl.core.runfolder`); for a folder written before that contract ("legacy"), guessed from the files each
job wrote (its marker files):

=====================  ==================================================================================
kind                   markers
=====================  ==================================================================================
``pretrain``           ``record.json`` of kind ``pretrain`` (written before training starts), or
                       ``config.yaml`` + ``summary.json`` with a ``method`` (``medcl pretrain``)
``finetune``           ``cases.json`` + ``config.yaml`` or ``summary.json`` (``medcl finetune``)
``label-efficiency``   ``results.csv`` + ``split.json`` / ``lr_selection.json`` / ``dice_vs_labels.png``
                       (``medcl benchmark label-efficiency``)
``mil``                ``results.csv`` + ``run.json`` or ``config_*.yaml`` (``medcl mil train``)
``wsi-tiles``          ``summary.json`` with ``params``, ``counts`` and ``slides`` (``medcl mil tile``)
``mil-encoder``        ``encoder.pt`` + ``metrics.csv`` (``medcl mil pretrain-encoder``)
``demo``               a record or summary of kind ``demo``, or ``dice.png`` + ``examples.png`` (``medcl demo``)
any other record kind  ``record.json`` with that ``kind``
``folder``             none of the above, but PNG, CSV or markdown files: shown as they are
=====================  ==================================================================================

A folder can hold other run folders (a demo holds a pretraining and two fine-tuning runs; a benchmark its
pretraining runs): :func:`find_runs` finds them below a folder, skipping the folders runs use internally.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENERIC_SUFFIXES = (".png", ".csv", ".md")
INTERNAL_DIRS = frozenset({"checkpoints", "logs", "tensorboard", "predictions", "instance_scores", "__pycache__"})
"""Folders inside runs that hold no run of their own (checkpoints, Lightning logs, NIfTI predictions...)."""
MAX_DEPTH = 6


def _json_dict(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8", errors="replace")) if path.is_file() else {}
    except (json.JSONDecodeError, OSError):
        return {}
    return d if isinstance(d, dict) else {}


def record_kind(folder: Path) -> str | None:
    """The ``kind`` of ``folder/record.json``, if it is a medcl run record."""
    kind = _json_dict(folder / "record.json").get("kind")
    return str(kind) if isinstance(kind, str) and kind else None


def detect_kind(folder: Path) -> str | None:
    """The run kind of ``folder`` (see the module table), ``None`` when it is no medcl run."""
    if not folder.is_dir():
        return None
    names = {p.name for p in folder.iterdir()}
    kind = record_kind(folder)
    summary = _json_dict(folder / "summary.json") if "summary.json" in names else {}
    if kind == "demo" or summary.get("kind") == "demo" or {"dice.png", "examples.png"} <= names:
        return "demo"
    if kind is not None:
        return kind
    if "cases.json" in names and ({"config.yaml", "summary.json"} & names):
        return "finetune"
    if "results.csv" in names and ({"split.json", "lr_selection.json", "dice_vs_labels.png"} & names):
        return "label-efficiency"
    if "results.csv" in names and ("run.json" in names or any(n.startswith("config_") and n.endswith(".yaml")
                                                              for n in names)):
        return "mil"
    if {"params", "counts", "slides"} <= set(summary):
        return "wsi-tiles"
    if {"encoder.pt", "metrics.csv"} <= names:
        return "mil-encoder"
    if "config.yaml" in names and "method" in summary:
        return "pretrain"
    return None


def has_generic_files(folder: Path) -> bool:
    """Whether ``folder`` itself holds PNG, CSV or markdown files."""
    return any(p.is_file() and p.suffix.lower() in GENERIC_SUFFIXES for p in folder.iterdir())


def subfolders(folder: Path, skip: frozenset[str] | set[str] = frozenset()) -> list[Path]:
    """Sub-folders, sorted, without hidden and internal ones (:data:`INTERNAL_DIRS`) and ``skip``."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name not in INTERNAL_DIRS and p.name not in skip)


def find_runs(folder: Path, skip: frozenset[str] | set[str] = frozenset(), depth: int = 0
              ) -> list[tuple[Path, str]]:
    """``(folder, kind)`` of the runs below ``folder`` (not ``folder`` itself), outermost first.

    A recognised run is not searched further here (its own section looks inside it). An unrecognised folder
    with PNG/CSV/markdown files counts as kind ``folder``; one without is searched through, down to
    :data:`MAX_DEPTH` levels. ``skip`` names sub-folders of ``folder`` to leave out.
    """
    out: list[tuple[Path, str]] = []
    if depth >= MAX_DEPTH:
        return out
    for sub in subfolders(folder, skip):
        kind = detect_kind(sub)
        if kind is not None:
            out.append((sub, kind))
        elif has_generic_files(sub):
            out.append((sub, "folder"))
        else:
            out += find_runs(sub, depth=depth + 1)
    return out
