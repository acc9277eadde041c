"""``medcl demo``: the main job on the embedded default, end to end, in minutes on a laptop CPU.

1. data: synthetic torso phantoms (no download), or ``--data`` (any MSD-style folder);
2. a split: a fixed test set, 2 labelled volumes, the rest unlabelled;
3. pretraining (``gd+local``, Chaitanya et al., 2020) on every non-test volume, labels ignored;
4. fine-tuning with the 2 labelled volumes, from the pretrained weights and from random initialisation,
   with the same recipe, steps and seeds;
5. testing in the original geometry; a table, ``dice.png`` (Dice per init), ``examples.png`` (slices with
   the ground truth and both predictions), ``summary.json`` and ``summary.md``.

The recipes are YAML files shipped with medcl (``medcl/recipes/demo_*.yaml``); ``medcl report DIR`` turns
the folder into one HTML page.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcl.config import to_dict
from medcl.core.device import resolve_device
from medcl.core.files import atomic_write_json, atomic_write_text
from medcl.core.record import RunRecord
from medcl.core.runfolder import RunFolder, prepare_run_folder, run_is_complete, test_metrics_path

log = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parent / "recipes"
INITS = ("pretrained", "random")


def _recipe(name: str) -> Path:
    path = RECIPES / name
    if not path.is_file():
        from medcl.core.errors import MedclConfigError

        raise MedclConfigError(name, f"demo recipe missing from the installation: {path}")
    return path


def make_split(ids: Sequence[str], n_test: int, n_labelled: int, seed: int) -> dict[str, list[str]]:
    """A fixed test set, ``n_labelled`` labelled volumes and the pool (every non-test volume)."""
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    test = sorted(order[:n_test])
    labelled = sorted(order[n_test : n_test + n_labelled])
    pool = sorted(i for i in ids if i not in set(test))
    return {"test": test, "labelled": labelled, "pool": pool}


@dataclass
class DemoConfig:
    """What ``medcl demo`` ran with (its ``config.yaml``)."""

    data: str | None = None
    n_phantoms: int = 24
    phantom_size: int = 32
    n_test: int = 8
    n_labelled: int = 2
    pretrain_steps: int | None = None
    finetune_steps: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    device: str = "auto"


def run_demo(
    out: str | Path = "runs/demo",
    device: str = "auto",
    data: str | Path | None = None,
    *,
    n_phantoms: int = 24,
    phantom_size: int = 32,
    n_test: int = 8,
    n_labelled: int = 2,
    pretrain_steps: int | None = None,
    finetune_steps: int | None = None,
    seeds: Sequence[int] = (0, 1),
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the summary (also ``out/summary.json``). Rerunning into the same ``out``
    resumes (finished runs are kept); ``overwrite`` starts again in an emptied folder."""

    from medcl.data import load_manifest, write_phantom_dataset
    from medcl.engine.trainer import last_checkpoint
    from medcl.pretrain.run import run_pretrain
    from medcl.segment.finetune import run_finetune
    from medcl.segment.prepare import CaseSelection, load_finetune_config

    t0 = time.time()
    out = Path(out)
    config = DemoConfig(None if data is None else str(data), n_phantoms, phantom_size, n_test, n_labelled,
                        pretrain_steps, finetune_steps, [int(s) for s in seeds], device)
    prepare_run_folder(out, "demo", overwrite=overwrite, rerun_resumes=True,
                       inputs=[data] if data is not None else [])
    folder = RunFolder(out, RunRecord(kind="demo", config=to_dict(config)))
    folder.begin(config)
    on_data = data is not None
    steps_total = 4 + 2 * len(seeds)
    step = [0]

    def stage(text: str) -> None:
        step[0] += 1
        log.info("[%d/%d] %s (%.0f s)", step[0], steps_total, text, time.time() - t0)

    if not on_data:
        stage(f"writing {n_phantoms} synthetic phantoms of {phantom_size}^3 voxels")
        data = out / "data"
        if not (data / "dataset.json").is_file():
            write_phantom_dataset(data, n=n_phantoms, size=phantom_size, seed=0)
    else:
        stage(f"reading {data}")
    manifest = load_manifest(data)
    ids = sorted(c.id for c in manifest.cases if c.label)
    if len(ids) < n_test + n_labelled + 2:
        from medcl.core.errors import MedclDataError

        raise MedclDataError(data, f"the demo needs at least {n_test + n_labelled + 2} labelled volumes, found {len(ids)}")
    split = make_split(ids, n_test, n_labelled, seed=0)
    atomic_write_json(split, out / "split.json")

    kind = "data" if on_data else "phantoms"
    pre_cfg = _recipe(f"demo_pretrain_{kind}.yaml")
    ft_cfg = _recipe(f"demo_finetune_{kind}.yaml")
    stage(f"pretraining gd+local on {len(split['pool'])} volumes (test volumes excluded, labels ignored)")
    pre_dir = out / "pretrain"
    if not run_is_complete(pre_dir) or not (pre_dir / "backbone.pt").is_file():
        run_pretrain(pre_cfg, data, pre_dir, max_steps=pretrain_steps, device=device, cases=split["pool"],
                     resume=last_checkpoint(pre_dir) is not None, overwrite=last_checkpoint(pre_dir) is None,
                     progress=progress)

    results: dict[str, list[dict[str, Any]]] = {i: [] for i in INITS}
    for seed in seeds:
        for init in INITS:
            stage(f"fine-tuning from {init} weights on {n_labelled} labelled volumes (seed {seed})")
            overrides = [f"seed={seed}"] + ([f"trainer.max_steps={finetune_steps}"] if finetune_steps else [])
            if init == "pretrained":
                overrides.append(f"init.checkpoint={pre_dir / 'backbone.pt'}")
            cfg = load_finetune_config(ft_cfg, overrides)
            run_dir = out / f"finetune_{init}_seed{seed}"
            if run_is_complete(run_dir) and (run_dir / "summary.json").is_file():
                summary = json.loads((run_dir / "summary.json").read_text())
            else:
                res = run_finetune(cfg, data, run_dir, resume=True, selection=CaseSelection(train=split["labelled"], test=split["test"],
                                   budget=n_labelled, source="demo"), device=device, progress=progress)
                summary = res.summary
            results[init].append({"seed": seed, "run": run_dir.name, **summary["test"]})
    stage("testing, plotting and writing the summary")
    per_case = {init: _per_case_dice(out, [r["run"] for r in results[init]]) for init in INITS}
    table = _table(results, per_case)
    summary = {
        "kind": "demo",
        "data": str(data),
        "split": {k: len(v) for k, v in split.items()},
        "seeds": list(seeds),
        "results": results,
        "table": table,
        "seconds": round(time.time() - t0, 1),
        "device": resolve_device(device).type,
    }
    atomic_write_text(_markdown(table, summary), out / "summary.md")
    _plot_dice(per_case, out / "dice.png")
    _plot_examples(out, data, split["test"][:3], out / "examples.png")
    folder.finish(summary, step=len(seeds) * len(INITS))
    log.info("%s", _markdown(table, summary))
    return summary


