"""The label-efficiency benchmark compares each pretrained init with the random init of ITS architecture."""

from __future__ import annotations

import pytest

from medcl.config import from_dict
from medcl.core.errors import MedclConfigError
from medcl.models import BackboneConfig, build_backbone, save_backbone
from medcl.segment.bench_config import LabelEfficiencyConfig
from medcl.segment.benchmark import Init, _architectures

IN_NORM = BackboneConfig(filters=(4, 8, 16), strides=(1, 2, 2))
BATCH_NORM = BackboneConfig(filters=(4, 8, 16), strides=(1, 2, 2), norm="batch")


def _ckpt(tmp_path, name: str, cfg: BackboneConfig) -> str:
    path = tmp_path / f"{name}.pt"
    save_backbone(build_backbone(cfg), path, record={"kind": "pretrain", "plan": {"foreground": "nonzero"}})
    return str(path)


def test_each_random_arm_takes_the_architecture_of_the_inits_compared_with_it(tmp_path):
    base = {"backbone": {"filters": [16, 32, 64, 128], "strides": [1, 2, 2, 2]}}
    inits = [Init("random"), Init("gd", _ckpt(tmp_path, "gd", IN_NORM), reference="random"),
             Init("random_bn"), Init("voco", _ckpt(tmp_path, "voco", BATCH_NORM), reference="random_bn")]
    bases = _architectures(base, inits)
    assert bases["random"]["backbone"]["norm"] == "instance" and list(bases["random"]["backbone"]["filters"]) == [4, 8, 16]
    assert bases["random_bn"]["backbone"]["norm"] == "batch"
    assert bases["gd"] == base and bases["voco"] == base  # pretrained inits fine-tune their checkpoint's network
    assert bases["random"]["data"]["plan"]["foreground"] == "nonzero"


def test_a_random_arm_refuses_checkpoints_of_two_architectures(tmp_path):
    inits = [Init("random"), Init("gd", _ckpt(tmp_path, "gd", IN_NORM), reference="random"),
             Init("voco", _ckpt(tmp_path, "voco", BATCH_NORM), reference="random")]
    with pytest.raises(MedclConfigError, match="different backbones"):
        _architectures({}, inits)


def test_the_config_refuses_an_unknown_reference_or_ceiling_init():
    with pytest.raises(MedclConfigError, match="reference"):
        from_dict(LabelEfficiencyConfig, {"inits": [{"name": "voco", "method": "voco", "reference": "random_bn"}]})
    with pytest.raises(MedclConfigError, match="ceiling.inits"):
        from_dict(LabelEfficiencyConfig, {"ceiling": {"inits": ["nope"]}})
    cfg = from_dict(LabelEfficiencyConfig, {"inits": [{"name": "random_bn", "random": True},
                                                      {"name": "voco", "method": "voco", "reference": "random_bn"}]})
    assert cfg.split.combinations == 5 and cfg.ceiling.inits == ["random"]


def test_recipe_inits_restricts_a_recipe_to_the_inits_it_names():
    """recipes [supervised, semi] with recipe_inits {semi: [random, mae]}: every init keeps its supervised row, only
    the named ones get a semi row (paired with their supervised random arm); an unknown name is refused."""
    from medcl.segment.benchmark import _with_recipes

    raw = {"recipes": ["supervised", "semi"], "recipe_inits": {"semi": ["random", "mae"]},
           "inits": [{"name": "mae", "checkpoint": "m.pt"}, {"name": "gd", "checkpoint": "g.pt"}]}
    cfg = from_dict(LabelEfficiencyConfig, raw)
    cfg.validate()
    inits = [Init("random"), Init("mae", "m.pt", reference="random"), Init("gd", "g.pt", reference="random")]
    rows = _with_recipes(cfg, inits)
    assert [(r.name, r.recipe) for r in rows] == [("random", "supervised"), ("mae", "supervised"),
                                                  ("gd", "supervised"), ("random+semi", "semi"), ("mae+semi", "semi")]
    assert next(r for r in rows if r.name == "mae+semi").reference == "random"
    with pytest.raises(MedclConfigError, match="recipe_inits.semi"):
        from_dict(LabelEfficiencyConfig, {**raw, "recipe_inits": {"semi": ["random", "nope"]}}).validate()
