"""Stop training when the training loss has converged: the one rule behind "converged" in medcl.

A run is *converged* at step ``t`` (checked every ``check_every`` steps once ``t >= min_steps``) when the mean
loss over the last ``tail`` fraction of the steps so far improves on the mean over the ``tail`` fraction before
it by less than ``tolerance`` (relative)::

    W1 = steps ((1 - 2 tail) t, (1 - tail) t],   W2 = steps ((1 - tail) t, t]
    converged  <=>  mean(W1) - mean(W2) < tolerance * |mean(W1)|

With ``tail = 0.2`` and ``tolerance = 0.01``: the window means improved by less than 1% over the last fifth.
``trainer.max_steps`` is the cap; the step at which the run stopped is recorded. The per-step losses stay on the
device (no host sync per step); they are read once per check and saved in checkpoints, so a resumed run decides
exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

__all__ = ["ConvergenceStop", "converged"]


def converged(losses: torch.Tensor, tail: float = 0.2, tolerance: float = 0.01) -> bool:
    """Whether the per-step ``losses`` ``[t]`` meet the rule of the module docstring."""
    t = losses.numel()
    w = int(round(tail * t))
    if w < 1 or 2 * w > t:
        return False
    w2 = losses[t - w:].double().mean()
    w1 = losses[t - 2 * w: t - w].double().mean()
    return bool(w1 - w2 < tolerance * w1.abs())


class ConvergenceStop(L.Callback):
    """Lightning callback applying :func:`converged` to the training loss (``outputs["loss"]`` of each step).

    Attributes:
        stopped_at: the step at which training stopped because it converged (``None`` while running, or when
            the cap was reached first).
    """

    def __init__(self, min_steps: int = 1000, tail: float = 0.2, tolerance: float = 0.01, check_every: int = 50):
        if not 0 < tail <= 0.5:
            raise ValueError(f"tail must be in (0, 0.5], got {tail}")
        self.min_steps, self.tail, self.tolerance, self.check_every = min_steps, tail, tolerance, max(1, check_every)
        self._losses: list[torch.Tensor] = []
        self.stopped_at: int | None = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._losses.append(loss.detach().float().reshape(()))
        step = trainer.global_step
        if step >= self.min_steps and step % self.check_every == 0 and self.stopped_at is None:
            if converged(torch.stack(self._losses), self.tail, self.tolerance):
                self.stopped_at = step
                trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        losses = torch.stack(self._losses).cpu() if self._losses else torch.zeros(0)
        return {"losses": losses, "stopped_at": -1 if self.stopped_at is None else self.stopped_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._losses = list(state_dict["losses"].unbind(0)) if state_dict["losses"].numel() else []
        stopped = int(state_dict.get("stopped_at", -1))
        self.stopped_at = None if stopped < 0 else stopped
