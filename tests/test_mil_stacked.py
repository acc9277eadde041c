"""Stacked training (``train.stack_models``, :mod:`medcl.mil.stacked`): K fits trained as one stacked model equal
K one-by-one fits (:func:`medcl.mil.train.fit_head`) up to float rounding, each with its own initialisation, data,
batch order and random stream; heads without a stacked forward fall back to one-by-one fits (bit for bit, logged);
the cross-validation driver gives the same tables with and without stacking, and resumes a stacked run exactly.
"""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch
from test_mil_fast import cfg_for, varied_bags

import medcl.mil.experiment as experiment
from medcl.mil.stacked import StackedFit, fit_heads
from medcl.mil.train import evaluate, fit_head

STACKED = ["abmil", "gated_abmil", "meanpool", "maxpool"]


def fold_jobs(ds, n: int = 3) -> list:
    """``n`` jobs on different training bags (every n-th bag left out) with different seeds; with 25 bags and n = 3
    they train on 16, 17 and 17 bags: the same steps per epoch, last batches of different sizes."""
    return [(ds.subset([j for j in range(len(ds)) if j % n != i]), 10 + i) for i in range(n)]


def assert_close_fits(ref, got, ds, kind: str) -> None:
    """Same steps, loss history, weights and probabilities within float rounding, same predicted classes."""
    assert got.steps == ref.steps
    np.testing.assert_allclose([h["loss"] for h in got.history], [h["loss"] for h in ref.history], atol=1e-5)
    a, b = ref.head.state_dict(), got.head.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("pool.w.bias"):
            # softmax is shift-invariant: this bias's true gradient is 0 and AdamW turns rounding noise into
            # lr-sized steps (as in test_mil_fast); it changes no output, checked below
            continue
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{kind} {k}: {m}")
    pa, pb = evaluate(ref.head, ds, batch_size=5).probs, evaluate(got.head, ds, batch_size=5).probs
    np.testing.assert_allclose(pb, pa, atol=1e-5)
    assert np.array_equal(pa.argmax(1), pb.argmax(1))


@pytest.mark.parametrize("kind", STACKED)
def test_stacked_fits_equal_the_sequential_fits(kind):
    """Encoder and attention dropout and instance subsampling: each model must draw its own fit's noise."""
    ds = varied_bags(n_bags=25, seed=4)
    cfg = cfg_for(kind, fast=True, **{"train.epochs": 4, "train.instance_keep": 0.7, "abmil.dropout": 0.3})
    jobs = fold_jobs(ds)
    stacked = StackedFit(cfg, jobs).run()
    for (train, seed), got in zip(jobs, stacked):
        assert_close_fits(fit_head(cfg, train, seed=seed), got, ds, kind)
    assert not torch.equal(stacked[0].head.classifier.weight, stacked[1].head.classifier.weight)


def test_per_model_gradient_clipping():
    """A clip small enough to bind every step: each model is clipped by its own gradient norm."""
    ds = varied_bags(n_bags=25, seed=6)
    cfg = cfg_for("gated_abmil", fast=True, **{"optim.grad_clip": 0.05, "optim.schedule": "constant",
                                               "train.epochs": 3})
    jobs = fold_jobs(ds)
    for (train, seed), got in zip(jobs, StackedFit(cfg, jobs).run()):
        assert_close_fits(fit_head(cfg, train, seed=seed), got, ds, "gated_abmil")


def test_fit_heads_groups_by_steps_and_keeps_job_order():
    """Jobs with another number of steps per epoch are another group; a job alone in its group is fit_head's fit
    bit for bit; results come back in job order."""
    ds = varied_bags(seed=7)
    cfg = cfg_for("abmil", fast=True, **{"train.stack_models": 4, "train.epochs": 2})
    jobs = [(ds.subset(range(0, 18)), 1), (ds.subset(range(3, 15)), 2), (ds.subset(range(6, 24)), 3)]
    fits = fit_heads(cfg, jobs)  # 18, 12, 18 bags with batches of 6: steps 3, 2, 3
    assert [f.steps for f in fits] == [6, 4, 6]
    alone = fit_head(cfg, jobs[1][0], seed=2)
    for k, v in alone.head.state_dict().items():
        assert torch.equal(fits[1].head.state_dict()[k], v)
    for i in (0, 2):
        assert_close_fits(fit_head(cfg, jobs[i][0], seed=jobs[i][1]), fits[i], ds, "abmil")


