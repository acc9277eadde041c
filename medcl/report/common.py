"""Helpers every section builder uses: the run record, the config, plots, per-step metrics, leftover files.

They all append to a :class:`~medcl.report.blocks.Section` and turn unreadable files into listed problems
instead of exceptions, so a report of a broken or unfinished run still renders.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcl.report.blocks import Code, Facts, Figure, Markdown, Section, Table
from medcl.report.readers import (
    ReadError,
    better,
    csv_table,
    draw_curves,
    embedded_record,
    malformed_rows,
    read_json,
    read_png,
    read_series,
    read_text,
    short_number,
    summarise_series,
)


@dataclass
class Options:
    """How much the page shows.

    Attributes:
        max_rows: rows of a CSV table shown (the rest is counted in a note).
        max_run_figures: plots of the many small runs of a benchmark embedded (the rest counted).
    """

    max_rows: int = 200
    max_run_figures: int = 30


def guard(sec: Section, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``None`` with the reason added to ``sec.problems`` when a file cannot be used."""
    try:
        return fn()
    except ReadError as exc:
        sec.problems.append(f"could not use {what}: {exc}")
    except OSError as exc:
        sec.problems.append(f"could not read {what}: {exc.strerror or exc}")
    return None


def fmt_num(v: Any) -> str:
    """Numbers as :func:`~medcl.report.readers.short_number` shows them, everything else as text; ``None`` -> ``""``."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return short_number(v)
    return str(v)


def mtime_utc(paths: Iterable[Path]) -> str:
    """The latest modification time among ``paths`` (those that exist), ISO 8601 in UTC; ``""`` if none."""
    times = [p.stat().st_mtime for p in paths if p.exists()]
    if not times:
        return ""
    return _dt.datetime.fromtimestamp(max(times), _dt.timezone.utc).isoformat(timespec="seconds")


# ---- run record -----------------------------------------------------------------------------------------

def load_record(sec: Section, candidates: Sequence[str]) -> dict[str, Any] | None:
    """The run record: ``record.json`` if present, else the first of ``candidates`` (weights files) holding one."""
    rec = guard(sec, "record.json", lambda: read_json(sec.path / "record.json"))
    if isinstance(rec, dict) and rec.get("kind"):
        sec.shown.add("record.json")
        return rec
    for name in candidates:
        for p in sorted(sec.path.glob(name)):
            rec = guard(sec, p.name, lambda p=p: embedded_record(p))
            if rec is not None:
                return rec
    return None


_COUNTED = (("cases_seen", "cases seen in training"), ("probe_cases", "probe cases (held out)"),
            ("test_cases", "test cases"))


def add_run_facts(sec: Section, record: dict[str, Any] | None, extra: Sequence[tuple[str, Any]] = (),
                  written_by: Sequence[str] = ()) -> None:
    """The "run" table (kind, when, medcl version, data, case counts, ``extra``) and the environment table.

    Only the record's known fields are shown (case lists as counts): a record holds no patient fields, and
    nothing else of a record is dumped.
    """
    rows: list[tuple[str, str]] = [("kind", sec.label), ("folder", str(sec.path))]
    if record:
        record = {**(record.get("extra") or {}), **record}  # version-2 records keep job-specific keys in extra
        rows += [("created", str(record.get("created", ""))), ("medcl version", str(record.get("medcl_version", ""))),
                 ("record version", str(record.get("version", "")))]
        if "complete" in record:
            done = record.get("complete")
            rows.append(("complete", "yes" if done else "unknown (record version 1)" if done is None
                         else f"NO: stopped at step {record.get('step')}"))
            if done is False:
                sec.problems.append(f"the run is incomplete (record.json: complete false, step {record.get('step')})")
        if record.get("data"):
            rows.append(("data", str(record["data"])))
        for key, label in _COUNTED:
            if isinstance(record.get(key), list) and (record[key] or key == "cases_seen"):
                rows.append((label, str(len(record[key]))))
    else:
        when = mtime_utc(sec.path / n for n in written_by)
        if when:
            rows.append(("files written", when))
        if sec.kind != "folder":
            rows.append(("run record", "none in this folder (environment unknown)"))
    rows += [(k, fmt_num(v)) for k, v in extra if v is not None and v != ""]
    sec.blocks.append(Facts("Run", rows))
    env = (record or {}).get("environment")
    if isinstance(env, dict) and env:
        sec.blocks.append(Facts("Environment", [(str(k), str(v)) for k, v in env.items()]))


def add_config(sec: Section, name: str = "config.yaml", title: str = "Resolved config",
               fallback: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The config file as collapsible YAML (or ``fallback``, e.g. the record's config, dumped as YAML);
    returns it parsed (``{}`` if it does not parse)."""
    import yaml

    text = guard(sec, name, lambda: read_text(sec.path / name))
    if text is not None:
        title = f"{title} ({name})"
        sec.shown.add(name)
    elif fallback:
        text = yaml.safe_dump(fallback, sort_keys=False, default_flow_style=None)
        title = f"{title} (from the run record)"
    else:
        return None
    sec.blocks.append(Code(title, text))
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        sec.problems.append(f"{name} is not valid YAML")
        return {}
    return cfg if isinstance(cfg, dict) else {}


