"""Key-map registry (medcl.models.keymaps) and provenance sidecars for external weights (medcl.segment.init)."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import DynUNet

from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.models import BackboneConfig, build_backbone, load_backbone
from medcl.models.keymaps import KeyMap, apply_keymap, get_keymap, keymap_names, keymaps_for, register_keymap


def _small():
    return build_backbone(BackboneConfig(in_channels=1, out_channels=2, filters=(8, 16, 32, 64), res_block=True))


def test_registry_names_the_monai_layouts_per_backbone():
    assert {"monai-dynunet", "monai-swinunetr"} <= set(keymap_names())
    assert [m.name for m in keymaps_for("dynunet") if m.name.startswith("monai")] == ["monai-dynunet"]
    with pytest.raises(MedclConfigError, match="unknown key map 'nope'"):
        get_keymap("nope")


def test_forced_key_map_reads_only_that_layout_and_refuses_other_backbones():
    ref = DynUNet(3, 1, 2, [3] * 4, [1, 2, 2, 2], [2, 2, 2], filters=[8, 16, 32, 64], res_block=True)
    net = _small()
    rep = load_backbone(net, ref.state_dict(), key_map="monai-dynunet")
    assert rep.source_format == "monai-dynunet" and rep.ok
    as_medcl = load_backbone(_small(), ref.state_dict(), key_map="medcl")  # only DynUNet's "bottleneck." coincides
    assert as_medcl.loaded and all(k.startswith("bottleneck.") for k in as_medcl.loaded)
    assert as_medcl.missing_in(("encoder",)) and not rep.missing
    with pytest.raises(MedclConfigError, match="converts to"):
        load_backbone(_small(), ref.state_dict(), key_map="monai-swinunetr")


def test_apply_keymap_renames_first_matching_pair_and_drops_duplicates():
    km = KeyMap("test-layout", "a test layout", ("dynunet",), lambda b: [("a.", "encoder.0."), ("a.b.", "never.")],
                drop=("dup.",))
    register_keymap(km, replace=True)
    t = torch.zeros(1)
    out = apply_keymap(km, _small(), {"module.a.b.w": t, "dup.x": t, "other.y": t})
    assert out == {"module.encoder.0.b.w": t, "other.y": t}


def _external_ckpt(tmp_path):
    net = _small()
    path = tmp_path / "external.pt"
    torch.save(net.state_dict(), path)  # a plain state dict: no run record
    return path


def test_sidecar_gives_external_weights_provenance_and_guards_the_test_set(tmp_path):
    from medcl.segment.init import accept_checkpoint, read_checkpoint

    path = _external_ckpt(tmp_path)
    with pytest.raises(MedclDataError, match="external.pt.provenance.json"):
        accept_checkpoint(read_checkpoint(path), test_cases=["c1"])
    (tmp_path / "external.pt.provenance.json").write_text(json.dumps({"cases_seen": ["c7", "c8"], "source": "x"}))
    ckpt = read_checkpoint(path)
    acc = accept_checkpoint(ckpt, test_cases=["c1", "c2"])
    assert acc.provenance == "sidecar" and acc.info()["kind"] == "external" and acc.info()["cases_seen"] == 2
    with pytest.raises(MedclDataError, match="1 of the test cases \\(c8\\)"):
        accept_checkpoint(ckpt, test_cases=["c8"])


@pytest.mark.parametrize("text, problem", [("{not json", "not readable JSON"), ('{"source": "x"}', "list 'cases_seen'"),
                                           ('{"cases_seen": [1, {"a": 2}]}', "list of ids")])
def test_malformed_sidecar_is_one_clear_error(tmp_path, text, problem):
    from medcl.segment.init import read_checkpoint

    path = _external_ckpt(tmp_path)
    (tmp_path / "provenance.json").write_text(text)
    with pytest.raises(MedclDataError, match=problem):
        read_checkpoint(path)
