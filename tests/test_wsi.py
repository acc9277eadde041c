"""Whole-slide pipeline: slide reading, level choice by mpp, tissue tiling, batch robustness, extraction.

Real data: ``../shared/data/wsi/CMU-1-Small-Region.svs`` (2220 x 2967 at 0.499 um/px, one level). Pyramid
behaviour is checked on small pyramidal TIFFs written here with tifffile (levels at 0.25, 0.5, 1.0 mpp).
"""

from __future__ import annotations

import json

import h5py
import lightning  # noqa: F401  (imported once per session: engine.checkpoint needs it)
import monai  # noqa: F401
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from medcl.cli import main
from medcl.core.errors import MedclDataError
from medcl.io.slide import open_slide
from medcl.wsi.encoders import build_encoder
from medcl.wsi.extract import TileDataset
from medcl.wsi.tile_io import load_tile_set
from medcl.wsi.tiling import choose_level

CMU = "wsi/CMU-1-Small-Region.svs"
LEVEL_MPPS = (0.25, 0.5, 1.0)
# the synthetic slide: white glass with one stained rectangle, in level-0 pixels (x0, y0, x1, y1)
RECT = (300, 260, 1300, 900)
W0, H0 = 1600, 1200


def cli(*args) -> int:
    return main([str(a) for a in args])


