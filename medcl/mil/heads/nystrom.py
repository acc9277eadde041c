"""Masked Nystrom attention (Xiong et al., 2021, "Nystromformer: a Nystrom-based algorithm for approximating
self-attention", AAAI), exact with respect to padding.

Memory and time grow linearly with the sequence length ``N`` (three kernels of size ``N x m``, ``m x m`` and
``m x N`` for ``m`` landmarks), so whole slides of 50k instances fit.

Differences from the usual implementation, all to make a padded bag behave exactly like the bag alone:

* landmarks are the means of ``m`` contiguous segments of the **real** tokens of each bag (segment of the
  token of rank ``r`` among ``n`` real tokens: ``floor(r * m / n)``), instead of segments of the padded
  sequence (which would mix padding in and depend on the batch's longest bag);
* bags with fewer than ``m`` real tokens get ``n`` one-token landmarks; the empty landmarks are masked out of
  the kernels and given an identity block in the ``m x m`` kernel, so the iterative pseudo-inverse of the valid
  block is unchanged (and a batch whose longest sequence is shorter than ``m`` uses that many landmarks);
* the iterative Moore-Penrose pseudo-inverse is initialised per bag and head (the reference implementation
  takes one maximum over the whole batch, which couples the bags of a batch);
* no depth-wise convolution residual over the sequence (an implementation extra of the reference code that
  would smear padding into real tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medcl.mil.heads.base import instance_rank, masked_softmax


def _pinv_iterations(a: Tensor, iterations: int) -> Tensor:
    absa = a.abs()
    norm = absa.sum(-1).amax(-1) * absa.sum(-2).amax(-1)  # [...]
    z = a.transpose(-1, -2) / norm[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class _IterativePinv(torch.autograd.Function):
    """Forward: the iterations; backward: the derivative of the inverse, ``dA = -Z^T dZ Z^T``, at the iterate.

    Backpropagating through the unrolled iterations costs about 48 batched ``m x m`` products and keeps every
    iterate alive; the closed form costs two products and keeps only ``Z``.
    """

    @staticmethod
    def forward(ctx, a: Tensor, iterations: int) -> Tensor:  # type: ignore[override]
        z = _pinv_iterations(a, iterations)
        ctx.save_for_backward(z)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        zt = z.transpose(-1, -2)
        return -(zt @ grad @ zt), None


def iterative_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    r"""Moore-Penrose pseudo-inverse of each ``[..., m, m]`` matrix by the iteration of Razavi et al. (2014)
    used in Nystromformer: :math:`Z_0 = A^\top / (\|A\|_1 \|A\|_\infty)`,
    :math:`Z_{k+1} = \tfrac14 Z_k (13 I - A Z_k (15 I - A Z_k (7 I - A Z_k)))`, the scaling taken per matrix.

    The gradient is that of the inverse at the result (:math:`\partial A = -Z^\top \partial Z\, Z^\top`),
    not of the unrolled iterations (which the reference implementation backpropagates through).
    """
    return _IterativePinv.apply(a, int(iterations))


def masked_nystrom_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, landmarks: int, pinv_iterations: int = 6
) -> tuple[Tensor, Tensor]:
    """Nystrom approximation of ``softmax(q k^T) v`` over the real tokens of each sequence.

    Args:
        q, k, v: ``[B, H, N, d]`` (``q`` already scaled by ``d ** -0.5``).
        mask: ``[B, N]`` bool, ``True`` for real tokens (at least one per row).
        landmarks: number of landmarks ``m``.

    Returns:
        ``out [B, H, N, d]`` (rows of padded queries are meaningless) and ``first_row [B, H, N]``, the
        approximate attention of the first token (the class token) over all tokens (zero on padding).
    """
    b, h, n, d = q.shape
    # With no more tokens than landmarks every token is its own landmark, whatever m is: m = min(m, N) gives
    # the same result (empty landmarks only add identity blocks) and saves the O(m^3) pseudo-inverse.
    m = min(int(landmarks), n)
    rank = instance_rank(mask)  # [B, N]
    count = mask.sum(1, keepdim=True)  # [B, 1]
    seg = torch.where(mask, (rank * m) // count, torch.full_like(rank, m))  # dummy segment m for padding
    idx = seg[:, None, :, None].expand(b, h, n, d)
    q_sum = torch.zeros(b, h, m + 1, d, dtype=q.dtype, device=q.device).scatter_add_(2, idx, q)
    k_sum = torch.zeros(b, h, m + 1, d, dtype=k.dtype, device=k.device).scatter_add_(2, idx, k)
    seg_n = torch.zeros(b, m + 1, dtype=q.dtype, device=q.device).scatter_add_(1, seg, torch.ones_like(seg, dtype=q.dtype))
    seg_n = seg_n[:, :m]  # [B, m]
    valid = seg_n > 0  # [B, m]
    q_l = q_sum[:, :, :m] / seg_n.clamp_min(1)[:, None, :, None]
    k_l = k_sum[:, :, :m] / seg_n.clamp_min(1)[:, None, :, None]

    kernel_1 = masked_softmax(q @ k_l.transpose(-1, -2), valid[:, None, None, :])  # [B, H, N, m]
    kernel_2 = masked_softmax(q_l @ k_l.transpose(-1, -2), valid[:, None, None, :])  # [B, H, m, m]
    eye = torch.eye(m, dtype=q.dtype, device=q.device)
    kernel_2 = torch.where(valid[:, None, :, None], kernel_2, eye)  # identity rows for empty landmarks
    kernel_3 = masked_softmax(q_l @ k.transpose(-1, -2), mask[:, None, None, :])  # [B, H, m, N]

    left = kernel_1 @ iterative_pinv(kernel_2, pinv_iterations)  # [B, H, N, m]
    out = left @ (kernel_3 @ v)
    first_row = (left[:, :, :1] @ kernel_3).squeeze(2)  # [B, H, N]
    return out, first_row


class NystromAttention(nn.Module):
    """Multi-head masked Nystrom self-attention (``dim`` -> ``dim``).

    Args:
        dim: token width.
        heads: number of heads (``dim`` divisible by it).
        landmarks: number of landmarks ``m``.
        pinv_iterations: iterations of the pseudo-inverse.
        dropout: dropout on the output projection.
    """

    def __init__(self, dim: int, heads: int = 8, landmarks: int = 128, pinv_iterations: int = 6, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads, self.landmarks, self.pinv_iterations = heads, landmarks, pinv_iterations
        self.scale = (dim // heads) ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, N, dim], mask [B, N]`` -> ``(out [B, N, dim], first-token attention [B, N])``."""
        b, n, dim = x.shape
        qkv = self.to_qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        out, first = masked_nystrom_attention(q, k, v, mask, self.landmarks, self.pinv_iterations)
        out = out.transpose(1, 2).reshape(b, n, dim)
        return self.to_out(out), first.mean(1)
