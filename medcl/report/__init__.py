"""``medcl report RUN_DIR``: one self-contained HTML page for any medcl run folder.

The page says what the run is (kind, when, medcl version, environment, from the run record), shows the
resolved config (collapsible YAML), the metrics tables (CSV and markdown as HTML tables; per-step metrics
summarised as first/last/min/max/best, with the run's loss plot or curves drawn from its CSV), every PNG the
run wrote (embedded as ``data:`` URIs, so the file can be mailed), and the problems it noticed (non-finite
losses, a leakage override, unfinished runs, collapse signs, undefined metrics...). Run folders inside the
folder (a demo's pretraining and fine-tuning runs, a benchmark's pretraining runs) get a section each.

Example::

    from medcl.report import write_report
    write_report("runs/pretrain_gd")            # -> runs/pretrain_gd/report.html

Layout: :mod:`~medcl.report.detect` (run kinds from marker files), :mod:`~medcl.report.sections` and
:mod:`~medcl.report.sections_mil` (what each kind contributes), :mod:`~medcl.report.html` (page assembly).
"""

from __future__ import annotations

import os
from pathlib import Path

from medcl.core.errors import MedclDataError
from medcl.core.files import atomic_write_text
from medcl.report.blocks import Section
from medcl.report.common import Options
from medcl.report.detect import detect_kind, find_runs, has_generic_files

__all__ = ["Options", "Section", "detect_kind", "scan_run", "render_report", "write_report", "save_page",
           "default_output"]

REPORT_NAME = "report.html"


def scan_run(run_dir: str | os.PathLike, options: Options | None = None) -> Section:
    """The :class:`Section` tree of ``run_dir``.

    Raises:
        MedclDataError: ``run_dir`` does not exist, is not a folder, or holds nothing medcl recognises
            (no run of a known kind, and no PNG, CSV or markdown file in it or in its sub-folders).
    """
    from medcl.report.sections import build_section

    root = Path(run_dir).expanduser().resolve()
    if not root.exists():
        raise MedclDataError(run_dir, "no such folder")
    if not root.is_dir():
        raise MedclDataError(run_dir, "not a folder: medcl report takes a run folder (the --out of a medcl command)")
    kind = detect_kind(root)
    if kind is None:
        if not has_generic_files(root) and not find_runs(root):
            raise MedclDataError(run_dir, "nothing medcl recognises here: no run record, config, summary or "
                                          "results of a medcl run, and no PNG, CSV or markdown file (is it the "
                                          "--out folder of a medcl command?)")
        kind = "folder"
    return build_section(root, root, kind, options or Options())


def render_report(run_dir: str | os.PathLike, options: Options | None = None) -> str:
    """The HTML page of ``run_dir`` (see the module docstring)."""
    from medcl import __version__
    from medcl.report.html import render_page

    return render_page(scan_run(run_dir, options), __version__)


def default_output(run_dir: str | os.PathLike) -> Path:
    """Where the page goes without ``--out``: ``run_dir/report.html``."""
    return Path(run_dir) / REPORT_NAME


def save_page(page: str, target: str | os.PathLike) -> Path:
    """Write ``page`` to ``target`` atomically (temporary file in the same folder, then rename)."""
    target = Path(target)
    if target.is_dir():
        raise MedclDataError(target, "is a folder; --out takes the HTML file to write")
    try:
        atomic_write_text(page, target)
    except OSError as exc:
        raise MedclDataError(target, f"cannot write the report: {exc.strerror or exc} (choose another file with "
                                     "--out)") from exc
    return target


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 options: Options | None = None) -> Path:
    """Write the page of ``run_dir`` to ``out`` (default ``run_dir/report.html``); returns its path."""
    return save_page(render_report(run_dir, options), out if out is not None else default_output(run_dir))
