"""``medcl pretrain``: the job that turns a folder of unlabelled volumes into a pretrained backbone.

Run folder layout (``--out DIR``)::

    config.yaml            the resolved config (what ``--resume`` reuses)
    checkpoints/           last.ckpt and step=N.ckpt (atomic; run record inside as "medcl_record")
    logs/metrics.csv       Lightning CSV logs (resumed runs add logs/resume-K/metrics.csv)
    tensorboard/           TensorBoard events
    metrics.csv            all logged values merged over resumes, one row per step
    loss.png               loss terms and probes against step
    backbone.pt            the backbone alone (medcl.models.save_backbone) with the run record
    record.json            the run record (config, plan, cases seen, probe cases, version, environment)
    summary.json           steps, time per step, peak memory, final probe values
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from medcl.config import load_config, to_dict
from medcl.core.device import cuda_available, torch_threads
from medcl.core.errors import MedclConfigError, MedclDataError, MedclInterrupted
from medcl.core.record import RunRecord
from medcl.core.runfolder import RunFolder, config_differences, prepare_run_folder, read_record
from medcl.engine.metrics_log import merge_metrics
from medcl.engine.plots import plot_curves, read_metrics_csv
from medcl.engine.trainer import (
    fit_or_interrupt,
    last_checkpoint,
    make_trainer,
    resolve_accelerator,
    use_channels_last,
)
from medcl.pretrain.config import PretrainConfig

log = logging.getLogger("medcl.pretrain")


def split_probe_cases(ids: list[str], n_probe: int, seed: int) -> tuple[list[str], list[str]]:
    """``(train ids, probe ids)``: ``n_probe`` volumes held back (at most a quarter of the data)."""
    n_probe = min(n_probe, len(ids) // 4)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ids), generator=g).tolist()
    probe = sorted(ids[i] for i in perm[:n_probe])
    train = [i for i in ids if i not in set(probe)]
    return train, probe


def resolve_config(
    config: str | Path | PretrainConfig | None,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
) -> PretrainConfig:
    """The validated config from a YAML path (or a config object), overrides, ``--max-steps``, ``--seed``."""
    cfg = config if isinstance(config, PretrainConfig) else load_config(PretrainConfig, config, overrides or [])
    if max_steps is not None:
        if max_steps < 1:
            raise MedclConfigError("max_steps", f"must be >= 1, got {max_steps}")
        cfg = replace(cfg, trainer=replace(cfg.trainer, max_steps=int(max_steps)))
    if seed is not None:
        cfg = replace(cfg, seed=int(seed))
    cfg.validate()
    return cfg


class _StepTimer:
    """Median time per optimiser step and peak memory (a Lightning callback)."""

    def __init__(self) -> None:
        import lightning as L

        timer = self

        class Cb(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                timer._t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                timer.times.append(time.perf_counter() - timer._t0)

        self.times: list[float] = []
        self._t0 = 0.0
        self.callback = Cb()

    def summary(self) -> dict[str, float]:
        t = sorted(self.times[1:] or self.times)  # the first step pays for warm-up
        out = {"steps_timed": len(self.times), "step_seconds_median": t[len(t) // 2] if t else float("nan")}
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        if cuda_available():
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def run_pretrain(
    config: str | Path | PretrainConfig | None,
    data: str | Path,
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    device: str | None = None,
    seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    cases: list[str] | None = None,
    progress: bool = True,
) -> Path:
    """Pretrain a backbone; returns the run folder.

    Args:
        config: YAML path, a :class:`PretrainConfig`, or None for the defaults (needs ``terms``).
        data: anything ``medcl data check`` accepts (labels are ignored).
        out: the run folder.
        overrides: ``key.sub=value`` config overrides.
        max_steps, seed: override ``trainer.max_steps`` / ``seed``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``None`` = the config's ``device``.
        resume: continue the run in ``out`` from its latest checkpoint, with the saved config (``config``, when
            given, must resolve to the same config apart from :data:`RESUME_FREE_KEYS`).
        overwrite: empty a non-empty ``out`` first (without ``resume`` or ``overwrite`` it is refused).
        cases: restrict to these case ids (e.g. the unlabelled pool of a label-budget split).
        progress: show progress bars.
    """
    t0 = time.time()
    out = Path(out)
    prepare_run_folder(out, "pretrain", resume=resume, overwrite=overwrite, inputs=[data])
    cfg, ckpt = _resolve_run(config, out, resume, overrides, max_steps, seed)
    if device is not None and device != cfg.device:
        cfg = replace(cfg, device=device)  # the run record shows the device actually asked for
    device = cfg.device
    with torch_threads(cfg.threads):
        return _run(cfg, ckpt, data, out, device, resume, cases, progress, t0)


def _run(cfg: PretrainConfig, ckpt: Path | None, data: str | Path, out: Path, device: str, resume: bool,
         cases: list[str] | None, progress: bool, t0: float) -> Path:
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    cases_used = _select_cases(cfg, data, cases, out if resume else None)
    cfg = cases_used.cfg
    folder = _start_run_folder(cfg, out, resume, cases_used, data)
    try:
        run = _fit(cfg, folder.record, cases_used, out, ckpt, device, progress, resume)
    except MedclInterrupted as exc:
        folder.stopped_at(exc.step)
        raise
    if run.trainer.is_global_zero:
        _finish(cfg, folder, run, out, time.time() - t0)
    return out


def _resolve_run(config: str | Path | PretrainConfig | None, out: Path, resume: bool, overrides: list[str] | None,
                 max_steps: int | None, seed: int | None) -> tuple[PretrainConfig, Path | None]:
    """The config (the saved one when resuming) and the checkpoint to resume from (or None)."""
    if not resume:
        return resolve_config(config, overrides, max_steps, seed), None
    ckpt = last_checkpoint(out)
    saved = out / "config.yaml"
    if ckpt is None or not saved.is_file():
        raise MedclDataError(out, "nothing to resume: no checkpoint and config.yaml in the run folder")
    cfg = resolve_config(saved, overrides, max_steps, seed)
    if config is not None:  # --config with --resume: it must be the run's config
        asked = resolve_config(config, overrides, max_steps, seed)
        asked = replace(asked, backbone=replace(asked.backbone, in_channels=cfg.backbone.in_channels))
        diffs = config_differences(saved, to_dict(asked), RESUME_FREE_KEYS)
        if diffs:
            raise MedclConfigError(diffs[0], f"--config differs from the run being resumed ({saved}); differing keys: "
                                             f"{', '.join(diffs[:8])}")
    return cfg, ckpt


RESUME_FREE_KEYS = ("trainer.num_workers", "trainer.log_every", "trainer.max_steps", "device", "threads")
"""Config keys a resumed pretraining run may change (``trainer.max_steps``: extend a finished run)."""


@dataclass
class _Cases:
    """The dataset and the cases a run trains on and probes with (``cfg`` with the data's channel count)."""

    cfg: PretrainConfig
    manifest: Any
    train: list[str]
    probe: list[str]


def _select_cases(cfg: PretrainConfig, data: str | Path, cases: list[str] | None, resumed: Path | None) -> _Cases:
    """Training and probe volumes: ``cases`` (e.g. a split's pool) or every volume, with probe volumes held back;
    a resumed run keeps exactly the cases of the interrupted one."""
    from medcl.data import load_manifest

    manifest = load_manifest(data)
    ids = [c.id for c in manifest.cases]
    if cases is not None:
        unknown = sorted(set(cases) - set(ids))
        if unknown:
            raise MedclDataError(data, f"case ids not in the dataset: {unknown[:5]}")
        ids = [i for i in ids if i in set(cases)]
    if len(ids) < 2:
        raise MedclDataError(data, f"pretraining needs at least 2 volumes, found {len(ids)}")
    n_channels = len(manifest.channel_names) or 1
    if cfg.backbone.in_channels != n_channels:
        cfg = replace(cfg, backbone=replace(cfg.backbone, in_channels=n_channels))
    train_ids, probe_ids = split_probe_cases(ids, cfg.data.probe_volumes, cfg.seed)
    previous = read_record(resumed) if resumed is not None else None
    if previous is not None:
        train_ids, probe_ids = list(previous["cases_seen"]), list(previous["extra"].get("probe_cases", []))
        missing = sorted(set(train_ids + probe_ids) - {c.id for c in manifest.cases})
        if missing:
            raise MedclDataError(data, f"the run being resumed used cases that are not in this dataset: {missing[:5]}")
    return _Cases(cfg, manifest, train_ids, probe_ids)


def _start_run_folder(cfg: PretrainConfig, out: Path, resume: bool, cases: _Cases, data: str | Path
                      ) -> RunFolder:
    """``config.yaml`` (new runs) and ``record.json`` (``complete: false``); the record goes into every
    checkpoint."""
    by_id = {c.id: c for c in cases.manifest.cases}
    patients = sorted({by_id[i].patient for i in cases.train if by_id[i].patient})
    record = RunRecord(kind="pretrain", config=to_dict(cfg), plan=cfg.data.plan.to_dict(), cases_seen=cases.train,
                       patients_seen=patients, extra={"probe_cases": cases.probe, "data": str(data)})
    folder = RunFolder(out, record)
    folder.begin(None if resume else cfg)
    return folder


@dataclass
class _Fitted:
    """What training leaves for the last step."""

    trainer: Any
    module: Any
    probe: Any
    timer: _StepTimer


def _fit(cfg: PretrainConfig, record: dict[str, Any], cases: _Cases, out: Path, ckpt: Path | None, device: str,
         progress: bool, resume: bool) -> _Fitted:
    """Datasets (decoded once, cached), the view stream, the module, the probe; train (or resume) to the end."""
    from medcl.data import CaseDataset
    from medcl.pretrain.data import PretrainDataModule, PretrainStream
    from medcl.pretrain.module import PretrainModule
    from medcl.pretrain.probe import ProbeCallback
    from medcl.views import SourceVolume

    cache_kw: dict[str, Any] = {"cache": cfg.data.cache}
    if cfg.data.cache_dir:
        cache_kw["cache_dir"] = cfg.data.cache_dir
    sel = lambda keep: [c for c in cases.manifest.cases if c.id in set(keep)]  # noqa: E731
    train_ds = CaseDataset(cases.manifest, cfg.data.plan, cases=sel(cases.train), with_label=False, **cache_kw)
    probe_ds = CaseDataset(cases.manifest, cfg.data.plan, cases=sel(cases.probe), with_label=False, cache="none")
    _prewarm(train_ds, progress)
    probe_vols = [SourceVolume.from_item(probe_ds[i], source_id=i) for i in range(len(probe_ds))]

    view_sets = sorted({t.views for t in cfg.terms.values()})
    stream = PretrainStream(train_ds, cfg, view_sets)
    accelerator = resolve_accelerator(device)
    module = PretrainModule(cfg, record, channels_last=use_channels_last(cfg.trainer, accelerator))
    if cfg.trainer.compile:
        module.backbone.compile()
    voco = next((n for n, t in cfg.terms.items() if t.kind == "voco"), None)
    probe = ProbeCallback(
        probe_vols,
        tuple(cfg.monitor.probe_crop),
        cfg.monitor.probe_partitions,
        cfg.monitor.knn_k,
        cfg.monitor.probe_every,
        voco_term=voco,
        voco_sampler=stream.samplers[cfg.terms[voco].views] if voco else None,
        per_partition=cfg.monitor.probe_crops_per_partition,
    )
    timer = _StepTimer()
    csv_version = _next_resume_version(out) if resume else ""
    trainer = make_trainer(
        cfg.trainer, out, device, callbacks=[probe, timer.callback], enable_progress_bar=progress, csv_version=csv_version
    )
    fit_or_interrupt(trainer, module, datamodule=PretrainDataModule(stream, cfg), ckpt_path=str(ckpt) if ckpt else None)
    return _Fitted(trainer, module, probe, timer)


def _finish(cfg: PretrainConfig, folder: RunFolder, run: _Fitted, out: Path, seconds: float) -> None:
    """``backbone.pt``, the merged ``metrics.csv`` and ``loss.png``, ``summary.json``, the record marked
    complete (rank 0)."""
    from medcl.models import save_backbone

    step = int(run.trainer.global_step)
    save_backbone(run.module.backbone, out / "backbone.pt", {**folder.record, "complete": True, "step": step})

    def active(key: str, step: int) -> bool:
        """Whether ``train/{key}`` belongs to a term that was active at ``step`` (other keys: True)."""
        owner = max((t for t in cfg.terms if key == t or key.startswith(t + "_")), key=len, default=None)
        return owner is None or owner in run.module.phase_at(step)[0]

    merged = merge_metrics(out, active=active)
    if merged is not None:
        keys = [k for k in read_metrics_csv(merged) if k.startswith(("train/", "probe/"))
                and not k.endswith(("_anchors", "_dropped", "seconds", "chance"))]
        plot_curves(merged, out / "loss.png", keys=keys, title=f"medcl pretrain: {cfg.method}", smooth=5)
    summary = {
        "method": cfg.method,
        "steps": run.trainer.global_step,
        "world_size": run.trainer.world_size,
        "volumes_per_step": cfg.data.volumes_per_step * run.trainer.world_size,
        **run.timer.summary(),
        "seconds": round(seconds, 1),  # wall-clock of this invocation (a resumed run: since the resume)
    }
    if run.probe.history:
        summary["probe_first"] = run.probe.history[0]
        summary["probe_last"] = run.probe.history[-1]
    folder.finish(summary, step=step)
    log.info("pretraining finished: %s", summary)


def _next_resume_version(out: Path) -> str:
    k = 1
    while (out / "logs" / f"resume-{k}").exists():
        k += 1
    return f"resume-{k}"


def _prewarm(ds: Any, progress: bool) -> None:
    """Decode and preprocess every volume once (fills the cache before workers fork)."""
    from tqdm.auto import tqdm

    for i in tqdm(range(len(ds)), desc="preparing volumes", disable=not progress, leave=False):
        ds[i]
