"""Contrastive, dense, positional and reconstruction losses (DESIGN.md, ideas 1 to 3).

The heart is :func:`info_nce`, one masked InfoNCE over rectangular similarities; G^R, G^D, G^D-, SupCon,
INS and SC-MIL are mask builders around it, and the queue (:class:`KeyQueue`), DDP gathering
(:func:`gather_with_grad`, :func:`distributed_info_nce`) and MoCHi (:func:`mochi_negatives`) are thin
wrappers. The dense loss (:func:`local_contrastive_loss`), VoCo (:func:`voco_loss`) and masked
reconstruction (:func:`masked_reconstruction_loss`) are separate functions.
"""

from medcl.losses.contrastive import (
    MODES,
    InfoNCEResult,
    gd_masks,
    gd_minus_masks,
    gr_masks,
    info_nce,
    info_nce_terms,
    label_masks,
)
from medcl.losses.distributed import (
    distributed_info_nce,
    gather_ids,
    gather_no_grad,
    gather_with_grad,
    global_offset,
    is_distributed,
    rank_counts,
)
from medcl.losses.ids import STRATEGIES, ContrastIds, build_masks
from medcl.losses.local import (
    LocalLossResult,
    OverlapPoints,
    correspondence,
    local_contrastive_loss,
    local_loss_for_views,
    read_features,
    sample_overlap_points,
    view_pairs,
)
from medcl.losses.mochi import MochiNegatives, mochi_as_keys, mochi_negatives
from medcl.losses.position import VoCoResult, voco_loss, voco_overlap_targets
from medcl.losses.queue import KeyQueue, queue_size_for
from medcl.losses.reconstruction import block_normalised, masked_reconstruction_loss

__all__ = [
    "MODES",
    "STRATEGIES",
    "ContrastIds",
    "InfoNCEResult",
    "KeyQueue",
    "LocalLossResult",
    "MochiNegatives",
    "OverlapPoints",
    "VoCoResult",
    "build_masks",
    "correspondence",
    "distributed_info_nce",
    "gather_ids",
    "gather_no_grad",
    "gather_with_grad",
    "gd_masks",
    "gd_minus_masks",
    "global_offset",
    "gr_masks",
    "info_nce",
    "info_nce_terms",
    "is_distributed",
    "label_masks",
    "local_contrastive_loss",
    "local_loss_for_views",
    "masked_reconstruction_loss",
    "block_normalised",
    "mochi_as_keys",
    "mochi_negatives",
    "queue_size_for",
    "rank_counts",
    "read_features",
    "sample_overlap_points",
    "view_pairs",
    "voco_loss",
    "voco_overlap_targets",
]
