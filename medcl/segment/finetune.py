"""The fine-tuning job (``medcl finetune``): few labels, a fixed schedule, test in the original geometry.

:func:`run_finetune` does, in ``out``:

1. select the cases (:func:`medcl.segment.prepare.select_cases`) and the classes, accept or refuse the init
   checkpoint (:func:`medcl.segment.init.accept_checkpoint`: provenance, test overlap, completeness), build the
   backbone (from the checkpoint's architecture, stages ``init.load`` loaded, ``load_report.json``; or random);
2. train for ``trainer.max_steps`` steps on class-balanced patches (:class:`medcl.segment.data.PatchStream`
   through the resumable :class:`medcl.engine.stream.StreamLoader`); checkpoints every ``ckpt_every`` steps
   and ``last.ckpt`` carry the run record; ``resume`` continues a killed run exactly;
3. keep the **last** model (no model selection on labels: by default there is no validation set),
   ``model.pt``; plot the losses (``loss.png``);
4. if validation cases were set aside (inside the budget), their metrics go to ``validation.csv``;
5. if the selection has test cases: predict each in its original geometry and write ``test_metrics.csv`` (per
   case and class: Dice, HD95 mm, NSD), ``summary.json`` and ``summary.md``; ``record.json`` is marked complete.

Also written (the run-folder contract, :mod:`medcl.core.runfolder`): ``record.json`` (from the start, ``complete:
false`` until the end), ``config.yaml`` (resolved; it validates as :class:`FinetuneConfig`), ``metrics.csv`` (the
training curves), ``cases.json`` (the selection), ``logs/``, TensorBoard. Folders of older medcl versions hold the
test metrics in ``metrics.csv``; :func:`medcl.core.runfolder.test_metrics_path` finds either.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medcl.config import to_dict
from medcl.core.device import torch_threads
from medcl.core.errors import MedclConfigError, MedclDataError, MedclInterrupted
from medcl.core.files import atomic_write_json, atomic_write_text
from medcl.core.geometry import Volume, spacing_from_affine
from medcl.core.record import RunRecord
from medcl.core.runfolder import TEST_METRICS, RunFolder, config_differences, prepare_run_folder
from medcl.data import CaseDataset, Manifest, PreprocessingPlan, load_manifest
from medcl.segment.config import FinetuneConfig
from medcl.segment.metrics import case_metrics, summarise, write_metrics_csv
from medcl.segment.prepare import CaseSelection, LabelInfo, resolve_labels, resolve_plan, select_cases

__all__ = ["FinetuneResult", "run_finetune", "evaluate_cases", "DONE_FILE"]

log = logging.getLogger(__name__)

DONE_FILE = "summary.json"


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced.

    Attributes:
        out: the run folder.
        selection: the cases used.
        test_rows: per test case and class metrics (``test_metrics.csv``).
        validation_rows: per validation case and class metrics.
        summary: means (``summary.json``).
        model_path: ``out/model.pt``.
    """

    out: Path
    selection: CaseSelection
    test_rows: list[dict[str, Any]] = field(default_factory=list)
    validation_rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    model_path: Path | None = None


