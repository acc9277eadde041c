"""The MIL head contract, masked reductions and the instance MLP shared by every head.

Every head maps a padded batch of bags to a :class:`MILOutput`::

    head(x [B, N, D], mask [B, N] bool)  ->  MILOutput(logits [B, K], instance_scores [B, N] | None,
                                                       bag_embedding [B, E], extras: dict)
    head.loss(output, labels [B]) -> {"loss": total, ...terms}
    head.predict(x, mask) -> probabilities [B, K]

``mask`` is ``True`` for real instances. **Padding never changes a bag's output**: padded rows are zeroed
before anything else, softmaxes over instances put ``-inf`` on padding, means divide by the real count,
maxima ignore padding, and no operation mixes statistics across the bags of a batch. A bag therefore gets
the same logits alone and in any padded batch (up to float rounding), in ``eval()`` mode.

Heads run their instance MLP through :meth:`MILHead.encode` (``h = self.encode(x, mask)``), which training may
switch to the real rows only (:func:`packed_apply`, ``train.pack_instances``): padding rows of ``h`` are then
zero instead of ``encoder(0)``, which no head may read.

Heads are multi-class: ``K >= 2`` classes with a softmax cross-entropy. Features are standardised inside the
head (``(x - mean) / std`` with buffers fitted on the training fold), so a saved head takes raw features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MILOutput:
    """What a head returns.

    Attributes:
        logits: ``[B, K]`` class logits of each bag.
        instance_scores: ``[B, N]`` one score per instance (attention weight or instance logit, see each head;
            meaningless at padding), or ``None`` for heads without one.
        bag_embedding: ``[B, E]`` the pooled bag representation the classifier reads (SC-MIL contrasts it).
        extras: head-specific tensors (``attention``, ``instance_logits`` ...).
    """

    logits: Tensor
    instance_scores: Tensor | None
    bag_embedding: Tensor
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingInfo:
    """What a head may size itself to before training (INS sizes its pseudo-label table and queue)."""

    n_bags: int
    n_instances: int
    labels: Tensor  # [n_bags] int64
    epochs: int
    steps_per_epoch: int
    max_batch_instances: int  # most real instances one training batch can hold


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax of ``scores`` over ``dim`` with ``-inf`` where ``mask`` is False (zero weight there).

    Every slice must hold at least one ``True`` (a bag has >= 1 instance).
    """
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=dim)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``[B, N, E], [B, N] -> [B, E]``: mean over the real instances of each bag."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """``[B, N, E], [B, N] -> [B, E]``: element-wise maximum over the real instances of each bag."""
    return x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)


def instance_rank(mask: Tensor) -> Tensor:
    """``[B, N]`` position of each real instance among the real instances of its bag (0, 1, ...); padding: -1."""
    return torch.where(mask, mask.long().cumsum(1) - 1, torch.full_like(mask, -1, dtype=torch.long))


_ROW_WISE = (nn.Linear, nn.ReLU, nn.GELU, nn.Tanh, nn.Identity, nn.Dropout)


def _row_wise_layers(module: nn.Module) -> list[nn.Module] | None:
    """The leaf layers of ``module`` (nested ``Sequential`` s flattened) when each acts on one instance row at a
    time, else ``None``."""
    if isinstance(module, nn.Sequential):
        out: list[nn.Module] = []
        for m in module:
            sub = _row_wise_layers(m)
            if sub is None:
                return None
            out += sub
        return out
    return [module] if isinstance(module, _ROW_WISE) else None


def packed_apply(module: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """``module`` (a row-wise MLP, see :func:`mlp`) on the real instances of ``x`` only.

    ``x [B, N, D], mask [B, N] -> [B, N, E]``: the rows where ``mask`` is True equal ``module(x)``'s up to float
    rounding (the matrix products see ``M`` real rows instead of ``B * N``); padding rows are zero instead of
    ``module(0)``, which no head reads. Dropout draws its noise over the padded shape ``[B, N, E]`` exactly as
    ``module(x)`` would (:func:`dropout_noise`) and keeps the real rows' part, so the random stream, and every later
    draw, is the padded computation's. Falls back to ``module(x)`` for other modules.
    """
    layers = _row_wise_layers(module)
    if layers is None:
        return module(x)
    shape = mask.shape
    h = x[mask]  # [M, D]
    for layer in layers:
        if isinstance(layer, nn.Dropout):
            if layer.training and layer.p > 0:
                h = h * dropout_noise((*shape, h.shape[-1]), layer.p, mask, h.dtype)
        else:
            h = layer(h)
    return h.new_zeros((*shape, h.shape[-1])).index_put((mask,), h)


def dropout_noise(shape: tuple[int, ...], p: float, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The multiplier ``F.dropout(x, p)`` applies to an ``x`` of ``shape`` (0 or ``1 / (1 - p)``), drawn from the
    global generator exactly as ``F.dropout`` draws it, at the rows where ``mask`` (``shape[:-1]``) is True:
    ``[M, shape[-1]]``.

    On a CPU ``F.dropout(x)`` is ``x * (bernoulli(1 - p) / (1 - p))`` over the whole shape; drawing that Bernoulli
    noise directly and scaling the kept rows only gives the same numbers and leaves the generator in the same
    state, without a padded tensor of ones and two padded passes. Elsewhere (CUDA's fused dropout draws otherwise)
    it is ``F.dropout`` of ones.
    """
    if mask.device.type == "cpu":
        return torch.empty(shape, dtype=dtype).bernoulli_(1 - p)[mask].div_(1 - p)
    return F.dropout(torch.ones(shape, dtype=dtype, device=mask.device), p, training=True)[mask]


