"""Memory and time of the bounded local loss against the naive all-pairs version, and the cost of the
local loss in a whole training step; prints JSON.

Part 1, ``local``: two views per pair related by a shift + flip (large overlap), feature maps of
``S^3`` voxels (``S`` in ``--sizes``), 64 channels, batch ``B`` in ``--batches``, forward + backward.

* ``bounded``: :func:`medcl.losses.local_contrastive_loss`, ``K = --points`` points per pair, similarities
  ``[B, 2K, 2K]`` (both views as keys, Chaitanya et al.'s form).
* ``naive``: every feature voxel of view a is an anchor against every voxel position of view b (its
  corresponding point the positive, the rest beyond the radius negatives): similarities ``[B, V, V]``,
  ``V = S^3``, computed with the same InfoNCE core. (Chaitanya's both-view form would be ``[B, 2V, 2V]``,
  4x more; the one-view form keeps the naive run inside this shared machine's memory, so the reported
  ratio is conservative.)

Peak memory of one forward + backward, beyond the inputs: on CUDA ``torch.cuda.max_memory_allocated``;
on CPU the peak of live tensor bytes in the allocation timeline that ``torch.profiler`` records with
``profile_memory=True`` (every allocation and free of the CPU allocator, exact to the byte and blind to
allocator caching and thread-pool set-up, unlike the resident set size). ``largest_logits_mb`` is the
size of the one similarity matrix, for reference.

Part 2, ``step``: a small MONAI ``UNet`` (channels 8-16-32-64, 32 output feature channels), 48^3 views,
batch of 4 views (2 volumes x 2 views, shift + flip), AdamW. ``global``: G^R NT-Xent on pooled,
projected features. ``global+local``: plus the bounded local loss on the output feature map. Runs are
interleaved (A, B, A, B, ...) and medians reported, wall and process-CPU seconds.

On a shared CPU machine use ``--threads 1``: with more threads than free cores, OpenMP barriers stall
for up to seconds (a 30 ms loss call was measured at 1.5 s with 2 threads on 2 busy cores).

Usage::

    python benchmarks/losses.py --threads 1          # everything (CPU: about 10 minutes, 5 GB peak)
    python benchmarks/losses.py --part step --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _memory import profiled_peak_mb  # benchmarks/ is on sys.path when a script runs

from medcl.core.device import resolve_device
from medcl.losses import gr_masks, info_nce, local_contrastive_loss
from medcl.losses.local import read_features


def view_affines(b: int, shape: tuple[int, int, int], shift: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Affines of view pairs: b is a's box shifted by ``shift`` voxels and flipped along i."""
    a = torch.eye(4, dtype=torch.float64).repeat(b, 1, 1)
    bb = torch.eye(4, dtype=torch.float64)
    bb[0, 0] = -1.0
    bb[0, 3] = shape[0] - 1 + shift
    bb[1, 3] = shift
    bb[2, 3] = -shift
    return a, bb.repeat(b, 1, 1)


def naive_local_loss(feat_a, feat_b, affine_a, affine_b, shape, radius_mm, temperature=0.1):
    """Every feature voxel of a against every corresponding position in b: ``[B, V, V]`` similarities."""
    b, c, d, h, w = feat_a.shape
    stride = torch.tensor(shape, dtype=torch.float64) / torch.tensor([d, h, w], dtype=torch.float64)
    idx = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (d, h, w)], indexing="ij"), -1
    )
    pa = ((idx.reshape(-1, 3) + 0.5) * stride - 0.5)[None].expand(b, -1, 3)  # [B, V, 3] feature voxel centres
    m = torch.linalg.inv(affine_b) @ affine_a
    pb = pa @ m[:, :3, :3].transpose(1, 2) + m[:, None, :3, 3]
    za = feat_a.flatten(2).transpose(1, 2)  # [B, V, C]
    zb = read_features(feat_b, pb, shape)  # [B, V, C]
    mm = pa @ affine_a[:, :3, :3].transpose(1, 2) + affine_a[:, None, :3, 3]
    inside = ((pb >= -0.5) & (pb <= torch.tensor(shape, dtype=torch.float64) - 0.5)).all(-1)  # [B, V]
    near = torch.cdist(mm, mm) <= radius_mm  # [B, V, V]
    eye = torch.eye(za.shape[1], dtype=torch.bool)
    pos = eye & inside[:, None, :] & inside[:, :, None]
    exclude = (near & ~eye) | ~inside[:, None, :]
    return info_nce(za, zb, pos, exclude, temperature=temperature).loss


def _local_inputs(size: int, batch: int, channels: int, device: str):
    g = torch.Generator().manual_seed(0)
    view = (2 * size, 2 * size, 2 * size)  # stride-2 decoder map of a view twice its size
    fa = torch.randn(batch, channels, size, size, size, generator=g).to(device).requires_grad_()
    fb = torch.randn(batch, channels, size, size, size, generator=g).to(device).requires_grad_()
    a, b = view_affines(batch, view)
    return fa, fb, a.to(device), b.to(device), view


def _run_local(kind: str, fa, fb, a, b, view, points: int) -> None:
    if kind == "bounded":
        loss = local_contrastive_loss(
            fa, fb, a, b, view, n_points=points, radius_mm=2.0, generator=torch.Generator().manual_seed(0)
        ).loss
    else:
        loss = naive_local_loss(fa, fb, a, b, view, radius_mm=2.0)
    loss.backward()


