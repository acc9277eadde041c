"""Patch encoders for feature extraction: RGB tiles ``[B, 3, H, W]`` -> features ``[B, D]``.

An encoder is named by a spec string (``medcl mil extract --encoder SPEC``):

``builtin-cnn``
    A small 2D ResNet (MONAI ``ResNet``, basic blocks, one per stage, widths ``w, 2w, 4w, 8w``; ``D = 8w``,
    256 by default) with **random weights from seed 0**. It is a documented *baseline* only (random
    convolutional features are a weak but non-trivial MIL baseline); pretrain it with
    ``medcl mil pretrain-encoder`` for real use.
``PATH`` to a checkpoint of ``medcl mil pretrain-encoder``
    The built-in CNN with contrastively pretrained weights (format ``medcl-patch-encoder``, see
    :func:`encoder_checkpoint`).
``torchvision:ARCH:WEIGHTS``
    ``torchvision.models.get_model(ARCH, weights=None)`` with the state dict in the local file ``WEIGHTS``
    (``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``, or ``.safetensors``). The last
    ``Linear`` layer (the classifier: ``fc`` of a ResNet, ``heads.head`` of a ViT) becomes ``Identity``, so
    the features are the pooled penultimate activations. Nothing is downloaded.
``timm:ARCH:WEIGHTS``
    ``timm.create_model(ARCH, pretrained=False, num_classes=0, **kwargs)`` with the local weights (pass e.g.
    ``{"init_values": 1e-5, "dynamic_img_size": true}`` as ``encoder_kwargs``). Normalisation and input size
    come from the model's ``pretrained_cfg``.
``preset:NAME:WEIGHTS``
    A published pathology encoder (UNI, Virchow, H-optimus-0, Lunit, kaiko ...: :mod:`medcl.wsi.presets`) from
    its local weights file: the architecture arguments, normalisation, input size, pooling and magnification
    come from the preset, and the file is checked against the preset's shapes before timm builds anything.

Every encoder normalises its input itself: tiles go in as ``uint8`` (or float in ``[0, 1]``), are resized to
``input_size`` when the model needs a fixed size, and are standardised with the model's mean and std
(ImageNet statistics by default). torchvision and timm are optional imports: any failure to import them (also
a binary mismatch with the installed torch, which raises ``RuntimeError``) becomes one config error naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medcl.core.errors import MedclConfigError, MedclDataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "medcl-patch-encoder"
BUILTIN = "builtin-cnn"
BUILTIN_SEED = 0


class PatchEncoder(nn.Module):
    """A backbone plus its input contract.

    Args:
        model: maps normalised ``[B, 3, S, S]`` float to ``[B, D]`` (or ``[B, D, 1, 1]``, flattened).
        dim: ``D``.
        mean, std: per-channel normalisation of ``[0, 1]`` RGB.
        input_size: side the tiles are resized to (antialiased bilinear), or None to keep the tile size.
        name: the spec it was built from (stored in feature files).
        preset: the :mod:`medcl.wsi.presets` name it was built from, if any.
        mpp: microns per pixel the encoder was trained at (a preset's), if known.

    Shapes:
        ``forward(x)``: ``x`` ``[B, 3, H, W]`` ``uint8`` or float in ``[0, 1]`` -> ``[B, D]`` float.
    """

    def __init__(
        self,
        model: nn.Module,
        dim: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        input_size: int | None = None,
        name: str = "",
        preset: str | None = None,
        mpp: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.dim = int(dim)
        self.input_size = input_size
        self.name = name
        self.preset = preset
        self.mpp = mpp
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8`` / ``[0, 1]`` tiles -> resized, standardised float ``[B, 3, S, S]``."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x)).flatten(1)


class TokenPool(nn.Module):
    """The class token concatenated with the mean of the patch tokens (the Virchow models' tile embedding).

    ``model(x)``: tokens ``[B, N, D]`` (prefix tokens first) -> ``[B, 2D]``; ``prefix`` = class + register tokens.
    """

    def __init__(self, model: nn.Module, prefix: int) -> None:
        super().__init__()
        self.model = model
        self.prefix = int(prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model(x)
        return torch.cat([tokens[:, 0], tokens[:, self.prefix :].mean(dim=1)], dim=-1)


def builtin_cnn(width: int = 32) -> nn.Module:
    """The built-in 2D CNN: MONAI ``ResNet`` (basic blocks ``[1, 1, 1, 1]``, widths ``w..8w``, stride-2 stem,
    global average pooling, no classifier). ``[B, 3, H, W]`` -> ``[B, 8w]``."""
    from monai.networks.nets import ResNet

    return ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=[width, 2 * width, 4 * width, 8 * width],
        spatial_dims=2,
        n_input_channels=3,
        conv1_t_size=7,
        conv1_t_stride=2,
        feed_forward=False,
    )


def build_builtin(width: int = 32, seed: int = BUILTIN_SEED) -> PatchEncoder:
    """The built-in CNN with random weights drawn from ``seed`` (global RNG state left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builtin_cnn(width)
    return PatchEncoder(model, 8 * width, name=BUILTIN)


def encoder_checkpoint(encoder: PatchEncoder, width: int, record: dict | None = None, extra: dict | None = None) -> dict:
    """The checkpoint dict of a built-in encoder (weights-only loadable: tensors and plain values)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "arch": BUILTIN,
        "arch_kwargs": {"width": int(width)},
        "state_dict": {k: v.detach().cpu() for k, v in encoder.model.state_dict().items()},
        "dim": encoder.dim,
        "mean": [float(v) for v in encoder.mean.flatten()],
        "std": [float(v) for v in encoder.std.flatten()],
        "input_size": encoder.input_size,
        "record": record or {},
        **(extra or {}),
    }


def load_encoder_checkpoint(path: str | os.PathLike) -> PatchEncoder:
    """Rebuild a built-in encoder from a ``medcl mil pretrain-encoder`` checkpoint (``weights_only=True``)."""
    from medcl.engine.checkpoint import safe_torch_load

    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MedclDataError(
            path, "not a patch-encoder checkpoint of 'medcl mil pretrain-encoder' (no format 'medcl-patch-encoder')"
        )
    if ckpt.get("arch") != BUILTIN:
        raise MedclDataError(path, f"unknown encoder architecture {ckpt.get('arch')!r}")
    width = int(ckpt["arch_kwargs"]["width"])
    model = builtin_cnn(width)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise MedclDataError(path, f"weights do not fit the built-in CNN (width {width}): {exc}") from exc
    return PatchEncoder(
        model, int(ckpt["dim"]), tuple(ckpt["mean"]), tuple(ckpt["std"]), ckpt.get("input_size"), name=str(path)
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a local weights file: ``.safetensors`` (safetensors) or a torch file read with
    ``weights_only=True``; unwraps ``{"state_dict" | "model" | "teacher": ...}`` and a ``module.`` prefix."""
    p = Path(path)
    if not p.is_file():
        raise MedclDataError(p, "encoder weights file does not exist")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise MedclConfigError("encoder", f"{p} is a .safetensors file; pip install safetensors ({exc})") from exc
        try:
            sd: Any = load_file(str(p))
        except Exception as exc:
            raise MedclDataError(p, f"cannot read safetensors weights: {exc}") from exc
    else:
        from medcl.engine.checkpoint import safe_torch_load

        sd = safe_torch_load(p)
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MedclDataError(p, "no state dict of tensors in the weights file")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _last_linear_name(model: nn.Module) -> str | None:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _load_checked(model: nn.Module, sd: dict, path: str, allowed_unexpected: tuple[str, ...], where: str) -> None:
    report = model.load_state_dict(sd, strict=False)
    unexpected = [k for k in report.unexpected_keys if not k.startswith(allowed_unexpected)]
    if report.missing_keys or unexpected:
        raise MedclDataError(
            path,
            f"weights do not fit {where}: {len(report.missing_keys)} missing keys {report.missing_keys[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}",
        )


def _build_torchvision(arch: str, weights: str, kwargs: dict) -> tuple[nn.Module, tuple, tuple, int | None]:
    try:
        import torchvision
    except Exception as exc:  # ImportError, or a binary mismatch with the installed torch
        raise MedclConfigError(
            "encoder", f"'torchvision:{arch}:...' needs torchvision, which cannot be imported ({exc}); "
            "install the torchvision build that matches your torch"
        ) from exc
    try:
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    except Exception as exc:
        raise MedclConfigError("encoder", f"torchvision has no model {arch!r} ({exc})") from exc
    head = _last_linear_name(model)
    if head is not None:
        _set_submodule(model, head, nn.Identity())
    _load_checked(model, read_state_dict(weights), weights, (f"{head}.",) if head else (), f"torchvision {arch}")
    fixed = 224 if arch.startswith(("vit_", "swin_", "maxvit")) else None
    return model, IMAGENET_MEAN, IMAGENET_STD, fixed


def import_timm(what: str) -> Any:
    """``timm``, or one config error naming why it cannot be imported (missing, or a torchvision built for another
    torch: ``RuntimeError: operator torchvision::nms does not exist``)."""
    try:
        import timm
    except Exception as exc:  # ImportError, or a binary mismatch raising RuntimeError / OSError at import
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = f"{type(exc).__name__}: {lines[-1] if lines else repr(exc)}"
        raise MedclConfigError("encoder", f"timm is not importable: {reason}; {what} needs timm (pip install timm "
                                          "with the torchvision build that matches your torch)") from exc
    return timm


def _build_timm(arch: str, weights: str, kwargs: dict) -> tuple[nn.Module, tuple, tuple, int | None]:
    timm = import_timm(f"'timm:{arch}:...'")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except Exception as exc:
        raise MedclConfigError("encoder", f"timm cannot build {arch!r} with {kwargs} ({exc})") from exc
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg = dict(cfg) if isinstance(cfg, dict) else dict(getattr(cfg, "__dict__", {}))  # dict, or a dataclass
    heads = cfg.get("classifier") or "head"
    heads = tuple(f"{h}." for h in (heads if isinstance(heads, (list, tuple)) else [heads]))
    _load_checked(model, read_state_dict(weights), weights, heads, f"timm {arch}")
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    size = cfg.get("input_size")
    return model, mean, std, int(size[-1]) if size else 224


def timm_preset_model(preset: Any) -> nn.Module:
    """The timm model of a :class:`medcl.wsi.presets.EncoderPreset` (random weights, ``num_classes=0``)."""
    timm = import_timm(f"preset {preset.name!r}")
    kwargs = dict(preset.timm_kwargs)
    layers = {"SwiGLUPacked": lambda: timm.layers.SwiGLUPacked, "SiLU": lambda: nn.SiLU}
    for key in ("mlp_layer", "act_layer"):
        if isinstance(kwargs.get(key), str) and kwargs[key] in layers:
            kwargs[key] = layers[kwargs[key]]()
    try:
        return timm.create_model(preset.arch, pretrained=False, num_classes=0, **kwargs)
    except Exception as exc:
        raise MedclConfigError("encoder", f"timm cannot build preset {preset.name!r} ({preset.arch}): {exc}") from exc


def build_preset_encoder(
    spec: str, input_size: int | None = None, model_factory: Callable[[Any], nn.Module] | None = None
) -> PatchEncoder:
    """``preset:NAME:WEIGHTS`` -> the preset's encoder with the weights of the local file.

    The state dict is checked against the preset's shapes first (:func:`medcl.wsi.presets.check_weights`), then the
    model is built (``model_factory``, default :func:`timm_preset_model`) and loaded strictly (only ``head.*`` keys
    may be left over).
    """
    from medcl.wsi.presets import check_weights, parse_preset_spec

    preset, weights = parse_preset_spec(spec)
    sd = read_state_dict(weights)
    check_weights(preset, sd, weights)
    model = (model_factory or timm_preset_model)(preset)
    _load_checked(model, sd, weights, ("head.",), f"preset {preset.name!r} ({preset.arch})")
    model.eval()
    if preset.pool == "cls+mean":
        model = TokenPool(model, preset.prefix_tokens)
    return PatchEncoder(model, preset.feature_dim, preset.mean, preset.std, input_size or preset.input_size,
                        name=spec, preset=preset.name, mpp=preset.mpp)


def build_encoder(
    spec: str, input_size: int | None = None, encoder_kwargs: dict | None = None, width: int = 32
) -> PatchEncoder:
    """The encoder named by ``spec`` (see the module docstring), in eval mode on the CPU.

    Args:
        spec: ``builtin-cnn``, a checkpoint path, ``torchvision:ARCH:WEIGHTS``, ``timm:ARCH:WEIGHTS`` or
            ``preset:NAME:WEIGHTS``.
        input_size: override the side tiles are resized to (None: the model's own, or the tile size).
        encoder_kwargs: extra keyword arguments of the torchvision / timm model constructor.
        width: first-stage width of ``builtin-cnn``.

    Raises:
        MedclConfigError: unknown spec, missing optional package. MedclDataError: unreadable weights.
    """
    kwargs = dict(encoder_kwargs or {})
    if spec == BUILTIN:
        enc = build_builtin(width)
    elif spec.startswith("preset:"):
        enc = build_preset_encoder(spec, input_size)
    elif spec.startswith(("torchvision:", "timm:")):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise MedclConfigError("encoder", f"expected 'torchvision:ARCH:WEIGHTS' or 'timm:ARCH:WEIGHTS', got {spec!r}")
        lib, arch, weights = parts
        builder = _build_torchvision if lib == "torchvision" else _build_timm
        model, mean, std, fixed = builder(arch, weights, kwargs)
        model.eval()
        probe = input_size or fixed or 224
        with torch.no_grad():
            dim = int(model(torch.zeros(1, 3, probe, probe)).flatten(1).shape[1])
        enc = PatchEncoder(model, dim, mean, std, fixed, name=spec)
    elif Path(spec).is_file():
        enc = load_encoder_checkpoint(spec)
    else:
        raise MedclConfigError(
            "encoder",
            f"{spec!r} is neither 'builtin-cnn', an existing checkpoint file, 'torchvision:ARCH:WEIGHTS', "
            "'timm:ARCH:WEIGHTS' nor 'preset:NAME:WEIGHTS'",
        )
    if input_size is not None:
        enc.input_size = int(input_size)
    return enc.eval()
