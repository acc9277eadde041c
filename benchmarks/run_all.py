"""Run every benchmark of ``benchmarks/`` and write one JSON file and one markdown summary.

Each script runs as a subprocess with a timeout (a hung or crashed benchmark is reported, the others still
run); the JSON it prints is collected into ``OUT/benchmarks.json``, and ``OUT/benchmarks.md`` gets a table of
the targets (measured value, met or not) and a table of key figures per benchmark.

Targets checked:

* data pipeline: a cached epoch >= 10x faster than an uncached one on the hippocampus data (MONAI reports
  about 13x for its ``PersistentDataset``), for the RAM and the disk cache of ``medcl.data.CaseDataset``;
* losses: bounded local loss memory <= 1/10 of the naive all-pairs loss at 16^3 features, batch 8; a
  global + local training step <= 1.2 x a global-only step;
* pretraining step: gd+local on 48^3 views, 4 views per step, < 0.3 s on CPU;
* MIL: peak training memory about linear in the bag size (growth exponent <= 1.15 between the two largest
  bag sizes; 1.0 = linear).

``--quick`` (about 4 minutes on 2 CPU cores) shrinks every benchmark to the cases the targets need. Each
script gets ``--threads`` (default 1): on a CPU shared with other jobs, more torch threads than free cores make
OpenMP barriers stall, so one thread gives the steadier figure.

Usage::

    python benchmarks/run_all.py --quick --out runs/benchmarks --data ../shared/data
    python benchmarks/run_all.py --only losses mil --out runs/bench_losses
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Bench:
    """One benchmark script: its arguments (quick / full), timeouts, and how to read its JSON."""

    name: str
    script: str
    quick: list[str]
    full: list[str]
    timeout_quick: int = 300
    timeout_full: int = 1800
    device_flag: bool = False  # the script takes --device
    data: Callable[[Path], list[str]] | None = None  # extra arguments when --data points at shared data
    figures: Callable[[dict], list[tuple[str, Any]]] = field(default=lambda r: [])
    targets: Callable[[dict], list[dict]] = field(default=lambda r: [])


def _r(x: Any, nd: int = 3) -> Any:
    return round(x, nd) if isinstance(x, float) else x


def _target(name: str, measured: str, met: bool | None, note: str = "") -> dict:
    return {"target": name, "measured": measured, "met": met, "note": note}


# ---- per-benchmark readers --------------------------------------------------------------------------------
def data_figures(r: dict) -> list[tuple[str, Any]]:
    e = r["epochs"]
    return [("dataset", f"{r['dataset']['kind']} ({e['volumes']} volumes)"),
            *[(f"{m} epoch (s) / volumes/s", f"{e[f'{m}_epoch_s']} / {e[f'{m}_volumes_per_s']}")
              for m in ("uncached", "ram", "disk")],
            ("first (filling) epoch RAM / disk (s)", f"{e['ram_fill_epoch_s']} / {e['disk_fill_epoch_s']}"),
            ("speed-up RAM / disk", f"{e['speedup_ram']}x / {e['speedup_disk']}x"),
            ("disk cache size (MB)", e["disk_cache_mb"])]


def data_targets(r: dict) -> list[dict]:
    t = r["target_cached_speedup"]
    note = "" if t["on_hippocampus"] else f"measured on {r['dataset']['kind']}, the target is for hippocampus"
    return [_target(f"cached epoch >= 10x faster than uncached ({c} cache)", f"{t[c]}x", t[f"met_{c}"], note)
            for c in ("ram", "disk")]


def losses_figures(r: dict) -> list[tuple[str, Any]]:
    rows = [(f"local {x['size']}^3 b{x['batch']}: peak MB bounded / naive",
             f"{x['bounded_peak_mb']} / {x['naive_peak_mb']} (ratio {x['memory_ratio_bounded_over_naive']})")
            for x in r.get("local", [])]
    rows += [(f"local {x['size']}^3 b{x['batch']}: s bounded / naive", f"{x['bounded_s']} / {x['naive_s']}")
             for x in r.get("local", [])]
    if "step" in r:
        s = r["step"]
        rows += [("step 48^3 x4 views, wall s: global / global+local",
                  f"{s['global']['wall_s']} / {s['global+local']['wall_s']}"),
                 ("step ratio wall / CPU", f"{s['ratio_wall']} / {s['ratio_cpu']}")]
    return rows


def losses_targets(r: dict) -> list[dict]:
    out = []
    if "target_memory_16cubed_batch8" in r:
        t = r["target_memory_16cubed_batch8"]
        out.append(_target("bounded local loss memory <= 1/10 of naive (16^3, batch 8)", f"{t['ratio']}", t["met"]))
    if "target_step" in r:
        t = r["target_step"]
        out.append(_target("global+local step <= 1.2 x global-only", f"{t['ratio_wall']} (CPU time {t['ratio_cpu']})",
                           t["met"]))
    return out


def pretrain_figures(r: dict) -> list[tuple[str, Any]]:
    rows = [("device / threads / view size / views", f"{r['device']} / {r['threads']} / {r['size']}^3 / {r['views']}")]
    for m in r["methods"]:
        rows.append((f"{m['method']}: step s in-memory / pipeline",
                     f"{_r(m['in_memory']['step_s'])} / {_r(m['pipeline']['step_s'])}"))
        rows.append((f"{m['method']}: voxels/s (pipeline)", f"{m['pipeline']['voxels_per_s']:.3g}"))
        for k, v in m["pipeline"].items():
            if k.startswith("phase"):
                rows.append((f"{m['method']}: {k} step s (pipeline)", _r(v)))
    return rows


def pretrain_targets(r: dict) -> list[dict]:
    m = next((m for m in r["methods"] if m["method"] == "gd+local"), None)
    if m is None:
        return []
    # the default gd+local is staged: a step is either a global (encoder) or a local (decoder) step
    phases = [v for k, v in m["pipeline"].items() if k.startswith("phase")]
    step = max(phases) if phases else m["pipeline"]["step_s"]
    ok = r["device"] == "cpu" and r["size"] == 48 and r["views"] == 4
    return [_target("pretraining step gd+local (slowest phase), 48^3, 4 views < 0.3 s on CPU",
                    f"{_r(step)} s (in-memory batch {_r(m['in_memory']['step_s'])} s)",
                    step < 0.3 if ok else None, "" if ok else "not a CPU / 48^3 / 4-view run")]


def mil_figures(r: dict) -> list[tuple[str, Any]]:
    h = r["heads"]
    rows = [(f"{x['head']} {x['instances_per_bag']} instances: bags/s, peak MB",
             f"{x['bags_per_second']}, {x['peak_memory_mb']}") for x in h["rows"]]
    return rows + [(f"{k}: MB per 1k instances", v["mb_per_1k_instances"]) for k, v in h["linearity"].items()]


def mil_targets(r: dict) -> list[dict]:
    out = []
    for head, v in r["heads"]["linearity"].items():
        expo = math.log(max(v["memory_ratio"], 1e-9)) / math.log(v["size_ratio"])
        out.append(_target(f"MIL {head} memory about linear in bag size", f"x{v['memory_ratio']} for x{v['size_ratio']} "
                           f"instances ({v['sizes'][0]} -> {v['sizes'][1]}): exponent {expo:.2f}", expo <= 1.15))
    return out


def views_figures(r: dict) -> list[tuple[str, Any]]:
    return [(f"{x['sampler']} crop {x['crop']}, {x['views']} views: median s", _r(x["median_s"], 4)) for x in r["results"]]


def backbone_figures(r: dict) -> list[tuple[str, Any]]:
    return [(f"{x['filters']} {x['mode']}: wall / CPU s per step", f"{x['median_s']} / {x['median_cpu_s']}")
            for x in r["results"]]


def finetune_figures(r: dict) -> list[tuple[str, Any]]:
    return [(f"{x['steps']} steps, patch {x['patch']}, {x['threads']} thread(s)",
             f"{x['step_seconds_median']} s/step, run {x['run_seconds']} s, test Dice {x['test_dice']}")
            for x in r["results"]]


def wsi_figures(r: dict) -> list[tuple[str, Any]]:
    t = r["tile_reading"]
    return [("slide / tiles", f"{Path(t['slide']).name} / {t['tiles']}"),
            ("single process tiles/s", t["single_process_tiles_per_s"]),
            *[(f"DataLoader {k} tiles/s (speed-up)", f"{v} ({t['speedup'][k]}x)")
              for k, v in t["dataloader_tiles_per_s"].items()]]


def _shared(sub: str, flag: str) -> Callable[[Path], list[str]]:
    return lambda d: [flag, str(d / sub)] if (d / sub).exists() else []


BENCHES = [
    Bench("data_pipeline", "data_pipeline.py", ["--repeats", "3"], ["--repeats", "5"], 300, 900,
          data=lambda d: ["--data", str(d / "hippocampus")] if (d / "hippocampus").is_dir() else ["--data", "phantoms"],
          figures=data_figures, targets=data_targets),
    Bench("losses", "losses.py", ["--sizes", "16", "--batches", "8", "--local-repeats", "1", "--repeats", "3"], [],
          600, 3600, device_flag=True, figures=losses_figures, targets=losses_targets),
    Bench("pretrain_step", "pretrain_step.py", ["--methods", "gd+local,gd+local-joint", "--steps", "8", "--workers", "0"], [],
          600, 3600, device_flag=True, figures=pretrain_figures, targets=pretrain_targets),
    Bench("mil", "mil.py", ["--sizes", "1000", "10000", "--steps", "2"], [], 600, 3600, device_flag=True,
          figures=mil_figures, targets=mil_targets),
    Bench("views", "views.py", ["--repeats", "5"], ["--repeats", "20"], 300, 900, device_flag=True,
          figures=views_figures),
    Bench("backbone_step", "backbone_step.py", ["--repeats", "2"], ["--repeats", "5", "--filters", "16,32,64,128",
          "--filters", "8,16,32,64"], 300, 1800, figures=backbone_figures),
    Bench("finetune_run", "finetune_run.py", ["--steps", "20", "--n", "4"], [], 300, 1800, device_flag=True,
          figures=finetune_figures),
    Bench("wsi", "wsi.py", ["--workers", "1", "2", "--repeats", "1"], [], 300, 900,
          data=_shared("wsi/CMU-1-Small-Region.svs", "--slide"), figures=wsi_figures),
]
NO_THREADS = {"wsi"}  # tile reading is I/O and JPEG decoding in worker processes


def parse_json_output(text: str) -> Any:
    """The JSON document a benchmark printed last (scripts may print progress lines or JSON rows before it)."""
    text = text.rstrip()
    dec = json.JSONDecoder()
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    for s in starts:
        if text[s:s + 1] in "{[":
            try:
                obj, end = dec.raw_decode(text, s)
            except json.JSONDecodeError:
                continue
            if end == len(text):
                return obj
    raise ValueError("no JSON document at the end of the output")


def run_bench(b: Bench, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(HERE / b.script), *(b.quick if args.quick else b.full)]
    if b.name not in NO_THREADS and args.threads:
        cmd += ["--threads", str(args.threads)]
    if b.device_flag and args.device:
        cmd += ["--device", args.device]
    if b.data is not None and args.data is not None:
        cmd += b.data(Path(args.data))
    timeout = int((b.timeout_quick if args.quick else b.timeout_full) * args.timeout_scale)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    shown = ["python", str((HERE / b.script).relative_to(ROOT)), *cmd[2:]]  # as a user types it, from the repo root
    entry: dict[str, Any] = {"command": shlex.join(shown), "timeout_s": timeout}
    print(f"[run_all] {b.name}: {entry['command']}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        entry.update(status="timeout", seconds=round(time.perf_counter() - t0, 1),
                     stderr_tail=(exc.stderr or b"")[-2000:].decode(errors="replace")
                     if isinstance(exc.stderr, bytes) else (exc.stderr or "")[-2000:])
        return entry
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    entry["returncode"] = proc.returncode
    try:
        entry["result"] = parse_json_output(proc.stdout)
        entry["status"] = "ok" if proc.returncode == 0 else "error"
    except ValueError as exc:
        entry["status"] = "error"
        entry["error"] = str(exc)
    if entry["status"] != "ok":
        entry["stderr_tail"] = proc.stderr[-3000:]
    return entry


def _met(m: bool | None) -> str:
    return {True: "**yes**", False: "**no**", None: "n/a"}[m]


def write_markdown(report: dict, path: Path) -> None:
    m = report["machine"]
    lines = ["# medcl benchmarks", "",
             f"`{report['command']}` ({'quick' if report['quick'] else 'full'}), {report['started']}, "
             f"{report['seconds']:.0f} s in all.", "",
             f"Machine: {m['platform']}, {m['cpu_count']} CPU cores, torch {m['torch']}, "
             f"{m['gpu'] or 'no GPU'}; load average (1 min) {m['load_start']} at the start, {m['load_end']} at the "
             f"end; torch threads per benchmark: {report['threads'] or 'default'}.", "",
             "## Targets", "", "| benchmark | target | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['benchmark']} | {t['target']} | {t['measured']}{note} | {_met(t['met'])} |")
    for name, e in report["benchmarks"].items():
        lines += ["", f"## {name}", "", f"`{e['command']}` -- {e['status']}, {e.get('seconds', '?')} s", ""]
        if e["status"] != "ok":
            tail = (e.get("error", "") + "\n" + e.get("stderr_tail", "")).strip().splitlines()[-8:]
            lines += ["```", *tail, "```"]
            continue
        rows = e.get("figures", [])
        if rows:
            lines += ["| figure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small settings (about 4 minutes on 2 CPU cores)")
    ap.add_argument("--out", default="runs/benchmarks", help="output folder (benchmarks.json, benchmarks.md)")
    ap.add_argument("--data", default=None, help="shared data root (../shared/data): hippocampus, wsi slide")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per benchmark (0: each script's default)")
    ap.add_argument("--device", default=None, help="cpu or cuda for the scripts that take --device (default: theirs)")
    ap.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES], help="run only these")
    ap.add_argument("--skip", nargs="+", default=[], choices=[b.name for b in BENCHES])
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every timeout (slow machines)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from medcl.core.device import cuda_available

    gpu = torch.cuda.get_device_name(0) if cuda_available() else None
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/run_all.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick, "threads": args.threads, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "gpu": gpu, "load_start": round(os.getloadavg()[0], 2)},
        "benchmarks": {}, "targets": [],
    }
    t0 = time.perf_counter()
    for b in BENCHES:
        if (args.only and b.name not in args.only) or b.name in args.skip:
            continue
        entry = run_bench(b, args)
        if entry["status"] == "ok":
            try:
                entry["figures"] = [[k, v] for k, v in b.figures(entry["result"])]
                for t in b.targets(entry["result"]):
                    report["targets"].append({"benchmark": b.name, **t})
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
                entry["status"] = "error"
                entry["error"] = f"unexpected JSON from {b.script}: {type(exc).__name__}: {exc}"
        print(f"[run_all] {b.name}: {entry['status']} in {entry.get('seconds', '?')} s", flush=True)
        report["benchmarks"][b.name] = entry
        report["seconds"] = time.perf_counter() - t0
        report["machine"]["load_end"] = round(os.getloadavg()[0], 2)
        (out / "benchmarks.json").write_text(json.dumps(report, indent=1))  # partial results survive a kill
        write_markdown(report, out / "benchmarks.md")
    for t in report["targets"]:
        print(f"[run_all] {_met(t['met']).strip('*'):>4}  {t['benchmark']}: {t['target']}: {t['measured']}")
    print(f"[run_all] {out / 'benchmarks.json'}, {out / 'benchmarks.md'}")
    return 0 if all(e["status"] == "ok" for e in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
