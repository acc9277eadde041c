"""A hostile user's catalogue: bad inputs and faults through ``medcl.cli.main`` in-process.

Each case asserts a non-zero exit code, ONE line on stderr naming the file or key and the problem, no traceback,
and that no input (nor earlier output) changed (sha256 of every file before and after). The data / io cases are in
tests/test_bad_inputs_data.py; the signal cases (SIGTERM, SIGKILL) in tests/test_pretrain.py and
tests/test_segment_finetune.py (subprocesses).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch

from medcl.cli import main
from medcl.data import write_phantom_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_PRE = ["backbone.filters=[4,8,16]", "backbone.strides=[1,2,2]", "views.partition.crop=[16,16,16]",
            "monitor.probe_crop=[16,16,16]", "data.volumes_per_step=2", "data.probe_volumes=0",
            "trainer.num_workers=0", "monitor.probe_every=0", "trainer.ckpt_every=2"]
TINY_FT = ["trainer.max_steps=2", "sampling.patch_size=[16,16,16]"]


def digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file below ``roots`` (links followed)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A world to break: phantoms, a finished pretraining run, a fine-tuned model, a slide with tiles and features,
    a MIL slide table."""
    root = tmp_path_factory.mktemp("bad")
    data = write_phantom_dataset(root / "ph", n=6, size=16, seed=0)
    assert main(["pretrain", "--config", str(CONFIGS / "pretrain" / "gd.yaml"), "--data", str(data), "--out",
                 str(root / "pre"), "--max-steps", "4", "--no-progress", "--device", "cpu", *TINY_PRE]) == 0
    assert main(["finetune", "--config", str(CONFIGS / "finetune" / "phantoms.yaml"), "--data", str(data), "--out",
                 str(root / "ft"), "--labelled", "2", "--device", "cpu", *TINY_FT]) == 0
    rng = np.random.default_rng(0)
    img = np.full((512, 512, 3), 240, np.uint8)
    img[32:480, 32:480] = np.clip(np.array([170, 80, 160]) + rng.normal(0, 25, (448, 448, 3)), 0, 255)
    (root / "slides").mkdir()
    tifffile.imwrite(root / "slides" / "s.tif", img, tile=(128, 128), photometric="rgb", compression="jpeg",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    assert main(["mil", "tile", str(root / "slides"), "--out", str(root / "tiles"), "--size", "64", "--mpp", "1.0",
                 "--thumbnail-size", "256"]) == 0
    assert main(["mil", "extract", str(root / "tiles"), "--encoder", "builtin-cnn", "--out", str(root / "feats"),
                 "--workers", "0"]) == 0
    mil = root / "mil"
    (mil / "features").mkdir(parents=True)
    rows = ["slide_id,label"]
    for i in range(8):
        with h5py.File(mil / "features" / f"b{i}.h5", "w") as f:
            f["features"] = rng.normal(size=(5, 4)).astype(np.float32)
            f["coords"] = rng.integers(0, 100, size=(5, 2))
        rows.append(f"b{i},{i % 2}")
    (mil / "slides.csv").write_text("\n".join(rows) + "\n")
    return {"root": root, "data": data, "pre": root / "pre", "ft": root / "ft", "slides": root / "slides",
            "tiles": root / "tiles", "feats": root / "feats", "mil": mil / "slides.csv"}


def expect_one_line(capsys, rc: int, *needles: str) -> str:
    """The command failed with exactly one error line (``medcl: ...``; progress lines of the job may precede it)
    holding every needle, and no traceback."""
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.strip().splitlines() if ln.startswith("medcl:")]
    assert rc != 0, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1, captured.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# (id, argv from the world and tmp_path, needles the one line must hold)
