"""Time of the SSL view samplers on CPU (or a GPU with ``--device cuda``), printed as JSON.

The reference case of the contrastive-core issue: one batch of 4 volumes of 48^3 voxels, 4 partitions
x 2 views (G^D), with the default augmentation (flips, rotations, scaling with probability 0.5, MONAI-style
intensity augmentation); plus G^R, VoCo and the SSIM-mined pair sampler for scale.

Usage::

    python benchmarks/views.py --threads 1 --repeats 20 --crop 24 --crop 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from medcl.core.provenance import ViewBatch
from medcl.engine.seeding import generator_for
from medcl.views import (
    CropSpec,
    CrossVolumePairSampler,
    PartitionViewSampler,
    PositionViewSampler,
    RandomViewSampler,
    SourceVolume,
    SSIMMatcher,
)


def volumes(n: int, size: int, device: str) -> list[SourceVolume]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        img = torch.randn(1, size, size, size, generator=g).to(device)
        box = torch.tensor([[size // 6] * 3, [size - size // 6] * 3])
        out.append(SourceVolume(img, torch.eye(4, dtype=torch.float64), box, i))
    return out


def timed(fn, repeats: int, device: str) -> dict[str, float]:
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a DataLoader worker uses 1)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--crop", type=int, action="append", help="cubic crop sizes (default 24 and 32)")
    parser.add_argument("--size", type=int, default=48, help="volume side in voxels")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vols = volumes(4, args.size, args.device)
    results = []
    for crop in args.crop or [24, 32]:
        spec = CropSpec(crop)
        samplers = {
            "partition_4x2": PartitionViewSampler(spec, partitions=4, n_aug=1),
            "random_2": RandomViewSampler(spec, n_views=2),
        }
        for name, sampler in samplers.items():
            g = generator_for(0, 0, 0)
            stats = timed(lambda s=sampler, g=g: ViewBatch.cat([s(v, g) for v in vols]), args.repeats, args.device)
            n_views = len(ViewBatch.cat([sampler(v, g) for v in vols]))
            results.append({"sampler": name, "crop": crop, "volumes": 4, "views": n_views, **stats})
    voco = PositionViewSampler()
    g = generator_for(0, 0, 1)
    results.append(
        {"sampler": "voco_2x2x2_16", "crop": 16, "volumes": 4, "views": 48,
         **timed(lambda: ViewBatch.cat([voco(v, g) for v in vols]), args.repeats, args.device)}
    )
    pair = CrossVolumePairSampler(CropSpec(16), n_crops=4, matcher=SSIMMatcher(radius=1, step=4))
    g = generator_for(0, 0, 2)
    results.append(
        {"sampler": "ssim_pairs_27_candidates", "crop": 16, "volumes": 2, "views": 8,
         **timed(lambda: pair(vols[0], vols[1], g), args.repeats, args.device)}
    )
    print(json.dumps({
        "device": args.device,
        "threads": args.threads,
        "volume": [args.size] * 3,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
