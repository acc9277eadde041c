"""Multiple-instance learning on bags of patch features (whole slides, classic MIL tables).

Bags with masks (:mod:`medcl.mil.bags`), mask-aware multi-class MIL heads in one registry
(:mod:`medcl.mil.heads`: mean / max pooling, ABMIL and gated ABMIL, TransMIL, DSMIL, CLAM-SB, INS, SC-MIL),
cross-validated training (:mod:`medcl.mil.train`, ``medcl mil train``) and heatmaps of a trained model
(:mod:`medcl.mil.heatmap`). Slides, tiles and patch features are :mod:`medcl.wsi`'s job.

The package import is light (``medcl --help`` imports :mod:`medcl.mil.cli`); the public names below are
imported on first use.
"""

from __future__ import annotations

from medcl.core.lazy import lazy_exports

_LAZY = {
    "Bag": "medcl.mil.bags",
    "BagBatch": "medcl.mil.bags",
    "BagDataset": "medcl.mil.bags",
    "collate_bags": "medcl.mil.bags",
    "load_bags": "medcl.mil.bags",
    "MILOutput": "medcl.mil.heads",
    "MILHead": "medcl.mil.heads",
    "build_head": "medcl.mil.heads",
    "head_names": "medcl.mil.heads",
    "INSHead": "medcl.mil.heads.ins",
    "SCMILHead": "medcl.mil.heads.scmil",
    "MILConfig": "medcl.mil.config",
    "fit_head": "medcl.mil.train",
    "evaluate": "medcl.mil.train",
    "cross_validate": "medcl.mil.experiment",
    "load_mil_model": "medcl.mil.train",
    "save_mil_model": "medcl.mil.train",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
