"""medcl pretrain: every method runs, learning signal, exact resume after SIGKILL, DDP == one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning  # noqa: F401  (imported once per session: the jobs below need it)
import pytest
import torch
from _runfolder import assert_run_folder

from medcl.config import load_config
from medcl.core.errors import MedclConfigError
from medcl.data import write_phantom_dataset
from medcl.engine.checkpoint import safe_torch_load
from medcl.models import build_backbone
from medcl.pretrain import PretrainConfig, run_pretrain

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "pretrain"
METHODS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))

# tiny network and views so that a step takes milliseconds on a CPU
TINY = [
    "backbone.filters=[8,16,32]",
    "backbone.strides=[1,2,2]",
    "trainer.num_workers=0",
    "trainer.log_every=1",
    "trainer.ckpt_every=0",
    "data.volumes_per_step=2",
    "data.probe_volumes=0",
    "monitor.probe_crop=[16,16,16]",
    "monitor.probe_every=0",
]


def _crop_overrides(cfg_path: Path) -> list[str]:
    """Shrink every view set of a config to 16^3 (8^3 for VoCo base crops)."""
    cfg = load_config(PretrainConfig, cfg_path)
    out = []
    for name, v in cfg.views.items():
        size = 8 if v.kind == "position" else 16
        out.append(f"views.{name}.crop=[{size},{size},{size}]")
        if v.kind == "pair":
            out.append(f"views.{name}.crops_per_volume=2")
            out.append(f"views.{name}.candidates=3")
    return out


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "ph", n=16, size=32, seed=0)


def _metrics(run: Path) -> list[dict[str, str]]:
    import csv

    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_config_errors_name_the_key_before_training(phantoms, tmp_path):
    with pytest.raises(MedclConfigError, match="terms.global.temprature"):
        run_pretrain(CONFIGS / "gd.yaml", phantoms, tmp_path / "a", overrides=["terms.global.temprature=0.2"])
    with pytest.raises(MedclConfigError, match="optim.lr"):
        run_pretrain(CONFIGS / "gd.yaml", phantoms, tmp_path / "b", overrides=["optim.lr=fast"])
    with pytest.raises(MedclConfigError, match="terms.global.views"):
        run_pretrain(CONFIGS / "gd.yaml", phantoms, tmp_path / "c", overrides=["terms.global.views=nope"])
    assert not (tmp_path / "a" / "checkpoints").exists()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_moves_the_weights(method, phantoms, tmp_path):
    cfg_path = CONFIGS / f"{method}.yaml"
    run = run_pretrain(cfg_path, phantoms, tmp_path / method, overrides=TINY + _crop_overrides(cfg_path), max_steps=2, progress=False)
    rows = _metrics(run)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 2 and all(torch.isfinite(torch.tensor(losses)))
    ckpt = safe_torch_load(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    record = ckpt["medcl_record"]
    assert record["kind"] == "pretrain" and record["cases_seen"] and record["plan"]
    assert record["step"] == 2 and record["complete"] is True  # the final checkpoint judges itself
    assert_run_folder(run, "pretrain", PretrainConfig, step=2)
    # the weights moved away from the (seeded) initialisation
    trained = safe_torch_load(run / "backbone.pt")
    cfg = load_config(PretrainConfig, run / "config.yaml")
    torch.manual_seed(cfg.seed)
    import lightning as L

    L.seed_everything(cfg.seed, verbose=False)
    init = build_backbone(cfg.backbone).state_dict()
    sd = trained["state_dict"] if "state_dict" in trained else trained
    moved = [k for k, v in init.items() if k in sd and v.is_floating_point() and not torch.equal(v, sd[k])]
    assert moved, f"{method}: no backbone weight changed"
    assert (run / "loss.png").stat().st_size > 1000 and (run / "tensorboard").is_dir()


def test_gd_learns_where_crops_come_from(phantoms, tmp_path):
    """After a short run of the shipped G^D recipe (per-pair denominator, as Chaitanya et al.) the partition k-NN
    probe on held-back volumes beats chance and random init (step 0 of the probe)."""
    ov = [o for o in TINY if not o.startswith(("data.probe_volumes", "monitor.probe_every"))]
    ov += ["data.probe_volumes=4", "monitor.probe_every=200", "monitor.knn_k=5", "views.partition.crop=[16,16,16]",
           "data.volumes_per_step=4", "optim.lr_warmup_steps=5", "trainer.precision=32"]
    run = run_pretrain(CONFIGS / "gd.yaml", phantoms, tmp_path / "gd", overrides=ov, max_steps=200, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    first, last = summary["probe_first"], summary["probe_last"]
    chance = first["probe/chance"]
    assert last["probe/knn_partition"] >= chance + 0.4, summary
    assert last["probe/knn_partition"] >= first["probe/knn_partition"] + 0.1, summary


# ------------------------------------------------------------------------------ exact resume after SIGKILL
RESUME = TINY[:] + [
    "trainer.num_workers=2",
    "trainer.ckpt_every=2",
    "ema.momentum=0.9",
    "terms.global.queue=16",
    "views.partition.crop=[16,16,16]",
]
RESUME = [o for o in RESUME if o != "trainer.num_workers=0" and o != "trainer.ckpt_every=0"]


def _state(run: Path) -> dict[str, torch.Tensor]:
    return safe_torch_load(run / "checkpoints" / "last.ckpt")["state_dict"]


def test_resume_after_sigkill_gives_the_same_weights(phantoms, tmp_path):
    steps = 8
    full = run_pretrain(CONFIGS / "gd.yaml", phantoms, tmp_path / "full", overrides=RESUME, max_steps=steps, progress=False)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medcl.cli", "pretrain", "--config", str(CONFIGS / "gd.yaml"), "--data", str(phantoms),
           "--out", str(killed), "--max-steps", str(steps), "--no-progress", *RESUME]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # the in-process run has one thread too
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    target = killed / "checkpoints" / "step=4.ckpt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the run and its data workers
    proc.wait()
    from medcl.engine.trainer import last_checkpoint

    ck = safe_torch_load(last_checkpoint(killed))
    assert 4 <= ck["global_step"] < steps
    run_pretrain(None, phantoms, killed, resume=True, progress=False)
    a, b = _state(full), _state(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert "teacher.module.backbone.encoder.0.conv1.conv.weight" in a or any(k.startswith("teacher.") for k in a)
    assert any("queue" in k for k in a)


# ------------------------------------------------------------------------------ DDP (2 CPU processes, gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(phantoms, tmp_path):
    """Two ranks x 2 volumes == one process x 4 volumes: same loss per step, same weights after 3 steps."""
    # fp32: the comparison is about the engine (sampling, gathering, gradient averaging), not bf16 rounding
    base = [o for o in TINY if not o.startswith("data.volumes_per_step")] + [
        "views.partition.crop=[16,16,16]",
        "trainer.precision=32",
    ]
    single = run_pretrain(
        CONFIGS / "gd.yaml", phantoms, tmp_path / "single", overrides=base + ["data.volumes_per_step=4"], max_steps=3,
        progress=False, device="cpu",
    )
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "medcl.cli", "pretrain", "--config", str(CONFIGS / "gd.yaml"), "--data", str(phantoms), "--out", str(ddp),
           "--max-steps", "3", "--device", "cpu", "--no-progress", *base, "data.volumes_per_step=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((ddp / "summary.json").read_text())["world_size"] == 2
    ls = [float(r["train/global"]) for r in _metrics(single) if r.get("train/global")]
    ld = [float(r["train/global"]) for r in _metrics(ddp) if r.get("train/global")]
    assert len(ls) == len(ld) == 3
    assert torch.allclose(torch.tensor(ls), torch.tensor(ld), atol=1e-5), (ls, ld)
    a, b = _state(single), _state(ddp)
    for k in a:
        if k.startswith("backbone.") or k.startswith("terms."):
            assert torch.allclose(a[k], b[k], atol=1e-5), f"{k} differs between DDP and one process"


def test_sigterm_writes_a_checkpoint_exits_143_and_resumes_exactly(phantoms, tmp_path, capsys):
    """SIGTERM (SLURM time limits, docker stop): exit 143, a checkpoint at the step reached, record.json
    incomplete; fine-tuning from the half-trained run is refused naming --allow-incomplete; --resume finishes with
    the weights of an uninterrupted run."""
    from medcl.cli import main

    steps = 10
    full = run_pretrain(CONFIGS / "gd.yaml", phantoms, tmp_path / "full", overrides=RESUME, max_steps=steps,
                        progress=False)
    run = tmp_path / "term"
    cmd = [sys.executable, "-m", "medcl.cli", "pretrain", "--config", str(CONFIGS / "gd.yaml"), "--data", str(phantoms),
           "--out", str(run), "--max-steps", str(steps), "--no-progress", *RESUME]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step=2.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before SIGTERM: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGTERM)  # the main process only, as SLURM and docker do
    rc = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    assert rc == 143, err[-2000:]
    assert "stopped by SIGTERM at step" in err and "Traceback" not in err
    ck = safe_torch_load(run / "checkpoints" / "last.ckpt")
    record = json.loads((run / "record.json").read_text())
    assert 2 <= ck["global_step"] < steps and ck["medcl_record"]["complete"] is False
    assert record["complete"] is False and record["step"] == ck["global_step"]
    assert not (run / "backbone.pt").exists()
    # the half-trained run is refused as an init, naming the step and the flag (drain what the uninterrupted
    # run above logged first, so only the CLI's own output is read)
    capsys.readouterr()
    rc = main(["finetune", "--data", str(phantoms), "--out", str(tmp_path / "ft"), "--init", str(run),
               "--labelled", "2", "--max-steps", "1", "--device", "cpu"])
    line = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(line) == 1 and "--allow-incomplete" in line[0] and f"step {ck['global_step']}" in line[0]
    run_pretrain(None, phantoms, run, resume=True, progress=False)
    a, b = _state(full), _state(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the SIGTERM resume"
    assert json.loads((run / "record.json").read_text())["complete"] is True
