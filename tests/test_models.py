"""medcl.models: named stages, prefixes, heads, EMA teacher, weight save/load with a report."""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import monai  # noqa: F401  (import once per session)
import pytest
import torch
from monai.networks.nets import DynUNet, SwinUNETR
from torch import nn

from medcl.config import from_dict
from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.models import (
    BackboneConfig,
    ConvProjection,
    EMATeacher,
    ProjectionMLP,
    ReconstructionHead,
    VoCoHead,
    adapt_first_layer,
    backbone_from_file,
    build_backbone,
    load_backbone,
    save_backbone,
)

needs_einops = pytest.mark.skipif(importlib.util.find_spec("einops") is None, reason="SwinUNETR needs einops")



SMALL = {"filters": (8, 16, 32, 64), "strides": (1, 2, 2, 2)}


def small(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return build_backbone(BackboneConfig(**{**SMALL, **kw}))


def tiny_swin(**kw):
    # batch norm (eval: running statistics) and 4^3 windows keep the CPU forward pass short
    torch.manual_seed(kw.pop("seed", 0))
    cfg = {"name": "swinunetr", "feature_size": 12, "depths": (1, 1, 1, 1), "window_size": 4, "norm": "batch", **kw}
    return build_backbone(BackboneConfig(**cfg))


# ---- stages ---------------------------------------------------------------------------------------------
def test_dynunet_stages_have_documented_shapes_and_strides():
    net = small(out_channels=3).eval()
    assert net.encoder_stage_names == ["encoder.0", "encoder.1", "encoder.2"]
    assert net.decoder_stage_names == ["decoder.0", "decoder.1", "decoder.2"]
    expected = {
        "encoder.0": (8, 1), "encoder.1": (16, 2), "encoder.2": (32, 4), "bottleneck": (64, 8),
        "decoder.0": (32, 4), "decoder.1": (16, 2), "decoder.2": (8, 1),
    }
    assert {n: (net.stage_channels[n], net.stage_strides[n][0]) for n in net.stage_names} == expected
    x = torch.randn(2, 1, 32, 32, 32)
    out = net(x)
    for name, (ch, s) in expected.items():
        assert tuple(out.stage(name).shape) == (2, ch, 32 // s, 32 // s, 32 // s), name
    assert tuple(out.logits.shape) == (2, 3, 32, 32, 32)


def test_dynunet_anisotropic_strides_per_axis():
    net = small(strides=(1, (2, 2, 1), 2, 2))
    assert net.stage_strides["encoder.1"] == (2, 2, 1)
    assert net.total_stride == (8, 8, 4)
    out = net(torch.randn(1, 1, 16, 16, 8), upto="decoder.0")
    assert tuple(out.bottleneck.shape[2:]) == (2, 2, 2)
    assert tuple(out.decoder[0].shape[2:]) == (4, 4, 4)


def test_dynunet_equals_monai_dynunet_with_converted_weights():
    torch.manual_seed(1)
    ref = DynUNet(3, 1, 2, [3] * 4, [1, 2, 2, 2], [2, 2, 2], filters=[8, 16, 32, 64], res_block=True).eval()
    net = small(out_channels=2, res_block=True, seed=2).eval()
    report = load_backbone(net, ref.state_dict(), strict=True)
    assert report.source_format == "monai-dynunet" and report.ok and not report.missing
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(net(x).logits, ref(x))


def test_upto_stops_early_and_matches_full_run():
    net = small(out_channels=2).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    full = net(x)
    enc = net(x, upto="bottleneck")
    assert enc.decoder == [] and enc.logits is None
    part = net(x, upto="decoder.1")
    assert len(part.decoder) == 2 and part.logits is None
    assert torch.equal(part.decoder[1], full.decoder[1])
    with pytest.raises(MedclConfigError, match="decoder.7"):
        net(x, upto="decoder.7")


def test_bad_inputs_get_clear_errors():
    net = small()
    with pytest.raises(MedclDataError, match=r"not divisible by .*\(8, 8, 8\).*\(24, 16, 16\)"):
        net(torch.randn(1, 1, 20, 16, 16))
    with pytest.raises(MedclDataError, match="expects 1 input channel"):
        net(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(MedclDataError, match="single voxel"):
        net(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(MedclConfigError, match="strides"):
        build_backbone({"filters": [8, 16, 32], "strides": [1, 2]})
    with pytest.raises(MedclConfigError, match="backbone.unknown"):
        build_backbone({"unknown": 1})


def test_config_round_trips_through_from_dict():
    cfg = from_dict(BackboneConfig, {"filters": [8, 16, 32], "strides": [1, [2, 2, 1], 2], "out_channels": 4})
    assert cfg.strides == (1, (2, 2, 1), 2) and cfg.filters == (8, 16, 32)
    assert build_backbone(cfg).total_stride == (4, 4, 2)


@needs_einops
def test_swinunetr_stages_and_equivalence_to_monai():
    net = tiny_swin(out_channels=2).eval()
    f = 12
    expected = {
        "encoder.0": (f, 1), "encoder.1": (f, 2), "encoder.2": (2 * f, 4), "encoder.3": (4 * f, 8),
        "encoder.4": (8 * f, 16), "bottleneck": (16 * f, 32), "decoder.0": (8 * f, 16), "decoder.1": (4 * f, 8),
        "decoder.2": (2 * f, 4), "decoder.3": (f, 2), "decoder.4": (f, 1),
    }
    assert {n: (net.stage_channels[n], net.stage_strides[n][0]) for n in net.stage_names} == expected
    torch.manual_seed(5)
    ref = SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), window_size=4, norm_name="batch"
    ).eval()
    report = load_backbone(net, ref.state_dict(), strict=True)
    assert report.source_format == "monai-swinunetr" and not report.missing
    x = torch.randn(1, 1, 64, 32, 32)
    with torch.no_grad():
        out, ref_logits = net(x), ref(x)
    for name, (ch, s) in expected.items():
        assert tuple(out.stage(name).shape) == (1, ch, 64 // s, 32 // s, 32 // s), name
    assert torch.allclose(out.logits, ref_logits, atol=1e-6)


# ---- prefixes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dynunet", pytest.param("swinunetr", marks=needs_einops)])
def test_stage_prefixes_cover_every_parameter_exactly_once(kind):
    net = small(out_channels=2) if kind == "dynunet" else tiny_swin(out_channels=2)
    prefixes = [n + "." for n in net.stage_names] + ["head."]
    all_params = list(net.named_parameters(remove_duplicate=False))
    assert len(all_params) == len({id(p) for _, p in all_params})  # no tensor registered twice
    for key in net.state_dict():
        owners = [p for p in prefixes if key.startswith(p)]
        assert len(owners) == 1, (key, owners)
        assert net.stage_of(key) + "." == owners[0]
    stages_with_params = {net.stage_of(k) for k, _ in all_params}
    assert stages_with_params == set(net.stage_names) | {"head"}
    enc = net.encoder_state_dict()
    assert enc and all(k.startswith(("encoder.", "bottleneck.")) for k in enc)
    assert set(enc) == {k for k in net.state_dict() if net.stage_of(k).startswith(("encoder", "bottleneck"))}


# ---- save / load ----------------------------------------------------------------------------------------
def test_save_load_round_trip_is_exact_and_weights_only(tmp_path):
    src = small(out_channels=2, seed=0).eval()
    record = {"format_version": 1, "cases": ["a", "b"], "config": {"lr": 1e-3, "crop": [48, 48, 48]}}
    path = tmp_path / "bb.pt"
    save_backbone(src, path, record=record)
    raw = torch.load(path, weights_only=True)
    assert raw["medcl_record"] == record and raw["backbone_config"]["filters"] == [8, 16, 32, 64]
    dst = small(out_channels=2, seed=1).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    assert not torch.equal(dst(x).logits, src(x).logits)
    report = load_backbone(dst, path)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == [] and report.ok
    assert sorted(report.loaded) == sorted(src.state_dict()) and report.record == record
    assert torch.equal(dst(x).logits, src(x).logits)
    report.to_json(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["loaded"] == report.loaded
    n = len(src.state_dict())
    assert f"loaded      {n}/{n} tensors" in str(report)
    rebuilt, rep2 = backbone_from_file(path)
    assert rep2.ok and torch.equal(rebuilt.eval()(x).logits, src(x).logits)


def test_save_refuses_non_plain_record(tmp_path):
    with pytest.raises(MedclDataError, match=r"medcl_record.cfg is a BackboneConfig"):
        save_backbone(small(), tmp_path / "x.pt", record={"cfg": BackboneConfig()})


def test_encoder_only_load_into_model_with_other_head():
    src = small(out_channels=3, seed=0)
    dst = small(out_channels=5, seed=1)
    head_before = copy.deepcopy(dst.head.state_dict())
    report = load_backbone(dst, src.state_dict(), prefixes=("encoder", "bottleneck"))
    assert report.missing_in(("encoder", "bottleneck")) == [] and report.ok
    assert {dst.stage_of(k) for k in report.missing} == {"decoder.0", "decoder.1", "decoder.2", "head"}
    assert "head.conv.conv.weight" in report.missing and report.unexpected == [] and report.mismatched == []
    assert {src.stage_of(k) for k in report.ignored} == {"decoder.0", "decoder.1", "decoder.2", "head"}
    for k, v in dst.encoder_state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    for k, v in dst.head.state_dict().items():
        assert torch.equal(v, head_before[k])
    assert "missing     " in str(report) and "head (2)" in str(report)
    with pytest.raises(MedclConfigError, match="'encoders' names no part"):
        load_backbone(dst, src.state_dict(), prefixes=("encoders",))


def test_mismatched_shape_is_reported_not_loaded_and_strict_raises():
    src = small(out_channels=3, seed=0)
    dst = small(out_channels=5, seed=1)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(MedclDataError, match="strict load failed"):
        load_backbone(dst, src.state_dict(), strict=True)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing touched
    report = load_backbone(dst, src.state_dict())
    mism = {m["key"]: (m["source_shape"], m["target_shape"]) for m in report.mismatched}
    assert mism == {"head.conv.conv.weight": ([3, 8, 1, 1, 1], [5, 8, 1, 1, 1]),
                    "head.conv.conv.bias": ([3], [5])}
    assert not report.ok and "MISMATCHED  head.conv.conv.weight" in str(report)
    assert torch.equal(dst.state_dict()["head.conv.conv.weight"], before["head.conv.conv.weight"])
    assert torch.equal(dst.state_dict()["decoder.2.conv_block.conv1.conv.weight"],
                       src.state_dict()["decoder.2.conv_block.conv1.conv.weight"])


def test_load_from_lightning_style_checkpoint(tmp_path):
    student, teacher = small(seed=0), small(seed=1)
    sd = {f"backbone.{k}": v for k, v in student.state_dict().items()}
    sd |= {f"teacher.module.backbone.{k}": v for k, v in teacher.state_dict().items()}
    sd["heads.global.mlp.0.weight"] = torch.zeros(4, 64)
    ckpt = {"state_dict": sd, "medcl_record": {"cases_seen": ["c1"]}, "epoch": 3, "global_step": 10}
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    dst = small(seed=2)
    report = load_backbone(dst, path)
    assert report.key_prefix == "backbone." and report.ok and report.record == {"cases_seen": ["c1"]}
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in dst.state_dict().items())
    report = load_backbone(dst, path, key_prefix="teacher.module.backbone")
    assert report.ok and all(torch.equal(v, teacher.state_dict()[k]) for k, v in dst.state_dict().items())
    with pytest.raises(MedclDataError, match="no keys start with key_prefix 'model.'"):
        load_backbone(dst, path, key_prefix="model.")
    with pytest.raises(MedclDataError, match="no tensor matches"):
        load_backbone(dst, {"fc.weight": torch.zeros(2, 2)})


# ---- first-layer adaptation -----------------------------------------------------------------------------
@pytest.mark.parametrize("res_block", [False, True])
def test_first_layer_mean_adaptation_1_to_2_channels(res_block):
    one = small(in_channels=1, out_channels=2, res_block=res_block, seed=0).eval()
    two = small(in_channels=2, out_channels=2, res_block=res_block, seed=1).eval()
    report = load_backbone(two, one.state_dict())
    assert sorted(a["key"] for a in report.adapted) == sorted(two.input_weight_keys)
    assert report.ok and report.mismatched == []
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.allclose(two(x.repeat(1, 2, 1, 1, 1)).logits, one(x).logits, atol=1e-5)
    assert "adapted     encoder.0.conv1.conv.weight: [8, 1, 3, 3, 3] -> [8, 2, 3, 3, 3]" in str(report)
    no = load_backbone(small(in_channels=2, seed=1), one.state_dict(), adapt=None)
    assert [m["key"] for m in no.mismatched] == ["encoder.0.conv1.conv.weight"]


def test_adaptation_rules_against_explicit_formulas():
    w = torch.randn(4, 3, 3, 3, 3)
    mean = adapt_first_layer(w, 5, "mean")
    rep = adapt_first_layer(w, 5, "repeat")
    for j in range(5):
        assert torch.allclose(mean[:, j], (w[:, 0] + w[:, 1] + w[:, 2]) / 5)
        assert torch.allclose(rep[:, j], w[:, j % 3] * 3 / 5)
    # repeat keeps the output when the new channels are cyclic copies of the old ones (2 -> 4)
    w2, x = torch.randn(6, 2, 3, 3, 3), torch.randn(1, 2, 6, 6, 6)
    y = torch.nn.functional.conv3d(x, w2)
    y4 = torch.nn.functional.conv3d(torch.cat([x, x], 1), adapt_first_layer(w2, 4, "repeat"))
    assert torch.allclose(y, y4, atol=1e-5)


@needs_einops
def test_swin_first_layer_adaptation_keeps_output():
    one = tiny_swin(in_channels=1, out_channels=2, seed=0).eval()
    two = tiny_swin(in_channels=2, out_channels=2, seed=1).eval()
    report = load_backbone(two, one.state_dict())
    assert len(report.adapted) == 3 and report.ok
    x = torch.randn(1, 1, 64, 32, 32)
    with torch.no_grad():
        assert torch.allclose(two(x.repeat(1, 2, 1, 1, 1)).logits, one(x).logits, atol=1e-4)


# ---- EMA teacher ----------------------------------------------------------------------------------------
def _student():
    torch.manual_seed(0)
    return nn.ModuleDict({"backbone": small(), "proj": ProjectionMLP(64, 16, 8)})


def _perturb(m: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_ema_momentum_zero_copies_and_one_freezes():
    student = _student()
    copy_t, frozen_t = EMATeacher(student, momentum=0.0), EMATeacher(student, momentum=1.0)
    initial = copy.deepcopy(frozen_t.module.state_dict())
    _perturb(student, 1)
    copy_t.update(student)
    frozen_t.update(student)
    for k, v in student.state_dict().items():
        assert torch.equal(copy_t.module.state_dict()[k], v)
        assert torch.equal(frozen_t.module.state_dict()[k], initial[k])
    assert all(not p.requires_grad for p in copy_t.parameters())


def test_ema_update_formula_and_cosine_schedule():
    student = _student()
    ema = EMATeacher(student, momentum=0.9, final_momentum=1.0, total_steps=4)
    assert [round(ema.momentum_at(t), 6) for t in (0, 2, 4, 9)] == [0.9, 0.95, 1.0, 1.0]
    t0 = {k: v.clone() for k, v in ema.module.named_parameters()}
    _perturb(student, 2)
    m = ema.update(student)
    assert m == pytest.approx(0.9)
    for k, p in ema.module.named_parameters():
        assert torch.allclose(p, 0.9 * t0[k] + 0.1 * dict(student.named_parameters())[k], atol=1e-6)
    assert ema.momentum == pytest.approx(0.9 + 0.1 * (1 - math.cos(math.pi / 4)) / 2)
    teacher = EMATeacher(student["backbone"], momentum=0.9)
    out = teacher(torch.randn(2, 1, 16, 16, 16), upto="bottleneck")
    assert out.bottleneck.shape == (2, 64, 2, 2, 2) and not out.bottleneck.requires_grad


def test_ema_warmup_is_the_mean_teachers_rule():
    """warmup=True: update t uses min(1 - 1/(t+1), m) (Tarvainen & Valpola): the first update copies the student,
    the next ones keep the running mean of the student until the momentum is reached."""
    student = _student()
    ema = EMATeacher(student, momentum=0.9, warmup=True)
    assert [round(ema.momentum_at(t), 6) for t in (0, 1, 2, 8, 9, 50)] == [0.0, 0.5, round(2 / 3, 6), 0.888889,
                                                                           0.9, 0.9]
    states = []
    for s in range(3):
        _perturb(student, s + 1)
        ema.update(student)
        states.append({k: v.detach().clone() for k, v in student.named_parameters()})
    for k, p in ema.module.named_parameters():  # three updates = the plain mean of the three students
        assert torch.allclose(p, sum(st[k] for st in states) / 3, atol=1e-6), k
    with pytest.raises(ValueError, match="exclusive"):
        EMATeacher(student, momentum=0.9, final_momentum=1.0, total_steps=4, warmup=True)


def test_ema_state_dict_round_trip_exact_resume(tmp_path):
    student = _student()
    ema = EMATeacher(student, momentum=0.5, final_momentum=1.0, total_steps=10)
    for s in range(3):
        _perturb(student, s)
        ema.update(student)
    torch.save(nn.ModuleDict({"teacher": ema}).state_dict(), tmp_path / "ema.pt")
    sd = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values()) and int(sd["teacher.step"]) == 3
    fresh = EMATeacher(_student(), momentum=0.5, final_momentum=1.0, total_steps=10)
    nn.ModuleDict({"teacher": fresh}).load_state_dict(sd)  # through a parent, as Lightning does
    assert fresh.momentum == ema.momentum
    _perturb(student, 7)
    ema.update(student)
    fresh.update(student)
    for (k, a), (_, b) in zip(ema.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


# ---- heads ----------------------------------------------------------------------------------------------
def test_projection_heads_against_loop_references():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4, 4, 2)
    mlp = ProjectionMLP(6, hidden_dim=5, out_dim=4)
    lin1, lin2 = mlp.mlp[0], mlp.mlp[3]
    for b in range(3):
        pooled = torch.stack([x[b, c].sum() / x[b, c].numel() for c in range(6)])
        ref = lin2(torch.relu(lin1(pooled)))
        assert torch.allclose(mlp(x)[b], ref, atol=1e-5)
    assert isinstance(ProjectionMLP(6, norm="batch").mlp[1], nn.BatchNorm1d)

    conv = ConvProjection(6, hidden_channels=5, out_channels=4)
    y = conv(x)
    w1, b1 = conv.net[0].weight[:, :, 0, 0, 0], conv.net[0].bias
    w2, b2 = conv.net[2].weight[:, :, 0, 0, 0], conv.net[2].bias
    for idx in [(0, 0, 0, 0), (2, 3, 1, 1), (1, 2, 3, 0)]:
        b, i, j, k = idx
        ref = w2 @ torch.relu(w1 @ x[b, :, i, j, k] + b1) + b2
        assert torch.allclose(y[b, :, i, j, k], ref, atol=1e-5)


def test_voco_and_reconstruction_heads():
    net = small()
    out = net(torch.randn(4, 1, 16, 16, 16), upto="decoder.1")
    maps = [*out.encoder, out.bottleneck]
    head = VoCoHead([net.stage_channels[n] for n in (*net.encoder_stage_names, "bottleneck")], 32, 16)
    emb = head(maps)
    assert emb.shape == (4, 16)
    pooled = torch.cat([m.mean(dim=(2, 3, 4)) for m in maps], 1)
    assert torch.allclose(emb, head.mlp(pooled), atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        head(maps[:-1])
    rec = ReconstructionHead(net.stage_channels["decoder.1"], 1, stride=net.stage_strides["decoder.1"])
    assert rec(out.decoder[1]).shape == (4, 1, 16, 16, 16)
