"""Initialising a segmentation network from a checkpoint, and the one function that accepts or refuses one.

A pretraining run of medcl leaves ``RUN/checkpoints/last.ckpt`` (Lightning: backbone weights under
``backbone.``, heads elsewhere, ``medcl_record`` = the run record) and ``RUN/backbone.pt``
(:func:`medcl.models.save_backbone`). :func:`read_checkpoint` accepts either file or the run folder, and
:func:`build_from_checkpoint` rebuilds the *same* backbone (from ``backbone_config`` or the record's
``config.backbone`` section) with a segmentation head of ``num_classes`` and loads the chosen stages,
returning the :class:`medcl.models.LoadReport`.

:func:`accept_checkpoint` is the one acceptance rule for every checkpoint a job starts from (``finetune
--init``, ``predict --ckpt``, the benchmark's inits, exports). It refuses, each with one line naming the flag that
overrides it:

* a checkpoint **without a run record** (unknown provenance: nothing says which cases it saw) --
  ``--allow-unknown-provenance``; the run that accepts it records ``provenance: unknown``. External weights
  (nnU-Net, nnssl, MONAI) have no record; their user may write a **provenance sidecar** instead, which is then
  checked like a record (``provenance: sidecar``): ``CKPT.provenance.json`` beside the file (or
  ``provenance.json`` in its folder)::

      {"cases_seen": ["hippocampus_001", ...], "patients_seen": [...], "source": "free text"}

* a run whose ``cases_seen`` or ``patients_seen`` overlap the test set (DESIGN.md, idea 5: it has seen the test
  images, so its test score is not a fair few-label result) -- ``--allow-test-overlap``;
* an **incomplete** run or checkpoint (``complete: false`` in its record: killed, or still running), naming the
  step it reached -- ``--allow-incomplete``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcl.config import from_dict, to_dict
from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.models import Backbone, BackboneConfig, LoadReport, build_backbone, load_backbone

__all__ = ["InitCheckpoint", "Acceptance", "resolve_checkpoint", "read_checkpoint", "accept_checkpoint",
           "build_from_checkpoint", "read_provenance_sidecar", "provenance_sidecar_paths"]

_RUN_FILES = ("backbone.pt", "model.pt", "checkpoints/last.ckpt")


@dataclass
class InitCheckpoint:
    """A checkpoint read once: its path, contents, run record (plain dict or ``None``) and backbone config."""

    path: Path
    contents: Mapping[str, Any]
    record: dict[str, Any] | None
    backbone: dict[str, Any] | None
    provenance: str = "recorded"  # "recorded" (medcl run record) | "sidecar" | "unknown"
    architecture_from: str | None = None  # the key map that read ``backbone`` from a foreign file

    @property
    def plan(self) -> dict[str, Any] | None:
        plan = (self.record or {}).get("plan")
        return dict(plan) if isinstance(plan, Mapping) and plan else None

    @property
    def cases_seen(self) -> list[str]:
        return [str(c) for c in (self.record or {}).get("cases_seen", []) or []]

    @property
    def kind(self) -> str:
        return str((self.record or {}).get("kind", "unknown"))

    @property
    def patients_seen(self) -> list[str]:
        return [str(c) for c in (self.record or {}).get("patients_seen", []) or []]

    @property
    def complete(self) -> bool | None:
        """``True`` / ``False`` from the record; ``None`` when unknown (no record, or a version-1 record)."""
        if self.record is None or "complete" not in self.record or self.record["complete"] is None:
            return None
        return bool(self.record["complete"])

    @property
    def step(self) -> int | None:
        step = (self.record or {}).get("step")
        return int(step) if step is not None else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the first of ``backbone.pt``, ``model.pt``, ``checkpoints/last.ckpt`` in a run folder."""
    p = Path(path)
    if p.is_dir():
        for name in _RUN_FILES:
            if (p / name).is_file():
                return p / name
        raise MedclDataError(p, f"run folder holds no checkpoint ({', '.join(_RUN_FILES)})")
    if not p.is_file():
        raise MedclDataError(p, "checkpoint does not exist")
    return p


