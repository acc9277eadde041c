"""MIL heads: all multi-class and mask-aware (see :mod:`medcl.mil.heads.base` for the contract).

Every head registers itself in :mod:`medcl.mil.heads.registry` (name, class, config section, what its
instance scores are, paper); the import of each head module below runs its registration:

=============  ==============================================================  ==========================
name           head                                                            paper
=============  ==============================================================  ==========================
meanpool       :class:`~medcl.mil.heads.pooling.MeanPoolMIL`                  Wang et al., 2018
maxpool        :class:`~medcl.mil.heads.pooling.MaxPoolMIL`                   Wang et al., 2018
abmil          :class:`~medcl.mil.heads.abmil.ABMIL`                          Ilse et al., 2018
gated_abmil    :class:`~medcl.mil.heads.abmil.ABMIL` (``gated=True``)         Ilse et al., 2018
transmil       :class:`~medcl.mil.heads.transmil.TransMIL`                    Shao et al., 2021
dsmil          :class:`~medcl.mil.heads.dsmil.DSMIL`                          Li et al., 2021
dsmil_softmax  :class:`~medcl.mil.heads.dsmil.DSMILSoftmax` (medcl variant)   Li et al., 2021
clam_sb        :class:`~medcl.mil.heads.clam.CLAMSB`                          Lu et al., 2021
ins            :class:`~medcl.mil.heads.ins.INSHead`                          Qu et al., 2023
ins_attention  :class:`~medcl.mil.heads.ins.INSAttentionHead` (medcl variant) Qu et al., 2023
scmil          :class:`~medcl.mil.heads.scmil.SCMILHead` (wraps one of the above)   Juyal et al., 2024
=============  ==============================================================  ==========================
"""

from __future__ import annotations

# importing a head module runs its registration (medcl.mil.heads.registry)
from medcl.mil.heads.abmil import ABMIL, AttentionPool
from medcl.mil.heads.base import MILHead, MILOutput, TrainingInfo, masked_max, masked_mean, masked_softmax
from medcl.mil.heads.clam import CLAMSB
from medcl.mil.heads.dsmil import DSMIL, DSMILSoftmax
from medcl.mil.heads.ins import INSAttentionHead, INSHead
from medcl.mil.heads.pooling import MaxPoolMIL, MeanPoolMIL
from medcl.mil.heads.registry import (
    HeadSpec,
    build_head,
    config_sections,
    head_names,
    head_spec,
    instance_score_name,
    register_head,
)
from medcl.mil.heads.scmil import SCMILHead
from medcl.mil.heads.transmil import TransMIL

__all__ = [
    "ABMIL", "AttentionPool", "CLAMSB", "DSMIL", "DSMILSoftmax", "HeadSpec", "INSAttentionHead", "INSHead",
    "MILHead", "MILOutput", "MaxPoolMIL", "MeanPoolMIL", "SCMILHead", "TrainingInfo", "TransMIL", "build_head",
    "config_sections", "head_names", "head_spec", "instance_score_name", "masked_max", "masked_mean",
    "masked_softmax", "register_head",
]