def _cases():
    P = str(CONFIGS / "pretrain" / "gd.yaml")
    F = str(CONFIGS / "finetune" / "phantoms.yaml")
    M = str(CONFIGS / "mil" / "abmil.yaml")
    return [
        ("pretrain_missing_data", lambda w, t: ["pretrain", "--config", P, "--data", str(t / "nope"), "--out",
                                                str(t / "o")], ["nope"]),
        ("pretrain_missing_config", lambda w, t: ["pretrain", "--config", str(t / "no.yaml"), "--data", str(w["data"]),
                                                  "--out", str(t / "o")], ["no.yaml", "not found"]),
        ("pretrain_unknown_key", lambda w, t: ["pretrain", "--config", P, "--data", str(w["data"]), "--out", str(t / "o"),
                                               "optim.lrr=1"], ["optim.lrr", "unknown key"]),
        ("pretrain_negative_lr", lambda w, t: ["pretrain", "--config", P, "--data", str(w["data"]), "--out", str(t / "o"),
                                               "optim.lr=-1"], ["optim.lr", "> 0"]),
        ("pretrain_bad_override", lambda w, t: ["pretrain", "--config", P, "--data", str(w["data"]), "--out",
                                                str(t / "o"), "optim.lr"], ["optim.lr", "key.sub=value"]),
        ("pretrain_threads_negative", lambda w, t: ["pretrain", "--config", P, "--data", str(w["data"]), "--out",
                                                    str(t / "o"), "--threads", "-3"], ["threads", ">= 1"]),
        ("pretrain_max_steps_zero", lambda w, t: ["pretrain", "--config", P, "--data", str(w["data"]), "--out",
                                                  str(t / "o"), "--max-steps", "0"], ["max_steps"]),
        ("pretrain_old_warmup_key", lambda w, t: ["pretrain", "--config", P, "--data", str(w["data"]), "--out",
                                                  str(t / "o"), "optim.warmup_steps=3"], ["optim.lr_warmup_steps"]),
        ("pretrain_existing_out", lambda w, t: ["pretrain", "--config", P, "--data", str(w["data"]), "--out",
                                                str(w["pre"]), *TINY_PRE], ["pre", "--resume", "--overwrite"]),
        ("pretrain_out_is_data", lambda w, t: ["pretrain", "--config", P, "--data", str(w["data"]), "--out",
                                               str(w["data"]), "--overwrite"], ["--out", "input"]),
        ("pretrain_resume_nothing", lambda w, t: ["pretrain", "--data", str(w["data"]), "--out", str(t / "empty"),
                                                  "--resume"], ["nothing to resume"]),
        ("pretrain_resume_other_config", lambda w, t: ["pretrain", "--config", str(CONFIGS / "pretrain" / "gr.yaml"),
                                                       "--data", str(w["data"]), "--out", str(w["pre"]), "--resume",
                                                       *TINY_PRE], ["differs from the run being resumed"]),
        ("pretrain_bad_device", lambda w, t: ["pretrain", "--config", P, "--data", str(w["data"]), "--out",
                                              str(t / "o"), "--device", "tpu"], ["device", "tpu"]),
        ("finetune_warmup_steps", lambda w, t: ["finetune", "--config", F, "--data", str(w["data"]), "--out",
                                                str(t / "o"), "--labelled", "2", "optim.warmup_steps=5"],
         ["optim.freeze_steps"]),
        ("finetune_freeze_in_full_mode", lambda w, t: ["finetune", "--config", F, "--data", str(w["data"]), "--out",
                                                       str(t / "o"), "optim.freeze_steps=5"], ["optim.freeze_steps"]),
        ("finetune_labelled_zero", lambda w, t: ["finetune", "--config", F, "--data", str(w["data"]), "--out",
                                                 str(t / "o"), "--labelled", "0"], ["split.labelled"]),
        ("finetune_labelled_too_many", lambda w, t: ["finetune", "--config", F, "--data", str(w["data"]), "--out",
                                                     str(t / "o"), "--labelled", "60"], ["60"]),
        ("finetune_init_missing", lambda w, t: ["finetune", "--config", F, "--data", str(w["data"]), "--out",
                                                str(t / "o"), "--init", str(t / "none.pt")], ["none.pt"]),
        ("finetune_init_not_a_checkpoint", lambda w, t: ["finetune", "--config", F, "--data", str(w["data"]),
                                                         "--out", str(t / "o"), "--init",
                                                         str(w["data"] / "dataset.json")], ["dataset.json"]),
        ("finetune_init_incomplete", lambda w, t: ["finetune", "--config", F, "--data", str(w["data"]), "--out",
                                                   str(t / "o"), "--labelled", "2", "--init",
                                                   str(w["pre"] / "checkpoints" / "step=2.ckpt")],
         ["--allow-incomplete", "step 2"]),
        ("finetune_existing_out", lambda w, t: ["finetune", "--config", F, "--data", str(w["data"]), "--out",
                                                str(w["ft"]), "--labelled", "2"], ["--resume", "--overwrite"]),
        ("finetune_patch_not_multiple", lambda w, t: ["finetune", "--config", F, "--data", str(w["data"]), "--out",
                                                      str(t / "o"), "--labelled", "2",
                                                      "sampling.patch_size=[15,16,16]"], ["sampling.patch_size"]),
        ("predict_output_is_input", lambda w, t: ["predict", "--ckpt", str(w["ft"]), "--input",
                                                  str(w["data"] / "imagesTr"), "--output", str(w["data"] / "imagesTr")],
         ["input"]),
        ("predict_output_over_input_file", lambda w, t: [
            "predict", "--ckpt", str(w["ft"]), "--input", str(next((w["data"] / "imagesTr").glob("*.nii.gz"))),
            "--output", str(w["data"] / "imagesTr")], ["overwrite the input"]),
        ("predict_pretraining_ckpt", lambda w, t: ["predict", "--ckpt", str(w["pre"]), "--input",
                                                   str(w["data"] / "imagesTr"), "--output", str(t / "p")],
         ["pretrain", "not a fine-tuned"]),
        ("predict_missing_ckpt", lambda w, t: ["predict", "--ckpt", str(t / "x.pt"), "--input", str(w["data"]),
                                               "--output", str(t / "p")], ["x.pt"]),
        ("predict_threads_negative", lambda w, t: ["predict", "--ckpt", str(w["ft"]), "--input", str(w["data"]),
                                                   "--output", str(t / "p"), "--threads", "-3"], ["threads"]),
        ("split_budget_too_large", lambda w, t: ["split", str(w["data"]), "--out", str(t / "s.json"), "--budgets",
                                                 "1,50", "--test", "2"], ["50"]),
        ("split_bad_budgets", lambda w, t: ["split", str(w["data"]), "--out", str(t / "s.json"), "--budgets", "1,x"],
         ["--budgets", "'x'"]),
        ("benchmark_unknown_method", lambda w, t: ["benchmark", "label-efficiency", "--config",
                                                   str(_bench_yaml(t, {"inits": [{"name": "m", "method": "nope"}]})),
                                                   "--data", str(w["data"]), "--out", str(t / "b")], ["nope"]),
        ("benchmark_bad_reference", lambda w, t: ["benchmark", "label-efficiency", "--config",
                                                  str(_bench_yaml(t, {"inits": [{"name": "m", "method": "gd",
                                                                                 "reference": "random_bn"}]})),
                                                  "--data", str(w["data"]), "--out", str(t / "b")], ["reference"]),
        ("mil_train_bad_seeds", lambda w, t: ["mil", "train", "--config", M, "--data", str(w["mil"]), "--out",
                                              str(t / "m"), "--seeds", "0,a"], ["--seeds", "'a'"]),
        ("mil_train_missing_data", lambda w, t: ["mil", "train", "--config", M, "--data", str(t / "none.csv"),
                                                 "--out", str(t / "m")], ["none.csv"]),
        ("mil_train_folds_one", lambda w, t: ["mil", "train", "--config", M, "--data", str(w["mil"]), "--out",
                                              str(t / "m"), "--folds", "1"], ["cv.folds"]),
        ("mil_tile_no_slides", lambda w, t: ["mil", "tile", str(t / "empty_slides"), "--out", str(t / "tt")],
         ["no slide files"]),
        ("mil_tile_bad_overlap", lambda w, t: ["mil", "tile", str(w["slides"]), "--out", str(t / "tt"), "--size",
                                               "64", "--overlap", "64"], ["overlap"]),
        ("mil_extract_no_encoder", lambda w, t: ["mil", "extract", str(w["tiles"]), "--out", str(t / "f")],
         ["encoder", "--encoder"]),
        ("mil_extract_into_tiles", lambda w, t: ["mil", "extract", str(w["tiles"]), "--encoder", "builtin-cnn",
                                                 "--out", str(w["tiles"]), "--workers", "0"], ["--out"]),
        ("mil_extract_unknown_encoder", lambda w, t: ["mil", "extract", str(w["tiles"]), "--encoder", "resnet9000",
                                                      "--out", str(t / "f"), "--workers", "0"], ["resnet9000"]),
        ("mil_pretrain_encoder_batch_one", lambda w, t: ["mil", "pretrain-encoder", str(w["tiles"]), "--out",
                                                         str(t / "e"), "--batch-size", "1"], ["batch_size"]),
        ("report_missing_folder", lambda w, t: ["report", str(t / "nothing")], ["nothing", "no such folder"]),
        ("demo_bad_seeds", lambda w, t: ["demo", "--out", str(t / "d"), "--seeds", "0,x"], ["--seeds"]),
    ]


