"""Label budgets: which volumes are labelled, which are test, which form the unlabelled pool.

A label-efficiency experiment (Chaitanya et al., "Contrastive learning of global and local features for
medical image segmentation with limited annotations", NeurIPS 2020) fine-tunes on ``N`` labelled volumes for
each ``N`` in a list, repeats every ``N`` on ``K`` different combinations of volumes, and tests all of them
on one fixed test set. :func:`make_label_budget_split` draws such a design from a seed and
:class:`LabelBudgetSplit` saves it as JSON, so every initialisation, seed and learning rate of a benchmark
sees exactly the same volumes, and a later run can be checked against the same file.

The rules:

* the **test set** is drawn first, from the labelled cases only; when the manifest has a ``patient``
  column, whole patients are drawn (no patient has volumes on both sides);
* the **pool** is every case not in the test set (labelled or not): pretraining may use all of it, and the
  labelled combinations are drawn from its labelled cases;
* each budget ``N`` has its own random stream ``(seed, N)``: adding a budget to the list does not change the
  combinations of the others, and the test set does not depend on the budgets at all;
* the ``K`` combinations of one ``N`` are distinct sets (all of them when fewer than ``K`` exist); the ids of
  a combination are kept in the order they were drawn, so "the last ``v``" is a random subset (used for an
  optional validation split *inside* the budget).

File format (``version`` 1)::

    {"format": "medcl.label_budget_split", "version": 1, "seed": 0, "dataset": "...",
     "patient_aware": false, "test": ["case_a", ...], "pool": [...], "labelled_pool": [...],
     "budgets": {"1": [["case_x"], ["case_y"], ["case_z"]], "2": [["case_p", "case_q"], ...]}}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations as _all_combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.core.files import atomic_write_json

if TYPE_CHECKING:
    from medcl.data.manifest import Manifest

__all__ = ["LabelBudgetSplit", "make_label_budget_split", "load_split", "SPLIT_FORMAT", "FULL"]

SPLIT_FORMAT = "medcl.label_budget_split"
SPLIT_VERSION = 1
FULL = "full"
"""Budget name of the full-label setting: every labelled case of the pool, one combination."""

_TEST_STREAM = 0x7E57  # the test set's random stream is (seed, _TEST_STREAM); budgets use (seed, N)


@dataclass
class LabelBudgetSplit:
    """A fixed test set, the unlabelled pool and ``K`` labelled combinations per budget ``N``.

    Attributes:
        seed: the seed everything was drawn from.
        test: test case ids (labelled; never labelled for training, never in the pool).
        pool: every other case id (what pretraining may use).
        labelled_pool: the cases of ``pool`` that have a label (where combinations are drawn from).
        budgets: ``N -> [combination, ...]``, each combination a list of ``N`` case ids from
            ``labelled_pool``, in drawn order.
        patient_aware: the test set was drawn by patient.
        dataset: the dataset the split was made for (informative).
    """

    seed: int
    test: list[str]
    pool: list[str]
    labelled_pool: list[str]
    budgets: dict[int, list[list[str]]] = field(default_factory=dict)
    patient_aware: bool = False
    dataset: str = ""

    def labelled(self, n: int | str, combination: int = 0) -> list[str]:
        """The labelled case ids of budget ``n`` (or :data:`FULL`), combination ``combination``."""
        if n == FULL:
            if combination != 0:
                raise MedclConfigError("split.combination", f"the full-label setting has one combination, got {combination}")
            return list(self.labelled_pool)
        n = int(n)
        if n not in self.budgets:
            raise MedclConfigError("split.labelled", f"the split has no budget of {n} labelled volumes "
                                                     f"(budgets: {sorted(self.budgets)}, or '{FULL}')")
        combos = self.budgets[n]
        if not 0 <= combination < len(combos):
            raise MedclConfigError("split.combination", f"budget {n} has {len(combos)} combinations "
                                                        f"(0..{len(combos) - 1}), got {combination}")
        return list(combos[combination])

    def n_combinations(self, n: int | str) -> int:
        return 1 if n == FULL else len(self.budgets[int(n)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPLIT_FORMAT,
            "version": SPLIT_VERSION,
            "seed": int(self.seed),
            "dataset": self.dataset,
            "patient_aware": bool(self.patient_aware),
            "test": list(self.test),
            "pool": list(self.pool),
            "labelled_pool": list(self.labelled_pool),
            "budgets": {str(n): [list(c) for c in combos] for n, combos in sorted(self.budgets.items())},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the split as JSON (atomically: a temp file in the same folder, then renamed)."""
        atomic_write_json(self.to_dict(), path)
        return Path(path)

    @classmethod
    def from_dict(cls, d: Any, source: str = "split") -> LabelBudgetSplit:
        """Inverse of :meth:`to_dict`; every inconsistency is a :class:`MedclDataError` naming ``source``."""
        if not isinstance(d, dict) or d.get("format") != SPLIT_FORMAT:
            raise MedclDataError(source, f"not a medcl label-budget split (expected \"format\": \"{SPLIT_FORMAT}\")")
        if int(d.get("version", 0)) > SPLIT_VERSION:
            raise MedclDataError(source, f"split version {d.get('version')} is newer than this medcl ({SPLIT_VERSION})")
        for key in ("test", "pool", "labelled_pool"):
            if not isinstance(d.get(key), list) or not all(isinstance(x, str) for x in d[key]):
                raise MedclDataError(source, f"key '{key}' must be a list of case ids")
        raw = d.get("budgets")
        if not isinstance(raw, dict):
            raise MedclDataError(source, "key 'budgets' must map N to a list of combinations")
        budgets: dict[int, list[list[str]]] = {}
        for k, combos in raw.items():
            try:
                n = int(k)
            except ValueError as exc:
                raise MedclDataError(source, f"key 'budgets.{k}' is not a number of volumes") from exc
            if not isinstance(combos, list) or not all(isinstance(c, list) and len(c) == n for c in combos):
                raise MedclDataError(source, f"key 'budgets.{k}' must be a list of combinations of {n} case ids")
            budgets[n] = [[str(x) for x in c] for c in combos]
        split = cls(seed=int(d.get("seed", 0)), test=list(d["test"]), pool=list(d["pool"]),
                    labelled_pool=list(d["labelled_pool"]), budgets=budgets,
                    patient_aware=bool(d.get("patient_aware", False)), dataset=str(d.get("dataset", "")))
        split.validate(source)
        return split

    def validate(self, source: str = "split") -> None:
        """Check the invariants: test, pool disjoint; labelled combinations inside the labelled pool."""
        test, pool = set(self.test), set(self.pool)
        if overlap := sorted(test & pool):
            raise MedclDataError(source, f"cases in both test and pool: {', '.join(overlap[:10])}")
        if stray := sorted(set(self.labelled_pool) - pool):
            raise MedclDataError(source, f"labelled_pool cases not in the pool: {', '.join(stray[:10])}")
        lp = set(self.labelled_pool)
        for n, combos in self.budgets.items():
            for i, c in enumerate(combos):
                if len(set(c)) != len(c):
                    raise MedclDataError(source, f"budget {n} combination {i} repeats a case: {c}")
                if bad := sorted(set(c) - lp):
                    raise MedclDataError(source, f"budget {n} combination {i} uses cases outside the labelled pool "
                                                 f"(test or unknown): {', '.join(bad)}")

    def check_manifest(self, manifest: Manifest, source: str = "split") -> None:
        """Raise :class:`MedclDataError` if the split names cases the dataset does not have."""
        ids = set(manifest.ids)
        missing = sorted((set(self.test) | set(self.pool)) - ids)
        if missing:
            raise MedclDataError(source, f"{len(missing)} case id(s) of the split are not in the dataset "
                                         f"{manifest.source or manifest.root}: {', '.join(missing[:10])}")


