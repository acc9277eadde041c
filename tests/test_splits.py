"""medcl.data.splits: label budgets drawn from a seed, fixed test set, pool, patient-aware, JSON round trip."""

from __future__ import annotations

import json

import pytest

from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.data.manifest import Case, Manifest
from medcl.data.splits import FULL, LabelBudgetSplit, load_split, make_label_budget_split


def _manifest(n: int = 20, unlabelled: int = 3, patients: bool = False) -> Manifest:
    cases = [Case(id=f"c{i:02d}", images=[f"c{i:02d}.nii.gz"], label=f"l{i:02d}.nii.gz",
                  patient=f"p{i // 3}" if patients else None) for i in range(n)]
    cases += [Case(id=f"u{i}", images=[f"u{i}.nii.gz"]) for i in range(unlabelled)]
    return Manifest(cases=cases, channel_names=["MRI"], labels={0: "bg", 1: "fg"}, kind="csv", root="/x", source="x.csv")


def test_split_is_reproducible_from_the_seed_and_consistent():
    m = _manifest()
    a = make_label_budget_split(m, [1, 2, 4], combinations=3, test=6, seed=7)
    b = make_label_budget_split(m, [1, 2, 4], combinations=3, test=6, seed=7)
    c = make_label_budget_split(m, [1, 2, 4], combinations=3, test=6, seed=8)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    labelled = {f"c{i:02d}" for i in range(20)}
    assert len(a.test) == 6 and set(a.test) <= labelled
    # the pool is every other case, the unlabelled ones included; combinations come from its labelled part
    assert set(a.pool) == {cc.id for cc in m.cases} - set(a.test)
    assert set(a.labelled_pool) == labelled - set(a.test)
    for n, combos in a.budgets.items():
        assert len(combos) == 3
        assert len({frozenset(x) for x in combos}) == 3  # distinct sets
        for x in combos:
            assert len(x) == n and len(set(x)) == n and set(x) <= set(a.labelled_pool)
    assert a.labelled(FULL) == a.labelled_pool
    # a budget's combinations and the test set do not depend on the other budgets in the list
    d = make_label_budget_split(m, [2, 8], combinations=3, test=6, seed=7)
    assert d.budgets[2] == a.budgets[2] and d.test == a.test


def test_small_pools_give_every_combination_and_bad_budgets_fail():
    m = _manifest(n=6, unlabelled=0)
    s = make_label_budget_split(m, [1, 3], combinations=10, test=2, seed=0)
    assert sorted(sorted(x) for x in s.budgets[1]) == [[c] for c in sorted(s.labelled_pool)]  # all 4, not 10
    assert len(s.budgets[3]) == 4  # C(4, 3)
    with pytest.raises(MedclConfigError, match="budget 5"):
        make_label_budget_split(m, [5], test=2)
    with pytest.raises(MedclConfigError, match="test"):
        make_label_budget_split(m, [1], test=6)
    with pytest.raises(MedclConfigError, match="split.labelled"):
        s.labelled(2)
    with pytest.raises(MedclConfigError, match="combination"):
        s.labelled(1, 7)


def test_patient_aware_test_set_keeps_patients_whole():
    m = _manifest(n=21, unlabelled=0, patients=True)  # 7 patients of 3 volumes
    s = make_label_budget_split(m, [2], combinations=2, test=6, seed=3)
    assert s.patient_aware and len(s.test) == 6
    patient = {c.id: c.patient for c in m.cases}
    assert not ({patient[c] for c in s.test} & {patient[c] for c in s.pool})
    # explicit test ids are completed to whole patients
    s2 = make_label_budget_split(m, [1], test=["c00"], seed=0)
    assert sorted(s2.test) == ["c00", "c01", "c02"]


def test_split_file_round_trip_and_errors(tmp_path):
    m = _manifest()
    s = make_label_budget_split(m, [1, 2], combinations=2, test=5, seed=1)
    p = s.save(tmp_path / "split.json")
    back = load_split(p)
    assert back.to_dict() == s.to_dict() and isinstance(back, LabelBudgetSplit)
    back.check_manifest(m)
    d = json.loads(p.read_text())
    d["budgets"]["1"][0] = [d["test"][0]]  # a test case among the labelled ones
    p.write_text(json.dumps(d))
    with pytest.raises(MedclDataError, match="outside the labelled pool"):
        load_split(p)
    p.write_text("{not json")
    with pytest.raises(MedclDataError, match="split.json"):
        load_split(p)
    other = _manifest(n=4, unlabelled=0)
    with pytest.raises(MedclDataError, match="not in the dataset"):
        s.check_manifest(other)