def read_checkpoint(path: str | os.PathLike) -> InitCheckpoint:
    """Read a checkpoint (weights-only) and find its run record (or provenance sidecar) and backbone config.

    A foreign checkpoint (nnU-Net, nnssl, ...) that describes its own network gets its ``backbone`` from the key
    map that reads it (:func:`medcl.models.keymaps.architecture_from`).
    """
    from medcl.engine.checkpoint import safe_torch_load
    from medcl.models.keymaps import architecture_from

    p = resolve_checkpoint(path)
    obj = safe_torch_load(p)
    if not isinstance(obj, Mapping):
        raise MedclDataError(p, f"expected a checkpoint dict, got {type(obj).__name__}")
    record = obj.get("medcl_record") if isinstance(obj.get("medcl_record"), Mapping) else None
    provenance = "recorded"
    if record is None:
        record = read_provenance_sidecar(p)
        provenance = "sidecar" if record is not None else "unknown"
    backbone = obj.get("backbone_config") if isinstance(obj.get("backbone_config"), Mapping) else None
    if backbone is None and record is not None:
        section = (record.get("config") or {}).get("backbone")
        backbone = section if isinstance(section, Mapping) else None
    arch_from = None
    if backbone is None:
        found = architecture_from(obj)
        if found is not None:
            arch_from, backbone = found[0].name, found[1]
    return InitCheckpoint(p, obj, dict(record) if record is not None else None,
                          dict(backbone) if backbone is not None else None, provenance, arch_from)


def provenance_sidecar_paths(ckpt_path: Path) -> list[Path]:
    """Where a provenance sidecar for ``ckpt_path`` is looked for, in order."""
    return [ckpt_path.with_name(ckpt_path.name + ".provenance.json"), ckpt_path.with_name("provenance.json")]


def read_provenance_sidecar(ckpt_path: Path) -> dict[str, Any] | None:
    """The record-like dict of a provenance sidecar beside ``ckpt_path`` (kind ``external``), or ``None``.

    Raises:
        MedclDataError: the sidecar is not JSON, or ``cases_seen`` / ``patients_seen`` are not lists of ids.
    """
    import json

    for side in provenance_sidecar_paths(ckpt_path):
        if not side.is_file():
            continue
        try:
            data = json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            raise MedclDataError(side, f"provenance sidecar is not readable JSON ({exc})") from exc
        if not isinstance(data, Mapping) or not isinstance(data.get("cases_seen"), list):
            raise MedclDataError(side, "a provenance sidecar must be a JSON object with a list 'cases_seen' "
                                       "(the case ids the weights were trained on; [] if none of yours)")
        for key in ("cases_seen", "patients_seen"):
            if not isinstance(data.get(key, []), list) or not all(isinstance(c, str | int) for c in data.get(key, [])):
                raise MedclDataError(side, f"'{key}' must be a list of ids")
        return {"kind": "external", "complete": True, "cases_seen": [str(c) for c in data["cases_seen"]],
                "patients_seen": [str(c) for c in data.get("patients_seen", [])],
                "source": str(data.get("source", "")), "sidecar": str(side)}
    return None


@dataclass
class Acceptance:
    """An accepted checkpoint and what was found about it (``info()`` goes into the records of runs using it)."""

    checkpoint: InitCheckpoint
    provenance: str  # "recorded" | "unknown"
    test_overlap: list[str]
    patient_overlap: list[str]

    def info(self) -> dict[str, Any]:
        c = self.checkpoint
        return {"checkpoint": str(c.path), "kind": c.kind, "provenance": self.provenance,
                "cases_seen": len(c.cases_seen), "complete": c.complete, "step": c.step,
                "test_overlap": self.test_overlap, "patient_overlap": self.patient_overlap}


def _shown(ids: list[str]) -> str:
    return ", ".join(ids[:20]) + (f" ... ({len(ids)} in all)" if len(ids) > 20 else "")


