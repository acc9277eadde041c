"""Speed of the data floor on this machine, printed as JSON: phantom generation, first (decoding) and
second (cached) pass of a ``CaseDataset``.

Targets: 8 phantoms of 48^3 in well under 2 s; a cached epoch orders of magnitude faster than a decoding one.

Usage::

    python benchmarks/data_pipeline.py --n 8 --size 48 --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medcl.data import CaseDataset, PreprocessingPlan, load_manifest, make_phantom, write_phantom_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spacing", type=float, default=3.0, help="plan spacing in mm for the dataset passes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    gen = []
    for r in range(args.repeats):
        t = time.perf_counter()
        for s in range(args.n):
            make_phantom(r * 1000 + s, (args.size,) * 3)
        gen.append(time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        root = write_phantom_dataset(Path(tmp) / "ph", n=args.n, size=args.size, seed=0)
        write_s = time.perf_counter() - t
        m = load_manifest(root)
        plan = PreprocessingPlan.for_manifest(m, spacing=(args.spacing,) * 3, crop_foreground=True)
        passes = []
        for _ in range(2):
            ds = CaseDataset(m, plan, cache="disk", cache_dir=Path(tmp) / "cache")
            t = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            passes.append(time.perf_counter() - t)

    print(json.dumps({
        "n": args.n, "size": args.size, "threads": args.threads,
        "phantoms_generate_s_median": round(statistics.median(gen), 4),
        "phantoms_write_msd_s": round(write_s, 4),
        "dataset_first_pass_s": round(passes[0], 4),
        "dataset_cached_pass_s": round(passes[1], 4),
    }))


if __name__ == "__main__":
    main()
