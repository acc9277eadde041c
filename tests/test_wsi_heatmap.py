"""Whole-slide pipeline, second half: 2D views and stain augmentation, encoder pretraining on tiles,
heatmaps and QuPath GeoJSON from a trained MIL model."""

from __future__ import annotations

import json

import h5py
import lightning  # noqa: F401  (imported once per session: engine.checkpoint needs it)
import monai  # noqa: F401
import numpy as np
import pytest
import tifffile
import torch
from _runfolder import assert_run_folder
from matplotlib import colormaps
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from medcl.cli import main
from medcl.io.slide import open_slide
from medcl.mil.heads import build_head
from medcl.mil.heatmap import read_bag_features
from medcl.mil.train import save_mil_model
from medcl.wsi.encoders import build_builtin, build_encoder
from medcl.wsi.pretrain_encoder import dihedral, hed_jitter, hed_to_rgb, random_views, rgb_to_hed

CMU = "wsi/CMU-1-Small-Region.svs"


def cli(*args) -> int:
    return main([str(a) for a in args])


# --------------------------------------------------------------------------------------------- views


def test_views_without_crop_are_the_eight_dihedral_images():
    """scale = ratio = 1 leaves only flips and quarter turns: each view is exactly one of the 8 images."""
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    v = random_views(x, 12, torch.Generator().manual_seed(1), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    f = x.float() / 255
    seen = set()
    for i in range(16):
        cands = [torch.rot90(g, k, (1, 2)) for g in (f[i], f[i].flip(2)) for k in range(4)]
        err = [float((v[i] - c).abs().max()) for c in cands]
        assert min(err) < 1e-5
        seen.add(int(np.argmin(err)))
    assert len(seen) >= 4  # the group is sampled, not one fixed transform
    assert torch.equal(dihedral(torch.tensor([0.0]), torch.tensor([False]))[0], torch.eye(2))


def test_view_crop_covers_the_requested_area():
    """A tile whose left half is 0 and right half 1: crops of area fraction a see a mean in line with their
    position; with scale fixed at 0.25 the crop side is half the tile, so no view is half 0 / half 1 unless
    it straddles the centre, and the mean over many views is 0.5 by symmetry."""
    x = torch.zeros(512, 1, 64, 64)
    x[..., 32:] = 1.0
    x = x.expand(-1, 3, -1, -1)
    v = random_views(x, 32, torch.Generator().manual_seed(0), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    assert v.shape == (512, 3, 32, 32)
    assert abs(float(v.mean()) - 0.5) < 0.05
    fully = ((v.mean((1, 2, 3)) < 0.02) | (v.mean((1, 2, 3)) > 0.98)).float().mean()
    assert 0.05 < float(fully) < 0.95  # some crops lie in one half, some straddle the edge


def test_hed_matches_scikit_image_and_identity_jitter():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0.05, 1.0, (2, 3, 6, 5))
    t = torch.from_numpy(rgb)
    ref_hed = np.stack([rgb2hed(a.transpose(1, 2, 0)).transpose(2, 0, 1) for a in rgb])
    np.testing.assert_allclose(rgb_to_hed(t).numpy(), ref_hed, atol=1e-10)
    ref_rgb = np.stack([hed2rgb(a.transpose(1, 2, 0)).transpose(2, 0, 1) for a in ref_hed])
    np.testing.assert_allclose(hed_to_rgb(torch.from_numpy(ref_hed)).numpy(), ref_rgb, atol=1e-10)
    np.testing.assert_allclose(hed_to_rgb(rgb_to_hed(t, clamp=False)).numpy(), rgb, atol=1e-10)
    out = hed_jitter(t.float(), 0.1, torch.Generator().manual_seed(0))
    assert out.shape == t.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert 0.0 < float((out - t.float()).abs().mean()) < 0.2
    # the jitter acts per image: the HED change of one image is one affine map for all its pixels
    d_in, d_out = rgb_to_hed(t.float(), clamp=False)[0, 0].flatten(), rgb_to_hed(out, clamp=False)[0, 0].flatten()
    a, b = np.polyfit(d_in.numpy(), d_out.numpy(), 1)
    assert np.abs(a * d_in.numpy() + b - d_out.numpy()).max() < 1e-3 and abs(a - 1) <= 0.1 + 1e-6


# --------------------------------------------------------------------------------------------- pretraining


def test_pretrain_encoder_checkpoint_feeds_extraction(tmp_path):
    """A few SimCLR steps on tiles of a synthetic slide; the checkpoint loads with weights_only, its weights
    moved away from the seed initialisation, and ``extract --encoder CKPT`` uses it."""
    rng = np.random.default_rng(0)
    img = np.full((768, 768, 3), 240, np.uint8)
    img[64:704, 64:704] = np.clip(np.array([170, 80, 160]) + rng.normal(0, 25, (640, 640, 3)), 0, 255)
    tifffile.imwrite(tmp_path / "s.tif", img, tile=(128, 128), photometric="rgb", compression="jpeg",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    assert cli("mil", "tile", tmp_path / "s.tif", "--out", tmp_path / "tiles", "--size", 64, "--mpp", 1.0,
               "--thumbnail-size", 256) == 0
    assert cli("mil", "pretrain-encoder", tmp_path / "tiles", "--out", tmp_path / "enc", "--steps", 3,
               "--batch-size", 4, "--crop", 32, "--width", 8, "--workers", 0, "--log-every", 1) == 0
    ckpt = tmp_path / "enc" / "encoder.pt"
    d = torch.load(ckpt, weights_only=True)
    assert d["format"] == "medcl-patch-encoder" and d["input_size"] == 32 and d["record"]["kind"] == "mil-encoder"
    enc = build_encoder(str(ckpt))
    init = build_builtin(8, seed=0)
    moved = [not torch.equal(a, b) for a, b in zip(enc.model.state_dict().values(), init.model.state_dict().values())
             if a.is_floating_point()]
    assert enc.dim == 64 and any(moved)
    rows = (tmp_path / "enc" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])
    assert cli("mil", "extract", tmp_path / "tiles", "--encoder", ckpt, "--out", tmp_path / "f", "--workers", 0) == 0
    with h5py.File(tmp_path / "f" / "s.h5") as f, h5py.File(tmp_path / "tiles" / "s.h5") as t:
        assert f["features"].shape == (t["coords"].shape[0], 64)
        np.testing.assert_array_equal(f["coords"][()], t["coords"][()])
    # the run-folder contract of the three slide commands
    from medcl.wsi.config import ExtractParams, PretrainParams, TilingParams

    assert_run_folder(tmp_path / "tiles", "wsi-tiles", TilingParams, step=1)
    assert_run_folder(tmp_path / "enc", "mil-encoder", PretrainParams, step=3)
    assert_run_folder(tmp_path / "f", "wsi-features", ExtractParams, step=1)


# --------------------------------------------------------------------------------------------- heatmap


@pytest.fixture(scope="module")
def scored_slide(shared_data, tmp_path_factory):
    """CMU tiles at 2 um/px (64 px), random 16-d features, an untrained ABMIL saved as 'medcl mil train' does."""
    from medcl.mil.config import MILConfig

    d = tmp_path_factory.mktemp("heat")
    svs = shared_data / CMU
    assert cli("mil", "tile", svs, "--out", d / "tiles", "--mpp", 2.0, "--size", 64, "--thumbnail-size", 512) == 0
    with h5py.File(d / "tiles" / "CMU-1-Small-Region.h5") as t:
        coords = t["coords"][()]
        attrs = dict(t.attrs)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(coords), 16)).astype(np.float32)
    with h5py.File(d / "f.h5", "w") as f:
        f["features"] = feats
        f["coords"] = coords
        for k, v in attrs.items():
            f.attrs[k] = v
    torch.manual_seed(0)
    cfg = MILConfig()
    head = build_head(cfg, 16, 2).eval()
    save_mil_model(d / "model.pt", head, cfg, ["benign", "tumour"])
    with torch.no_grad():
        att = head(torch.from_numpy(feats)[None], torch.ones(1, len(feats), dtype=torch.bool)).instance_scores[0].numpy()
    return d, svs, coords, attrs, att


