"""Save and load a backbone alone, with a report of what was (not) loaded.

Files written by :func:`save_backbone` (``torch.save``, readable with ``torch.load(weights_only=True)``)::

    {"format": "medcl.backbone", "format_version": 1,
     "backbone_config": {...},          # medcl.config.to_dict(BackboneConfig)
     "stages": [{"name", "channels", "stride"}, ...],
     "state_dict": {"encoder.0.conv1.conv.weight": Tensor, ...},
     "medcl_record": {...} | None}      # the run record (plain types)

:func:`load_backbone` also reads **medcl pretraining checkpoints** (Lightning ``.ckpt``). The layout it
expects, which the pretraining engine follows::

    {"state_dict": {"backbone.encoder.0.conv1.conv.weight": Tensor, ...,    # the LightningModule's
                    "teacher.module.backbone.encoder.0....": Tensor, ...,   # state dict: the student
                    "heads.global.mlp.0.weight": Tensor, ...},              # backbone under "backbone."
     "backbone_config": {...},   # optional, as above
     "medcl_record": {...},      # the run record
     ...}                        # Lightning's own keys (optimizer states, loops, ...) are not read

The backbone's keys are found under ``key_prefix`` (``"backbone."``, ``"model.backbone."``...); by default
the prefix under which most backbone keys are found is used (the shortest on a tie, so the student
``backbone.`` wins over an EMA teacher's ``teacher.module.backbone.``). Plain state dicts and MONAI
``DynUNet``/``SwinUNETR`` state dicts (converted with :func:`convert_monai_state_dict`) work too.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from medcl.config import from_dict, to_dict
from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.models.adapt import AdaptRule, adapt_first_layer, can_adapt
from medcl.models.backbone import Backbone, BackboneConfig, key_in_prefixes
from medcl.models.factory import build_backbone
from medcl.models.keymaps import apply_keymap, get_keymap, keymaps_for
from medcl.models.report import LoadReport

FORMAT = "medcl.backbone"
FORMAT_VERSION = 1


def save_backbone(backbone: Backbone, path: str | os.PathLike, record: dict | None = None) -> None:
    """Write ``backbone``'s weights, config and stage table (and ``record``) atomically to ``path``.

    Raises:
        MedclDataError: ``record`` holds something other than plain types (dict/list/str/number/bool/None)
            or tensors, which ``torch.load(weights_only=True)`` could not read back.
    """
    from medcl.engine.checkpoint import atomic_torch_save  # lazy: the engine imports Lightning

    if record is not None:
        _check_plain(record, "medcl_record", path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone_config": to_dict(backbone.config),
        "stages": backbone.describe(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
        "medcl_record": record,
    }
    atomic_torch_save(payload, path)


def load_backbone(
    backbone: Backbone,
    source: str | os.PathLike | Mapping[str, Any],
    prefixes: tuple[str, ...] | list[str] | None = None,
    *,
    key_prefix: str | None = None,
    adapt: AdaptRule | None = "mean",
    strict: bool = False,
    key_map: str | None = None,
) -> LoadReport:
    """Copy weights from ``source`` into ``backbone`` (in place) and report what happened.

    Args:
        backbone: the target.
        source: a file (:func:`save_backbone` output, a medcl/Lightning checkpoint, a plain or MONAI state
            dict saved with ``torch.save``; read with ``weights_only=True``) or such a mapping in memory.
        prefixes: load only these stages (``("encoder", "bottleneck")`` for an encoder-only transfer);
            ``None`` = everything the source has.
        key_prefix: prefix of the backbone keys in the source (stripped); ``None`` = detect (see module doc).
        adapt: first-layer adaptation when the input channels differ (:func:`medcl.models.adapt.adapt_first_layer`):
            ``"mean"`` (default), ``"repeat"``, or ``None`` to report such weights as mismatched.
        strict: raise :class:`MedclDataError` (loading nothing) if any requested target key is missing or any
            source key is unexpected or mismatched.
        key_map: read the source with this registered key map (:mod:`medcl.models.keymaps`), or ``"medcl"`` for
            medcl's own names; ``None`` = the reading that matches most of the backbone's keys.

    Returns:
        :class:`LoadReport`; mismatched shapes are never loaded.
    """
    name = str(source) if not isinstance(source, Mapping) else "<state dict>"
    obj = source if isinstance(source, Mapping) else _read(source)
    return _load(backbone, obj, name, prefixes, key_prefix, adapt, strict, key_map)


def _load(
    backbone: Backbone,
    obj: Mapping[str, Any],
    name: str,
    prefixes: tuple[str, ...] | list[str] | None,
    key_prefix: str | None,
    adapt: AdaptRule | None,
    strict: bool,
    key_map: str | None = None,
) -> LoadReport:
    sd, record = _split_checkpoint(obj, name, key_map)
    target = backbone.state_dict()
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    for p in prefixes or ():
        if not any(key_in_prefixes(k, (p,)) for k in target):
            raise MedclConfigError(
                "prefixes", f"{p!r} names no part of the backbone; use stage names such as {backbone.stage_names + ['head']}"
            )
    sub, used_prefix, fmt = _select_backbone_keys(sd, backbone, key_prefix, name, key_map)

    report = LoadReport(source=name, key_prefix=used_prefix, source_format=fmt,
                        prefixes=list(prefixes) if prefixes is not None else None, record=record)
    updates: dict[str, Tensor] = {}
    input_keys = set(backbone.input_weight_keys)
    for k in sorted(sub):
        v = sub[k]
        if not key_in_prefixes(k, prefixes):
            report.ignored.append(k)
        elif k not in target:
            report.unexpected.append(k)
        elif tuple(v.shape) == tuple(target[k].shape):
            report.loaded.append(k)
            updates[k] = v
        elif adapt is not None and k in input_keys and can_adapt(v.shape, target[k].shape):
            updates[k] = adapt_first_layer(v, int(target[k].shape[1]), adapt)
            report.adapted.append(
                {"key": k, "source_shape": list(v.shape), "target_shape": list(target[k].shape), "rule": adapt}
            )
        else:
            report.mismatched.append({"key": k, "source_shape": list(v.shape), "target_shape": list(target[k].shape)})
    done = set(updates) | {m["key"] for m in report.mismatched}
    report.missing = sorted(k for k in target if k not in done)
    if strict and not report.ok:
        raise MedclDataError(name, f"strict load failed:\n{report}")
    with torch.no_grad():
        for k, v in updates.items():
            target[k].copy_(v)
    return report


def backbone_from_file(path: str | os.PathLike, **overrides: Any) -> tuple[Backbone, LoadReport]:
    """Build the backbone described by ``path``'s ``backbone_config`` (with ``overrides``, e.g.
    ``out_channels=3``) and load its weights. Returns (backbone, report)."""
    obj = _read(path)
    cfg_dict = obj.get("backbone_config") if isinstance(obj, Mapping) else None
    if not isinstance(cfg_dict, Mapping):
        raise MedclDataError(path, "no 'backbone_config' in this file; build the backbone yourself and use load_backbone")
    cfg = from_dict(BackboneConfig, {**cfg_dict, **overrides}, prefix="backbone_config")
    backbone = build_backbone(cfg)
    return backbone, _load(backbone, obj, str(path), None, None, "mean", False)


def convert_monai_state_dict(backbone: Backbone, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of a MONAI ``DynUNet``/``SwinUNETR`` state dict to ``backbone``'s stage names (key maps
    ``monai-dynunet`` / ``monai-swinunetr``).

    An outer prefix (``"module."``, ``"model."``) is kept; DynUNet's duplicate ``skip_layers.*`` entries
    are dropped; keys without a counterpart (deep-supervision heads) keep their name (reported unexpected).
    """
    return apply_keymap(get_keymap(f"monai-{backbone.config.name}"), backbone, sd)


