"""Exponential-moving-average teacher (mean teacher / MoCo key encoder / BYOL target).

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020; Grill et al.,
"Bootstrap Your Own Latent", NeurIPS 2020 (cosine momentum schedule). VoCo (Wu et al., CVPR 2024) and
nnssl use such a teacher for the position targets.

After every optimiser step, ``teacher = m * teacher + (1 - m) * student`` for each parameter; buffers
(e.g. BatchNorm running statistics) are copied. With the cosine schedule ``m`` rises from ``m0`` at step 0
to 1 at ``total_steps``: ``m(t) = 1 - (1 - m0) * (cos(pi * t / T) + 1) / 2``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn


class EMATeacher(nn.Module):
    """A momentum-updated, gradient-free copy of ``student``.

    Args:
        student: the module to follow (a backbone, a head, or an ``nn.ModuleDict`` of both).
        momentum: ``m0``; 0 copies the student at every update, 1 freezes the teacher.
        final_momentum: with ``total_steps``, the momentum reached by the cosine schedule (1 in BYOL);
            ``None`` keeps ``momentum`` constant.
        total_steps: length of the cosine schedule in updates.
        warmup: the mean teacher's rule (Tarvainen & Valpola, 2017, and UA-MT after it): update ``t`` (0-based)
            uses ``min(1 - 1 / (t + 1), momentum)``, so the first update copies the student and the teacher is the
            plain running mean of the student until the momentum is reached (``t = 1 / (1 - m) - 1``). Without it a
            short run keeps ``m^t`` of the initial weights in the teacher (``0.99^150 = 0.22`` after 150 steps).

    The teacher is a submodule (``self.module``), so it moves with ``.to()`` and its weights and the step
    counter are in ``state_dict()`` (tensors only: exact resume with ``torch.load(weights_only=True)``).
    Its parameters have ``requires_grad=False``; calling the teacher runs under ``torch.no_grad()``.
    """

    def __init__(
        self,
        student: nn.Module,
        momentum: float = 0.99,
        final_momentum: float | None = None,
        total_steps: int | None = None,
        warmup: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if warmup and final_momentum is not None:
            raise ValueError("warmup and a momentum schedule (final_momentum) are exclusive")
        if final_momentum is not None and (total_steps is None or total_steps < 1):
            raise ValueError("a momentum schedule (final_momentum) needs total_steps >= 1")
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.m0 = float(momentum)
        self.m1 = float(final_momentum) if final_momentum is not None else float(momentum)
        self.total_steps = int(total_steps) if total_steps else 0
        self.warmup = bool(warmup)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._step = 0  # host copy of ``step``: no device sync per update
        self.register_load_state_dict_post_hook(_sync_step)

    def momentum_at(self, step: int) -> float:
        """The momentum used by update number ``step`` (0-based)."""
        if self.warmup:
            return min(1.0 - 1.0 / (step + 1), self.m0)
        if self.total_steps == 0 or self.m1 == self.m0:
            return self.m0
        t = min(step, self.total_steps) / self.total_steps
        return self.m1 - (self.m1 - self.m0) * (math.cos(math.pi * t) + 1.0) / 2.0

    @property
    def momentum(self) -> float:
        """Momentum of the next update."""
        return self.momentum_at(self._step)

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """``teacher <- m * teacher + (1 - m) * student`` (parameters), buffers copied; returns ``m``.

        ``student`` must have the same parameter names and shapes as the teacher (the module it was
        built from); call after ``optimizer.step()``.
        """
        m = self.momentum
        t_params = dict(self.module.named_parameters())
        s_params = dict(student.named_parameters())
        if t_params.keys() != s_params.keys():
            missing = sorted(set(t_params) ^ set(s_params))[:5]
            raise ValueError(f"student and teacher parameters differ (e.g. {missing})")
        names = list(t_params)
        tp: list[Tensor] = [t_params[n] for n in names]
        sp: list[Tensor] = [s_params[n].detach() for n in names]
        if tp:
            # lerp(t, s, w) = t + w (s - t); exact at w = 0 (freeze) and w = 1 (copy)
            torch._foreach_lerp_(tp, sp, 1.0 - m)
        s_bufs = dict(student.named_buffers())
        for n, b in self.module.named_buffers():
            if n in s_bufs:
                b.copy_(s_bufs[n])
        self._step += 1
        self.step.fill_(self._step)
        return m

    def forward(self, *args, **kwargs):
        """Run the teacher without gradients (its outputs are targets)."""
        with torch.no_grad():
            return self.module(*args, **kwargs)


def _sync_step(module: nn.Module, incompatible_keys) -> None:
    if isinstance(module, EMATeacher):
        module._step = int(module.step)
