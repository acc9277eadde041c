"""nnU-Net in and out (issue 18): nnU-Net's own networks as backbones, `medcl export --format nnunet` that nnU-Net
v2's own loader accepts, and nnU-Net / nnssl weights in through the key maps.

References are nnU-Net's code itself: the ``dynamic_network_architectures`` classes built with literal plans
arguments, ``nnunetv2``'s ``PlansManager`` + ``get_network_from_plans`` (what ``nnUNetTrainer``
builds a network with) and ``nnunetv2.run.load_pretrained_weights`` (what ``nnUNetv2_train -pretrained_weights``
calls)."""

from __future__ import annotations

import importlib.util
import json
import pydoc
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from medcl.cli import main
from medcl.config import to_dict
from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.core.record import RunRecord
from medcl.data import IntensitySpec, PreprocessingPlan, write_phantom_dataset
from medcl.engine.checkpoint import safe_torch_load
from medcl.models import BackboneConfig, build_backbone, load_backbone, save_backbone

_HAVE_DNA = importlib.util.find_spec("dynamic_network_architectures") is not None
_HAVE_NNUNET = importlib.util.find_spec("nnunetv2") is not None
needs_dna = pytest.mark.skipif(not _HAVE_DNA, reason="needs dynamic_network_architectures (pip install medcl[nnunet])")
needs_nnunet = pytest.mark.skipif(not (_HAVE_DNA and _HAVE_NNUNET), reason="needs nnunetv2 (the dev extra)")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
KINDS = ["plainconv", "resenc"]
CLASS = {"plainconv": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
         "resenc": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"}
TINY = {"filters": (4, 8, 16), "strides": (1, 2, 2)}


def _arch(kind: str) -> dict:
    """A 3-stage ``architecture`` entry written as nnU-Net writes it (anisotropic first pooling, like a thick-slice
    dataset), typed out literally rather than produced by medcl."""
    blocks = "n_conv_per_stage" if kind == "plainconv" else "n_blocks_per_stage"
    return {
        "network_class_name": CLASS[kind],
        "arch_kwargs": {
            "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 1], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]],
            blocks: [2, 2, 2] if kind == "plainconv" else [1, 2, 2], "n_conv_per_stage_decoder": [2, 1],
            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _plans(kind: str, channels: int = 1) -> dict:
    """A small nnUNetPlans.json: ``3d_fullres`` with :func:`_arch`, and a cascade configuration inheriting it."""
    return {
        "dataset_name": "Dataset004_Hippocampus", "transpose_forward": [0, 1, 2],
        "plans_name": "nnUNetPlans" if kind == "plainconv" else "nnUNetResEncUNetMPlans",
        "foreground_intensity_properties_per_channel": {str(c): {"mean": 0.0, "std": 1.0} for c in range(channels)},
        "configurations": {
            "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [20, 24, 16],
                           "spacing": [1.0, 1.0, 3.0], "normalization_schemes": ["ZScoreNormalization"] * channels,
                           "use_mask_for_norm": [False] * channels, "architecture": _arch(kind)},
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
    }


def _upstream(kind: str, num_classes: int, deep_supervision: bool = True, seed: int = 0) -> torch.nn.Module:
    """nnU-Net's network from :func:`_arch` with the imports nnU-Net's plans name (``get_network_from_plans``'s way,
    without nnunetv2)."""
    arch = _arch(kind)
    kw = {k: (pydoc.locate(v) if k in arch["_kw_requires_import"] and v is not None else v)
          for k, v in arch["arch_kwargs"].items()}
    torch.manual_seed(seed)
    net = pydoc.locate(arch["network_class_name"])(input_channels=1, num_classes=num_classes,
                                                   deep_supervision=deep_supervision, **kw)
    net.apply(net.initialize)
    return net


def _nnunet_network(plans_file, configuration: str, in_channels: int, classes: int) -> torch.nn.Module:
    """The network ``nnUNetTrainer.build_network_architecture`` builds for training from ``plans_file``."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(str(plans_file)).get_configuration(configuration)
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, in_channels, classes, allow_init=True,
                                  deep_supervision=True)


def _checkpoint(tmp_path, net, plan: PreprocessingPlan | None = None, name: str = "backbone.pt"):
    """A medcl checkpoint of ``net`` with a complete pretraining run record."""
    plan = plan or PreprocessingPlan(spacing=(1.0, 1.0, 3.0))
    record = RunRecord(kind="pretrain", config={"backbone": to_dict(net.config)}, plan=plan.to_dict(),
                       cases_seen=["hippocampus_001"], complete=True, step=20).to_dict()
    save_backbone(net, tmp_path / name, record=record)
    return tmp_path / name


# ---- backbones ------------------------------------------------------------------------------------------
@needs_dna
@pytest.mark.parametrize("kind", KINDS)
def test_backbone_named_stages_shapes_and_prefixes(kind):
    net = build_backbone(BackboneConfig(name=kind, out_channels=3, **TINY)).eval()
    assert net.stage_names == ["encoder.0", "encoder.1", "bottleneck", "decoder.0", "decoder.1"]
    expected = {"encoder.0": (4, 1), "encoder.1": (8, 2), "bottleneck": (16, 4), "decoder.0": (8, 2),
                "decoder.1": (4, 1)}
    assert {n: (net.stage_channels[n], net.stage_strides[n][0]) for n in net.stage_names} == expected
    out = net(torch.randn(2, 1, 16, 16, 16))
    for name, (ch, s) in expected.items():
        assert tuple(out.stage(name).shape) == (2, ch, 16 // s, 16 // s, 16 // s), name
    assert tuple(out.logits.shape) == (2, 3, 16, 16, 16)
    assert net(torch.randn(1, 1, 16, 16, 16), upto="bottleneck").decoder == []
    prefixes = [n + "." for n in net.stage_names] + ["head."]
    for key in net.state_dict():  # every weight belongs to exactly one stage (what the pretraining methods use)
        assert [p for p in prefixes if key.startswith(p)] == [net.stage_of(key) + "."], key
    assert {net.stage_of(k) for k in net.state_dict()} == set(net.stage_names) | {"head"}
    # nnU-Net's defaults fill the counts: 2 convolutions per stage (plainconv); 1, 3, 4 blocks and 1 conv (resenc)
    assert net.config.blocks == ((2, 2, 2) if kind == "plainconv" else (1, 3, 4))
    assert net.config.decoder_blocks == ((2, 2) if kind == "plainconv" else (1, 1))


@needs_dna
@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_upstream_network_with_its_weights(kind):
    """The upstream class's own state dict (deep supervision on, as nnU-Net trains) loads completely, and medcl's
    forward pass then equals nnU-Net's."""
    ref = _upstream(kind, num_classes=2, seed=1).eval()
    net = build_backbone(BackboneConfig(name=kind, out_channels=2, filters=(4, 8, 16), strides=(1, (2, 2, 1), 2),
                                        kernel_sizes=((3, 3, 1), 3, 3), blocks=(2, 2, 2) if kind == "plainconv"
                                        else (1, 2, 2), decoder_blocks=(2, 1))).eval()
    report = load_backbone(net, ref.state_dict())
    assert report.source_format == f"nnunet-{kind}" and report.ok and not report.missing
    x = torch.randn(1, 1, 16, 16, 8)
    ref.decoder.deep_supervision = False
    with torch.no_grad():
        assert torch.allclose(net(x).logits, ref(x), atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ref.encoder(x), [*net.encode(x)[0],
                                                                                     net.encode(x)[1]]))


# ---- plans files and presets ----------------------------------------------------------------------------
@needs_nnunet
@pytest.mark.parametrize("kind", KINDS)
def test_plans_file_builds_the_network_nnunet_builds(kind, tmp_path):
    from medcl.models.nnunet import to_nnunet_state_dict

    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(_plans(kind)))
    for conf in ("3d_fullres", "3d_cascade_fullres"):  # inherits_from resolved as nnU-Net's PlansManager does
        net = build_backbone(BackboneConfig(name=kind, out_channels=3, plans=f"{tmp_path / 'nnUNetPlans.json'}:{conf}"))
        ref = _nnunet_network(tmp_path / "nnUNetPlans.json", conf, 1, 3).state_dict()
        ours = to_nnunet_state_dict(net)
        theirs = {k: tuple(v.shape) for k, v in ref.items() if ".seg_layers." not in k or k in ours}
        assert {k: tuple(v.shape) for k, v in ours.items()} == theirs
        assert net.config.plans is None and net.total_stride == (4, 4, 2)  # resolved: rebuilds without the file
        assert build_backbone(net.config).state_dict().keys() == net.state_dict().keys()
    with pytest.raises(MedclConfigError, match="set backbone.name=" + kind):
        other = "resenc" if kind == "plainconv" else "plainconv"
        build_backbone(BackboneConfig(name=other, plans=f"{tmp_path / 'nnUNetPlans.json'}:3d_fullres"))


def test_bad_plans_are_one_line_errors_naming_the_file(tmp_path):
    path = tmp_path / "nnUNetPlans.json"
    plans = _plans("plainconv")
    plans["configurations"]["2d"] = {"architecture": {**_arch("plainconv"), "arch_kwargs": {
        **_arch("plainconv")["arch_kwargs"], "conv_op": "torch.nn.modules.conv.Conv2d"}}}
    path.write_text(json.dumps(plans))
    cases = {f"{path}:3d_lowres": "no configuration '3d_lowres'", f"{path}:2d": "Conv3d",
             f"{tmp_path / 'none.json'}:3d_fullres": "does not exist", "nnUNetPlans.json": "PATH:CONFIGURATION"}
    for ref, msg in cases.items():
        with pytest.raises((MedclDataError, MedclConfigError), match=msg) as info:
            BackboneConfig(name="plainconv", plans=ref).validate()
        assert "\n" not in str(info.value)
    with pytest.raises(MedclConfigError, match="plainconv or resenc"):
        BackboneConfig(name="dynunet", preset="resenc_m").validate()


def test_presets_are_nnunets_3d_fullres_and_resenc_architectures():
    from medcl.models.nnunet_plans import nnunet_architecture

    fullres = nnunet_architecture(BackboneConfig(name="plainconv", preset="nnunet_3d_fullres"))
    # nnU-Net v2's ExperimentPlanner for an isotropic 128^3 patch (5 poolings, features capped at 320)
    assert fullres["network_class_name"] == CLASS["plainconv"]
    kw = fullres["arch_kwargs"]
    assert kw["features_per_stage"] == [32, 64, 128, 256, 320, 320] and kw["n_stages"] == 6
    assert kw["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5 and kw["kernel_sizes"] == [[3, 3, 3]] * 6
    assert kw["n_conv_per_stage"] == [2] * 6 and kw["n_conv_per_stage_decoder"] == [2] * 5
    assert kw["conv_bias"] is True and kw["norm_op_kwargs"] == {"eps": 1e-05, "affine": True}
    for preset in ("resenc_m", "resenc_l"):  # nnUNetPlannerResEncM / L (and nnssl's ResEncL)
        kw = nnunet_architecture(BackboneConfig(name="resenc", preset=preset))["arch_kwargs"]
        assert kw["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6] and kw["n_conv_per_stage_decoder"] == [1] * 5
        assert kw["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    with pytest.raises(MedclConfigError, match="backbone.name=resenc"):
        BackboneConfig(name="plainconv", preset="resenc_m").validate()


# ---- export ---------------------------------------------------------------------------------------------
def _export(tmp_path, net, **extra):
    from medcl.segment.export import ExportOptions, run_export

    ckpt = _checkpoint(tmp_path, net)
    with pytest.warns(UserWarning, match="other preprocessing"):
        return run_export(ckpt, "nnunet", tmp_path / "medcl_pretrained.pth", ExportOptions(extra=extra))


@needs_nnunet
@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_with_nnunets_own_loader_every_tensor_equal(kind, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(_plans(kind)))
    torch.manual_seed(3)
    net = build_backbone(BackboneConfig(name=kind, out_channels=2, plans=f"{tmp_path / 'nnUNetPlans.json'}:3d_fullres"))
    with torch.no_grad():  # non-trivial norm weights, so that a misplaced tensor cannot go unnoticed
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    summary = _export(tmp_path, net, plans=str(tmp_path / "nnUNetPlans.json"))
    assert summary["plans_kind"] == "complete" and summary["configuration"] == "3d_fullres_medcl"
    # the plans' own 3d_fullres is medcl's network already: train it directly
    own = "" if kind == "plainconv" else " -p nnUNetResEncUNetMPlans"  # their plans' identifier
    assert summary["train"].startswith(f"nnUNetv2_train Dataset004_Hippocampus 3d_fullres FOLD{own} -pretrained_weights ")
    nn_net = _nnunet_network(summary["plans_file"], summary["configuration"], 1, 2)
    before = {k: v.clone() for k, v in nn_net.state_dict().items()}
    load_pretrained_weights(nn_net, summary["written"])
    written = torch.load(summary["written"], weights_only=True)["network_weights"]
    after = nn_net.state_dict()
    non_seg = [k for k in after if ".seg_layers." not in k]
    assert non_seg and all(torch.equal(after[k], written[k]) for k in non_seg)
    assert all(not torch.equal(after[k], before[k]) for k in non_seg if after[k].is_floating_point()
               and not k.endswith("num_batches_tracked"))
    # with medcl's head as nnU-Net's full-resolution segmentation layer, nnU-Net's forward is medcl's
    nn_net.decoder.seg_layers[-1].load_state_dict({k.rsplit(".", 1)[-1]: v for k, v in written.items()
                                                   if k.startswith(f"decoder.seg_layers.{len(net.decoder)-1}.")})
    nn_net.decoder.deep_supervision = False
    x = torch.randn(1, 1, 20, 24, 16)
    with torch.no_grad():
        assert torch.allclose(nn_net.eval()(x), net.eval()(x).logits, atol=1e-5)
    # the export reads back into medcl through the same key map, exactly
    back = build_backbone(net.config)
    assert load_backbone(back, summary["written"]).ok
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), net.state_dict().values()))


@needs_nnunet
def test_nnunets_loader_refuses_an_export_missing_one_decoder_tensor(tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    net = build_backbone(BackboneConfig(name="plainconv", **TINY))
    summary = _export(tmp_path, net)
    obj = torch.load(summary["written"], weights_only=True)
    nn_net = _nnunet_network_from_fragment(tmp_path, summary)
    load_pretrained_weights(nn_net, summary["written"])  # complete: accepted
    dropped = sorted(k for k in obj["network_weights"] if k.startswith("decoder.stages."))[0]
    del obj["network_weights"][dropped]
    torch.save(obj, tmp_path / "broken.pth")
    with pytest.raises(AssertionError, match=f"Key {dropped} is missing"):
        load_pretrained_weights(nn_net, str(tmp_path / "broken.pth"))


@needs_nnunet
def test_export_adapts_the_first_layer_to_nnunets_channels(tmp_path):
    """``in_channels=2`` (e.g. T1 + T2 in nnU-Net's dataset): the first layer is the channel mean, as ``--init``."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    net = build_backbone(BackboneConfig(name="plainconv", **TINY))
    summary = _export(tmp_path, net, in_channels="2")
    assert summary["in_channels"] == 2 and any("adapted from 1 to 2" in n for n in summary["notes"])
    w = torch.load(summary["written"], weights_only=True)["network_weights"]
    first = net.state_dict()["encoder.0.0.convs.0.conv.weight"]  # [4, 1, 3, 3, 3]
    for key in ("encoder.stages.0.0.convs.0.conv.weight", "decoder.encoder.stages.0.0.convs.0.all_modules.0.weight"):
        assert torch.allclose(w[key], first.expand(-1, 2, -1, -1, -1) / 2)
    nn_net = _nnunet_network_from_fragment(tmp_path, summary, channels=2)
    load_pretrained_weights(nn_net, summary["written"])


@needs_dna
def test_export_checks_its_own_keys_against_the_upstream_network(monkeypatch):
    """A key map that lost one decoder pair makes the export fail loudly instead of writing weights nnU-Net refuses."""
    import dataclasses

    from medcl.models import keymaps
    from medcl.models.nnunet import nnunet_key_map, to_nnunet_state_dict

    net = build_backbone(BackboneConfig(name="plainconv", filters=(4, 8, 16), strides=(1, (2, 2, 1), 2),
                                        kernel_sizes=((3, 3, 1), 3, 3), decoder_blocks=(2, 1)))  # = _arch
    ref = _upstream("plainconv", 1).state_dict()
    assert set(to_nnunet_state_dict(net)) == {k for k in ref if ".seg_layers." not in k}  # no head: no seg layer
    km = keymaps.get_keymap("nnunet-plainconv")
    broken = dataclasses.replace(km, pairs=lambda b: [p for p in nnunet_key_map("plainconv", 3)
                                                      if p[0] != "decoder.transpconvs.1."])
    monkeypatch.setitem(keymaps._REGISTRY, "nnunet-plainconv", broken)
    with pytest.raises(MedclDataError, match=r"2 lacking \(e.g. \[.decoder.transpconvs.1.bias.\]\)"):
        to_nnunet_state_dict(net)


def _nnunet_network_from_fragment(tmp_path, summary, channels: int = 1):
    """Merge the exported fragment into a user's plans (what the README tells the user) and build nnU-Net's net."""
    fragment = json.loads(open(summary["plans_file"]).read())
    plans = _plans("plainconv", channels)
    plans["configurations"].update(fragment["configurations"])
    (tmp_path / "merged.json").write_text(json.dumps(plans))
    return _nnunet_network(tmp_path / "merged.json", summary["configuration"], channels, 2)


@needs_nnunet
def test_cli_pretrain_resenc_then_export_loads_into_nnunet(tmp_path, capsys):
    """The issue's commands on phantoms: `medcl pretrain ... backbone.name=resenc`, `medcl export --format nnunet`,
    then nnU-Net's loader on the network built from the exported plans (merged into the user's plans)."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    data = write_phantom_dataset(tmp_path / "ph", n=6, size=16, seed=0)
    tiny = ["backbone.name=resenc", "backbone.filters=[4,8,16]", "backbone.strides=[1,2,2]", "trainer.num_workers=0",
            "trainer.ckpt_every=0", "data.volumes_per_step=2", "data.probe_volumes=0", "monitor.probe_every=0",
            "views.partition.crop=[16,16,16]", "--device", "cpu", "--threads", "1", "--no-progress"]
    assert main(["pretrain", "--config", str(CONFIGS / "gd_local.yaml"), "--data", str(data), "--out",
                 str(tmp_path / "pt"), "--max-steps", "2", *tiny]) == 0
    with pytest.warns(UserWarning, match="other preprocessing"):
        assert main(["export", "--ckpt", str(tmp_path / "pt"), "--format", "nnunet", "--out",
                     str(tmp_path / "medcl.pth")]) == 0
    assert "nnunet written to" in capsys.readouterr().out
    fragment = json.loads((tmp_path / "medcl.plans.json").read_text())
    plans = _plans("resenc")
    plans["configurations"].update(fragment["configurations"])
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans))
    nn_net = _nnunet_network(tmp_path / "nnUNetPlans.json", "3d_fullres_medcl", 1, 3)
    load_pretrained_weights(nn_net, str(tmp_path / "medcl.pth"))
    trained = safe_torch_load(tmp_path / "pt" / "backbone.pt")["state_dict"]
    theirs = nn_net.state_dict()
    assert torch.equal(theirs["encoder.stem.convs.0.conv.weight"], trained["encoder.0.stem.convs.0.conv.weight"])
    assert torch.equal(theirs["decoder.stages.1.convs.0.conv.weight"], trained["decoder.1.convs.convs.0.conv.weight"])