# ---- files ----------------------------------------------------------------------------------------------

def add_png(sec: Section, name: str, title: str | None = None, caption: str = "") -> bool:
    """Embed ``sec.path / name`` if it exists; True if it was embedded."""
    p = sec.path / name
    if not p.is_file() or name in sec.shown:
        return False
    sec.shown.add(name)
    fig = guard(sec, name, lambda: read_png(p, title, caption))
    if fig is not None:
        sec.blocks.append(fig)
    return fig is not None


def add_remaining_pngs(sec: Section) -> None:
    """Every PNG of the folder not shown yet (the run wrote it, so the reader should see it)."""
    for p in sorted(sec.path.glob("*.png")):
        add_png(sec, p.name)


def add_markdown(sec: Section, name: str, title: str | None = None) -> bool:
    text = guard(sec, name, lambda: read_text(sec.path / name))
    if text is None:
        return False
    sec.shown.add(name)
    sec.blocks.append(Markdown(title or name, text))
    return True


def add_csv(sec: Section, name: str, opts: Options, title: str | None = None, collapsed: bool = False,
            max_rows: int | None = None) -> Table | None:
    p = sec.path / name
    if not p.is_file():
        return None
    sec.shown.add(name)
    t = guard(sec, name, lambda: csv_table(p, title, max_rows or opts.max_rows, collapsed))
    if t is not None:
        sec.blocks.append(t)
    return t


def add_step_metrics(sec: Section, name: str, plot: str | None, plot_keys: Callable[[str], bool] | None = None,
                     title: str = "Training curves", direction: Callable[[str], str | None] = better
                     ) -> dict[str, list[tuple[float, float]]]:
    """Summarise the per-step metrics CSV ``name`` (first/last/min/max/best per metric, non-finite values as
    problems), then show the run's plot ``plot``, or curves drawn from the CSV when the run wrote none.
    ``direction(metric)`` says whether lower (``"min"``) or higher (``"max"``) values are better."""
    p = sec.path / name
    if not p.is_file():
        return {}
    sec.shown.add(name)
    bad = guard(sec, name, lambda: malformed_rows(p))
    if bad:
        sec.problems.append(bad)
    series = guard(sec, name, lambda: read_series(p)) or {}
    if series:
        table, problems = summarise_series(series, f"Per-step metrics ({name}, summarised)", direction)
        sec.blocks.append(table)
        sec.problems += problems
    if plot is None or not add_png(sec, plot, title):
        keys = [k for k in series if plot_keys is None or plot_keys(k)]
        fig = guard(sec, name, lambda: draw_curves(p, keys, f"{sec.title}: {title.lower()}")) if keys else None
        if isinstance(fig, Figure):
            sec.blocks.append(fig)
    return series


def flatten(d: Any, prefix: str = "", limit: int = 80) -> list[tuple[str, str]]:
    """Scalars of a nested JSON value as ``(dotted key, text)``; short lists of scalars joined, long ones
    counted; at most ``limit`` rows."""
    out: list[tuple[str, str]] = []

    def rec(v: Any, key: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(v, dict):
            for k, x in v.items():
                rec(x, f"{key}.{k}" if key else str(k))
        elif isinstance(v, list):
            if len(v) <= 10 and all(not isinstance(x, dict | list) for x in v):
                out.append((key, ", ".join(fmt_num(x) for x in v)))
            else:
                out.append((key, f"{len(v)} items"))
        else:
            out.append((key, fmt_num(v)))

    rec(d, prefix)
    return out
