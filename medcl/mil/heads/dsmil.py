"""DSMIL (Li, Li and Eliceiri, 2021, "Dual-stream multiple instance learning network for whole slide image
classification with self-supervised contrastive learning", CVPR; code: github.com/binli123/dsmil-wsi),
multi-class and mask-aware.

Two heads:

* ``dsmil`` (:class:`DSMIL`): the published method -- one sigmoid output per positive class in both streams,
  binary cross-entropies, a ReLU value branch, the bag classifier as a 1-D convolution over the class-wise bag
  embeddings, and the mean of the two streams' probabilities as the prediction.
* ``dsmil_softmax`` (:class:`DSMILSoftmax`): medcl's earlier variant (softmax over all classes in both
  streams, negative class included; no ReLU on the values). Kept for comparison; it is not the paper's method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.core.errors import MedclConfigError
from medcl.mil.heads.base import MILHead, MILOutput, masked_softmax, mlp
from medcl.mil.heads.registry import encoder_kwargs, register_head

__all__ = ["DSMIL", "DSMILConfig", "DSMILSoftmax", "critical_attention", "mean_probability_logit",
           "one_vs_rest_logits"]


def critical_attention(q: Tensor, instance_logits: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    r"""Attention of every instance to the critical instance of each output (DSMIL's aggregation stream).

    .. math::

        m_c = \arg\max_{i \le n} c_{i,c}, \qquad
        U_{i,c} = \frac{\exp(s\,\langle \mathbf{q}_i, \mathbf{q}_{m_c} \rangle)}
                       {\sum_{j=1}^{n} \exp(s\,\langle \mathbf{q}_j, \mathbf{q}_{m_c} \rangle)}

    over the ``n`` real instances (padding is never critical and gets zero weight).

    Args:
        q: ``[B, N, d]`` instance queries.
        instance_logits: ``[B, N, C]`` instance scores :math:`c_{i,c}` that pick the critical instances.
        mask: ``[B, N]`` True for real instances.
        scale: :math:`s` (``1 / sqrt(d)`` in DSMIL).

    Returns:
        ``U`` ``[B, N, C]`` (each column sums to 1 over the real instances) and the critical indices ``[B, C]``.
    """
    critical = instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf")).argmax(1)  # [B, C]
    q_crit = q.gather(1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # [B, C, d]
    scores = torch.einsum("bnd,bcd->bnc", q, q_crit) * scale
    return masked_softmax(scores, mask.unsqueeze(-1), dim=1), critical


def mean_probability_logit(a: Tensor, b: Tensor) -> Tensor:
    r"""``logit(p)`` of :math:`p = \tfrac12(\sigma(a) + \sigma(b))`, computed in log space (finite for any finite
    ``a, b``): :math:`\log\frac{\sigma(a) + \sigma(b)}{\sigma(-a) + \sigma(-b)}`."""
    log_p = torch.logaddexp(F.logsigmoid(a), F.logsigmoid(b))
    log_q = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(-b))
    return log_p - log_q


def one_vs_rest_logits(s: Tensor, positive_classes: Tensor, n_classes: int) -> Tensor:
    r"""``K``-class logits from one-vs-rest sigmoid logits ``s`` ``[B, C]`` of the classes ``positive_classes``.

    Class ``positive_classes[c]`` gets ``s[:, c]``; a class without an output (the negative class) gets ``0``.
    With :math:`p_c = \sigma(s_c)`, the softmax of these logits is

    .. math::

        P(k) = \frac{o_k}{1 + \sum_c o_c}\ (k\ \text{positive}), \qquad
        P(\nu) = \frac{1}{1 + \sum_c o_c}, \qquad o_c = \frac{p_c}{1 - p_c},

    the distribution of independent Bernoulli outputs :math:`p_c` conditioned on *at most one* of them firing
    (the negative class :math:`\nu` is "none fires"). For one positive class this is exactly
    :math:`(1 - p, p)`; the argmax is :math:`\nu` iff every :math:`p_c < \tfrac12`, else the class of the
    largest :math:`p_c`. Without a negative class (``C = K``) it is the same distribution conditioned on
    *exactly one* firing, :math:`P(k) \propto o_k`.
    """
    logits = s.new_zeros(s.shape[0], n_classes)
    return logits.index_copy(1, positive_classes, s)


class DSMIL(MILHead):
    r"""Dual-stream MIL as published (Li et al., CVPR 2021; ``dsmil.py`` of binli123/dsmil-wsi).

    With instance embeddings :math:`\mathbf{h}_i = f(\mathbf{x}_i) \in \mathbb{R}^E` of the ``n`` real instances
    and ``C`` outputs, one per *positive* class (``C = K - 1`` with a negative class, which has no output;
    ``C = K`` without one):

    *Max-pooling stream* (``IClassifier`` / ``FCLayer``): instance logits
    :math:`\mathbf{c}_i = \mathbf{W}_0 \mathbf{h}_i \in \mathbb{R}^C` and :math:`c^{\max}_c = \max_i c_{i,c}`; the
    **critical instance** of output ``c`` is :math:`m_c = \arg\max_i c_{i,c}` (real instances only).

    *Aggregation stream* (``BClassifier``): queries :math:`\mathbf{q}_i = \tanh(\mathbf{W}_{q2}\,
    \mathrm{ReLU}(\mathbf{W}_{q1}\mathbf{h}_i))`, values :math:`\mathbf{v}_i = \mathrm{ReLU}(\mathbf{W}_v\,
    \mathrm{Dropout}(\mathbf{h}_i))`, softmax attention over the instances for each output
    (:func:`critical_attention`, scale :math:`1/\sqrt{d_q}`), class-wise bag embeddings
    :math:`\mathbf{b}_c = \sum_i U_{i,c}\,\mathbf{v}_i` and the bag logits by a 1-D convolution with
    ``C`` input channels, ``C`` output channels and kernel width ``E`` over :math:`[\mathbf{b}_1; \ldots;
    \mathbf{b}_C] \in \mathbb{R}^{C \times E}` (``fcc = nn.Conv1d(output_class, output_class,
    kernel_size=input_size)``): :math:`s^{\text{bag}}_c = \sum_{c'} \langle \mathbf{W}_{c,c'}, \mathbf{b}_{c'}
    \rangle + \beta_c`.

    *Loss* (``train`` in ``train_tcga.py``): with one-vs-rest targets :math:`t_c = [y = k_c]` (all zero for a
    negative bag), :math:`(1 - \lambda)\,\mathrm{BCE}(\mathbf{s}^{\text{bag}}, \mathbf{t}) + \lambda\,
    \mathrm{BCE}(\mathbf{c}^{\max}, \mathbf{t})`, :math:`\lambda` = ``instance_weight`` (0.5 in the paper and
    code), each BCE averaged over outputs and bags.

    *Prediction* (``test`` in ``train_tcga.py`` with ``--average``: ``0.5 * sigmoid(max_prediction) + 0.5 *
    sigmoid(bag_prediction)`` since commit 3091668, "use averaged value", on by default from f14b1c2 until
    ac173c7; ``testing_tcga.py --average``: ``(bag_prediction + sigmoid(max_prediction)) / 2``):
    :math:`p_c = \tfrac12\big(\sigma(s^{\text{bag}}_c) + \sigma(c^{\max}_c)\big)`. ``average=False`` uses the
    bag stream alone, :math:`p_c = \sigma(s^{\text{bag}}_c)`, as the scripts do without ``--average`` and as
    ``train_mil.py`` (the MIL-benchmark script) does. ``logits`` ``[B, K]`` are :func:`one_vs_rest_logits` of
    :math:`\operatorname{logit}(p_c)`, so the softmax used by medcl's evaluation gives :math:`(1 - p, p)` for a
    binary problem and, in general, the conditional distribution described there.

    ``instance_scores`` are :math:`U_{i,\hat c}` for the output :math:`\hat c` of the largest :math:`p_c`
    (the attention the released ``attention_map.py`` draws); ``extras`` carries ``instance_logits``
    ``[B, N, C]``, ``attention`` ``U`` ``[B, N, C]``, ``bag_logits`` and ``max_logits`` ``[B, C]``,
    ``critical`` ``[B, C]`` (instance indices) and ``probs`` ``[B, C]`` (:math:`p_c`). Output ``c`` is class
    ``positive_classes[c]``.

    Differences from the released code: an instance MLP ``f`` (``encoder``) sits in front of both streams (the
    released MIL-benchmark and TCGA scripts feed the features directly, ``f`` = identity: ``encoder.hidden:
    []``); the value branch is always the learnt ``Dropout -> Linear -> ReLU`` (the code's ``passing_v=True``;
    its default ``passing_v=False`` passes the features as values).

    Args:
        in_dim: instance feature width ``D``.
        n_classes: number of classes ``K``.
        hidden, dropout: the instance MLP, as :class:`~medcl.mil.heads.abmil.ABMIL`.
        query_dim: width :math:`d_q` of the queries (128 in the code).
        value_dropout: dropout in front of the value layer (``dropout_v``).
        instance_weight: :math:`\lambda`.
        negative_class: the class without an output (bags of it hold no positive instance); ``None``: every
            class has an output.
        average: predict with the mean of both streams' probabilities (else the bag stream alone).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: list[int] | tuple[int, ...] = (256, 128),
        dropout: float = 0.0,
        query_dim: int = 128,
        value_dropout: float = 0.0,
        instance_weight: float = 0.5,
        negative_class: int | None = 0,
        average: bool = True,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if negative_class is not None and not 0 <= negative_class < n_classes:
            raise ValueError(f"negative_class {negative_class} outside [0, {n_classes})")
        positive = [k for k in range(n_classes) if k != negative_class]
        c = len(positive)
        self.encoder, e = mlp(in_dim, list(hidden), dropout)
        self.embed_dim = c * e
        self.n_outputs = c
        self.negative_class = negative_class
        self.register_buffer("positive_classes", torch.tensor(positive, dtype=torch.long), persistent=False)
        self.instance_classifier = nn.Linear(e, c)
        self.query = nn.Sequential(nn.Linear(e, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(value_dropout), nn.Linear(e, e), nn.ReLU())
        self.fcc = nn.Conv1d(c, c, kernel_size=e)
        self.scale = 1.0 / math.sqrt(query_dim)
        self.instance_weight = float(instance_weight)
        self.average = bool(average)

    def forward_features(self, x: Tensor, mask: Tensor) -> MILOutput:
        h = self.encode(x, mask)  # [B, N, E]
        c = self.instance_classifier(h)  # [B, N, C]
        max_logits = c.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)  # [B, C]
        u, critical = critical_attention(self.query(h), c, mask, self.scale)  # [B, N, C], [B, C]
        bag = torch.einsum("bnc,bne->bce", u, self.value(h))  # [B, C, E]
        bag_logits = self.fcc(bag).squeeze(-1)  # [B, C]
        s = mean_probability_logit(bag_logits, max_logits) if self.average else bag_logits
        logits = one_vs_rest_logits(s, self.positive_classes, self.n_classes)
        best = s.argmax(-1)  # output of the largest p_c
        scores = u.gather(2, best[:, None, None].expand(-1, u.shape[1], 1)).squeeze(-1)
        extras = {"instance_logits": c, "attention": u, "bag_logits": bag_logits, "max_logits": max_logits,
                  "critical": critical, "probs": torch.sigmoid(s)}
        return MILOutput(logits, scores, bag.flatten(1), extras)

    def targets(self, labels: Tensor) -> Tensor:
        """``[B, C]`` one-vs-rest targets of class labels ``[B]`` (a negative bag: all zero)."""
        return (labels[:, None] == self.positive_classes[None, :]).float()

    def loss(self, output: MILOutput, labels: Tensor, **kwargs) -> dict[str, Tensor]:
        """``(1 - instance_weight) * BCE(bag) + instance_weight * BCE(max)``; ``"loss"`` is the total."""
        t = self.targets(labels)
        bag_bce = F.binary_cross_entropy_with_logits(output.extras["bag_logits"], t)
        max_bce = F.binary_cross_entropy_with_logits(output.extras["max_logits"], t)
        total = (1 - self.instance_weight) * bag_bce + self.instance_weight * max_bce
        return {"loss": total, "bag_bce": bag_bce.detach(), "max_bce": max_bce.detach()}


class DSMILSoftmax(MILHead):
    r"""medcl's earlier DSMIL variant: softmax over all ``K`` classes in both streams (``dsmil_softmax``).

    Same two streams as :class:`DSMIL` (Li et al., 2021) on instance embeddings :math:`\mathbf{h}_i`, but

    * the instance classifier and the bag classifier have ``K`` outputs, the negative class included, and are
      trained with softmax cross-entropies: :math:`(1-\lambda)\,\mathrm{CE}(\mathbf{s}^{\text{bag}}, y) +
      \lambda\,\mathrm{CE}(\mathbf{c}^{\max}, y)` (the paper: one sigmoid per positive class, BCE);
    * a critical instance and an attention column exist for every class, the negative one included;
    * the values are linear, :math:`\mathbf{v}_i = \mathbf{W}_v \mathbf{h}_i` (the paper's code: ReLU after
      the linear layer);
    * the bag classifier is a linear layer on the flattened :math:`[\mathbf{b}_1, \ldots, \mathbf{b}_K]`
      (the same map as the code's 1-D convolution);
    * the logits are the mean of the two streams' *logits*, :math:`\tfrac12(\mathbf{s}^{\text{bag}} +
      \mathbf{c}^{\max})` (the code averages probabilities).

    ``instance_scores`` is :math:`U_{i,\hat k}` of the predicted class; ``extras`` as :class:`DSMIL` with
    ``K`` columns.

    Args:
        in_dim, n_classes, hidden, dropout, query_dim, value_dropout, instance_weight: as :class:`DSMIL`.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: list[int] | tuple[int, ...] = (256, 128),
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
        h = self.encode(x, mask)  # [B, N, E]
        c = self.instance_classifier(h)  # [B, N, K]
        max_logits = c.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)  # [B, K]
        u, critical = critical_attention(self.query(h), c, mask, self.scale)  # [B, N, K]
        bag = torch.einsum("bnk,bne->bke", u, self.value(h))  # [B, K, E]
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
    """Section ``dsmil`` (read by ``dsmil`` and ``dsmil_softmax``; the last two keys by ``dsmil`` only)."""

    query_dim: int = 128
    value_dropout: float = 0.0
    instance_weight: float = 0.5  # weight of the max-instance stream's loss; the bag stream gets 1 - instance_weight
    negative_class: int | None = 0  # class index without an output (its bags hold no positive instance); null: none
    average: bool = True  # predict with the mean of both streams' probabilities (false: the bag stream alone)

    def validate(self) -> None:
        if not 0 <= self.instance_weight <= 1:
            raise MedclConfigError("dsmil.instance_weight", "must be in [0, 1]")
        if self.negative_class is not None and self.negative_class < 0:
            raise MedclConfigError("dsmil.negative_class", "must be a class index >= 0 or null")


def _check_negative_class(cfg, n_classes: int) -> None:
    neg = cfg.dsmil.negative_class
    if neg is not None and neg >= n_classes:
        raise MedclConfigError("dsmil.negative_class", f"{neg} is not a class index of {n_classes} classes")


@register_head("dsmil", DSMIL, section="dsmil", section_config=DSMILConfig, instance_score="attention",
               paper="Li et al., 2021")
def _build_dsmil(cfg, in_dim: int, n_classes: int) -> DSMIL:
    d = cfg.dsmil
    _check_negative_class(cfg, n_classes)
    return DSMIL(in_dim, n_classes, **encoder_kwargs(cfg), query_dim=d.query_dim, value_dropout=d.value_dropout,
                 instance_weight=d.instance_weight, negative_class=d.negative_class, average=d.average)


@register_head("dsmil_softmax", DSMILSoftmax, section="dsmil", instance_score="attention",
               paper="Li et al., 2021 (medcl softmax variant)")
def _build_dsmil_softmax(cfg, in_dim: int, n_classes: int) -> DSMILSoftmax:
    d = cfg.dsmil
    return DSMILSoftmax(in_dim, n_classes, **encoder_kwargs(cfg), query_dim=d.query_dim,
                        value_dropout=d.value_dropout, instance_weight=d.instance_weight)
