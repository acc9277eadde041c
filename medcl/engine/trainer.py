"""The Lightning trainer every medcl training job uses.

One factory, :func:`make_trainer`, so pretraining and fine-tuning share the same behaviour:

* device ``auto | cpu | cuda`` and precision ``auto`` (bf16-mixed on GPUs that support it, fp16-mixed on
  older GPUs, fp32 on CPU);
* DDP across GPUs and nodes when more than one process is asked for or the job was started by
  ``torchrun`` / SLURM (Lightning detects both environments; nothing in medcl changes);
* checkpoints every N steps plus ``last.ckpt``, written atomically by
  :class:`~medcl.engine.checkpoint.AtomicCheckpointIO` and read back with ``weights_only=True``;
* TensorBoard and CSV logs in the run folder, a progress bar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from medcl.core.device import lightning_accelerator
from medcl.core.errors import MedclConfigError


@dataclass
class TrainerConfig:
    """Settings shared by every training job (section ``trainer`` of a job config).

    Attributes:
        max_steps: optimiser steps of the run.
        precision: ``auto`` (bf16-mixed on GPUs with bf16, 16-mixed on other GPUs, 32 on CPU), or
            a Lightning precision string (``32``, ``bf16-mixed``, ``16-mixed``).
        devices: processes per node (``auto`` = all visible GPUs, or 1 on CPU).
        num_nodes: nodes (multi-node DDP with torchrun or SLURM).
        accumulate: gradient accumulation (batches per optimiser step).
        ckpt_every: write a checkpoint every this many steps (0 = only at the end).
        keep_checkpoints: periodic checkpoints kept besides ``last.ckpt``.
        log_every: log metrics every this many steps.
        compile: wrap the backbone with ``torch.compile``.
        channels_last: use the channels-last-3d memory format (``auto`` = on GPU only).
        num_workers: data-loader worker processes.
        grad_clip: gradient-norm clipping (0 = off).
    """

    max_steps: int = 1000
    precision: str | int = "auto"
    devices: str | int = "auto"
    num_nodes: int = 1
    accumulate: int = 1
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    compile: bool = False
    channels_last: Literal["auto", "on", "off"] = "auto"
    num_workers: int = 2
    grad_clip: float = 0.0

    def validate(self) -> None:
        self.precision = str(self.precision)  # YAML reads 32 as a number
        self.devices = str(self.devices)
        for key in ("max_steps", "accumulate", "log_every", "num_nodes"):
            if getattr(self, key) < 1:
                raise MedclConfigError(f"trainer.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.ckpt_every < 0 or self.keep_checkpoints < 0 or self.num_workers < 0:
            raise MedclConfigError("trainer", "ckpt_every, keep_checkpoints and num_workers must be >= 0")
        if self.precision not in ("auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true"):
            raise MedclConfigError("trainer.precision", f"unknown precision {self.precision!r}")
        if self.devices != "auto" and not str(self.devices).isdigit():
            raise MedclConfigError("trainer.devices", f"'auto' or a number of processes, got {self.devices!r}")


def check_common(cfg: Any) -> None:
    """The keys every job config has at its top: ``seed`` (>= 0), ``threads`` (>= 1 or null), ``device``."""
    if getattr(cfg, "seed", 0) < 0:
        raise MedclConfigError("seed", f"must be >= 0, got {cfg.seed}")
    threads = getattr(cfg, "threads", None)
    if threads is not None and threads < 1:
        raise MedclConfigError("threads", f"must be >= 1 (or null: torch's default), got {threads}")
    device = str(getattr(cfg, "device", "auto")).lower()
    if device not in ("auto", "cpu", "cuda", "gpu") and not device.startswith("cuda:"):
        raise MedclConfigError("device", f"expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")


def resolve_accelerator(device: str) -> str:
    """``auto | cpu | cuda | gpu`` -> Lightning accelerator name (:func:`medcl.core.device.lightning_accelerator`);
    errors when CUDA is asked but absent."""
    return lightning_accelerator(device)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast halves step time."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False
    return False


def resolve_precision(precision: str, accelerator: str) -> str:
    """The Lightning precision string for ``precision`` on ``accelerator``.

    ``auto``: bf16-mixed on GPUs with bf16 (fp16-mixed on older ones), fp32 on CPU. ``bf16-mixed`` on a
    CPU with native bf16 (:func:`cpu_has_bf16`) roughly halves a DynUNet step, but is opt-in: we saw an
    intermittent non-finite step with it on CPU that we could not reproduce under anomaly detection.
    """
    if precision != "auto":
        return "32-true" if precision == "32" else precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def launched_processes() -> int:
    """World size when launched by torchrun / SLURM (``WORLD_SIZE``), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_channels_last(cfg: TrainerConfig, accelerator: str) -> bool:
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and accelerator == "gpu")


