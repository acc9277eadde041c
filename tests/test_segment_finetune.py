"""End-to-end fine-tuning on phantoms: a pretraining-style checkpoint loads with no missing encoder keys, the
leakage guard, a short fine-tune that beats chance, `medcl predict` on an oblique phantom, exact resume after
a kill, and the label-efficiency benchmark (tables, paired statistics, resumability)."""

from __future__ import annotations

import csv
import json
import logging

import lightning as L
import monai  # noqa: F401  (imported once per session)
import numpy as np
import pytest
import torch
from _runfolder import assert_run_folder

from medcl.cli import main
from medcl.config import to_dict
from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.core.record import RunRecord
from medcl.data import PreprocessingPlan, load_manifest, make_phantom, write_phantom_dataset
from medcl.data.splits import make_label_budget_split
from medcl.io import read_volume, write_nifti
from medcl.models import BackboneConfig, build_backbone, save_backbone
from medcl.segment.bench_report import paired_differences, write_report
from medcl.segment.init import accept_checkpoint, build_from_checkpoint, read_checkpoint
from medcl.segment.prepare import CaseSelection, finetune_config_from_dict

ARCH = BackboneConfig(in_channels=1, filters=(8, 16, 32), strides=(1, 2, 2))
VOXEL = 160.0 / 24  # the phantoms' voxel size (mm)
# small and fast: 16^3 patches, 4 per step, one CPU thread (much faster than two on a shared CPU)
FAST = ["threads=1", "sampling.patch_size=[16,16,16]", "sampling.batch_size=4", "augment.affine_prob=0",
        "inference.overlap=0.25", "trainer.log_every=5", f"data.plan.spacing=[{VOXEL},{VOXEL},{VOXEL}]"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Phantom dataset (6 cases, 24^3), a split (2 test cases), and a pretraining run folder."""
    root = tmp_path_factory.mktemp("seg")
    data = write_phantom_dataset(root / "ph", n=6, size=24, seed=0)
    manifest = load_manifest(data)
    split = make_label_budget_split(manifest, [2], combinations=1, test=2, seed=0)
    split.save(root / "split.json")
    torch.manual_seed(0)
    net = build_backbone(ARCH)
    plan = PreprocessingPlan.for_manifest(manifest)
    record = RunRecord(kind="pretrain", config={"backbone": to_dict(ARCH)}, plan=plan.to_dict(),
                       cases_seen=list(split.pool), complete=True, step=10).to_dict()
    run = root / "pretrain"
    (run / "checkpoints").mkdir(parents=True)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    state["heads.global.mlp.0.weight"] = torch.randn(8, 32)  # heads live under other prefixes
    state["teacher.module.backbone.encoder.0.conv1.conv.weight"] = torch.randn(8, 1, 3, 3, 3)
    torch.save({"state_dict": state, "medcl_record": record, "global_step": 10}, run / "checkpoints" / "last.ckpt")
    save_backbone(net, run / "backbone.pt", record=record)
    return {"root": root, "data": data, "manifest": manifest, "split": split, "run": run, "net": net,
            "record": record}


@pytest.fixture(scope="module")
def trained(ws):
    out = ws["root"] / "ft"
    rc = main(["finetune", "--data", str(ws["data"]), "--out", str(out), "--init", str(ws["run"] / "checkpoints"
               / "last.ckpt"), "--split", str(ws["root"] / "split.json"), "--labelled", "2", "--max-steps", "80",
               "--device", "cpu", "optim.lr=1e-2", *FAST])
    assert rc == 0
    return out


def test_pretraining_checkpoint_loads_with_no_missing_encoder_keys(ws, trained):
    enc_keys = [k for k in ws["net"].state_dict() if k.split(".")[0] in ("encoder", "bottleneck")]
    for source in (ws["run"] / "checkpoints" / "last.ckpt", ws["run"] / "backbone.pt", ws["run"]):
        ckpt = read_checkpoint(source)
        assert ckpt.backbone is not None and ckpt.kind == "pretrain"
        net, report = build_from_checkpoint(ckpt, 1, 4, ["encoder", "bottleneck", "decoder"])
        assert report.missing_in(("encoder", "bottleneck")) == [] and not report.mismatched
        assert not report.unexpected  # the heads and the EMA teacher are not read as backbone keys
        assert set(enc_keys) <= set(report.loaded)
        assert all(k.startswith("head.") for k in report.missing)  # only the new segmentation head
        assert torch.equal(net.state_dict()["encoder.1.conv1.conv.weight"],
                           ws["net"].state_dict()["encoder.1.conv1.conv.weight"])
        assert net.head is not None and net.out_channels == 4
    # two input channels: the first layer is adapted, the rest loads as is
    net2, report2 = build_from_checkpoint(read_checkpoint(ws["run"]), 2, 4, ["encoder", "bottleneck"])
    assert report2.adapted and not report2.missing_in(("encoder", "bottleneck"))
    # another architecture is refused instead of silently training from scratch
    other = build_backbone(BackboneConfig(in_channels=1, filters=(8, 16, 64), strides=(1, 2, 2)))
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in other.state_dict().items()}},
               ws["root"] / "other.ckpt")
    with pytest.raises(MedclDataError, match="encoder did not load completely"):
        build_from_checkpoint(read_checkpoint(ws["root"] / "other.ckpt"), 1, 4, ["encoder", "bottleneck"],
                              fallback=ARCH)
    report = json.loads((trained / "load_report.json").read_text())
    assert report["loaded"] and not [k for k in report["missing"] if k.split(".")[0] in ("encoder", "bottleneck")]


def test_leakage_guard_refuses_a_checkpoint_that_saw_test_cases(ws, tmp_path):
    split = ws["split"]
    leaky = dict(ws["record"], cases_seen=list(split.pool) + [split.test[1]])
    save_backbone(ws["net"], tmp_path / "leaky.pt", record=leaky)
    cfg = finetune_config_from_dict({"init": {"checkpoint": str(tmp_path / "leaky.pt")}, "split": {
        "file": str(ws["root"] / "split.json"), "labelled": 2}})
    from medcl.segment.finetune import run_finetune

    with pytest.raises(MedclDataError, match=split.test[1]):
        run_finetune(cfg, ws["data"], tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training
    acc = accept_checkpoint(read_checkpoint(tmp_path / "leaky.pt"), test_cases=split.test, allow_test_overlap=True)
    assert acc.test_overlap == [split.test[1]]


def test_acceptance_refuses_test_patients_and_incomplete_runs(ws, tmp_path):
    """Patients: a run that saw another volume of a test patient is refused; completeness: a run whose record
    says complete: false is refused naming the step it reached and --allow-incomplete."""
    rec = dict(ws["record"], patients_seen=["P7", "P9"])
    save_backbone(ws["net"], tmp_path / "p.pt", record=rec)
    with pytest.raises(MedclDataError, match="test patients .*P9"):
        accept_checkpoint(read_checkpoint(tmp_path / "p.pt"), test_cases=["x"], test_patients=["P9", "P3"])
    assert accept_checkpoint(read_checkpoint(tmp_path / "p.pt"), test_patients=["P9"],
                             allow_test_overlap=True).patient_overlap == ["P9"]
    save_backbone(ws["net"], tmp_path / "half.pt", record=dict(ws["record"], complete=False, step=3))
    with pytest.raises(MedclDataError, match="step 3.*--allow-incomplete"):
        accept_checkpoint(read_checkpoint(tmp_path / "half.pt"))
    assert accept_checkpoint(read_checkpoint(tmp_path / "half.pt"), allow_incomplete=True).checkpoint.step == 3


def test_finetune_refuses_a_state_dict_without_run_record_unless_allowed(ws, tmp_path, capsys):
    """A real DynUNet state dict of the right architecture, but no run record: provenance is the only reason to
    refuse; with --allow-unknown-provenance the run goes ahead and records provenance: unknown."""
    torch.save(ws["net"].state_dict(), tmp_path / "plain.pt")
    arch = [f"backbone.filters={list(ARCH.filters)}", f"backbone.strides={list(ARCH.strides)}"]
    args = ["finetune", "--data", str(ws["data"]), "--init", str(tmp_path / "plain.pt"), "--split",
            str(ws["root"] / "split.json"), "--labelled", "2", "--max-steps", "2", "--device", "cpu", *FAST, *arch]
    assert main([*args, "--out", str(tmp_path / "a")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-unknown-provenance" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "a" / "checkpoints").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--allow-unknown-provenance"]) == 0
    record = json.loads((tmp_path / "b" / "record.json").read_text())
    assert record["extra"]["provenance"] == "unknown" and record["extra"]["init"]["provenance"] == "unknown"
    assert record["kind"] == "finetune" and record["complete"] is True and record["step"] == 2
    from medcl.segment.config import FinetuneConfig

    assert_run_folder(tmp_path / "b", "finetune", FinetuneConfig, step=2)


def test_finetune_warmup_steps_is_an_error_naming_freeze_steps(ws, tmp_path, capsys):
    rc = main(["finetune", "--data", str(ws["data"]), "--out", str(tmp_path / "w"), "--labelled", "2",
               "--max-steps", "2", "--device", "cpu", "optim.warmup_steps=5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "optim.freeze_steps" in err[0] and "optim.warmup_steps" in err[0]
    assert not (tmp_path / "w").exists()


def test_phantom_finetune_beats_chance(ws, trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 80 and summary["n_test"] == 2
    with open(trained / "test_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 and {r["name"] for r in rows} == {"liver", "kidneys", "bladder"}
    with open(trained / "metrics.csv") as f:  # the training curves (run-folder contract)
        curves = list(csv.DictReader(f))
    assert curves and "train/loss" in curves[0] and int(curves[-1]["step"]) >= 70
    # chance: a prediction drawn independently with the true class frequencies has expected Dice = frequency
    freqs = []
    for cid in ws["split"].test:
        lab = read_volume(ws["manifest"].case(cid).label, is_label=True).array[0]
        freqs += [float((lab == k).mean()) for k in (1, 2, 3)]
    chance = float(np.mean(freqs))
    dice = summary["test"]["dice_mean"]
    assert dice > 0.4 and dice > chance + 0.3, (dice, chance)
    assert summary["test"]["dice_liver"] > 0.6
    for name in ("loss.png", "model.pt", "config.yaml", "cases.json", "summary.md"):
        assert (trained / name).is_file(), name
    ck = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    rec = ck["medcl_record"]
    assert rec["kind"] == "finetune" and sorted(rec["cases_seen"]) == sorted(ws["split"].labelled(2))
    assert sorted(rec["test_cases"]) == sorted(ws["split"].test)


def _oblique(shape, spacing) -> np.ndarray:
    a = np.deg2rad(15)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    m = rz @ np.diag(spacing) @ np.diag([-1.0, 1.0, 1.0])  # L-flipped: not RAS
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = -m @ ((np.asarray(shape) - 1) / 2)
    return aff


def test_predict_cli_on_an_oblique_anisotropic_phantom(ws, trained, tmp_path):
    shape, spacing = (26, 22, 20), (6.0, 7.0, 7.5)
    aff = _oblique(shape, spacing)
    img, lab = make_phantom(1234, shape, aff)
    write_nifti(img, tmp_path / "in" / "subject.nii.gz")
    rc = main(["predict", "--ckpt", str(trained), "--input", str(tmp_path / "in" / "subject.nii.gz"),
               "--output", str(tmp_path / "out"), "--probabilities", "--tta", "--device", "cpu", "--threads", "1"])
    assert rc == 0
    pred = read_volume(tmp_path / "out" / "subject.nii.gz", is_label=True)
    assert pred.shape == shape and np.array_equal(pred.affine, aff)  # the input's grid, bit for bit
    probs = read_volume(tmp_path / "out" / "subject_probabilities.nii.gz", allow_multichannel=True)
    assert probs.array.shape == (4, *shape)
    assert np.array_equal(probs.array.argmax(0), pred.array[0])
    truth, p = lab.array[0], pred.array[0]
    liver_dice = 2 * ((p == 1) & (truth == 1)).sum() / ((p == 1).sum() + (truth == 1).sum())
    assert liver_dice > 0.6, liver_dice

    def centroid(mask):
        ijk = np.argwhere(mask).astype(float)
        return ijk @ aff[:3, :3].T + aff[:3, 3]

    for k in (1, 3):  # the organ lands where it is, in world mm
        assert np.linalg.norm(centroid(p == k).mean(0) - centroid(truth == k).mean(0)) < 10.0, k
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt", str(trained)])
    assert main(["predict", "--ckpt", str(ws["run"]), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "o2")]) == 2  # a pretraining checkpoint is not a segmentation model


class _Kill(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 4:
            raise RuntimeError("killed")


def test_resume_after_kill_matches_an_uninterrupted_run(ws, tmp_path):
    from medcl.segment.finetune import run_finetune
    from medcl.segment.prepare import load_finetune_config

    cfg = load_finetune_config(None, FAST + ["trainer.max_steps=6", "trainer.ckpt_every=3", "mixup.alpha=0.4",
                                             "augment.affine_prob=0.5", "data.num_classes=4"])
    cfg.backbone = ARCH
    sel = CaseSelection(train=ws["split"].labelled(2), test=[])
    with pytest.raises(RuntimeError, match="killed"):
        run_finetune(cfg, ws["data"], tmp_path / "a", selection=sel, device="cpu", progress=False,
                     callbacks=[_Kill()])
    assert torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    with pytest.raises(MedclConfigError, match="--resume"):
        run_finetune(cfg, ws["data"], tmp_path / "a", selection=sel, device="cpu", progress=False)
    run_finetune(cfg, ws["data"], tmp_path / "a", selection=sel, device="cpu", progress=False, resume=True)
    run_finetune(cfg, ws["data"], tmp_path / "b", selection=sel, device="cpu", progress=False)
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_report_tables_pair_each_init_with_its_reference_and_call_only_supported_gains(tmp_path):
    """Hand-made rows: 'pre' is random + 0.1 on every pair (a gain, zero-width interval); 'noisy' differs from
    random by +-0.2 across combinations (interval contains 0: not a gain); 'bn' is compared with its own arm
    'random_bn'; the ceiling rows give the fractions."""
    rows = []
    shifts = {"random": lambda k: 0.0, "pre": lambda k: 0.1, "noisy": lambda k: (0.2, -0.2, 0.15)[k],
              "random_bn": lambda k: -0.1, "bn": lambda k: -0.05}
    for init, shift in shifts.items():
        for comb, base in ((0, 0.5), (1, 0.7), (2, 0.6)):
            for seed in (0, 1):
                for case, c in (("t1", 0.0), ("t2", 0.2)):
                    rows.append({"init": init, "budget": 2, "combination": comb, "seed": seed, "lr": "0.001",
                                 "case": case, "dice": base + c + shift(comb)})
    d = paired_differences(rows, "pre", "random", "2", {("pre", "2"): "0.001", ("random", "2"): "0.001"})
    assert d.shape == (3, 2, 2) and np.allclose(d, 0.1)
    ceiling = [{"init": "random", "seed": s, "case": c, "dice": 0.8, "steps": st, "max_steps": 3000,
                "converged": True} for s, st in ((0, 1200), (1, 1400)) for c in ("t1", "t2")]
    refs = {"random": None, "random_bn": None, "pre": "random", "noisy": "random", "bn": "random_bn"}
    text = write_report(rows, tmp_path / "r.md", inits=list(shifts), references=refs,
                        lr_of={(i, "2"): "0.001" for i in shifts}, header=["# t"], ceiling_rows=ceiling,
                        n_labelled_pool=44)
    # run means 0.6 / 0.8 / 0.7 (twice each) -> 0.700 +- 0.089
    assert "| random | 0.700 +- 0.089 (n=6) |" in text
    assert "| pre (vs random) | +0.100 [+0.100, +0.100] **gain** |" in text
    noisy = next(line for line in text.splitlines() if line.startswith("| noisy (vs random)"))
    assert "gain" not in noisy and "[-" in noisy
    assert "| bn (vs random_bn) | +0.050 [+0.050, +0.050] **gain** |" in text
    assert "Gains the intervals support: pre N=2, bn N=2." in text
    assert "labelled-volume combination" in text  # the unit is named
    assert "| random | 0.800 +- 0.000 (n=2) | 1200-1400 | 2/2 (cap 3000) |" in text
    assert "all 44 labelled pool volumes" in text
    assert "| pre | random (0.800) | 1.000 |" in text  # (0.7 + 0.1) / 0.8


def test_label_efficiency_benchmark_runs_reports_and_resumes(ws, tmp_path, caplog):
    cfg = {
        "finetune": {"backbone": to_dict(ARCH), "data": {"plan": {"spacing": [VOXEL] * 3}}, "threads": 1,
                     "sampling": {"patch_size": [16, 16, 16], "batch_size": 2},
                     "augment": {"affine_prob": 0}, "inference": {"overlap": 0.0}},
        "steps": 2, "full_label": True, "seeds": [0],
        "inits": [{"name": "pre", "checkpoint": str(ws["run"] / "backbone.pt")}],
        "split": {"file": str(ws["root"] / "split.json")},
        "lr": {"values": [1e-3, 3e-3], "selection": "validation"},
        "ceiling": {"inits": ["pre"], "min_steps": 2, "max_steps": 6},
    }
    import yaml

    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench"
    from medcl.segment.benchmark import load_benchmark_config, run_label_efficiency

    bcfg, base = load_benchmark_config(tmp_path / "bench.yaml")
    caplog.set_level(logging.INFO, logger="medcl.segment.benchmark")
    rows = run_label_efficiency(bcfg, base, str(ws["data"]), out, device="cpu")
    logs = [r.getMessage() for r in caplog.records]
    # 2 inits x (N=2: 2 sweep LRs + 1 run; full (4 volumes): 2 sweep LRs + 1 run) + 1 ceiling = 13 fine-tunes
    assert any(line.startswith("[13/13]") for line in logs)
    assert len(rows) == 2 * 2 * 2  # inits x budgets (2, full) x test cases
    sel = json.loads((out / "lr_selection.json").read_text())
    assert set(sel["chosen"]) == {"random|2", "random|full", "pre|2", "pre|full"}
    with open(out / "sweep.csv") as f:
        sweep = list(csv.DictReader(f))
    assert len(sweep) == 8 and {r["lr"] for r in sweep} == {"0.001", "0.003"}
    md = (out / "results.md").read_text()
    assert "| random |" in md and "| pre |" in md and "Paired per-case difference" in md
    assert "Fraction of the converged full-label Dice" in md and (out / "dice_vs_labels.png").stat().st_size > 1000
    with open(out / "ceiling.csv") as f:
        ceiling = list(csv.DictReader(f))
    assert {r["init"] for r in ceiling} == {"pre"} and all(2 <= int(r["steps"]) <= 6 for r in ceiling)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["init"] for r in table} == {"random", "pre"} and {r["budget"] for r in table} == {"2", "full"}
    from medcl.segment.bench_config import LabelEfficiencyConfig

    assert_run_folder(out, "label-efficiency", LabelEfficiencyConfig, step=13)
    assert (out / "paired_differences.png").is_file()  # the forest plot of the paired-difference table
    assert all(r["lr_rule"] == "validation" for r in table)
    # a rerun skips every finished run and reproduces the tables
    caplog.clear()
    run_label_efficiency(bcfg, base, str(ws["data"]), out, device="cpu")
    logs2 = [r.getMessage() for r in caplog.records]
    assert sum("skipped" in line for line in logs2) == 13
    assert (out / "results.md").read_text() == md


def test_benchmark_recipe_axis_pairs_semi_rows_with_supervised_random(ws, tmp_path):
    """recipes [supervised, semi]: each init gets a semi row (its own run folders, the unlabelled pool of the split),
    compared with the supervised random arm; wall-clock per arm is reported."""
    import yaml

    from medcl.segment.benchmark import load_benchmark_config, run_label_efficiency

    cfg = {"finetune": {"backbone": to_dict(ARCH), "data": {"plan": {"spacing": [VOXEL] * 3}}, "threads": 1,
                        "sampling": {"patch_size": [16, 16, 16], "batch_size": 2},
                        "augment": {"affine_prob": 0, "strong": {"labelled": True}}, "inference": {"overlap": 0.0}},
           "steps": 2, "full_label": False, "seeds": [0], "ceiling": {"inits": []},
           "recipes": ["supervised", "semi"], "recipe_overrides": {"semi": {"semi": {"rampup_steps": 1}}},
           "split": {"file": str(ws["root"] / "split.json")}, "lr": {"values": [1e-3]}}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    bcfg, base = load_benchmark_config(tmp_path / "bench.yaml")
    rows = run_label_efficiency(bcfg, base, str(ws["data"]), tmp_path / "b", device="cpu")
    assert {(r["init"], r["recipe"]) for r in rows} == {("random", "supervised"), ("random+semi", "semi")}
    semi_run = next(r["run"] for r in rows if r["recipe"] == "semi")
    rec = json.loads((tmp_path / "b" / semi_run / "record.json").read_text())
    assert rec["config"]["semi"]["enabled"] and rec["config"]["augment"]["strong"]["labelled"]
    assert sorted(rec["extra"]["unlabelled_cases"]) == sorted(ws["split"].pool)
    md = (tmp_path / "b" / "results.md").read_text()
    assert "| random+semi (vs random) |" in md and "## Fine-tuning wall-clock per run" in md
