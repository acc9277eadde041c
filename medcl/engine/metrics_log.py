"""The training curves of a run: ``metrics.csv`` (one row per logged step), merged over resumes.

Lightning's CSV logger writes ``logs/metrics.csv`` and a resumed run ``logs/resume-K/metrics.csv`` (the logger
would delete an existing file); :func:`merge_metrics` joins them into the run folder's ``metrics.csv``, the one
file of training curves the run-folder contract names (:mod:`medcl.core.runfolder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medcl.core.files import write_csv
from medcl.engine.plots import read_metrics_csv

__all__ = ["merge_metrics"]


def merge_metrics(out: Path, active: Any = None) -> Path | None:
    """Merge ``logs/metrics.csv`` and ``logs/resume-*/metrics.csv`` into ``out/metrics.csv``.

    Later files win for a step they share (a killed run may have logged steps after its last checkpoint;
    the resumed run logs them again). ``active(term, step)``, when given, drops ``train/{term}*`` values
    at steps where the term was not active: the run is one long Lightning epoch, and Lightning re-emits the
    last value of a key that was not logged in a step.
    """
    files = [out / "logs" / "metrics.csv"] + sorted((out / "logs").glob("resume-*/metrics.csv"), key=lambda p: int(p.parent.name.split("-")[1]))
    rows: dict[int, dict[str, float]] = {}
    for f in files:
        if not f.is_file():
            continue
        series = read_metrics_csv(f)
        steps_here = {int(s) for v in series.values() for s, _ in v}
        for step in steps_here:
            rows.pop(step, None)
        for key, pts in series.items():
            term = key[len("train/"):] if key.startswith("train/") else None
            for s, v in pts:
                if active is not None and term is not None and not active(term, int(s)):
                    continue
                rows.setdefault(int(s), {})[key] = v
    if not rows:
        return None
    keys = sorted({k for r in rows.values() for k in r})
    return write_csv(out / "metrics.csv", [{"step": step, **rows[step]} for step in sorted(rows)], ["step", *keys])
