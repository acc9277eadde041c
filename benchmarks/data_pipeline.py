"""Speed of the data floor, printed as JSON: an uncached epoch against a cached one, and phantom generation.

* ``uncached``: an epoch of :class:`medcl.data.CaseDataset` with ``cache="none"``: every volume is decoded
  (NIfTI / DICOM reader) and preprocessed (the plan's MONAI pipeline) again -- MONAI's plain ``Dataset``.
* ``ram``: the second epoch of a ``CaseDataset(cache="ram")`` (the first one fills it; items are copied out
  so that augmentation cannot modify the cache) -- MONAI's ``CacheDataset``.
* ``disk``: an epoch of a *new* ``CaseDataset(cache="disk")`` over a cache folder filled by a first one, as a
  second run or a DataLoader worker sees it (weights-only ``torch.load`` of each preprocessed case) --
  MONAI's ``PersistentDataset``, for which MONAI reports about 13x over the plain dataset.

Epochs are read in one process, in order (no DataLoader workers: the figure is the work per volume). The
dataset is ``--data`` (default: ``../shared/data/hippocampus`` when present, else ``--n`` synthetic phantoms of
``--size``^3). Every epoch time is the median of ``--repeats`` epochs; the input files sit in the OS page
cache in every mode (the first, discarded, epoch reads them), so the uncached figure is decoding +
preprocessing, not disk reads. Target: a cached epoch >= 10x faster than an uncached one on the hippocampus data.

Usage::

    python benchmarks/data_pipeline.py --threads 1 --repeats 3                  # hippocampus if present
    python benchmarks/data_pipeline.py --data phantoms --n 8 --size 48 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medcl.data import CaseDataset, PreprocessingPlan, load_manifest, make_phantom, write_phantom_dataset

ROOT = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "hippocampus"
TARGET_SPEEDUP = 10.0


def epoch_seconds(ds: CaseDataset) -> float:
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - t


def median_epoch(ds: CaseDataset, repeats: int) -> float:
    return statistics.median(epoch_seconds(ds) for _ in range(repeats))


def measure_epochs(data: Path, plan: PreprocessingPlan, repeats: int, cache_root: Path) -> dict:
    """Uncached, RAM-cached and disk-cached epoch times of ``data`` under ``plan``."""
    m = load_manifest(data)
    n = len(m.cases)
    uncached = CaseDataset(m, plan, cache="none")
    epoch_seconds(uncached)  # warm the OS page cache and the imports: every mode then reads from memory
    out: dict = {"volumes": n, "uncached_epoch_s": median_epoch(uncached, repeats)}
    ram = CaseDataset(m, plan, cache="ram")
    out["ram_fill_epoch_s"] = epoch_seconds(ram)
    out["ram_epoch_s"] = median_epoch(ram, repeats)
    out["disk_fill_epoch_s"] = epoch_seconds(CaseDataset(m, plan, cache="disk", cache_dir=cache_root))
    out["disk_epoch_s"] = median_epoch(CaseDataset(m, plan, cache="disk", cache_dir=cache_root), repeats)
    files = [f for f in cache_root.rglob("*") if f.is_file()]
    out["disk_cache_mb"] = round(sum(f.stat().st_size for f in files) / 2**20, 2)
    for mode in ("uncached", "ram", "disk"):
        out[f"{mode}_volumes_per_s"] = round(n / out[f"{mode}_epoch_s"], 1)
    out["speedup_ram"] = round(out["uncached_epoch_s"] / out["ram_epoch_s"], 2)
    out["speedup_disk"] = round(out["uncached_epoch_s"] / out["disk_epoch_s"], 2)
    for k, v in list(out.items()):
        if k.endswith("_s"):
            out[k] = round(v, 4)
    item = uncached[0]
    out["preprocessed_shape_first_case"] = list(item["image"].shape)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a dataset path, or 'phantoms' (default: hippocampus if present)")
    ap.add_argument("--n", type=int, default=8, help="phantoms written (phantom data)")
    ap.add_argument("--size", type=int, default=48, help="phantom edge in voxels")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spacing", type=float, default=None,
                    help="plan spacing in mm (default: the source spacing for real data, 3 mm for phantoms)")
    ap.add_argument("--no-generate", action="store_true", help="skip the phantom generation timing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {"benchmark": "data_pipeline", "threads": args.threads, "repeats": args.repeats,
                    "load_average_1min": round(os.getloadavg()[0], 2)}

    if not args.no_generate:
        gen = []
        for r in range(args.repeats):
            t = time.perf_counter()
            for s in range(args.n):
                make_phantom(r * 1000 + s, (args.size,) * 3)
            gen.append(time.perf_counter() - t)
        result["phantoms"] = {"n": args.n, "size": args.size, "generate_s_median": round(statistics.median(gen), 4)}

    with tempfile.TemporaryDirectory() as tmp:
        use_phantoms = args.data == "phantoms" or (args.data is None and not HIPPOCAMPUS.is_dir())
        if use_phantoms:
            t = time.perf_counter()
            data = write_phantom_dataset(Path(tmp) / "ph", n=args.n, size=args.size, seed=0)
            result.setdefault("phantoms", {"n": args.n, "size": args.size})["write_msd_s"] = round(
                time.perf_counter() - t, 4)
            plan_kw = {"spacing": (args.spacing or 3.0,) * 3, "crop_foreground": True}
        else:
            data = Path(args.data) if args.data else HIPPOCAMPUS
            # the plan the jobs use on tight MRI crops (configs/finetune/hippocampus.yaml, configs/pretrain/*)
            plan_kw = {"foreground": "nonzero"} | ({"spacing": (args.spacing,) * 3} if args.spacing else {})
        plan = PreprocessingPlan.for_manifest(load_manifest(data), **plan_kw)
        epochs = measure_epochs(data, plan, args.repeats, Path(tmp) / "cache")
    result["dataset"] = {"path": "phantoms" if use_phantoms else str(data), "kind": "phantoms" if use_phantoms
                         else ("hippocampus" if Path(data).resolve() == HIPPOCAMPUS.resolve() else "user"),
                         "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan_kw.items()}}
    result["epochs"] = epochs
    best = max(epochs["speedup_ram"], epochs["speedup_disk"])
    result["target_cached_speedup"] = {
        "target": f">= {TARGET_SPEEDUP:g}x (MONAI reports about 13x for PersistentDataset)",
        "ram": epochs["speedup_ram"], "disk": epochs["speedup_disk"],
        "met_ram": epochs["speedup_ram"] >= TARGET_SPEEDUP, "met_disk": epochs["speedup_disk"] >= TARGET_SPEEDUP,
        "met": best >= TARGET_SPEEDUP, "on_hippocampus": result["dataset"]["kind"] == "hippocampus",
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
