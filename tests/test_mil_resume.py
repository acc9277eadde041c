"""``medcl mil train``'s run folder: an interrupted cross-validation resumed with ``--resume`` gives the tables of an
uninterrupted run; a non-empty ``--out`` is refused without ``--resume`` / ``--overwrite``; a resumed run with
another config is refused, naming the key (only the keys that cannot change results may differ)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import medcl.mil.experiment as experiment
from medcl.config import apply_overrides, from_dict
from medcl.core.errors import MedclConfigError
from medcl.mil.bags import Bag, BagDataset
from medcl.mil.config import MILConfig


def tiny_bags() -> BagDataset:
    g = np.random.default_rng(0)
    bags = []
    for i in range(12):
        n = int(g.integers(2, 7))
        x = g.normal(size=(n, 4)).astype(np.float32)
        x[0, 0] += 3.0 * (i % 2)
        bags.append(Bag(id=f"b{i}", label=i % 2, n=n, features=torch.from_numpy(x)))
    return BagDataset(bags, ["0", "1"], 4, source="tiny")


def cfg(*over: str) -> MILConfig:
    base = {"head": "abmil", "device": "cpu", "encoder": {"hidden": [8]}, "abmil": {"attention_dim": 4},
            "train": {"epochs": 2, "batch_size": 4}, "cv": {"folds": 3, "seeds": [0, 1]}}
    return from_dict(MILConfig, apply_overrides(base, list(over)))


def table(path, drop=("seconds",)) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def test_interrupted_run_resumes_to_the_uninterrupted_tables(tmp_path, monkeypatch):
    ds = tiny_bags()
    experiment.cross_validate([cfg()], ds, tmp_path / "whole", progress=False)

    real_fit, calls = experiment.fit_head, []

    def dying_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # killed during the 4th fit (seed 1, fold 0)
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(experiment, "fit_head", dying_fit)
    with pytest.raises(KeyboardInterrupt):
        experiment.cross_validate([cfg()], ds, tmp_path / "cut", progress=False)
    assert json.loads((tmp_path / "cut" / "record.json").read_text())["complete"] is False
    assert len(list((tmp_path / "cut" / "units" / "abmil").glob("*.json"))) == 3

    monkeypatch.setattr(experiment, "fit_head", real_fit)
    with pytest.raises(MedclConfigError, match="--resume"):  # a non-empty --out needs --resume or --overwrite
        experiment.cross_validate([cfg()], ds, tmp_path / "cut", progress=False)
    with pytest.raises(MedclConfigError, match="train.epochs"):
        experiment.cross_validate([cfg("train.epochs=3")], ds, tmp_path / "cut", progress=False, resume=True)
    fits = []
    monkeypatch.setattr(experiment, "fit_head", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    # train.fast may change on resume: it does not change results
    experiment.cross_validate([cfg("train.fast=false")], ds, tmp_path / "cut", progress=False, resume=True)
    assert len(fits) == 4  # the 3 folds of seed 1 and the final model; seed 0's folds were kept
    for name in ("results.csv", "predictions.csv"):
        assert table(tmp_path / "cut" / name) == table(tmp_path / "whole" / name)
    assert json.loads((tmp_path / "cut" / "record.json").read_text())["complete"] is True
    assert (tmp_path / "cut" / "model.pt").is_file()


def test_overwrite_empties_the_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("x")
    experiment.cross_validate([cfg("cv.final_model=false", "cv.seeds=[0]")], tiny_bags(), out, progress=False,
                              overwrite=True)
    assert not (out / "old.txt").exists() and (out / "results.csv").is_file()
    with pytest.raises(MedclConfigError):
        experiment.cross_validate([cfg()], tiny_bags(), out, progress=False, resume=True, overwrite=True)
