"""Attention-based MIL (Ilse, Tomczak and Welling, 2018, "Attention-based deep multiple instance
learning", ICML), plain and gated."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from medcl.mil.heads.base import MILHead, MILOutput, masked_softmax, mlp
from medcl.mil.heads.registry import encoder_kwargs, register_head


class AttentionPool(nn.Module):
    r"""Masked (gated) attention pooling over the instances of each bag.

    .. math::

        e_i = \mathbf{w}^\top \big(\tanh(\mathbf{V}\mathbf{h}_i) \odot \sigma(\mathbf{U}\mathbf{h}_i)\big)
        \ \text{(gated)}, \qquad e_i = \mathbf{w}^\top \tanh(\mathbf{V}\mathbf{h}_i)\ \text{(plain)},

    .. math::

        a_i = \frac{\exp e_i}{\sum_{j=1}^{n} \exp e_j}, \qquad \mathbf{z} = \sum_{i=1}^{n} a_i \mathbf{h}_i,

    where the sums run over the ``n`` real instances (padding gets :math:`e_i = -\infty`, so :math:`a_i = 0`).

    Args:
        embed_dim: instance embedding width ``E``.
        attention_dim: hidden width ``L`` of :math:`\mathbf{V}, \mathbf{U} \in \mathbb{R}^{L \times E}`.
        gated: use the gated form.
        dropout: dropout on the attention hidden layer.

    Returns (forward): ``z [B, E]``, attention ``a [B, N]`` (zero at padding), raw scores ``e [B, N]``.
    """

    def __init__(self, embed_dim: int, attention_dim: int = 128, gated: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(embed_dim, attention_dim)
        self.U = nn.Linear(embed_dim, attention_dim) if gated else None
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = torch.tanh(self.V(h))
        if self.U is not None:
            hidden = hidden * torch.sigmoid(self.U(h))
        e = self.w(self.drop(hidden)).squeeze(-1)  # [B, N]
        a = masked_softmax(e, mask, dim=1)
        z = torch.einsum("bn,bne->be", a, h)
        return z, a, e


class ABMIL(MILHead):
    r"""Attention-based MIL, plain or gated (Ilse et al., 2018).

    Given a bag :math:`\mathbf{X} = [\mathbf{x}_1, \ldots, \mathbf{x}_n]^\top \in \mathbb{R}^{n \times D}`, an
    instance MLP gives :math:`\mathbf{h}_i = f(\mathbf{x}_i) \in \mathbb{R}^E`; :class:`AttentionPool` weighs
    them into the bag embedding :math:`\mathbf{z} = \sum_i a_i \mathbf{h}_i` and a linear classifier gives the
    logits :math:`\mathbf{s} = \mathbf{W}\mathbf{z} + \mathbf{b} \in \mathbb{R}^K` (softmax cross-entropy, so
    any number of classes). ``instance_scores`` are the attention weights :math:`a_i` (zero at padding);
    ``extras["attention_logits"]`` the raw :math:`e_i`.

    Args:
        in_dim: instance feature width ``D``.
        n_classes: number of classes ``K``.
        hidden: widths of the instance MLP.
        dropout: dropout after each MLP layer.
        attention_dim: hidden width ``L`` of the attention.
        gated: the gated attention of Ilse et al. (Eq. 9).
        attention_dropout: dropout inside the attention branch.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: list[int] = (256, 128),
        dropout: float = 0.0,
        attention_dim: int = 128,
        gated: bool = False,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.encoder, self.embed_dim = mlp(in_dim, list(hidden), dropout)
        self.pool = AttentionPool(self.embed_dim, attention_dim, gated, attention_dropout)
        self.classifier = nn.Linear(self.embed_dim, n_classes)

    def forward_features(self, x: Tensor, mask: Tensor) -> MILOutput:
        h = self.encode(x, mask)
        z, a, e = self.pool(h, mask)
        return MILOutput(self.classifier(z), a, z, {"attention_logits": e})


@dataclass
class ABMILConfig:
    """Section ``abmil`` (also read by ``gated_abmil``)."""

    attention_dim: int = 128
    gated: bool = False
    dropout: float = 0.0  # on the attention branch


def _abmil(cfg, in_dim: int, n_classes: int, gated: bool) -> ABMIL:
    a = cfg.abmil
    return ABMIL(in_dim, n_classes, **encoder_kwargs(cfg), attention_dim=a.attention_dim, gated=a.gated or gated,
                 attention_dropout=a.dropout)


@register_head("abmil", ABMIL, section="abmil", section_config=ABMILConfig, instance_score="attention",
               paper="Ilse et al., 2018")
def _build_abmil(cfg, in_dim: int, n_classes: int) -> ABMIL:
    return _abmil(cfg, in_dim, n_classes, gated=False)


@register_head("gated_abmil", ABMIL, section="abmil", instance_score="attention", paper="Ilse et al., 2018 (gated)")
def _build_gated_abmil(cfg, in_dim: int, n_classes: int) -> ABMIL:
    return _abmil(cfg, in_dim, n_classes, gated=True)
