"""VoCo: position prediction from similarity to base crops (Wu, Zhuang and Chen, CVPR 2024).

"VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for 3D Medical Image Analysis".
A volume is tiled by ``Nb`` base crops; a random crop's target is the fraction of its volume inside each
base crop (:func:`voco_overlap_targets`, computed from the crops' affines, so any grid ``n x n x k`` and
any crop size work). The model predicts those fractions from the cosine similarity of the random crop's
embedding to the base crops' embeddings, while a regulariser keeps the base crops dissimilar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

VoCoForm = Literal["paper", "code"]


def _shape_tensor(shape: Sequence[int] | torch.Tensor, n: int, name: str) -> torch.Tensor:
    s = torch.as_tensor(shape, dtype=torch.float64)
    if s.ndim == 1:
        s = s.expand(n, 3) if s.shape[0] == 3 else s
    if s.shape[-1] != 3 or s.ndim != 2 or s.shape[0] != n:
        raise ValueError(f"{name} must be (D, H, W) or [{n}, 3], got shape {tuple(s.shape)}")
    if bool((s <= 0).any()):
        raise ValueError(f"{name} must be positive, got {s.tolist()}")
    return s


def _axis_aligned(m: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """``[...]`` bool: the 3x3 part of ``m`` has exactly one non-zero entry per row and column."""
    nz = m[..., :3, :3].abs() > tol * m[..., :3, :3].abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-300)
    return (nz.sum(-1) == 1).all(-1) & (nz.sum(-2) == 1).all(-1)


def voco_overlap_targets(
    rand_affine: torch.Tensor,
    rand_shape: Sequence[int] | torch.Tensor,
    base_affine: torch.Tensor,
    base_shape: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """Fraction of each random crop's volume that lies inside each base crop.

    A crop with spatial shape ``(D, H, W)`` covers the voxel box ``[-0.5, D - 0.5] x ...`` (voxel centres
    at integer indices). The random crop's box is mapped into each base crop's voxel frame with
    ``inv(A_base) @ A_rand`` and intersected with the base box; the fraction is the intersection volume over
    the random crop's volume (the VoCo target of Wu et al., 2024, generalised from their 2D x-y grid to
    3D crops with any affine). Exact when the crops are axis-aligned relative to each other (crops,
    flips, 90-degree rotations and scaling of one source volume; the source may be oblique).

    Args:
        rand_affine: ``[Nr, 4, 4]`` float64 random crop voxel -> source mm.
        rand_shape: ``(D, H, W)`` shared by all random crops, or ``[Nr, 3]``.
        base_affine: ``[Nb, 4, 4]`` float64 base crop voxel -> source mm.
        base_shape: ``(D, H, W)`` shared by all base crops, or ``[Nb, 3]``.

    Returns:
        ``[Nr, Nb]`` float64 in ``[0, 1]``.

    Raises:
        ValueError: bad shapes, or crops rotated by a non-right angle relative to each other.
    """
    for name, a in (("rand_affine", rand_affine), ("base_affine", base_affine)):
        if a.ndim != 3 or tuple(a.shape[1:]) != (4, 4):
            raise ValueError(f"{name} must be [N, 4, 4], got {tuple(a.shape)}")
    ra = rand_affine.to(torch.float64)
    ba = base_affine.to(device=ra.device, dtype=torch.float64)
    rs = _shape_tensor(rand_shape, ra.shape[0], "rand_shape").to(ra.device)  # [Nr, 3]
    bs = _shape_tensor(base_shape, ba.shape[0], "base_shape").to(ra.device)  # [Nb, 3]
    m = torch.linalg.inv(ba)[None, :] @ ra[:, None]  # [Nr, Nb, 4, 4] rand voxel -> base voxel
    if not bool(_axis_aligned(m).all()):
        raise ValueError(
            "voco_overlap_targets needs crops that are axis-aligned relative to each other "
            "(crops, flips, 90-degree rotations, scaling); got a non-right-angle rotation"
        )
    lo = torch.full_like(rs, -0.5)
    hi = rs - 0.5
    corners = torch.stack(torch.meshgrid(*([torch.tensor([0, 1], device=ra.device)] * 3), indexing="ij"), -1)
    corners = corners.reshape(8, 3).to(torch.float64)  # [8, 3]
    pts = lo[:, None] + corners[None] * (hi - lo)[:, None]  # [Nr, 8, 3]
    pts_h = torch.cat([pts, torch.ones_like(pts[..., :1])], -1)  # [Nr, 8, 4]
    mapped = torch.einsum("rbij,rcj->rbci", m, pts_h)[..., :3]  # [Nr, Nb, 8, 3]
    rlo, rhi = mapped.amin(2), mapped.amax(2)  # [Nr, Nb, 3] random box in base voxels
    blo = torch.full_like(bs, -0.5)[None]
    bhi = (bs - 0.5)[None]
    inter = (torch.minimum(rhi, bhi) - torch.maximum(rlo, blo)).clamp_min(0).prod(-1)
    vol = (rhi - rlo).prod(-1)
    return (inter / vol).clamp(0.0, 1.0)


class VoCoResult(NamedTuple):
    """What :func:`voco_loss` returns: ``loss = pred_pos + pred_neg + reg_weight * reg`` (``code``) or
    ``loss = pred + reg_weight * reg`` (``paper``, where ``pred_neg`` is 0 and ``pred_pos`` is the whole
    prediction term); all scalars."""

    loss: torch.Tensor
    pred_pos: torch.Tensor
    pred_neg: torch.Tensor
    reg: torch.Tensor
    logits: torch.Tensor  # [B, Nr, Nb] the predicted overlaps (detached)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B, Na, D] x [B, Nb, D] -> [B, Na, Nb]`` cosine similarity."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)


def voco_loss(
    rand_emb: torch.Tensor,
    base_emb: torch.Tensor,
    targets: torch.Tensor,
    *,
    form: VoCoForm = "code",
    teacher_rand_emb: torch.Tensor | None = None,
    teacher_base_emb: torch.Tensor | None = None,
    reg_weight: float = 1.0,
    eps: float = 1e-6,
) -> VoCoResult:
    """VoCo position-prediction loss plus the base-crop regulariser (Wu et al., CVPR 2024).

    Two forms, selected by ``form``:

    * ``"paper"`` (the CVPR paper's equations): logits ``l_ij = CosSim(p_i, q_j)`` of random crop ``i``
      against base crop ``j``, clamped to ``[0, 1]`` so the log below is defined; prediction loss
      ``-mean_ij log(1 - |y_ij - l_ij|)`` over every (random, base) pair; regulariser
      ``mean_{j<k} |CosSim(q_j, q_k)|`` (base crops pushed towards orthogonality). No teacher.
    * ``"code"`` (the released code, github.com/Luffy03/VoCo, ``models/voco_head.py``): logits
      ``ReLU(CosSim)``; with a teacher (an EMA copy, e.g. :class:`medcl.models.EMATeacher`), the logits
      are the mean of student-random vs teacher-base and teacher-random vs student-base; the prediction
      is split into a positive term ``sum_ij y_ij * -log(1 - |y_ij - l_ij| + eps) / sum_ij y_ij`` and a
      negative term ``mean_{ij: y_ij = 0} l_ij^2``; the regulariser is
      ``mean_{j<k} ReLU(CosSim(q_j, sg(q_k)))^2`` on the student's base crops (``sg``: stop-gradient).

    Terms are computed per volume and averaged over the ``B`` volumes (as the released code does).

    Args:
        rand_emb: ``[B, Nr, D]`` student embeddings of ``Nr`` random crops per volume.
        base_emb: ``[B, Nb, D]`` student embeddings of the ``Nb`` base crops of the same volume.
        targets: ``[B, Nr, Nb]`` overlap fractions in ``[0, 1]`` (:func:`voco_overlap_targets`).
        form: ``"code"`` (default) or ``"paper"``.
        teacher_rand_emb, teacher_base_emb: ``[B, Nr, D]`` and ``[B, Nb, D]`` teacher embeddings
            (``code`` form only; both or neither; detached here).
        reg_weight: weight of the regulariser.
        eps: added inside the log.

    Returns:
        :class:`VoCoResult`.
    """
    if form not in ("paper", "code"):
        raise ValueError(f"form must be 'paper' or 'code', got {form!r}")
    if rand_emb.ndim != 3 or base_emb.ndim != 3:
        raise ValueError(
            f"rand_emb must be [B, Nr, D] and base_emb [B, Nb, D], got {tuple(rand_emb.shape)}, {tuple(base_emb.shape)}"
        )
    b, nr, d = rand_emb.shape
    nb = base_emb.shape[1]
    if base_emb.shape[0] != b or base_emb.shape[2] != d:
        raise ValueError(f"base_emb {tuple(base_emb.shape)} does not match rand_emb {tuple(rand_emb.shape)}")
    if tuple(targets.shape) != (b, nr, nb):
        raise ValueError(f"targets must be [B, Nr, Nb] = {(b, nr, nb)}, got {tuple(targets.shape)}")
    if (teacher_rand_emb is None) != (teacher_base_emb is None):
        raise ValueError("give both teacher_rand_emb and teacher_base_emb, or neither")
    if teacher_rand_emb is not None:
        if form == "paper":
            raise ValueError("the paper form has no teacher; use form='code'")
        if teacher_rand_emb.shape != rand_emb.shape or teacher_base_emb.shape != base_emb.shape:
            raise ValueError("teacher embeddings must have the student embeddings' shapes")
    if nb < 2:
        raise ValueError(f"VoCo needs at least 2 base crops, got {nb}")

    with torch.autocast(device_type=rand_emb.device.type, enabled=False):
        r = rand_emb.float()
        q = base_emb.float()
        y = targets.to(r.dtype)
        iu = torch.triu_indices(nb, nb, offset=1, device=r.device)
        if form == "paper":
            logits = _cos(r, q).clamp(0.0, 1.0)
            pred = -torch.log(1.0 - (y - logits).abs() + eps).mean(dim=(1, 2))  # [B]
            s = _cos(q, q)[:, iu[0], iu[1]]  # [B, P]
            reg = s.abs().mean(-1)
            pred_pos, pred_neg = pred.mean(), torch.zeros((), device=r.device)
        else:
            if teacher_rand_emb is None:
                logits = F.relu(_cos(r, q))
            else:
                tr = teacher_rand_emb.detach().float()
                tq = teacher_base_emb.detach().float()
                logits = 0.5 * (F.relu(_cos(r, tq)) + F.relu(_cos(tr, q)))
            pos_w = y
            pos = (pos_w * -torch.log(1.0 - (y - logits).abs() + eps)).sum(dim=(1, 2)) / (
                pos_w.sum(dim=(1, 2)) + eps
            )
            neg_w = (y == 0).to(r.dtype)
            neg = (neg_w * logits**2).sum(dim=(1, 2)) / (neg_w.sum(dim=(1, 2)) + eps)
            s = F.normalize(q, dim=-1) @ F.normalize(q.detach(), dim=-1).transpose(-1, -2)
            reg = F.relu(s[:, iu[0], iu[1]]) ** 2
            reg = reg.mean(-1)
            pred_pos, pred_neg = pos.mean(), neg.mean()
        reg = reg.mean()
        loss = pred_pos + pred_neg + reg_weight * reg
    return VoCoResult(loss, pred_pos, pred_neg, reg, logits.detach())