# ---- helpers ------------------------------------------------------------------------------------------
def _read(path: str | os.PathLike) -> Any:
    from medcl.engine.checkpoint import safe_torch_load  # lazy: the engine imports Lightning

    return safe_torch_load(path)


def _split_checkpoint(obj: Any, name: str, key_map: str | None = None) -> tuple[dict[str, Tensor], dict | None]:
    if not isinstance(obj, Mapping):
        raise MedclDataError(name, f"expected a checkpoint dict or a state dict, got {type(obj).__name__}")
    record = obj.get("medcl_record") if isinstance(obj.get("medcl_record"), Mapping) else None
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    unwrapped = _unwrap_foreign(obj, key_map)
    if unwrapped is not None:
        sd = unwrapped
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise MedclDataError(name, "no tensors found (neither a 'state_dict' entry nor a plain state dict)")
    return tensors, dict(record) if record is not None else None


def _unwrap_foreign(obj: Mapping[str, Any], key_map: str | None) -> Mapping[str, Any] | None:
    """The state dict inside a foreign container (e.g. nnU-Net's ``network_weights``), if a key map knows it."""
    from medcl.models.keymaps import keymap_names

    names = [key_map] if key_map and key_map != "medcl" else keymap_names()
    for n in names:
        km = get_keymap(n)
        if km.unwrap is not None:
            sd = km.unwrap(obj)
            if isinstance(sd, Mapping):
                return sd
    return None


