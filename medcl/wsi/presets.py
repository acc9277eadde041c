"""Pathology patch encoders as named presets: ``medcl mil extract --encoder preset:NAME:/path/to/weights``.

A preset says what the user would otherwise have to know for each published encoder: the timm architecture and
the constructor arguments its weights need, the input side, the normalisation it was trained with, the
magnification (microns per pixel) and tile side its authors extract at, the feature it returns, its licence and
where the weights are downloaded from. Nothing is downloaded by medcl: the user fetches the weights file (most
are gated on Hugging Face behind the authors' terms) and passes its path.

Before a model is built, the weights file's state dict is checked against the shapes the preset expects
(:func:`check_weights`: patch-embedding kernel, embedding width, number of blocks, position-embedding length,
register tokens, MLP width, layer scale), so a wrong file fails in one line naming the file, the preset and the
first key that does not fit -- without timm, and before gigabytes are allocated.

Every entry is checked against its sources (URLs in the comments): the model cards, TRIDENT's encoder loaders and
its table of tile sizes and magnifications (Mahmood Lab, ``trident/patch_encoder_models/load.py`` and the API
docs), and kaiko.ai's eva backbone registry. The expected state-dict shapes were compared with timm 1.0.22's own
models (built on the meta device); ``tests/test_wsi_presets.py`` repeats that comparison wherever timm imports.

Not presets, on purpose: Phikon and Phikon-v2 (Owkin) and Hibou (HistAI) ship Hugging Face ``transformers``
checkpoints (other key names, custom code for Hibou); CTransPath needs a modified Swin (``timm_ctp``); CONCH is an
open_clip model. They can still be used through their own packages.

This module is light (no torch, no timm): the configs and the CLI import it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medcl.core.errors import MedclConfigError, MedclDataError

__all__ = ["EncoderPreset", "PRESETS", "get_preset", "parse_preset_spec", "expected_shapes", "check_weights",
           "mpp_mismatch", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MPP_TOLERANCE = 0.10
"""Relative mpp difference above which tiles and an encoder's training magnification are reported as mismatched."""


@dataclass(frozen=True)
class EncoderPreset:
    """One published patch encoder (a timm ``VisionTransformer``) and how to feed it.

    Attributes:
        name: the preset's name (``preset:NAME:PATH``).
        arch: timm architecture name given to ``timm.create_model``.
        timm_kwargs: constructor arguments the weights need; layer classes by name (``"SwiGLUPacked"`` from
            ``timm.layers``, ``"SiLU"`` from ``torch.nn``), resolved when the model is built.
        embed_dim, depth, patch_size: the transformer's width, number of blocks and patch side.
        input_size: side of the square input the model was trained on (tiles are resized to it).
        reg_tokens: register tokens (Darcet et al. 2024); 0 for none.
        pos_embed_prefix: whether the position embedding has rows for the class/register tokens (timm's
            ``no_embed_class=False``).
        mlp_hidden: output features of each block's first MLP layer (for SwiGLU, both halves together).
        layer_scale: whether the blocks carry LayerScale (``init_values``).
        swiglu: whether the MLP is timm's packed SwiGLU (``fc1`` yields both halves; ``fc2`` reads one).
        pool: ``"token"`` (the class token: timm's ``num_classes=0`` output) or ``"cls+mean"`` (the class token
            concatenated with the mean of the patch tokens, the Virchow models' published embedding).
        mean, std: per-channel normalisation of ``[0, 1]`` RGB the model was trained with.
        mpp: microns per pixel the authors extract tiles at (0.5 ~ 20x); ``None`` when unstated.
        tile_size: tile side (pixels at ``mpp``) the authors or TRIDENT cut before resizing to ``input_size``.
        licence, access, download: the weights' licence, how access is granted, where the file is.
    """

    name: str
    arch: str
    timm_kwargs: Mapping[str, Any]
    embed_dim: int
    depth: int
    patch_size: int
    input_size: int
    mlp_hidden: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float | None
    tile_size: int
    licence: str
    access: str
    download: str
    reg_tokens: int = 0
    pos_embed_prefix: bool = True
    layer_scale: bool = False
    swiglu: bool = False
    pool: str = "token"
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def feature_dim(self) -> int:
        """Length of the feature vector the encoder yields per tile."""
        return 2 * self.embed_dim if self.pool == "cls+mean" else self.embed_dim

    @property
    def prefix_tokens(self) -> int:
        """Class token plus register tokens in front of the patch tokens."""
        return 1 + self.reg_tokens

    def describe(self) -> str:
        mpp = f"{self.mpp} um/px" if self.mpp else "mpp not stated"
        return (f"{self.name}: {self.arch}, {self.feature_dim}-d features, input {self.input_size} px, tiles "
                f"{self.tile_size} px at {mpp}; licence {self.licence}; {self.access}; weights: {self.download}")


