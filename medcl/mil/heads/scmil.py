"""SC-MIL: supervised contrastive learning of bag representations with a progressive transition to the
classification loss, for label imbalance (Juyal et al., 2024, "SC-MIL: Supervised contrastive multiple
instance learning for imbalanced classification in pathology", WACV).

There is no public code. The paper's description fixes the ingredients -- a MIL aggregator whose bag
embeddings are trained with a supervised contrastive loss (Khosla et al., 2020) on augmented views of the
bags, jointly with the bag classifier, the weight moving progressively from the contrastive loss to the
classification loss -- and the choices below are **ours**:

* views: two views per bag by random instance subsampling, each keeping a fraction drawn uniformly from
  ``keep = (low, high)`` of the bag's instances (at least one);
* projection: a 2-layer MLP on the head's ``bag_embedding`` to ``proj_dim``, L2-normalised; SupCon's
  ``L_out`` form via :func:`medcl.losses.info_nce` (``mode="supcon"``, :func:`medcl.losses.label_masks`),
  over the ``2B`` views of a batch, temperature ``temperature``;
* classification loss: the base head's own loss (cross-entropy plus its own terms) on the full bags;
* schedule: ``L = (1 - w(t)) L_SupCon + w(t) L_cls`` with training progress ``t in [0, 1]`` and
  ``w(t) = t^2`` (``parabolic``, default; the cumulative-learning form of BBN, Zhou et al. 2020), ``t``
  (``linear``), ``(1 - cos(pi t)) / 2`` (``cosine``) or ``1[t >= switch]`` (``step``: contrastive first,
  then classification alone); since the classification loss dominates late, ``configs/mil/scmil.yaml`` uses a
  constant learning rate (a cosine decay would leave the classifier almost none);
* batches: at least two bags of every class in each batch (so every view has a positive other than its
  twin), enforced by :class:`medcl.mil.sampling.BagBatchSampler` with ``min_per_class=2``; class-balanced
  sampling is the option ``train.sampler: balanced``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.core.errors import MedclConfigError
from medcl.losses import info_nce, label_masks
from medcl.mil.augment import subsample_instances
from medcl.mil.heads.base import MILHead, MILOutput, TrainingInfo
from medcl.mil.heads.registry import build_head, head_spec, register_head


def transition_weight(progress: float, schedule: str = "parabolic", switch: float = 0.5) -> float:
    """Weight ``w(t)`` of the classification loss at training progress ``t`` (see the module docstring)."""
    t = min(1.0, max(0.0, float(progress)))
    if schedule == "parabolic":
        return t * t
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    if schedule == "step":
        return 1.0 if t >= switch else 0.0
    raise ValueError(f"unknown SC-MIL schedule '{schedule}'")


class SCMILHead(MILHead):
    r"""SC-MIL around any MIL head with a ``bag_embedding``.

    .. math::

        \mathcal{L} = (1 - w(t))\,\frac{1}{2B}\sum_{a=1}^{2B} \frac{-1}{|P(a)|}\sum_{p \in P(a)}
        \log\frac{\exp(\mathbf{u}_a^\top \mathbf{u}_p / \tau)}{\sum_{j \ne a} \exp(\mathbf{u}_a^\top \mathbf{u}_j / \tau)}
        \; + \; w(t)\, \mathcal{L}_{\text{cls}},

    where :math:`\mathbf{u}_a = \mathrm{normalise}(g(\mathbf{z}_a))` are the projected bag embeddings of the
    two subsampled views of the ``B`` bags and :math:`P(a)` the other views with the same bag label. At
    inference it is the base head (the projection is unused).

    Args:
        base: the MIL head (its standardisation is the one used).
        proj_dim, temperature, schedule, switch, keep: see the module docstring.
    """

    min_per_class = 2  # the trainer's sampler puts at least this many bags of each class in a batch

    def __init__(
        self,
        base: MILHead,
        proj_dim: int = 64,
        temperature: float = 0.1,
        schedule: str = "parabolic",
        switch: float = 0.5,
        keep: tuple[float, float] = (0.5, 0.9),
    ) -> None:
        super().__init__(base.in_dim, base.n_classes)
        transition_weight(0.0, schedule, switch)  # validates the name
        self.base = base
        e = int(base.embed_dim)
        self.embed_dim = e
        self.projector = nn.Sequential(nn.Linear(e, e), nn.ReLU(), nn.Linear(e, proj_dim))
        self.temperature, self.schedule, self.switch, self.keep = temperature, schedule, switch, tuple(keep)

    @classmethod
    def from_config(cls, cfg: Any, base: MILHead) -> SCMILHead:
        s = cfg.scmil
        return cls(base, s.proj_dim, s.temperature, s.schedule, s.switch, s.keep)

    def set_standardization(self, mean: Tensor, std: Tensor) -> None:
        super().set_standardization(mean, std)
        self.base.set_standardization(mean, std)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        return self.base(x, mask)

    def forward_features(self, x: Tensor, mask: Tensor) -> MILOutput:
        return self.base.forward_features(x, mask)

    def loss(self, output: MILOutput, labels: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        return self.base.loss(output, labels, **kwargs)

    def prepare_training(self, info: TrainingInfo) -> None:
        self.base.prepare_training(info)

    def contrastive_loss(self, batch: Any) -> Tensor:
        """SupCon over two instance-subsampled views of every bag of the batch."""
        b = len(batch)
        lo, hi = self.keep
        views = []
        for _ in range(2):
            keep = lo + (hi - lo) * torch.rand(b, device=batch.mask.device)
            sel = subsample_instances(batch.mask, keep)
            views.append(self.base(batch.features, sel).bag_embedding)
        u = F.normalize(self.projector(torch.cat(views, 0)), dim=1)
        labels = torch.cat([batch.labels, batch.labels])
        uid = torch.arange(2 * b, device=u.device)
        pos, excl = label_masks(labels, uid, labels, uid)
        return info_nce(u, u, pos, excl, temperature=self.temperature, mode="supcon").loss

    def training_loss(self, batch: Any, progress: float = 0.0) -> dict[str, Tensor]:
        w = transition_weight(progress, self.schedule, self.switch)
        terms = self.base.loss(self.base(batch.features, batch.mask), batch.labels)
        con = self.contrastive_loss(batch)
        total = (1.0 - w) * con + w * terms["loss"]
        out = {k: v.detach() for k, v in terms.items() if k != "loss"}
        out.update(loss=total, contrastive=con.detach(), cls=terms["loss"].detach(), cls_weight=torch.tensor(w))
        return out


@dataclass
class SCMILConfig:
    """Section ``scmil``: ``base`` is any registered head that does not itself wrap one."""

    base: str = "abmil"
    proj_dim: int = 64
    temperature: float = 0.1
    schedule: Literal["parabolic", "linear", "cosine", "step"] = "parabolic"
    switch: float = 0.5  # 'step' schedule: fraction of training spent on the contrastive loss alone
    keep: tuple[float, float] = (0.5, 0.9)  # range of the fraction of instances kept in each view

    def validate(self) -> None:
        if head_spec(self.base, "scmil.base").wraps:
            raise MedclConfigError("scmil.base", f"'{self.base}' wraps another head itself; choose a plain head")
        if not 0 < self.keep[0] <= self.keep[1] <= 1:
            raise MedclConfigError("scmil.keep", "must be 0 < low <= high <= 1")
        if not 0 <= self.switch <= 1:
            raise MedclConfigError("scmil.switch", "must be in [0, 1]")


@register_head("scmil", SCMILHead, section="scmil", section_config=SCMILConfig, instance_score="instance score",
               paper="Juyal et al., 2024", wraps=True)
def _build_scmil(cfg, in_dim: int, n_classes: int) -> SCMILHead:
    return SCMILHead.from_config(cfg, build_head(cfg, in_dim, n_classes, kind=cfg.scmil.base))