def memory_case(kind: str, size: int, batch: int, channels: int, points: int, device: str) -> float:
    """Peak extra memory (MB) of one forward + backward of the loss."""
    fa, fb, a, b, view = _local_inputs(size, batch, channels, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run_local(kind, fa, fb, a, b, view, points)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return profiled_peak_mb(lambda: _run_local(kind, fa, fb, a, b, view, points))


def time_case(kind: str, size: int, batch: int, channels: int, points: int, device: str, repeats: int):
    fa, fb, a, b, view = _local_inputs(size, batch, channels, device)
    times = []
    for _ in range(repeats + 1):
        fa.grad = fb.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _run_local(kind, fa, fb, a, b, view, points)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def part_local(args) -> list[dict]:
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            row = {"size": size, "batch": batch, "channels": args.channels, "points": args.points}
            v = size**3
            row["largest_logits_mb"] = {
                "bounded": batch * (2 * args.points) ** 2 * 4 / 2**20,
                "naive": batch * v * v * 4 / 2**20,
            }
            for kind in ("bounded", "naive"):
                mem = memory_case(kind, size, batch, args.channels, args.points, args.device)
                row[f"{kind}_peak_mb"] = round(mem, 1)
                row[f"{kind}_s"] = round(
                    time_case(kind, size, batch, args.channels, args.points, args.device, args.local_repeats),
                    4,
                )
            row["memory_ratio_bounded_over_naive"] = round(
                row["bounded_peak_mb"] / max(row["naive_peak_mb"], 1e-9), 4
            )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def part_step(args) -> dict:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    dev = args.device
    net = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=32,
        channels=(8, 16, 32, 64),
        strides=(2, 2, 2),
        num_res_units=1,
    ).to(dev)
    proj = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).to(dev)
    opt = torch.optim.AdamW(list(net.parameters()) + list(proj.parameters()), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    vol = torch.randn(2, 1, 56, 56, 56, generator=g)
    s = 48
    va = vol[:, :, :s, :s, :s]
    vb = vol[:, :, 5 : 5 + s, 3 : 3 + s, 8 : 8 + s].flip(2)  # shifted + flipped copy, affine below
    x = torch.cat([va, vb]).to(dev)  # [4, 1, 48, 48, 48]: views 0, 1 of volumes 0, 1; then their second views
    a = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    b = torch.eye(4, dtype=torch.float64)
    b[0, 0], b[0, 3], b[1, 3], b[2, 3] = -1.0, 5.0 + s - 1, 3.0, 8.0
    b = b.repeat(2, 1, 1)
    a, b = a.to(dev), b.to(dev)
    src = torch.tensor([0, 1, 0, 1], device=dev)
    uid = torch.arange(4, device=dev)
    pos, excl = gr_masks(src, uid, src, uid)

    def step(with_local: bool) -> tuple[float, float]:
        if dev == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        feat = net(x)  # [4, 32, 48, 48, 48]
        z = proj(F.adaptive_avg_pool3d(feat, 1).flatten(1))
        loss = info_nce(z, z, pos, excl, temperature=0.1).loss
        if with_local:
            loss = (
                loss
                + local_contrastive_loss(
                    feat[:2],
                    feat[2:],
                    a,
                    b,
                    (s, s, s),
                    n_points=args.points,
                    generator=torch.Generator().manual_seed(0),
                ).loss
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    step(False), step(True)  # warm-up
    res = {"global": [], "global+local": []}
    for _ in range(args.repeats):
        res["global"].append(step(False))
        res["global+local"].append(step(True))
    out = {
        k: {
            "wall_s": round(statistics.median(t for t, _ in v), 4),
            "cpu_s": round(statistics.median(c for _, c in v), 4),
        }
        for k, v in res.items()
    }
    out["ratio_wall"] = round(out["global+local"]["wall_s"] / out["global"]["wall_s"], 4)
    out["ratio_cpu"] = round(out["global+local"]["cpu_s"] / out["global"]["cpu_s"], 4)
    out.update(size=s, batch_views=4, points=args.points, repeats=args.repeats)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "local", "step"], default="all")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--points", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7, help="training-step repeats per variant")
    p.add_argument("--local-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    args.device = str(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "memory_method": "cuda.max_memory_allocated"
        if args.device == "cuda"
        else "torch.profiler allocation timeline (profile_memory): peak of live CPU tensor bytes",
    }
    if args.part in ("all", "local"):
        rows = part_local(args)
        report["local"] = rows
        big = [r for r in rows if r["size"] == 16 and r["batch"] == 8]
        if big:
            report["target_memory_16cubed_batch8"] = {
                "ratio": big[0]["memory_ratio_bounded_over_naive"],
                "target": "<= 0.1",
                "met": big[0]["memory_ratio_bounded_over_naive"] <= 0.1,
            }
    if args.part in ("all", "step"):
        st = part_step(args)
        report["step"] = st
        report["target_step"] = {
            "ratio_wall": st["ratio_wall"],
            "ratio_cpu": st["ratio_cpu"],
            "target": "<= 1.2",
            "met": st["ratio_wall"] <= 1.2,
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