_VIT_S = dict(embed_dim=384, depth=12, mlp_hidden=1536)
_VIT_B = dict(embed_dim=768, depth=12, mlp_hidden=3072)
_LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
_LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
_LUNIT_LICENCE = "Lunit non-commercial (research use only)"
_LUNIT_RELEASE = "https://github.com/lunit-io/benchmark-ssl-pathology/releases/tag/pretrained-weights"
_KAIKO_LICENCE = "kaiko-non-commercial"

_TABLE: list[EncoderPreset] = [
    # UNI (Chen et al., Nat Med 2024). https://huggingface.co/MahmoodLab/UNI (model card: timm kwargs, CC-BY-NC-ND
    # 4.0, gated); TRIDENT uni_v1: vit_large_patch16_224 + these kwargs, ImageNet mean/std, tiles 256 px at 20x.
    EncoderPreset(
        "uni", "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        embed_dim=1024, depth=24, patch_size=16, input_size=224, mlp_hidden=4096, layer_scale=True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5, tile_size=256,
        licence="CC-BY-NC-ND-4.0", access="gated: request access on Hugging Face (institutional e-mail)",
        download="https://huggingface.co/MahmoodLab/UNI (pytorch_model.bin)"),
    # UNI2-h. https://huggingface.co/MahmoodLab/UNI2-h (CC-BY-NC-ND 4.0, gated); kwargs as TRIDENT uni_v2 and
    # kaiko-ai/eva mahmood_uni2_h: ViT-H/14 (1536 wide, 24 blocks), SwiGLU, 8 registers, no pos-embed for them.
    EncoderPreset(
        "uni2-h", "vit_giant_patch14_224",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
         "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU",
         "reg_tokens": 8, "dynamic_img_size": True},
        embed_dim=1536, depth=24, patch_size=14, input_size=224, mlp_hidden=8192, layer_scale=True, swiglu=True,
        reg_tokens=8,
        pos_embed_prefix=False, mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5, tile_size=256,
        licence="CC-BY-NC-ND-4.0", access="gated: request access on Hugging Face (institutional e-mail)",
        download="https://huggingface.co/MahmoodLab/UNI2-h (pytorch_model.bin)"),
    # Virchow (Vorontsov et al., Nat Med 2024). https://huggingface.co/paige-ai/Virchow (Apache-2.0 with gated
    # access terms); TRIDENT virchow: vit_huge_patch14_224, SwiGLU, mlp_ratio 5.3375, embedding = class token
    # concatenated with the mean patch token (2560-d), ImageNet mean/std, 224 px at 20x.
    EncoderPreset(
        "virchow", "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
         "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"},
        embed_dim=1280, depth=32, patch_size=14, input_size=224, mlp_hidden=6832, layer_scale=True, swiglu=True,
        pool="cls+mean",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5, tile_size=224,
        licence="Apache-2.0 (with Paige's additional terms)", access="gated: request access on Hugging Face",
        download="https://huggingface.co/paige-ai/Virchow (pytorch_model.bin)"),
    # Virchow2 (Zimmermann et al. 2024, arXiv:2408.00738). https://huggingface.co/paige-ai/Virchow2
    # (CC-BY-NC-ND 4.0, gated); TRIDENT virchow2: as Virchow plus 4 register tokens (patch tokens start at 5).
    EncoderPreset(
        "virchow2", "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
         "dynamic_img_size": True, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"},
        embed_dim=1280, depth=32, patch_size=14, input_size=224, mlp_hidden=6832, layer_scale=True, swiglu=True,
        reg_tokens=4,
        pool="cls+mean", mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5, tile_size=224,
        licence="CC-BY-NC-ND-4.0", access="gated: request access on Hugging Face",
        download="https://huggingface.co/paige-ai/Virchow2 (pytorch_model.bin)"),
    # H-optimus-0 (Bioptimus). https://huggingface.co/bioptimus/H-optimus-0: Apache-2.0, "expects images of size
    # 224x224 that were extracted at 0.5 microns per pixel", mean/std below, init_values=1e-5; architecture
    # vit_giant_patch14_reg4_dinov2 (config.json of the timm conversion; TRIDENT hoptimus0: img_size 224).
    EncoderPreset(
        "h-optimus-0", "vit_giant_patch14_reg4_dinov2",
        {"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": True},
        embed_dim=1536, depth=40, patch_size=14, input_size=224, mlp_hidden=8192, layer_scale=True, swiglu=True,
        reg_tokens=4,
        pos_embed_prefix=False, mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        mpp=0.5, tile_size=224, licence="Apache-2.0",
        access="on Hugging Face (log in and accept the terms)",
        download="https://huggingface.co/bioptimus/H-optimus-0 (pytorch_model.bin)"),
    # Prov-GigaPath tile encoder (Xu et al., Nature 2024). https://huggingface.co/prov-gigapath/prov-gigapath (gated;
    # the GigaPath model-family table lists Apache-2.0); TRIDENT gigapath: vit_giant_patch14_dinov2 re-shaped to
    # 16-px patches, 1536 wide, 40 blocks, mlp_ratio 5.33334; ImageNet mean/std; 256 px tiles at 20x.
    EncoderPreset(
        "prov-gigapath", "vit_giant_patch14_dinov2",
        {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
         "mlp_ratio": 5.33334, "dynamic_img_size": True},
        embed_dim=1536, depth=40, patch_size=16, input_size=224, mlp_hidden=8192, layer_scale=True, swiglu=True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5, tile_size=256,
        licence="Apache-2.0 (research use only per the access terms)", access="gated: accept the terms on Hugging Face",
        download="https://huggingface.co/prov-gigapath/prov-gigapath (pytorch_model.bin)"),
    # Lunit DINO ViT-S/16 and ViT-S/8 (Kang et al., CVPR 2023). README of lunit-io/benchmark-ssl-pathology: timm
    # VisionTransformer(embed_dim 384, 6 heads, num_classes 0) loads the release files; licence: Lunit public
    # licence, non-commercial. mean/std: kaiko-ai/eva pathology/lunit.py ("standardization parameters used for
    # training"); TRIDENT lunit-vits8: 224 px at 20x.
    EncoderPreset(
        "lunit-vits16", "vit_small_patch16_224", {"dynamic_img_size": True}, **_VIT_S, patch_size=16,
        input_size=224, mean=_LUNIT_MEAN, std=_LUNIT_STD, mpp=0.5, tile_size=224, licence=_LUNIT_LICENCE,
        access="open download (GitHub release)", download=f"{_LUNIT_RELEASE} (dino_vit_small_patch16_ep200.torch)"),
    EncoderPreset(
        "lunit-vits8", "vit_small_patch8_224", {"dynamic_img_size": True}, **_VIT_S, patch_size=8,
        input_size=224, mean=_LUNIT_MEAN, std=_LUNIT_STD, mpp=0.5, tile_size=224, licence=_LUNIT_LICENCE,
        access="open download (GitHub release)", download=f"{_LUNIT_RELEASE} (dino_vit_small_patch8_ep200.torch)"),
    # kaiko.ai (Aben et al. 2024, arXiv:2404.15217), timm conversions by 1aurent on Hugging Face (licence
    # kaiko-non-commercial per the model cards); TRIDENT kaiko-*: timm vit_*_224, dynamic_img_size, mean = std =
    # 0.5, input 224, tiles 256 px at 20x.
    *(EncoderPreset(
        f"kaiko-vit{size}{patch}", f"vit_{'small' if size == 's' else 'base'}_patch{patch}_224",
        {"dynamic_img_size": True}, **(_VIT_S if size == "s" else _VIT_B), patch_size=patch, input_size=224,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), mpp=0.5, tile_size=256, licence=_KAIKO_LICENCE,
        access="open download (Hugging Face)",
        download=(f"https://huggingface.co/1aurent/vit_{'small' if size == 's' else 'base'}_patch{patch}_224"
                  ".kaiko_ai_towards_large_pathology_fms (model.safetensors)"))
      for size in ("s", "b") for patch in (16, 8)),
]

