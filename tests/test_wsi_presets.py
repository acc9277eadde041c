"""Pathology encoder presets (``--encoder preset:NAME:WEIGHTS``): the table, the weights-file shape check, the
plumbing of normalisation, input size, pooling and magnification into extraction, the tiling mpp warning, and the
one-line error when timm cannot be imported.

Most tests run without timm: the model is a stand-in with timm's state-dict layout, injected where the preset's
timm model would be built, so the table, the shape check and the plumbing are tested wherever medcl installs. The
last tests build every preset with timm (on the meta device) and load randomly initialised weights saved to a file
through ``timm:ARCH:WEIGHTS`` and ``preset:NAME:WEIGHTS``; they skip, with the import error as the reason, where timm
cannot be imported (the ``dev`` extra installs it).
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import json
import sys
import warnings

import h5py
import lightning  # noqa: F401  (imported once per session: engine.checkpoint needs it)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _slides import synthetic_slides
from torch import nn

from medcl.cli import main
from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.wsi import encoders
from medcl.wsi.encoders import build_encoder
from medcl.wsi.extract import TileDataset
from medcl.wsi.presets import (
    PRESETS,
    EncoderPreset,
    check_weights,
    expected_shapes,
    get_preset,
    parse_preset_spec,
)
from medcl.wsi.tile_io import load_tile_set


def cli(*args) -> int:
    return main([str(a) for a in args])


# ----------------------------------------------------------------------------------------- the table

# Published values, copied here from the model cards / loaders independently of the table (sources in presets.py)
PUBLISHED = {
    "uni": dict(dim=1024, mean=(0.485, 0.456, 0.406), input=224, mpp=0.5),
    "uni2-h": dict(dim=1536, mean=(0.485, 0.456, 0.406), input=224, mpp=0.5),
    "virchow": dict(dim=2560, mean=(0.485, 0.456, 0.406), input=224, mpp=0.5),
    "virchow2": dict(dim=2560, mean=(0.485, 0.456, 0.406), input=224, mpp=0.5),
    "h-optimus-0": dict(dim=1536, mean=(0.707223, 0.578729, 0.703617), input=224, mpp=0.5),
    "prov-gigapath": dict(dim=1536, mean=(0.485, 0.456, 0.406), input=224, mpp=0.5),
    "lunit-vits16": dict(dim=384, mean=(0.70322989, 0.53606487, 0.66096631), input=224, mpp=0.5),
    "lunit-vits8": dict(dim=384, mean=(0.70322989, 0.53606487, 0.66096631), input=224, mpp=0.5),
    "kaiko-vits16": dict(dim=384, mean=(0.5, 0.5, 0.5), input=224, mpp=0.5),
    "kaiko-vits8": dict(dim=384, mean=(0.5, 0.5, 0.5), input=224, mpp=0.5),
    "kaiko-vitb16": dict(dim=768, mean=(0.5, 0.5, 0.5), input=224, mpp=0.5),
    "kaiko-vitb8": dict(dim=768, mean=(0.5, 0.5, 0.5), input=224, mpp=0.5),
}

# Shapes of timm 1.0.22's models built from each preset (on the meta device), for the keys that tell them apart
TIMM_SHAPES = {
    "uni": {"pos_embed": (1, 197, 1024), "patch_embed.proj.weight": (1024, 3, 16, 16),
            "blocks.23.mlp.fc2.weight": (1024, 4096), "blocks.0.ls1.gamma": (1024,)},
    "uni2-h": {"pos_embed": (1, 256, 1536), "reg_token": (1, 8, 1536), "blocks.0.mlp.fc1.weight": (8192, 1536),
               "blocks.0.mlp.fc2.weight": (1536, 4096), "blocks.23.ls2.gamma": (1536,)},
    "virchow": {"pos_embed": (1, 257, 1280), "blocks.0.mlp.fc1.weight": (6832, 1280),
                "blocks.31.mlp.fc2.weight": (1280, 3416)},
    "virchow2": {"pos_embed": (1, 261, 1280), "reg_token": (1, 4, 1280)},
    "h-optimus-0": {"pos_embed": (1, 256, 1536), "reg_token": (1, 4, 1536), "patch_embed.proj.weight": (1536, 3, 14, 14),
                    "blocks.39.mlp.fc2.weight": (1536, 4096)},
    "prov-gigapath": {"pos_embed": (1, 197, 1536), "patch_embed.proj.weight": (1536, 3, 16, 16),
                      "blocks.39.mlp.fc1.weight": (8192, 1536)},
    "lunit-vits16": {"pos_embed": (1, 197, 384), "blocks.11.mlp.fc1.weight": (1536, 384)},
    "lunit-vits8": {"pos_embed": (1, 785, 384), "patch_embed.proj.weight": (384, 3, 8, 8)},
    "kaiko-vitb8": {"pos_embed": (1, 785, 768), "blocks.11.mlp.fc2.weight": (768, 3072)},
}
TIMM_KEYS = {"uni": 342, "uni2-h": 343, "virchow": 454, "virchow2": 455, "h-optimus-0": 567, "prov-gigapath": 566,
             "lunit-vits16": 150, "lunit-vits8": 150, "kaiko-vits16": 150, "kaiko-vits8": 150, "kaiko-vitb16": 150,
             "kaiko-vitb8": 150}


def test_preset_table_holds_the_published_settings():
    assert set(PRESETS) == set(PUBLISHED)
    for name, pub in PUBLISHED.items():
        p = get_preset(name)
        assert p.name == name and p.feature_dim == pub["dim"] and p.mean == pytest.approx(pub["mean"])
        assert p.input_size == pub["input"] and p.mpp == pub["mpp"] and p.input_size % p.patch_size == 0
        assert p.download.startswith("https://") and p.licence and p.access
        assert all(0 < s < 1 for s in p.std) and p.tile_size >= p.input_size
        assert name in p.describe() and p.licence in p.describe()
    assert "gated" in get_preset("uni").access and "NC-ND" in get_preset("uni").licence
    assert get_preset("h-optimus-0").licence == "Apache-2.0"


def full_state_dict(preset: EncoderPreset) -> dict[str, torch.Tensor]:
    """Meta tensors for every key timm's model has that the check reads, built from the timm-measured shapes."""
    sd = {k: torch.empty(v, device="meta") for k, v in expected_shapes(preset).items()}
    for i in range(preset.depth):
        sd.setdefault(f"blocks.{i}.attn.qkv.weight", torch.empty(3 * preset.embed_dim, preset.embed_dim, device="meta"))
    return sd


