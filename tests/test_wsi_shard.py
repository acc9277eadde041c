"""Sharded feature extraction: ranks from the launcher's environment, the slide assignment, and two real CPU ranks
(gloo) extracting slides cut from the real slide -- once under ``torchrun``, once as SLURM ``srun`` would start
them (resuming a one-process run) -- against a one-process run of the same encoder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import lightning  # noqa: F401  (imported once per session: engine.checkpoint needs it)
import numpy as np
import pytest
from _slides import CMU, cut_cmu_regions

from medcl.cli import main
from medcl.wsi.shard import Ranks, assign, rank_device, ranks_from_env

SLIDES = [f"cmu_{i}" for i in range(5)]
EXTRACT = ["mil", "extract", "--encoder", "builtin-cnn", "--workers", "0", "--device", "cpu", "--batch-size", "16"]
LAUNCH_TIMEOUT = 240  # seconds: process start-up on a busy machine dominates


def cli(*args) -> int:
    return main([str(a) for a in args])


# ----------------------------------------------------------------------------------------- ranks and assignment


def test_ranks_from_the_launchers_environment():
    assert ranks_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Ranks(3, 8, 1, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "2", "SLURM_NTASKS": "6"}
    assert ranks_from_env(slurm) == Ranks(5, 6, 2, "slurm")
    # a batch script runs as one process although the job has several tasks: not sharded
    assert ranks_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == Ranks()
    # torchrun inside a SLURM allocation: torchrun's ranks win
    assert ranks_from_env({**slurm, "RANK": "0", "WORLD_SIZE": "2"}).launcher == "torchrun"
    assert ranks_from_env({}) == Ranks() and not Ranks().distributed and Ranks().tag() == ""


def test_assignment_is_longest_first_and_balanced():
    # heaviest first to the least loaded rank (ties: fewer items, then lower rank); done slides (0) fill in last
    assert assign([16, 16, 16, 13, 10], 2) == [0, 1, 0, 1, 1]
    assert assign([0, 5, 0, 7], 2) == [1, 1, 1, 0]
    rng = np.random.default_rng(0)
    w = rng.integers(1, 500, 41).astype(float)
    for k in (1, 3, 8):
        r = np.asarray(assign(w, k))
        load = np.bincount(r, weights=w, minlength=k)
        assert r.min() >= 0 and r.max() < k and load.sum() == w.sum()
        assert load.max() <= w.sum() / k + w.max()  # Graham's bound for LPT
    assert assign([3.0], 4) == [0] and assign([], 3) == []


def test_each_rank_gets_its_local_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cuda = torch.device("cuda")
    assert rank_device(cuda, Ranks(5, 8, 1, "torchrun")) == torch.device("cuda", 1)
    assert rank_device(cuda, Ranks(6, 8, 6, "slurm")) == torch.device("cuda", 2)  # 8 tasks on a node of 4 GPUs
    assert rank_device(cuda, Ranks()) == cuda  # one process: the device as given
    assert rank_device(torch.device("cuda", 3), Ranks(1, 2, 1)) == torch.device("cuda", 3)  # an explicit GPU
    assert rank_device(torch.device("cpu"), Ranks(1, 2, 1)) == torch.device("cpu")


# ----------------------------------------------------------------------------------------- two real ranks


@pytest.fixture(scope="module")
def cmu(shared_data, tmp_path_factory):
    """Five slides cut from the real slide, tiled, and extracted by one process (``one``)."""
    d = tmp_path_factory.mktemp("shard")
    cut_cmu_regions(shared_data / CMU, d / "slides")
    assert cli("mil", "tile", d / "slides", "--out", d / "tiles", "--mpp", 1.0, "--size", 64, "--thumbnail-size",
               256) == 0
    assert cli(*EXTRACT, d / "tiles", "--out", d / "one") == 0
    return d


def _env() -> dict[str, str]:
    """This environment without any launcher's variables (the ranks get torchrun's alone), one thread a rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                   "MASTER_", "TORCHELASTIC"))}
    return {**env, "OMP_NUM_THREADS": "1"}


