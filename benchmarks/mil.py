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

Section ``epochs``: per-epoch training speed of ``medcl mil train``'s fit (:func:`medcl.mil.train.fit_head` with
the shipped ``configs/mil/{head}.yaml``), same seed, in three arms (:data:`ARMS`): ``before`` (``train.fast:
false, train.pack_instances: false``: every batch collated on the host, the instance MLP on every padded row:
medcl before fast training), ``fast_exact`` (the fold's bags preloaded on the device once, :mod:`medcl.mil.fast`;
padded MLP) and ``fast`` (preloaded, and the instance MLP on the real rows only: the default). Reported per head
and data set: epochs/s of each arm (the whole fit, preloading and feature statistics included, divided by
``--epochs``; the fastest of ``--repeats`` fits, arms interleaved), the speed-ups over ``before``, whether
``fast_exact`` trains the identical model (every weight and buffer bit for bit, the same probabilities on all
bags), how far ``fast``'s probabilities are from ``before``'s (float rounding) and whether it predicts the same
classes. Data: ``--epoch-data`` CSVs (default: MUSK1 from ``../shared/data/mil`` when present, else reported as
skipped) and ``musk2-sized``: synthetic bags of MUSK2's size (102 bags, 166 features, 1 to 1044 instances).

Section ``stacked``: cross-validation throughput in model-epochs/s (one model trained for one epoch) of
:func:`medcl.mil.stacked.fit_heads` on the 10 folds x ``--stack-seeds`` seeds of each ``--epoch-data`` set (the
fits ``medcl mil train`` runs, seed ``seed * 1000 + fold``), shipped configs of ``--stack-heads`` (``--set`` adds
overrides), in three arms: ``before`` and ``fast`` (the ``epochs`` arms: one fit at a time, timed on the first
``--stack-sample`` fits) and ``stacked`` (``train.stack_models`` = all the fits: one stacked model). Each arm's
time is the whole call (heads built, features preloaded) divided by its fits, the fastest of ``--repeats``, arms
interleaved; reported with the speed-ups and, for the sampled fits, the largest probability difference between the
stacked model and its one-by-one twin (``fast``: the same config; ``before``) on all bags and whether they predict
the same classes.

Usage::

    python benchmarks/mil.py --threads 1                  # CPU: a few minutes, about 3 GB peak
    python benchmarks/mil.py --device cuda --sizes 1000 10000 50000 100000
    python benchmarks/mil.py --sections epochs --threads 1 --device cpu --repeats 3 \
        --epoch-data ../shared/data/mil/musk1.csv musk2-sized \
        --epoch-heads abmil gated_abmil meanpool maxpool dsmil clam_sb transmil ins scmil   # about 10 minutes
    python benchmarks/mil.py --sections stacked --threads 1 --device cpu --repeats 2 --epochs 10 \
        --epoch-data ../shared/data/mil/musk1.csv musk2-sized                              # about 15 minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _memory import profiled_peak_mb  # benchmarks/ is on sys.path when a script runs

from medcl.config import load_config
from medcl.core.device import resolve_device
from medcl.mil.bags import Bag, BagDataset, load_bags
from medcl.mil.config import MILConfig
from medcl.mil.cv import stratified_group_kfold
from medcl.mil.heads import MILHead, build_head
from medcl.mil.stacked import fit_heads
from medcl.mil.train import evaluate, fit_head

ROOT = Path(__file__).resolve().parents[1]
MUSK1 = ROOT.parent / "shared" / "data" / "mil" / "musk1.csv"


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


def musk2_sized(seed: int = 0) -> BagDataset:
    """Synthetic bags of MUSK2's size: 102 bags of 166 Gaussian features, heavy-tailed bag sizes from 1 to 1044
    instances (one bag of 1044, as in MUSK2; about 6.2k instances in all against MUSK2's 6.6k), labels alternating.
    Speed depends on the sizes, not the values, so the features are noise."""
    g = np.random.default_rng(seed)
    sizes = np.clip(np.round(np.exp(g.normal(3.2, 1.2, 102))), 1, 1044).astype(int)
    sizes[0] = 1044
    bags = [Bag(id=f"bag{i}", label=i % 2, n=int(n), features=torch.from_numpy(g.normal(size=(n, 166)).astype(np.float32)))
            for i, n in enumerate(sizes)]
    return BagDataset(bags, ["0", "1"], 166, source="musk2-sized")


ARMS = {  # name: (train.fast, train.pack_instances)
    "before": (False, False),  # streaming, padded instance MLP: medcl before the fast path
    "fast_exact": (True, False),  # preloaded bags, padded instance MLP: must be bit-identical to "before"
    "fast": (True, True),  # preloaded bags, packed instance MLP (the default): equal up to float rounding
}


