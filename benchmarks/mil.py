"""MIL benchmarks; prints JSON. Sections are functions taking the parsed arguments and returning a JSON-able
value, registered in ``SECTIONS`` (add new ones there, e.g. whole-slide tile reading).

Section ``heads``: training throughput (bags/s) and peak memory of one training step (forward, backward,
AdamW step) of ABMIL and TransMIL on bags of 1k, 10k and 50k instances of 1024-d features (the size of
ResNet-50 / UNI patch features), with the paper-sized heads: ABMIL with an instance MLP ``[512, 256]`` and
attention width 128; TransMIL with ``dim`` 512, 8 heads, 256 landmarks (Shao et al.). Memory should grow
linearly with the bag size: ABMIL is linear by construction and TransMIL's masked Nystrom attention keeps
``N x m`` kernels, never ``N x N``; ``linearity`` reports ``peak(50k) / peak(10k)`` (5.0 = linear) and the
memory per 1k instances.

Peak memory beyond the inputs: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak of live tensor
bytes in the allocation timeline ``torch.profiler`` records with ``profile_memory=True`` (exact, blind to
allocator caching). Throughput: median over ``--steps`` timed steps after one warm-up step.

Usage::

    python benchmarks/mil.py --threads 1                  # CPU: a few minutes, about 3 GB peak
    python benchmarks/mil.py --device cuda --sizes 1000 10000 50000 100000
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _memory import profiled_peak_mb  # benchmarks/ is on sys.path when a script runs

from medcl.core.device import resolve_device
from medcl.mil.config import MILConfig
from medcl.mil.heads import MILHead, build_head


def make_head(kind: str, dim: int, n_classes: int = 2) -> MILHead:
    """The benchmarked head with paper-sized settings (see the module docstring)."""
    cfg = MILConfig(head=kind)
    if kind == "transmil":
        cfg.encoder.hidden = []
        cfg.transmil.dim, cfg.transmil.heads, cfg.transmil.landmarks = 512, 8, 256
    else:
        cfg.encoder.hidden = [512, 256]
    return build_head(cfg, dim, n_classes)


def training_step(head: MILHead, opt: torch.optim.Optimizer, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor):
    out = head(x, mask)
    loss = head.loss(out, y)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_case(kind: str, n: int, dim: int, batch: int, steps: int, device: str) -> dict:
    """Bags/s and peak memory of training ``kind`` on ``batch`` bags of ``n`` instances."""
    torch.manual_seed(0)
    head = make_head(kind, dim).to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    x = torch.randn(batch, n, dim, device=device)
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    mask[1:, n - n // 4 :] = False  # bags after the first are 25% padding, as in a real padded batch
    y = torch.arange(batch, device=device) % 2
    step = lambda: training_step(head, opt, x, mask, y)  # noqa: E731
    step()  # warm-up (optimizer state allocated)
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = profiled_peak_mb(step)
    sec = statistics.median(times)
    return {"head": kind, "instances_per_bag": n, "batch": batch, "dim": dim, "seconds_per_step": round(sec, 4),
            "bags_per_second": round(batch / sec, 3), "peak_memory_mb": round(peak, 1)}


def linearity(rows: list[dict]) -> dict:
    """Per head: peak(largest) / peak(second largest) against the size ratio, and MB per 1k instances."""
    out = {}
    for head in sorted({r["head"] for r in rows}):
        rs = sorted((r for r in rows if r["head"] == head), key=lambda r: r["instances_per_bag"])
        if len(rs) < 2:
            continue
        a, b = rs[-2], rs[-1]
        out[head] = {
            "sizes": [a["instances_per_bag"], b["instances_per_bag"]],
            "size_ratio": round(b["instances_per_bag"] / a["instances_per_bag"], 2),
            "memory_ratio": round(b["peak_memory_mb"] / max(a["peak_memory_mb"], 1e-9), 2),
            "mb_per_1k_instances": round(1000 * (b["peak_memory_mb"] - a["peak_memory_mb"])
                                         / (b["instances_per_bag"] - a["instances_per_bag"]), 2),
        }
    return out


def section_heads(args: argparse.Namespace) -> dict:
    rows = []
    for kind in args.heads:
        for n in args.sizes:
            row = bench_case(kind, n, args.dim, args.batch, args.steps, args.device)
            print(f"# {row}", file=sys.stderr, flush=True)
            rows.append(row)
    return {"rows": rows, "linearity": linearity(rows)}


SECTIONS: dict[str, Callable[[argparse.Namespace], object]] = {"heads": section_heads}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--heads", nargs="+", default=["abmil", "transmil"])
    p.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000, 50000])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1, help="bags per step (bags after the first are 25%% padding)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (median reported)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.device = str(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": args.device,
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
    }
    for name in args.sections:
        result[name] = SECTIONS[name](args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
