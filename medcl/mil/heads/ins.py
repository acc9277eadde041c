"""INS: an instance classifier from prototype-based pseudo-labels and instance-level weakly supervised
contrastive learning (Qu et al., 2023, "Rethinking multiple instance learning for whole slide image
classification: a good instance classifier is all you need", arXiv 2307.02249 / IEEE TCSVT; code:
github.com/miccaiif/INS; built on PiCO, Wang et al., ICLR 2022).

Two heads share the training machinery of :class:`INSBase`:

* ``ins`` (:class:`INSHead`): the published method -- the bag prediction is the mean of the instance
  classifier's class probabilities over the bag's instances; no bag head, no bag loss.
* ``ins_attention`` (:class:`INSAttentionHead`): medcl's earlier variant -- the same instance machinery plus a
  gated-attention bag head trained with a bag cross-entropy, which gives the bag prediction (so its results
  measure gated ABMIL with INS's instance losses as auxiliary terms). Not the paper's method.

Runs on one CPU or GPU; under DDP the stateful parts (queue, prototypes, pseudo-label table) are updated from
keys gathered over all ranks, so every rank keeps the same state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.core.errors import MedclConfigError
from medcl.losses import ContrastIds, KeyQueue, gather_no_grad, info_nce, is_distributed, queue_size_for
from medcl.mil.augment import feature_augment, subsample_instances
from medcl.mil.heads.abmil import AttentionPool
from medcl.mil.heads.base import MILHead, MILOutput, TrainingInfo, masked_mean, mlp
from medcl.mil.heads.registry import register_head

__all__ = ["INSAttentionHead", "INSBase", "INSConfig", "INSHead", "mean_instance_probability_logits"]


def mean_instance_probability_logits(instance_logits: Tensor, mask: Tensor) -> Tensor:
    r"""``[B, N, K], [B, N] -> [B, K]``: :math:`\log \frac1n \sum_{i=1}^n \mathrm{softmax}(\mathbf{c}_i)_k` over
    the ``n`` real instances (log-sum-exp of the log-softmax, so finite and exact; its softmax is the mean)."""
    logp = F.log_softmax(instance_logits, -1).masked_fill(~mask.unsqueeze(-1), float("-inf"))
    n = mask.sum(1, keepdim=True).to(logp.dtype)
    return torch.logsumexp(logp, 1) - torch.log(n)


class INSBase(MILHead):
    r"""What both INS heads share: networks, pseudo-labels, prototypes, queue and the instance losses.

    **Networks.** An instance encoder :math:`f` (MLP), a projection :math:`g` to the unit sphere, an instance
    classifier :math:`c: \mathbb{R}^E \to \mathbb{R}^K`, and momentum copies :math:`f', g'` (EMA of :math:`f, g`
    with momentum ``momentum``).

    **Candidate labels.** With a negative class :math:`\nu` (``negative_class``), an instance of a bag of class
    :math:`y` has candidates :math:`C_i = \{\nu, y\}`; instances of negative bags have :math:`C_i = \{\nu\}`
    and are certain negatives. (With ``negative_class=None`` every instance takes its bag's label.)

    **One step** on a batch of bags: instance subsampling (``keep``) and two feature-space views
    (dropout ``feature_dropout``, noise ``noise``) give queries :math:`\mathbf{q}_i = g(f(\tilde{\mathbf{x}}_i))`
    and keys :math:`\mathbf{k}_i = g'(f'(\tilde{\mathbf{x}}'_i))`. Then

    1. pseudo-label :math:`\hat y_i = \arg\max_{k \in C_i} \mathrm{softmax}(c(f(\tilde{\mathbf{x}}_i)))_k`
       (then, if ``bag_constraint``, the **bag constraint**: in each bag of class :math:`y \ne \nu`, the
       instance with the highest probability of :math:`y` gets :math:`\hat y_i = y`);
    2. prototypes :math:`\boldsymbol\mu_k \leftarrow \mathrm{normalise}(\gamma \boldsymbol\mu_k + (1-\gamma)
       \mathbf{q}_i)` for each instance with :math:`\hat y_i = k` (the sequential EMA of PiCO / INS
       ``model.py::INS.forward``, computed in closed form; :math:`\gamma` = ``proto_momentum``);
    3. soft pseudo-labels :math:`\mathbf{s}_i \leftarrow \phi\,\mathbf{s}_i + (1-\phi)\,\mathrm{onehot}(\arg\max_{k
       \in C_i} \mathbf{q}_i^\top \boldsymbol\mu_k)` (with the same optional bag constraint on the margin
       :math:`\mathbf{q}_i^\top(\boldsymbol\mu_y - \boldsymbol\mu_\nu)`), kept per training instance, :math:`\phi`
       going linearly from ``conf_momentum[0]`` to ``conf_momentum[1]`` (``partial_loss.set_conf_ema_m`` and
       ``confidence_update`` in INS ``utils/utils_loss.py``), frozen during the first ``warmup`` of training;
       initialised uniform over :math:`C_i`;
    4. :math:`\mathcal{L}_{\text{cls}} = -\frac1M\sum_i \mathbf{s}_i^\top \log \mathrm{softmax}(c(f(\tilde{\mathbf{x}}_i)))`
       (INS ``partial_loss``) and :math:`\mathcal{L}_{\text{SupCon}}`, the masked InfoNCE
       (:func:`medcl.losses.info_nce`, ``supcon`` mode) of the queries against this step's keys and a queue of
       past keys, positives sharing :math:`\hat y` (INS ``SupConLoss``). During the ``warmup`` the contrastive
       term is instance discrimination instead (MoCo: the positive is the instance's other view), as in INS.

    The queue (:class:`~medcl.losses.KeyQueue`) stores each key with its instance id; it is sized to the data
    (:func:`~medcl.losses.queue_size_for`: at most the number of training instances minus one batch), and an
    instance's own stale copy is excluded by id, so it is never its own negative. This step's key of the same
    instance (the other view) is its positive.

    The bag constraint is medcl's, not the paper's: the official CAMELYON16 loader
    (``dataset_CAMELYON16.py``, ``CAMELYON_16.__getitem__``) builds each instance's candidate set (and the
    ``point`` flag that ``confidence_update`` forces to negative) from the *patch* label, so its pseudo-labels
    are never starved of positives. With bag labels only, as here, PiCO's classifier argmax on small,
    positive-sparse problems never names a positive instance (the classifier leans to the negative class), so
    the positive prototype starves and every pseudo-label collapses to negative; the constraint (the MIL
    assumption: a positive bag holds a positive instance) prevents that. ``bag_constraint=False`` turns it off.

    Args:
        in_dim, n_classes: feature width ``D`` and classes ``K``.
        hidden, dropout: instance encoder MLP.
        proj_dim: projection width.
        queue_size: requested queue length (capped by the data, see above).
        momentum, proto_momentum, conf_momentum, temperature, negative_class, warmup, bag_constraint: see above.
        instance_weight, contrastive_weight: :math:`\lambda_c, \lambda_s` of
            :math:`\lambda_c \mathcal{L}_{\text{cls}} + \lambda_s \mathcal{L}_{\text{SupCon}}`.
        feature_dropout, noise, keep: the views.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: list[int] | tuple[int, ...] = (256, 128),
        dropout: float = 0.0,
        proj_dim: int = 64,
        queue_size: int = 4096,
        momentum: float = 0.99,
        proto_momentum: float = 0.99,
        conf_momentum: tuple[float, float] = (0.95, 0.8),
        temperature: float = 0.1,
        negative_class: int | None = 0,
        warmup: float = 0.1,
        instance_weight: float = 1.0,
        contrastive_weight: float = 0.5,
        feature_dropout: float = 0.1,
        noise: float = 0.1,
        keep: float = 0.8,
        bag_constraint: bool = True,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if negative_class is not None and not 0 <= negative_class < n_classes:
            raise ValueError(f"negative_class {negative_class} outside [0, {n_classes})")
        self.encoder, e = mlp(in_dim, list(hidden), dropout)
        self.embed_dim = e
        self.projector = nn.Sequential(nn.Linear(e, e), nn.ReLU(), nn.Linear(e, proj_dim))
        self.instance_classifier = nn.Linear(e, n_classes)
        self.register_buffer("prototypes", torch.zeros(n_classes, proj_dim))
        self.proj_dim, self.queue_request = proj_dim, int(queue_size)
        self.momentum, self.proto_momentum, self.conf_momentum = momentum, proto_momentum, tuple(conf_momentum)
        self.temperature, self.negative_class, self.warmup = temperature, negative_class, warmup
        self.use_bag_constraint = bool(bag_constraint)
        self.weights = (instance_weight, contrastive_weight)
        self.feature_dropout, self.noise, self.keep = feature_dropout, noise, keep
        # training-only state, sized to the training set: kept out of the state dict (a saved model is
        # independent of the data it was trained on)
        self._train_state: dict[str, Any] = {}

    def _init_momentum_encoder(self) -> None:
        """Momentum copies of the encoder and projector (created last: no random draws, so subclasses that add
        modules first initialise them exactly as before)."""
        self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def instance_probability_scores(self, inst: Tensor, predicted: Tensor, mask: Tensor) -> Tensor:
        """``[B, N]`` instance scores: ``1 - p(negative class)``, or (no negative class) the probability of the
        bag's ``predicted`` class ``[B]``; zero at padding."""
        p = torch.softmax(inst, -1)
        if self.negative_class is not None:
            scores = 1.0 - p[..., self.negative_class]
        else:
            scores = p.gather(2, predicted[:, None, None].expand(-1, p.shape[1], 1)).squeeze(-1)
        return scores * mask

    # ------------------------------------------------------------------------------------- training
    def candidates(self, bag_labels: Tensor) -> Tensor:
        """``[M, K]`` bool candidate classes of instances whose bags have labels ``bag_labels`` ``[M]``."""
        cand = F.one_hot(bag_labels, self.n_classes).bool()
        if self.negative_class is not None:
            cand[:, self.negative_class] = True
        return cand

    def prepare_training(self, info: TrainingInfo) -> None:
        """Size the pseudo-label table (one row per training instance) and the queue to the training set."""
        device = self.prototypes.device
        size = queue_size_for(self.queue_request, info.n_instances, max(1, info.max_batch_instances))
        self._train_state = {
            "queue": KeyQueue(size, self.proj_dim).to(device),
            "confidence": None,  # filled lazily from the bag labels of the instances, see _confidence()
            "n_instances": int(info.n_instances),
        }
        self.prototypes.zero_()

    def _confidence(self, uid: Tensor, bag_labels: Tensor) -> Tensor:
        st = self._train_state
        if st.get("confidence") is None:
            st["confidence"] = torch.zeros(st["n_instances"], self.n_classes, device=uid.device)
            st["seen"] = torch.zeros(st["n_instances"], dtype=torch.bool, device=uid.device)
        conf, seen = st["confidence"], st["seen"]
        new = ~seen[uid]
        cand = self.candidates(bag_labels).float()
        conf[uid] = torch.where(new[:, None], cand / cand.sum(1, keepdim=True), conf[uid])
        seen[uid] = True
        return conf

    def bag_constraint(self, scores: Tensor, labels: Tensor, bag_index: Tensor, bag_y: Tensor) -> Tensor:
        """In every bag of a class ``y`` other than the negative class, the instance(s) with the highest
        ``scores`` (``[M]``, evidence for ``y``) get label ``y``: a positive bag holds a positive instance."""
        if self.negative_class is None or not self.use_bag_constraint:
            return labels
        n = int(bag_index.max()) + 1
        best = torch.full((n,), float("-inf"), dtype=scores.dtype, device=scores.device)
        best = best.scatter_reduce(0, bag_index, scores, reduce="amax")
        top = (scores >= best[bag_index]) & (bag_y != self.negative_class)
        return torch.where(top, bag_y, labels)

    @property
    def pseudo_labels(self) -> Tensor | None:
        """``[n_train_instances, K]`` soft pseudo-labels of the training instances (rows of unseen ones are 0)."""
        return self._train_state.get("confidence")

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.momentum
        for src, dst in ((self.encoder, self.key_encoder), (self.projector, self.key_projector)):
            for p, pk in zip(src.parameters(), dst.parameters()):
                pk.mul_(m).add_(p.detach(), alpha=1 - m)

    @torch.no_grad()
    def _update_prototypes(self, z: Tensor, labels: Tensor) -> None:
        """Sequential EMA ``mu_y <- g mu_y + (1 - g) z`` over the rows in order, in closed form, then normalise."""
        g = self.proto_momentum
        onehot = F.one_hot(labels, self.n_classes).to(z.dtype)  # [M, K]
        rank = onehot.cumsum(0) - 1  # position of each row among the rows of its class
        count = onehot.sum(0)  # [K]
        w = (1 - g) * torch.pow(torch.tensor(g, dtype=z.dtype, device=z.device), count[None, :] - 1 - rank) * onehot
        self.prototypes.mul_(torch.pow(torch.tensor(g, dtype=z.dtype, device=z.device), count)[:, None])
        self.prototypes.add_(w.t() @ z)
        self.prototypes.copy_(F.normalize(self.prototypes, dim=1))

    def instance_losses(self, batch: Any, progress: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""One step's :math:`\mathcal{L}_{\text{cls}}` and :math:`\mathcal{L}_{\text{SupCon}}` (steps 1-4 of the
        class docstring), with the query view's instance embeddings ``[B, N, E]`` and its instance mask ``[B, N]``."""
        if "queue" not in self._train_state:
            raise RuntimeError(f"{type(self).__name__}.prepare_training() must be called before training")
        mask = batch.mask
        x = self.prepare_input(batch.features, mask)
        sel = subsample_instances(mask, self.keep) if self.keep < 1 else mask
        xq = feature_augment(x, sel, self.feature_dropout, self.noise)
        xk = feature_augment(x, sel, self.feature_dropout, self.noise)
        hq_pad = self.encode(xq, sel)  # [B, N, E]
        hq = hq_pad[sel]  # [M, E]
        logits_i = self.instance_classifier(hq)
        zq = F.normalize(self.projector(hq), dim=1)
        with torch.no_grad():
            self._momentum_update()
            zk = F.normalize(self.key_projector(self.key_encoder(xk[sel])), dim=1)
        uid = batch.instance_index[sel]
        bag_y = batch.labels[:, None].expand_as(sel)[sel]
        bag_idx = batch.index[:, None].expand_as(sel)[sel]
        cand = self.candidates(bag_y)
        with torch.no_grad():
            p = torch.softmax(logits_i.detach(), 1)
            pseudo = (p * cand).argmax(1)
            pseudo = self.bag_constraint(p.gather(1, bag_y[:, None]).squeeze(1), pseudo, bag_idx, bag_y)
            # DDP: every rank updates prototypes and pseudo-labels from all ranks' instances
            g_zq, g_pseudo = gather_no_grad(zq.detach()), gather_no_grad(pseudo)
            g_uid, g_bag_y, g_bag_idx = gather_no_grad(uid), gather_no_grad(bag_y), gather_no_grad(bag_idx)
            self._update_prototypes(g_zq, g_pseudo)
            conf = self._confidence(g_uid, g_bag_y)
            if progress >= self.warmup:
                lo, hi = self.conf_momentum
                phi = lo + (hi - lo) * min(1.0, float(progress))
                sim = g_zq @ self.prototypes.t()  # [M, K]
                proto_lab = sim.masked_fill(~self.candidates(g_bag_y), float("-inf")).argmax(1)
                if self.negative_class is not None:
                    margin = sim.gather(1, g_bag_y[:, None]).squeeze(1) - sim[:, self.negative_class]
                    proto_lab = self.bag_constraint(margin, proto_lab, g_bag_idx, g_bag_y)
                conf[g_uid] = phi * conf[g_uid] + (1 - phi) * F.one_hot(proto_lab, self.n_classes).to(conf.dtype)
            target = conf[uid]
        loss_cls = -(target * F.log_softmax(logits_i, 1)).sum(1).mean()

        queue: KeyQueue = self._train_state["queue"]
        n_all = self._train_state["n_instances"]
        k_all = gather_no_grad(zk) if is_distributed() else zk
        # ids: the query carries the instance id as uid; this step's key (the other view) gets a distinct uid
        # so that it can be a positive; queued keys keep the instance id, so a stale copy is excluded.
        q_ids = ContrastIds(uid=uid, source_id=uid, label=pseudo)
        k_ids = ContrastIds(uid=g_uid + n_all, source_id=g_uid, label=g_pseudo)
        # warm-up: instance discrimination (MoCo; positive = the other view, 'gr' masks with the instance as
        # source), then SupCon over pseudo-labels ('label' masks), as in INS
        strategy = "label" if progress >= self.warmup else "gr"
        keys, _, pos, excl = queue.masks_with_batch(strategy, q_ids, k_all, k_ids)
        loss_con = info_nce(zq, keys, pos, excl, temperature=self.temperature, mode="supcon").loss
        queue.push(k_all, ContrastIds(uid=g_uid, source_id=g_uid, label=g_pseudo))
        return loss_cls, loss_con, hq_pad, sel


class INSHead(INSBase):
    r"""INS as published (Qu et al., 2023): a bag is classified by its instances' classifier probabilities.

    Training is :class:`INSBase`'s, with the loss of INS ``train_withbag_cam.py::train`` (``loss = loss_cls +
    args.loss_weight * loss_cont``):

    .. math::

        \mathcal{L} = \lambda_c\,\mathcal{L}_{\text{cls}} + \lambda_s\,\mathcal{L}_{\text{SupCon}}
        \qquad (\lambda_c = 1,\ \lambda_s = \texttt{loss\_weight} = 0.5).

    **Bag prediction** (INS ``train_withbag_cam.py::test``, the README's training script; likewise
    ``train_withbag_cifar.py::test``): the mean over the bag's ``n`` real instances of the instance
    classifier's softmax probabilities,

    .. math::

        P(k \mid \text{bag}) = \frac{1}{n}\sum_{i=1}^{n} \mathrm{softmax}(c(f(\mathbf{x}_i)))_k ,

    which for two classes is the official ``torch.mean(outputs[:, 1], dim=0)`` bag score (its max over
    instances is only a commented-out alternative and a second logged AUC there). ``logits`` ``[B, K]`` are
    :math:`\log P(k \mid \text{bag})` (:func:`mean_instance_probability_logits`), so their softmax is exactly
    this mean. Every class's probability is averaged, so with a negative class a bag is called positive only
    when on average its instances lean positive (the official code reports the threshold-free AUC of this
    score).

    There is no bag head and no bag loss. (The official ``train_bag`` step, run only in the warm-up epochs
    with weight ``--wl``, classifies ``model.py::INS.bag_head``, the mean encoder feature, by its first two
    softmaxed dimensions; the paper does not describe it and medcl leaves it out.)

    ``instance_scores`` is :math:`1 - p_\nu` (with ``negative_class=None``: the probability of the predicted
    class); ``bag_embedding`` is the mean instance embedding :math:`\frac1n\sum_i f(\mathbf{x}_i)`;
    ``extras["instance_logits"]`` ``[B, N, K]``.

    Args: as :class:`INSBase`.
    """

    def __init__(self, in_dim: int, n_classes: int, **kwargs: Any) -> None:
        super().__init__(in_dim, n_classes, **kwargs)
        self._init_momentum_encoder()

    @classmethod
    def from_config(cls, cfg: Any, in_dim: int, n_classes: int) -> INSHead:
        return cls(in_dim, n_classes, **_ins_kwargs(cfg))

    def forward_features(self, x: Tensor, mask: Tensor) -> MILOutput:
        h = self.encode(x, mask)  # [B, N, E]
        inst = self.instance_classifier(h)  # [B, N, K]
        logits = mean_instance_probability_logits(inst, mask)  # [B, K]
        scores = self.instance_probability_scores(inst, logits.argmax(-1), mask)
        return MILOutput(logits, scores, masked_mean(h, mask), {"instance_logits": inst})

    def training_loss(self, batch: Any, progress: float = 0.0) -> dict[str, Tensor]:
        loss_cls, loss_con, _, _ = self.instance_losses(batch, progress)
        wi, wc = self.weights
        total = wi * loss_cls + wc * loss_con
        return {"loss": total, "instance": loss_cls.detach(), "contrastive": loss_con.detach()}


class INSAttentionHead(INSBase):
    r"""medcl's earlier INS variant (``ins_attention``): INS's instance machinery plus a gated-attention bag head.

    The instance encoder, classifier, pseudo-labels, prototypes and contrastive term are :class:`INSBase`'s
    (Qu et al., 2023), but the bag prediction comes from an added bag head -- gated attention pooling of the
    instance embeddings (:class:`~medcl.mil.heads.abmil.AttentionPool`, Ilse et al., 2018) and a linear
    classifier -- trained with a bag cross-entropy:

    .. math::

        \mathcal{L} = \lambda_c\,\mathcal{L}_{\text{cls}} + \lambda_s\,\mathcal{L}_{\text{SupCon}}
        + \lambda_b\,\mathrm{CE}(\mathbf{W}\mathbf{z}, y), \qquad \mathbf{z} = \sum_i a_i f(\tilde{\mathbf{x}}_i).

    The published INS (:class:`INSHead`) classifies a bag by the mean of its instance probabilities and has no
    bag head; this variant's results therefore measure gated ABMIL with INS's instance losses as auxiliary
    terms. ``instance_scores`` as :class:`INSHead`; ``extras["instance_logits"]`` and ``extras["attention"]``.

    Args: as :class:`INSBase`, plus ``attention_dim`` (bag head attention width) and ``bag_weight``
    (:math:`\lambda_b`).
    """

    def __init__(self, in_dim: int, n_classes: int, attention_dim: int = 128, bag_weight: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(in_dim, n_classes, **kwargs)
        e = self.embed_dim
        self.pool = AttentionPool(e, attention_dim, gated=True)
        self.classifier = nn.Linear(e, n_classes)
        self.bag_weight = float(bag_weight)
        self._init_momentum_encoder()

    @classmethod
    def from_config(cls, cfg: Any, in_dim: int, n_classes: int) -> INSAttentionHead:
        return cls(in_dim, n_classes, attention_dim=cfg.abmil.attention_dim, bag_weight=cfg.ins.bag_weight,
                   **_ins_kwargs(cfg))

    def forward_features(self, x: Tensor, mask: Tensor) -> MILOutput:
        h = self.encode(x, mask)
        inst = self.instance_classifier(h)  # [B, N, K]
        z, a, _ = self.pool(h, mask)
        logits = self.classifier(z)
        scores = self.instance_probability_scores(inst, logits.argmax(-1), mask)
        return MILOutput(logits, scores, z, {"instance_logits": inst, "attention": a})

    def training_loss(self, batch: Any, progress: float = 0.0) -> dict[str, Tensor]:
        loss_cls, loss_con, hq_pad, sel = self.instance_losses(batch, progress)
        z, _, _ = self.pool(hq_pad, sel)
        loss_bag = F.cross_entropy(self.classifier(z), batch.labels)
        wi, wc = self.weights
        total = wi * loss_cls + wc * loss_con + self.bag_weight * loss_bag
        return {"loss": total, "instance": loss_cls.detach(), "contrastive": loss_con.detach(), "bag": loss_bag.detach()}


@dataclass
class INSConfig:
    """Section ``ins`` (read by ``ins`` and ``ins_attention``; ``bag_weight`` by ``ins_attention`` only, whose
    bag head also reads ``abmil.attention_dim``)."""

    proj_dim: int = 64
    queue_size: int = 4096  # capped at the number of training instances
    momentum: float = 0.99  # momentum encoder
    proto_momentum: float = 0.99
    conf_momentum: tuple[float, float] = (0.95, 0.8)  # pseudo-label EMA, linear from first to last epoch
    temperature: float = 0.1
    negative_class: int | None = 0  # class of bags that hold only negative instances (None: no such class)
    warmup: float = 0.1  # fraction of training before pseudo-labels start moving
    instance_weight: float = 1.0
    contrastive_weight: float = 0.5
    bag_weight: float = 1.0  # ins_attention only: weight of its bag head's cross-entropy
    feature_dropout: float = 0.1
    noise: float = 0.1
    keep: float = 0.8  # instance subsampling: fraction of a bag's instances kept in a training step
    bag_constraint: bool = True  # medcl's: the top instance of each positive bag is pseudo-labelled positive

    def validate(self) -> None:
        if not 0 < self.keep <= 1:
            raise MedclConfigError("ins.keep", "must be in (0, 1]")
        if self.queue_size < 1:
            raise MedclConfigError("ins.queue_size", "must be >= 1")


def _ins_kwargs(cfg: Any) -> dict[str, Any]:
    """The :class:`INSBase` arguments of a config (sections ``encoder`` and ``ins``)."""
    i = cfg.ins
    return dict(
        hidden=list(cfg.encoder.hidden), dropout=cfg.encoder.dropout, proj_dim=i.proj_dim, queue_size=i.queue_size,
        momentum=i.momentum, proto_momentum=i.proto_momentum, conf_momentum=i.conf_momentum,
        temperature=i.temperature, negative_class=i.negative_class, warmup=i.warmup,
        instance_weight=i.instance_weight, contrastive_weight=i.contrastive_weight,
        feature_dropout=i.feature_dropout, noise=i.noise, keep=i.keep, bag_constraint=i.bag_constraint,
    )


@register_head("ins", INSHead, section="ins", section_config=INSConfig, instance_score="instance probability",
               paper="Qu et al., 2023")
def _build_ins(cfg, in_dim: int, n_classes: int) -> INSHead:
    return INSHead.from_config(cfg, in_dim, n_classes)


@register_head("ins_attention", INSAttentionHead, section="ins", instance_score="instance probability",
               paper="Qu et al., 2023 (medcl gated-attention bag head variant)")
def _build_ins_attention(cfg, in_dim: int, n_classes: int) -> INSAttentionHead:
    return INSAttentionHead.from_config(cfg, in_dim, n_classes)
