"""The run record: what travels with every checkpoint (DESIGN.md, idea 5).

A :class:`RunRecord` is stored as a plain ``dict`` of strings, numbers, lists and dicts so that it
survives ``torch.load(..., weights_only=True)`` and YAML/JSON alike. ``predict`` needs nothing else
to reproduce the preprocessing; fine-tuning reads ``cases_seen`` / ``patients_seen`` to refuse test-set leakage,
and ``complete`` / ``step`` to refuse a half-trained run. The same record is the run folder's ``record.json``
(:mod:`medcl.core.runfolder`) and sits in every checkpoint (``checkpoint["medcl_record"]``).

Version 2 added ``complete``, ``step``, ``patients_seen`` and ``extra``; version-1 records are still read
(``complete`` is then unknown: ``None``).
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from medcl.core.errors import MedclDataError

RECORD_VERSION = 2


def environment() -> dict[str, str]:
    """Versions of the interpreter and the main libraries, and the accelerator if any."""
    env = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("torch", "monai", "lightning", "numpy", "nibabel", "SimpleITK"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except ImportError:
                continue
        env[mod] = str(getattr(m, "__version__", getattr(m, "Version", lambda: "?")))
    if "torch" in sys.modules:  # only when torch is in use already: the record must not import it
        from medcl.core.device import cuda_available

        if cuda_available():
            env["cuda_device"] = sys.modules["torch"].cuda.get_device_name(0)
    return env


@dataclass
class RunRecord:
    """Versioned provenance of one run.

    Attributes:
        kind: ``"pretrain"``, ``"finetune"``, ``"label-efficiency"``, ``"mil"``, ``"wsi-tiles"``,
            ``"wsi-features"``, ``"mil-encoder"``, ``"demo"``.
        config: the resolved config (plain dict; it validates as the job's schema).
        plan: the preprocessing plan (plain dict, see :mod:`medcl.data.plan`).
        cases_seen: ids of every case whose voxels the run used for training.
        test_cases: ids held out for testing (fine-tuning runs).
        patients_seen: patient ids of ``cases_seen`` (where the dataset names patients).
        complete: ``True`` only once the run's final artefact is written (``False`` while it runs or after an
            interruption; ``None`` in a version-1 record, where it is unknown).
        step: optimiser steps done when the record was written.
        extra: job-specific keys (pretraining's ``probe_cases`` and ``data``, fine-tuning's ``init`` ...).
        medcl_version, environment, created: filled in automatically.
    """

    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    cases_seen: list[str] = field(default_factory=list)
    test_cases: list[str] = field(default_factory=list)
    patients_seen: list[str] = field(default_factory=list)
    complete: bool | None = False
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    medcl_version: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    created: str = ""
    version: int = RECORD_VERSION

    def __post_init__(self) -> None:
        if not self.medcl_version:
            from medcl import __version__

            self.medcl_version = __version__
        if not self.environment:
            self.environment = environment()
        if not self.created:
            self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "run record") -> RunRecord:
        """Rebuild from :meth:`to_dict` output; refuses records from a newer medcl. Keys this version does not
        know go to ``extra``; a version-1 record has ``complete = None`` (unknown)."""
        if not isinstance(d, dict) or "kind" not in d:
            raise MedclDataError(source, "not a medcl run record (no 'kind')")
        version = int(d.get("version", 0))
        if version > RECORD_VERSION:
            raise MedclDataError(
                source, f"run record version {version} is newer than this medcl understands ({RECORD_VERSION})"
            )
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["extra"] = {**{k: v for k, v in d.items() if k not in known}, **dict(d.get("extra") or {})}
        if version < 2:
            kw["complete"] = None
        return cls(**kw)
