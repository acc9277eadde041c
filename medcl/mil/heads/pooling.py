"""Mean and max pooling MIL heads (the embedding-level baselines of Wang et al., 2018, "Revisiting
multiple instance neural networks", Pattern Recognition 74)."""

from __future__ import annotations

from torch import Tensor, nn

from medcl.mil.heads.base import MILHead, MILOutput, masked_max, masked_mean, mlp
from medcl.mil.heads.registry import encoder_kwargs, register_head


class MeanPoolMIL(MILHead):
    r"""Mean-pooling MIL.

    Given a bag :math:`\mathbf{X} = [\mathbf{x}_1, \ldots, \mathbf{x}_n]^\top \in \mathbb{R}^{n \times D}`
    (its real instances only), an instance MLP gives :math:`\mathbf{h}_i = f(\mathbf{x}_i) \in \mathbb{R}^E`,
    the bag embedding is their mean and a linear classifier gives the logits:

    .. math::

        \mathbf{z} = \frac{1}{n} \sum_{i=1}^{n} \mathbf{h}_i, \qquad
        \mathbf{s} = \mathbf{W} \mathbf{z} + \mathbf{b} \in \mathbb{R}^K.

    Because the classifier is linear, :math:`\mathbf{s} = \frac{1}{n}\sum_i (\mathbf{W}\mathbf{h}_i + \mathbf{b})`
    exactly; ``instance_scores`` is the instance logit :math:`(\mathbf{W}\mathbf{h}_i + \mathbf{b})_{\hat k}` of
    the predicted class :math:`\hat k` (``extras["instance_logits"]`` ``[B, N, K]`` has all classes).

    Args:
        in_dim: instance feature width ``D``.
        n_classes: number of classes ``K``.
        hidden: widths of the instance MLP (``E`` is the last one, ``D`` if empty).
        dropout: dropout after each MLP layer.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: list[int] = (256, 128), dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes)
        self.encoder, self.embed_dim = mlp(in_dim, list(hidden), dropout)
        self.classifier = nn.Linear(self.embed_dim, n_classes)

    def forward_features(self, x: Tensor, mask: Tensor) -> MILOutput:
        h = self.encode(x, mask)  # [B, N, E]
        z = masked_mean(h, mask)  # [B, E]
        logits = self.classifier(z)
        inst = self.classifier(h)  # [B, N, K]
        k = logits.argmax(-1)
        scores = inst.gather(2, k[:, None, None].expand(-1, inst.shape[1], 1)).squeeze(-1)
        return MILOutput(logits, scores, z, {"instance_logits": inst})


class MaxPoolMIL(MILHead):
    r"""Max-pooling MIL.

    With :math:`\mathbf{h}_i = f(\mathbf{x}_i) \in \mathbb{R}^E` for the ``n`` real instances,

    .. math::

        z_e = \max_{i=1}^{n} h_{i,e} \quad (e = 1, \ldots, E), \qquad
        \mathbf{s} = \mathbf{W} \mathbf{z} + \mathbf{b} \in \mathbb{R}^K.

    No single instance score explains the bag (each embedding dimension may come from another instance), so
    ``instance_scores`` is ``None``; ``extras["argmax"]`` ``[B, E]`` gives the winning instance per dimension.

    Args: as :class:`MeanPoolMIL`.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: list[int] = (256, 128), dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes)
        self.encoder, self.embed_dim = mlp(in_dim, list(hidden), dropout)
        self.classifier = nn.Linear(self.embed_dim, n_classes)

    def forward_features(self, x: Tensor, mask: Tensor) -> MILOutput:
        h = self.encode(x, mask)
        z = masked_max(h, mask)
        argmax = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).argmax(1)
        return MILOutput(self.classifier(z), None, z, {"argmax": argmax})


@register_head("meanpool", MeanPoolMIL, instance_score="instance logit", paper="Wang et al., 2018")
def _build_meanpool(cfg, in_dim: int, n_classes: int) -> MeanPoolMIL:
    return MeanPoolMIL(in_dim, n_classes, **encoder_kwargs(cfg))


@register_head("maxpool", MaxPoolMIL, instance_score="instance logit", paper="Wang et al., 2018")
def _build_maxpool(cfg, in_dim: int, n_classes: int) -> MaxPoolMIL:
    return MaxPoolMIL(in_dim, n_classes, **encoder_kwargs(cfg))