def load_split(path: str | os.PathLike) -> LabelBudgetSplit:
    """Read a split file written by :meth:`LabelBudgetSplit.save`."""
    p = Path(path)
    if not p.is_file():
        raise MedclDataError(p, "split file does not exist")
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MedclDataError(p, f"cannot read the split file: {exc}") from exc
    return LabelBudgetSplit.from_dict(d, str(p))


def _units(case_ids: Sequence[str], patients: dict[str, str | None]) -> list[list[str]]:
    """Group case ids into sampling units: one per patient (cases without a patient are their own unit)."""
    groups: dict[str, list[str]] = {}
    order: list[str] = []
    for cid in case_ids:
        key = f"patient:{patients[cid]}" if patients.get(cid) else f"case:{cid}"
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(cid)
    return [groups[k] for k in order]


def _draw_test(units: list[list[str]], n_test: int, rng: np.random.Generator) -> list[str]:
    """Whole units in random order until ``n_test`` cases are reached (a unit that would overshoot is skipped
    when a later one fits exactly; the result may overshoot only if no combination hits ``n_test``)."""
    order = rng.permutation(len(units))
    test: list[str] = []
    for i in order:
        u = units[int(i)]
        if len(test) + len(u) <= n_test:
            test.extend(u)
        if len(test) == n_test:
            return test
    for i in order:  # could not hit the count exactly: top up with the first unit left
        u = units[int(i)]
        if u[0] not in test:
            test.extend(u)
            break
    return test