@pytest.mark.parametrize("kind,over", [("transmil", {"train.stack_models": 3}), ("abmil", {"train.stack_models": 0})])
def test_fallback_is_the_sequential_fit(kind, over, caplog):
    """A head without a stacked forward (and stacking off) trains one by one: fit_head's models bit for bit."""
    ds = varied_bags(seed=8)
    cfg = cfg_for(kind, fast=True, **{"train.epochs": 2, **over})
    jobs = fold_jobs(ds, 2)
    with caplog.at_level(logging.INFO, logger="medcl.mil.stacked"):
        fits = fit_heads(cfg, jobs)
    assert ("one by one" in caplog.text) == (kind == "transmil")
    for (train, seed), got in zip(jobs, fits):
        ref = fit_head(cfg, train, seed=seed)
        for k, v in ref.head.state_dict().items():
            assert torch.equal(got.head.state_dict()[k], v), f"{kind} {k}"


def read(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cv_cfg(stack: int):
    from test_mil_resume import cfg

    return cfg("encoder.dropout=0.25", "train.epochs=3", f"train.stack_models={stack}")


def test_cross_validation_with_stacking_gives_the_same_tables(tmp_path):
    from test_mil_resume import tiny_bags

    ds = tiny_bags()
    experiment.cross_validate([cv_cfg(0)], ds, tmp_path / "one", progress=False)
    experiment.cross_validate([cv_cfg(4)], ds, tmp_path / "stacked", progress=False)
    a, b = read(tmp_path / "one" / "results.csv"), read(tmp_path / "stacked" / "results.csv")
    assert [(r["seed"], r["fold"], r["accuracy"], r["auc"]) for r in a] == \
           [(r["seed"], r["fold"], r["accuracy"], r["auc"]) for r in b]
    pa, pb = read(tmp_path / "one" / "predictions.csv"), read(tmp_path / "stacked" / "predictions.csv")
    assert [(r["bag"], r["pred"]) for r in pa] == [(r["bag"], r["pred"]) for r in pb]
    np.testing.assert_allclose([float(r["p_1"]) for r in pb], [float(r["p_1"]) for r in pa], atol=1e-5)
    assert (tmp_path / "stacked" / "model.pt").is_file()


def test_stacked_run_resumes_to_the_uninterrupted_tables(tmp_path, monkeypatch):
    """Killed in its second chunk, a stacked run resumes (retraining that chunk whole) to identical tables."""
    from test_mil_resume import table, tiny_bags

    ds = tiny_bags()
    experiment.cross_validate([cv_cfg(4)], ds, tmp_path / "whole", progress=False)
    real, calls = experiment.fit_heads, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "fit_heads", dying)
    with pytest.raises(KeyboardInterrupt):
        experiment.cross_validate([cv_cfg(4)], ds, tmp_path / "cut", progress=False)
    assert len(list((tmp_path / "cut" / "units" / "abmil").glob("*.json"))) == 4  # the first chunk
    (tmp_path / "cut" / "units" / "abmil" / "seed0_fold1.json").unlink()  # as if killed while saving chunk 1
    monkeypatch.setattr(experiment, "fit_heads", real)
    experiment.cross_validate([cv_cfg(4)], ds, tmp_path / "cut", progress=False, resume=True)
    for name in ("results.csv", "predictions.csv"):
        assert table(tmp_path / "cut" / name) == table(tmp_path / "whole" / name)
