"""Backbones with named stages, SSL heads, the EMA teacher, and weight save/load with a report.

>>> from medcl.models import BackboneConfig, build_backbone
>>> net = build_backbone(BackboneConfig(in_channels=1, filters=(16, 32, 64, 128)))
>>> net.encoder_stage_names, net.stage_strides["decoder.1"]
(['encoder.0', 'encoder.1', 'encoder.2'], (2, 2, 2))
"""

from medcl.models.adapt import adapt_first_layer
from medcl.models.backbone import Backbone, BackboneConfig, BackboneOutput
from medcl.models.ema import EMATeacher
from medcl.models.factory import build_backbone
from medcl.models.heads import ConvProjection, ProjectionMLP, ReconstructionHead, VoCoHead, global_pool
from medcl.models.report import LoadReport
from medcl.models.weights import backbone_from_file, convert_monai_state_dict, load_backbone, save_backbone

__all__ = [
    "Backbone",
    "BackboneConfig",
    "BackboneOutput",
    "build_backbone",
    "ProjectionMLP",
    "ConvProjection",
    "VoCoHead",
    "ReconstructionHead",
    "global_pool",
    "EMATeacher",
    "save_backbone",
    "load_backbone",
    "backbone_from_file",
    "convert_monai_state_dict",
    "LoadReport",
    "adapt_first_layer",
]
