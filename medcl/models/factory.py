"""Build a backbone from its config."""

from __future__ import annotations

from typing import Any

from medcl.config import from_dict
from medcl.core.errors import MedclConfigError
from medcl.models.backbone import Backbone, BackboneConfig


def build_backbone(cfg: BackboneConfig | dict[str, Any]) -> Backbone:
    """``BackboneConfig`` (or its plain-dict form, validated with :func:`medcl.config.from_dict`) -> backbone.

    >>> net = build_backbone({"name": "dynunet", "in_channels": 1, "filters": [16, 32, 64, 128]})
    >>> [s["stride"] for s in net.describe()][-1]
    [1, 1, 1]
    """
    if isinstance(cfg, dict):
        cfg = from_dict(BackboneConfig, cfg, prefix="backbone")
    cfg.validate()
    if cfg.name == "dynunet":
        from medcl.models.dynunet import DynUNetBackbone

        return DynUNetBackbone(cfg)
    if cfg.name == "swinunetr":
        from medcl.models.swin import SwinUNETRBackbone

        return SwinUNETRBackbone(cfg)
    if cfg.name in ("plainconv", "resenc"):
        from medcl.models.nnunet import NnUNetBackbone

        return NnUNetBackbone(cfg)
    raise MedclConfigError("backbone.name", f"unknown backbone {cfg.name!r}; choose dynunet, swinunetr, plainconv or resenc")

