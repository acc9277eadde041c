"""The one device rule of medcl, and CPU-thread scoping.

Every job takes ``--device auto | cpu | cuda | cuda:N`` (``gpu`` is accepted as ``cuda``): ``auto`` is the
first GPU when torch sees one, else the CPU; asking for CUDA on a machine without it is a config error, never a
silent fall-back to the CPU. :func:`resolve_device` gives the ``torch.device`` for plain PyTorch loops,
:func:`lightning_accelerator` the name Lightning's ``Trainer`` takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from medcl.core.errors import MedclConfigError

__all__ = ["cuda_available", "resolve_device", "lightning_accelerator", "torch_threads"]


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (the only place medcl asks)."""
    return torch.cuda.is_available()


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``gpu``, ``cuda:1`` ... -> ``torch.device``.

    Raises:
        MedclConfigError: an unknown name, or CUDA asked for where torch sees no GPU.
    """
    if isinstance(spec, torch.device):
        return spec
    name = str(spec or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if name == "gpu":
        name = "cuda"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not cuda_available():
            raise MedclConfigError("device", f"{spec!r} was requested but torch sees no GPU")
        try:
            return torch.device(name)
        except RuntimeError as exc:
            raise MedclConfigError("device", f"not a device: {spec!r}") from exc
    raise MedclConfigError("device", f"expected auto, cpu, cuda or cuda:N, got {spec!r}")


def lightning_accelerator(spec: str | None) -> str:
    """The Lightning accelerator (``"gpu"`` or ``"cpu"``) for a device name (see :func:`resolve_device`)."""
    return "gpu" if resolve_device(spec).type == "cuda" else "cpu"


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous count (``None`` or 0: leave it).

    Raises:
        MedclConfigError: ``n`` is negative.
    """
    if n is not None and n < 0:
        raise MedclConfigError("threads", f"must be >= 0 (0: torch's default), got {n}")
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
