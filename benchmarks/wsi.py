"""Tile-reading throughput: DataLoader workers against a single-process read loop (prints JSON).

    python benchmarks/wsi.py [--slide S.svs] [--workers 1 2 4] [--repeats 3] [--mpp 0.5] [--size 256]

The slide is tiled with ``medcl.wsi.tiling`` (tissue threshold 0, overlap half a tile, so the benchmark
reads many tiles even from a small slide); then every tile is read ``repeats`` times by (a) a plain loop in
this process and (b) ``torch.utils.data.DataLoader`` with each worker count (each worker opens its own
slide handle). Reported: tiles/s and the speed-up over the loop. Without ``--slide`` it uses
``../shared/data/wsi/CMU-1-Small-Region.svs`` when present, else writes a synthetic pyramidal TIFF.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def synthetic_slide(path: Path) -> Path:
    """A 4096 x 4096 tiled JPEG pyramid (0.25 / 0.5 / 1.0 um/px) with H&E-like texture."""
    import tifffile

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:4096, 0:4096]
    tex = (30 * np.sin(xx / 13.0) * np.cos(yy / 17.0))[..., None]
    base = np.clip(np.array([190, 110, 175]) + tex + rng.normal(0, 10, (4096, 4096, 3)), 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for i, f in enumerate((1, 2, 4)):
            lv = base if f == 1 else base.reshape(4096 // f, f, 4096 // f, f, 3).mean(axis=(1, 3)).astype(np.uint8)
            mpp = 0.25 * f
            tw.write(lv, tile=(256, 256), photometric="rgb", compression="jpeg", subfiletype=int(i > 0),
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def bench_tile_reading(
    slide: Path, workers: list[int], repeats: int = 3, mpp: float = 0.5, size: int = 256, batch_size: int = 32
) -> dict:
    """tiles/s of the single-process loop and of the DataLoader per worker count."""
    from medcl.wsi.extract import TileDataset, tile_loader
    from medcl.wsi.tile_io import load_tile_set
    from medcl.wsi.tiling import TilingParams, tile_slides

    with tempfile.TemporaryDirectory() as tmp:
        params = TilingParams(mpp=mpp, size=size, overlap=size // 2, tissue_threshold=0.0, thumbnail_size=1024)
        res = tile_slides([slide], tmp, params, force=True, progress=False, verbose=False)
        if res[0].status != "done":
            raise SystemExit(f"tiling failed: {res[0].message}")
        ts = load_tile_set(Path(tmp) / f"{res[0].slide_id}.h5")
        n = len(ts.coords) * repeats

        ds = TileDataset([ts])
        ds.read(0)  # open the handle outside the timing, as a worker does before its first batch
        t0 = time.perf_counter()
        for _ in range(repeats):
            for i in range(len(ts.coords)):
                ds.read(i)
        single = n / (time.perf_counter() - t0)
        ds.close()

        out = {
            "slide": str(slide),
            "tiles": len(ts.coords),
            "repeats": repeats,
            "tile_size": size,
            "mpp": mpp,
            "read_size": ts.read_size,
            "level": ts.level,
            "backend": str(ts.attrs.get("backend")),
            "single_process_tiles_per_s": round(single, 1),
            "dataloader_tiles_per_s": {},
            "speedup": {},
        }
        for w in workers:
            ds = TileDataset([ts])
            loader = tile_loader(ds, batch_size, w, torch.device("cpu"))
            t0 = time.perf_counter()  # includes worker start-up, as a user pays it once per slide
            count = 0
            for _ in range(repeats):
                for batch in loader:
                    count += len(batch["index"])
            rate = count / (time.perf_counter() - t0)
            out["dataloader_tiles_per_s"][f"workers={w}"] = round(rate, 1)
            out["speedup"][f"workers={w}"] = round(rate / single, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", default=None)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.slide:
            slide = Path(args.slide)
        elif DEFAULT_SLIDE.is_file():
            slide = DEFAULT_SLIDE
        else:
            slide = synthetic_slide(Path(tmp) / "synthetic.tif")
        result = bench_tile_reading(slide, args.workers, args.repeats, args.mpp, args.size)
    result["cpu_count"] = os.cpu_count()
    result["platform"] = platform.platform()
    json.dump({"tile_reading": result}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
