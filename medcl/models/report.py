"""The report of a weight load: what was loaded, adapted, missing, unexpected or shape-mismatched."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from medcl.models.backbone import key_in_prefixes


def _stage(key: str) -> str:
    first, _, rest = key.partition(".")
    if first in ("encoder", "decoder") and rest:
        return f"{first}.{rest.partition('.')[0]}"
    return first


def _by_stage(keys: list[str]) -> str:
    counts = Counter(_stage(k) for k in keys)
    return ", ".join(f"{s} ({n})" for s, n in counts.items())


@dataclass
class LoadReport:
    """Outcome of :func:`medcl.models.weights.load_backbone`.

    Every target key is in exactly one of ``loaded``, ``adapted``, ``mismatched`` or ``missing``; every
    source key (after ``key_prefix``) in one of ``loaded``, ``adapted``, ``mismatched``, ``unexpected`` or
    ``ignored`` (outside the requested ``prefixes``).

    Attributes:
        source: file path, or ``"<state dict>"``.
        key_prefix: prefix stripped from the source keys (``""``, ``"backbone."``...).
        source_format: ``"medcl"``, or the key map that converted the keys (``"monai-dynunet"``, ...;
            :mod:`medcl.models.keymaps`).
        prefixes: the stages requested, ``None`` = all.
        loaded: keys copied unchanged.
        adapted: ``{"key", "source_shape", "target_shape", "rule"}`` for input weights adapted to a new
            channel count.
        missing: target keys that received nothing (absent from the source or outside ``prefixes``).
        unexpected: requested source keys with no target key.
        mismatched: ``{"key", "source_shape", "target_shape"}``; not loaded.
        ignored: source keys outside ``prefixes``.
        record: the source's run record (``medcl_record``), if any.
    """

    source: str
    key_prefix: str = ""
    source_format: str = "medcl"
    prefixes: list[str] | None = None
    loaded: list[str] = field(default_factory=list)
    adapted: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    record: dict | None = None

    def missing_in(self, prefixes: tuple[str, ...] | list[str] | None) -> list[str]:
        """Missing keys under ``prefixes`` (``None`` = all)."""
        return [k for k in self.missing if key_in_prefixes(k, prefixes)]

    @property
    def ok(self) -> bool:
        """Nothing requested is missing, and nothing is unexpected or mismatched."""
        return not (self.missing_in(self.prefixes) or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        n_target = len(self.loaded) + len(self.adapted) + len(self.mismatched) + len(self.missing)
        lines = [
            f"weights from {self.source}"
            + (f" (keys under {self.key_prefix!r})" if self.key_prefix else "")
            + (f" [converted with key map {self.source_format}]" if self.source_format != "medcl" else "")
            + (f", stages {', '.join(self.prefixes)}" if self.prefixes is not None else ""),
            f"  loaded      {len(self.loaded)}/{n_target} tensors: {_by_stage(self.loaded) or '-'}",
        ]
        for a in self.adapted:
            lines.append(
                f"  adapted     {a['key']}: {a['source_shape']} -> {a['target_shape']} (first-layer rule '{a['rule']}')"
            )
        if self.missing:
            lines.append(f"  missing     {len(self.missing)} (not loaded, keep their init): {_by_stage(self.missing)}")
        for m in self.mismatched:
            lines.append(f"  MISMATCHED  {m['key']}: source {m['source_shape']} vs model {m['target_shape']} (not loaded)")
        if self.unexpected:
            shown = ", ".join(self.unexpected[:8]) + (" ..." if len(self.unexpected) > 8 else "")
            lines.append(f"  UNEXPECTED  {len(self.unexpected)} (no such key in the model): {shown}")
        if self.ignored:
            lines.append(f"  ignored     {len(self.ignored)} outside the requested stages: {_by_stage(self.ignored)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the report (with the source's run record) as JSON, atomically."""
        from medcl.engine.checkpoint import atomic_write_bytes  # lazy: the engine imports Lightning

        atomic_write_bytes(json.dumps(self.to_dict(), indent=2, default=str).encode(), path)