def _bench_yaml(t: Path, extra: dict) -> Path:
    import yaml

    cfg = {"finetune_config": str(CONFIGS / "finetune" / "phantoms.yaml"), "steps": 1, "full_label": False,
           "ceiling": {"inits": []}, "seeds": [0], "split": {"test": 2, "budgets": [1], "combinations": 1},
           **extra}
    path = t / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


CASES = _cases()


@pytest.mark.parametrize("name,argv,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line_and_changes_nothing(name, argv, needles, w, tmp_path, capsys):
    (tmp_path / "empty_slides").mkdir()
    args = argv(w, tmp_path)
    before = digest(w["data"], w["pre"], w["ft"], w["tiles"], w["feats"], w["slides"], w["mil"].parent)
    capsys.readouterr()
    rc = main(args)
    expect_one_line(capsys, rc, *needles)
    assert digest(w["data"], w["pre"], w["ft"], w["tiles"], w["feats"], w["slides"], w["mil"].parent) == before


def test_catalogue_is_large_enough():
    assert len(CASES) >= 40


# ---- faults that need more than an argv ----------------------------------------------------------------------


def test_predict_into_the_input_folder_leaves_it_byte_identical(w, tmp_path, capsys):
    """Also through a symlink to the folder: nothing of the input is replaced."""
    images = w["data"] / "imagesTr"
    link = tmp_path / "link"
    link.symlink_to(images, target_is_directory=True)
    before = digest(images)
    for out in (images, link):
        rc = main(["predict", "--ckpt", str(w["ft"]), "--input", str(images), "--output", str(out)])
        expect_one_line(capsys, rc, "input")
    assert digest(images) == before


@pytest.mark.parametrize("what", ["nifti", "csv", "torch", "h5"])
def test_a_write_interrupted_midway_leaves_the_old_file(tmp_path, monkeypatch, what):
    """An exception injected while the bytes are written (disk full): the final path keeps its old content (or stays
    absent) and no temporary file is left."""
    from medcl.core.files import write_csv
    from medcl.core.geometry import Volume
    from medcl.engine.checkpoint import atomic_torch_save
    from medcl.io import write_nifti

    target = tmp_path / {"nifti": "x.nii.gz", "csv": "x.csv", "torch": "x.pt", "h5": "x.h5"}[what]
    target.write_bytes(b"old content")
    real_replace = os.replace

    def full_disk(src, dst):  # the write got as far as the rename: fail there, as a full disk would earlier
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    from medcl.core.errors import MedclDataError

    with pytest.raises(MedclDataError, match="No space left"):
        if what == "nifti":
            write_nifti(Volume(np.zeros((1, 4, 4, 4), np.float32), np.eye(4)), target)
        elif what == "csv":
            write_csv(target, [{"a": 1}])
        elif what == "torch":
            atomic_torch_save({"w": torch.zeros(3)}, target)
        else:
            from medcl.core.files import atomic_path

            with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
                f["x"] = np.zeros(3)
    monkeypatch.setattr(os, "replace", real_replace)
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_read_only_out_and_full_disk_during_a_checkpoint_are_one_line(w, tmp_path, monkeypatch, capsys):
    """EACCES on the run folder and ENOSPC while a checkpoint is written (simulated: CI runs as root, so chmod would
    not stop it): one line naming the file, exit 2."""
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def read_only(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    rc = main(["pretrain", "--config", str(CONFIGS / "pretrain" / "gd.yaml"), "--data", str(w["data"]), "--out",
               str(tmp_path / "ro"), "--max-steps", "2", "--no-progress", "--device", "cpu", *TINY_PRE])
    expect_one_line(capsys, rc, "Permission denied", str(tmp_path / "ro"))
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)

    import medcl.engine.checkpoint as ck

    def disk_full(data, path):
        raise __import__("medcl.core.errors", fromlist=["x"]).MedclDataError(path, "cannot write (No space left on "
                                                                                   "device, ENOSPC)")

    monkeypatch.setattr(ck, "atomic_write_bytes", disk_full)
    rc = main(["pretrain", "--config", str(CONFIGS / "pretrain" / "gd.yaml"), "--data", str(w["data"]), "--out",
               str(tmp_path / "full"), "--max-steps", "2", "--no-progress", "--device", "cpu", *TINY_PRE])
    expect_one_line(capsys, rc, "No space left", ".ckpt")


def test_resume_takes_the_checkpoint_with_the_highest_stored_step_not_the_newest_file(w, tmp_path):
    """A copied run folder can give an old checkpoint the newest time stamp: the stored step decides."""
    import shutil

    from medcl.engine.trainer import checkpoint_step, last_checkpoint

    run = tmp_path / "copy"
    shutil.copytree(w["pre"], run)
    old = run / "checkpoints" / "step=2.ckpt"
    os.utime(old, (2e9, 2e9))  # the step-2 checkpoint is now the "newest" file
    best = last_checkpoint(run)
    assert checkpoint_step(best) == 4 and best != old
    (run / "checkpoints" / ".last.ckpt.abc.tmp").write_bytes(b"x" * 100)  # a kill's leftover
    last_checkpoint(run)
    assert not (run / "checkpoints" / ".last.ckpt.abc.tmp").exists()


def test_overwrite_empties_the_folder_and_runs_again(w, tmp_path):
    import shutil

    run = tmp_path / "again"
    shutil.copytree(w["pre"], run)
    (run / "stale.txt").write_text("from an older run")
    assert main(["pretrain", "--config", str(CONFIGS / "pretrain" / "gd.yaml"), "--data", str(w["data"]), "--out",
                 str(run), "--max-steps", "2", "--no-progress", "--device", "cpu", "--overwrite", *TINY_PRE]) == 0
    assert not (run / "stale.txt").exists() and json.loads((run / "record.json").read_text())["step"] == 2


def test_replaced_slide_is_tiled_again_and_heatmap_refuses_another_slide(w, tmp_path, capsys):
    """The tile file records the slide's fingerprint: a slide replaced under the same name is not "already tiled",
    and features of one slide are not drawn on another."""
    import shutil

    slides, tiles = tmp_path / "slides", tmp_path / "tiles"
    shutil.copytree(w["slides"], slides)
    assert main(["mil", "tile", str(slides), "--out", str(tiles), "--size", "64", "--mpp", "1.0",
                 "--thumbnail-size", "256"]) == 0
    first = json.loads((tiles / "summary.json").read_text())["slides"][0]["status"]
    img = np.full((512, 512, 3), 200, np.uint8)
    img[100:400, 100:400] = (150, 60, 150)
    tifffile.imwrite(slides / "s.tif", img, tile=(128, 128), photometric="rgb", compression="jpeg",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    assert main(["mil", "tile", str(slides), "--out", str(tiles), "--size", "64", "--mpp", "1.0",
                 "--thumbnail-size", "256"]) == 0
    again = json.loads((tiles / "summary.json").read_text())["slides"][0]["status"]
    assert (first, again) == ("done", "done")  # not "skipped": the slide changed
    # a MIL model on the features of the original slide, drawn on the replaced one: refused
    ds_csv = tmp_path / "one.csv"
    shutil.copy(w["feats"] / "s.h5", tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        dim = f["features"].shape[1]
    from medcl.mil.config import MILConfig
    from medcl.mil.heads import build_head
    from medcl.mil.train import save_mil_model

    cfg = MILConfig(head="abmil")
    save_mil_model(tmp_path / "m.pt", build_head(cfg, dim, 2), cfg, ["0", "1"])
    rc = main(["mil", "heatmap", "--slide", str(slides / "s.tif"), "--features", str(tmp_path / "s.h5"), "--ckpt",
               str(tmp_path / "m.pt"), "--out", str(tmp_path / "h.png")])
    expect_one_line(capsys, rc, "another slide", "s.h5")
    assert not (tmp_path / "h.png").exists() and not ds_csv.exists()


def test_an_altered_disk_cache_file_is_rebuilt(w, tmp_path):
    """A cache file changed at the same size (one byte flipped): its checksum fails, it is rebuilt with a warning,
    and the item equals a fresh decode."""
    from medcl.data import CaseDataset, PreprocessingPlan, load_manifest

    m = load_manifest(w["data"])
    plan = PreprocessingPlan.for_manifest(m)
    ds = CaseDataset(m, plan, cache="disk", cache_dir=tmp_path / "c")
    ref = ds[0]["image"].clone()
    path = ds.cache_path(0)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    fresh = CaseDataset(m, plan, cache="disk", cache_dir=tmp_path / "c")
    with pytest.warns(UserWarning, match="checksum"):
        again = fresh[0]["image"]
    assert torch.equal(again, ref)


def test_report_on_a_malformed_metrics_csv_names_the_problem_and_still_writes(w, tmp_path, capsys):
    import shutil

    run = tmp_path / "rep"
    shutil.copytree(w["pre"], run)
    (run / "metrics.csv").write_bytes(b"step,train/loss\n1,0.5\n2,abc\n3,0.4,9\n")
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "metrics.csv: 2 malformed row(s) (first at line 3)" in page


def test_predict_keep_going_reports_the_failures(w, tmp_path, capsys):
    """A folder with one broken volume: predict stops naming it and the volumes not processed; --keep-going writes
    the others and ends with a summary of the failure (still exit 2)."""
    import shutil

    src = tmp_path / "in"
    src.mkdir()
    files = sorted((w["data"] / "imagesTr").glob("*.nii.gz"))[:3]
    for f in files:
        shutil.copy(f, src / f.name)
    (src / files[0].name).write_bytes(b"broken")
    rc = main(["predict", "--ckpt", str(w["ft"]), "--input", str(src), "--output", str(tmp_path / "p1")])
    line = expect_one_line(capsys, rc, files[0].name, "not processed", "--keep-going")
    assert "2 volume(s) not processed" in line
    rc = main(["predict", "--ckpt", str(w["ft"]), "--input", str(src), "--output", str(tmp_path / "p2"),
               "--keep-going"])
    expect_one_line(capsys, rc, "1 of 3 volume(s) failed", "2 written")
    assert len(list((tmp_path / "p2").glob("*.nii.gz"))) == 2