@pytest.mark.parametrize("name", sorted(TIMM_SHAPES))
def test_expected_shapes_agree_with_timm_measurements(name):
    p = get_preset(name)
    exp = expected_shapes(p)
    for key, shape in TIMM_SHAPES[name].items():
        block = key.split(".")[1] if key.startswith("blocks.") else None
        key0 = key.replace(f"blocks.{block}.", "blocks.0.") if block else key
        if key0 in exp:
            assert exp[key0] == shape, (name, key)
    check_weights(p, full_state_dict(p), "weights.bin")  # the preset's own layout passes


def test_parse_preset_spec():
    p, path = parse_preset_spec("preset:uni:/data/w/C:drive/pytorch_model.bin")
    assert p.name == "uni" and path == "/data/w/C:drive/pytorch_model.bin"
    with pytest.raises(MedclConfigError, match="unknown encoder preset 'unii'.*known presets: .*uni"):
        parse_preset_spec("preset:unii:/w.bin")
    with pytest.raises(MedclConfigError, match="preset:NAME:/path/to/weights"):
        parse_preset_spec("preset:uni")


@pytest.mark.parametrize("weights, preset, message", [
    ("uni", "uni2-h", r"'patch_embed.proj.weight' has shape \[1024, 3, 16, 16\], expected \[1536, 3, 14, 14\]"),
    ("virchow", "virchow2", r"'pos_embed' has shape \[1, 257, 1280\], expected \[1, 261, 1280\]"),
    ("lunit-vits16", "lunit-vits8", r"'patch_embed.proj.weight' has shape \[384, 3, 16, 16\]"),
    ("kaiko-vits16", "uni", r"'patch_embed.proj.weight' has shape \[384, 3, 16, 16\], expected \[1024, 3, 16, 16\]"),
    ("lunit-vits16", "kaiko-vitb16", r"has shape \[384, 3, 16, 16\], expected \[768, 3, 16, 16\]"),
    ("h-optimus-0", "uni2-h", r"'pos_embed' has shape \[1, 256, 1536\]|'reg_token' has shape \[1, 4, 1536\]"),
])
def test_shape_check_names_file_preset_and_first_mismatched_key(weights, preset, message):
    with pytest.raises(MedclDataError, match=message) as err:
        check_weights(get_preset(preset), full_state_dict(get_preset(weights)), "/w/model.bin")
    text = str(err.value)
    assert text.startswith("/w/model.bin: does not fit preset") and f"'{preset}'" in text and "\n" not in text


