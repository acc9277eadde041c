"""The run-folder contract as a test helper: every job's ``--out`` holds a complete record, a config that validates
as the job's schema, and a summary (medcl.core.runfolder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def assert_run_folder(path: Path, kind: str, schema: Any = None, step: int | None = None) -> dict:
    """Assert the contract for the finished run in ``path``; returns its record."""
    from medcl.config import load_config

    record = json.loads((Path(path) / "record.json").read_text())
    assert record["kind"] == kind, record["kind"]
    assert record["complete"] is True, record
    assert isinstance(record["step"], int) and (step is None or record["step"] == step), record["step"]
    assert (Path(path) / "summary.json").is_file()
    assert (Path(path) / "config.yaml").is_file()
    if schema is not None:
        load_config(schema, Path(path) / "config.yaml")  # the saved config validates as the job's schema
    return record