def test_heatmap_png_has_thumbnail_size_and_paints_scores(scored_slide):
    d, svs, coords, attrs, att = scored_slide
    out = d / "heat.png"
    assert cli("mil", "heatmap", "--slide", svs, "--features", d / "f.h5", "--ckpt", d / "model.pt", "--out", out,
               "--thumbnail-size", 400, "--alpha", 0.6) == 0
    img = np.asarray(Image.open(out).convert("RGB")).astype(np.float32)
    with open_slide(svs) as s:
        thumb = s.thumbnail(400).astype(np.float32)
        sx, sy = thumb.shape[1] / s.dimensions[0], thumb.shape[0] / s.dimensions[1]
    assert img.shape == thumb.shape  # pixel for pixel over the thumbnail
    t0 = attrs["tile_size_level0"]
    colour = np.asarray(colormaps["jet"](np.array([1.0, 0.0])))[:, :3] * 255
    for idx, c in ((int(att.argmax()), colour[0]), (int(att.argmin()), colour[1])):
        x, y = coords[idx]
        r, q = int((y + t0 / 2) * sy), int((x + t0 / 2) * sx)
        if 0.16 * img.shape[0] < r < 0.84 * img.shape[0] and (q < 0.2 * img.shape[1] or q > 0.8 * img.shape[1]):
            continue  # under the colour-bar panel
        expected = 0.4 * thumb[r, q] + 0.6 * c
        assert np.abs(img[r, q] - expected).max() <= 3.0
    # glass far from any tile is the untouched thumbnail (top-right corner region, no title there)
    covered = np.zeros(thumb.shape[:2], bool)
    for x, y in coords:
        covered[int(y * sy) : int((y + t0) * sy) + 1, int(x * sx) : int((x + t0) * sx) + 1] = True
    probe = ~covered
    probe[: int(0.05 * img.shape[0])] = False  # title
    probe[int(0.16 * img.shape[0]) : int(0.84 * img.shape[0])] = False  # colour-bar panel rows
    assert probe.sum() > 100
    assert np.abs(img[probe] - thumb[probe]).mean() < 1.0


