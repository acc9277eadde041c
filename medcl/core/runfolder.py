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
from pathlib import Path
from typing import Any

from medcl.core.errors import MedclDataError
from medcl.core.files import atomic_write_json
from medcl.core.record import RunRecord

__all__ = ["RECORD_FILE", "SUMMARY_FILE", "CONFIG_FILE", "TEST_METRICS", "RunFolder", "read_record", "run_is_complete",
           "test_metrics_path"]

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

    def finish(self, summary: dict[str, Any] | None = None, step: int | None = None) -> dict[str, Any]:
        """Write ``summary.json`` (when given), then ``record.json`` with ``complete: true``; returns the record."""
        if summary is not None:
            atomic_write_json(summary, self.out / SUMMARY_FILE)
        if step is not None:
            self.record["step"] = int(step)
        self.record["complete"] = True
        atomic_write_json(self.record, self.out / RECORD_FILE)
        return self.record