@needs_dna
def test_export_refuses_incomplete_weights_other_backbones_and_warns_on_preprocessing(tmp_path):
    from medcl.segment.export import ExportOptions, run_export

    net = build_backbone(BackboneConfig(name="resenc", **TINY))
    obj = {"state_dict": {k: v for k, v in net.state_dict().items() if not k.startswith("decoder.1.convs.")},
           "backbone_config": to_dict(net.config),
           "medcl_record": RunRecord(kind="pretrain", config={}, plan=PreprocessingPlan().to_dict(),
                                     cases_seen=[], complete=True, step=1).to_dict()}
    torch.save(obj, tmp_path / "partial.pt")
    with pytest.raises(MedclDataError, match="every encoder and decoder weight"):
        run_export(tmp_path / "partial.pt", "nnunet", tmp_path / "a.pth")
    dyn = build_backbone(BackboneConfig(**TINY))
    with pytest.raises(MedclDataError, match="backbone.name=plainconv or resenc"):
        run_export(_checkpoint(tmp_path, dyn, name="dyn.pt"), "nnunet", tmp_path / "b.pth")
    ct = PreprocessingPlan(spacing=(1.0, 1.0, 1.0), intensity=[IntensitySpec(scheme="ct")])
    with pytest.warns(UserWarning, match="CTNormalization"):
        summary = run_export(_checkpoint(tmp_path, net, ct, "ct.pt"), "nnunet", tmp_path / "c.pth", ExportOptions())
    assert [i["level"] for i in summary["preprocessing"] if i["item"].startswith("intensity")] == ["warning"]
    assert summary["plans_kind"] == "fragment" and (tmp_path / "c.plans.json").is_file()
    with pytest.raises(MedclDataError, match="already exists"):  # never overwrites without --overwrite
        run_export(tmp_path / "ct.pt", "nnunet", tmp_path / "c.pth", ExportOptions())
    # the user's plans have another network and a patch that is no multiple of this one's stride (4, 4, 4)
    plans = _plans("plainconv")
    plans["configurations"]["3d_fullres"]["patch_size"] = [20, 24, 10]
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans))
    with pytest.warns(UserWarning, match="uses \\[20, 24, 8\\]"):
        summary = run_export(tmp_path / "ct.pt", "nnunet", tmp_path / "d.pth",
                             ExportOptions(extra={"plans": str(tmp_path / "nnUNetPlans.json")}))
    assert summary["train"].startswith("cp ") and "3d_fullres_medcl FOLD -p medclPlans -pretrained_weights" in summary["train"]
    written = json.loads((tmp_path / "d.plans.json").read_text())
    assert written["configurations"]["3d_fullres"] == plans["configurations"]["3d_fullres"]  # theirs untouched
    assert written["configurations"]["3d_fullres_medcl"]["inherits_from"] == "3d_fullres"
    with pytest.raises(MedclConfigError, match="unknown nnunet option"):
        run_export(tmp_path / "ct.pt", "nnunet", tmp_path / "e.pth", ExportOptions(extra={"plan": "x"}))


