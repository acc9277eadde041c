"""What a fine-tuning run decides before training: its config, classes, cases and preprocessing plan.

* :func:`load_finetune_config` -- YAML + ``key=value`` overrides merged over the defaults of
  :class:`FinetuneConfig` (a partial section keeps the other defaults of *this* schema).
* :func:`resolve_labels` -- the number of classes, the ignore label (``data.ignore_label`` or the label
  named ``ignore`` in the dataset, nnU-Net style) and the class names.
* :func:`select_cases` -- training, validation and test cases from a label-budget split file, or ``N``
  labelled cases drawn with the seed, or every labelled case; the validation cases are taken *from* the
  ``N`` labelled volumes (inside the budget).
* :func:`resolve_plan` -- the pretraining checkpoint's plan (or the dataset's default), with the config's
  ``data.plan`` keys on top, the dataset's channels and labels.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcl.config import apply_overrides, from_dict, read_yaml, to_dict
from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.data import Manifest, PreprocessingPlan
from medcl.data.splits import FULL, load_split
from medcl.segment.config import FinetuneConfig

__all__ = ["load_finetune_config", "finetune_config_from_dict", "merge_config", "LabelInfo", "resolve_labels", "CaseSelection", "select_cases", "resolve_plan"]


def merge_config(base: Any, top: Any) -> Any:
    """``top`` merged into ``base`` recursively (mappings merge, anything else is replaced)."""
    if isinstance(base, dict) and isinstance(top, dict):
        out = dict(base)
        for k, v in top.items():
            out[k] = merge_config(base[k], v) if k in base else v
        return out
    return top


def finetune_config_from_dict(data: dict[str, Any]) -> FinetuneConfig:
    """A config dict (possibly partial) merged over the defaults and validated."""
    base = to_dict(FinetuneConfig())
    # 'data.plan' is a free mapping of plan keys: replaced, not merged with the (None) default
    return from_dict(FinetuneConfig, merge_config(base, data))


def load_finetune_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> FinetuneConfig:
    """Read a fine-tuning YAML (or only the defaults) and apply ``key=value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    if overrides:
        data = apply_overrides(data, overrides)
    return finetune_config_from_dict(data)


@dataclass
class LabelInfo:
    """Classes of a fine-tuning run.

    Attributes:
        num_classes: ``K`` including background (label values ``0 .. K-1``).
        ignore_label: value excluded from the loss, or ``None``.
        names: value -> name of the ``K`` classes.
        manifest: the manifest to load cases with (its declared labels include the ignore value).
    """

    num_classes: int
    ignore_label: int | None
    names: dict[int, str]
    manifest: Manifest


def resolve_labels(manifest: Manifest, cfg: FinetuneConfig) -> LabelInfo:
    """Classes and ignore label of ``manifest`` under ``cfg.data`` (see :class:`LabelInfo`)."""
    declared = dict(manifest.labels) if manifest.labels is not None else None
    ignore = cfg.data.ignore_label
    if ignore is None and declared:
        named = [v for v, n in declared.items() if str(n).strip().lower() == "ignore"]
        ignore = named[0] if named else None
    classes = {v: n for v, n in (declared or {}).items() if v != ignore}
    if cfg.data.num_classes is not None:
        k = int(cfg.data.num_classes)
    elif classes:
        k = max(classes) + 1
    else:
        raise MedclConfigError("data.num_classes", f"the dataset {manifest.source or manifest.root} declares no labels; "
                                                   "set data.num_classes (background included)")
    if k < 2:
        raise MedclConfigError("data.num_classes", f"need at least 2 classes (background + one), got {k}")
    if ignore is not None and 0 <= ignore < k:
        raise MedclConfigError("data.ignore_label", f"the ignore label {ignore} is also a class (0..{k - 1}); "
                                                    "use a value above the classes, e.g. 255")
    if classes and sorted(classes) != list(range(len(classes))):
        raise MedclDataError(manifest.source or manifest.root,
                             f"label values must be consecutive from 0 (nnU-Net convention), got {sorted(classes)}")
    names = {i: classes.get(i, str(i)) for i in range(k)}
    m = manifest
    if ignore is not None and declared is not None and ignore not in declared:
        m = dataclasses.replace(manifest, labels={**declared, int(ignore): "ignore"})
    return LabelInfo(k, ignore, names, m)


