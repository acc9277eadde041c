"""Choose a fine-tuning recipe's knobs on a validation volume inside the label budget, before the final run.

A few-label claim is only as good as the way its knobs were chosen: never on test cases, and frozen before the
final run. This pilot is the pre-registered procedure of the README's "Few labels, near-full quality" table. It
uses **one labelled combination** of a label-budget split (``medcl split``; default: combination 0 at N = 2): its
first volume trains, its second is the validation volume; the test set is never read (the selections below have
no test cases). Stages, each a grid of fine-tunes scored by mean validation Dice over ``--seeds``:

``supervised``  random init, the strong augmentation on the labelled patches too (the fair baseline):
                learning rate x steps. Chosen: the best learning rate, and the smallest step count whose
                validation Dice is within 0.01 of the best step count's (the plateau; capped at 1500 steps).
``semi``        random init, the unlabelled pool (the split's pool minus the validation volume, images only),
                at the chosen steps, ramped up over the first quarter: learning rate (default: the supervised
                stage's) x consistency (hard pseudo-labels at each ``--thresholds``, and the soft ``mse``).
``mae``         MAE pretraining steps on the pool (``configs/pretrain/mae.yaml``), each fine-tuned with the chosen
                supervised recipe.

Outputs in ``--out``: ``pilot.csv`` (one row per fine-tune), ``choices.json`` (what the final run uses),
``pilot.png`` (validation Dice against steps per learning rate: the plateau curve of the baseline). Rerunning the
command skips finished fine-tunes.

    python examples/recipe_pilot.py --data ../shared/data/hippocampus --split runs/hip/split.json \\
        --out runs/hip/pilot
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from medcl.config import load_config
from medcl.core.files import atomic_write_json, write_csv
from medcl.core.logs import configure_logging
from medcl.core.runfolder import run_is_complete
from medcl.segment.config import FinetuneConfig
from medcl.segment.prepare import CaseSelection

log = logging.getLogger("recipe_pilot")
ROOT = Path(__file__).resolve().parents[1]
PLATEAU = 0.01  # validation Dice within this of the best step count counts as the plateau
STEPS = [250, 500, 1000, 1500]
LRS = [1.0e-3, 3.0e-3, 1.0e-2]
THRESHOLDS = [0.7, 0.9]
SEMI_MODES = ["pseudo", "mse"]
MAE_STEPS = [300, 1500]


def selection(split: dict[str, Any], budget: int, combination: int) -> CaseSelection:
    """First volume of the combination trains, the second validates; the pool minus it is unlabelled."""
    cases = split["budgets"][str(budget)][combination]
    if len(cases) < 2:
        raise SystemExit(f"recipe_pilot: budget {budget} has fewer than 2 volumes: nothing to validate on")
    train, val = list(cases[:-1]), [cases[-1]]
    pool = [c for c in split["pool"] if c not in val]
    return CaseSelection(train=train, validation=val, test=[], budget=budget, combination=combination,
                         source="pilot", unlabelled=pool)


def finetune(args: argparse.Namespace, sel: CaseSelection, name: str, overrides: list[str],
             init: str | None = None) -> float:
    """One fine-tune (skipped when finished); its mean validation Dice."""
    from medcl.segment.finetune import run_finetune

    out = Path(args.out) / "runs" / name
    if not run_is_complete(out):
        cfg = load_config(FinetuneConfig, args.finetune_config,
                          ["augment.strong.labelled=true", "trainer.ckpt_every=0", *overrides])
        cfg.init.checkpoint = init
        run_finetune(cfg, args.data, out, selection=sel, overwrite=True, device="cpu", progress=False)
    summary = json.loads((out / "summary.json").read_text())
    return float(summary["validation"]["dice_mean"])


def _mean_by(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, float]:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r["val_dice"])
    return {k: statistics.fmean(v) for k, v in groups.items()}


def stage_supervised(args, sel, rows) -> dict[str, Any]:
    for lr in args.lrs:
        for steps in args.steps:
            for seed in args.seeds:
                d = finetune(args, sel, f"supervised/lr{lr:g}/s{steps}/seed{seed}",
                             [f"optim.lr={lr}", f"trainer.max_steps={steps}", f"seed={seed}"])
                rows.append({"stage": "supervised", "lr": lr, "steps": steps, "mode": "", "threshold": "", "mae_steps": "",
                             "seed": seed, "val_dice": d})
                log.info("supervised lr=%g steps=%d seed=%d: validation Dice %.3f", lr, steps, seed, d)
    means = _mean_by([r for r in rows if r["stage"] == "supervised"], ("lr", "steps"))
    best_lr = max(args.lrs, key=lambda lr: max(means[(lr, s)] for s in args.steps))
    top = max(means[(best_lr, s)] for s in args.steps)
    steps = min(s for s in args.steps if means[(best_lr, s)] >= top - PLATEAU)
    return {"lr_supervised": best_lr, "steps": steps, "supervised_val_dice": means[(best_lr, steps)]}


def semi_settings(args) -> list[tuple[str, float]]:
    """(mode, threshold) pairs of the semi grid: ``pseudo`` at each threshold, ``mse`` once (no threshold)."""
    out: list[tuple[str, float]] = []
    for mode in args.semi_modes:
        out += [(mode, t) for t in args.thresholds] if mode == "pseudo" else [(mode, 0.0)]
    return out


def stage_semi(args, sel, rows, chosen) -> dict[str, Any]:
    steps = chosen["steps"]
    lrs = args.semi_lrs or [chosen["lr_supervised"]]
    for lr in lrs:
        for mode, thr in semi_settings(args):
            for seed in args.seeds:
                tag = f"t{thr:g}" if mode == "pseudo" else mode
                d = finetune(args, sel, f"semi/lr{lr:g}/{tag}/seed{seed}",
                             [f"optim.lr={lr}", f"trainer.max_steps={steps}", f"seed={seed}", "semi.enabled=true",
                              f"semi.mode={mode}", f"semi.threshold={thr}", f"semi.rampup_steps={steps // 4}"])
                rows.append({"stage": "semi", "lr": lr, "steps": steps, "mode": mode, "threshold": thr,
                             "mae_steps": "", "seed": seed, "val_dice": d})
                log.info("semi lr=%g %s threshold=%g seed=%d: validation Dice %.3f", lr, mode, thr, seed, d)
    means = _mean_by([r for r in rows if r["stage"] == "semi"], ("lr", "mode", "threshold"))
    (lr, mode, thr), best = max(means.items(), key=lambda kv: kv[1])
    return {"lr_semi": lr, "semi_mode": mode, "threshold": thr, "rampup_steps": steps // 4, "semi_val_dice": best,
            "semi_beats_supervised": best > chosen["supervised_val_dice"]}


def stage_mae(args, sel, rows, chosen) -> dict[str, Any]:
    from medcl.pretrain import run_pretrain

    for n in args.mae_steps:
        out = Path(args.out) / "pretrain" / f"mae{n}"
        if not run_is_complete(out):
            run_pretrain(str(ROOT / "configs/pretrain/mae.yaml"), args.data, out, max_steps=n, cases=sel.unlabelled,
                         overwrite=True, device="cpu", progress=False)
        for seed in args.seeds:
            d = finetune(args, sel, f"mae{n}/seed{seed}", [f"optim.lr={chosen['lr_supervised']}",
                                                           f"trainer.max_steps={chosen['steps']}", f"seed={seed}"],
                         init=str(out / "backbone.pt"))
            rows.append({"stage": "mae", "lr": chosen["lr_supervised"], "steps": chosen["steps"], "mode": "", "threshold": "",
                         "mae_steps": n, "seed": seed, "val_dice": d})
            log.info("mae %d steps seed=%d: validation Dice %.3f", n, seed, d)
    means = _mean_by([r for r in rows if r["stage"] == "mae"], ("mae_steps",))
    (n,), best = max(means.items(), key=lambda kv: kv[1])
    return {"mae_steps": n, "mae_val_dice": best}


def plot(args: argparse.Namespace, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    from medcl.engine.plots import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = _mean_by([r for r in rows if r["stage"] == "supervised"], ("lr", "steps"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for lr in args.lrs:
        ax.plot(args.steps, [means[(lr, s)] for s in args.steps], marker="o", label=f"lr {lr:g}")
    ax.set(xlabel="fine-tuning steps", ylabel="validation Dice", title="random init, supervised (pilot)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True, help="label-budget split JSON (medcl split)")
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=int, default=2)
    p.add_argument("--combination", type=int, default=0)
    p.add_argument("--seeds", type=_ints, default=[0, 1], help="comma-separated seeds averaged per setting")
    p.add_argument("--steps", type=_ints, default=STEPS, help="supervised step counts (default 250,500,1000,1500)")
    p.add_argument("--lrs", type=_floats, default=LRS, help="learning rates (default 1e-3,3e-3,1e-2)")
    p.add_argument("--thresholds", type=_floats, default=THRESHOLDS, help="semi pseudo-label thresholds (0.7,0.9)")
    p.add_argument("--semi-modes", type=lambda t: t.split(","), default=SEMI_MODES,
                   help="semi consistency modes (pseudo,mse)")
    p.add_argument("--semi-lrs", type=_floats, default=None,
                   help="semi learning rates (default: the one the supervised stage chose)")
    p.add_argument("--mae-steps", type=_ints, default=MAE_STEPS, help="MAE pretraining step counts")
    p.add_argument("--finetune-config", default=str(ROOT / "configs/finetune/hippocampus.yaml"))
    p.add_argument("--stages", default="supervised,semi,mae")
    args = p.parse_args(argv)
    split = json.loads(Path(args.split).read_text())
    sel = selection(split, args.budget, args.combination)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    chosen: dict[str, Any] = {"combination": args.combination, "budget": args.budget, "train": sel.train,
                              "validation": sel.validation, "seeds": args.seeds}
    stages = args.stages.split(",")
    chosen.update(stage_supervised(args, sel, rows))
    plot(args, rows, out / "pilot.png")
    if "semi" in stages:
        chosen.update(stage_semi(args, sel, rows, chosen))
    if "mae" in stages:
        chosen.update(stage_mae(args, sel, rows, chosen))
    write_csv(out / "pilot.csv", rows)
    atomic_write_json(chosen, out / "choices.json")
    log.info("choices: %s", json.dumps(chosen))
    return chosen


if __name__ == "__main__":
    main()