# ---- weights in -----------------------------------------------------------------------------------------
def _nnunet_checkpoint(tmp_path, kind: str, name: str = "checkpoint_final.pth"):
    """An nnU-Net v2 ``checkpoint_final.pth`` of the upstream class (its fields as nnUNetTrainer.save_checkpoint
    writes them, NumPy scalars in the log included)."""
    ref = _upstream(kind, num_classes=3, seed=5)
    torch.save({"network_weights": ref.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
                "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.4)]},
                "_best_ema": np.float64(0.4), "current_epoch": 1000, "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": _plans(kind), "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1,
                                                                                         "b": 2}}},
                "inference_allowed_mirroring_axes": (0, 1, 2)}, tmp_path / name)
    return ref, tmp_path / name


@needs_dna
@pytest.mark.parametrize("kind", KINDS)
def test_nnunet_checkpoint_in_through_init_with_every_encoder_key(kind, tmp_path):
    from medcl.segment.init import accept_checkpoint, build_from_checkpoint, read_checkpoint

    ref, path = _nnunet_checkpoint(tmp_path, kind)
    ckpt = read_checkpoint(path)  # weights-only, NumPy scalars allowed; the architecture comes from init_args
    assert ckpt.architecture_from == f"nnunet-{kind}" and ckpt.provenance == "unknown"
    assert ckpt.backbone["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 2]]
    with pytest.raises(MedclDataError, match="--allow-unknown-provenance"):
        accept_checkpoint(ckpt)
    net, report = build_from_checkpoint(ckpt, 1, 2, ["encoder", "bottleneck", "decoder"])
    enc = [k for k in net.state_dict() if net.stage_of(k).startswith(("encoder", "bottleneck"))]
    assert report.source_format == f"nnunet-{kind}" and set(enc) <= set(report.loaded)
    assert not report.missing_in(("encoder", "bottleneck", "decoder")) and not report.mismatched
    assert report.missing_in(("head",))  # 3 classes there, 2 here: the head is new
    theirs, ours = ref.state_dict(), net.state_dict()
    stage1 = [k for k in ours if k.startswith("encoder.1.")]
    assert stage1 and all(torch.equal(ours[k], theirs["encoder.stages.1." + k[len("encoder.1."):]]) for k in stage1)
    assert all(torch.equal(ours[k], theirs["encoder.stages.2." + k[len("bottleneck."):]]) for k in ours
               if k.startswith("bottleneck."))
    # nothing maps: refused, naming the layouts tried
    torch.save({"network_weights": {"foo.weight": torch.zeros(3)}}, tmp_path / "junk.pth")
    other = build_backbone(BackboneConfig(name=kind, **TINY))
    with pytest.raises(MedclDataError, match=f"nnunet-{kind}"):
        load_backbone(other, tmp_path / "junk.pth")


@needs_dna
def test_nnssl_checkpoint_describes_its_network(tmp_path):
    """nnssl's layout: ``network_weights`` + ``nnssl_adaptation_plan`` (its ``ResEncL`` is preset ``resenc_l``)."""
    from medcl.models.nnunet_plans import PRESETS
    from medcl.segment.init import build_from_checkpoint, read_checkpoint

    ref = _upstream("resenc", num_classes=1, deep_supervision=False, seed=7)
    plan = {"architecture_plans": {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": _arch("resenc")["arch_kwargs"],
                                   "arch_kwargs_requiring_import": _arch("resenc")["_kw_requires_import"]},
            "pretrain_num_input_channels": 1, "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
            "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]}
    torch.save({"network_weights": ref.state_dict(), "citations": ["nnssl"], "nnssl_adaptation_plan": plan},
               tmp_path / "nnssl.pth")
    ckpt = read_checkpoint(tmp_path / "nnssl.pth")
    assert ckpt.architecture_from == "nnunet-resenc" and ckpt.backbone["blocks"] == [1, 2, 2]
    net, report = build_from_checkpoint(ckpt, 2, 2, ["encoder", "bottleneck"])  # 2 channels: stem adapted
    assert not report.missing_in(("encoder", "bottleneck")) and not report.mismatched
    assert {a["key"] for a in report.adapted} == set(net.input_weight_keys)
    plan["architecture_plans"] = {"arch_class_name": "ResEncL", "arch_kwargs": None}
    torch.save({"network_weights": {}, "nnssl_adaptation_plan": plan}, tmp_path / "resencl.pth")
    assert read_checkpoint(tmp_path / "resencl.pth").backbone == {**PRESETS["resenc_l"], "in_channels": 1}


def test_safe_load_allows_numpy_scalars_but_not_arrays(tmp_path):
    torch.save({"x": np.float64(0.25), "n": np.int64(3)}, tmp_path / "s.pt")
    assert safe_torch_load(tmp_path / "s.pt") == {"x": 0.25, "n": 3}
    torch.save({"a": np.zeros(3)}, tmp_path / "a.pt")
    with pytest.raises(MedclDataError, match="weights-only"):
        safe_torch_load(tmp_path / "a.pt")


@needs_dna
def test_cli_init_from_nnunet_checkpoint_needs_the_provenance_flag(tmp_path, capsys):
    _, path = _nnunet_checkpoint(tmp_path, "plainconv")
    data = write_phantom_dataset(tmp_path / "ph", n=4, size=16, seed=0)
    args = ["finetune", "--data", str(data), "--init", str(path), "--labelled", "2", "--max-steps", "2",
            "--device", "cpu", "threads=1", "sampling.patch_size=[16,16,8]", "sampling.batch_size=2",
            "augment.affine_prob=0", "inference.overlap=0", "trainer.log_every=1"]
    assert main([*args, "--out", str(tmp_path / "a")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-unknown-provenance" in err[0] and "Traceback" not in err[0]
    assert main([*args, "--out", str(tmp_path / "b"), "--allow-unknown-provenance"]) == 0
    report = json.loads((tmp_path / "b" / "load_report.json").read_text())
    assert report["source_format"] == "nnunet-plainconv"
    assert not [k for k in report["missing"] if k.startswith(("encoder", "bottleneck"))] and report["loaded"]
    record = json.loads((tmp_path / "b" / "record.json").read_text())
    assert record["extra"]["provenance"] == "unknown" and record["config"]["backbone"]["name"] == "plainconv"


def test_medcl_imports_without_dynamic_network_architectures(tmp_path):
    """Without the optional extra, medcl (and its key-map registry) imports; a plainconv / resenc config is refused
    when it is validated -- before any run folder or data -- with one line naming ``pip install 'medcl[nnunet]'``."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["dynamic_network_architectures"] = None  # as if not installed
        import medcl, medcl.models
        from medcl.cli import main
        from medcl.core.errors import MedclConfigError
        from medcl.models import BackboneConfig, build_backbone
        from medcl.models.keymaps import keymap_names
        assert "nnunet-resenc" in keymap_names()
        try:
            build_backbone(BackboneConfig(name="resenc", filters=(4, 8, 16), strides=(1, 2, 2)))
        except MedclConfigError as exc:
            print(exc)
        sys.exit(main(["pretrain", "--config", {str(CONFIGS / "gd_local.yaml")!r}, "--data", {str(tmp_path)!r},
                       "--out", {str(tmp_path / "run")!r}, "backbone.name=plainconv"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "pip install 'medcl[nnunet]'" in lines[0] and "backbone.name" in lines[0], out
    err = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(err) == 1 and "pip install 'medcl[nnunet]'" in err[0], out.stderr
    assert not list((tmp_path / "run").glob("*"))  # no record, no config: nothing began
