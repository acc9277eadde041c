"""First-layer adaptation: reuse pretrained input weights when the channel count changes.

A network pretrained on ``C_s`` channels (e.g. one MRI contrast) is fine-tuned on ``C_t`` channels (e.g.
T1 + T2). Only the weights that read the raw image change shape (``[O, C, k, k, k]``); for them:

* ``"mean"`` (default): every new input channel gets the *average* pretrained filter scaled by
  ``C_s / C_t``, i.e. ``W_t[:, j] = sum_c W_s[:, c] / C_t``. Invariant: if all ``C_t`` input channels hold
  the same image ``x``, the layer's output equals the pretrained layer's output on ``C_s`` copies of ``x``
  (for ``C_s = 1``: on ``x``), so the activation magnitude the rest of the network was trained on is kept.
* ``"repeat"``: the pretrained filters are cycled over the new channels and scaled by ``C_s / C_t``,
  ``W_t[:, j] = W_s[:, j mod C_s] * C_s / C_t`` (as timm's ``adapt_input_conv``). When ``C_t`` is a multiple
  of ``C_s`` and new channel ``j`` carries the old channel ``j mod C_s``, the output is unchanged; it keeps
  per-channel filters distinct (useful e.g. 2 -> 4 channels). For ``C_s = 1`` both rules coincide.

Biases read no input channel and are loaded as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

AdaptRule = Literal["mean", "repeat"]


def can_adapt(source_shape: Sequence[int], target_shape: Sequence[int]) -> bool:
    """Whether the two weight shapes differ only in the input-channel axis (dim 1)."""
    s, t = tuple(source_shape), tuple(target_shape)
    return len(s) == len(t) >= 2 and s[0] == t[0] and s[2:] == t[2:] and s[1] != t[1]


def adapt_first_layer(weight: Tensor, in_channels: int, rule: AdaptRule = "mean") -> Tensor:
    """Pretrained input weight ``[O, C_s, *k]`` -> ``[O, in_channels, *k]`` (see the module doc for the rules).

    Args:
        weight: the pretrained weight; dim 1 indexes input channels.
        in_channels: ``C_t``, the channels of the new model.
        rule: ``"mean"`` or ``"repeat"``.
    """
    if weight.ndim < 2:
        raise ValueError(f"expected a weight [O, C, ...], got shape {tuple(weight.shape)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    c_s = weight.shape[1]
    if in_channels == c_s:
        return weight.clone()
    if rule == "mean":
        total = weight.sum(dim=1, keepdim=True) / in_channels
        return total.expand(-1, in_channels, *weight.shape[2:]).contiguous()
    if rule == "repeat":
        idx = torch.arange(in_channels, device=weight.device) % c_s
        return weight[:, idx] * (c_s / in_channels)
    raise ValueError(f"unknown adaptation rule {rule!r}; choose mean or repeat")
