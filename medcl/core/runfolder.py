"""The run-folder contract: what every job writes, so that any run folder can be judged and reported.

Every job (``pretrain``, ``finetune``, ``label-efficiency``, ``mil`` (train), ``wsi-tiles``, ``wsi-features``,
``mil-encoder``, ``demo``) writes into its ``--out`` folder:

``record.json``
    the run record (:class:`medcl.core.record.RunRecord`): ``kind``, ``complete`` and ``step`` among its keys.
    Written when the run starts with ``complete: false`` and rewritten with ``complete: true`` only after the
    final artefact (model, features, tables) is written; an interrupted run keeps ``complete: false``.
``config.yaml``
    the resolved config; it validates as the job's schema (reload it with the job's config class).
``summary.json``
    the job's figures (steps, times, metrics); written just before the record is marked complete.

Training curves are in ``metrics.csv`` only (one row per logged step); fine-tuning's per-case test metrics are in
``test_metrics.csv``. Each checkpoint's run record carries the same ``complete`` / ``step``, so a path straight to
a checkpoint can be judged too (:func:`medcl.segment.init.accept_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medcl.core.errors import MedclDataError
from medcl.core.files import atomic_write_json
from medcl.core.record import RunRecord

__all__ = ["RECORD_FILE", "SUMMARY_FILE", "CONFIG_FILE", "TEST_METRICS", "RunFolder", "read_record", "run_is_complete",
           "test_metrics_path", "prepare_run_folder", "config_differences"]

RECORD_FILE = "record.json"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
TEST_METRICS = "test_metrics.csv"


def test_metrics_path(run_dir: str | os.PathLike) -> Path:
    """The per-case test metrics of a fine-tuning run: ``test_metrics.csv``, or ``metrics.csv`` in a folder written
    by medcl before the run-folder contract (where ``metrics.csv`` held them)."""
    run_dir = Path(run_dir)
    new = run_dir / TEST_METRICS
    if new.is_file():
        return new
    old = run_dir / "metrics.csv"
    if old.is_file():
        with open(old) as f:
            if f.readline().startswith("case,"):
                return old
    return new


def run_is_complete(folder: str | os.PathLike) -> bool:
    """Whether the run in ``folder`` finished: its record says ``complete: true``; a folder of an older medcl
    (no record, or a version-1 record) counts as finished when it holds ``summary.json``."""
    folder = Path(folder)
    rec = read_record(folder)
    if rec is None or rec.get("complete") is None:
        return (folder / SUMMARY_FILE).is_file()
    return bool(rec["complete"])


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def prepare_run_folder(out: str | os.PathLike, kind: str, *, resume: bool = False, overwrite: bool = False,
                       inputs: Sequence[str | os.PathLike] = (), rerun_resumes: bool = False) -> Path:
    """Check ``--out`` before a job writes anything: two runs never mix, and outputs never replace inputs.

    * ``out`` may not be an input or hold one (``inputs``: the job's data paths; compared after resolving links);
    * a non-empty ``out`` is refused unless ``resume`` (continue the run there), ``overwrite`` (empty it first), or
      ``rerun_resumes`` and it holds a run of the same ``kind`` (jobs that resume by rerunning: the benchmark, the
      demo, tiling and extraction, which skip what is done).

    Raises:
        MedclConfigError: naming ``--out`` and what to pass instead.
        MedclDataError: ``out`` is a file, or cannot be created.
    """
    from medcl.core.errors import MedclConfigError

    out = Path(out)
    for src in map(Path, inputs):
        if not (src.exists() and out.exists()):
            continue
        if out.resolve() == src.resolve():
            raise MedclConfigError("--out", f"{out} is the input {src}; choose another --out")
        if _inside(src, out):
            raise MedclConfigError("--out", f"{out} holds the input {src}: outputs could replace inputs; choose "
                                            "another --out")
    if out.exists() and not out.is_dir():
        raise MedclDataError(out, "--out is a file; it must be a folder (new or a run folder)")
    busy = out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())
    if busy and not resume:
        rec = read_record(out) if (out / RECORD_FILE).is_file() else None
        same_kind = rec is not None and rec.get("kind") == kind
        if overwrite:
            for child in out.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif not (rerun_resumes and same_kind):
            what = f"a {rec['kind']} run" if rec is not None else "files"
            raise MedclConfigError("--out", f"{out} already holds {what}; pass --resume to continue it, --overwrite to "
                                            "empty it and start again, or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedclDataError(out, f"cannot create the run folder: {exc.strerror or exc}") from exc
    return out


def config_differences(saved: str | os.PathLike, new: dict[str, Any], free: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between the saved ``config.yaml`` and ``new`` (a resolved config dict),
    ignoring ``free`` keys (those a resumed run may change: workers, logging, device, threads, ...)."""
    from medcl.config import read_yaml

    return [k for k in _flat_diff(read_yaml(saved), new) if k not in set(free)]


def _flat_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _flat_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        a, b = list(a), list(b)
    return [] if a == b else [prefix]


def read_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``folder/record.json`` as a plain dict (``None`` when absent); a malformed file is an error naming it."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise MedclDataError(path, f"not a readable run record: {exc}") from exc
    return RunRecord.from_dict(d, str(path)).to_dict()


class RunFolder:
    """One run's folder: :meth:`begin` when the run starts, :meth:`finish` after its final artefact.

    Args:
        out: the run folder (created).
        record: the run record (a :class:`RunRecord` or its dict); ``complete`` is set to ``False`` here.
    """

    def __init__(self, out: str | os.PathLike, record: RunRecord | dict[str, Any]) -> None:
        self.out = Path(out)
        self.record = record.to_dict() if isinstance(record, RunRecord) else dict(record)
        self.record["complete"] = False

    def begin(self, config: Any = None, step: int = 0) -> dict[str, Any]:
        """Create the folder, write ``config.yaml`` (a config dataclass, when given) and ``record.json``
        (``complete: false``); returns the record."""
        from medcl.config import save_config

        self.out.mkdir(parents=True, exist_ok=True)
        if config is not None:
            save_config(config, self.out / CONFIG_FILE)
        self.record["step"] = int(step)
        atomic_write_json(self.record, self.out / RECORD_FILE)
        return self.record

    def stopped_at(self, step: int) -> None:
        """Record how far an interrupted run got (``complete`` stays ``false``)."""
        self.record["step"] = int(step)
        atomic_write_json(self.record, self.out / RECORD_FILE)

    def finish(self, summary: dict[str, Any] | None = None, step: int | None = None) -> dict[str, Any]:
        """Write ``summary.json`` (when given), then ``record.json`` with ``complete: true``; returns the record."""
        if summary is not None:
            atomic_write_json(summary, self.out / SUMMARY_FILE)
        if step is not None:
            self.record["step"] = int(step)
        self.record["complete"] = True
        atomic_write_json(self.record, self.out / RECORD_FILE)
        return self.record
