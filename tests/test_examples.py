"""The scripts in examples/ run on the embedded default (phantoms, synthetic bags) and do what they say:
the custom method saves a backbone that loads completely and matches its YAML twin; fine-tuning loads the
pretrained encoder, never pretrains on a test case and predicts on the input's grid; MIL finds the bags and
the planted instances."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import lightning  # noqa: F401  (imported once per session)
import monai  # noqa: F401
import numpy as np
import torch

from medcl.config import load_config
from medcl.engine.checkpoint import safe_torch_load
from medcl.io import read_volume
from medcl.models import BackboneConfig, backbone_from_file, build_backbone
from medcl.pretrain import PretrainConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_pretraining_trains_saves_and_matches_its_config(tmp_path):
    res = _load("custom_pretraining").main(["--steps", "2", "--out", str(tmp_path), "--run-config"])
    losses = res["losses"]
    assert losses.shape == (2, 2) and bool(torch.isfinite(losses).all())
    # at initialisation the G^D loss is near chance: 16 views, 3 positives and 12 negatives per anchor
    assert abs(float(losses[0, 0]) - math.log(13)) < 0.5
    # the backbone file loads completely into the architecture it names, with its run record ...
    net, report = backbone_from_file(res["backbone"])
    assert report.loaded and not report.missing and not report.mismatched
    assert report.record["kind"] == "pretrain" and len(report.record["cases_seen"]) == 6
    # ... and its weights were trained away from the seeded initialisation
    torch.manual_seed(0)
    init = build_backbone(BackboneConfig(in_channels=1, filters=(8, 16, 32), strides=(1, 2, 2))).state_dict()
    trained = net.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in init.items() if v.is_floating_point())
    # the YAML twin is a valid config whose module has the same heads and backbone
    cfg = load_config(PretrainConfig, res["config"])
    cfg.validate()
    assert {n: t.kind for n, t in cfg.terms.items()} == {"global": "contrastive", "recon": "reconstruction"}
    from medcl.pretrain.module import PretrainModule

    module = PretrainModule(cfg, {})
    for name, head in res["heads"].items():
        shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in module.terms[name].head.state_dict().items()}
    # running it with medcl.pretrain gives a backbone with the same tensors and logs both terms
    other = safe_torch_load(res["config_run"] / "backbone.pt")["state_dict"]
    assert {k: tuple(v.shape) for k, v in other.items()} == {k: tuple(v.shape) for k, v in trained.items()}
    with open(res["config_run"] / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/global")]
    assert rows and all(math.isfinite(float(r["train/global"])) and math.isfinite(float(r["train/recon"]))
                        for r in rows)


def test_finetune_from_checkpoint_loads_the_encoder_and_predicts_on_the_input_grid(tmp_path):
    res = _load("finetune_from_checkpoint").main(
        ["--steps", "2", "--pretrain-steps", "2", "--out", str(tmp_path)])
    report = res["load_report"]
    assert report["source"].endswith("backbone.pt") and report["loaded"] and not report["mismatched"]
    assert report["missing"] and all(k.startswith("head.") for k in report["missing"])  # only the new head
    assert any(k.startswith("encoder.0.") for k in report["loaded"])
    # the checkpoint was pretrained here without the test cases (else fine-tuning would refuse it)
    seen = json.loads((res["checkpoint"] / "record.json").read_text())["cases_seen"]  # the pretraining run
    assert seen and not set(seen) & set(res["test_cases"]) and set(res["labelled"]) <= set(seen)
    test = res["summary"]["test"]
    assert test["n_cases"] == 2 and 0.0 <= test["dice_mean"] <= 1.0 and res["summary"]["steps"] == 2
    # the prediction lies on the input's voxel grid, with label values of the 4 classes
    image = read_volume(tmp_path / "phantoms" / "imagesTr" / f"{res['test_cases'][0]}.nii.gz")
    pred = read_volume(res["prediction"], is_label=True)
    assert res["same_geometry"] and pred.array.shape == (1, 24, 24, 24) == image.array.shape
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
    assert set(np.unique(pred.array).tolist()) <= {0, 1, 2, 3}


def test_mil_example_separates_bags_and_attends_to_the_planted_instances(tmp_path):
    res = _load("mil_on_your_features").main(["--folds", "3", "--out", str(tmp_path)])
    assert len(res["rows"]) == 3 and res["classes"] == ["normal", "tumour"]
    assert res["metrics"]["accuracy"] >= 0.8 and res["metrics"]["auc"] >= 0.9  # chance: 0.5
    assert res["witnesses"] and res["top"][0] in res["witnesses"]
    # the head ranks the planted (tumour) instances of the bag above every normal one
    assert set(res["top"][: len(res["witnesses"])]) == set(res["witnesses"])
    assert (tmp_path / "cv" / "results.md").is_file() and (tmp_path / "cv" / "model.pt").is_file()


def test_recipe_pilot_chooses_on_the_validation_volume_and_never_reads_a_test_case(tmp_path):
    from medcl.data import load_manifest, write_phantom_dataset
    from medcl.data.splits import make_label_budget_split

    data = write_phantom_dataset(tmp_path / "phantoms", n=6, size=24, seed=0)
    split = make_label_budget_split(load_manifest(data), budgets=[2], combinations=1, test=2, seed=0)
    split.save(tmp_path / "split.json")
    chosen = _load("recipe_pilot").main([
        "--data", str(data), "--split", str(tmp_path / "split.json"), "--out", str(tmp_path / "pilot"),
        "--finetune-config", str(EXAMPLES.parent / "configs" / "finetune" / "phantoms.yaml"),
        "--seeds", "0", "--steps", "2,4", "--lrs", "1e-3,3e-3", "--thresholds", "0.5", "--stages", "supervised,semi"])
    train, val = chosen["train"], chosen["validation"]
    assert len(train) == 1 and len(val) == 1 and chosen["steps"] in (2, 4) and chosen["lr_semi"] in (1e-3, 3e-3)
    rows = list(csv.DictReader(open(tmp_path / "pilot" / "pilot.csv")))
    assert len(rows) == 2 * 2 + 2  # supervised lr x steps; semi at the chosen lr: pseudo at 0.5, and mse
    assert chosen["lr_semi"] == chosen["lr_supervised"] and chosen["semi_mode"] in ("pseudo", "mse")
    assert sorted(r["mode"] for r in rows if r["stage"] == "semi") == ["mse", "pseudo"]
    best = max((r for r in rows if r["stage"] == "supervised"), key=lambda r: float(r["val_dice"]))
    assert float(best["lr"]) == chosen["lr_supervised"]
    test = set(split.test)
    for record in (tmp_path / "pilot" / "runs").rglob("record.json"):
        rec = json.loads(record.read_text())
        assert not rec["test_cases"] and not set(rec["cases_seen"]) & test  # the test set is never read
        assert not set(rec["extra"].get("unlabelled_cases", [])) & (test | set(val))
    assert (tmp_path / "pilot" / "pilot.png").is_file()