def _per_case_dice(out: Path, runs: list[str]) -> list[float]:
    """Mean-over-classes Dice of every test case of every run (``test_metrics.csv`` rows)."""
    import csv

    by_case: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        with open(test_metrics_path(out / run), newline="") as f:
            for row in csv.DictReader(f):
                try:
                    v = float(row.get("dice", "nan"))
                except ValueError:
                    continue
                if not math.isnan(v):
                    by_case.setdefault((run, row.get("case", "")), []).append(v)
    return [float(np.mean(v)) for v in by_case.values()]


def _table(results: dict[str, list[dict[str, Any]]], per_case: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = []
    for init in INITS:
        runs = results[init]
        rows.append({
            "init": init,
            "dice_mean": float(np.mean([r["dice_mean"] for r in runs])),
            "dice_std_over_cases": float(np.std(per_case[init])) if per_case[init] else float("nan"),
            "hd95_mm": float(np.nanmean([r.get("hd95_mean", np.nan) for r in runs])),
            "nsd": float(np.nanmean([r.get("nsd_mean", np.nan) for r in runs])),
            "runs": len(runs),
        })
    return rows


def _markdown(table: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = ["| init | Dice (mean over test cases, classes, seeds) | std over cases | HD95 (mm) | NSD | runs |",
             "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['init']} | {r['dice_mean']:.3f} | {r['dice_std_over_cases']:.3f} | {r['hd95_mm']:.2f} | "
                     f"{r['nsd']:.3f} | {r['runs']} |")
    d = {r["init"]: r["dice_mean"] for r in table}
    gain = d["pretrained"] - d["random"]
    lines += ["", f"pretrained - random: {gain:+.3f} Dice (same data, steps, recipe and seeds); "
              f"{summary['split']['labelled']} labelled volumes, {summary['split']['test']} test volumes, "
              f"{summary['split']['pool']} volumes for pretraining; {summary['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def _plot_dice(per_case: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medcl.engine.plots import save_figure

    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    data = [per_case[i] for i in INITS]
    ax.boxplot(data, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for k, vals in enumerate(data, start=1):
        ax.scatter(k + rng.uniform(-0.12, 0.12, len(vals)), vals, s=12, alpha=0.7, color=["tab:orange", "tab:blue"][k - 1])
    ax.set_xticks([1, 2], [f"{i}\n(mean {np.mean(per_case[i]):.3f})" for i in INITS])
    ax.set_ylabel("Dice per test case (mean over classes)")
    ax.set_title("Fine-tuned with 2 labelled volumes", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _plot_examples(out: Path, data: str | Path, cases: list[str], path: Path) -> None:
    """Coronal slices of test cases: image with ground truth, pretrained and random predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from medcl.data import load_case, load_manifest
    from medcl.engine.plots import save_figure
    from medcl.segment.inference import logits_fn
    from medcl.segment.predict import load_model, predict_volume

    manifest = load_manifest(data)
    models = {init: load_model(out / f"finetune_{init}_seed0" / "model.pt") for init in INITS}
    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3 * len(cases)), squeeze=False)
    for row, case_id in enumerate(cases):
        image, label = load_case(manifest.case(case_id), manifest)
        img = image.array[0]
        lab = label.array[0] if label is not None else np.zeros_like(img)
        preds = {}
        for init, m in models.items():
            with torch.no_grad():
                probs = predict_volume(logits_fn(m.backbone), image, m.plan, m.inference, m.roi_size)
            preds[init] = probs.argmax(0).numpy()
        y = int(np.argmax((lab > 0).sum(axis=(0, 2)))) if lab.any() else img.shape[1] // 2
        panels = [("ground truth", lab), ("pretrained", preds["pretrained"]), ("random init", preds["random"])]
        for col, (title, seg) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img[:, y, :].T, origin="lower", cmap="gray")
            masked = np.ma.masked_where(seg[:, y, :].T == 0, seg[:, y, :].T)
            ax.imshow(masked, origin="lower", cmap="tab10", vmin=0, vmax=9, alpha=0.55, interpolation="nearest")
            ax.set_title(f"{case_id}: {title}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
