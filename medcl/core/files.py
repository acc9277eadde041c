"""The one way medcl writes a file: atomically.

Every output (checkpoints, NIfTI, CSV, JSON, YAML, h5, PNG) is staged in a temporary file *in the target's
folder*, flushed and fsynced, then renamed over the target with ``os.replace`` (atomic on POSIX within one
filesystem). A crash, a kill or a full disk therefore leaves either the old file or the new one under the
final name, never a truncated one; the temporary file is removed on failure.

* :func:`atomic_path` -- a context manager for writers that want a path (nibabel, h5py, matplotlib, PIL);
* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json` -- for data in memory;
* :func:`write_csv` -- the one CSV writer: a header from the rows' keys, ``NaN`` / ``None`` as empty cells.

Temporary names start with ``.`` and hold ``.tmp`` (:data:`TMP_GLOB`), so a folder listing skips them and a
resumed run can find and remove the leftovers of a SIGKILL.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medcl.core.errors import MedclDataError

__all__ = ["TMP_GLOB", "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "write_csv",
           "csv_cell"]

TMP_GLOB = ".*.tmp*"
"""Glob of the temporary files :func:`atomic_path` stages (left behind only by a kill)."""


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()
"""Permissions of a new file under this process's umask (what ``open(path, "w")`` would give)."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path`` atomically.

    Args:
        path: the final file.
        suffix: the end of the temporary name, for writers that infer the format from it (nibabel needs
            ``.nii.gz``, PIL ``.png``): the temporary file is ``.{name}.{random}.tmp{suffix}``.

    On an exception inside the block the temporary file is removed and the exception propagates (an
    :class:`OSError` -- a full disk, a read-only folder -- as a :class:`MedclDataError` naming ``path``); ``path``
    keeps its old content (or stays absent).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    except OSError as exc:
        raise MedclDataError(target, f"cannot write here ({_reason(exc)})") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError):  # a full disk, a read-only folder...: one line naming the file
            raise MedclDataError(target, f"cannot write ({_reason(exc)}); nothing was written there") from exc
        raise


def _reason(exc: OSError) -> str:
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}{f', {name}' if name else ''}"


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON atomically; values JSON does not know (paths, numpy scalars) become strings."""
    atomic_write_text(json.dumps(obj, indent=indent, default=str), path)


def csv_cell(value: Any) -> Any:
    """The cell written for ``value``: ``None`` and non-finite floats become empty cells."""
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV atomically and return the path.

    Args:
        path: the CSV file.
        rows: one mapping per row.
        columns: the header; default the keys of all rows in first-seen order. Keys of a row that are not in
            ``columns`` are dropped; missing keys are empty cells.

    ``None``, ``NaN`` and infinite values are written as empty cells (what :func:`csv.DictReader` gives back as
    ``""`` and pandas as ``NaN``).
    """
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            seen.update(dict.fromkeys(r))
        columns = list(seen)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: csv_cell(r.get(k)) for k in columns})
    atomic_write_text(buf.getvalue(), path)
    return Path(path)
