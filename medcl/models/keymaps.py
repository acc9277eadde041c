"""Key maps: the one place that names every foreign weight layout medcl reads.

A key map turns the state dict of another library's network into medcl's stage names, so that
:func:`medcl.models.load_backbone` can copy it with the usual report (loaded, missing, mismatched). Each map
is registered once, by name, for the backbone kinds it applies to::

    name                 library / class                              medcl backbone
    monai-dynunet        MONAI ``DynUNet``                            dynunet
    monai-swinunetr      MONAI ``SwinUNETR`` (v1 and v2)              swinunetr
    monai-swinunetr-ssl  MONAI SwinUNETR self-supervised pretraining  swinunetr
                         (SSLHead checkpoints, ``model_swinvit.pt``)
    nnunet-plainconv     nnU-Net v2 / nnssl ``PlainConvUNet``         plainconv
    nnunet-resenc        nnU-Net v2 / nnssl ``ResidualEncoderUNet``   resenc
                         (``network_weights`` of their checkpoints; they also describe their architecture)

(further maps register themselves from the backbone modules that own them, e.g. nnU-Net's networks.)

A map is a list of ``(foreign prefix, medcl prefix)`` pairs, matched on dotted components (an outer
``module.`` / ``model.`` is kept and found by prefix detection), plus component prefixes whose keys are
dropped (duplicates such as DynUNet's ``skip_layers``). Maps may also read the architecture from the checkpoint
itself (``architecture``), for files that carry no medcl ``backbone_config``.

The loader tries every map registered for the backbone's kind (and medcl's own names) and keeps the reading
that matches most target keys; ``key_map=NAME`` forces one (``init.key_map`` in the fine-tuning config).
:func:`to_foreign` runs a map backwards (medcl's names -> the foreign layout), for exports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medcl.core.errors import MedclConfigError

if TYPE_CHECKING:
    from torch import Tensor

    from medcl.models.backbone import Backbone

__all__ = ["KeyMap", "register_keymap", "keymap_names", "get_keymap", "keymaps_for", "apply_keymap",
           "find_component", "architecture_from", "to_foreign"]

Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class KeyMap:
    """A named foreign layout.

    Attributes:
        name: registry name (``"monai-dynunet"``), shown in load reports as the source format.
        description: one line for ``--help`` and errors.
        backbones: medcl backbone kinds (``BackboneConfig.name``) it converts to.
        pairs: ``backbone -> [(foreign prefix, medcl prefix), ...]``; the first matching pair wins.
        drop: component prefixes whose keys are dropped (duplicates without a medcl counterpart).
        unwrap: ``checkpoint object -> state dict`` for containers that keep the weights under their own key
            (nnU-Net's ``network_weights``); ``None`` = the loader's default (``state_dict`` or the object).
        architecture: ``checkpoint object -> BackboneConfig fields`` (plain dict) when the file describes its
            network itself; ``None`` when it cannot.
    """

    name: str
    description: str
    backbones: tuple[str, ...]
    pairs: Callable[[Backbone], Pairs]
    drop: tuple[str, ...] = ()
    unwrap: Callable[[Mapping[str, Any]], Mapping[str, Any] | None] | None = None
    architecture: Callable[[Mapping[str, Any]], dict[str, Any] | None] | None = field(default=None)


_REGISTRY: dict[str, KeyMap] = {}
# Modules that register maps when imported; loaded on first use so that ``import medcl.models`` stays light.
_PROVIDERS: list[str] = ["medcl.models.dynunet", "medcl.models.swin", "medcl.models.nnunet"]


def register_keymap(keymap: KeyMap, *, replace: bool = False) -> KeyMap:
    """Register ``keymap`` under its name (``replace=True`` to redefine it, e.g. in a test)."""
    if keymap.name in _REGISTRY and not replace and _REGISTRY[keymap.name] is not keymap:
        raise ValueError(f"key map {keymap.name!r} is already registered")
    _REGISTRY[keymap.name] = keymap
    return keymap


def add_provider(module: str) -> None:
    """Name a module that registers key maps when imported (for backbones outside medcl.models)."""
    if module not in _PROVIDERS:
        _PROVIDERS.append(module)


def _load_providers() -> None:
    import importlib

    for module in list(_PROVIDERS):
        importlib.import_module(module)


def keymap_names() -> list[str]:
    """Every registered key map, sorted."""
    _load_providers()
    return sorted(_REGISTRY)


def get_keymap(name: str) -> KeyMap:
    """The key map called ``name``.

    Raises:
        MedclConfigError: unknown name (the message lists the known ones).
    """
    _load_providers()
    if name not in _REGISTRY:
        raise MedclConfigError("init.key_map", f"unknown key map {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def keymaps_for(backbone_name: str) -> list[KeyMap]:
    """The maps that convert to backbones of kind ``backbone_name``."""
    _load_providers()
    return [m for m in _REGISTRY.values() if backbone_name in m.backbones]


def find_component(key: str, prefix: str) -> int:
    """Index where ``prefix`` starts a dotted component of ``key`` (0 or after a '.'), else -1."""
    if key.startswith(prefix):
        return 0
    i = key.find("." + prefix)
    return i + 1 if i >= 0 else -1


def apply_keymap(keymap: KeyMap, backbone: Backbone, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``sd``'s keys with ``keymap`` for ``backbone``: the first matching pair rewrites a key, keys under a
    ``drop`` prefix go, others keep their name (and are reported unexpected if they match nothing)."""
    pairs = keymap.pairs(backbone)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        new = k
        for foreign, ours in pairs:
            i = find_component(k, foreign)
            if i >= 0:
                new = k[:i] + ours + k[i + len(foreign):]
                break
        else:
            if any(find_component(k, d) >= 0 for d in keymap.drop):
                continue
        out[new] = v
    return out


def to_foreign(keymap: KeyMap, backbone: Backbone, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a medcl state dict of ``backbone`` into ``keymap``'s layout: the inverse of :func:`apply_keymap`.

    Each key takes the first pair whose medcl prefix starts it (so list a specific pair before a general one); a
    key no pair covers keeps its name. Dropped duplicates (``drop``) are not recreated: load the result with
    ``strict=False`` into the foreign class, which shares those tensors.
    """
    pairs = keymap.pairs(backbone)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        for foreign, ours in pairs:
            if k.startswith(ours):
                k = foreign + k[len(ours):]
                break
        out[k] = v
    return out


def architecture_from(obj: Mapping[str, Any]) -> tuple[KeyMap, dict[str, Any]] | None:
    """The first registered map that reads a backbone architecture from checkpoint ``obj``, with it."""
    _load_providers()
    for keymap in _REGISTRY.values():
        if keymap.architecture is None:
            continue
        arch = keymap.architecture(obj)
        if arch is not None:
            return keymap, arch
    return None