def _features(folder: Path, slide: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(folder / f"{slide}.h5") as f:
        assert f.attrs["complete"]
        return f["features"][()], f["coords"][()]


def _same_as_one_process(d: Path, out: Path, slides=SLIDES) -> None:
    for s in slides:
        feats, coords = _features(out, s)
        ref, ref_coords = _features(d / "one", s)
        np.testing.assert_array_equal(coords, ref_coords)
        np.testing.assert_allclose(feats, ref, rtol=1e-6, atol=1e-7)


def _check_summary(out: Path, done: set[str], skipped: set[str]) -> dict:
    """Every slide in the summary exactly once, with the status expected, handled by one of two ranks that both
    had work."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    rows = {r["slide_id"]: r for r in summary["slides"]}
    assert len(summary["slides"]) == len(rows) == len(SLIDES) and set(rows) == set(SLIDES)
    assert {s for s, r in rows.items() if r["status"] == "done"} == done
    assert {s for s, r in rows.items() if r["status"] == "skipped"} == skipped
    per_rank = [set(r["slides"]) for r in summary["ranks"]]
    assert per_rank[0].isdisjoint(per_rank[1]) and per_rank[0] | per_rank[1] == set(SLIDES)
    assert all({s for s in done if rows[s]["rank"] == k} for k in (0, 1)), "both ranks must have extracted"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    return summary


def _extracted_lines(log: str, slide: str) -> int:
    return sum(f": {slide}: " in line and " tiles -> " in line for line in log.splitlines())


def test_torchrun_two_ranks_extract_each_slide_once_like_one_process(cmu):
    out = cmu / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medcl",
           *EXTRACT, cmu / "tiles", "--out", out]
    run = subprocess.run(list(map(str, cmd)), env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "rank 0/2: joined the gloo process group (torchrun)" in log
    summary = _check_summary(out, done=set(SLIDES), skipped=set())
    assert summary["counts"] == {"done": 5, "skipped": 0, "failed": 0}
    assert all(_extracted_lines(log, s) == 1 for s in SLIDES), log[-3000:]
    tiles = sum(len(_features(cmu / "one", s)[0]) for s in SLIDES)
    assert summary["tiles"] == tiles
    assert log.count(f"extracted {tiles} tiles from 5 slides") == 1  # one summary line, from rank 0
    _same_as_one_process(cmu, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(env: dict[str, str], argv: list[str], log: str) -> None:
    """One rank as ``srun`` starts it: the launcher's variables in the environment, then the ``medcl`` command.
    (Forked from the test process, which has imported everything already: a fresh interpreter per rank would
    spend most of this test importing MONAI.)"""
    os.environ.update(env)
    with open(log, "w") as f:
        sys.stdout = sys.stderr = f
        rc = main(argv)
        f.flush()
    os._exit(rc)


def _run_ranks(argv: list[str], logs: Path) -> tuple[list[int | None], str]:
    """Two ranks as ``srun --ntasks 2`` starts them; their exit codes and their output (rank 0's first)."""
    import multiprocessing as mp

    port = str(_free_port())
    procs = [mp.get_context("fork").Process(target=_rank_main, args=(
        {"SLURM_PROCID": str(r), "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(r), "SLURM_NTASKS": "2",
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, argv, str(logs / f"rank{r}.log"))) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(LAUNCH_TIMEOUT)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return [p.exitcode for p in procs], "".join((logs / f"rank{r}.log").read_text() for r in (0, 1))


def test_srun_ranks_resume_a_run_skipping_done_slides(cmu, tmp_path):
    """Two processes started as ``srun --ntasks 2`` starts them continue a one-process run whose feature files
    of two slides are gone: those two are extracted (one per rank), the others are skipped and left untouched."""
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(cmu / "one", out)
    missing = {"cmu_0", "cmu_3"}
    for s in missing:
        (out / f"{s}.h5").unlink()
    kept = {s: (out / f"{s}.h5").stat() for s in SLIDES if s not in missing}
    codes, log = _run_ranks(list(map(str, [*EXTRACT, cmu / "tiles", "--out", out])), tmp_path)
    assert codes == [0, 0], log[-3000:]
    assert "rank 1/2: joined the gloo process group (slurm)" in log
    summary = _check_summary(out, done=missing, skipped=set(SLIDES) - missing)
    tiles = sum(len(_features(cmu / "one", s)[0]) for s in missing)
    assert summary["tiles"] == tiles
    assert log.count(f"extracted {tiles} tiles from 2 slides (3 skipped, 0 failed)") == 1
    for s, st in kept.items():
        now = (out / f"{s}.h5").stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{s} was rewritten"
    _same_as_one_process(cmu, out)


def test_an_error_on_rank_0_stops_every_rank_in_one_line(cmu, tmp_path):
    """``--out`` holding other files: rank 0 refuses it while planning, and both ranks exit with that one line
    (rank 1 does not wait for a plan that never comes); nothing is written."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("not a run folder")
    logs = tmp_path / "logs"
    logs.mkdir()
    codes, _ = _run_ranks(list(map(str, [*EXTRACT, cmu / "tiles", "--out", out])), logs)
    assert codes == [2, 2]
    for r in (0, 1):
        lines = (logs / f"rank{r}.log").read_text().strip().splitlines()
        errors = [ln for ln in lines if ln.startswith("medcl: error:")]
        assert len(errors) == 1 and "--out" in errors[0] and "already holds files" in errors[0], lines
        assert not any("Traceback" in ln for ln in lines)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
