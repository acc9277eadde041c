"""``medcl mil train`` end to end: h5 slides and an instance table; outputs; the saved model."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import torch

from medcl.cli import main
from medcl.mil.bag_io import load_bags
from medcl.mil.train import evaluate, load_mil_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mil"
FAST = ["train.epochs=4", "train.batch_size=4", "encoder.hidden=[16]", "transmil.dim=16", "transmil.heads=2"]


def write_slide_dataset(root, n_slides=12, dim=5):
    g = np.random.default_rng(0)
    (root / "features").mkdir(parents=True)
    rows = ["slide_id,label,patient_id"]
    for i in range(n_slides):
        n = int(g.integers(3, 20))
        y = ["benign", "malignant"][i % 2]
        x = g.normal(size=(n, dim)).astype(np.float32)
        if y == "malignant":
            x[0, 0] += 5
        with h5py.File(root / "features" / f"slide{i}.h5", "w") as f:
            f["features"] = x
            f["coords"] = g.integers(0, 10_000, size=(n, 2))
        rows.append(f"slide{i},{y},pat{i // 2}")
    (root / "slides.csv").write_text("\n".join(rows) + "\n")
    return root / "slides.csv"


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_h5_slides_two_heads(tmp_path, capsys):
    data = write_slide_dataset(tmp_path / "data")
    out = tmp_path / "run"
    rc = main(["mil", "train", "--config", str(CONFIGS / "abmil.yaml"), "--config", str(CONFIGS / "transmil.yaml"),
               "--data", str(data), "--out", str(out), "--folds", "3", "--seeds", "0,1", *FAST])
    assert rc == 0, capsys.readouterr().err
    rows = read_rows(out / "results.csv")
    assert len(rows) == 2 * 2 * 3
    assert {r["head"] for r in rows} == {"abmil", "transmil"}
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    md = (out / "results.md").read_text()
    assert "| abmil | 6 |" in md and "| transmil | 6 |" in md and "grouped by patient" in md
    # one patient's slides are in one fold: the two slides of patient k are tested together
    preds = read_rows(out / "predictions.csv")
    fold_of = {(p["head"], p["seed"], p["bag"]): p["fold"] for p in preds}
    for k in range(6):
        assert fold_of[("abmil", "0", f"slide{2 * k}")] == fold_of[("abmil", "0", f"slide{2 * k + 1}")]
    with h5py.File(out / "instance_scores" / "abmil.h5") as f:
        n_scored = sum(len(f[f"seed0/fold{k}"]) for k in range(3))
        assert n_scored == 12
    head, info = load_mil_model(out / "model_transmil.pt")
    assert info["classes"] == ["benign", "malignant"] and info["in_dim"] == 5
    torch.load(out / "model_abmil.pt", weights_only=True)  # plain tensors and containers only
    ds = load_bags(data)
    p1 = evaluate(head, ds).probs
    head2, _ = load_mil_model(out / "model_transmil.pt")
    np.testing.assert_allclose(evaluate(head2, ds).probs, p1, atol=1e-6)


def test_cli_instance_table_with_imbalance(tmp_path, capsys):
    g = np.random.default_rng(1)
    lines = []
    for b in range(24):
        y = int(b % 2)
        for j in range(int(g.integers(2, 6))):
            x = g.normal(size=4) + (3 * (j == 0) * y)
            lines.append(",".join([str(y), str(b)] + [f"{v:.4f}" for v in x]))
    data = tmp_path / "table.csv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    rc = main(["mil", "train", "--config", str(CONFIGS / "scmil.yaml"), "--data", str(data), "--out", str(out),
               "--folds", "4", "--seeds", "3", "--imbalance", "0.25", *FAST])
    assert rc == 0, capsys.readouterr().err
    rows = read_rows(out / "results.csv")
    assert len(rows) == 4 and all(r["head"] == "scmil" for r in rows)
    for r in rows:  # 9 negatives per training fold -> round(0.25 / 0.75 * 9) = 3 positives kept
        assert int(r["n_train_positive"]) == 3
    head, info = load_mil_model(out / "model.pt")
    assert info["head"] == "scmil" and info["config"].cv.imbalance == 0.25


def test_cli_unknown_config_key_is_named(tmp_path, capsys):
    data = write_slide_dataset(tmp_path / "data", n_slides=4)
    rc = main(["mil", "train", "--data", str(data), "--out", str(tmp_path / "o"), "train.epoch=3"])
    assert rc == 2
    assert "train.epoch" in capsys.readouterr().err