@dataclass
class CaseSelection:
    """The cases of one fine-tuning run.

    Attributes:
        train: labelled cases trained on.
        validation: labelled cases held out for validation (part of the label budget).
        test: test cases (empty = no test).
        budget: the label budget ``N`` (``len(train) + len(validation)``), or ``"full"``/``None``.
        combination: the split's combination index, if any.
        source: where the selection came from (a split file, ``"drawn"``, ``"all"``, ``"explicit"``).
        unlabelled: cases whose images (never their labels) semi-supervised fine-tuning may use: the split's pool
            (or every case outside the test set) minus the validation cases; never a test case.
    """

    train: list[str]
    validation: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    budget: int | str | None = None
    combination: int | None = None
    source: str = "explicit"
    unlabelled: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, manifest: Manifest) -> None:
        ids = set(manifest.ids)
        for name in ("train", "validation", "test"):
            missing = sorted(set(getattr(self, name)) - ids)
            if missing:
                raise MedclDataError(manifest.source or manifest.root,
                                     f"{name} case ids not in the dataset: {', '.join(missing[:10])}")
        labelled = {c.id for c in manifest.cases if c.label is not None}
        unlabelled = sorted((set(self.train) | set(self.validation) | set(self.test)) - labelled)
        if unlabelled:
            raise MedclDataError(manifest.source or manifest.root,
                                 f"cases without a label cannot be trained or tested on: {', '.join(unlabelled[:10])}")
        leak = sorted((set(self.train) | set(self.validation) | set(self.unlabelled)) & set(self.test))
        if leak:
            raise MedclDataError(manifest.source or manifest.root, f"cases both trained and tested on: {', '.join(leak)}")
        missing = sorted(set(self.unlabelled) - ids)
        if missing:
            raise MedclDataError(manifest.source or manifest.root, f"unlabelled case ids not in the dataset: "
                                                                   f"{', '.join(missing[:10])}")
        if not self.train:
            raise MedclConfigError("split", "no training case left (the validation takes every labelled volume)")


def _split_validation(labelled: list[str], n_val: int) -> tuple[list[str], list[str]]:
    if n_val >= len(labelled):
        raise MedclConfigError("split.validation", f"{n_val} validation volume(s) out of a budget of {len(labelled)} "
                                                   "leaves nothing to train on")
    return (labelled[: len(labelled) - n_val], labelled[len(labelled) - n_val:]) if n_val else (labelled, [])


def select_cases(manifest: Manifest, cfg: FinetuneConfig) -> CaseSelection:
    """Training / validation / test cases from ``cfg.split`` (see the module docstring)."""
    s = cfg.split
    if s.file:
        split = load_split(s.file)
        split.check_manifest(manifest, s.file)
        budget: int | str
        if s.labelled is not None:
            budget = s.labelled
        elif len(split.budgets) == 1:
            budget = next(iter(split.budgets))
        else:
            budget = FULL
        labelled = split.labelled(budget, s.combination)
        train, val = _split_validation(labelled, s.validation)
        pool = [c for c in split.pool if c not in set(val)]
        return CaseSelection(train, val, list(split.test), budget, s.combination, str(Path(s.file)), pool)
    labelled_ids = [c.id for c in manifest.cases if c.label is not None and c.split != "test"]
    if not labelled_ids:
        raise MedclDataError(manifest.source or manifest.root, "no labelled case to fine-tune on")
    if s.labelled is not None:
        if s.labelled > len(labelled_ids):
            raise MedclConfigError("split.labelled", f"{s.labelled} labelled volumes asked, the dataset has "
                                                     f"{len(labelled_ids)}")
        rng = np.random.default_rng([int(cfg.seed), int(s.labelled), int(s.combination)])
        picked = [labelled_ids[int(i)] for i in rng.choice(len(labelled_ids), size=s.labelled, replace=False)]
        train, val = _split_validation(picked, s.validation)
        return CaseSelection(train, val, [], s.labelled, None, "drawn", _outside_test(manifest, val))
    train, val = _split_validation(labelled_ids, s.validation)
    return CaseSelection(train, val, [], len(labelled_ids), None, "all", _outside_test(manifest, val))


def _outside_test(manifest: Manifest, validation: list[str]) -> list[str]:
    """Every case outside the dataset's test split and the validation cases (the unlabelled pool without a
    split file)."""
    return [c.id for c in manifest.cases if c.split != "test" and c.id not in set(validation)]


def resolve_plan(manifest: Manifest, cfg: FinetuneConfig, base: dict[str, Any] | None,
                 labels: LabelInfo) -> PreprocessingPlan:
    """The preprocessing plan of the run: ``base`` (a checkpoint's plan) or the dataset's default, with
    ``cfg.data.plan`` keys on top; channels and class names always from the fine-tuning dataset."""
    default = PreprocessingPlan.for_manifest(manifest).to_dict()
    d = dict(base) if base else dict(default)
    if cfg.data.plan:
        d.update(cfg.data.plan)
    n_ch = len(manifest.channel_names)
    d["channel_names"] = list(manifest.channel_names)
    if len(d.get("intensity") or []) not in (1, n_ch):  # a checkpoint made for other channels
        d["intensity"] = default["intensity"]
    d["labels"] = {int(k): v for k, v in labels.names.items()}
    try:
        return PreprocessingPlan.from_dict(d)
    except MedclConfigError as exc:
        raise MedclConfigError(f"data.plan.{exc.key}", exc.problem) from exc
