"""SwinUNETR (MONAI) with named stages.

Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI
Images", BrainLes 2021 (v2: He et al., MICCAI 2023); MONAI's ``SwinUNETR`` implementation.

We build a ``monai.networks.nets.SwinUNETR`` and regroup its modules per resolution, so that each stage
owns the Swin layer that produces its tokens and the convolution block that reads them:

============  =====================================  ========  ======
stage         MONAI modules                          channels  stride
============  =====================================  ========  ======
encoder.0     encoder1 (on the image)                F         1
encoder.1     swinViT.patch_embed, encoder2          F         2
encoder.2     swinViT.layers1(c), encoder3           2F        4
encoder.3     swinViT.layers2(c), encoder4           4F        8
encoder.4     swinViT.layers3(c) (no conv block)     8F        16
bottleneck    swinViT.layers4(c), encoder10          16F       32
decoder.0-4   decoder5, decoder4, ..., decoder1      8F..F     16..1
head          out                                    classes   1
============  =====================================  ========  ======

``F = feature_size``. The forward pass is the same computation as ``SwinUNETR.forward``
(``normalize=True``: each Swin hidden state is layer-normalised over channels before it is read), with
the stage maps returned. Inputs must be multiples of 32 per axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from torch import Tensor, nn

from medcl.models.backbone import Backbone, BackboneConfig
from medcl.models.keymaps import KeyMap, find_component, register_keymap

_NORMS = {"instance": "instance", "batch": "batch"}


def _channel_layer_norm(x: Tensor) -> Tensor:
    """Parameter-free layer norm over the channel axis of ``[B, C, D, H, W]`` (MONAI's ``proj_out``)."""
    return F.layer_norm(x.movedim(1, -1), [x.shape[1]]).movedim(-1, 1).contiguous()


class _SwinStage(nn.Module):
    """One resolution of SwinUNETR's encoder: tokens -> (next tokens, stage map).

    ``embed``/``drop`` (patch embedding) or ``pre`` (v2 conv block) + ``swin`` (a Swin ``BasicLayer``,
    which ends with patch merging) advance the token map; ``conv`` reads the normalised tokens. Stage 0
    has neither: its ``conv`` reads the image.
    """

    def __init__(
        self,
        *,
        embed: nn.Module | None = None,
        drop: nn.Module | None = None,
        pre: nn.Module | None = None,
        swin: nn.Module | None = None,
        conv: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.embed, self.drop, self.pre, self.swin, self.conv = embed, drop, pre, swin, conv

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        if self.embed is None and self.swin is None:  # stage 0: convolution on the image
            return tokens, self.conv(tokens) if self.conv is not None else tokens
        if self.embed is not None:
            tokens = self.embed(tokens)
            if self.drop is not None:
                tokens = self.drop(tokens)
        else:
            if self.pre is not None:
                tokens = self.pre(tokens.contiguous())
            tokens = self.swin(tokens.contiguous())
        feat = _channel_layer_norm(tokens)
        return tokens, self.conv(feat) if self.conv is not None else feat


class SwinUNETRBackbone(Backbone):
    """MONAI SwinUNETR as a :class:`~medcl.models.backbone.Backbone`.

    Args:
        config: ``name="swinunetr"``; uses ``in_channels``, ``out_channels``, ``feature_size``, ``depths``,
            ``num_heads``, ``window_size``, ``use_v2``, ``norm``, ``dropout``, ``drop_path``,
            ``use_checkpoint``. (monai >= 1.5 has no ``img_size``: any multiple of 32 is accepted.)

    Shapes:
        input ``[B, in_channels, D, H, W]``, ``D, H, W`` multiples of 32.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__(config)
        net = SwinUNETR(
            in_channels=config.in_channels,
            out_channels=max(1, int(config.out_channels or 0)),
            feature_size=config.feature_size,
            depths=tuple(config.depths),
            num_heads=tuple(config.num_heads),
            window_size=config.window_size,
            norm_name=_NORMS[config.norm],
            drop_rate=config.dropout,
            dropout_path_rate=config.drop_path,
            use_checkpoint=config.use_checkpoint,
            use_v2=config.use_v2,
            normalize=True,
        )
        vit = net.swinViT

        def pre(i: int) -> nn.Module | None:
            return getattr(vit, f"layers{i}c")[0] if config.use_v2 else None

        self.encoder = nn.ModuleList(
            [
                _SwinStage(conv=net.encoder1),
                _SwinStage(embed=vit.patch_embed, drop=vit.pos_drop, conv=net.encoder2),
                _SwinStage(pre=pre(1), swin=vit.layers1[0], conv=net.encoder3),
                _SwinStage(pre=pre(2), swin=vit.layers2[0], conv=net.encoder4),
                _SwinStage(pre=pre(3), swin=vit.layers3[0]),
            ]
        )
        self.bottleneck = _SwinStage(pre=pre(4), swin=vit.layers4[0], conv=net.encoder10)
        self.decoder = nn.ModuleList([net.decoder5, net.decoder4, net.decoder3, net.decoder2, net.decoder1])
        self.head = net.out if config.has_head else None

        fs = config.feature_size
        widths = [fs, fs, 2 * fs, 4 * fs, 8 * fs]
        for i, w in enumerate(widths):
            self.stage_channels[f"encoder.{i}"] = w
            self.stage_strides[f"encoder.{i}"] = (2**i,) * 3  # type: ignore[assignment]
        self.stage_channels["bottleneck"] = 16 * fs
        self.stage_strides["bottleneck"] = (32, 32, 32)
        for j in range(5):
            self.stage_channels[f"decoder.{j}"] = widths[4 - j]
            self.stage_strides[f"decoder.{j}"] = self.stage_strides[f"encoder.{4 - j}"]

    @property
    def input_weight_keys(self) -> list[str]:
        # encoder1 is a residual block (conv1 + 1x1x1 conv3 on the image); the patch embedding reads it too.
        return [
            "encoder.0.conv.layer.conv1.conv.weight",
            "encoder.0.conv.layer.conv3.conv.weight",
            "encoder.1.embed.proj.weight",
        ]

    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        maps: list[Tensor] = []
        tokens = x
        for stage in self.encoder:
            tokens, feat = stage(tokens)
            maps.append(feat)
        _, bottleneck = self.bottleneck(tokens)
        return maps, bottleneck


def swinunetr_key_map() -> list[tuple[str, str]]:
    """(MONAI ``SwinUNETR`` prefix, medcl prefix) pairs; see the table in the module docstring (the
    ``layers{i}c`` pairs only occur in v2 state dicts)."""
    pairs = [
        ("swinViT.patch_embed.", "encoder.1.embed."),
        ("encoder1.", "encoder.0.conv."),
        ("encoder2.", "encoder.1.conv."),
        ("encoder3.", "encoder.2.conv."),
        ("encoder4.", "encoder.3.conv."),
        ("encoder10.", "bottleneck.conv."),
        ("out.", "head."),
    ]
    targets = ["encoder.2.", "encoder.3.", "encoder.4.", "bottleneck."]
    for i, t in enumerate(targets, start=1):
        pairs.append((f"swinViT.layers{i}.0.", f"{t}swin."))
        pairs.append((f"swinViT.layers{i}c.0.", f"{t}pre."))
    for j, k in enumerate([5, 4, 3, 2, 1]):
        pairs.append((f"decoder{k}.", f"decoder.{j}."))
    return pairs


register_keymap(KeyMap(
    name="monai-swinunetr",
    description="MONAI SwinUNETR state dict (swinViT / encoder1-10 / decoder1-5 / out), v1 and v2",
    backbones=("swinunetr",),
    pairs=lambda backbone: swinunetr_key_map(),
))


# ---- MONAI's self-supervised Swin UNETR pretraining (Tang et al., CVPR 2022) -----------------------------
# Project-MONAI/research-contributions SwinUNETR/Pretrain: ``SSLHead`` holds the encoder as ``swinViT`` (``swin_vit``
# in older versions) next to rotation / contrastive heads and a ``conv`` reconstruction decoder; its checkpoints are
# {"epoch" | "global_step", "state_dict", "optimizer"}, ``module.``-prefixed under DDP. The released
# ``model_swinvit.pt`` (read by MONAI's ``SwinUNETR.load_from``) keeps the encoder alone as ``module.patch_embed.*``,
# ``module.layers{i}.0.*``, with the MLPs named ``fc1`` / ``fc2`` (MONAI: ``linear1`` / ``linear2``).
_SSL_CONTAINERS = ("swinViT.", "swin_vit.", "")
_SWIN_TARGETS = ("encoder.2.", "encoder.3.", "encoder.4.", "bottleneck.")


def swinunetr_ssl_key_map(depths: tuple[int, ...] | list[int]) -> list[tuple[str, str]]:
    """(SSL checkpoint prefix, medcl prefix) pairs for a Swin encoder with ``depths`` blocks per stage; only the
    Swin encoder has a counterpart (the heads and the reconstruction decoder stay unexpected)."""
    inner = [("patch_embed.", "encoder.1.embed.")]
    for i, (t, depth) in enumerate(zip(_SWIN_TARGETS, depths), start=1):
        for b in range(int(depth)):
            for fc, lin in (("fc1", "linear1"), ("fc2", "linear2")):
                inner.append((f"layers{i}.0.blocks.{b}.mlp.{fc}.", f"{t}swin.blocks.{b}.mlp.{lin}."))
        inner += [(f"layers{i}.0.", f"{t}swin."), (f"layers{i}c.0.", f"{t}pre.")]
    return [(c + foreign, ours) for c in _SSL_CONTAINERS for foreign, ours in inner]


def _ssl_architecture(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """SwinUNETR fields (embedding size, depths, heads, window, v2, input channels) read from an SSL checkpoint's
    Swin encoder; ``None`` for anything else (a full SwinUNETR state dict is not an SSL layout)."""
    sd = obj.get("state_dict") if isinstance(obj.get("state_dict"), Mapping) else obj
    keys = [k for k in sd if isinstance(k, str)]
    if any(find_component(k, "encoder1.") >= 0 or find_component(k, "decoder1.") >= 0 for k in keys):
        return None
    roots = [k[: -len("patch_embed.proj.weight")] for k in keys if k.endswith("patch_embed.proj.weight")]
    roots = [r for r in roots if r.removeprefix("module.") in _SSL_CONTAINERS]
    if len(roots) != 1 or not isinstance(sd[roots[0] + "patch_embed.proj.weight"], Tensor):
        return None
    root = roots[0]
    proj = sd[root + "patch_embed.proj.weight"]  # [feature_size, in_channels, 2, 2, 2]
    depths, heads, window = [], [], 7
    for i in range(1, 5):
        head = f"{root}layers{i}.0.blocks."
        blocks = {k[len(head):].split(".", 1)[0] for k in keys if k.startswith(head)}
        table = sd.get(f"{head}0.attn.relative_position_bias_table")
        if not blocks or not isinstance(table, Tensor):
            return None
        depths.append(len(blocks))
        heads.append(int(table.shape[1]))
        window = (round(int(table.shape[0]) ** (1 / 3)) + 1) // 2  # (2w - 1)^3 relative positions
    return {"name": "swinunetr", "in_channels": int(proj.shape[1]), "feature_size": int(proj.shape[0]),
            "depths": depths, "num_heads": heads, "window_size": window,
            "use_v2": any(k.startswith(f"{root}layers1c.") for k in keys)}


register_keymap(KeyMap(
    name="monai-swinunetr-ssl",
    description="MONAI SwinUNETR self-supervised pretraining (SSLHead checkpoint, or model_swinvit.pt): Swin encoder",
    backbones=("swinunetr",),
    pairs=lambda backbone: swinunetr_ssl_key_map(backbone.config.depths),
    architecture=_ssl_architecture,
))