def _detect_prefix(
    sd: Mapping[str, Tensor], target_keys: set[str], key_prefix: str | None = None
) -> tuple[str | None, int]:
    """The prefix ``p`` maximising ``#{k : k = p + t, t a target key}`` (shortest on a tie); with
    ``key_prefix`` only that prefix is counted."""
    if key_prefix:
        kp = key_prefix if key_prefix.endswith(".") else key_prefix + "."
        return kp, sum(1 for k in sd if k.startswith(kp) and k[len(kp):] in target_keys)
    counts: Counter[str] = Counter()
    for k in sd:
        if k in target_keys:
            counts[""] += 1
        i = k.find(".")
        while i >= 0:
            if k[i + 1:] in target_keys:
                counts[k[: i + 1]] += 1
            i = k.find(".", i + 1)
    if not counts:
        return None, 0
    best = max(counts.items(), key=lambda kv: (kv[1], -len(kv[0])))
    return best[0], best[1]


def _select_backbone_keys(
    sd: dict[str, Tensor], backbone: Backbone, key_prefix: str | None, name: str, key_map: str | None = None
) -> tuple[dict[str, Tensor], str, str]:
    """(keys under the chosen prefix, renamed to the backbone's, that prefix, the key map used or "medcl")."""
    target_keys = set(backbone.state_dict())
    if key_prefix:
        kp = key_prefix if key_prefix.endswith(".") else key_prefix + "."
        sd = {k: v for k, v in sd.items() if k.startswith(kp)}
        if not sd:
            raise MedclDataError(name, f"no keys start with key_prefix {key_prefix!r}")
    # Foreign names are tried too: some coincide with ours (DynUNet's "bottleneck."), so the reading that
    # matches most of the backbone's keys wins (medcl's own on a tie).
    if key_map is None:
        readings = [("medcl", sd)] + [(m.name, apply_keymap(m, backbone, sd)) for m in keymaps_for(backbone.config.name)]
    elif key_map == "medcl":
        readings = [("medcl", sd)]
    else:
        km = get_keymap(key_map)
        if backbone.config.name not in km.backbones:
            raise MedclConfigError("init.key_map", f"key map {key_map!r} converts to {list(km.backbones)} backbones, "
                                                   f"not {backbone.config.name!r}")
        readings = [(key_map, apply_keymap(km, backbone, sd))]
    best = None
    for fmt, reading in readings:
        prefix, n = _detect_prefix(reading, target_keys, key_prefix)
        if prefix is not None and n > 0 and (best is None or n > best[2]):
            best = (reading, prefix, n, fmt)
    if best is None:
        tried = ", ".join(f for f, _ in readings)
        raise MedclDataError(
            name,
            f"no tensor matches this {backbone.config.name} backbone's parameter names under any known layout "
            f"({tried}; source keys look like {next(iter(sd))!r}, expected e.g. {sorted(target_keys)[0]!r}); "
            "is it a checkpoint of another architecture?",
        )
    reading, prefix, _, fmt = best
    return {k[len(prefix):]: v for k, v in reading.items() if k.startswith(prefix)}, prefix, fmt


def _check_plain(obj: Any, where: str, path: Any) -> None:
    if obj is None or isinstance(obj, str | int | float | bool | Tensor):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise MedclDataError(path, f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}", path)
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]", path)
        return
    raise MedclDataError(path, f"{where} is a {type(obj).__name__}; the run record must hold plain types only")


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LoadReport",
    "backbone_from_file",
    "convert_monai_state_dict",
    "load_backbone",
    "save_backbone",
]
