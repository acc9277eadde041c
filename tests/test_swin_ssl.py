"""MONAI's self-supervised Swin UNETR weights (Tang et al., CVPR 2022) into medcl's SwinUNETR backbone (issue 19):
the SSLHead checkpoint layouts and the released ``model_swinvit.pt`` layout, written from a state dict of MONAI's
own ``SwinUNETR``, load every Swin encoder tensor (the heads reported unexpected), give MONAI's encoder outputs,
describe their own architecture, and ``medcl finetune --init`` takes them with the load report."""

from __future__ import annotations

import json
import logging

import monai  # noqa: F401  (imported once per session)
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR

from medcl.cli import main
from medcl.data import write_phantom_dataset
from medcl.models import BackboneConfig, build_backbone, load_backbone
from medcl.segment.init import read_checkpoint

ARCH = {"feature_size": 12, "depths": (2, 1, 1, 2), "num_heads": (3, 6, 6, 12)}


def _monai_swin(seed: int = 0) -> SwinUNETR:
    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=2, window_size=7, normalize=True, **ARCH).eval()


def _swin_vit(ref: SwinUNETR) -> dict[str, torch.Tensor]:
    """MONAI's Swin encoder (``swinViT``) alone, keys relative to it."""
    return {k: v.clone() for k, v in ref.swinViT.state_dict().items()}


def _heads() -> dict[str, torch.Tensor]:
    """SSLHead's rotation, contrastive and reconstruction modules (dim = 16 * feature_size)."""
    d = 16 * ARCH["feature_size"]
    return {"rotation_head.weight": torch.randn(4, d), "rotation_head.bias": torch.randn(4),
            "contrastive_head.weight": torch.randn(512, d), "contrastive_head.bias": torch.randn(512),
            "conv.0.weight": torch.randn(d // 2, d, 3, 3, 3), "conv.0.bias": torch.randn(d // 2)}


def ssl_head_ddp(vit):  # SwinUNETR/Pretrain main.py under DDP: {"epoch", "state_dict", "optimizer"}
    sd = {f"module.swinViT.{k}": v for k, v in vit.items()} | {f"module.{k}": v for k, v in _heads().items()}
    return {"epoch": 100, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, "module.", set(_heads())


def ssl_head_old(vit):  # older ssl_head.py names the encoder swin_vit; one process, no module.
    sd = {f"swin_vit.{k}": v for k, v in vit.items()} | _heads()
    return {"global_step": 300, "state_dict": sd}, "", set(_heads())


def model_swinvit(vit):  # the released model_swinvit.pt read by SwinUNETR.load_from: timm-style fc1/fc2 MLPs
    sd = {f"module.{k}".replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
          for k, v in vit.items()}
    return {"state_dict": sd}, "module.", set()


def _hidden_states(net, x: torch.Tensor) -> list[torch.Tensor]:
    """medcl's Swin token maps after the patch embedding and each Swin stage, layer-normalised over channels
    (what ``SwinTransformer.forward(x, normalize=True)`` returns)."""
    out, tokens = [], x
    for stage in [*net.encoder[1:], net.bottleneck]:
        tokens, _ = stage(tokens)
        out.append(F.layer_norm(tokens.movedim(1, -1), [tokens.shape[1]]).movedim(-1, 1))
    return out


@pytest.mark.parametrize("layout", [ssl_head_ddp, ssl_head_old, model_swinvit])
def test_ssl_layout_loads_the_whole_swin_encoder_and_reports_the_heads(layout, tmp_path):
    ref = _monai_swin()
    vit = _swin_vit(ref)
    obj, outer, heads = layout(vit)
    path = tmp_path / "ssl.pt"
    torch.save(obj, path)

    ckpt = read_checkpoint(path)  # no medcl record: the architecture comes from the file
    assert ckpt.architecture_from == "monai-swinunetr-ssl"
    assert ckpt.backbone == {"name": "swinunetr", "in_channels": 1, "feature_size": 12, "depths": [2, 1, 1, 2],
                             "num_heads": [3, 6, 6, 12], "window_size": 7, "use_v2": False}

    torch.manual_seed(1)  # another init than the reference
    net = build_backbone(BackboneConfig(name="swinunetr", in_channels=1, out_channels=2, **ARCH)).eval()
    report = load_backbone(net, ckpt.contents)
    assert report.source_format in ("monai-swinunetr-ssl", "monai-swinunetr") and report.key_prefix == outer
    swin_keys = {k for k in net.state_dict() if k.startswith(("encoder.1.embed.", "bottleneck.swin."))
                 or any(k.startswith(f"encoder.{i}.swin.") for i in (2, 3, 4))}
    assert len(swin_keys) == len(vit) and set(report.loaded) == swin_keys  # 100% of the Swin encoder
    assert not report.mismatched and not report.adapted
    assert set(report.unexpected) == heads  # rotation / contrastive heads and the reconstruction decoder
    assert set(report.missing) == set(net.state_dict()) - swin_keys  # the convolution blocks SSL never trained

    x = torch.randn(1, 1, 64, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = ref.swinViT(x, normalize=True)
        ours = _hidden_states(net, x)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_finetune_init_takes_model_swinvit_with_the_load_report(tmp_path, caplog):
    ref = _monai_swin()
    obj, _, _ = model_swinvit(_swin_vit(ref))
    torch.save(obj, tmp_path / "model_swinvit.pt")
    data = write_phantom_dataset(tmp_path / "ph", n=2, size=32, seed=0)
    base = ["finetune", "--data", str(data), "--init", str(tmp_path / "model_swinvit.pt"), "--labelled", "2",
            "--max-steps", "2", "--device", "cpu", "--threads", "1", "sampling.patch_size=[64,32,32]",
            "sampling.batch_size=1", "augment.affine_prob=0", "trainer.log_every=1"]
    # without provenance (no run record, no sidecar) it is refused with the flag that overrides it
    assert main([*base, "--out", str(tmp_path / "refused")]) == 2
    with caplog.at_level(logging.INFO, logger="medcl.segment.finetune"):
        rc = main([*base, "--out", str(tmp_path / "ft"), "--allow-unknown-provenance", "init.require_encoder=false"])
    assert rc == 0
    report = json.loads((tmp_path / "ft" / "load_report.json").read_text())
    assert report["source_format"] == "monai-swinunetr-ssl" and len(report["loaded"]) == len(obj["state_dict"])
    assert "converted with key map monai-swinunetr-ssl" in caplog.text and f"loaded      {len(obj['state_dict'])}/" \
        in caplog.text
    config = (tmp_path / "ft" / "config.yaml").read_text()
    assert "name: swinunetr" in config and "feature_size: 12" in config  # the architecture the file describes
