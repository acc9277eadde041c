"""Wall-clock of whole fine-tuning runs (what one cell of the label-efficiency benchmark costs), as JSON.

Writes ``--n`` synthetic phantoms of ``--size``^3 voxels, then runs :func:`medcl.segment.run_finetune` (random
init, ``--labelled`` volumes, ``--test`` test cases) for every ``--threads`` value, and reports the median
training step time (a Lightning callback), the run's total seconds (setup + training + test inference +
metrics) and the test Dice.

Usage::

    python benchmarks/finetune_run.py --steps 100 --patch 32 --filters 16,32,64,128 --threads 1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from medcl.data import write_phantom_dataset
from medcl.segment.finetune import run_finetune
from medcl.segment.prepare import CaseSelection, finetune_config_from_dict


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--filters", default="16,32,64,128")
    ap.add_argument("--size", type=int, default=48, help="phantom grid size")
    ap.add_argument("--n", type=int, default=4, help="phantoms written")
    ap.add_argument("--labelled", type=int, default=2)
    ap.add_argument("--test", type=int, default=2)
    ap.add_argument("--threads", type=int, action="append", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    filters = [int(f) for f in args.filters.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_phantom_dataset(Path(tmp) / "ph", n=args.n, size=args.size, seed=0)
        ids = [f"phantom_{i:03d}" for i in range(args.n)]
        sel = CaseSelection(train=ids[: args.labelled], test=ids[args.labelled: args.labelled + args.test])
        for threads in args.threads or [1]:
            cfg = finetune_config_from_dict({
                "threads": threads, "backbone": {"filters": filters, "strides": [1] + [2] * (len(filters) - 1)},
                "sampling": {"patch_size": [args.patch] * 3, "batch_size": args.batch},
                "trainer": {"max_steps": args.steps, "ckpt_every": 50}})
            timer = StepTimer()
            t0 = time.perf_counter()
            res = run_finetune(cfg, data, Path(tmp) / f"run_t{threads}", selection=sel, device=args.device,
                               progress=False, callbacks=[timer], log=lambda s: None)
            total = time.perf_counter() - t0
            steps = timer.times[1:] or timer.times
            results.append({
                "threads": threads, "steps": args.steps, "patch": args.patch, "batch": args.batch, "filters": filters,
                "step_seconds_median": round(statistics.median(steps), 4),
                "train_seconds": round(sum(timer.times), 2), "run_seconds": round(total, 2),
                "test_dice": round(res.summary["test"]["dice_mean"], 3),
            })
    print(json.dumps({"device": args.device, "torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
