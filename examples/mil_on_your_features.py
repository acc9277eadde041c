"""Multiple-instance learning on your own patch features: h5 bags + a CSV of slide labels -> a cross-validated
MIL head -> the instances it attends to.

Input layout (what ``medcl mil extract`` writes, and CLAM / torchmil too)::

    slides.csv              slide_id,label[,patient_id]        (labels: any strings or integers)
    features/{slide_id}.h5  features [N, D] float, coords [N, 2] (level-0 pixels of each patch)

Without ``--data`` it writes such a folder of synthetic bags: a positive bag hides 2-4 "tumour" instances
(features shifted along one direction) among normal ones, so the attention can be checked against the truth.
Then: :func:`medcl.mil.load_bags`, a config from ``configs/mil/`` (ABMIL, Ilse et al. 2018, by default),
:func:`medcl.mil.cross_validate` (stratified folds, metrics per fold, a final model on all bags) and
:func:`medcl.mil.load_mil_model` + :func:`medcl.mil.evaluate` for the attention over one bag's instances.

    python examples/mil_on_your_features.py
    python examples/mil_on_your_features.py --data my_slides.csv --head gated_abmil --epochs 60 --folds 10
    python examples/mil_on_your_features.py --data ../shared/data/mil/musk1.csv   # instance tables work too
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

from medcl.config import load_config
from medcl.mil import MILConfig, cross_validate, evaluate, load_bags, load_mil_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mil"


def write_bags(folder: Path, n_bags: int = 30, dim: int = 32, seed: int = 0) -> tuple[Path, dict[str, list[int]]]:
    """Synthetic bags in the layout above; returns the CSV and the witness (tumour) instances of each bag."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    (folder / "features").mkdir(parents=True, exist_ok=True)
    rows, witnesses = [], {}
    for i in range(n_bags):
        sid, positive, n = f"slide_{i:03d}", i % 2 == 1, int(rng.integers(12, 48))
        feats = rng.standard_normal((n, dim)).astype(np.float32)
        cells = rng.permutation(64)[:n]  # patches on an 8 x 8 grid of 256-px tiles
        coords = np.stack([cells % 8, cells // 8], axis=1) * 256
        wit = sorted(rng.choice(n, size=int(rng.integers(2, 5)), replace=False).tolist()) if positive else []
        feats[wit] += 4.0 * direction.astype(np.float32)
        with h5py.File(folder / "features" / f"{sid}.h5", "w") as f:
            f["features"], f["coords"] = feats, coords.astype(np.int64)
        rows.append((sid, "tumour" if positive else "normal"))
        witnesses[sid] = wit
    csv_path = folder / "slides.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "label"), *rows])
    (folder / "witnesses.json").write_text(json.dumps(witnesses))
    return csv_path, witnesses


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="slide CSV (+ features/*.h5) or an instance table (default: synthetic bags)")
    ap.add_argument("--head", default="abmil", help="a config in configs/mil/ (abmil, gated_abmil, transmil, ...)")
    ap.add_argument("--epochs", "--steps", type=int, dest="epochs", help="training epochs (default: the config's)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--top", type=int, default=5, help="instances listed for one bag")
    ap.add_argument("--out", help="output folder (default: a temporary folder)")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="medcl_mil_"))
    witnesses = None
    data = Path(args.data) if args.data else None
    if data is None:
        data, witnesses = write_bags(out / "bags")

    ds = load_bags(data)  # reads the CSV, finds features/ beside it, checks every bag
    print(f"{len(ds)} bags, {ds.n_instances} instances, {ds.in_dim} features, classes {ds.classes}")
    epochs = [f"train.epochs={args.epochs}"] if args.epochs else []
    cfg = load_config(MILConfig, CONFIGS / f"{args.head}.yaml", [*epochs, f"cv.folds={args.folds}", "cv.seeds=[0]"])
    cfg.validate()
    rows = cross_validate([cfg], ds, out / "cv")  # results.csv / results.md / model.pt in OUT/cv
    metrics = {k: float(np.mean([r[k] for r in rows])) for k in ("accuracy", "balanced_accuracy", "auc", "f1")}
    print("cross-validated (mean over folds): " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    # the final model (trained on all bags): which instances of a positive bag does it attend to?
    head, info = load_mil_model(out / "cv" / "model.pt")
    i = int(torch.nonzero(ds.labels == len(ds.classes) - 1)[0])
    bag = ds.subset([i])
    pred = evaluate(head, bag)
    coords = bag.read(0)[1]
    top = []
    print(f"\nbag {ds.ids[i]} (label {ds.classes[ds.bags[i].label]}, P = {pred.probs[0].round(3).tolist()}):")
    if pred.instance_scores is not None:
        scores = pred.instance_scores[0]
        top = np.argsort(-scores)[: args.top].tolist()
        for rank, j in enumerate(top):
            where = f"({int(coords[j, 0])}, {int(coords[j, 1])})" if coords is not None else "-"
            truth = f"  {'tumour' if j in witnesses[ds.ids[i]] else 'normal'}" if witnesses else ""
            print(f"  #{rank + 1}  instance {j:3d}  attention {scores[j]:.3f}  at {where}{truth}")
    return {"out": out, "metrics": metrics, "rows": rows, "bag": ds.ids[i], "top": top, "classes": info["classes"],
            "witnesses": witnesses[ds.ids[i]] if witnesses else None}


if __name__ == "__main__":
    main()
