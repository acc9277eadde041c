"""Multiple-instance learning on bags of patch features (whole slides, classic MIL tables).

Bags with masks (:mod:`medcl.mil.bags`), mask-aware multi-class MIL heads (:mod:`medcl.mil.heads`:
mean / max pooling, ABMIL and gated ABMIL, TransMIL, DSMIL, CLAM-SB), INS (:mod:`medcl.mil.ins`),
SC-MIL (:mod:`medcl.mil.scmil`) and cross-validated training (:mod:`medcl.mil.train`, ``medcl mil train``).
Whole-slide tiling, feature extraction and heatmaps live beside them (``tiling``, ``extract``, ``heatmap``).

The package import is light (``medcl --help`` imports :mod:`medcl.mil.cli`); the public names below are
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Bag": "medcl.mil.bags",
    "BagBatch": "medcl.mil.bags",
    "BagDataset": "medcl.mil.bags",
    "collate_bags": "medcl.mil.bags",
    "load_bags": "medcl.mil.bags",
    "MILOutput": "medcl.mil.heads",
    "MILHead": "medcl.mil.heads",
    "build_head": "medcl.mil.heads",
    "HEADS": "medcl.mil.heads",
    "INSHead": "medcl.mil.ins",
    "SCMILHead": "medcl.mil.scmil",
    "MILConfig": "medcl.mil.config",
    "fit_head": "medcl.mil.train",
    "evaluate": "medcl.mil.train",
    "cross_validate": "medcl.mil.experiment",
    "load_mil_model": "medcl.mil.train",
    "save_mil_model": "medcl.mil.train",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medcl.mil' has no attribute '{name}'")