def evaluate_cases(
    fn: Callable[[torch.Tensor], torch.Tensor],
    manifest: Manifest,
    plan: PreprocessingPlan,
    case_ids: list[str],
    labels: LabelInfo,
    cfg: FinetuneConfig,
    device: str | torch.device = "cpu",
    save_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Predict ``case_ids`` in their original geometry and score them against their labels as read.

    Voxels carrying the ignore label in a reference are excluded (set to background in both maps).
    Returns ``case_metrics`` rows with a ``case`` key.
    """
    from medcl.io import read_volume, write_nifti
    from medcl.segment.predict import label_dtype, predict_item

    ds = CaseDataset(labels.manifest, plan, cases=case_ids, with_label=False, cache=cfg.data.cache
                     if cfg.data.cache != "ram" else "none", cache_dir=cfg.data.cache_dir)
    rows: list[dict[str, Any]] = []
    for i, cid in enumerate(case_ids):
        item = ds[i]
        probs = predict_item(fn, item, plan, cfg.inference, cfg.roi_size, device)
        pred = probs.argmax(dim=0).numpy()
        case = manifest.case(cid)
        ref_vol = read_volume(case.label, is_label=True)
        ref = ref_vol.array[0].astype(int)
        if ref.shape != pred.shape:
            raise MedclDataError(case.label, f"label shape {ref.shape} differs from the image's {pred.shape}")
        if labels.ignore_label is not None:
            ignored = ref == labels.ignore_label
            ref[ignored] = 0
            pred[ignored] = 0
        for r in case_metrics(pred, ref, labels.num_classes, spacing_from_affine(ref_vol.affine),
                              cfg.eval.nsd_tolerance_mm, labels.names):
            rows.append({"case": cid, **r})
        if save_dir is not None:
            write_nifti(Volume(pred[None].astype(label_dtype(labels.num_classes)), ref_vol.affine),
                        save_dir / f"{cid}.nii.gz")
    return rows


RESUME_FREE_KEYS = ("trainer.num_workers", "trainer.log_every", "eval.save_predictions", "device", "threads")
"""Config keys a resumed fine-tuning run may change (they do not change what is computed)."""


def _check_resume(out: Path, cfg: FinetuneConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (``None``: start afresh); a resumed run must have the same config."""
    from medcl.engine.trainer import last_checkpoint

    last = last_checkpoint(out) if resume else None
    saved = out / "config.yaml"
    if last is not None and saved.is_file():
        diffs = config_differences(saved, to_dict(cfg), RESUME_FREE_KEYS)
        if diffs:
            raise MedclConfigError(diffs[0], f"differs from the run being resumed ({saved}); differing keys: "
                                             f"{', '.join(diffs[:8])}")
    return last


def run_finetune(
    cfg: FinetuneConfig,
    data: str | os.PathLike | Manifest,
    out: str | os.PathLike,
    *,
    selection: CaseSelection | None = None,
    resume: bool = False,
    allow_test_overlap: bool = False,
    allow_unknown_provenance: bool = False,
    allow_incomplete: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> FinetuneResult:
    """Fine-tune (see the module docstring) and return the result.

    Args:
        cfg: the config; ``cfg.init.checkpoint`` is the pretraining checkpoint (``None`` = random init).
        data: a dataset path (anything :func:`medcl.data.load_manifest` reads) or a manifest.
        out: the run folder.
        selection: explicit cases (the benchmark's); default from ``cfg.split``.
        resume: continue the run in ``out`` from its last checkpoint (same config).
        overwrite: empty a non-empty ``out`` first (without ``resume`` or ``overwrite`` it is refused).
        allow_test_overlap, allow_unknown_provenance, allow_incomplete: accept an init checkpoint that saw test
            cases, that has no run record, or whose run did not finish (:func:`medcl.segment.init.accept_checkpoint`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``None`` = the config's ``device``.
        callbacks: extra Lightning callbacks.
    """
    if device is not None:
        cfg = copy.deepcopy(cfg)
        cfg.device = device
    device = cfg.device
    prepare_run_folder(out, "finetune", resume=resume, overwrite=overwrite,
                       inputs=[] if isinstance(data, Manifest) else [data])
    with torch_threads(cfg.threads):
        t0 = time.time()
        allow = {"allow_test_overlap": allow_test_overlap, "allow_unknown_provenance": allow_unknown_provenance,
                 "allow_incomplete": allow_incomplete}
        job = _prepare(cfg, data, Path(out), selection, resume, allow)
        try:
            module, trainer = _train(job, device, progress, callbacks)
        except MedclInterrupted as exc:
            job.folder.stopped_at(exc.step)
            raise
        return _finish(job, module, trainer, device, t0)


@dataclass
class _Job:
    """Everything :func:`run_finetune` resolved before training."""

    cfg: FinetuneConfig
    out: Path
    manifest: Manifest
    labels: LabelInfo
    sel: CaseSelection
    plan: PreprocessingPlan
    net: Any
    folder: RunFolder
    init_info: dict[str, Any] | None
    last: Path | None
    converged_at: int | None = None


def _prepare(cfg: FinetuneConfig, data: str | os.PathLike | Manifest, out: Path, selection: CaseSelection | None,
             resume: bool, allow: dict[str, bool]) -> _Job:
    """Cases, classes, the init checkpoint (leakage guard), the plan, the network; the run folder's first files."""
    from medcl.engine.seeding import seed_everything
    from medcl.models import build_backbone
    from medcl.segment.init import accept_checkpoint, build_from_checkpoint, read_checkpoint

    cfg = copy.deepcopy(cfg)
    manifest = data if isinstance(data, Manifest) else load_manifest(data)
    labels = resolve_labels(manifest, cfg)
    sel = selection if selection is not None else select_cases(manifest, cfg)
    sel.check(manifest)

    ckpt = read_checkpoint(cfg.init.checkpoint) if cfg.init.checkpoint else None
    by_id = {c.id: c for c in manifest.cases}
    accepted = None
    if ckpt is not None:
        accepted = accept_checkpoint(ckpt, test_cases=sel.test, test_patients=[by_id[t].patient for t in sel.test],
                                     **allow)
    plan = resolve_plan(manifest, cfg, ckpt.plan if ckpt is not None else None, labels)
    n_ch = len(manifest.channel_names)
    seed_everything(cfg.seed)
    report = None
    if ckpt is not None:
        net, report = build_from_checkpoint(ckpt, n_ch, labels.num_classes, cfg.init.load, cfg.init.require_encoder,
                                            cfg.init.adapt, fallback=cfg.backbone, key_map=cfg.init.key_map)
        cfg.backbone = net.config
    else:
        cfg.backbone.in_channels, cfg.backbone.out_channels = n_ch, labels.num_classes
        net = build_backbone(cfg.backbone)
    stride = net.total_stride
    for size in (tuple(cfg.sampling.patch_size), cfg.roi_size):
        if any(s % t for s, t in zip(size, stride)):
            raise MedclConfigError("sampling.patch_size", f"{list(size)} is not a multiple of the backbone's "
                                                          f"total stride {list(stride)}")

    last = _check_resume(out, cfg, resume)
    init_info = accepted.info() if accepted is not None else None
    seen = sel.train + sel.validation
    unlabelled = list(sel.unlabelled) if cfg.semi.enabled else []
    if cfg.semi.enabled and not unlabelled:
        raise MedclConfigError("semi.enabled", "semi-supervised fine-tuning needs unlabelled cases (the split's pool, "
                                               "or cases outside the test set); there are none")
    if set(unlabelled) & set(sel.test):  # the selection's check refuses it too: never train on a test image
        raise MedclDataError(out, "an unlabelled case is a test case")
    images_seen = seen + [c for c in unlabelled if c not in set(seen)]
    record = RunRecord(kind="finetune", config=to_dict(cfg), plan=plan.to_dict(), cases_seen=images_seen,
                       test_cases=list(sel.test), patients_seen=sorted({by_id[c].patient for c in images_seen
                                                                        if by_id[c].patient}),
                       extra={"init": init_info, "provenance": init_info["provenance"] if init_info else "random init",
                              "labelled_cases": seen, "unlabelled_cases": unlabelled})
    folder = RunFolder(out, record)
    folder.begin(cfg, step=0)
    atomic_write_json(sel.to_dict(), out / "cases.json")
    if report is not None:
        report.to_json(out / "load_report.json")
        log.info("%s", report)
    if accepted is not None and (accepted.test_overlap or accepted.patient_overlap):
        warnings.warn(f"the init checkpoint saw test cases / patients (--allow-test-overlap): "
                      f"{accepted.test_overlap or accepted.patient_overlap}", stacklevel=3)
    if accepted is not None and accepted.provenance == "unknown":
        warnings.warn(f"{ckpt.path}: no run record: provenance unknown (--allow-unknown-provenance)", stacklevel=3)
    return _Job(cfg, out, manifest, labels, sel, plan, net, folder, init_info, last)


def _train(job: _Job, device: str, progress: bool, callbacks: list[Any] | None) -> tuple[Any, Any]:
    """Train for ``trainer.max_steps`` steps on class-balanced patches (resumable); returns (module, trainer)."""
    from medcl.engine.stream import StreamLoader, StreamSampler
    from medcl.engine.trainer import fit_or_interrupt, make_trainer, resolve_accelerator, use_channels_last
    from medcl.segment.data import PatchStream, build_augmentation
    from medcl.segment.module import SegmentationModule

    cfg, sel, labels = job.cfg, job.sel, job.labels
    accelerator = resolve_accelerator(device)
    module = SegmentationModule(job.net, cfg, labels.num_classes, labels.ignore_label, job.folder.record,
                                channels_last=use_channels_last(cfg.trainer, accelerator))
    stop = None
    if cfg.converge.enabled:
        from medcl.engine.convergence import ConvergenceStop

        c = cfg.converge
        stop = ConvergenceStop(c.min_steps, c.tail, c.tolerance, c.check_every)
        callbacks = [*(callbacks or []), stop]
    trainer = make_trainer(cfg.trainer, job.out, device=device, callbacks=callbacks, enable_progress_bar=progress)
    # the patch stream keeps its prepared volumes in RAM itself; a disk cache still saves decoding across runs
    train_cases = CaseDataset(labels.manifest, job.plan, cases=sel.train, with_label=True,
                              cache="none" if cfg.data.cache == "ram" else cfg.data.cache, cache_dir=cfg.data.cache_dir)
    stream: Any = PatchStream(train_cases, labels.num_classes, cfg.sampling.patch_size, cfg.seed,
                              cfg.sampling.class_ratios, build_augmentation(cfg.augment), labels.ignore_label)
    if cfg.semi.enabled:
        from medcl.segment.semi import SemiPatchStream, UnlabelledPatches

        unlabelled = job.folder.record["extra"]["unlabelled_cases"]
        # images only: the labels of the unlabelled cases are never read
        u_cases = CaseDataset(labels.manifest, job.plan, cases=unlabelled, with_label=False,
                              cache="none" if cfg.data.cache == "ram" else cfg.data.cache, cache_dir=cfg.data.cache_dir)
        per = max(1, -(-cfg.semi.unlabelled_batch // cfg.sampling.batch_size))
        stream = SemiPatchStream(stream, UnlabelledPatches(u_cases, cfg.sampling.patch_size, cfg.seed), per)
    sampler = StreamSampler(cfg.sampling.batch_size, cfg.trainer.max_steps * cfg.trainer.accumulate,
                            world_size=trainer.world_size, rank=trainer.global_rank)
    loader = StreamLoader(stream, sampler, num_workers=cfg.trainer.num_workers,
                          persistent_workers=cfg.trainer.num_workers > 0)
    loader.bind(lambda: trainer.global_step * cfg.trainer.accumulate)
    init = job.init_info
    log.info("fine-tuning on %d labelled volume(s)%s%s, %d classes, %d steps, init %s, mode %s", len(sel.train),
             f" (+{len(sel.validation)} for validation, inside the budget)" if sel.validation else "",
             f" and {len(job.folder.record['extra']['unlabelled_cases'])} unlabelled (semi-supervised)"
             if cfg.semi.enabled else "", labels.num_classes, cfg.trainer.max_steps,
             f"{init['checkpoint']} ({init['kind']})" if init else "random", cfg.optim.mode)
    fit_or_interrupt(trainer, module, train_dataloaders=loader, ckpt_path=str(job.last) if job.last is not None else None)
    job.converged_at = stop.stopped_at if stop is not None else None
    if trainer.global_step < cfg.trainer.max_steps and job.converged_at is None:
        raise MedclDataError(job.out, f"training stopped at step {trainer.global_step} of {cfg.trainer.max_steps}")
    return module, trainer


def _finish(job: _Job, module: Any, trainer: Any, device: str, t0: float) -> FinetuneResult:
    """Keep the last model, plot the losses, evaluate validation and test cases, write the summary."""
    from medcl.engine.metrics_log import merge_metrics
    from medcl.engine.plots import plot_curves
    from medcl.engine.trainer import resolve_accelerator
    from medcl.models import save_backbone
    from medcl.segment.inference import logits_fn

    cfg, out, sel, labels = job.cfg, job.out, job.sel, job.labels
    net = module.evaluation_network().to(memory_format=torch.contiguous_format).eval()
    model_path = out / "model.pt"
    if not trainer.is_global_zero:  # DDP: rank 0 saves and evaluates
        return FinetuneResult(out, sel, model_path=model_path)
    step = int(trainer.global_step)
    save_backbone(net, model_path, record={**job.folder.record, "complete": True, "step": step})
    curves = merge_metrics(out)
    if curves is not None:
        plot_curves(curves, out / "loss.png", title=f"fine-tuning {out.name}")

    dev = torch.device("cuda" if resolve_accelerator(device) == "gpu" else "cpu")
    net.to(dev)
    fn = logits_fn(net)
    result = FinetuneResult(out, sel, model_path=model_path)
    summary: dict[str, Any] = {"status": "done", "steps": int(trainer.global_step), "budget": sel.budget,
                               "combination": sel.combination, "n_train": len(sel.train),
                               "n_validation": len(sel.validation), "n_test": len(sel.test),
                               "validation_inside_budget": bool(sel.validation),
                               "init": job.init_info, "seed": cfg.seed, "lr": cfg.optim.lr, "mode": cfg.optim.mode,
                               "max_steps": cfg.trainer.max_steps}
    if cfg.converge.enabled:
        summary["converged"] = job.converged_at is not None
        summary["converged_at"] = job.converged_at
    if sel.validation:
        result.validation_rows = evaluate_cases(fn, job.manifest, job.plan, sel.validation, labels, cfg, dev)
        write_metrics_csv(result.validation_rows, out / "validation.csv")
        summary["validation"] = summarise(result.validation_rows)
    if sel.test:
        save_dir = out / "predictions" if cfg.eval.save_predictions else None
        result.test_rows = evaluate_cases(fn, job.manifest, job.plan, sel.test, labels, cfg, dev, save_dir)
        write_metrics_csv(result.test_rows, out / TEST_METRICS)
        summary["test"] = summarise(result.test_rows)
    summary["seconds"] = round(time.time() - t0, 1)
    result.summary = summary
    atomic_write_text(_summary_md(summary, labels), out / "summary.md")
    job.folder.finish(summary, step=step)
    if "test" in summary:
        t = summary["test"]
        log.info("test: Dice %.3f +- %.3f, HD95 %.2f mm, NSD %.3f over %d case(s) -> %s", t["dice_mean"],
                 t["dice_std"], t["hd95_mean"], t["nsd_mean"], t["n_cases"], out / TEST_METRICS)
    return result


def _summary_md(summary: dict[str, Any], labels: LabelInfo) -> str:
    lines = ["# Fine-tuning summary\n",
             f"- labelled volumes: {summary['n_train'] + summary['n_validation']} (budget {summary['budget']}); "
             f"trained on {summary['n_train']}, validation {summary['n_validation']}"
             + (" (inside the label budget)" if summary["n_validation"] else " (none: fixed schedule, last model)"),
             f"- steps: {summary['steps']}, lr {summary['lr']}, mode {summary['mode']}, seed {summary['seed']}",
             f"- init: {summary['init']['checkpoint'] if summary['init'] else 'random'}", ""]
    for part in ("validation", "test"):
        if part not in summary:
            continue
        s = summary[part]
        lines += [f"## {part} ({s['n_cases']} cases)", "", "| class | Dice | HD95 (mm) | NSD |", "|---|---|---|---|"]
        for k in range(1, labels.num_classes):
            n = labels.names[k]
            lines.append(f"| {n} | {s.get(f'dice_{n}', float('nan')):.3f} | {s.get(f'hd95_{n}', float('nan')):.2f} "
                         f"| {s.get(f'nsd_{n}', float('nan')):.3f} |")
        lines.append(f"| **mean** | {s['dice_mean']:.3f} +- {s['dice_std']:.3f} | {s['hd95_mean']:.2f} "
                     f"| {s['nsd_mean']:.3f} |")
        lines.append("")
    return "\n".join(lines)
