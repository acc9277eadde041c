"""``medcl report RUN_DIR [--out FILE]``: one self-contained HTML page for a run folder.

Works on the ``--out`` folder of ``medcl pretrain``, ``finetune``, ``benchmark label-efficiency``,
``mil train``, ``mil tile``, ``mil pretrain-encoder`` and ``demo``, and on any folder holding such runs
(each gets a section); unknown folders show their PNG, CSV and markdown files as they are.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="one self-contained HTML page (config, metrics, plots, problems) for a run folder",
        description="Write one HTML page for a medcl run folder: what the run is (kind, date, medcl version, "
        "environment), the resolved config, metrics tables, loss curves, every PNG the run wrote (embedded, so "
        "the file can be mailed) and the problems noticed (non-finite losses, leakage overrides, unfinished "
        "runs...). Run folders inside RUN_DIR get a section each.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (the --out of a medcl command)")
    p.add_argument("--out", default=None, metavar="FILE", help="HTML file to write (default RUN_DIR/report.html)")
    p.add_argument("--max-rows", type=int, default=200, metavar="N",
                   help="rows of a CSV table shown (the rest are counted; default 200)")
    p.add_argument("--max-run-plots", type=int, default=30, metavar="N",
                   help="loss plots of a benchmark's fine-tuning runs embedded (default 30)")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from medcl import __version__
    from medcl.core.errors import MedclConfigError
    from medcl.report import Options, default_output, save_page, scan_run
    from medcl.report.html import count_images, render_page

    if args.max_rows < 1:
        raise MedclConfigError("--max-rows", f"must be >= 1, got {args.max_rows}")
    if args.max_run_plots < 0:
        raise MedclConfigError("--max-run-plots", f"must be >= 0, got {args.max_run_plots}")
    root = scan_run(args.run_dir, Options(max_rows=args.max_rows, max_run_figures=args.max_run_plots))
    target = save_page(render_page(root, __version__), args.out or default_output(args.run_dir))
    sections = root.walk()
    problems = sum(len(s.problems) for s in sections)
    print(f"medcl report: wrote {target} ({len(sections)} run folder(s), {count_images(root)} image(s), "
          f"{problems} problem(s) noticed, {target.stat().st_size / 2**20:.2f} MB)")
    return 0