def test_shape_check_counts_blocks_and_missing_keys(tmp_path):
    p = get_preset("lunit-vits16")
    sd = full_state_dict(p)
    sd["blocks.12.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"]
    with pytest.raises(MedclDataError, match="13 transformer blocks, expected 12"):
        check_weights(p, sd, "w.bin")
    del sd["blocks.12.attn.qkv.weight"], sd["blocks.11.attn.qkv.weight"]
    with pytest.raises(MedclDataError, match="'blocks.11.attn.qkv.weight' is missing"):
        check_weights(p, sd, "w.bin")
    # through a real file and build_encoder: refused before any model is built (timm is never imported)
    small = {k: torch.zeros(v.shape) for k, v in sd.items() if k in ("patch_embed.proj.weight", "cls_token")}
    small["patch_embed.proj.weight"] = torch.zeros(384, 3, 8, 8)
    torch.save(small, tmp_path / "vits8.pth")
    with pytest.raises(MedclDataError, match=r"vits8.pth: does not fit preset 'lunit-vits16'.*\[384, 3, 8, 8\]"):
        build_encoder(f"preset:lunit-vits16:{tmp_path / 'vits8.pth'}")


# ----------------------------------------------------------------------------------------- plumbing, without timm

TINY = EncoderPreset(
    "tiny-test", "vit_tiny_stand_in", {}, embed_dim=8, depth=2, patch_size=4, input_size=16, mlp_hidden=16,
    layer_scale=True, mean=(0.6, 0.5, 0.7), std=(0.2, 0.25, 0.15), mpp=0.5, tile_size=16, licence="test",
    access="test", download="https://example.invalid/tiny.bin")


class StandIn(nn.Module):
    """A module with timm's ViT state-dict names for the keys the check reads (a 2-block toy, not a ViT):
    ``[B, 3, 16, 16]`` -> ``[B, 8]`` (``tokens=True``: ``[B, 1 + 16, 8]``)."""

    def __init__(self, tokens: bool = False) -> None:
        super().__init__()
        d = TINY.embed_dim
        self.tokens = tokens
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, d))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 4, 4)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            b = nn.Module()
            b.attn = nn.Module()
            b.attn.qkv = nn.Linear(d, 3 * d)
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(d, 16), nn.Linear(16, d)
            b.ls1 = nn.Module()
            b.ls1.gamma = nn.Parameter(torch.rand(d))
            self.blocks.append(b)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (16, 16), x.shape  # the preset's input size reached the model
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(x), -1, -1), t], 1) + self.pos_embed
        for b in self.blocks:
            t = t + b.ls1.gamma * b.mlp.fc2(F.gelu(b.mlp.fc1(t)))
        t = self.norm(t)
        return t if self.tokens else t[:, 0]


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """The tiny preset registered, its stand-in model built where timm would build the preset's, and a weights
    file of a seeded stand-in."""
    torch.manual_seed(0)
    ref = StandIn().eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "tiny.pth")  # wrapped, as many checkpoints are
    monkeypatch.setitem(PRESETS, TINY.name, TINY)
    monkeypatch.setattr(encoders, "timm_preset_model", lambda preset: StandIn(tokens=preset.pool == "cls+mean"))
    return ref, tmp_path / "tiny.pth"


