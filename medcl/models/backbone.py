"""Backbones with named stages: the contract every medcl network follows (DESIGN.md idea 4).

A :class:`Backbone` is an encoder-decoder (U-Net family) whose parameters live under one prefix per stage::

    encoder.0.  encoder.1.  ...  bottleneck.  decoder.0.  decoder.1.  ...  head.

``encoder.i`` runs from high to low resolution, ``decoder.j`` from low to high (``decoder.j`` merges the
skip of ``encoder.{n-1-j}`` and has its stride). Global heads attach to the bottleneck, local (dense) heads
to a decoder stage, and fine-tuning loads exactly the prefixes pretraining produced (see
:mod:`medcl.models.weights`), instead of reaching into nested modules with hooks.

Strides are relative to the input, per axis: a stage with stride ``(4, 4, 4)`` maps a ``[B, C, 48, 48, 48]``
input to ``[B, C_stage, 12, 12, 12]``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from medcl.core.errors import MedclConfigError, MedclDataError

Stride = tuple[int, int, int]


@dataclass
class BackboneConfig:
    """Which backbone and its size; a section of the pretraining / fine-tuning configs.

    Args:
        name: ``"dynunet"`` (MONAI DynUNet, nnU-Net style; default), ``"swinunetr"`` (MONAI SwinUNETR), or nnU-Net's
            own networks from ``dynamic_network_architectures``: ``"plainconv"`` (``PlainConvUNet``, nnU-Net's
            default) and ``"resenc"`` (``ResidualEncoderUNet``, the ResEnc presets); see :mod:`medcl.models.nnunet`.
        in_channels: image channels (modalities).
        out_channels: segmentation classes of the ``head``; ``None`` or ``0`` builds no head (pretraining).
        filters: DynUNet channels per resolution level, the last one is the bottleneck.
        strides: DynUNet stride of each level (an int or one per axis), same length as ``filters``;
            ``strides[0]`` is the input block's (1 in nnU-Net). Inputs must be divisible by their product.
        kernel_sizes: DynUNet convolution kernel per level (int or per axis); ``None`` = 3 everywhere.
        res_block: DynUNet residual blocks (``UnetResBlock``) instead of plain double convs.
        norm: feature normalisation of the convolution blocks (instance norm with affine, as nnU-Net).
        dropout: dropout rate in the convolution blocks (DynUNet) / transformer (SwinUNETR); 0 = none.
        feature_size: SwinUNETR embedding size (a multiple of 12); stage ``k`` has up to ``16 * feature_size``.
        depths: SwinUNETR transformer blocks per Swin stage.
        num_heads: SwinUNETR attention heads per Swin stage.
        window_size: SwinUNETR attention window (clipped by MONAI to the feature-map size).
        use_v2: SwinUNETR-v2 (a residual conv block before each Swin stage).
        drop_path: SwinUNETR stochastic-depth rate.
        use_checkpoint: SwinUNETR gradient checkpointing (less memory, slower).
        plans: plainconv/resenc: ``"PATH:CONFIGURATION"``, the architecture of a configuration of an nnU-Net plans
            file (``nnUNetPlans.json:3d_fullres``); replaces ``filters``, ``strides``, ``kernel_sizes``, ``blocks``,
            ``decoder_blocks``, ``conv_bias``, ``norm`` and ``dropout``.
        preset: plainconv/resenc: ``"nnunet_3d_fullres"``, ``"resenc_m"`` or ``"resenc_l"`` (see
            :mod:`medcl.models.nnunet_plans`); replaces the same fields as ``plans``.
        blocks: plainconv: convolutions per encoder stage; resenc: residual blocks per encoder stage; one per
            level; ``None`` = nnU-Net's default (2 each; 1, 3, 4, 6, 6, 6, ... for resenc).
        decoder_blocks: plainconv/resenc: convolutions per decoder stage (one per level but the last);
            ``None`` = nnU-Net's default (2 for plainconv, 1 for resenc).
        conv_bias: plainconv/resenc: convolutions with a bias (nnU-Net's plans: true).
    """

    name: Literal["dynunet", "swinunetr", "plainconv", "resenc"] = "dynunet"
    in_channels: int = 1
    out_channels: int | None = None
    filters: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int | tuple[int, int, int], ...] = (1, 2, 2, 2)
    kernel_sizes: tuple[int | tuple[int, int, int], ...] | None = None
    res_block: bool = False
    norm: Literal["instance", "batch"] = "instance"
    dropout: float = 0.0
    feature_size: int = 12
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)
    window_size: int = 7
    use_v2: bool = False
    drop_path: float = 0.0
    use_checkpoint: bool = False
    plans: str | None = None
    preset: Literal["nnunet_3d_fullres", "resenc_m", "resenc_l"] | None = None
    blocks: tuple[int, ...] | None = None
    decoder_blocks: tuple[int, ...] | None = None
    conv_bias: bool = True

    def validate(self) -> None:
        """Raise :class:`MedclConfigError` naming the key for an inconsistent setting."""
        if self.in_channels < 1:
            raise MedclConfigError("in_channels", f"must be >= 1, got {self.in_channels}")
        if self.out_channels is not None and self.out_channels < 0:
            raise MedclConfigError("out_channels", f"must be >= 0 (0 or null = no head), got {self.out_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise MedclConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.name in ("plainconv", "resenc"):
            from medcl.models.nnunet_plans import validate_nnunet_config

            validate_nnunet_config(self)
        elif self.plans is not None or self.preset is not None:
            raise MedclConfigError("plans" if self.plans is not None else "preset",
                                   f"applies to the nnU-Net backbones (name: plainconv or resenc), not {self.name!r}")
        elif self.name == "dynunet":
            if len(self.filters) < 3:
                raise MedclConfigError("filters", "DynUNet needs at least 3 levels (input block, 1 down, bottleneck)")
            if any(f < 1 for f in self.filters):
                raise MedclConfigError("filters", f"channel counts must be positive, got {list(self.filters)}")
            if len(self.strides) != len(self.filters):
                raise MedclConfigError(
                    "strides", f"needs one entry per level: {len(self.filters)} filters, {len(self.strides)} strides"
                )
            for i, s in enumerate(self.strides):
                if min(as_triple(s)) < 1:
                    raise MedclConfigError(f"strides[{i}]", f"strides must be >= 1, got {s}")
            if self.kernel_sizes is not None:
                if len(self.kernel_sizes) != len(self.filters):
                    raise MedclConfigError("kernel_sizes", f"needs {len(self.filters)} entries (one per level)")
                for i, k in enumerate(self.kernel_sizes):
                    if min(as_triple(k)) < 1:
                        raise MedclConfigError(f"kernel_sizes[{i}]", f"kernel sizes must be >= 1, got {k}")
        else:
            if self.feature_size < 12 or self.feature_size % 12:
                raise MedclConfigError("feature_size", f"SwinUNETR needs a multiple of 12, got {self.feature_size}")
            for i, h in enumerate(self.num_heads):
                dim = self.feature_size * 2**i
                if h < 1 or dim % h:
                    raise MedclConfigError(f"num_heads[{i}]", f"must divide the stage width {dim}, got {h}")
            if not 0.0 <= self.drop_path < 1.0:
                raise MedclConfigError("drop_path", f"must be in [0, 1), got {self.drop_path}")

    @property
    def has_head(self) -> bool:
        return bool(self.out_channels)


def as_triple(v: int | tuple[int, ...] | list[int]) -> Stride:
    """``2 -> (2, 2, 2)``; a 3-sequence is returned as a tuple."""
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise MedclConfigError("stride/kernel", f"expected an int or 3 values, got {v!r}")
    return t  # type: ignore[return-value]


@dataclass
class BackboneOutput:
    """What a backbone returns.

    Attributes:
        encoder: one map per encoder stage, high to low resolution; ``encoder[i]`` is
            ``[B, stage_channels[f"encoder.{i}"], D / s, H / s, W / s]`` with ``s = stage_strides[...]``.
        bottleneck: ``[B, stage_channels["bottleneck"], D / S, H / S, W / S]``, ``S`` the total stride.
        decoder: the decoder stages computed (all by default), low to high resolution.
        logits: ``[B, out_channels, D / s0, H / s0, W / s0]`` from the head when the whole decoder ran and
            the backbone has a head, else ``None``.
    """

    encoder: list[Tensor]
    bottleneck: Tensor
    decoder: list[Tensor] = field(default_factory=list)
    logits: Tensor | None = None

    def stage(self, name: str) -> Tensor:
        """The map of stage ``name`` (``"encoder.1"``, ``"bottleneck"``, ``"decoder.0"``, ``"logits"``)."""
        if name == "bottleneck":
            return self.bottleneck
        if name == "logits":
            if self.logits is None:
                raise KeyError("no logits in this output (no head, or the decoder was stopped early)")
            return self.logits
        part, _, idx = name.partition(".")
        maps = {"encoder": self.encoder, "decoder": self.decoder}.get(part)
        if maps is None or not idx.isdigit() or int(idx) >= len(maps):
            raise KeyError(f"no stage {name!r} in this output")
        return maps[int(idx)]


class Backbone(nn.Module, abc.ABC):
    """Base class: an encoder-decoder whose stages are the modules ``encoder[i]``, ``bottleneck``,
    ``decoder[j]`` and ``head`` (``None`` without segmentation classes).

    Subclasses build those modules, fill :attr:`stage_channels` / :attr:`stage_strides` and implement
    :meth:`encode`. Decoder stages are called ``decoder[j](x, skip)`` with ``skip = encoder[-1 - j]``'s map.

    Args:
        config: the resolved :class:`BackboneConfig`; kept as :attr:`config` (saved next to the weights).
    """

    encoder: nn.ModuleList
    bottleneck: nn.Module
    decoder: nn.ModuleList
    head: nn.Module | None

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = dataclasses.replace(config)
        self.stage_channels: dict[str, int] = {}
        self.stage_strides: dict[str, Stride] = {}

    def _set_unet_stages(self, filters: list[int] | tuple[int, ...], strides: list[Stride]) -> None:
        """Fill :attr:`stage_channels` / :attr:`stage_strides` for a U-Net with one encoder stage per level (the
        last one the bottleneck) and decoder stage ``j`` at the resolution and width of skip ``n - 2 - j``."""
        n = len(filters)
        cum: Stride = (1, 1, 1)
        for i in range(n):
            cum = tuple(c * s for c, s in zip(cum, strides[i]))  # type: ignore[assignment]
            name = f"encoder.{i}" if i < n - 1 else "bottleneck"
            self.stage_channels[name] = int(filters[i])
            self.stage_strides[name] = cum
        for j in range(n - 1):
            skip = f"encoder.{n - 2 - j}"
            self.stage_channels[f"decoder.{j}"] = self.stage_channels[skip]
            self.stage_strides[f"decoder.{j}"] = self.stage_strides[skip]

    # ---- the stages -------------------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return int(self.config.out_channels or 0)

    @property
    def encoder_stage_names(self) -> list[str]:
        return [f"encoder.{i}" for i in range(len(self.encoder))]

    @property
    def decoder_stage_names(self) -> list[str]:
        return [f"decoder.{j}" for j in range(len(self.decoder))]

    @property
    def stage_names(self) -> list[str]:
        """All stages in forward order; also the parameter prefixes (``name + "."``), plus ``"head"``."""
        return [*self.encoder_stage_names, "bottleneck", *self.decoder_stage_names]

    @property
    def total_stride(self) -> Stride:
        """Input spatial sizes must be multiples of this (per axis)."""
        return self.stage_strides["bottleneck"]

    @property
    @abc.abstractmethod
    def input_weight_keys(self) -> list[str]:
        """State-dict keys of the weights that read the raw input (dim 1 = input channels)."""

    def describe(self) -> list[dict]:
        """One plain dict per stage (name, channels, stride), e.g. for logs and run records."""
        return [
            {"name": n, "channels": self.stage_channels[n], "stride": list(self.stage_strides[n])}
            for n in self.stage_names
        ]

    def stage_of(self, key: str) -> str:
        """The stage (or ``"head"``) that owns parameter/buffer ``key`` (``"encoder.0.conv1.conv.weight"``)."""
        first, _, rest = key.partition(".")
        if first in ("encoder", "decoder"):
            return f"{first}.{rest.partition('.')[0]}"
        return first

    def state_dict_for(self, prefixes: tuple[str, ...] | list[str]) -> dict[str, Tensor]:
        """The state-dict entries under any of ``prefixes`` (``("encoder", "bottleneck")``)."""
        return {k: v for k, v in self.state_dict().items() if key_in_prefixes(k, prefixes)}

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """Encoder stages and bottleneck only: what a global-contrastive pretraining teaches."""
        return self.state_dict_for(("encoder", "bottleneck"))

    # ---- forward ----------------------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        """Raise :class:`MedclDataError` if ``x`` is not ``[B, in_channels, D, H, W]`` with every spatial size
        a multiple of :attr:`total_stride`."""
        if x.ndim != 5:
            raise MedclDataError(None, f"backbone input must be [B, C, D, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise MedclDataError(
                None, f"backbone expects {self.in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        spatial = tuple(int(s) for s in x.shape[2:])
        total = self.total_stride
        if any(s % t for s, t in zip(spatial, total)) or min(spatial) == 0:
            fix = tuple(max(t, math.ceil(s / t) * t) for s, t in zip(spatial, total))
            raise MedclDataError(
                None,
                f"input spatial size {spatial} is not divisible by the backbone's total stride {total}; "
                f"crop or pad to a multiple, e.g. {fix}",
            )
        if self.config.norm == "instance" and spatial == total:
            # instance norm over a 1-voxel bottleneck is undefined (PyTorch refuses it while training)
            raise MedclDataError(
                None,
                f"input spatial size {spatial} equals the total stride {total}: the bottleneck would be a single "
                "voxel, which instance normalisation cannot normalise; use at least twice the stride along one axis",
            )

    @abc.abstractmethod
    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """``x [B, C, D, H, W]`` -> (encoder maps, high to low resolution; bottleneck map)."""

    def decode(
        self, encoder: list[Tensor], bottleneck: Tensor, upto: str | None = None
    ) -> tuple[list[Tensor], Tensor | None]:
        """Run the decoder from ``bottleneck`` with the ``encoder`` skips.

        Args:
            encoder: the maps returned by :meth:`encode`.
            bottleneck: ``[B, C_b, d, h, w]``.
            upto: last decoder stage to compute (``"decoder.1"``); ``None`` = all stages and the head.

        Returns:
            (decoder maps, low to high resolution; logits or ``None``).
        """
        n_dec = len(self.decoder) if upto is None else self._decoder_depth(upto)
        maps: list[Tensor] = []
        h = bottleneck
        for j in range(n_dec):
            h = self.decoder[j](h, encoder[len(encoder) - 1 - j])
            maps.append(h)
        logits = None
        if upto is None and self.head is not None:
            logits = self.head(h)
        return maps, logits

    def forward(self, x: Tensor, upto: str | None = None) -> BackboneOutput:
        """``x [B, in_channels, D, H, W]`` -> :class:`BackboneOutput`.

        Args:
            x: input; spatial sizes must be multiples of :attr:`total_stride`.
            upto: stop after this stage to save compute: ``"bottleneck"`` (encoder only: global losses),
                ``"decoder.j"`` (a local loss on decoder stage ``j``), ``None`` (everything, with logits).
        """
        self.check_input(x)
        encoder, bottleneck = self.encode(x)
        if upto == "bottleneck":
            return BackboneOutput(encoder=encoder, bottleneck=bottleneck)
        decoder, logits = self.decode(encoder, bottleneck, upto)
        return BackboneOutput(encoder=encoder, bottleneck=bottleneck, decoder=decoder, logits=logits)

    def _decoder_depth(self, upto: str) -> int:
        names = self.decoder_stage_names
        if upto not in names:
            raise MedclConfigError("upto", f"unknown stage {upto!r}; choose bottleneck or one of {names}")
        return names.index(upto) + 1


def key_in_prefixes(key: str, prefixes: tuple[str, ...] | list[str] | None) -> bool:
    """Whether ``key`` lies under one of ``prefixes`` (``"encoder"`` matches ``"encoder.0.x"`` and
    ``"encoder.0"`` matches ``"encoder.0.x"`` but not ``"encoder.01.x"``); ``None`` matches everything."""
    if prefixes is None:
        return True
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    for p in prefixes:
        p = p.rstrip(".")
        if key == p or key.startswith(p + "."):
            return True
    return False


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
