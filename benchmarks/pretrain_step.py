"""Pretraining step benchmark: steps/s and voxels/s per method, peak memory, pipeline overhead.

For each method (a config in ``configs/pretrain/``) the same Lightning loop runs twice:

* **in-memory**: one batch of views, sampled beforehand, served again and again (no data work at all);
* **pipeline**: the real stream (cached preprocessed volumes -> view sampling in DataLoader workers).

``pipeline / in-memory`` step-time ratio near 1 means the data pipeline keeps up with the model.
Views are ``--size`` voxels a side (48 on CPU, 96 on GPU by default); ``--views`` views per step ("batch").
On GPU the step's FLOPs are counted once (``torch.utils.flop_counter``) and the model FLOPs utilisation
(MFU) is reported against ``--peak-tflops`` (H100 SXM dense bf16: 989).

    python benchmarks/pretrain_step.py                       # CPU defaults
    python benchmarks/pretrain_step.py --device cuda --size 96 --views 8 --steps 30
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcl.core.device import resolve_device  # noqa: E402
from medcl.pretrain.run import resolve_config  # noqa: E402

METHOD_FILES = {"gd": "gd", "gd+local": "gd_local", "gd+local-joint": "gd_local_joint", "voco": "voco", "anatomical": "anatomical", "gr": "gr", "structural": "structural"}


def method_overrides(method: str, size: int, views: int) -> list[str]:
    """Shape a method so that one step sees about ``views`` views of ``size``^3 voxels."""
    half = size // 2
    if method in ("gd", "gd+local", "gd+local-joint"):
        parts = max(1, views // 2)
        return [f"views.partition.crop=[{size},{size},{size}]", f"views.partition.partitions={parts}", "data.volumes_per_step=1"]
    if method == "gr":
        return [f"views.random.crop=[{size},{size},{size}]", f"data.volumes_per_step={max(1, views // 2)}"]
    if method == "voco":  # base grid 2x2x2 of size/2 crops covers size^3; + 4 random crops
        return [f"views.position.crop=[{half},{half},{half}]", "data.volumes_per_step=1"]
    if method in ("anatomical", "structural"):
        n = max(1, views // 2)
        out = [f"views.pairs.crop=[{size},{size},{size}]", f"views.pairs.crops_per_volume={n}", "data.volumes_per_step=1"]
        if method == "anatomical":
            out += ["views.pairs.candidates=4", f"views.masked.crop=[{size},{size},{size}]"]
        return out
    raise SystemExit(f"unknown method {method!r}; choose from {sorted(METHOD_FILES)}")


def run_method(method: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L

    from medcl.data import CaseDataset, load_manifest
    from medcl.engine.trainer import TrainerConfig, make_trainer, resolve_accelerator, use_channels_last
    from medcl.pretrain.data import PretrainStream, collate_views, render_views
    from medcl.pretrain.module import PretrainModule
    from medcl.pretrain.run import _StepTimer

    cfg = resolve_config(
        ROOT / "configs" / "pretrain" / f"{METHOD_FILES[method]}.yaml",
        method_overrides(method, args.size, args.views) + ["data.probe_volumes=0", "optim.lr_warmup_steps=0"],
        max_steps=args.steps,
    )
    manifest = load_manifest(data)
    volumes = CaseDataset(manifest, cfg.data.plan, with_label=False, cache="ram")
    for i in range(len(volumes)):
        volumes[i]
    view_sets = sorted({t.views for t in cfg.terms.values()})
    stream = PretrainStream(volumes, cfg, view_sets)
    accel = resolve_accelerator(args.device)
    results: dict[str, Any] = {"method": method}

    class Fixed(torch.utils.data.Dataset):
        def __init__(self, item):
            self.item = item

        def __len__(self):
            return 1 << 30

        def __getitem__(self, i):
            return self.item

    for mode in ("in_memory", "pipeline"):
        L.seed_everything(0, verbose=False)
        module = PretrainModule(cfg, {}, channels_last=use_channels_last(cfg.trainer, accel) and not args.no_channels_last)
        if args.compile:
            module.backbone.compile()
        tcfg = TrainerConfig(
            max_steps=args.steps, ckpt_every=0, log_every=max(1, args.steps), num_workers=args.workers, precision=args.precision
        )
        timer = _StepTimer()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(tcfg, tmp, args.device, callbacks=[timer.callback], enable_progress_bar=False)
            if accel == "gpu":
                torch.cuda.reset_peak_memory_stats()
            trainer.fit(module, datamodule=_datamodule(mode, trainer, cfg, stream, args, accel, Fixed))

        t = timer.times[max(1, len(timer.times) // 5):]  # drop warm-up (first fifth)
        med = sorted(t)[len(t) // 2]
        phases = {}
        if cfg.phases:  # staged methods: each phase's own median (first two steps of a phase dropped)
            start = 0
            for i, ph in enumerate(cfg.phases):
                end = round(ph.until * args.steps)
                pt = sorted(timer.times[start + 2 : end]) or sorted(timer.times[start:end])
                if pt:
                    phases[f"phase{i}_" + "+".join(ph.terms or list(cfg.terms))] = pt[len(pt) // 2]
                start = end
        batch = render_views(collate_views([stream[i] for i in range(cfg.data.volumes_per_step)]))
        voxels = sum(vb.views[:, :1].numel() for vb in batch["views"].values())
        results[mode] = {"step_s": med, "steps_per_s": 1.0 / med, "voxels_per_s": voxels / med, **phases}
        results["views_per_step"] = sum(len(vb) for vb in batch["views"].values())
        results["voxels_per_step"] = voxels
        if accel == "gpu":
            results[mode]["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    results["pipeline_over_in_memory"] = results["pipeline"]["step_s"] / results["in_memory"]["step_s"]
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if accel == "gpu" and args.peak_tflops > 0:
        results["tflop_per_step"] = count_step_flops(cfg, stream, accel) / 1e12
        results["mfu"] = results["tflop_per_step"] / results["in_memory"]["step_s"] / args.peak_tflops
    return results


def _datamodule(mode: str, trainer: Any, cfg: Any, stream: Any, args: argparse.Namespace, accel: str, fixed: type):
    """The stream (``pipeline``) or one pre-sampled batch served forever (``in_memory``)."""
    import lightning as L

    from medcl.engine.stream import StreamLoader, StreamSampler
    from medcl.pretrain.data import collate_views

    class DM(L.LightningDataModule):
        def train_dataloader(self):
            sampler = StreamSampler(cfg.data.volumes_per_step, args.steps, trainer.world_size, trainer.global_rank)
            if mode == "in_memory":
                batch = collate_views([stream[i] for i in range(cfg.data.volumes_per_step)])
                return StreamLoader(fixed(batch), sampler, collate_fn=lambda items: items[0], num_workers=0)
            w = args.workers
            return StreamLoader(
                stream, sampler, collate_fn=collate_views, num_workers=w, persistent_workers=w > 0,
                pin_memory=accel == "gpu", prefetch_factor=4 if w > 0 else None,
            )

    return DM()


def count_step_flops(cfg, stream, accel: str) -> float:
    """FLOPs of forward + backward of one training step (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from medcl.pretrain.data import collate_views, render_views
    from medcl.pretrain.module import PretrainModule
    from medcl.pretrain.terms import StepContext

    module = PretrainModule(cfg, {}).cuda()
    batch = render_views(collate_views([stream[i] for i in range(cfg.data.volumes_per_step)]))
    views = {k: v.to("cuda") for k, v in batch["views"].items()}
    uid = {k: v.cuda() for k, v in batch["uid"].items()}
    active, _ = module.phase_at(0)
    with FlopCounterMode(display=False) as fc:
        student = {s: module.backbone(views[s].views, upto=module._upto(s, active)) for s in views}
        ctx = StepContext(views=views, uid=uid, student=student, teacher=None, generator=torch.Generator(), step=0)
        total = sum(module.terms[n].cfg.weight * module.terms[n].compute(ctx)[0] for n in active if not module.terms[n].cfg.queue)
        total.backward()
    return float(fc.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="gd,gd+local,gd+local-joint,voco,anatomical")
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=None, help="view edge in voxels (48 CPU, 96 GPU)")
    p.add_argument("--views", type=int, default=4, help="views per step")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--data", help="dataset (default: synthetic phantoms, 2 x size a side)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = resolve_device(args.device).type == "cuda"
    args.size = args.size or (96 if on_gpu else 48)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else None
        if data is None:
            from medcl.data import write_phantom_dataset

            data = write_phantom_dataset(Path(tmp) / "ph", n=6, size=2 * args.size, seed=0)
        t0 = time.time()
        rows = [run_method(m.strip(), data, args) for m in args.methods.split(",") if m.strip()]
    out = {
        "benchmark": "pretrain_step",
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "threads": torch.get_num_threads(),
        "size": args.size,
        "views": args.views,
        "steps": args.steps,
        "seconds": time.time() - t0,
        "methods": rows,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