def _draw_combinations(ids: list[str], n: int, k: int, rng: np.random.Generator) -> list[list[str]]:
    """``k`` distinct ``n``-subsets of ``ids`` (all of them, in random order, when fewer exist)."""
    total = math.comb(len(ids), n)
    if total <= k:
        every = [list(c) for c in _all_combinations(ids, n)]
        return [[every[int(j)][int(t)] for t in rng.permutation(n)] for j in rng.permutation(len(every))]
    seen: set[frozenset[str]] = set()
    out: list[list[str]] = []
    while len(out) < k:
        pick = [ids[int(j)] for j in rng.choice(len(ids), size=n, replace=False)]
        key = frozenset(pick)
        if key not in seen:
            seen.add(key)
            out.append(pick)
    return out


def make_label_budget_split(
    manifest: Manifest,
    budgets: Sequence[int],
    combinations: int = 3,
    test: int | float | Sequence[str] = 0.25,
    seed: int = 0,
    patient_aware: bool | None = None,
) -> LabelBudgetSplit:
    """Draw a label-budget design for ``manifest``.

    Args:
        manifest: the dataset (:func:`medcl.data.load_manifest`).
        budgets: numbers of labelled volumes ``N`` (each >= 1).
        combinations: ``K``, combinations drawn per ``N``.
        test: number of test cases (int), a fraction of the labelled cases (float in (0, 1)), or explicit
            test case ids.
        seed: the seed of every draw.
        patient_aware: draw the test set by patient; default: when any case has a patient id.

    Returns:
        The split; :meth:`LabelBudgetSplit.save` writes it.

    Raises:
        MedclConfigError: a budget larger than the labelled pool, a bad test size, unknown test ids.
    """
    ids = manifest.ids
    labelled = [c.id for c in manifest.cases if c.label is not None]
    patients = {c.id: c.patient for c in manifest.cases}
    aware = any(patients.values()) if patient_aware is None else bool(patient_aware)
    if combinations < 1:
        raise MedclConfigError("split.combinations", f"must be >= 1, got {combinations}")
    if not labelled:
        raise MedclDataError(manifest.source or manifest.root, "no case has a label: nothing to test or fine-tune on")

    if isinstance(test, str) or (isinstance(test, Sequence) and not isinstance(test, str)):
        test_ids = [str(t) for t in test]  # type: ignore[union-attr]
        unknown = sorted(set(test_ids) - set(labelled))
        if unknown:
            raise MedclConfigError("split.test", f"test ids unknown or without a label: {', '.join(unknown[:10])}")
        if aware:  # complete the patients of the given cases
            units = _units(labelled, patients)
            test_ids = [c for u in units if set(u) & set(test_ids) for c in u]
    else:
        if isinstance(test, float) and not isinstance(test, bool):
            if not 0.0 < test < 1.0:
                raise MedclConfigError("split.test", f"a fraction must be in (0, 1), got {test}")
            n_test = max(1, round(test * len(labelled)))
        else:
            n_test = int(test)
        if not 1 <= n_test < len(labelled):
            raise MedclConfigError("split.test", f"need 1 <= test < {len(labelled)} labelled cases, got {n_test}")
        units = _units(labelled, patients) if aware else [[c] for c in labelled]
        test_ids = _draw_test(units, n_test, np.random.default_rng([int(seed), _TEST_STREAM]))
    test_set = set(test_ids)
    pool = [c for c in ids if c not in test_set]
    labelled_pool = [c for c in labelled if c not in test_set]

    drawn: dict[int, list[list[str]]] = {}
    for n in sorted({int(b) for b in budgets}):
        if not 1 <= n <= len(labelled_pool):
            raise MedclConfigError("split.budgets", f"budget {n} is outside 1..{len(labelled_pool)} "
                                                    f"(the labelled cases left after the test set)")
        drawn[n] = _draw_combinations(labelled_pool, n, combinations, np.random.default_rng([int(seed), n]))
    split = LabelBudgetSplit(seed=int(seed), test=sorted(test_ids), pool=pool, labelled_pool=labelled_pool,
                             budgets=drawn, patient_aware=aware, dataset=manifest.source or manifest.root)
    split.validate()
    return split