def accept_checkpoint(
    ckpt: InitCheckpoint,
    *,
    test_cases: Sequence[str] = (),
    test_patients: Sequence[str] = (),
    allow_test_overlap: bool = False,
    allow_unknown_provenance: bool = False,
    allow_incomplete: bool = False,
) -> Acceptance:
    """Accept ``ckpt`` for a run whose test set is ``test_cases`` (of ``test_patients``), or refuse it.

    See the module docstring for the three refusals.

    Raises:
        MedclDataError: naming the checkpoint, the problem and the flag that overrides it.
    """
    if ckpt.record is None and not allow_unknown_provenance:
        raise MedclDataError(ckpt.path, "has no run record, so nothing says which cases it was trained on (its "
                                        "provenance is unknown); write a provenance sidecar "
                                        f"({provenance_sidecar_paths(ckpt.path)[0].name}, with 'cases_seen') or pass "
                                        "--allow-unknown-provenance to use it anyway (the run then records "
                                        "provenance: unknown)")
    if ckpt.complete is False and not allow_incomplete:
        raise MedclDataError(ckpt.path, f"comes from an incomplete {ckpt.kind} run (stopped at step {ckpt.step}; "
                                        "resume it with --resume, or pass --allow-incomplete to use it as it is)")
    overlap = sorted(set(ckpt.cases_seen) & set(map(str, test_cases)))
    p_overlap = sorted(set(ckpt.patients_seen) & {str(p) for p in test_patients if p})
    if (overlap or p_overlap) and not allow_test_overlap:
        what = (f"{len(overlap)} of the test cases ({_shown(overlap)})" if overlap else
                f"{len(p_overlap)} of the test patients ({_shown(p_overlap)})")
        raise MedclDataError(
            ckpt.path,
            f"this {ckpt.kind} checkpoint was trained on {what}; its test score would not be a fair few-label result. "
            "Pretrain without them, choose another test set, or pass --allow-test-overlap if you know what you are "
            "doing",
        )
    return Acceptance(ckpt, ckpt.provenance, overlap, p_overlap)


def build_from_checkpoint(
    ckpt: InitCheckpoint,
    in_channels: int,
    num_classes: int,
    load: list[str],
    require_encoder: bool = True,
    adapt: str = "mean",
    fallback: BackboneConfig | None = None,
    key_map: str | None = None,
) -> tuple[Backbone, LoadReport]:
    """The checkpoint's backbone with ``in_channels`` inputs and a ``num_classes`` head, stages ``load`` loaded.

    Args:
        ckpt: from :func:`read_checkpoint`.
        in_channels, num_classes: of the fine-tuning data (the first layer is adapted if channels differ).
        load: stage groups to copy (``encoder``, ``bottleneck``, ``decoder``, ``head``).
        require_encoder: raise if any encoder/bottleneck weight is missing or mismatched.
        adapt: first-layer rule.
        fallback: the architecture to assume when the checkpoint describes none (a plain state dict).
        key_map: forced key map (:mod:`medcl.models.keymaps`); ``None`` = best match.

    Raises:
        MedclDataError: no architecture known, or (``require_encoder``) the encoder did not load completely.
    """
    if ckpt.backbone is None and fallback is None:
        raise MedclDataError(ckpt.path, "the checkpoint names no backbone architecture (no 'backbone_config' and no "
                                        "backbone section in its run record)")
    base = dict(ckpt.backbone) if ckpt.backbone is not None else to_dict(fallback)
    base.update(in_channels=int(in_channels), out_channels=int(num_classes))
    try:
        cfg = from_dict(BackboneConfig, base, prefix="backbone")
    except MedclConfigError as exc:
        raise MedclDataError(ckpt.path, f"its backbone config is not valid here: {exc}") from exc
    net = build_backbone(cfg)
    report = load_backbone(net, ckpt.contents, prefixes=list(load), adapt=adapt,  # type: ignore[arg-type]
                           key_map=key_map)
    report.source = str(ckpt.path)
    if require_encoder:
        enc = ("encoder", "bottleneck")
        missing = report.missing_in(enc)
        mism = [m["key"] for m in report.mismatched if m["key"].split(".")[0] in enc]
        if missing or mism:
            raise MedclDataError(
                ckpt.path,
                f"the encoder did not load completely ({len(missing)} missing, {len(mism)} mismatched, e.g. "
                f"{(missing + mism)[0]}): is it a checkpoint of another architecture? Set init.require_encoder=false "
                f"to fine-tune anyway.\n{report}",
            )
    return net, report
