"""Typed configuration: YAML in, validated against dataclasses, clear errors, saved with every run.

Each job declares its schema as (nested) dataclasses with type hints and defaults. :func:`load_config`
reads YAML with ``yaml.safe_load``, applies ``key.sub=value`` overrides from the command line, and
:func:`from_dict` builds the dataclass, raising :class:`~medcl.core.errors.MedclConfigError` that names
the dotted key for an unknown key, a missing required key or a value of the wrong type -- before any
training starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from medcl.core.errors import MedclConfigError
from medcl.core.files import atomic_write_text

T = TypeVar("T")


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping (safe loader); a missing file or a non-mapping is a config error.

    **Inheritance**: a top-level ``base: OTHER.yaml`` (relative to this file) reads ``OTHER.yaml`` first and merges
    this file over it: mappings merge key by key (recursively), any other value (lists included) replaces the
    base's. Bases may have bases; a cycle is an error.
    """
    p = Path(path)
    if not p.is_file():
        raise MedclConfigError(str(p), "config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise MedclConfigError(str(p), f"not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MedclConfigError(str(p), "the top level of a config must be a mapping")
    if "base" in data:
        ref = data.pop("base")
        if not isinstance(ref, str):
            raise MedclConfigError(f"{p}: base", f"expected the path of a YAML file, got {ref!r}")
        base_path = (p.parent / ref).resolve()
        if base_path in _chain or base_path == p.resolve():
            raise MedclConfigError(f"{p}: base", f"inheritance cycle through {base_path}")
        data = merge_mappings(read_yaml(base_path, (*_chain, p.resolve())), data)
    return data


def merge_mappings(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge recursively, other values replace (neither input is changed)."""
    out = _deepcopy(base)
    for k, v in top.items():
        out[k] = merge_mappings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else _deepcopy(v)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML, so ``3``, ``1e-3``, ``[1, 2]`` work)."""
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise MedclConfigError(item, "an override must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise MedclConfigError(key, f"cannot parse value {raw!r}: {exc}") from exc
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise MedclConfigError(key, f"'{part}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except MedclConfigError as exc:
                errors.append(exc.problem)
        raise MedclConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise MedclConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MedclConfigError(key, f"expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise MedclConfigError(key, f"expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise MedclConfigError(key, f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if (origin is tuple or tp is tuple) else seq
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise MedclConfigError(key, f"expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise MedclConfigError(key, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise MedclConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise MedclConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise MedclConfigError(key, f"expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise MedclConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown, missing or ill-typed keys raise with the dotted key.

    A schema class may declare ``RENAMED = {old key: message}`` (a ``ClassVar``): an old key then fails with that
    message (naming the new key) instead of "unknown key".
    """
    if not isinstance(data, dict):
        raise MedclConfigError(prefix or "<root>", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    renamed = getattr(cls, "RENAMED", {})
    for u in unknown:
        if u in renamed:  # a key an earlier medcl had: say where it went
            raise MedclConfigError(f"{prefix}.{u}" if prefix else u, renamed[u])
    if unknown:
        k = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise MedclConfigError(k, f"unknown key (known keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, f in names.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise MedclConfigError(key, "required key is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain dict (tuples become lists), ready for YAML and the run record."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(obj)


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """YAML file (or nothing: the defaults) + overrides -> validated ``cls`` instance."""
    data = read_yaml(path) if path is not None else {}
    if overrides:
        data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    atomic_write_text(yaml.safe_dump(to_dict(obj), sort_keys=False), path)


def parse_int_list(text: str, key: str) -> list[int]:
    """A comma-separated list of integers from the command line: ``"0,1, 2"`` -> ``[0, 1, 2]``.

    Raises:
        MedclConfigError: naming ``key`` (the flag or config key), for an empty list or an item that is not an
            integer.
    """
    items = [t.strip() for t in str(text).split(",")]
    try:
        values = [int(t) for t in items if t]
    except ValueError:
        bad = next(t for t in items if t and not t.lstrip("+-").isdigit())
        raise MedclConfigError(key, f"expected comma-separated integers, got {bad!r} in {text!r}") from None
    if not values:
        raise MedclConfigError(key, f"expected comma-separated integers, got {text!r}")
    return values