def test_preset_encoder_uses_the_presets_weights_normalisation_and_size(tiny):
    ref, path = tiny
    enc = build_encoder(f"preset:tiny-test:{path}")
    assert (enc.preset, enc.mpp, enc.dim, enc.input_size) == ("tiny-test", 0.5, 8, 16)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    xr = F.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    want = ref((xr - torch.tensor(TINY.mean).view(1, 3, 1, 1)) / torch.tensor(TINY.std).view(1, 3, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(enc(x), want.detach(), rtol=1e-5, atol=1e-6)


def test_cls_plus_mean_pooling(tiny, monkeypatch):
    ref, path = tiny
    monkeypatch.setitem(PRESETS, TINY.name, dataclasses.replace(TINY, pool="cls+mean"))
    enc = build_encoder(f"preset:tiny-test:{path}")
    assert enc.dim == 16
    x = torch.rand(2, 3, 16, 16)
    ref.tokens = True
    with torch.no_grad():
        t = ref((x - torch.tensor(TINY.mean).view(1, 3, 1, 1)) / torch.tensor(TINY.std).view(1, 3, 1, 1))
        torch.testing.assert_close(enc(x), torch.cat([t[:, 0], t[:, 1:].mean(1)], -1))


def test_extract_with_a_preset_records_it_and_warns_on_mpp(tiny, tmp_path):
    """Tiles at 1.0 um/px for a preset trained at 0.5: extraction warns, writes the preset, its mpp, mean, std and
    input size into the feature files, and each row is the preset encoder applied to the tile; tiling warns when
    asked for tiles at another mpp than the preset's, and not otherwise."""
    _, path = tiny
    synthetic_slides(tmp_path / "slides", 1, size=256)
    with pytest.warns(UserWarning, match="trained on tiles at 0.5 um/px"):
        assert cli("mil", "tile", tmp_path / "slides", "--out", tmp_path / "t1", "--mpp", 1.0, "--size", 32,
                   "--thumbnail-size", 256, "--preset", "tiny-test") == 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli("mil", "tile", tmp_path / "slides", "--out", tmp_path / "t05", "--mpp", 0.52, "--size", 16,
                   "--thumbnail-size", 256, "--preset", "tiny-test") == 0
    assert not [w for w in seen if "preset" in str(w.message)]  # within 10%: no warning
    assert cli("mil", "tile", tmp_path / "slides", "--out", tmp_path / "tx", "--preset", "nope") == 2
    with pytest.warns(UserWarning, match="tiles at 1 um/px, but encoder preset 'tiny-test'"):
        assert cli("mil", "extract", tmp_path / "t1", "--encoder", f"preset:tiny-test:{path}", "--out",
                   tmp_path / "f", "--workers", 0, "--device", "cpu") == 0
    with h5py.File(tmp_path / "f" / "syn_0.h5") as f:
        a, feats = dict(f.attrs), f["features"][()]
    assert a["encoder_preset"] == "tiny-test" and a["encoder_mpp"] == 0.5 and a["encoder_input_size"] == 16
    np.testing.assert_allclose(a["encoder_mean"], TINY.mean) and np.testing.assert_allclose(a["encoder_std"], TINY.std)
    assert feats.shape[1] == 8 and a["encoder"] == f"preset:tiny-test:{path}"
    ds = TileDataset([load_tile_set(tmp_path / "t1" / "syn_0.h5")])
    tile = torch.from_numpy(ds.read(1).transpose(2, 0, 1).copy())[None]
    ds.close()
    with torch.no_grad():
        np.testing.assert_allclose(feats[1], build_encoder(f"preset:tiny-test:{path}")(tile)[0].numpy(), rtol=1e-5,
                                   atol=1e-6)
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["encoder"] == f"preset:tiny-test:{path}"


# ----------------------------------------------------------------------------------------- timm


class _BrokenTimm(importlib.abc.MetaPathFinder):
    """Imports of timm fail the way they do next to a mismatched torchvision."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "timm" or fullname.startswith("timm."):
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_timm_import_failure_is_one_config_line(monkeypatch, tmp_path, capsys):
    for mod in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTimm(), *sys.meta_path])
    with pytest.raises(MedclConfigError) as err:
        encoders.timm_preset_model(get_preset("uni"))
    assert str(err.value) == ("config key 'encoder': timm is not importable: RuntimeError: operator torchvision::nms "
                              "does not exist; preset 'uni' needs timm (pip install timm with the torchvision build "
                              "that matches your torch)")
    torch.save({}, tmp_path / "w.pth")
    with h5py.File(tmp_path / "s.h5", "w") as f:  # a tile file: the encoder is built once the run folder is ready
        f["coords"] = np.zeros((1, 2), np.int64)
    rc = cli("mil", "extract", tmp_path, "--encoder", f"timm:vit_small_patch16_224:{tmp_path / 'w.pth'}", "--out",
             tmp_path / "o")
    err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("medcl:")]
    assert rc == 2 and len(err_lines) == 1 and "timm is not importable: RuntimeError" in err_lines[0]


def _timm():
    """timm, or a skip saying exactly why it cannot be imported here."""
    try:
        import timm
    except Exception as exc:  # ImportError, or RuntimeError from a torchvision built for another torch
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        pytest.skip(f"timm is not importable: {type(exc).__name__}: {lines[-1] if lines else repr(exc)}")
    return timm


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_with_timm_and_match_its_state_dict(name):
    _timm()
    p = get_preset(name)
    with torch.device("meta"):
        model = encoders.timm_preset_model(p)
    sd = model.state_dict()
    assert len(sd) == TIMM_KEYS[name]
    check_weights(p, sd, "timm")
    assert {k: tuple(sd[k].shape) for k in expected_shapes(p)} == expected_shapes(p)


def test_timm_spec_and_a_preset_load_random_weights_from_a_file(tmp_path):
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    torch.save(model.state_dict(), tmp_path / "vits16.pth")
    x = torch.rand(2, 3, 224, 224)
    enc = build_encoder(f"timm:vit_small_patch16_224:{tmp_path / 'vits16.pth'}", encoder_kwargs={"dynamic_img_size": True})
    with torch.no_grad():
        norm = (x - enc.mean) / enc.std
        torch.testing.assert_close(enc(x), model(norm))
        lunit = build_encoder(f"preset:lunit-vits16:{tmp_path / 'vits16.pth'}")
        assert lunit.dim == 384 and lunit.mean.flatten().tolist() == pytest.approx(PUBLISHED["lunit-vits16"]["mean"])
        mean = torch.tensor(get_preset("lunit-vits16").mean).view(1, 3, 1, 1)
        std = torch.tensor(get_preset("lunit-vits16").std).view(1, 3, 1, 1)
        torch.testing.assert_close(lunit(x), model((x - mean) / std))