def test_geojson_one_qupath_feature_per_tile(scored_slide):
    d, svs, coords, attrs, att = scored_slide
    gj = d / "tiles.geojson"
    assert cli("mil", "heatmap", "--slide", svs, "--features", d / "f.h5", "--ckpt", d / "model.pt",
               "--out", d / "h.png", "--geojson", gj, "--thumbnail-size", 256) == 0
    doc = json.loads(gj.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(coords)
    t0 = attrs["tile_size_level0"]
    ids = set()
    for feat, (x, y), a in zip(doc["features"], coords, att):
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        ring = np.asarray(feat["geometry"]["coordinates"][0])
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()  # closed ring
        np.testing.assert_allclose(ring.min(0), [x, y])
        np.testing.assert_allclose(ring.max(0) - ring.min(0), [t0, t0])
        props = feat["properties"]
        assert props["objectType"] == "tile" and len(props["color"]) == 3
        (value,) = props["measurements"].values()
        assert value == pytest.approx(float(a), rel=1e-5, abs=1e-8)  # the model's attention for that tile
        ids.add(feat["id"])
    assert len(ids) == len(coords)
    assert sum(a for a in att) == pytest.approx(1.0, rel=1e-4)  # ABMIL attention is a softmax over the bag


def test_heatmap_rejects_mismatched_features(scored_slide, tmp_path):
    d, svs, coords, attrs, att = scored_slide
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["features"] = np.zeros((len(coords), 8), np.float32)
        f["coords"] = coords
        f.attrs["tile_size_level0"] = attrs["tile_size_level0"]
    rc = cli("mil", "heatmap", "--slide", svs, "--features", tmp_path / "bad.h5", "--ckpt", d / "model.pt",
             "--out", tmp_path / "x.png")
    assert rc == 2 and not (tmp_path / "x.png").exists()
    bag = read_bag_features(d / "f.h5")
    assert bag.tile_size_level0 == pytest.approx(attrs["tile_size_level0"])
