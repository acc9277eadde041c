"""TransMIL (Shao et al., 2021, "TransMIL: Transformer based correlated multiple instance learning for
whole slide image classification", NeurIPS), mask-aware."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from medcl.core.errors import MedclConfigError
from medcl.mil.heads.base import MILHead, MILOutput, instance_rank, mlp
from medcl.mil.heads.nystrom import NystromAttention
from medcl.mil.heads.registry import encoder_kwargs, register_head


def square_side(n: Tensor) -> Tensor:
    """``ceil(sqrt(n))`` for an int64 tensor ``n >= 1`` (integer arithmetic, exact for perfect squares)."""
    s = torch.sqrt(n.to(torch.float64)).floor().long()
    s = s - (s * s > n).long()
    return s + (s * s < n).long()


class TransLayer(nn.Module):
    """Pre-norm residual Nystrom self-attention: ``x + Attn(LayerNorm(x))``; padding rows are kept at zero."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, landmarks, pinv_iterations, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out, first = self.attn(self.norm(x), mask)
        return (x + out) * mask.unsqueeze(-1), first


class PPEG(nn.Module):
    r"""Pyramid position encoding generator on each bag's own square grid.

    A bag of ``n`` real tokens is laid out row-major on a :math:`s \times s` grid, :math:`s = \lceil\sqrt n\rceil`
    (token of rank ``r`` at row ``r // s``, column ``r % s``), and
    :math:`\mathbf{T} \leftarrow \mathbf{T} + \mathrm{DW}_7(\mathbf{T}) + \mathrm{DW}_5(\mathbf{T}) + \mathrm{DW}_3(\mathbf{T})`
    with depth-wise convolutions. In a batch each bag's grid sits in the top-left corner of an
    :math:`S \times S` canvas (``S`` the largest side) filled with zeros, which is exactly the zero padding the
    convolutions would see on the bag alone, so padding never reaches a real token.

    Shao et al. fill the ``s^2 - n`` empty cells by repeating the first tokens; here they stay empty (zero for
    the convolutions, and absent from attention), so no instance is counted twice.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x [B, N, C], mask [B, N]`` -> ``[B, N, C]`` (zero at padding)."""
        b, n, c = x.shape
        side = square_side(mask.sum(1).clamp_min(1))  # [B]
        big = int(side.max())
        rank = instance_rank(mask)
        flat = torch.where(mask, (rank // side[:, None]) * big + rank % side[:, None], torch.full_like(rank, big * big))
        canvas = torch.zeros(b, big * big + 1, c, dtype=x.dtype, device=x.device)
        canvas = canvas.scatter(1, flat[..., None].expand(b, n, c), x)
        grid = canvas[:, : big * big].transpose(1, 2).reshape(b, c, big, big)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        canvas = grid.reshape(b, c, big * big).transpose(1, 2)
        out = canvas.gather(1, flat.clamp_max(big * big - 1)[..., None].expand(b, n, c))
        return out * mask.unsqueeze(-1)


class TransMIL(MILHead):
    r"""TransMIL: a class token and the instances through Nystrom self-attention with a PPEG in between.

    With :math:`\mathbf{h}_i = \mathrm{ReLU}(\mathbf{W}_0 f(\mathbf{x}_i)) \in \mathbb{R}^C` for the ``n`` real
    instances and a learnt class token :math:`\mathbf{h}_0`,

    .. math::

        \mathbf{T}^{(1)} = \mathbf{T}^{(0)} + \mathrm{MSA}(\mathrm{LN}(\mathbf{T}^{(0)})), \quad
        \mathbf{T}^{(0)} = [\mathbf{h}_0, \mathbf{h}_1, \ldots, \mathbf{h}_n],

    .. math::

        \mathbf{T}^{(1)}_{1:n} \leftarrow \mathrm{PPEG}(\mathbf{T}^{(1)}_{1:n}), \qquad
        \mathbf{T}^{(\ell+1)} = \mathbf{T}^{(\ell)} + \mathrm{MSA}(\mathrm{LN}(\mathbf{T}^{(\ell)})),

    and the logits :math:`\mathbf{s} = \mathbf{W}\,\mathrm{LN}(\mathbf{T}^{(L)})_0 + \mathbf{b}`. MSA is
    :class:`~medcl.mil.heads.nystrom.NystromAttention` with a key padding mask, linear in ``n``; PPEG is
    :class:`PPEG` on each bag's own grid. ``instance_scores`` is the last layer's (Nystrom-approximated)
    attention of the class token over the instances, averaged over heads.

    Args:
        in_dim: instance feature width ``D``.
        n_classes: number of classes ``K``.
        hidden: widths of an optional instance MLP before the projection to ``dim`` (Shao et al.: none).
        dropout: dropout in that MLP.
        dim: token width ``C`` (512 in the paper).
        heads: attention heads.
        layers: number of attention layers (>= 1; the PPEG follows the first; the paper uses 2).
        landmarks: Nystrom landmarks (``dim // 2`` in the paper).
        pinv_iterations: iterations of the pseudo-inverse.
        attention_dropout: dropout on the attention output.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: list[int] = (),
        dropout: float = 0.0,
        dim: int = 256,
        heads: int = 8,
        layers: int = 2,
        landmarks: int = 128,
        pinv_iterations: int = 6,
        attention_dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dim, n_classes)
        enc, e = mlp(in_dim, list(hidden), dropout)
        self.encoder = nn.Sequential(enc, nn.Linear(e, dim), nn.ReLU())
        self.embed_dim = dim
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.layers = nn.ModuleList(
            TransLayer(dim, heads, landmarks, pinv_iterations, attention_dropout) for _ in range(max(1, layers))
        )
        self.ppeg = PPEG(dim)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def forward_features(self, x: Tensor, mask: Tensor) -> MILOutput:
        b = x.shape[0]
        h = self.encode(x, mask) * mask.unsqueeze(-1)
        seq = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)
        smask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        first = None
        for i, layer in enumerate(self.layers):
            seq, first = layer(seq, smask)
            if i == 0:
                seq = torch.cat([seq[:, :1], self.ppeg(seq[:, 1:], mask)], dim=1)
        z = self.norm(seq[:, 0])
        scores = first[:, 1:] * mask
        return MILOutput(self.classifier(z), scores, z, {"cls_attention": scores})


@dataclass
class TransMILConfig:
    """Section ``transmil``."""

    dim: int = 256
    heads: int = 8
    layers: int = 2
    landmarks: int = 128
    pinv_iterations: int = 6
    dropout: float = 0.1

    def validate(self) -> None:
        if self.heads < 1 or self.dim % self.heads:
            raise MedclConfigError("transmil.dim", f"must be divisible by transmil.heads ({self.heads})")
        if self.landmarks < 1:
            raise MedclConfigError("transmil.landmarks", "must be >= 1")


@register_head("transmil", TransMIL, section="transmil", section_config=TransMILConfig, instance_score="attention",
               paper="Shao et al., 2021")
def _build_transmil(cfg, in_dim: int, n_classes: int) -> TransMIL:
    t = cfg.transmil
    return TransMIL(in_dim, n_classes, **encoder_kwargs(cfg), dim=t.dim, heads=t.heads, layers=t.layers,
                    landmarks=t.landmarks, pinv_iterations=t.pinv_iterations, attention_dropout=t.dropout)
