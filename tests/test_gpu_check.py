"""benchmarks/gpu_check.py: the smoke run CI does (every figure's code path on the CPU, finite numbers), run as
on a bare GPU machine (SimpleITK, pydicom and openslide cannot be imported), and medcl's lazy I/O imports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
BLOCKED = ("SimpleITK", "pydicom", "openslide")
# Import fails for these (a None entry in sys.modules), as on a machine where they are not installed.
BARE = "import sys\nfor _m in {blocked!r}:\n    sys.modules[_m] = None\n"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run_check(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = BARE.format(blocked=BLOCKED) + (
        "import runpy\n"
        f"sys.argv = [{str(SCRIPT)!r}] + {args!r}\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=280, cwd=cwd)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_gpu_check_smoke_writes_finite_figures(tmp_path):
    out = tmp_path / "check.json"
    res = _run_check(["--smoke", "--peak-tflops", "1", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())  # strict JSON: non-finite numbers are written as null
    figs = doc["figures"]
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert doc["smoke"] is True and doc["complete"] is True and set(figs) == set(gpu_check.FIGURES)
    errors = {k: v["error"] for k, v in figs.items() if "error" in v}
    assert not errors, errors
    skipped = {k: v["skipped"] for k, v in figs.items() if "skipped" in v}
    assert not skipped, skipped  # every figure runs on the CPU at smoke size (timm's ViT may skip inside)
    for method in gpu_check.METHODS:
        assert _finite(figs["pipeline"][method]["ratio"]) and figs["pipeline"][method]["ratio"] > 0
        assert _finite(figs["mfu"][method]["mfu"]) and figs["mfu"][method]["mfu"] > 0
        assert _finite(figs["mfu"][method]["tflop_per_step"]) and figs["mfu"][method]["of_matmul"] > 0
        split = figs["mfu"][method]["time_split"]
        assert abs(split["conv"] + split["norm"] + split["rest"] - 1) < 1e-6 and split["conv"] > 0
        for name in ("step_fp32", "step_bf16", "step_bf16_cl", "step_bf16_cl_nobench", "step_compile"):
            assert _finite(figs[name][method]["step_s"]), (name, method)
        assert figs["step_bf16_cl"][method]["channels_last"] is True
        assert _finite(figs["step_compile"][method]["compile_s"])
    assert figs["step_fp32"]["gd+local"]["precision"] == "32-true"
    assert figs["step_bf16"]["gd+local"]["precision"] == "bf16-mixed"
    assert _finite(figs["matmul"]["tflops"]) and _finite(figs["finetune"]["step_s"])
    assert _finite(figs["inference"]["fp32"]["volumes_per_s"]) and _finite(figs["inference"]["bf16"]["volumes_per_s"])
    assert _finite(figs["mil_extract"]["builtin-cnn"]["tiles_per_s"])
    vit = figs["mil_extract"]["timm-vit_small"]
    assert "skipped" in vit or _finite(vit["tiles_per_s"])
    assert all(figs["env"][f"{m}_version"] is None for m in BLOCKED)  # ran as on a bare machine
    table = out.with_suffix(".md").read_text()
    assert "| figure | setting | value |" in table and "pipeline gd+local" in table

    # --only reruns a subset and keeps the other figures of the file
    before = figs["pipeline"]
    res = _run_check(["--smoke", "--peak-tflops", "1", "--out", str(out), "--only", "matmul,env"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads(out.read_text())["figures"]
    assert again["pipeline"] == before and _finite(again["matmul"]["tflops"])


def test_a_spent_budget_skips_the_rest_and_an_unknown_figure_is_refused(tmp_path):
    out = tmp_path / "check.json"
    res = _run_check(["--smoke", "--out", str(out), "--only", "env,matmul", "--budget", "0"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    figs = json.loads(out.read_text())["figures"]
    assert "--only env" in figs["env"]["skipped"] and "--only matmul" in figs["matmul"]["skipped"]
    res = _run_check(["--smoke", "--only", "nope"], tmp_path)
    assert res.returncode == 2 and "unknown figures" in res.stderr


def test_medcl_imports_without_simpleitk_pydicom_openslide():
    """A bare GPU machine: the pretraining, data, views and fine-tuning modules import (I/O libraries load lazily)."""
    code = BARE.format(blocked=BLOCKED) + (
        "import medcl.pretrain.run, medcl.pretrain.module, medcl.pretrain.data, medcl.data, medcl.views\n"
        "import medcl.segment.finetune, medcl.segment.inference, medcl.wsi.encoders\n"
        "from medcl.data import CaseDataset, load_manifest, write_phantom_dataset\n"
        "print('imported:', sorted(m for m in " + repr(BLOCKED) + " if sys.modules.get(m) is not None))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "imported: []" in res.stdout
