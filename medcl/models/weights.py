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
from typing import Any, Literal

import torch
from torch import Tensor

from medcl.config import from_dict, to_dict
from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.models.adapt import AdaptRule, adapt_first_layer, can_adapt
from medcl.models.backbone import Backbone, BackboneConfig, key_in_prefixes
from medcl.models.factory import build_backbone, monai_key_map
from medcl.models.report import LoadReport

FORMAT = "medcl.backbone"
FORMAT_VERSION = 1
_MONAI_DUPLICATES = ("skip_layers.",)  # DynUNet registers its blocks twice; these are the copies


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

    Returns:
        :class:`LoadReport`; mismatched shapes are never loaded.
    """
    name = str(source) if not isinstance(source, Mapping) else "<state dict>"
    obj = source if isinstance(source, Mapping) else _read(source)
    return _load(backbone, obj, name, prefixes, key_prefix, adapt, strict)


def _load(
    backbone: Backbone,
    obj: Mapping[str, Any],
    name: str,
    prefixes: tuple[str, ...] | list[str] | None,
    key_prefix: str | None,
    adapt: AdaptRule | None,
    strict: bool,
) -> LoadReport:
    sd, record = _split_checkpoint(obj, name)
    target = backbone.state_dict()
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    for p in prefixes or ():
        if not any(key_in_prefixes(k, (p,)) for k in target):
            raise MedclConfigError(
                "prefixes", f"{p!r} names no part of the backbone; use stage names such as {backbone.stage_names + ['head']}"
            )
    sub, used_prefix, fmt = _select_backbone_keys(sd, backbone, key_prefix, name)

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
    """Rename the keys of a MONAI ``DynUNet``/``SwinUNETR`` state dict to ``backbone``'s stage names.

    An outer prefix (``"module."``, ``"model."``) is kept; DynUNet's duplicate ``skip_layers.*`` entries
    are dropped; keys without a counterpart (deep-supervision heads) keep their name (reported unexpected).
    """
    pairs = monai_key_map(backbone)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        new = k
        for monai_p, medcl_p in pairs:
            i = _find_component(k, monai_p)
            if i >= 0:
                new = k[:i] + medcl_p + k[i + len(monai_p):]
                break
        else:
            if any(_find_component(k, d) >= 0 for d in _MONAI_DUPLICATES):
                continue
        out[new] = v
    return out


# ---- helpers ------------------------------------------------------------------------------------------
def _read(path: str | os.PathLike) -> Any:
    from medcl.engine.checkpoint import safe_torch_load  # lazy: the engine imports Lightning

    return safe_torch_load(path)


def _find_component(key: str, prefix: str) -> int:
    """Index where ``prefix`` starts a dotted component of ``key`` (0 or after a '.'), else -1."""
    if key.startswith(prefix):
        return 0
    i = key.find("." + prefix)
    return i + 1 if i >= 0 else -1


def _split_checkpoint(obj: Any, name: str) -> tuple[dict[str, Tensor], dict | None]:
    if not isinstance(obj, Mapping):
        raise MedclDataError(name, f"expected a checkpoint dict or a state dict, got {type(obj).__name__}")
    record = obj.get("medcl_record") if isinstance(obj.get("medcl_record"), Mapping) else None
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise MedclDataError(name, "no tensors found (neither a 'state_dict' entry nor a plain state dict)")
    return tensors, dict(record) if record is not None else None


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
    sd: dict[str, Tensor], backbone: Backbone, key_prefix: str | None, name: str
) -> tuple[dict[str, Tensor], str, Literal["medcl", "monai"]]:
    target_keys = set(backbone.state_dict())
    if key_prefix:
        kp = key_prefix if key_prefix.endswith(".") else key_prefix + "."
        sd = {k: v for k, v in sd.items() if k.startswith(kp)}
        if not sd:
            raise MedclDataError(name, f"no keys start with key_prefix {key_prefix!r}")
    # MONAI names are tried too: some coincide with ours (DynUNet's "bottleneck."), so the reading that
    # matches more of the backbone's keys wins.
    monai = convert_monai_state_dict(backbone, sd)
    prefix, n = _detect_prefix(sd, target_keys, key_prefix)
    m_prefix, m_n = _detect_prefix(monai, target_keys, key_prefix)
    fmt: Literal["medcl", "monai"] = "medcl"
    if m_n > n:
        sd, prefix, fmt = monai, m_prefix, "monai"
    if prefix is None or max(n, m_n) == 0:
        raise MedclDataError(
            name,
            f"no tensor matches this {backbone.config.name} backbone's parameter names "
            f"(source keys look like {next(iter(sd))!r}, expected e.g. {sorted(target_keys)[0]!r}); "
            "is it a checkpoint of another architecture?",
        )
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix, fmt


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
