"""Sliding-window inference with Gaussian weighting and optional mirror test-time augmentation.

The volume is covered by overlapping windows of the training patch size (MONAI
``sliding_window_inference``); each window's class probabilities are weighted by a Gaussian centred on the
window (``mode="gaussian"``, as nnU-Net, Isensee et al., 2021, because predictions near a window's border see
less context) and averaged. With ``tta`` every window is also predicted flipped along each subset of
``mirror_axes`` (8 passes for 3 axes) and the flipped-back probabilities are averaged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from medcl.segment.config import InferenceConfig

LogitsFn = Callable[[Tensor], Tensor]


def logits_fn(model: nn.Module) -> LogitsFn:
    """``x [B, C, *S] -> logits [B, K, *S]`` for a :class:`medcl.models.Backbone` with a head (or any module
    returning logits or an object with ``.logits``)."""

    def fn(x: Tensor) -> Tensor:
        out = model(x)
        logits = getattr(out, "logits", out)
        if logits is None:
            raise ValueError("the model has no segmentation head (out_channels = 0): nothing to predict")
        return logits

    return fn


def mirror_flips(axes: list[int] | tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` as tensor dims of ``[B, C, X, Y, Z]`` (the empty subset first)."""
    dims = sorted({int(a) + 2 for a in axes})
    return [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]


def window_probabilities(fn: LogitsFn, tta: bool, mirror_axes: list[int]) -> Callable[[Tensor], Tensor]:
    """``x [B, C, *S] -> probabilities [B, K, *S]`` (softmax), averaged over mirror flips when ``tta``."""
    flips = mirror_flips(mirror_axes) if tta else [()]

    def predict(x: Tensor) -> Tensor:
        acc = None
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            p = torch.softmax(fn(xi).float(), dim=1)
            p = torch.flip(p, dims) if dims else p
            acc = p if acc is None else acc + p
        return acc / len(flips)

    return predict


@torch.no_grad()
def predict_probabilities(
    fn: LogitsFn,
    image: Tensor,
    cfg: InferenceConfig,
    roi_size: tuple[int, int, int],
    device: torch.device | str = "cpu",
) -> Tensor:
    """Class probabilities of one preprocessed volume.

    Args:
        fn: ``x [B, C, *P] -> logits [B, K, *P]`` (see :func:`logits_fn`), on ``device``.
        image: ``[C, X, Y, Z]`` preprocessed image (CPU or ``device``).
        cfg: overlap, blending mode, window batch, TTA.
        roi_size: the window ``P`` (multiples of the network's total stride); smaller volumes are padded.
        device: where the windows are computed.

    Returns:
        ``[K, X, Y, Z]`` float32 probabilities on the CPU (they sum to 1 over K).
    """
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    x = x[None].float()
    predictor = window_probabilities(fn, cfg.tta, list(cfg.mirror_axes))
    probs = sliding_window_inference(x, roi_size=list(roi_size), sw_batch_size=cfg.sw_batch_size,
                                     predictor=predictor, overlap=cfg.overlap, mode=cfg.mode,
                                     sw_device=torch.device(device), device=torch.device("cpu"))
    probs = probs.as_tensor() if hasattr(probs, "as_tensor") else probs
    probs = probs[0].float()
    # Gaussian blending of probabilities keeps the simplex up to rounding; renormalise for exactness
    return probs / probs.sum(dim=0, keepdim=True).clamp_min(1e-12)