PRESETS: dict[str, EncoderPreset] = {p.name: p for p in _TABLE}
"""The presets by name."""


def get_preset(name: str) -> EncoderPreset:
    """The preset called ``name``; an unknown name is a config error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MedclConfigError("encoder", f"unknown encoder preset {name!r}; known presets: "
                                          f"{', '.join(sorted(PRESETS))}") from None


def parse_preset_spec(spec: str) -> tuple[EncoderPreset, str]:
    """``preset:NAME:PATH`` -> ``(preset, PATH)`` (the path may itself hold colons)."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[0] != "preset" or not parts[1] or not parts[2]:
        raise MedclConfigError("encoder", f"expected 'preset:NAME:/path/to/weights', got {spec!r} (presets: "
                                          f"{', '.join(sorted(PRESETS))})")
    return get_preset(parts[1]), parts[2]


def expected_shapes(preset: EncoderPreset) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes a timm ``VisionTransformer`` built from ``preset`` has (a characteristic subset:
    one key per architectural choice), in the order they are checked."""
    d, p = preset.embed_dim, preset.patch_size
    grid = (preset.input_size // p) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (d, 3, p, p),
        "cls_token": (1, 1, d),
        "pos_embed": (1, grid + (preset.prefix_tokens if preset.pos_embed_prefix else 0), d),
    }
    if preset.reg_tokens:
        shapes["reg_token"] = (1, preset.reg_tokens, d)
    shapes["blocks.0.attn.qkv.weight"] = (3 * d, d)
    shapes["blocks.0.mlp.fc1.weight"] = (preset.mlp_hidden, d)
    shapes["blocks.0.mlp.fc2.weight"] = (d, preset.mlp_hidden // 2 if preset.swiglu else preset.mlp_hidden)
    if preset.layer_scale:
        shapes["blocks.0.ls1.gamma"] = (d,)
    shapes[f"blocks.{preset.depth - 1}.attn.qkv.weight"] = (3 * d, d)
    shapes["norm.weight"] = (d,)
    return shapes


def check_weights(preset: EncoderPreset, state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse a weights file that is not the preset's model, in one line naming the file, the preset and the
    first key that does not fit (missing, or of another shape), or the number of blocks.

    Args:
        state_dict: key -> tensor (anything with ``.shape``), e.g. :func:`medcl.wsi.encoders.read_state_dict`.

    Raises:
        MedclDataError: naming ``path``.
    """
    where = f"does not fit preset {preset.name!r} ({preset.arch})"
    for key, want in expected_shapes(preset).items():
        if key not in state_dict:
            raise MedclDataError(path, f"{where}: key {key!r} is missing (expected shape {list(want)})")
        got = tuple(state_dict[key].shape)
        if got != want:
            raise MedclDataError(path, f"{where}: key {key!r} has shape {list(got)}, expected {list(want)}")
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if len(blocks) != preset.depth:
        raise MedclDataError(path, f"{where}: {len(blocks)} transformer blocks, expected {preset.depth}")


def mpp_mismatch(preset: EncoderPreset, mpp: float, what: str = "tiles") -> str | None:
    """A warning when ``mpp`` differs from the preset's by more than 10% (``None`` when it does not, or when the
    preset states no mpp)."""
    if preset.mpp is None or abs(mpp / preset.mpp - 1.0) <= MPP_TOLERANCE:
        return None
    return (f"{what} at {mpp:.3g} um/px, but encoder preset {preset.name!r} was trained on tiles at {preset.mpp} "
            f"um/px ({preset.tile_size} px tiles): features will be off-distribution; tile with --mpp "
            f"{preset.mpp} --size {preset.tile_size}")
