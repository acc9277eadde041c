"""Checkpoints: written atomically, read safely.

Why not Lightning's own writer: ``lightning.fabric.utilities.cloud_io._atomic_save`` writes through an
fsspec transaction whose local implementation stages the bytes in the *system* temp directory and then
``shutil.move``\\s them; when ``/tmp`` and the run directory are on different filesystems that move is a copy,
and a SIGKILL during it leaves a truncated checkpoint under the final name. We stage next to the target,
through :mod:`medcl.core.files` (the one atomic writer of medcl).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medcl.core.errors import MedclDataError
from medcl.core.files import atomic_write_bytes

__all__ = ["atomic_write_bytes", "atomic_torch_save", "safe_torch_load", "AtomicCheckpointIO"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(buf.getvalue(), path)


def _numpy_scalar_types() -> list[Any]:
    """The globals a pickled NumPy scalar needs (``np.float64(0.9)`` in nnU-Net's training logs): the scalar
    constructor under its NumPy 2 and NumPy 1 names, ``np.dtype`` and its concrete classes. Arrays stay refused."""
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar  # type: ignore[attr-defined]
    found: list[Any] = [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    names = ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float16", "Float32",
             "Float64")
    found += [getattr(np.dtypes, f"{n}DType") for n in names if hasattr(getattr(np, "dtypes", None), f"{n}DType")]
    return found


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file; NumPy scalars are allowed (nnU-Net and
    nnssl checkpoints log them), nothing else beyond torch's own weights-only set."""
    p = Path(path)
    if not p.is_file():
        raise MedclDataError(p, "checkpoint file does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_types()):
            return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip and unpickler errors all mean the same to the user
        raise MedclDataError(p, f"cannot read checkpoint (corrupt, or not a weights-only checkpoint): {exc}") from exc


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O plugin: atomic same-folder writes, ``weights_only=True`` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return safe_torch_load(path, map_location=map_location if map_location is not None else "cpu")
