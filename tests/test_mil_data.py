"""Bags (slide CSV + h5, instance tables), collate with masks, folds, imbalance, metrics."""

from __future__ import annotations

import itertools
import math

import h5py
import numpy as np
import pytest
import torch

from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.mil.bag_io import label_index, load_bags
from medcl.mil.bags import collate_bags
from medcl.mil.cv import stratified_group_kfold, subsample_class
from medcl.mil.metrics import auc, balanced_accuracy, binary_auc, f1


def write_slides(root, sizes, labels, patients=None, dim=6, folder="features"):
    (root / folder).mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    lines = ["slide_id,label" + (",patient_id" if patients else "")]
    for i, (n, y) in enumerate(zip(sizes, labels)):
        with h5py.File(root / folder / f"s{i}.h5", "w") as f:
            f["features"] = g.normal(size=(n, dim)).astype(np.float32)
            f["coords"] = np.stack([np.arange(n) * 256, np.zeros(n)], 1).astype(np.int64)
        lines.append(f"s{i},{y}" + (f",{patients[i]}" if patients else ""))
    (root / "slides.csv").write_text("\n".join(lines) + "\n")
    return root / "slides.csv"


def test_slide_csv_with_h5_folder_and_string_labels(tmp_path):
    csv = write_slides(tmp_path, [3, 5, 2], ["tumour", "normal", "tumour"], patients=["p1", "p1", "p2"])
    ds = load_bags(csv)
    assert ds.classes == ["normal", "tumour"]  # alphabetical for string labels
    assert ds.labels.tolist() == [1, 0, 1] and ds.in_dim == 6 and ds.n_instances == 10
    assert ds.patients == ["p1", "p1", "p2"] and ds.in_memory
    lazy = load_bags(csv, in_memory=False)
    assert not lazy.in_memory
    torch.testing.assert_close(lazy[1]["features"], ds[1]["features"])
    assert lazy[1]["coords"].shape == (5, 2)
    fixed = load_bags(csv, classes=["tumour", "normal"])
    assert fixed.labels.tolist() == [0, 1, 0]


def test_collate_pads_and_masks(tmp_path):
    ds = load_bags(write_slides(tmp_path, [3, 5, 1], [0, 1, 1]))
    b = collate_bags([ds[i] for i in range(3)])
    assert b.features.shape == (3, 5, 6) and b.mask.sum(1).tolist() == [3, 5, 1]
    assert torch.all(b.features[~b.mask] == 0)
    torch.testing.assert_close(b.features[0, :3], ds[0]["features"])
    # instance ids are dataset-wide: bag 1 starts after bag 0's 3 instances
    assert b.instance_index[1, :5].tolist() == [3, 4, 5, 6, 7] and b.instance_index[0, 3:].tolist() == [-1, -1]
    assert b.coords is not None and b.coords.shape == (3, 5, 2)


def test_zero_instance_bag_error_names_the_bag(tmp_path):
    csv = write_slides(tmp_path, [3, 4], [0, 1])
    with h5py.File(tmp_path / "features" / "s1.h5", "w") as f:
        f["features"] = np.zeros((0, 6), dtype=np.float32)
    with pytest.raises(MedclDataError, match="bag 's1' has zero instances"):
        load_bags(csv)
    with pytest.raises(MedclDataError, match="bag 'empty' has zero instances"):
        collate_bags([{"features": torch.zeros(0, 6), "label": 0, "id": "empty"}])


def test_missing_h5_and_bad_width_are_named(tmp_path):
    csv = write_slides(tmp_path, [3, 4], [0, 1])
    (tmp_path / "features" / "s1.h5").unlink()
    with pytest.raises(MedclDataError, match="s1"):
        load_bags(csv)
    csv = write_slides(tmp_path / "b", [3, 4], [0, 1])
    with h5py.File(tmp_path / "b" / "features" / "s0.h5", "w") as f:
        f["features"] = np.zeros((3, 7), dtype=np.float32)
    with pytest.raises(MedclDataError, match="s1.*6 features per instance, other bags have 7"):
        load_bags(csv)