def make_trainer(
    cfg: TrainerConfig,
    out_dir: str | Path,
    device: str = "auto",
    callbacks: list[Any] | None = None,
    enable_progress_bar: bool = True,
    extra_loggers: list[Any] | None = None,
    csv_version: str = "",
):
    """Build the ``lightning.Trainer`` for a run in ``out_dir``.

    Writes ``out_dir/checkpoints/{last,step=N}.ckpt``, ``out_dir/logs/metrics.csv`` (CSV logger) and
    TensorBoard events in ``out_dir/tensorboard``. A resumed run passes ``csv_version`` (e.g.
    ``"resume-1"``) so its CSV goes to ``logs/resume-1/``: Lightning's CSV logger deletes an existing
    ``metrics.csv`` in its folder.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.strategies import DDPStrategy

    from medcl.core.logs import quiet_third_party
    from medcl.engine.checkpoint import AtomicCheckpointIO

    quiet_third_party()
    out = Path(out_dir)
    accelerator = resolve_accelerator(device)
    if cfg.devices == "auto":
        devices: int | str = launched_processes() if accelerator == "cpu" else "auto"
        n_proc = launched_processes() if accelerator == "cpu" else max(torch.cuda.device_count(), 1)
    else:
        devices = int(cfg.devices)
        n_proc = devices
    world = n_proc * cfg.num_nodes
    strategy: Any = "auto"
    if world > 1 or launched_processes() > 1:
        strategy = DDPStrategy(
            process_group_backend="nccl" if accelerator == "gpu" else "gloo",
            find_unused_parameters=True,
            checkpoint_io=AtomicCheckpointIO(),
        )
    ckpt = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.ckpt_every if cfg.ckpt_every > 0 else None,
        save_top_k=cfg.keep_checkpoints if cfg.ckpt_every > 0 else 0,
        monitor="step",
        mode="max",
        save_last=True,
        enable_version_counter=False,  # overwrite last.ckpt (FinalStepCheckpoint may have written it), no last-v1
    )
    loggers = [
        # flushed at every logged step: a SIGKILL loses no logged row (metrics.csv is merged over resumes)
        CSVLogger(save_dir=str(out), name="logs", version=csv_version, flush_logs_every_n_steps=1),
        TensorBoardLogger(save_dir=str(out), name="tensorboard", version="", default_hp_metric=False),
    ] + list(extra_loggers or [])
    final = _final_step_checkpoint_callback()
    final.every = cfg.ckpt_every
    cbs = [ckpt, final] + list(callbacks or [])
    if enable_progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, min(cfg.log_every, 10))))
    trainer = L.Trainer(
        default_root_dir=str(out),
        accelerator=accelerator,
        devices=devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=resolve_precision(cfg.precision, accelerator),
        max_steps=cfg.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=cfg.accumulate,
        gradient_clip_val=cfg.grad_clip or None,
        log_every_n_steps=cfg.log_every,
        logger=loggers,
        callbacks=cbs,
        plugins=[AtomicCheckpointIO()] if strategy == "auto" else None,
        use_distributed_sampler=False,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        # cudnn autotuning for the fixed view / patch shapes of medcl's steps: on GPUs only (benchmarks/gpu_check.py
        # reports the step with and without it: figures step_bf16_cl and step_bf16_cl_nobench)
        benchmark=accelerator == "gpu",
    )
    return trainer


def _final_step_checkpoint_callback():
    import lightning as L

    class FinalStepCheckpoint(L.Callback):
        """Writes ``last.ckpt`` after the final optimiser step when the periodic checkpoint did not, and at the step
        reached when the process received SIGTERM (what SLURM time limits and ``docker stop`` send): Lightning then
        stops after this batch, the job raises :class:`medcl.core.errors.MedclInterrupted` (exit 143) and
        ``--resume`` continues exactly from here.

        It runs in ``on_train_batch_end`` rather than ``on_train_end`` because only then does the fit
        loop still hold the data-stream state that exact resume needs.
        """

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            every = getattr(self, "every", 0)
            step = trainer.global_step
            if trainer.fit_loop._should_accumulate():
                return
            final = step >= trainer.max_steps and not (every and step % every == 0)
            if final or (trainer.received_sigterm and not getattr(self, "saved_on_sigterm", False)):
                trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt", weights_only=False)
                self.saved_on_sigterm = trainer.received_sigterm

    return FinalStepCheckpoint()


def fit_or_interrupt(trainer: Any, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit(*args, **kwargs)``; a SIGTERM during it (checkpoint written at the step reached, see
    ``FinalStepCheckpoint``) becomes :class:`medcl.core.errors.MedclInterrupted`, exit code 143."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from medcl.core.errors import MedclInterrupted

    try:
        trainer.fit(*args, **kwargs)
    except SIGTERMException:
        raise MedclInterrupted("SIGTERM", int(trainer.global_step), trainer.default_root_dir) from None


def checkpoint_step(path: str | Path) -> int:
    """The optimiser step a checkpoint holds: from its name (``step=N.ckpt``) or, for ``last.ckpt``, from its
    ``global_step`` (read memory-mapped, weights only: the tensors are not loaded)."""
    import re

    m = re.fullmatch(r"step=(\d+)\.ckpt", Path(path).name)
    if m:
        return int(m.group(1))
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt.get("global_step", -1)) if isinstance(ckpt, dict) else -1


def last_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``out_dir/checkpoints`` (``last.ckpt`` or ``step=N.ckpt``), or None.

    Checkpoints are written atomically, so every file there is complete. The step stored in a checkpoint decides,
    not the file time (copied or restored folders change times); ``last.ckpt`` wins a tie. The temporary files a
    kill left behind (:data:`medcl.core.files.TMP_GLOB`) are removed here, where a resume starts.
    """
    from medcl.core.files import TMP_GLOB

    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    for stale in folder.glob(TMP_GLOB):
        stale.unlink(missing_ok=True)
    found = [p for p in folder.glob("*.ckpt") if p.is_file()]
    return max(found, key=lambda p: (checkpoint_step(p), p.name == "last.ckpt")) if found else None