def epoch_case(head: str, ds: BagDataset, args: argparse.Namespace) -> dict:
    """Epochs/s of each arm of :data:`ARMS` for one head on ``ds`` (same seed), and how their models agree."""
    fits, probs, seconds = {}, {}, {arm: [] for arm in ARMS}
    for _ in range(args.repeats):  # arms interleaved, so that a busy spell of the machine hits all of them
        for arm, (fast, pack) in ARMS.items():
            cfg = load_config(MILConfig, ROOT / "configs" / "mil" / f"{head}.yaml",
                              [f"train.epochs={args.epochs}", f"train.fast={str(fast).lower()}",
                               f"train.pack_instances={str(pack).lower()}", f"device={args.device}",
                               f"threads={torch.get_num_threads()}"])
            fits[arm] = fit_head(cfg, ds, seed=args.seed)
            seconds[arm].append(fits[arm].seconds)
            probs[arm] = evaluate(fits[arm].head, ds, batch_size=cfg.train.batch_size).probs
    eps = {arm: args.epochs / min(s) for arm, s in seconds.items()}  # the least disturbed of the repeats
    ref, exact = fits["before"].head.state_dict(), fits["fast_exact"].head.state_dict()
    return {"head": head, "data": ds.source, "bags": len(ds), "instances": ds.n_instances, "epochs": args.epochs,
            "fast_path_used": fits["fast"].fast,
            **{f"epochs_per_second_{arm}": round(v, 3) for arm, v in eps.items()},
            "speedup_fast_exact": round(eps["fast_exact"] / eps["before"], 3),
            "speedup_fast": round(eps["fast"] / eps["before"], 3),
            "fast_exact_identical_weights": all(torch.equal(ref[k], exact[k]) for k in ref),
            "fast_exact_same_predictions": bool(np.array_equal(probs["before"], probs["fast_exact"])),
            "fast_max_abs_probability_difference": float(np.abs(probs["before"] - probs["fast"]).max()),
            "fast_same_predicted_classes": bool(np.array_equal(probs["before"].argmax(1), probs["fast"].argmax(1)))}


def section_epochs(args: argparse.Namespace) -> dict:
    datasets, skipped = epoch_datasets(args)
    rows = []
    for ds in datasets:
        for head in args.epoch_heads:
            row = epoch_case(head, ds, args)
            print(f"# {row}", file=sys.stderr, flush=True)
            rows.append(row)
    return {"rows": rows, "skipped": skipped,
            "fast_exact_all_identical": all(r["fast_exact_identical_weights"] and r["fast_exact_same_predictions"]
                                            for r in rows),
            "fast_all_same_classes": all(r["fast_same_predicted_classes"] for r in rows),
            "fast_max_abs_probability_difference": max((r["fast_max_abs_probability_difference"] for r in rows),
                                                       default=None)}


def cv_jobs(ds: BagDataset, seeds: int, folds: int = 10) -> list[tuple[BagDataset, int]]:
    """The (training bags, seed) of every seed and fold, as ``medcl mil train`` runs them (seed * 1000 + fold)."""
    labels = ds.labels.numpy()
    return [(ds.subset(np.setdiff1d(np.arange(len(ds)), test)), seed * 1000 + f)
            for seed in range(seeds) for f, test in enumerate(stratified_group_kfold(labels, folds, seed, None))]


