"""Seeding and per-sample seeds.

Exact resume needs the data stream to be a pure function of (seed, epoch, index): each sample draws its
random numbers from a generator seeded by :func:`sample_seed`, so a resumed run replays the same views no
matter how many workers there are or where it was killed.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from medcl.core.device import cuda_available


def sample_seed(seed: int, epoch: int, index: int, salt: str = "") -> int:
    """A 63-bit seed derived from ``(seed, epoch, index, salt)`` (stable across processes and runs)."""
    h = hashlib.blake2b(f"{seed}:{epoch}:{index}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generator_for(seed: int, epoch: int, index: int, salt: str = "", device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`sample_seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(sample_seed(seed, epoch, index, salt))
    return g


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, torch.Tensor]:
    """The global RNG states as tensors only (so ``torch.load(weights_only=True)`` accepts them)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_version": torch.tensor(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": torch.tensor(float("nan") if py_state[2] is None else py_state[2], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor(np_state[2]),
        "numpy_has_gauss": torch.tensor(np_state[3]),
        "numpy_gauss": torch.tensor(np_state[4], dtype=torch.float64),
    }
    if cuda_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    gauss = float(state["python_gauss"])
    random.setstate(
        (int(state["python_version"]), tuple(int(x) for x in state["python_state"].tolist()), None if gauss != gauss else gauss)
    )
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            int(state["numpy_pos"]),
            int(state["numpy_has_gauss"]),
            float(state["numpy_gauss"]),
        )
    )
    if "cuda" in state and cuda_available():
        torch.cuda.set_rng_state_all(list(state["cuda"].cpu()))
