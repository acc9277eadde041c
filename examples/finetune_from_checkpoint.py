"""Fine-tune a pretrained backbone with two labelled volumes, test it, and predict a new volume in its own geometry.

1. a pretraining checkpoint: ``--ckpt`` (a run folder, ``backbone.pt`` or ``last.ckpt``), or a short gd+local
   pretraining here (:func:`medcl.pretrain.run_pretrain`) on every case *except* the test cases -- the
   fine-tuning refuses a checkpoint whose run record says it saw a test case;
2. :func:`medcl.segment.run_finetune` with ``configs/finetune/phantoms.yaml`` (``--config``): the checkpoint's
   architecture and preprocessing plan, stages ``init.load`` copied (the load report says which weights were
   loaded, adapted, missing), 2 labelled volumes, a fixed step budget, then Dice / HD95 / NSD on the test cases;
3. :func:`medcl.segment.load_model` + :func:`medcl.segment.predict_to_folder`: one volume predicted on its
   original voxel grid (same shape and affine as the input file).

    python examples/finetune_from_checkpoint.py                 # synthetic phantoms in a temp folder
    python examples/finetune_from_checkpoint.py --data ../shared/data/hippocampus \\
        --config configs/finetune/hippocampus.yaml --steps 250 --pretrain-steps 300 --out runs/ft_example
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from medcl.core.device import resolve_device, torch_threads
from medcl.data import load_manifest, write_phantom_dataset
from medcl.io import read_volume
from medcl.pretrain import run_pretrain
from medcl.segment import load_finetune_config, load_model, predict_to_folder, run_finetune
from medcl.segment.prepare import CaseSelection

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="an MSD-style labelled dataset (default: 6 synthetic phantoms)")
    ap.add_argument("--ckpt", help="pretraining checkpoint or run folder (default: pretrain briefly here)")
    ap.add_argument("--config", default=str(CONFIGS / "finetune" / "phantoms.yaml"), help="fine-tuning YAML")
    ap.add_argument("--out", help="output folder (default: a temporary folder)")
    ap.add_argument("--steps", type=int, help="fine-tuning steps (default: the config's trainer.max_steps)")
    ap.add_argument("--pretrain-steps", type=int, default=40)
    ap.add_argument("--labelled", type=int, default=2)
    ap.add_argument("--test", type=int, default=2, help="test cases (never seen by pretraining)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a busy CPU; 0: default)")
    args = ap.parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out or tempfile.mkdtemp(prefix="medcl_finetune_"))
    data = Path(args.data) if args.data else write_phantom_dataset(out / "phantoms", n=6, size=24, seed=0)

    ids = [c.id for c in load_manifest(data).cases if c.label is not None]
    test, labelled = ids[-args.test:], ids[: args.labelled]
    steps = [f"trainer.max_steps={args.steps}"] if args.steps else []
    cfg = load_finetune_config(args.config, [*steps, "trainer.ckpt_every=0"])
    ckpt = args.ckpt
    if ckpt is None:  # gd+local with the fine-tuning network's architecture, on every non-test case
        patch = list(cfg.sampling.patch_size)
        ckpt = run_pretrain(
            CONFIGS / "pretrain" / "gd_local.yaml", data, out / "pretrain", cases=ids[: -args.test],
            max_steps=args.pretrain_steps, device=args.device, progress=False,
            overrides=[f"backbone.filters={list(cfg.backbone.filters)}",
                       f"backbone.strides={[list(s) if isinstance(s, tuple) else s for s in cfg.backbone.strides]}",
                       f"views.partition.crop={patch}", f"monitor.probe_crop={patch}", "monitor.probe_every=0",
                       "data.volumes_per_step=2", "data.probe_volumes=0", "trainer.num_workers=0",
                       "trainer.ckpt_every=0", "optim.lr_warmup_steps=0"])
    cfg.init.checkpoint = str(ckpt)

    # fine-tune: the load report is printed (and written to load_report.json), then the test metrics
    selection = CaseSelection(train=labelled, test=test, budget=len(labelled), source="explicit")
    result = run_finetune(cfg, data, out / "finetune", selection=selection, device=args.device, progress=False)
    report = json.loads((out / "finetune" / "load_report.json").read_text())
    t = result.summary["test"]
    print(f"\nloaded {len(report['loaded'])} tensors from {report['source']}; new (random): "
          f"{sorted({k.split('.')[0] for k in report['missing']})}; mismatched: {len(report['mismatched'])}")
    print(f"test Dice {t['dice_mean']:.3f} +- {t['dice_std']:.3f} over {t['n_cases']} case(s) "
          f"with {len(labelled)} labelled volumes and {result.summary['steps']} steps")

    # predict one volume in its original geometry with the saved model (model.pt holds plan + run record)
    dev = resolve_device(args.device)
    model = load_model(result.model_path, device=dev)
    image = load_manifest(data).case(test[0]).images[0]
    pred_path = predict_to_folder(model, image, out / "predictions", device=dev)[0]
    src, pred = read_volume(image), read_volume(pred_path, is_label=True)
    same = src.array.shape[1:] == pred.array.shape[1:] and bool((abs(src.affine - pred.affine) < 1e-4).all())
    print(f"prediction -> {pred_path} (shape {pred.array.shape[1:]}, same grid as the input: {same})")
    return {"out": out, "checkpoint": Path(ckpt), "load_report": report, "summary": result.summary,
            "test_cases": test, "labelled": labelled, "prediction": pred_path, "same_geometry": same}


if __name__ == "__main__":
    main()