def stacked_case(head: str, ds: BagDataset, args: argparse.Namespace) -> dict:
    """Model-epochs/s of the cross-validation's fits one by one (``before``, ``fast``) and stacked, and how far the
    stacked models are from the one-by-one ``fast`` (the same config) and ``before`` fits."""
    jobs = cv_jobs(ds, args.stack_seeds)
    sample = jobs[: args.stack_sample]  # one-by-one arms: a few fits are enough for a rate
    over = [f"train.epochs={args.epochs}", f"device={args.device}", f"threads={torch.get_num_threads()}", *args.set]
    cfgs = {arm: load_config(MILConfig, ROOT / "configs" / "mil" / f"{head}.yaml",
                             over + [f"train.fast={str(fast).lower()}", f"train.pack_instances={str(pack).lower()}",
                                     f"train.stack_models={len(jobs) if arm == 'stacked' else 0}"])
            for arm, (fast, pack) in {**{a: ARMS[a] for a in ("before", "fast")}, "stacked": (True, True)}.items()}
    seconds = {arm: [] for arm in cfgs}
    fits = {}
    for _ in range(args.repeats):  # arms interleaved, so that a busy spell of the machine hits all of them
        for arm, cfg in cfgs.items():
            t0 = time.perf_counter()
            fits[arm] = fit_heads(cfg, sample if arm != "stacked" else jobs)
            seconds[arm].append((time.perf_counter() - t0) / len(fits[arm]))
    rate = {arm: args.epochs / min(s) for arm, s in seconds.items()}
    probs = {arm: [evaluate(f.head, ds, batch_size=16).probs for f in fits[arm][: len(sample)]] for arm in fits}
    diff = {ref: max(float(np.abs(a - b).max()) for a, b in zip(probs["stacked"], probs[ref])) for ref in ("fast", "before")}
    same = {ref: all(np.array_equal(a.argmax(1), b.argmax(1)) for a, b in zip(probs["stacked"], probs[ref]))
            for ref in ("fast", "before")}
    return {"head": head, "data": ds.source, "bags": len(ds), "instances": ds.n_instances, "epochs": args.epochs,
            "overrides": list(args.set), "stacked_models": len(jobs), "compared_models": len(sample),
            **{f"model_epochs_per_second_{arm}": round(v, 3) for arm, v in rate.items()},
            "speedup_stacked_vs_before": round(rate["stacked"] / rate["before"], 3),
            "speedup_stacked_vs_fast": round(rate["stacked"] / rate["fast"], 3),
            "speedup_fast_vs_before": round(rate["fast"] / rate["before"], 3),
            "stacked_max_abs_probability_difference_vs_fast": diff["fast"],
            "stacked_same_predicted_classes_as_fast": same["fast"],
            "stacked_max_abs_probability_difference_vs_before": diff["before"],
            "stacked_same_predicted_classes_as_before": same["before"]}


def section_stacked(args: argparse.Namespace) -> dict:
    rows = []
    for ds in epoch_datasets(args)[0]:
        for head in args.stack_heads:
            row = stacked_case(head, ds, args)
            print(f"# {row}", file=sys.stderr, flush=True)
            rows.append(row)
    return {"rows": rows, "skipped": epoch_datasets(args)[1],
            "all_same_predicted_classes_as_fast": all(r["stacked_same_predicted_classes_as_fast"] for r in rows),
            "max_abs_probability_difference_vs_fast": max(
                (r["stacked_max_abs_probability_difference_vs_fast"] for r in rows), default=None)}


def epoch_datasets(args: argparse.Namespace) -> tuple[list[BagDataset], list[str]]:
    """The data sets of ``--epoch-data`` and the names that were not found."""
    datasets, skipped = [], []
    for name in args.epoch_data:
        if name == "musk2-sized":
            datasets.append(musk2_sized(args.seed))
        elif Path(name).is_file():
            datasets.append(load_bags(name))
        else:
            skipped.append(f"{name}: not found")
    return datasets, skipped


SECTIONS: dict[str, Callable[[argparse.Namespace], object]] = {"heads": section_heads, "epochs": section_epochs,
                                                              "stacked": section_stacked}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--heads", nargs="+", default=["abmil", "transmil"])
    p.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000, 50000])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1, help="bags per step (bags after the first are 25%% padding)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (median reported)")
    p.add_argument("--epoch-heads", nargs="+", default=["abmil", "transmil"],
                   help="section epochs: heads (configs/mil/HEAD.yaml; e.g. all: abmil gated_abmil meanpool maxpool "
                        "dsmil clam_sb transmil ins scmil)")
    p.add_argument("--epoch-data", nargs="+", default=[str(MUSK1)],
                   help="section epochs: instance-table CSVs and/or musk2-sized (synthetic; default: MUSK1 when "
                        "../shared/data is there)")
    p.add_argument("--epochs", type=int, default=10, help="section epochs: epochs per fit")
    p.add_argument("--seed", type=int, default=0, help="section epochs: the seed of every arm")
    p.add_argument("--repeats", type=int, default=3, help="section epochs: fits per arm (the fastest is reported)")
    p.add_argument("--stack-heads", nargs="+", default=["abmil", "gated_abmil", "meanpool", "maxpool"],
                   help="section stacked: heads (configs/mil/HEAD.yaml)")
    p.add_argument("--stack-seeds", type=int, default=3, help="section stacked: CV seeds (x 10 folds = stacked models)")
    p.add_argument("--stack-sample", type=int, default=3,
                   help="section stacked: fits of the one-by-one arms (timed and compared with their stacked twins)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="section stacked: config overrides for every arm (e.g. encoder.dropout=0)")
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
