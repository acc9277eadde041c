"""DSMIL (Li, Li and Eliceiri, 2021, "Dual-stream multiple instance learning network for whole slide image
classification with self-supervised contrastive learning", CVPR), multi-class and mask-aware."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.core.errors import MedclConfigError
from medcl.mil.heads.base import MILHead, MILOutput, masked_softmax, mlp
from medcl.mil.heads.registry import encoder_kwargs, register_head


class DSMIL(MILHead):
    r"""Dual-stream MIL.

    With instance embeddings :math:`\mathbf{h}_i = f(\mathbf{x}_i) \in \mathbb{R}^E` of the ``n`` real instances:

    *Max-pooling stream.* An instance classifier :math:`\mathbf{c}_i = \mathbf{W}_0 \mathbf{h}_i \in
    \mathbb{R}^K` and its max over instances :math:`c^{\max}_k = \max_i c_{i,k}`. The **critical instance** of
    class ``k`` is :math:`m_k = \arg\max_i c_{i,k}`, taken among the real instances only (padding gets
    :math:`-\infty`).

    *Aggregation stream.* Queries :math:`\mathbf{q}_i = \tanh(\mathbf{W}_2\,\mathrm{ReLU}(\mathbf{W}_1 \mathbf{h}_i))`
    and values :math:`\mathbf{v}_i = \mathbf{W}_v \mathbf{h}_i`; each instance is scored by its similarity to the
    critical instance of each class,

    .. math::

        U_{i,k} = \frac{\exp(\langle \mathbf{q}_i, \mathbf{q}_{m_k} \rangle / \sqrt{d_q})}
                       {\sum_{j=1}^{n} \exp(\langle \mathbf{q}_j, \mathbf{q}_{m_k} \rangle / \sqrt{d_q})}, \qquad
        \mathbf{b}_k = \sum_{i=1}^{n} U_{i,k}\, \mathbf{v}_i,

    and a fully connected layer over the stacked :math:`[\mathbf{b}_1, \ldots, \mathbf{b}_K]` (the paper's
    1-D convolution with kernel width :math:`E`) gives the bag logits :math:`\mathbf{s}^{\text{bag}}`.

    Li et al. train a sigmoid per positive class; here both streams are softmax classifiers over all ``K``
    classes: loss :math:`(1-\lambda)\,\mathrm{CE}(\mathbf{s}^{\text{bag}}, y) + \lambda\,\mathrm{CE}(\mathbf{c}^{\max}, y)`
    (:math:`\lambda` = ``instance_weight``, 0.5 in the paper) and logits
    :math:`\tfrac12(\mathbf{s}^{\text{bag}} + \mathbf{c}^{\max})`, the average of the two streams as in the
    paper's prediction. ``instance_scores`` is :math:`U_{i,\hat k}` for the predicted class :math:`\hat k`;
    ``extras`` carries ``instance_logits`` ``[B, N, K]``, ``attention`` ``U`` ``[B, N, K]``, ``bag_logits``,
    ``max_logits`` and ``critical`` ``[B, K]`` (indices of the critical instances).

    Args:
        in_dim, n_classes, hidden, dropout: as :class:`~medcl.mil.heads.abmil.ABMIL`.
        query_dim: width :math:`d_q` of the queries.
        value_dropout: dropout on the values.
        instance_weight: :math:`\lambda`.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: list[int] = (256, 128),
        dropout: float = 0.0,
        query_dim: int = 128,
        value_dropout: float = 0.0,
        instance_weight: float = 0.5,
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.encoder, e = mlp(in_dim, list(hidden), dropout)
        self.embed_dim = n_classes * e
        self.instance_classifier = nn.Linear(e, n_classes)
        self.query = nn.Sequential(nn.Linear(e, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(value_dropout), nn.Linear(e, e)) if value_dropout > 0 else nn.Linear(e, e)
        self.fcc = nn.Linear(n_classes * e, n_classes)
        self.scale = 1.0 / math.sqrt(query_dim)
        self.instance_weight = float(instance_weight)

    def forward_features(self, x: Tensor, mask: Tensor) -> MILOutput:
        h = self.encoder(x)  # [B, N, E]
        c = self.instance_classifier(h)  # [B, N, K]
        c_masked = c.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        max_logits, critical = c_masked.max(1)  # [B, K], [B, K]
        q = self.query(h)  # [B, N, dq]
        q_crit = q.gather(1, critical[..., None].expand(-1, -1, q.shape[-1]))  # [B, K, dq]
        u = masked_softmax(torch.einsum("bnd,bkd->bnk", q, q_crit) * self.scale, mask.unsqueeze(-1), dim=1)
        v = self.value(h)  # [B, N, E]
        bag = torch.einsum("bnk,bne->bke", u, v)  # [B, K, E]
        z = bag.flatten(1)
        bag_logits = self.fcc(z)
        logits = 0.5 * (bag_logits + max_logits)
        k = logits.argmax(-1)
        scores = u.gather(2, k[:, None, None].expand(-1, u.shape[1], 1)).squeeze(-1)
        extras = {"instance_logits": c, "attention": u, "bag_logits": bag_logits, "max_logits": max_logits,
                  "critical": critical}
        return MILOutput(logits, scores, z, extras)

    def loss(self, output: MILOutput, labels: Tensor, **kwargs) -> dict[str, Tensor]:
        bag_ce = F.cross_entropy(output.extras["bag_logits"], labels)
        max_ce = F.cross_entropy(output.extras["max_logits"], labels)
        total = (1 - self.instance_weight) * bag_ce + self.instance_weight * max_ce
        return {"loss": total, "bag_ce": bag_ce.detach(), "max_ce": max_ce.detach()}


@dataclass
class DSMILConfig:
    """Section ``dsmil``."""

    query_dim: int = 128
    value_dropout: float = 0.0
    instance_weight: float = 0.5  # weight of the max-instance CE; the bag CE gets 1 - instance_weight

    def validate(self) -> None:
        if not 0 <= self.instance_weight <= 1:
            raise MedclConfigError("dsmil.instance_weight", "must be in [0, 1]")


@register_head("dsmil", DSMIL, section="dsmil", section_config=DSMILConfig, instance_score="instance score",
               paper="Li et al., 2021")
def _build_dsmil(cfg, in_dim: int, n_classes: int) -> DSMIL:
    d = cfg.dsmil
    return DSMIL(in_dim, n_classes, **encoder_kwargs(cfg), query_dim=d.query_dim, value_dropout=d.value_dropout,
                 instance_weight=d.instance_weight)
