"""nnU-Net's own networks (``PlainConvUNet``, ``ResidualEncoderUNet``) as backbones with named stages.

Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation",
Nature Methods 2021, and "nnU-Net Revisited" (residual encoder presets), MICCAI 2024; the networks are
``dynamic_network_architectures`` (the package nnU-Net v2 builds them with).

The network is built exactly as nnU-Net builds it from a plans file (the same class and keyword arguments,
:func:`medcl.models.nnunet_plans.nnunet_architecture`, and nnU-Net's initialisation), and its modules are
re-registered under medcl's stage names, so that every key maps 1:1 to nnU-Net's (key maps ``nnunet-plainconv`` /
``nnunet-resenc``, registered below; :func:`to_nnunet_state_dict` runs them backwards for the export):

=========================================  ===============================  =========================================
nnU-Net key prefix                         medcl prefix                     what
=========================================  ===============================  =========================================
``encoder.stem.`` (resenc)                 ``encoder.0.stem.``              one conv block before stage 0
``encoder.stages.0.``                      ``encoder.0.`` (resenc:          stage 0 (stride ``strides[0]``)
                                           ``encoder.0.stage.``)
``encoder.stages.i.``, ``0 < i < n-1``     ``encoder.i.``                   encoder stage ``i``
``encoder.stages.{n-1}.``                  ``bottleneck.``                  the lowest resolution
``decoder.transpconvs.j.``                 ``decoder.j.transpconv.``        up-sampling of decoder stage ``j``
``decoder.stages.j.``                      ``decoder.j.convs.``             convolutions after the skip concatenation
``decoder.seg_layers.{n-2}.``              ``head.``                        the full-resolution 1x1x1 segmentation layer
``decoder.seg_layers.j``, ``j < n-2``      --                               deep-supervision outputs (not built)
``decoder.encoder.*``                      --                               the same tensors as ``encoder.*``
=========================================  ===============================  =========================================

The forward pass is nnU-Net's without deep supervision (``decoder[j]``: transposed convolution, concatenation
``(up, skip)``, convolutions), returning every stage's map. Stages for 3 levels of 4, 8, 16 features, strides
1, 2, 2 and a ``[B, 1, 16, 16, 16]`` input: ``encoder.0`` 4 x 16^3, ``encoder.1`` 8 x 8^3, ``bottleneck`` 16 x 4^3,
``decoder.0`` 8 x 8^3, ``decoder.1`` 4 x 16^3, ``head`` classes x 16^3.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from medcl.core.errors import MedclDataError
from medcl.models.backbone import Backbone, BackboneConfig, as_triple
from medcl.models.keymaps import KeyMap, find_component, get_keymap, register_keymap, to_foreign
from medcl.models.nnunet_plans import (
    architecture_of_checkpoint,
    missing_networks_error,
    nnunet_architecture,
    resolve_nnunet_config,
)

__all__ = ["NnUNetBackbone", "build_upstream", "nnunet_key_map", "to_nnunet_state_dict"]

_CLASSES = {  # the names nnU-Net's plans use -> the classes (only these are built)
    "torch.nn.modules.conv.Conv3d": nn.Conv3d,
    "torch.nn.modules.instancenorm.InstanceNorm3d": nn.InstanceNorm3d,
    "torch.nn.modules.batchnorm.BatchNorm3d": nn.BatchNorm3d,
    "torch.nn.modules.dropout.Dropout3d": nn.Dropout3d,
    "torch.nn.LeakyReLU": nn.LeakyReLU,
}


def build_upstream(config: BackboneConfig, num_classes: int, deep_supervision: bool = False) -> nn.Module:
    """The ``dynamic_network_architectures`` network for ``config``, built and initialised as nnU-Net's
    ``get_network_from_plans`` does (``network.apply(network.initialize)``)."""
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    except Exception as exc:  # not installed, or a broken dependency chain (timm -> torchvision)
        raise missing_networks_error(config.name, exc) from exc
    arch = nnunet_architecture(config)
    kwargs = {k: _CLASSES[v] if k in arch["_kw_requires_import"] and v is not None else v
              for k, v in arch["arch_kwargs"].items()}
    cls = PlainConvUNet if config.name == "plainconv" else ResidualEncoderUNet
    net = cls(input_channels=config.in_channels, num_classes=num_classes, deep_supervision=deep_supervision, **kwargs)
    net.apply(net.initialize)
    return net


class _StemStage(nn.Module):
    """ResEnc's stage 0: the stem (one conv block) then the first residual stage."""

    def __init__(self, stem: nn.Module, stage: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        return self.stage(self.stem(x))


class _UpStage(nn.Module):
    """One nnU-Net decoder stage: transposed convolution, concatenation with the skip, convolutions."""

    def __init__(self, transpconv: nn.Module, convs: nn.Module) -> None:
        super().__init__()
        self.transpconv = transpconv
        self.convs = convs

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.convs(torch.cat((self.transpconv(x), skip), 1))


class NnUNetBackbone(Backbone):
    """nnU-Net's ``PlainConvUNet`` (``name: plainconv``) or ``ResidualEncoderUNet`` (``name: resenc``).

    Args:
        config: ``filters`` / ``strides`` / ``kernel_sizes`` / ``blocks`` / ``decoder_blocks`` / ``conv_bias`` /
            ``norm`` / ``dropout``, or ``preset``, or ``plans: PATH:CONFIGURATION``
            (:func:`medcl.models.nnunet_plans.resolve_nnunet_config`); kept resolved in :attr:`config`, so the
            saved config rebuilds the network without the plans file.

    Shapes:
        input ``[B, in_channels, D, H, W]`` with ``D, H, W`` multiples of the product of the strides (per axis).
    """

    def __init__(self, config: BackboneConfig) -> None:
        config = resolve_nnunet_config(config)
        super().__init__(config)
        n = len(config.filters)
        net = build_upstream(config, max(1, self.out_channels))
        stages = list(net.encoder.stages)
        first = _StemStage(net.encoder.stem, stages[0]) if config.name == "resenc" else stages[0]
        self.encoder = nn.ModuleList([first, *stages[1:n - 1]])
        self.bottleneck = stages[n - 1]
        self.decoder = nn.ModuleList([_UpStage(t, s) for t, s in zip(net.decoder.transpconvs, net.decoder.stages)])
        self.head = net.decoder.seg_layers[-1] if config.has_head else None

        self._set_unet_stages(config.filters, [as_triple(s) for s in config.strides])

    @property
    def input_weight_keys(self) -> list[str]:
        # nnU-Net's conv blocks hold the convolution twice (``conv`` and ``all_modules.0``), the same tensor
        first = "encoder.0.stem.convs.0" if self.config.name == "resenc" else "encoder.0.0.convs.0"
        return [f"{first}.conv.weight", f"{first}.all_modules.0.weight"]

    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        maps: list[Tensor] = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            maps.append(h)
        return maps, self.bottleneck(h)


def nnunet_key_map(kind: str, n_stages: int) -> list[tuple[str, str]]:
    """(nnU-Net prefix, medcl prefix) pairs for a ``kind`` network of ``n_stages`` (see the module table)."""
    n = n_stages
    pairs = [("encoder.stem.", "encoder.0.stem."), ("encoder.stages.0.", "encoder.0.stage.")] if kind == "resenc" \
        else [("encoder.stages.0.", "encoder.0.")]
    pairs += [(f"encoder.stages.{i}.", f"encoder.{i}.") for i in range(1, n - 1)]
    pairs += [(f"encoder.stages.{n - 1}.", "bottleneck.")]
    for j in range(n - 1):
        pairs += [(f"decoder.transpconvs.{j}.", f"decoder.{j}.transpconv."), (f"decoder.stages.{j}.", f"decoder.{j}.convs.")]
    pairs += [(f"decoder.seg_layers.{n - 2}.", "head.")]
    return pairs


def _unwrap(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """nnU-Net v2 / nnssl checkpoint -> its ``network_weights``; an upstream state dict as it is; both without the
    ``decoder.encoder.*`` duplicates (the decoder holds a reference to the encoder)."""
    sd = obj.get("network_weights")
    if not isinstance(sd, Mapping):
        if not any(find_component(str(k), "decoder.encoder.stages.") >= 0 for k in obj):
            return None
        sd = obj
    return {k: v for k, v in sd.items() if find_component(str(k), "decoder.encoder.") < 0}


def _architecture(kind: str):
    def read(obj: Mapping[str, Any]) -> dict[str, Any] | None:
        fields = architecture_of_checkpoint(obj)
        return fields if fields is not None and fields.get("name") == kind else None

    return read


for _kind, _cls in (("plainconv", "PlainConvUNet"), ("resenc", "ResidualEncoderUNet")):
    register_keymap(KeyMap(
        name=f"nnunet-{_kind}",
        description=f"nnU-Net v2 / nnssl {_cls} (network_weights of checkpoint_final.pth, or the class's state dict)",
        backbones=(_kind,),
        pairs=lambda backbone: nnunet_key_map(backbone.config.name, len(backbone.config.filters)),
        drop=("seg_layers.",),  # deep-supervision outputs: medcl builds only the full-resolution head
        unwrap=_unwrap,
        architecture=_architecture(_kind),
    ))


def to_nnunet_state_dict(backbone: NnUNetBackbone) -> dict[str, Tensor]:
    """``backbone``'s weights under nnU-Net's keys (key map ``nnunet-{kind}`` run backwards,
    :func:`~medcl.models.keymaps.to_foreign`), with the ``decoder.encoder.*`` copies nnU-Net's state dict holds:
    every key of the upstream network's ``state_dict()`` except the segmentation layers medcl does not have (all of
    them without a head; the deep-supervision ones with a head).

    Raises:
        MedclDataError: the result differs from the upstream network's keys or shapes (a medcl bug, never silent).
    """
    cfg = backbone.config
    theirs = to_foreign(get_keymap(f"nnunet-{cfg.name}"), backbone,
                        {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()})
    theirs.update({f"decoder.{k}": v for k, v in list(theirs.items()) if k.startswith("encoder.")})
    reference = build_upstream(cfg, max(1, backbone.out_channels)).state_dict()
    expected = {k for k in reference if ".seg_layers." not in k or k in theirs}
    if set(theirs) != expected:
        extra, lacking = sorted(set(theirs) - expected), sorted(expected - set(theirs))
        raise MedclDataError(None, f"medcl -> nnU-Net keys differ from {type(backbone).__name__}'s upstream network: "
                                   f"{len(lacking)} lacking (e.g. {lacking[:1]}), {len(extra)} extra (e.g. {extra[:1]})")
    for k, v in theirs.items():
        if tuple(v.shape) != tuple(reference[k].shape):
            raise MedclDataError(None, f"{k}: medcl {tuple(v.shape)} vs nnU-Net {tuple(reference[k].shape)}")
    return theirs
