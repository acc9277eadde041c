"""CLAM-SB (Lu et al., 2021, "Data-efficient and weakly supervised computational pathology on whole-slide
images", Nature Biomedical Engineering): single-branch gated attention with instance-level clustering."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.core.errors import MedclConfigError
from medcl.mil.heads.abmil import AttentionPool
from medcl.mil.heads.base import MILHead, MILOutput, mlp
from medcl.mil.heads.registry import register_head


class CLAMSB(MILHead):
    r"""CLAM, single attention branch.

    Bag level: gated attention pooling (:class:`~medcl.mil.heads.abmil.AttentionPool`) of the instance
    embeddings :math:`\mathbf{h}_i = f(\mathbf{x}_i)` into :math:`\mathbf{z} = \sum_i a_i \mathbf{h}_i` and a
    linear classifier :math:`\mathbf{s} = \mathbf{W}\mathbf{z} + \mathbf{b}`.

    Instance clustering (optional): one binary instance classifier :math:`g_c` per class. For a bag of class
    ``y`` with ``n`` real instances, let :math:`k_b = \min(k, \lfloor n/2 \rfloor)`, :math:`T` its
    :math:`k_b` instances of highest attention and :math:`\bar T` its :math:`k_b` of lowest. Then

    .. math::

        \mathcal{L}_{\text{inst}} = \operatorname{mean}\Big(\{\mathrm{CE}(g_y(\mathbf{h}_i), 1)\}_{i \in T}
        \cup \{\mathrm{CE}(g_y(\mathbf{h}_i), 0)\}_{i \in \bar T}
        \cup \{\mathrm{CE}(g_c(\mathbf{h}_i), 0)\}_{i \in T,\, c \ne y}\Big),

    the last set only with ``subtyping=True`` (mutually exclusive classes: another class's evidence is absent).
    The loss is :math:`w\,\mathrm{CE}(\mathbf{s}, y) + (1 - w)\,\mathcal{L}_{\text{inst}}` with :math:`w` =
    ``bag_weight`` (0.7 in CLAM). Lu et al. use a smooth SVM loss for the instance terms and a fixed ``k``;
    here it is cross-entropy and ``k`` is clamped per bag so that :math:`T` and :math:`\bar T` never overlap:
    bags smaller than ``2k`` use fewer instances, a one-instance bag adds no instance term (CLAM's top-k
    crashes on bags smaller than ``k``). ``instance_scores`` are the attention weights :math:`a_i`.

    Args:
        in_dim, n_classes: feature width ``D`` and classes ``K``.
        hidden: widths of the instance MLP (CLAM: ``[512]``).
        dropout: dropout in the MLP and the attention branch (CLAM: 0.25).
        attention_dim: attention hidden width (CLAM: 256).
        k: instances sampled at each end of the attention ranking (CLAM: 8).
        instance_loss: add the clustering loss.
        bag_weight: :math:`w`.
        subtyping: also the out-of-class terms.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: list[int] = (512,),
        dropout: float = 0.25,
        attention_dim: int = 128,
        k: int = 8,
        instance_loss: bool = True,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.encoder, e = mlp(in_dim, list(hidden), dropout)
        self.embed_dim = e
        self.pool = AttentionPool(e, attention_dim, gated=True, dropout=dropout)
        self.classifier = nn.Linear(e, n_classes)
        self.instance_weight = nn.Parameter(torch.empty(n_classes, 2, e))
        self.instance_bias = nn.Parameter(torch.zeros(n_classes, 2))
        nn.init.kaiming_uniform_(self.instance_weight.view(n_classes * 2, e), a=5**0.5)
        self.k, self.use_instance_loss, self.bag_weight, self.subtyping = int(k), instance_loss, bag_weight, subtyping

    def forward_features(self, x: Tensor, mask: Tensor) -> MILOutput:
        h = self.encode(x, mask)
        z, a, e = self.pool(h, mask)
        extras = {"attention_logits": e, "instance_embeddings": h, "mask": mask}
        return MILOutput(self.classifier(z), a, z, extras)

    def instance_loss(self, output: MILOutput, labels: Tensor) -> Tensor:
        """:math:`\\mathcal{L}_{\\text{inst}}` of the batch (zero, with a gradient path, if no bag has 2 instances)."""
        h, e, mask = output.extras["instance_embeddings"], output.extras["attention_logits"], output.extras["mask"]
        b, n, _ = h.shape
        kk = min(self.k, n)
        k_bag = torch.clamp(mask.sum(1) // 2, max=self.k)  # [B]
        valid = torch.arange(kk, device=h.device)[None, :] < k_bag[:, None]  # [B, kk]
        top = e.masked_fill(~mask, float("-inf")).topk(kk, dim=1).indices
        bottom = (-e).masked_fill(~mask, float("-inf")).topk(kk, dim=1).indices
        idx = torch.cat([top, bottom], 1)  # [B, 2kk]
        hs = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))  # [B, 2kk, E]
        logits = torch.einsum("bje,kce->bjkc", hs, self.instance_weight) + self.instance_bias  # [B, 2kk, K, 2]
        in_class = logits.gather(2, labels[:, None, None, None].expand(-1, 2 * kk, 1, 2)).squeeze(2)  # [B, 2kk, 2]
        target = torch.cat([torch.ones(b, kk), torch.zeros(b, kk)], 1).long().to(h.device)
        ce = F.cross_entropy(in_class.reshape(-1, 2), target.reshape(-1), reduction="none").view(b, 2 * kk)
        terms_valid = torch.cat([valid, valid], 1)
        total, count = (ce * terms_valid).sum(), terms_valid.sum()
        if self.subtyping:
            other = torch.ones(b, self.n_classes, dtype=torch.bool, device=h.device)
            other[torch.arange(b), labels] = False
            top_logits = logits[:, :kk]  # [B, kk, K, 2]
            ce_out = F.cross_entropy(
                top_logits.reshape(-1, 2), torch.zeros(b * kk * self.n_classes, dtype=torch.long, device=h.device),
                reduction="none",
            ).view(b, kk, self.n_classes)
            w = valid[:, :, None] & other[:, None, :]
            total, count = total + (ce_out * w).sum(), count + w.sum()
        return total / count.clamp_min(1)

    def loss(self, output: MILOutput, labels: Tensor, **kwargs) -> dict[str, Tensor]:
        ce = F.cross_entropy(output.logits, labels)
        if not self.use_instance_loss:
            return {"loss": ce, "ce": ce.detach()}
        inst = self.instance_loss(output, labels)
        total = self.bag_weight * ce + (1 - self.bag_weight) * inst
        return {"loss": total, "ce": ce.detach(), "instance": inst.detach()}


@dataclass
class CLAMConfig:
    """Section ``clam``."""

    attention_dim: int = 128
    dropout: float = 0.25
    k: int = 8
    instance_loss: bool = True
    bag_weight: float = 0.7
    subtyping: bool = False

    def validate(self) -> None:
        if self.k < 1:
            raise MedclConfigError("clam.k", "must be >= 1")
        if not 0 <= self.bag_weight <= 1:
            raise MedclConfigError("clam.bag_weight", "must be in [0, 1]")


@register_head("clam_sb", CLAMSB, section="clam", section_config=CLAMConfig, instance_score="attention",
               paper="Lu et al., 2021")
def _build_clam_sb(cfg, in_dim: int, n_classes: int) -> CLAMSB:
    c = cfg.clam
    return CLAMSB(in_dim, n_classes, hidden=list(cfg.encoder.hidden), dropout=c.dropout, attention_dim=c.attention_dim,
                  k=c.k, instance_loss=c.instance_loss, bag_weight=c.bag_weight, subtyping=c.subtyping)
