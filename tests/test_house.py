"""The house rules of DESIGN.md that a test can hold: one place per concept, no printing in library code,
no third-party noise in a normal run (while medcl's own warnings still reach the user), the package layout."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("medcl", "benchmarks", "examples")

# a call that has exactly one home: (pattern, the only module allowed to contain it)
ONE_PLACE = {
    "LambdaLR(": "medcl/engine/schedules.py",
    "os.replace(": "medcl/core/files.py",
    "torch.cuda.is_available(": "medcl/core/device.py",
}


def _python_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (REPO / d).rglob("*.py"))


@pytest.mark.parametrize("pattern", sorted(ONE_PLACE))
def test_each_concept_is_written_in_one_place(pattern):
    home = ONE_PLACE[pattern]
    found = sorted(str(p.relative_to(REPO)) for p in _python_files() if pattern in p.read_text())
    assert found == [home], f"{pattern!r} must appear only in {home}, found in {found}"


def test_no_print_in_library_code():
    """Library modules report through logging / warnings; only the CLI modules print."""
    offenders = []
    for p in sorted((REPO / "medcl").rglob("*.py")):
        if p.name == "cli.py" or p.name.endswith("_cli.py"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{p.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.keyword) and node.arg == "log" and isinstance(node.value, ast.Name) \
                    and node.value.id == "print":
                offenders.append(f"{p.relative_to(REPO)}:{node.value.lineno} (log=print)")
    assert offenders == []


def test_library_entry_points_leave_stdout_empty(tmp_path, capsys):
    """Pretraining, fine-tuning, MIL cross-validation and the heatmap drawing, called as a library, print nothing."""
    import numpy as np
    import torch

    from medcl.data import write_phantom_dataset
    from medcl.mil.bags import Bag, BagDataset
    from medcl.mil.config import MILConfig
    from medcl.mil.experiment import cross_validate
    from medcl.pretrain.run import run_pretrain
    from medcl.segment.finetune import run_finetune
    from medcl.segment.prepare import CaseSelection, load_finetune_config

    data = write_phantom_dataset(tmp_path / "ph", n=5, size=24, seed=0)
    ids = sorted(p.name.split(".")[0] for p in (data / "imagesTr").glob("*.nii.gz"))
    run_pretrain(REPO / "configs" / "pretrain" / "gd_local.yaml", data, tmp_path / "pre", max_steps=2, progress=False,
                 overrides=["backbone.filters=[4,8,16]", "backbone.strides=[1,2,2]", "views.partition.crop=[16,16,16]",
                            "monitor.probe_crop=[16,16,16]", "data.volumes_per_step=2", "data.probe_volumes=0",
                            "trainer.num_workers=0", "monitor.probe_every=0"], device="cpu")
    cfg = load_finetune_config(REPO / "configs" / "finetune" / "phantoms.yaml", ["trainer.max_steps=2"])
    run_finetune(cfg, data, tmp_path / "ft", selection=CaseSelection(train=ids[:1], test=ids[4:], budget=1),
                 device="cpu", progress=False)
    g = torch.Generator().manual_seed(0)
    bags = [Bag(f"b{i}", i % 2, 3 + i % 3, torch.randn(3 + i % 3, 4, generator=g)) for i in range(12)]
    mil = MILConfig(head="abmil")
    mil.cv.folds, mil.train.epochs, mil.cv.final_model = 3, 2, False
    cross_validate([mil], BagDataset(bags, classes=["0", "1"], in_dim=4), tmp_path / "mil", progress=False)
    from medcl.wsi.heatmap import render_heatmap

    render_heatmap(np.zeros((20, 30, 3), np.uint8), np.ones((20, 30)), tmp_path / "h.png")
    assert capsys.readouterr().out == ""


def _medcl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "medcl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240, env=env)


def test_a_normal_pretrain_run_is_quiet_but_medcl_warnings_reach_stderr(tmp_path):
    """No Lightning ``litlogger`` tip and no pytree ``LeafSpec`` deprecation in a normal run; a damaged disk-cache
    file still produces medcl's own warning on stderr (the filters are exact, not a blanket silence)."""
    from medcl.data import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "ph", n=4, size=24, seed=0)
    common = ["--config", str(REPO / "configs" / "pretrain" / "gd_local.yaml"), "--data", str(data), "--max-steps",
              "2", "--no-progress", "--device", "cpu", "backbone.filters=[4,8,16]", "backbone.strides=[1,2,2]",
              "views.partition.crop=[16,16,16]", "monitor.probe_crop=[16,16,16]", "data.volumes_per_step=2",
              "data.probe_volumes=0", "trainer.num_workers=0", "monitor.probe_every=0", "data.cache=disk",
              f"data.cache_dir={tmp_path / 'cache'}"]
    first = _medcl("pretrain", "--out", str(tmp_path / "a"), *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    for noise in ("litlogger", "LeafSpec"):
        assert noise not in first.stderr + first.stdout
    cached = sorted((tmp_path / "cache").rglob("*.medcl"))
    assert cached, "the first run wrote no disk-cache file"
    cached[0].write_bytes(b"not a cache file")
    second = _medcl("pretrain", "--out", str(tmp_path / "b"), *common, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert re.search(r"rebuilding unreadable cache file", second.stderr), second.stderr
    assert "litlogger" not in second.stderr and "LeafSpec" not in second.stderr


def test_mil_imports_from_wsi_only_the_heatmap_drawing():
    imports = set()
    for p in (REPO / "medcl" / "mil").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medcl.wsi"):
                imports.add(node.module)
            if isinstance(node, ast.Import):
                imports.update(a.name for a in node.names if a.name.startswith("medcl.wsi"))
    assert imports == {"medcl.wsi.heatmap"}


def test_shared_data_tests_carry_the_realdata_marker():
    """Collecting with ``-m "not realdata"`` drops every test that uses the ``shared_data`` fixture."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "realdata",
                           "tests/test_io.py", "tests/test_mil_data.py", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    selected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any("test_io.py" in s for s in selected) and any("test_mil_data.py" in s for s in selected), proc.stdout
    for line in selected:
        path, name = line.split("::", 1)
        src = (REPO / path).read_text()
        body = src[src.index(f"def {name.split('[')[0]}("):]
        assert "shared_data" in body.split("\ndef ", 1)[0], line


def _readme_commands() -> list[str]:
    """Every ``medcl ...`` command line in the README's code blocks (continuation lines joined, comments cut)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            m = re.search(r"(?:^|&& |-m |\d )medcl ([a-z].*)$", line)
            if m and not line.startswith("#"):
                commands.append(m.group(1))
    return commands


def test_every_readme_command_and_flag_exists():
    """The README's commands are a contract: each subcommand path and each ``--flag`` it shows is known to the CLI."""
    import argparse

    from medcl.cli import build_parser

    commands = _readme_commands()
    assert len(commands) >= 15, commands
    for command in commands:
        parser = build_parser()
        tokens = command.replace("[", " ").replace("]", " ").split()
        path = []
        while tokens:
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if not subs or tokens[0] not in subs[0].choices:
                break
            parser = subs[0].choices[tokens.pop(0)]
            path.append(parser.prog)
        assert path, f"README command with an unknown subcommand: medcl {command}"
        known = {o for a in parser._actions for o in a.option_strings}
        flags = {t.split("=")[0].rstrip(",|") for t in tokens if t.startswith("--")}
        assert flags <= known, f"medcl {command}: unknown flags {sorted(flags - known)} for '{path[-1]}'"