def write_pyramid(path, subifds: bool = False, resolution: bool = True) -> None:
    """A 3-level tiled JPEG TIFF (1600 x 1200 at 0.25 um/px) with a pink 'tissue' rectangle."""
    base = np.full((H0, W0, 3), 242, np.uint8)
    x0, y0, x1, y1 = RECT
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    texture = 40 * np.sin(2 * np.pi * xx / 64) * np.cos(2 * np.pi * yy / 96)  # structure at every level
    noise = rng.normal(0, 8, (y1 - y0, x1 - x0, 3))
    base[y0:y1, x0:x1] = np.clip(np.array([175, 80, 160]) + texture[..., None] + noise, 0, 255)
    levels = [base] + [base.reshape(H0 // f, f, W0 // f, f, 3).mean(axis=(1, 3)).round().astype(np.uint8) for f in (2, 4)]
    with tifffile.TiffWriter(path) as tw:
        for i, (lv, mpp) in enumerate(zip(levels, LEVEL_MPPS)):
            kw = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if resolution else {}
            if subifds and i == 0:
                kw["subifds"] = 2
            tw.write(lv, tile=(128, 128), photometric="rgb", compression="jpeg", subfiletype=int(i > 0), **kw)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    d = tmp_path_factory.mktemp("pyr")
    write_pyramid(d / "pyr.tif")
    return d / "pyr.tif"


@pytest.fixture(scope="module")
def cmu_batch(shared_data, tmp_path_factory):
    """One batch: the real SVS, a corrupt 'slide', a slide without tissue -> tiles at 0.5 um/px."""
    d = tmp_path_factory.mktemp("batch")
    (d / "in").mkdir()
    (d / "in" / "corrupt.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 40)  # TIFF magic, then garbage
    blank = np.full((512, 512, 3), 240, np.uint8)
    tifffile.imwrite(d / "in" / "blank.tif", blank, tile=(128, 128), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    out = d / "tiles"
    rc = cli("mil", "tile", shared_data / CMU, d / "in", "--out", out, "--mpp", 0.5, "--size", 256,
             "--tissue-threshold", 0.25, "--thumbnail-size", 1024)
    assert rc == 0
    return out, shared_data / CMU


def reference_tissue_tiles(svs, coords_grid, tile0, threshold=0.25):
    """Independent estimate: a pixel is tissue when it is darker than the glass (grey < 215) or coloured
    (max - min > 25), on a plain OpenSlide thumbnail; a tile is kept when that fraction >= threshold."""
    openslide = pytest.importorskip("openslide", reason="the reference tissue estimate reads with OpenSlide (pip install -e '.[dev]')")

    s = openslide.OpenSlide(str(svs))
    th = np.asarray(s.get_thumbnail((740, 989)).convert("RGB")).astype(np.int32)
    fx, fy = th.shape[1] / s.dimensions[0], th.shape[0] / s.dimensions[1]
    tissue = (th.mean(-1) < 215) | (th.max(-1) - th.min(-1) > 25)
    keep = set()
    for x, y in coords_grid:
        win = tissue[int(y * fy) : int((y + tile0) * fy), int(x * fx) : int((x + tile0) * fx)]
        if win.size and win.mean() >= threshold:
            keep.add((int(x), int(y)))
    return keep, float(tissue.mean())


# --------------------------------------------------------------------------------------------- level choice


@pytest.mark.parametrize(
    "target, level, matched, read",
    [(0.5, 1, True, 256), (0.52, 1, True, 256), (1.0, 2, True, 256), (4.0, 2, False, 1024),
     (0.7, 1, False, 358), (0.3, 0, False, 307), (0.26, 0, True, 256), (0.1, 0, False, 102)],
)
def test_choose_level_by_mpp(target, level, matched, read):
    c = choose_level(LEVEL_MPPS, target, 256, tolerance=0.1)
    assert (c.level, c.matched, c.read_size) == (level, matched, read)
    # the tile covers size * target microns whatever the level
    assert c.read_size * c.level_mpp == pytest.approx(256 * (c.level_mpp if matched else target), rel=0.01)


@pytest.mark.parametrize("subifds", [False, True])
def test_pyramidal_tiff_level_chosen_by_mpp(tmp_path, subifds):
    path = tmp_path / "pyr.tif"
    write_pyramid(path, subifds=subifds)
    with open_slide(path) as s:
        assert s.level_count == 3 and s.mpp == pytest.approx((0.25, 0.25))
        assert [m[0] for m in map(s.level_mpp, range(3))] == pytest.approx(LEVEL_MPPS)
    for mpp, level, read in [(0.5, 1, 128), (1.0, 2, 128), (0.7, 1, 179)]:
        out = tmp_path / f"t{mpp}"
        assert cli("mil", "tile", path, "--out", out, "--mpp", mpp, "--size", 128, "--thumbnail-size", 512) == 0
        with h5py.File(out / "pyr.h5") as f:
            a = dict(f.attrs)
            coords = f["coords"][()]
        assert (a["level"], a["read_size"], bool(a["resampled"])) == (level, read, mpp == 0.7)
        # tile side at level 0 in microns == size at the target mpp
        assert a["tile_size_level0"] * 0.25 == pytest.approx(128 * mpp, rel=0.01)
        # known answer: tiles mostly inside the rectangle are kept, tiles mostly outside are not
        t0 = a["tile_size_level0"]
        x0, y0, x1, y1 = RECT
        ox = np.clip(np.minimum(coords[:, 0] + t0, x1) - np.maximum(coords[:, 0], x0), 0, None)
        oy = np.clip(np.minimum(coords[:, 1] + t0, y1) - np.maximum(coords[:, 1], y0), 0, None)
        assert (ox * oy / t0**2 >= 0.15).all()
        step = a["step_level0"]
        grid = [(i * step, j * step) for j in range(int((H0 - t0) // step) + 1) for i in range(int((W0 - t0) // step) + 1)]
        inside = [(x, y) for x, y in grid
                  if max(0, min(x + t0, x1) - max(x, x0)) * max(0, min(y + t0, y1) - max(y, y0)) / t0**2 >= 0.35]
        kept = {tuple(c) for c in np.floor(coords).astype(int)}
        assert {(int(np.floor(x + 1e-9)), int(np.floor(y + 1e-9))) for x, y in inside} <= kept


def test_tiles_read_at_recorded_level_match_level0_pixels(pyramid, tmp_path):
    """A tile read at level 2 (1.0 um/px) equals the 4x box-downsampled level-0 pixels of its footprint."""
    assert cli("mil", "tile", pyramid, "--out", tmp_path, "--mpp", 1.0, "--size", 64, "--thumbnail-size", 512) == 0
    ts = load_tile_set(tmp_path / "pyr.h5")
    ds = TileDataset([ts])
    i = len(ds) // 2
    tile = ds.read(i).astype(np.float32)
    x, y = ts.coords[i]
    with open_slide(pyramid) as s:
        full = s.read_region((x, y), 0, (256, 256)).astype(np.float32)
    ref = full.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    assert tile.shape == (64, 64, 3)
    err = np.abs(tile - ref).mean()
    shifted = np.abs(tile[:, 1:] - ref[:, :-1]).mean()  # one level-2 pixel off
    assert err < 3.0 and shifted > 2 * err + 3.0


# --------------------------------------------------------------------------------------------- real slide


def test_real_svs_tiling_honours_mpp_and_tissue(cmu_batch):
    out, svs = cmu_batch
    with h5py.File(out / "CMU-1-Small-Region.h5") as f:
        a = dict(f.attrs)
        coords = f["coords"][()]
        assert f["coords"].attrs["patch_level"] == 0 and f["coords"].attrs["patch_size"] == 256
    assert a["mpp_level0"] == pytest.approx([0.499, 0.499])
    assert a["tile_size_level0"] * a["mpp_level0"][0] == pytest.approx(256 * 0.5, rel=0.01)
    t0, step = a["tile_size_level0"], a["step_level0"]
    assert ((coords % step) == 0).all() and (coords >= 0).all()
    assert (coords + t0 <= np.array([2220, 2967])).all()
    n_grid = int((2220 - t0) // step + 1) * int((2967 - t0) // step + 1)
    grid = [(i * int(step), j * int(step)) for j in range(int((2967 - t0) // step + 1))
            for i in range(int((2220 - t0) // step + 1))]
    ref, tissue_frac = reference_tissue_tiles(svs, grid, t0)
    kept = {tuple(map(int, c)) for c in coords}
    assert 0.15 < tissue_frac < 0.6
    # a threshold keeping everything or nothing fails these bounds
    assert 0.75 * len(ref) <= len(kept) <= 1.25 * len(ref) < n_grid
    assert len(kept & ref) / len(kept | ref) > 0.7
    assert (out / "CMU-1-Small-Region_tiles.png").is_file()
    png = np.asarray(Image.open(out / "CMU-1-Small-Region_tiles.png"))
    assert max(png.shape[:2]) == 1024


def test_batch_reports_corrupt_and_empty_slides(cmu_batch):
    out, _ = cmu_batch
    summary = json.loads((out / "summary.json").read_text())
    status = {r["slide_id"]: r for r in summary["slides"]}
    assert status["CMU-1-Small-Region"]["status"] == "done" and status["CMU-1-Small-Region"]["n_tiles"] > 0
    assert status["corrupt"]["status"] == "failed" and "cannot open slide" in status["corrupt"]["message"]
    assert status["blank"]["status"] == "no_tissue"
    assert not (out / "corrupt.h5").exists() and not (out / "blank.h5").exists()
    csv_text = (out / "summary.csv").read_text()
    assert "corrupt" in csv_text and "failed" in csv_text
    assert summary["counts"]["failed"] == 1 and summary["counts"]["done"] == 1


def test_resume_skips_done_slides_and_force_redoes(cmu_batch, tmp_path):
    out, svs = cmu_batch
    h5 = out / "CMU-1-Small-Region.h5"
    before = h5.stat().st_mtime_ns
    assert cli("mil", "tile", svs, "--out", out, "--thumbnail-size", 1024) == 0
    row = json.loads((out / "summary.json").read_text())["slides"][0]
    assert row["status"] == "skipped" and h5.stat().st_mtime_ns == before


def test_missing_mpp_needs_assume_mpp(tmp_path):
    path = tmp_path / "nompp.tif"
    write_pyramid(path, resolution=False)
    assert cli("mil", "tile", path, "--out", tmp_path / "a", "--thumbnail-size", 256) == 1
    row = json.loads((tmp_path / "a" / "summary.json").read_text())["slides"][0]
    assert row["status"] == "failed" and "assume-mpp" in row["message"]
    assert cli("mil", "tile", path, "--out", tmp_path / "b", "--assume-mpp", 0.25, "--size", 128,
               "--thumbnail-size", 256) == 0
    with h5py.File(tmp_path / "b" / "nompp.h5") as f:
        assert f.attrs["mpp_source"] == "assumed" and f.attrs["level"] == 1


def test_corrupt_slide_error_names_file(tmp_path):
    bad = tmp_path / "bad.ndpi"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(MedclDataError, match="bad.ndpi"):
        open_slide(bad)


def test_backends_agree_on_svs_pixels(shared_data):
    pytest.importorskip("openslide", reason="comparing backends needs openslide-python + openslide-bin")
    with open_slide(shared_data / CMU, backend="openslide") as a, open_slide(shared_data / CMU, backend="tiffslide") as b:
        assert a.dimensions == b.dimensions == (2220, 2967) and a.mpp == pytest.approx(b.mpp)
        ra = a.read_region((700, 1200), 0, (128, 96)).astype(np.float32)
        rb = b.read_region((700, 1200), 0, (128, 96)).astype(np.float32)
    assert ra.shape == (96, 128, 3) and np.abs(ra - rb).mean() < 2.0


# --------------------------------------------------------------------------------------------- extraction


def test_extract_one_feature_row_per_tile(shared_data, tmp_path):
    """Resampled tiles (1.0 um/px from a 0.499 um/px slide), read by a worker process; each feature row
    equals the encoder applied to the tile read independently with OpenSlide at the row's coordinates."""
    openslide = pytest.importorskip("openslide", reason="the independent tile read uses OpenSlide (pip install -e '.[dev]')")

    tiles = tmp_path / "tiles"
    assert cli("mil", "tile", shared_data / CMU, "--out", tiles, "--mpp", 1.0, "--size", 128,
               "--thumbnail-size", 512) == 0
    feats = tmp_path / "feats"
    assert cli("mil", "extract", tiles, "--encoder", "builtin-cnn", "--out", feats, "--batch-size", 8,
               "--workers", 1, "--device", "cpu") == 0
    with h5py.File(tiles / "CMU-1-Small-Region.h5") as f:
        tcoords = f["coords"][()]
        assert f.attrs["read_size"] == 257 and f.attrs["resampled"]
    with h5py.File(feats / "CMU-1-Small-Region.h5") as f:
        x, coords = f["features"][()], f["coords"][()]
        assert f.attrs["encoder"] == "builtin-cnn" and f.attrs["complete"]
    assert x.dtype == np.float32 and x.shape == (len(tcoords), 256) and np.isfinite(x).all()
    np.testing.assert_array_equal(coords, tcoords)
    enc = build_encoder("builtin-cnn")
    s = openslide.OpenSlide(str(shared_data / CMU))
    idx = [0, len(coords) // 2, len(coords) - 1]
    ref_tiles = [
        np.asarray(s.read_region(tuple(map(int, coords[i])), 0, (257, 257)).convert("RGB").resize(
            (128, 128), Image.Resampling.BILINEAR)) for i in idx
    ]
    with torch.no_grad():
        ref = enc(torch.from_numpy(np.stack(ref_tiles)).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(x[idx], ref, rtol=1e-4, atol=1e-4)
    assert len({r.tobytes() for r in x}) == len(x)  # different tiles, different features
    # resume: nothing recomputed
    before = (feats / "CMU-1-Small-Region.h5").stat().st_mtime_ns
    assert cli("mil", "extract", tiles, "--encoder", "builtin-cnn", "--out", feats, "--workers", 0) == 0
    assert (feats / "CMU-1-Small-Region.h5").stat().st_mtime_ns == before


def test_unknown_encoder_and_missing_optional_package_are_clear(tmp_path):
    from medcl.core.errors import MedclConfigError

    with pytest.raises(MedclConfigError, match="builtin-cnn"):
        build_encoder("resnet-that-does-not-exist")
    with pytest.raises(MedclConfigError, match="ARCH:WEIGHTS"):
        build_encoder("timm:vit_small_patch16_224")


def test_tile_tissue_fraction_matches_loop():
    from medcl.wsi.tissue import tile_tissue_fraction

    rng = np.random.default_rng(0)
    mask = rng.random((50, 70)) > 0.6
    coords = rng.integers(0, 600, (40, 2))
    scale = (0.1, 0.08)
    got = tile_tissue_fraction(mask, coords, 97.0, scale)
    for (x, y), g in zip(coords, got):
        c0, r0 = min(round(x * 0.1), 69), min(round(y * 0.08), 49)
        c1 = min(max(round((x + 97) * 0.1), c0 + 1), 70)
        r1 = min(max(round((y + 97) * 0.08), r0 + 1), 50)
        assert g == pytest.approx(mask[r0:r1, c0:c1].mean(), abs=1e-6)