def set_instance_packing(head: nn.Module, on: bool) -> None:
    """Switch :meth:`MILHead.encode` of ``head`` and every head inside it (SC-MIL's base) to packed rows."""
    for m in head.modules():
        if isinstance(m, MILHead):
            m.pack_instances = bool(on)


def mlp(in_dim: int, hidden: list[int] | tuple[int, ...], dropout: float = 0.0) -> tuple[nn.Module, int]:
    """``Linear -> ReLU -> Dropout`` per width in ``hidden``; returns the module and its output width."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    return (nn.Sequential(*layers) if layers else nn.Identity()), d


class MILHead(nn.Module, ABC):
    """Base class: standardisation buffers, padding hygiene, cross-entropy loss, prediction.

    Subclasses implement :meth:`forward_features` on standardised, padding-zeroed features. Heads with a
    training step of their own (INS, SC-MIL: two views, queues) override :meth:`training_loss`.

    Args:
        in_dim: instance feature width ``D``.
        n_classes: number of classes ``K >= 2``.
    """

    # encode() on the real instances only (training speed; fit_head sets it, see train.pack_instances)
    pack_instances: bool = False

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a MIL head needs at least two classes, got {n_classes}")
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))

    def set_standardization(self, mean: Tensor, std: Tensor) -> None:
        """Set the feature standardisation (fit on the training bags only); ``std`` is clamped at 1e-6."""
        self.feature_mean.copy_(mean.to(self.feature_mean))
        self.feature_std.copy_(std.to(self.feature_std).clamp_min(1e-6))

    def prepare_input(self, x: Tensor, mask: Tensor) -> Tensor:
        """Standardise ``x`` ``[B, N, D]`` and set padding rows to exactly zero (garbage or NaN included)."""
        if x.ndim != 3 or mask.shape != x.shape[:2]:
            raise ValueError(f"expected x [B, N, D] and mask [B, N], got {tuple(x.shape)} and {tuple(mask.shape)}")
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"this head takes {self.in_dim} features per instance, got {x.shape[-1]}")
        x = (x.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        mask = mask.bool()
        return self.forward_features(self.prepare_input(x, mask), mask)

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """The instance MLP ``self.encoder``: ``[B, N, D] -> [B, N, E]``.

        Padded (``self.encoder(x)`` on every row) unless :attr:`pack_instances`: then on the real rows only
        (:func:`packed_apply`; the same values up to float rounding, zero at padding, the same random draws).
        """
        if self.pack_instances:
            return packed_apply(self.encoder, x, mask)
        return self.encoder(x)

    @abstractmethod
    def forward_features(self, x: Tensor, mask: Tensor) -> MILOutput:
        """The head proper, on standardised features ``[B, N, D]`` that are zero at padding."""

    def loss(self, output: MILOutput, labels: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        """Bag cross-entropy; ``"loss"`` is the total."""
        ce = F.cross_entropy(output.logits, labels)
        return {"loss": ce, "ce": ce.detach()}

    def training_loss(self, batch: Any, progress: float = 0.0) -> dict[str, Tensor]:
        """The loss of one training step on a :class:`~medcl.mil.bags.BagBatch`.

        ``progress`` in ``[0, 1]`` is the fraction of training done (schedules use it).
        """
        out = self(batch.features, batch.mask)
        return self.loss(out, batch.labels)

    def prepare_training(self, info: TrainingInfo) -> None:
        """Called once before training with the training set's sizes (no-op by default)."""

    def after_step(self) -> None:
        """Called after each optimiser step (momentum encoders update here; no-op by default)."""

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Class probabilities ``[B, K]`` (evaluated in ``eval()`` mode; the previous mode is restored)."""
        was = self.training
        self.eval()
        try:
            return torch.softmax(self(x, mask).logits, dim=-1)
        finally:
            self.train(was)
