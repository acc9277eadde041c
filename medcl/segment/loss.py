"""Dice + cross-entropy with an ignore mask and soft (mixup) targets.

MONAI's ``DiceCELoss`` takes no voxel mask and ``DiceLoss(ignore_index=...)`` needs index targets, while
sparse annotations (nnU-Net's ignore label, Isensee et al., 2021) *and* mixup's soft targets (Chaitanya et
al., 2020) need both. :class:`MaskedDiceCELoss` therefore calls MONAI's ``DiceLoss`` (soft-label form) on
masked probabilities and computes the cross-entropy over the valid voxels only. With every voxel valid and
one-hot targets it equals ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, ...)`` with the same
options (tested), and an ignored voxel receives exactly zero gradient.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn


def one_hot_with_ignore(label: Tensor, num_classes: int, ignore_label: int | None) -> tuple[Tensor, Tensor]:
    """Integer labels ``[B, 1, *S]`` -> (one-hot float ``[B, K, *S]``, valid mask float ``[B, 1, *S]``).

    Ignored voxels (``label == ignore_label``) get an all-zero target row and a 0 in the mask.
    """
    if ignore_label is None:
        valid = torch.ones_like(label, dtype=torch.float32)
        idx = label
    else:
        keep = label != ignore_label
        valid = keep.float()
        idx = torch.where(keep, label, torch.zeros_like(label))
    target = F.one_hot(idx[:, 0].long(), num_classes).movedim(-1, 1).float() * valid
    return target, valid


class MaskedDiceCELoss(nn.Module):
    """``dice_weight * Dice + ce_weight * CE`` over the valid voxels.

    Args:
        include_background: include class 0 in the Dice term.
        batch_dice: one Dice per class over the whole batch (nnU-Net) instead of per sample.
        dice_weight, ce_weight: weights of the two terms.
        smooth: Dice smoothing (numerator and denominator), MONAI's default.

    Shapes:
        logits ``[B, K, *S]``; target ``[B, K, *S]`` float (one-hot or soft, rows sum to 1 on valid voxels);
        valid ``[B, 1, *S]`` float/bool (1 = the voxel counts) or ``None`` (all valid).

    Returns:
        ``(loss, dice_term, ce_term)``, scalar tensors (no host sync).
    """

    def __init__(self, include_background: bool = False, batch_dice: bool = True, dice_weight: float = 1.0,
                 ce_weight: float = 1.0, smooth: float = 1e-5) -> None:
        super().__init__()
        self.dice = DiceLoss(include_background=include_background, softmax=False, batch=batch_dice,
                             smooth_nr=smooth, smooth_dr=smooth, soft_label=True)
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        logits = logits.float()
        log_p = torch.log_softmax(logits, dim=1)
        probs = log_p.exp()
        ce_vox = -(target * log_p).sum(dim=1, keepdim=True)  # [B, 1, *S]
        if valid is None:
            ce = ce_vox.mean()
            dice = self.dice(probs, target)
        else:
            valid = valid.to(logits.dtype)
            ce = (ce_vox * valid).sum() / valid.sum().clamp_min(1.0)
            dice = self.dice(probs * valid, target * valid)
        return self.dice_weight * dice + self.ce_weight * ce, dice, ce


def mixup(image: Tensor, target: Tensor, valid: Tensor, rng: np.random.Generator, alpha: float
          ) -> tuple[Tensor, Tensor, Tensor]:
    """Mix each sample with another of the batch (a random permutation), one ``l ~ Beta(alpha, alpha)`` per
    sample (Zhang et al., 2018; used for fine-tuning by Chaitanya et al., 2020).

    Args:
        image ``[B, C, *S]``, target ``[B, K, *S]`` (one-hot/soft), valid ``[B, 1, *S]``;
        rng: NumPy generator of the draws (seeded per step by the caller, so they survive resume);
        alpha: Beta parameter (> 0).

    Returns:
        mixed image, mixed target, and the valid mask of voxels valid in *both* samples (a voxel ignored in
        either sample carries no target).
    """
    b = image.shape[0]
    perm = torch.as_tensor(rng.permutation(b), device=image.device)
    lam = torch.as_tensor(rng.beta(alpha, alpha, size=b), device=image.device)
    shape = (b,) + (1,) * (image.ndim - 1)
    lam_x = lam.view(shape).to(image.dtype)
    mixed = lam_x * image + (1 - lam_x) * image[perm]
    lam_t = lam.view(shape).to(target.dtype)
    both = valid * valid[perm]
    mixed_t = (lam_t * target + (1 - lam_t) * target[perm]) * both
    return mixed, mixed_t, both
