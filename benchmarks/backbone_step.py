"""Step time of a backbone on this machine: forward + backward + AdamW, printed as JSON.

Reports wall-clock seconds (median of ``--repeats``) and process CPU seconds; on a shared machine the
CPU time of a ``--threads 1`` run is the steadier measure of the work itself.

Modes (what a pretraining step back-propagates through):

* ``full``: the whole U-Net, loss on the logits-resolution decoder map (fine-tuning-like, joint gd+local).
* ``encoder``: encoder + bottleneck only (``upto="bottleneck"``): the global (G^R / G^D) stage.
* ``local``: encoder frozen (run under ``no_grad``), decoder up to ``--local-stage`` trained: the local stage
  of Chaitanya et al. 2020.

Usage::

    python benchmarks/backbone_step.py --size 48 --batch 4 --threads 2 --repeats 7 \
        --filters 16,32,64,128 --filters 8,16,32,64 --modes full,encoder,local
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from medcl.models import BackboneConfig, build_backbone
from medcl.models.backbone import count_parameters


def step_times(filters: tuple[int, ...], mode: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of ``args.repeats`` steps (after one warm-up step)."""
    torch.manual_seed(0)
    strides = (1,) + (2,) * (len(filters) - 1)
    net = build_backbone(BackboneConfig(filters=filters, strides=strides, res_block=args.res_block))
    net.train()
    local_stage = args.local_stage if args.local_stage in net.decoder_stage_names else net.decoder_stage_names[-1]
    params = [p for n, p in net.named_parameters() if mode != "local" or n.startswith("decoder.")]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.batch, 1, args.size, args.size, args.size)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    times, cpu = [], []
    for _ in range(args.repeats + 1):  # the first call warms up oneDNN kernels and is dropped
        t0, c0 = time.perf_counter(), time.process_time()
        with amp:
            if mode == "encoder":
                y = net(x, upto="bottleneck").bottleneck
            elif mode == "local":
                with torch.no_grad():
                    enc, bott = net.encode(x)
                y = net.decode(enc, bott, upto=local_stage)[0][-1]
            else:
                y = net(x, upto=net.decoder_stage_names[-1]).decoder[-1]
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times[1:], cpu[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--filters", action="append", help="comma-separated, repeatable; default: the config default")
    ap.add_argument("--modes", default="full,encoder,local")
    ap.add_argument("--local-stage", default="decoder.1")
    ap.add_argument("--res-block", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on CPUs with avx512_bf16/AMX)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    choices = [tuple(int(c) for c in f.split(",")) for f in (args.filters or [])] or [BackboneConfig().filters]
    results = []
    for filters in choices:
        strides = (1,) + (2,) * (len(filters) - 1)
        n_params = count_parameters(build_backbone(BackboneConfig(filters=filters, strides=strides)))
        for mode in args.modes.split(","):
            ts, cpu = step_times(filters, mode, args)
            med = statistics.median(ts)
            results.append(
                {
                    "filters": list(filters),
                    "mode": mode,
                    "params": n_params,
                    "median_s": round(med, 4),
                    "min_s": round(min(ts), 4),
                    "times_s": [round(t, 4) for t in ts],
                    "median_cpu_s": round(statistics.median(cpu), 4),
                    "voxels_per_s": round(args.batch * args.size**3 / med),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    summary = {
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