def test_h5_dir_key_and_clam_folder(tmp_path):
    csv = write_slides(tmp_path, [2, 2], [0, 1], folder="h5_files")
    assert len(load_bags(csv)) == 2  # CLAM's folder name is found
    csv = write_slides(tmp_path / "c", [2, 2], [0, 1], folder="elsewhere/feats")
    assert len(load_bags(csv, h5_dir="elsewhere/feats")) == 2


def test_instance_table(tmp_path, shared_data):
    ds = load_bags(shared_data / "mil" / "musk1.csv")
    assert len(ds) == 92 and ds.n_instances == 476 and ds.in_dim == 166
    assert ds.classes == ["0", "1"] and int(ds.labels.sum()) == 47
    p = tmp_path / "t.csv"
    p.write_text("1,a,0.5,1\n0,a,0.1,2\n")
    with pytest.raises(MedclDataError, match="bag 'a' has rows with different labels"):
        load_bags(p)


def test_label_index_numeric_sorting():
    idx, classes = label_index(["10", "2", "2.0", "1"])
    assert classes == ["1", "2", "10"] and idx == [2, 1, 1, 0]


def test_stratified_folds_partition_and_balance():
    y = np.array([0] * 47 + [1] * 45)
    for seed in range(3):
        folds = stratified_group_kfold(y, 10, seed)
        allidx = np.sort(np.concatenate(folds))
        assert np.array_equal(allidx, np.arange(92))
        counts = np.array([[np.sum(y[f] == c) for c in (0, 1)] for f in folds])
        assert counts.max(0).tolist() == [5, 5] and counts.min(0).tolist() == [4, 4]
    assert not all(np.array_equal(a, b) for a, b in zip(stratified_group_kfold(y, 10, 0), stratified_group_kfold(y, 10, 1)))


def test_patient_grouped_folds_never_straddle():
    g = np.random.default_rng(0)
    patients = [f"p{int(i)}" for i in g.integers(0, 25, size=120)]
    y = g.integers(0, 3, size=120)
    folds = stratified_group_kfold(y, 5, seed=0, groups=patients)
    where = {}
    for f, idx in enumerate(folds):
        for i in idx:
            where.setdefault(patients[i], set()).add(f)
    assert all(len(s) == 1 for s in where.values())
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(120))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 12  # roughly even
    with pytest.raises(MedclConfigError, match="cv.folds"):
        stratified_group_kfold(y, 30, seed=0, groups=patients)


def test_subsample_class_ratio():
    y = np.array([0] * 40 + [1] * 42)
    tr = np.arange(82)
    for r in (0.2, 0.1):
        kept = subsample_class(tr, y, positive=1, ratio=r, seed=0)
        n_pos = int((y[kept] == 1).sum())
        assert n_pos == round(r / (1 - r) * 40) and int((y[kept] == 0).sum()) == 40
        assert abs(n_pos / len(kept) - r) < 0.02
    assert len(subsample_class(tr, y, 1, 0.01, seed=0)) == 42  # at least 2 positives kept


def slow_auc(y, s):
    pos = [a for a, t in zip(s, y) if t]
    neg = [b for b, t in zip(s, y) if not t]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_metrics_against_loops():
    g = np.random.default_rng(0)
    for _ in range(5):
        y = g.integers(0, 2, 30)
        s = np.round(g.random(30), 1)  # ties
        assert math.isclose(binary_auc(y, s), slow_auc(y, s), rel_tol=1e-12)
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    probs = g.dirichlet(np.ones(3), size=7)
    assert math.isclose(auc(y, probs), np.mean([slow_auc(y == c, probs[:, c]) for c in range(3)]))
    pred = np.array([0, 1, 1, 1, 2, 0, 2])
    assert math.isclose(balanced_accuracy(y, pred), (1 / 2 + 2 / 2 + 2 / 3) / 3)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp2 fp0 fn1 -> 0.8
    assert math.isclose(f1(y, pred, 3), (0.5 + 0.8 + 0.8) / 3)
    assert math.isclose(f1(np.array([0, 1, 1]), np.array([1, 1, 0]), 2), 0.5)
    assert math.isnan(binary_auc(np.array([1, 1]), np.array([0.2, 0.3])))
