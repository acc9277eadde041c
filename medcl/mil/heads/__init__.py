"""MIL heads: all multi-class and mask-aware (see :mod:`medcl.mil.heads.base` for the contract).

=============  ==============================================================  ==========================
name           head                                                            paper
=============  ==============================================================  ==========================
meanpool       :class:`~medcl.mil.heads.pooling.MeanPoolMIL`                  Wang et al., 2018
maxpool        :class:`~medcl.mil.heads.pooling.MaxPoolMIL`                   Wang et al., 2018
abmil          :class:`~medcl.mil.heads.abmil.ABMIL`                          Ilse et al., 2018
gated_abmil    :class:`~medcl.mil.heads.abmil.ABMIL` (``gated=True``)         Ilse et al., 2018
transmil       :class:`~medcl.mil.heads.transmil.TransMIL`                    Shao et al., 2021
dsmil          :class:`~medcl.mil.heads.dsmil.DSMIL`                          Li et al., 2021
clam_sb        :class:`~medcl.mil.heads.clam.CLAMSB`                          Lu et al., 2021
ins            :class:`~medcl.mil.ins.INSHead`                                Qu et al., 2023
scmil          :class:`~medcl.mil.scmil.SCMILHead` (wraps one of the above)   Juyal et al., 2024
=============  ==============================================================  ==========================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medcl.mil.heads.abmil import ABMIL, AttentionPool
from medcl.mil.heads.base import MILHead, MILOutput, TrainingInfo, masked_max, masked_mean, masked_softmax
from medcl.mil.heads.clam import CLAMSB
from medcl.mil.heads.dsmil import DSMIL
from medcl.mil.heads.pooling import MaxPoolMIL, MeanPoolMIL
from medcl.mil.heads.transmil import TransMIL

if TYPE_CHECKING:
    from medcl.mil.config import MILConfig

HEADS = ("meanpool", "maxpool", "abmil", "gated_abmil", "transmil", "dsmil", "clam_sb", "ins", "scmil")


def build_head(cfg: MILConfig, in_dim: int, n_classes: int, kind: str | None = None) -> MILHead:
    """The head named by ``cfg.head`` (or ``kind``), sized to ``in_dim`` features and ``n_classes`` classes."""
    kind = kind or cfg.head
    enc = {"hidden": list(cfg.encoder.hidden), "dropout": cfg.encoder.dropout}
    if kind == "meanpool":
        return MeanPoolMIL(in_dim, n_classes, **enc)
    if kind == "maxpool":
        return MaxPoolMIL(in_dim, n_classes, **enc)
    if kind in ("abmil", "gated_abmil"):
        a = cfg.abmil
        return ABMIL(in_dim, n_classes, **enc, attention_dim=a.attention_dim, gated=a.gated or kind == "gated_abmil",
                     attention_dropout=a.dropout)
    if kind == "transmil":
        t = cfg.transmil
        return TransMIL(in_dim, n_classes, **enc, dim=t.dim, heads=t.heads, layers=t.layers, landmarks=t.landmarks,
                        pinv_iterations=t.pinv_iterations, attention_dropout=t.dropout)
    if kind == "dsmil":
        d = cfg.dsmil
        return DSMIL(in_dim, n_classes, **enc, query_dim=d.query_dim, value_dropout=d.value_dropout,
                     instance_weight=d.instance_weight)
    if kind == "clam_sb":
        c = cfg.clam
        return CLAMSB(in_dim, n_classes, hidden=enc["hidden"], dropout=c.dropout, attention_dim=c.attention_dim, k=c.k,
                      instance_loss=c.instance_loss, bag_weight=c.bag_weight, subtyping=c.subtyping)
    if kind == "ins":
        from medcl.mil.ins import INSHead

        return INSHead.from_config(cfg, in_dim, n_classes)
    if kind == "scmil":
        from medcl.mil.scmil import SCMILHead

        base = build_head(cfg, in_dim, n_classes, kind=cfg.scmil.base)
        return SCMILHead.from_config(cfg, base)
    raise ValueError(f"unknown MIL head '{kind}' (known: {', '.join(HEADS)})")


__all__ = [
    "ABMIL", "AttentionPool", "CLAMSB", "DSMIL", "HEADS", "MILHead", "MILOutput", "MaxPoolMIL", "MeanPoolMIL",
    "TrainingInfo", "TransMIL", "build_head", "masked_max", "masked_mean", "masked_softmax",
]
