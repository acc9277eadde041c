"""GPU check: what medcl's pretraining and fine-tuning cost on one GPU, in one short command.

    python benchmarks/gpu_check.py --out runs/gpu_check.json            # about 4 minutes on one H100
    python benchmarks/gpu_check.py --out F --only pipeline,mfu          # rerun a subset (others kept in F)
    python benchmarks/gpu_check.py --smoke --peak-tflops 1 --out F      # the same code paths, tiny, on the CPU

Network: DynUNet with nnU-Net's default filters (32-64-128-256-320-320, strides 1-2-2-2-2-2) on 128^3 views,
2 volumes x 2 views per step, for two recipes: ``gd+local`` (``configs/pretrain/gd_local_joint.yaml``: the
global G^D term on the bottleneck and the local term on the stride-2 decoder map, both every step) and ``mae``
(``configs/pretrain/mae.yaml``, 75% of the blocks masked, blocks of the network's total stride). Figures
(``--only`` names):

* ``env`` -- device, versions, the defaults medcl picks there (precision, channels-last, cudnn.benchmark);
* ``matmul`` -- the measured dense bf16 matmul rate (TFLOP/s) of this GPU;
* ``step_bf16_cl``, ``step_fp32``, ``step_bf16``, ``step_bf16_cl_nobench``, ``step_compile`` -- the median
  Lightning training step with one batch kept on the GPU (no data work), per precision / memory format,
  with and without ``cudnn.benchmark`` (medcl's default on GPUs), and with ``torch.compile`` (compile time:
  the first step's excess, reported apart); peak GPU memory of each;
* ``pipeline`` -- the real pipeline over the in-memory step: 16 synthetic CT-sized volumes (256 x 256 x 160)
  written as NIfTI, preprocessed into the on-disk cache, served by the job's own loader (default workers,
  pinned memory, persistent workers; views rendered on the GPU after the transfer);
* ``mfu`` -- FLOPs of one forward + backward (``torch.utils.flop_counter``) over the step time and the GPU's
  dense bf16 peak (a small table, or ``--peak-tflops``), also against the measured matmul rate; where the
  step's GPU time goes (convolutions, normalisation, the rest; ``torch.profiler``);
* ``finetune`` -- a fine-tuning step (128^3 patches, batch 2, Dice + CE);
* ``inference`` -- sliding-window inference of a 256 x 256 x 160 volume (volumes/s), as medcl runs it (fp32)
  and under bf16 autocast;
* ``mil_extract`` -- patch-feature extraction (tiles/s, 256 px tiles, bf16) with the built-in CNN and a timm
  ViT-S/16 (random weights; skipped without timm).

The JSON goes to ``--out`` after every figure (atomically: a timeout leaves the figures measured so far); a
figure that cannot be measured is ``{"skipped": reason}`` (``{"error": ...}`` if it failed). A markdown table
goes to stdout and beside the JSON (``.md``). The whole check keeps to ``--budget`` seconds (240): figures
left when it is spent are skipped, naming ``--only``. ``--smoke`` runs every figure at tiny sizes on the CPU
(what CI runs; ``torch.compile`` then uses the ``eager`` backend).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from medcl.core.files import atomic_write_json, atomic_write_text  # noqa: E402

FIGURES = (
    "env", "matmul", "step_bf16_cl", "pipeline", "mfu", "step_fp32", "step_bf16", "step_bf16_cl_nobench",
    "finetune", "inference", "mil_extract", "step_compile",
)
METHODS = {"gd+local": "gd_local_joint.yaml", "mae": "mae.yaml"}

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets (first match wins).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("GH200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 6000 Ada", 365.0), ("A6000", 155.0),
)


class Skip(Exception):
    """A figure that cannot be measured here (recorded as ``{"skipped": reason}``)."""


@dataclass
class Sizes:
    """Everything that differs between the GPU check and ``--smoke``."""

    filters: tuple[int, ...] = (32, 64, 128, 256, 320, 320)
    strides: tuple[int, ...] = (1, 2, 2, 2, 2, 2)
    crop: int = 128
    volumes_per_step: int = 2
    warmup: int = 3
    steps: int = 8
    volume: tuple[int, int, int] = (256, 256, 160)
    n_volumes: int = 16
    workers: int | None = None  # None: the recipe's trainer.num_workers
    ft_patch: int = 128
    ft_batch: int = 2
    roi: int = 128
    tile: int = 256
    tile_batch: int = 128
    tile_batches: int = 8
    vit_size: int = 224
    matmul: int = 8192
    compile_backend: str = "inductor"
    profile_steps: int = 3


SMOKE = Sizes(filters=(8, 16, 32), strides=(1, 2, 2), crop=16, warmup=1, steps=2, volume=(40, 40, 24), n_volumes=4,
              workers=1, ft_patch=16, roi=16, tile=32, tile_batch=8, tile_batches=2, vit_size=32, matmul=256,
              compile_backend="eager", profile_steps=1)


# --------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def _cudnn_benchmark():
    """Restore ``torch.backends.cudnn.benchmark`` after the block (a figure may switch it off)."""
    before = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def _clean(obj: Any) -> Any:
    """Non-finite floats as ``null`` (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _finite(obj)


def synthetic_ct(seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """``[X, Y, Z]`` int16 CT-like volume: a body ellipsoid of smooth soft tissue in air, denser blobs."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 1, *(max(2, s // 16) for s in shape), generator=g)
    field = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0]
    axes = [torch.linspace(-1, 1, s) for s in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 < 1.0
    hu = torch.where(body, 40 + 60 * field + 500 * (field > 1.2).float(), torch.full_like(field, -1000.0))
    return (hu + 10 * torch.randn(shape, generator=g)).round().to(torch.int16)


class ListVolumes(torch.utils.data.Dataset):
    """In-memory ``CaseDataset``-like items (image, affine, id) of synthetic volumes."""

    def __init__(self, n: int, shape: tuple[int, int, int]) -> None:
        aff = torch.diag(torch.tensor([0.8, 0.8, 2.0, 1.0], dtype=torch.float64))
        self.items = []
        for i in range(n):
            img = synthetic_ct(i, shape).float()[None]
            img = (img - img.mean()) / img.std()
            self.items.append({"image": img, "affine": aff, "fg_box": None, "id": f"syn{i}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class Repeat(torch.utils.data.Dataset):
    """One batch, ``n`` times (the in-memory step: the batch stays on the GPU)."""

    def __init__(self, batch: Any, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.batch


# --------------------------------------------------------------------------------------------- the check
class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        from medcl.core.device import resolve_device

        self.args = args
        self.sizes = SMOKE if args.smoke else Sizes()
        if args.steps:
            self.sizes = replace(self.sizes, steps=args.steps)
        if args.workers is not None:
            self.sizes = replace(self.sizes, workers=args.workers)
        self.device = torch.device("cpu") if args.smoke else resolve_device(args.device)
        self.devname = "cpu" if self.device.type == "cpu" else str(self.device)
        self.out = Path(args.out) if args.out else None
        self.t0 = time.perf_counter()
        self.tmp = tempfile.TemporaryDirectory(prefix="medcl-gpu-check-", dir=args.workdir)
        self.result: dict[str, Any] = {"check": "medcl gpu_check", "version": 1, "smoke": bool(args.smoke),
                                       "device": self._device_name(), "figures": {}}
        if self.out is not None and self.out.is_file() and args.only:
            import json

            with contextlib.suppress(ValueError, OSError):
                old = json.loads(self.out.read_text())
                if isinstance(old.get("figures"), dict):
                    self.result["figures"].update(old["figures"])
        self._cache: dict[str, Any] = {}

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"

    def write(self) -> None:
        self.result["seconds"] = round(time.perf_counter() - self.t0, 1)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(_clean(self.result), self.out)

    def run(self, names: list[str]) -> None:
        for name in names:
            left = self.args.budget - (time.perf_counter() - self.t0)
            if left <= 0:
                value: dict[str, Any] = {"skipped": f"time budget of {self.args.budget:.0f} s spent: rerun with --only {name}"}
            else:
                t = time.perf_counter()
                try:
                    value = getattr(self, f"fig_{name}")()
                except Skip as exc:
                    value = {"skipped": str(exc)}
                except Exception as exc:  # a failed figure is recorded, the others still run
                    value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
                value["seconds"] = round(time.perf_counter() - t, 2)
                gc.collect()  # a failed figure (e.g. out of memory) must not keep its tensors from the next
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            self.result["figures"][name] = value
            self.write()
            print(f"[gpu_check] {name}: {_short(value)}", file=sys.stderr, flush=True)
        self.result["complete"] = True
        self.write()

    # ------------------------------------------------------------------------------------- building blocks
    def pretrain_config(self, method: str):
        from medcl.pretrain.run import resolve_config

        s = self.sizes
        c = s.crop
        levels = len(s.filters)
        ov = [
            f"backbone.filters=[{','.join(map(str, s.filters))}]", f"backbone.strides=[{','.join(map(str, s.strides))}]",
            f"data.volumes_per_step={s.volumes_per_step}", "data.probe_volumes=0", "optim.lr_warmup_steps=0",
            "monitor.probe_every=0", "trainer.ckpt_every=0", "trainer.devices=1", "data.plan.foreground=otsu",
        ]
        if method == "gd+local":
            ov += [f"views.partition.crop=[{c},{c},{c}]", "views.partition.partitions=1", "views.partition.copies=2",
                   f"terms.local.stage=decoder.{levels - 3}"]  # the stride-2 decoder map
        else:
            stride = 1
            for v in s.strides:
                stride *= v
            ov += [f"views.masked.crop=[{c},{c},{c}]", "views.masked.copies=2", f"views.masked.mask_block={stride}"]
        return resolve_config(ROOT / "configs" / "pretrain" / METHODS[method], ov)

    def memory_volumes(self) -> ListVolumes:
        if "volumes" not in self._cache:
            self._cache["volumes"] = ListVolumes(self.sizes.volumes_per_step, self.sizes.volume)
        return self._cache["volumes"]

    def device_batch(self, method: str) -> tuple[Any, Any]:
        """``(cfg, batch rendered on the device)`` of one step."""
        from medcl.pretrain.data import PretrainStream, collate_views, render_views

        key = f"batch:{method}"
        if key not in self._cache:
            cfg = self.pretrain_config(method)
            stream = PretrainStream(self.memory_volumes(), cfg, sorted({t.views for t in cfg.terms.values()}))
            batch = collate_views([stream[p] for p in range(cfg.data.volumes_per_step)])
            batch = {"views": {k: v.to(self.device) for k, v in batch["views"].items()},
                     "uid": {k: v.to(self.device) for k, v in batch["uid"].items()}, "stats": {}, "info": {}}
            self._cache[key] = (cfg, render_views(batch))
        return self._cache[key]

    def trainer(self, tcfg: Any, folder: str, callbacks: list[Any]) -> Any:
        """medcl's trainer (``make_trainer``); without TensorBoard (a bare machine) the same settings, no loggers."""
        from medcl.engine.trainer import make_trainer, resolve_accelerator, resolve_precision

        try:
            return make_trainer(tcfg, folder, self.devname, callbacks=callbacks, enable_progress_bar=False)
        except ModuleNotFoundError as exc:
            if "tensorboard" not in str(exc).lower():
                raise
            import lightning as L

            accel = resolve_accelerator(self.devname)
            note = "no tensorboard/tensorboardX: medcl's trainer settings without its loggers (see gpu_wheels.sh)"
            if note not in self.result.setdefault("notes", []):
                self.result["notes"].append(note)
            return L.Trainer(accelerator=accel, devices=1, precision=resolve_precision(tcfg.precision, accel),
                             max_steps=tcfg.max_steps, max_epochs=-1, logger=False, callbacks=callbacks,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                             benchmark=accel == "gpu", default_root_dir=folder)

    def clock(self) -> Any:
        """A callback timing each training batch end to end (data wait, transfer, rendering, step)."""
        import lightning as L

        dev = self.device

        class Clock(L.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self._t = 0.0

            def on_train_start(self, trainer, pl_module) -> None:
                _sync(dev)
                self._t = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                _sync(dev)
                now = time.perf_counter()
                self.times.append(now - self._t)
                self._t = now

        return Clock()

    def train_steps(self, method: str, precision: str = "auto", channels_last: bool | None = None,
                    benchmark: bool | None = None, compile: bool = False, real: bool = False) -> dict[str, Any]:
        """Median Lightning step of ``method`` (one batch kept on the device, or the real pipeline)."""
        import lightning as L

        from medcl.engine.trainer import resolve_accelerator, use_channels_last
        from medcl.pretrain.data import PretrainDataModule
        from medcl.pretrain.module import PretrainModule

        s = self.sizes
        n = s.warmup + s.steps
        cfg, batch = self.device_batch(method)
        tcfg = replace(cfg.trainer, max_steps=n, log_every=n, ckpt_every=0, precision=precision, devices="1",
                       num_workers=s.workers if s.workers is not None else cfg.trainer.num_workers)
        cfg = replace(cfg, trainer=tcfg)
        accel = resolve_accelerator(self.devname)
        cl = use_channels_last(tcfg, accel) if channels_last is None else channels_last
        L.seed_everything(0, verbose=False)
        module = PretrainModule(cfg, {}, channels_last=cl)
        if compile:
            module.backbone.compile(backend=s.compile_backend)
        clock = self.clock()
        _reset_peak(self.device)
        with tempfile.TemporaryDirectory(dir=self.tmp.name) as folder, _cudnn_benchmark():
            trainer = self.trainer(tcfg, folder, [clock])
            if benchmark is not None:  # after the trainer, which sets medcl's default
                torch.backends.cudnn.benchmark = benchmark
            used_benchmark = bool(torch.backends.cudnn.benchmark)
            if real:
                dm: Any = PretrainDataModule(self.disk_stream(cfg), cfg)
            else:
                class Memory(L.LightningDataModule):
                    def train_dataloader(self):
                        return torch.utils.data.DataLoader(Repeat(batch, n), batch_size=None, num_workers=0)

                dm = Memory()
            trainer.fit(module, datamodule=dm)
        times = clock.times
        step = _median(times[s.warmup:])
        views = sum(len(v) for v in batch["views"].values())
        out = {"step_s": step, "views_per_s": views / step, "first_step_s": times[0] if times else None,
               "steps_timed": len(times[s.warmup:]), "precision": trainer.precision, "channels_last": cl,
               "cudnn_benchmark": used_benchmark, "peak_mb": _peak_mb(self.device)}
        if compile:
            out["compile_s"] = (times[0] - step) if times else None
        return out

    def per_method(self, **kw: Any) -> dict[str, Any]:
        return {m: self.train_steps(m, **kw) for m in METHODS}

    def disk_stream(self, cfg: Any) -> Any:
        """The real stream: synthetic CT volumes on disk (NIfTI), preprocessed into the on-disk cache."""
        from medcl.data import CaseDataset, load_manifest
        from medcl.pretrain.data import PretrainStream

        if "disk" not in self._cache:
            from medcl.core.geometry import Volume
            from medcl.io import write_nifti

            root = Path(self.tmp.name) / "ct"
            root.mkdir(exist_ok=True)
            aff = torch.diag(torch.tensor([0.8, 0.8, 2.0, 1.0], dtype=torch.float64)).numpy()
            for i in range(self.sizes.n_volumes):
                write_nifti(Volume(synthetic_ct(100 + i, self.sizes.volume)[None].numpy(), aff), root / f"ct_{i:03d}.nii")
            ds = CaseDataset(load_manifest(root), cfg.data.plan, with_label=False, cache="disk",
                             cache_dir=str(Path(self.tmp.name) / "cache"))
            t = time.perf_counter()
            workers = min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 0
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=lambda x: None)
            for _ in loader:  # fill the disk cache (in parallel on a GPU machine)
                pass
            self._cache["disk"] = ds
            self._cache["disk_prepare_s"] = time.perf_counter() - t
        return PretrainStream(self._cache["disk"], cfg, sorted({t.views for t in cfg.terms.values()}))

    def step_loss(self, module: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The step's loss without Lightning (for FLOP counting and profiling): every term of phase 0."""
        from medcl.pretrain.terms import StepContext

        active, _ = module.phase_at(0)
        views = batch["views"]
        sets = sorted({module.terms[n].cfg.views for n in active})
        student = {s: module.backbone(module._prepare(views[s].views), upto=module._upto(s, active)) for s in sets}
        ctx = StepContext(views=views, uid=batch["uid"], student=student, teacher=None,
                          generator=torch.Generator().manual_seed(0), step=0)
        return sum(module.terms[n].cfg.weight * module.terms[n].compute(ctx)[0] for n in active)

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------------------------- figures
    def fig_env(self) -> dict[str, Any]:
        import lightning

        from medcl.engine.trainer import (
            TrainerConfig,
            resolve_accelerator,
            resolve_precision,
            use_channels_last,
        )

        accel = resolve_accelerator(self.devname)
        out: dict[str, Any] = {
            "device": self._device_name(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "lightning": lightning.__version__,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "precision_auto": resolve_precision("auto", accel),
            "channels_last_auto": use_channels_last(TrainerConfig(), accel),
            "cudnn_benchmark_default": accel == "gpu", "cpu_count": os.cpu_count(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "sizes": {k: v for k, v in self.sizes.__dict__.items()},
        }
        for mod in ("monai", "nibabel", "timm", "h5py", "skimage", "SimpleITK", "pydicom", "openslide"):
            try:
                m = __import__(mod)
                out[f"{mod}_version"] = getattr(m, "__version__", "?")
            except Exception:
                out[f"{mod}_version"] = None
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            out["gpu_memory_gb"] = round(p.total_memory / 2**30, 1)
            out["bf16"] = torch.cuda.is_bf16_supported()
        return out

    def fig_matmul(self) -> dict[str, Any]:
        n = self.sizes.matmul
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        _sync(self.device)
        reps = 20 if self.device.type == "cuda" else 3
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(self.device)
        dt = (time.perf_counter() - t) / reps
        tflops = 2 * n**3 / dt / 1e12
        self._cache["matmul_tflops"] = tflops
        return {"tflops": tflops, "n": n, "dtype": "bfloat16"}

    def fig_step_bf16_cl(self) -> dict[str, Any]:
        return self.per_method(precision="bf16-mixed", channels_last=True)

    def fig_step_fp32(self) -> dict[str, Any]:
        return self.per_method(precision="32", channels_last=False)

    def fig_step_bf16(self) -> dict[str, Any]:
        return self.per_method(precision="bf16-mixed", channels_last=False)

    def fig_step_bf16_cl_nobench(self) -> dict[str, Any]:
        out = self.per_method(precision="bf16-mixed", channels_last=True, benchmark=False)
        ref = self.result["figures"].get("step_bf16_cl", {})
        for m, v in out.items():
            on = ref.get(m, {}).get("step_s") if isinstance(ref.get(m), dict) else None
            if on:
                v["benchmark_speedup"] = v["step_s"] / on  # > 1: cudnn.benchmark helps
        return out

    def fig_step_compile(self) -> dict[str, Any]:
        import importlib.util

        if self.sizes.compile_backend == "inductor" and self.device.type == "cuda" and importlib.util.find_spec("triton") is None:
            raise Skip("torch.compile's inductor backend needs triton on a GPU, which cannot be found")
        out = self.per_method(precision="bf16-mixed", channels_last=True, compile=True)
        out["backend"] = self.sizes.compile_backend
        return out

    def fig_pipeline(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in METHODS:
            mem = self.train_steps(m)
            real = self.train_steps(m, real=True)
            out[m] = {"in_memory_s": mem["step_s"], "real_s": real["step_s"], "ratio": real["step_s"] / mem["step_s"],
                      "workers": self.sizes.workers if self.sizes.workers is not None else self.pretrain_config(m).trainer.num_workers,
                      "precision": mem["precision"], "channels_last": mem["channels_last"], "peak_mb": real["peak_mb"]}
        out["volumes"] = self.sizes.n_volumes
        out["volume_shape"] = list(self.sizes.volume)
        out["cache_prepare_s"] = self._cache.get("disk_prepare_s")
        return out

    def fig_mfu(self) -> dict[str, Any]:
        from torch.utils.flop_counter import FlopCounterMode

        from medcl.pretrain.module import PretrainModule

        peak, source = self.args.peak_tflops, "--peak-tflops"
        if not peak and self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            peak = next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)
            source = f"table ({name})"
        matmul = self._cache.get("matmul_tflops") or (self.result["figures"].get("matmul") or {}).get("tflops")
        out: dict[str, Any] = {}
        for m in METHODS:
            cfg, batch = self.device_batch(m)
            module = PretrainModule(cfg, {}, channels_last=self.device.type == "cuda").to(self.device)
            with FlopCounterMode(display=False) as fc:  # forward and backward of one step
                with self.autocast():
                    loss = self.step_loss(module, batch)
                loss.backward()
            flops = fc.get_total_flops()
            timed = (self.result["figures"].get("step_bf16_cl") or {}).get(m)  # this run's, or --out's
            if not isinstance(timed, dict) or not timed.get("step_s"):
                timed = self.train_steps(m, precision="bf16-mixed", channels_last=True)
            step = float(timed["step_s"])
            achieved = flops / step / 1e12
            row = {"tflop_per_step": flops / 1e12, "step_s": step, "achieved_tflops": achieved, "peak_tflops": peak,
                   "peak_source": source if peak else None, "mfu": achieved / peak if peak else None,
                   "matmul_tflops": matmul, "of_matmul": achieved / matmul if matmul else None,
                   "time_split": self.profile(module, batch)}
            out[m] = row
            del module
            _reset_peak(self.device)
        if not peak:
            out["note"] = "unknown GPU peak: pass --peak-tflops (mfu left null; of_matmul is against the measured rate)"
        return out

    def profile(self, module: Any, batch: dict[str, Any]) -> dict[str, float]:
        """Fractions of the device time (CPU time in --smoke) of forward + backward: conv / norm / rest."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        for _ in range(1):  # warm-up (cudnn autotuning happens outside the profile)
            with self.autocast():
                loss = self.step_loss(module, batch)
            loss.backward()
        _sync(self.device)
        with profile(activities=acts) as prof:
            for _ in range(self.sizes.profile_steps):
                with self.autocast():
                    loss = self.step_loss(module, batch)
                loss.backward()
            _sync(self.device)
        groups = {"conv": 0.0, "norm": 0.0, "rest": 0.0}
        for ev in prof.key_averages():
            if cuda:
                t = float(getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0) or 0.0)
            else:
                t = float(ev.self_cpu_time_total)
            name = ev.key.lower()
            kind = "conv" if "conv" in name else "norm" if "norm" in name else "rest"
            groups[kind] += t
        total = sum(groups.values()) or float("nan")
        out = {k: v / total for k, v in groups.items()}
        out["profiled_ms"] = total / 1e3 / self.sizes.profile_steps
        return out

    def fig_finetune(self) -> dict[str, Any]:
        import lightning as L

        from medcl.engine.trainer import resolve_accelerator, use_channels_last
        from medcl.models import build_backbone
        from medcl.models.backbone import BackboneConfig
        from medcl.segment.config import FinetuneConfig
        from medcl.segment.module import SegmentationModule

        s = self.sizes
        n = s.warmup + s.steps
        bcfg = BackboneConfig(filters=s.filters, strides=s.strides, out_channels=3)
        cfg = FinetuneConfig(backbone=bcfg)
        cfg = replace(cfg, trainer=replace(cfg.trainer, max_steps=n, log_every=n, ckpt_every=0, devices="1"))
        accel = resolve_accelerator(self.devname)
        L.seed_everything(0, verbose=False)
        module = SegmentationModule(build_backbone(bcfg), cfg, 3, None, {}, channels_last=use_channels_last(cfg.trainer, accel))
        g = torch.Generator().manual_seed(0)
        p = (s.ft_batch, 1, s.ft_patch, s.ft_patch, s.ft_patch)
        batch = {"image": torch.randn(p, generator=g).to(self.device),
                 "label": torch.randint(0, 3, p, generator=g).to(self.device)}

        class Memory(L.LightningDataModule):
            def train_dataloader(self):
                return torch.utils.data.DataLoader(Repeat(batch, n), batch_size=None, num_workers=0)

        clock = self.clock()
        _reset_peak(self.device)
        with tempfile.TemporaryDirectory(dir=self.tmp.name) as folder:
            trainer = self.trainer(cfg.trainer, folder, [clock])
            trainer.fit(module, datamodule=Memory())
        step = _median(clock.times[s.warmup:])
        return {"step_s": step, "patches_per_s": s.ft_batch / step, "patch": s.ft_patch, "batch": s.ft_batch,
                "precision": trainer.precision, "channels_last": module.channels_last, "peak_mb": _peak_mb(self.device)}

    def fig_inference(self) -> dict[str, Any]:
        from medcl.models import build_backbone
        from medcl.models.backbone import BackboneConfig
        from medcl.segment.config import InferenceConfig
        from medcl.segment.inference import logits_fn, predict_probabilities

        s = self.sizes
        torch.manual_seed(0)
        net = build_backbone(BackboneConfig(filters=s.filters, strides=s.strides, out_channels=3)).to(self.device).eval()
        if self.device.type == "cuda":
            net = net.to(memory_format=torch.channels_last_3d)
        image = ListVolumes(1, s.volume)[0]["image"]
        icfg = InferenceConfig()
        roi = (s.roi,) * 3
        out: dict[str, Any] = {"volume_shape": list(s.volume), "roi": s.roi, "overlap": icfg.overlap,
                               "sw_batch_size": icfg.sw_batch_size}
        for mode, ctx in (("fp32", contextlib.nullcontext), ("bf16", self.autocast)):
            with ctx():
                predict_probabilities(logits_fn(net), image, icfg, roi, self.device)  # warm-up
                _sync(self.device)
                reps = 2 if self.device.type == "cuda" else 1
                t = time.perf_counter()
                for _ in range(reps):
                    predict_probabilities(logits_fn(net), image, icfg, roi, self.device)
                _sync(self.device)
                dt = (time.perf_counter() - t) / reps
            out[mode] = {"seconds_per_volume": dt, "volumes_per_s": 1.0 / dt}
        out["shipped"] = "fp32 (medcl.segment.predict does not autocast)"
        return out

    def fig_mil_extract(self) -> dict[str, Any]:
        from medcl.wsi.encoders import PatchEncoder, build_builtin

        s = self.sizes
        out: dict[str, Any] = {"tile": s.tile, "batch": s.tile_batch}
        out["builtin-cnn"] = self.encode_rate(build_builtin())
        try:
            import timm
        except Exception as exc:
            out["timm-vit_small"] = {"skipped": f"timm cannot be imported ({type(exc).__name__}: {exc})"}
            return out
        model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=s.vit_size)
        model.eval()
        with torch.no_grad():
            dim = int(model(torch.zeros(1, 3, s.vit_size, s.vit_size)).flatten(1).shape[1])
        out["timm-vit_small"] = self.encode_rate(PatchEncoder(model, dim, input_size=s.vit_size, name="timm:vit_small"))
        return out

    def encode_rate(self, encoder: Any) -> dict[str, Any]:
        """Tiles/s of encoding uint8 tiles as ``medcl.wsi.extract`` does (pinned batches, bf16 on a GPU)."""
        s = self.sizes
        enc = encoder.to(self.device).eval()
        tiles = torch.randint(0, 256, (s.tile_batch, 3, s.tile, s.tile), dtype=torch.uint8)
        if self.device.type == "cuda":
            tiles = tiles.pin_memory()
        amp = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            enc(tiles.to(self.device)).float().cpu()
            _sync(self.device)
            t = time.perf_counter()
            for _ in range(s.tile_batches):
                enc(tiles.to(self.device, non_blocking=True)).float().cpu()
            _sync(self.device)
            dt = time.perf_counter() - t
        return {"tiles_per_s": s.tile_batches * s.tile_batch / dt, "dim": int(encoder.dim)}


# --------------------------------------------------------------------------------------------- report
def _short(v: dict[str, Any]) -> str:
    if "skipped" in v or "error" in v:
        return str(v.get("skipped") or v.get("error"))[:160]
    return f"done in {v.get('seconds', '?')} s"


def _fmt(x: Any, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "--"
    if isinstance(x, float):
        return f"{x:.{digits}g}{unit}"
    return f"{x}{unit}"


def markdown(result: dict[str, Any]) -> str:
    """The figures as one markdown table (figure, detail, value)."""
    figs = result.get("figures", {})
    rows: list[tuple[str, str, str]] = []

    def status(name: str) -> dict[str, Any] | None:
        v = figs.get(name)
        if not isinstance(v, dict):
            return None
        if "skipped" in v or "error" in v:
            rows.append((name, "", f"{'skipped' if 'skipped' in v else 'error'}: {str(v.get('skipped') or v.get('error'))[:90]}"))
            return None
        return v

    if (v := status("matmul")) is not None:
        rows.append(("matmul", f"bf16 {v['n']}^3", _fmt(v["tflops"], " TFLOP/s")))
    for name, label in (("step_fp32", "fp32"), ("step_bf16", "bf16"), ("step_bf16_cl", "bf16 + channels-last"),
                        ("step_bf16_cl_nobench", "bf16 + channels-last, cudnn.benchmark off"),
                        ("step_compile", "bf16 + channels-last + torch.compile")):
        if (v := status(name)) is None:
            continue
        for m in METHODS:
            r = v.get(m, {})
            extra = f", compile {_fmt(r.get('compile_s'), ' s')}" if "compile_s" in r else ""
            extra += f", x{_fmt(r.get('benchmark_speedup'))} without benchmark" if "benchmark_speedup" in r else ""
            rows.append((f"pretrain step {m}", label, f"{_fmt(r.get('step_s'), ' s')} (peak {_fmt(r.get('peak_mb'), ' MB', 5)}{extra})"))
    if (v := status("pipeline")) is not None:
        for m in METHODS:
            r = v.get(m, {})
            rows.append((f"pipeline {m}", f"real / in-memory, {r.get('workers')} workers",
                         f"{_fmt(r.get('ratio'))} ({_fmt(r.get('real_s'), ' s')} / {_fmt(r.get('in_memory_s'), ' s')})"))
    if (v := status("mfu")) is not None:
        for m in METHODS:
            r = v.get(m, {})
            split = r.get("time_split", {})
            rows.append((f"MFU {m}", f"{_fmt(r.get('tflop_per_step'))} TFLOP/step, peak {_fmt(r.get('peak_tflops'))}",
                         f"{_fmt(r.get('mfu'))} ({_fmt(r.get('of_matmul'))} of measured matmul)"))
            rows.append((f"time split {m}", "conv / norm / rest",
                         f"{_fmt(split.get('conv'), '', 2)} / {_fmt(split.get('norm'), '', 2)} / {_fmt(split.get('rest'), '', 2)}"))
    if (v := status("finetune")) is not None:
        rows.append(("fine-tuning step", f"{v['patch']}^3 x {v['batch']}, {v.get('precision')}",
                     f"{_fmt(v['step_s'], ' s')} (peak {_fmt(v.get('peak_mb'), ' MB', 5)})"))
    if (v := status("inference")) is not None:
        for mode in ("fp32", "bf16"):
            rows.append(("sliding-window inference", f"{mode}, {'x'.join(map(str, v['volume_shape']))}, roi {v['roi']}",
                         _fmt(v[mode]["volumes_per_s"], " volumes/s")))
    if (v := status("mil_extract")) is not None:
        for enc in ("builtin-cnn", "timm-vit_small"):
            r = v.get(enc, {})
            rows.append(("mil extract", enc, r["skipped"] if "skipped" in r else _fmt(r.get("tiles_per_s"), " tiles/s")))
    head = f"medcl gpu_check on {result.get('device')} ({'smoke, ' if result.get('smoke') else ''}{result.get('seconds')} s)\n\n"
    lines = ["| figure | setting | value |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON file, written after every figure (and OUT.md at the end)")
    p.add_argument("--only", default="", help=f"comma-separated figures to (re)run: {', '.join(FIGURES)}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the code paths, finite numbers)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (default: table)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=0, help="timed steps per setting (default 8; --smoke 2)")
    p.add_argument("--workers", type=int, default=None, help="data workers of the real pipeline (default: recipe's)")
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the whole check (figures left: skipped)")
    p.add_argument("--workdir", default=None, help="where the synthetic volumes and their cache go (temp folder)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(FIGURES)
    unknown = sorted(set(names) - set(FIGURES))
    if unknown:
        p.error(f"unknown figures {unknown}; choose from {', '.join(FIGURES)}")
    if args.smoke:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from medcl.core.device import cuda_available

    if not args.smoke and args.device == "auto" and not cuda_available():
        print("[gpu_check] torch sees no CUDA device: use --smoke (tiny sizes), or --device cpu for the full sizes on "
              "the CPU", file=sys.stderr)
        return 2
    import logging
    import warnings

    import lightning  # noqa: F401  (it configures its loggers on import: quiet them after)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="torch.utils.data")
    check = Check(args)
    try:
        check.run(names)
    finally:
        table = markdown(check.result)
        print(table)
        if check.out is not None:
            atomic_write_text(table, check.out.with_suffix(".md"))
        check.tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
