"""A custom pretraining method from medcl's core pieces in a plain PyTorch loop, and the same method as a YAML
config for ``medcl pretrain``.

The method: global contrast with domain-specific partition positives on the bottleneck (G^D, Chaitanya et al.,
NeurIPS 2020: crops from the same superior-inferior partition of *any* volume are positives) plus masked
reconstruction from the last decoder stage (SimMIM / MAE style block masking), both on the same masked views:
``CaseDataset -> PartitionViewSampler -> BlockMasking -> backbone -> {ProjectionMLP -> info_nce(gd_masks),
ReconstructionHead -> masked_reconstruction_loss}``.

Writes ``OUT/backbone.pt`` (weights + run record: ``medcl finetune --init OUT/backbone.pt`` reads it) and
``OUT/method.yaml``, the same method for ``medcl pretrain --config OUT/method.yaml --data DATA --out RUN``, which
adds Lightning, multi-GPU, checkpoints, exact resume and label-free probes (``--run-config`` runs it here).

    python examples/custom_pretraining.py                      # synthetic phantoms in a temp folder
    python examples/custom_pretraining.py --data ../shared/data/hippocampus --steps 300 --out runs/custom
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
import yaml

from medcl.config import load_config
from medcl.core.device import resolve_device, torch_threads
from medcl.core.provenance import ViewBatch
from medcl.core.record import RunRecord
from medcl.data import CaseDataset, PreprocessingPlan, load_manifest, write_phantom_dataset
from medcl.losses import gd_masks, info_nce, masked_reconstruction_loss
from medcl.models import BackboneConfig, ProjectionMLP, ReconstructionHead, build_backbone, save_backbone
from medcl.pretrain import PretrainConfig, run_pretrain
from medcl.views import BlockMasking, CropSpec, PartitionViewSampler, SourceVolume
from medcl.views.augment import IntensityAugment, SpatialAugment

CROP, PARTITIONS, MASK_RATIO, MASK_BLOCK, TEMPERATURE, LR = 16, 4, 0.5, 4, 0.1, 1e-3


def method_config(plan: PreprocessingPlan, arch: BackboneConfig, volumes_per_step: int, steps: int) -> dict:
    """The same method as a ``medcl pretrain`` config (``medcl.pretrain.PretrainConfig`` as a dict)."""
    return {
        "method": "gd+reconstruction", "seed": 0,
        "data": {"plan": plan.to_dict(), "cache": "ram", "volumes_per_step": volumes_per_step, "probe_volumes": 0},
        "backbone": {"name": "dynunet", "filters": list(arch.filters), "strides": list(arch.strides)},
        "views": {"partition": {
            "kind": "partition", "crop": [CROP] * 3, "partitions": PARTITIONS, "copies": 2,
            "augment": {"flip_prob": 0.0, "rot90_prob": 0.0, "scale_prob": 0.5, "scale_range": [0.85, 1.15]},
            "mask_ratio": MASK_RATIO, "mask_block": MASK_BLOCK}},
        "terms": {"global": {"kind": "contrastive", "views": "partition", "strategy": "gd", "stage": "bottleneck",
                             "pool": "flatten", "temperature": TEMPERATURE, "mode": "per_pair"},
                  "recon": {"kind": "reconstruction", "views": "partition", "stage": "decoder.last", "loss": "l1"}},
        "optim": {"lr": LR, "lr_warmup_steps": 0, "min_lr_ratio": 1.0},  # constant LR, as the loop below
        "trainer": {"max_steps": steps, "ckpt_every": 0, "num_workers": 0, "log_every": 1},
        "monitor": {"probe_every": 0, "probe_crop": [CROP] * 3}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="any dataset `medcl data check` accepts (default: 6 synthetic phantoms)")
    ap.add_argument("--out", help="output folder (default: a temporary folder)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--volumes-per-step", type=int, default=2)
    ap.add_argument("--run-config", action="store_true", help="also run the YAML config with medcl.pretrain")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a busy CPU; 0: default)")
    args = ap.parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out or tempfile.mkdtemp(prefix="medcl_custom_"))
    data = Path(args.data) if args.data else write_phantom_dataset(out / "phantoms", n=6, size=32, seed=0)

    # 1. volumes: decoded and preprocessed once, then served from RAM
    manifest = load_manifest(data)
    plan = PreprocessingPlan.for_manifest(manifest, foreground="nonzero")
    volumes = CaseDataset(manifest, plan, with_label=False, cache="ram")
    # 2. views: one 16^3 crop per S-partition and an augmented copy of it, then block masking
    sampler = PartitionViewSampler(
        CropSpec(CROP), partitions=PARTITIONS, n_aug=1, intensity=IntensityAugment(),
        augment=SpatialAugment(flip_prob=0.0, rot90_prob=0.0, scale_prob=0.5, scale_range=(0.85, 1.15)))
    masking = BlockMasking(MASK_RATIO, MASK_BLOCK)
    # 3. backbone with named stages and two heads
    arch = BackboneConfig(in_channels=max(1, len(manifest.channel_names)), filters=(8, 16, 32), strides=(1, 2, 2))
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    net = build_backbone(arch).to(dev)
    last = net.decoder_stage_names[-1]
    # flattened bottleneck: after instance norm a spatial mean would carry almost nothing to contrast
    flat = net.stage_channels["bottleneck"] * math.prod(CROP // s for s in net.stage_strides["bottleneck"])
    proj = ProjectionMLP(flat, hidden_dim=256, out_dim=128).to(dev)
    recon = ReconstructionHead(net.stage_channels[last], arch.in_channels, net.stage_strides[last]).to(dev)
    opt = torch.optim.AdamW([*net.parameters(), *proj.parameters(), *recon.parameters()], lr=LR, weight_decay=1e-5)

    history = []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        picks = torch.randperm(len(volumes), generator=g)[: args.volumes_per_step].tolist()
        vb = masking(ViewBatch.cat([sampler(SourceVolume.from_item(volumes[i], source_id=i), g) for i in picks]), g)
        vb = vb.to(dev)  # views, masks and provenance: the masks below are built on the device
        feats = net(vb.views, upto=last)  # encoder, bottleneck and decoder up to `last` (no segmentation head)
        uid = torch.arange(len(vb), device=dev)
        pos, excl = gd_masks(vb.partition, uid, vb.partition, uid)  # positives: same partition, any volume
        z = proj(feats.bottleneck.flatten(1))
        l_global = info_nce(z, z, pos, excl, temperature=TEMPERATURE, mode="per_pair").loss
        l_recon = masked_reconstruction_loss(recon(feats.stage(last)), vb.target, vb.mask, kind="l1")
        opt.zero_grad(set_to_none=True)
        (l_global + l_recon).backward()
        opt.step()
        history.append(torch.stack([l_global, l_recon]).detach())  # read back only when printed
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  G^D InfoNCE {history[-1][0]:.4f}  reconstruction {history[-1][1]:.4f}")

    # 4. the backbone alone, with a run record (what fine-tuning and `medcl predict` read)
    cfg = method_config(plan, arch, args.volumes_per_step, args.steps)
    record = RunRecord(kind="pretrain", config=cfg, plan=plan.to_dict(), cases_seen=volumes.ids).to_dict()
    save_backbone(net, out / "backbone.pt", record)  # tensors are moved to the CPU
    # 5. the same method as a config: validated here, runnable with `medcl pretrain --config`
    (out / "method.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    load_config(PretrainConfig, out / "method.yaml").validate()
    print(f"\nbackbone -> {out / 'backbone.pt'}\nthe same method as a config -> {out / 'method.yaml'}:\n"
          f"  medcl pretrain --config {out / 'method.yaml'} --data {data} --out RUN_DIR")
    config_run = None
    if args.run_config:
        config_run = run_pretrain(out / "method.yaml", data, out / "config_run", max_steps=args.steps,
                                  device=args.device, progress=False)
        print(f"config route -> {config_run}")
    return {"out": out, "data": data, "losses": torch.stack(history).cpu(), "backbone": out / "backbone.pt",
            "config": out / "method.yaml", "config_run": config_run, "heads": {"global": proj, "recon": recon}}


if __name__ == "__main__":
    main()
