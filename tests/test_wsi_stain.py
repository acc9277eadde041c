"""Macenko stain normalisation: known stain matrices recovered, the real slide mapped onto the reference, and the
``--stain macenko`` option of extraction and patch-encoder pretraining."""

from __future__ import annotations

import json

import h5py
import lightning  # noqa: F401  (imported once per session: engine.checkpoint needs it)
import numpy as np
import pytest
import torch
from _slides import CMU, H_OD, stained_image, synthetic_slides, write_slide
from monai.apps.pathology.transforms.stain.array import ExtractHEStains
from skimage.color import rgb_from_hed

from medcl.cli import main
from medcl.core.errors import MedclDataError
from medcl.wsi.encoders import build_encoder
from medcl.wsi.extract import TileDataset
from medcl.wsi.stain import HE_REF, MAX_C_REF, fit_macenko, fit_tiles, normalize_macenko, rgb_to_od
from medcl.wsi.tile_io import load_tile_set


def cli(*args) -> int:
    return main([str(a) for a in args])


def angle(a: np.ndarray, b: np.ndarray) -> float:
    """Degrees between two vectors."""
    c = float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def same_columns_any_order(a: np.ndarray, b: np.ndarray) -> float:
    """Largest column angle between ``a`` and ``b`` after matching columns (MONAI orders H and E the other way)."""
    straight = max(angle(a[:, 0], b[:, 0]), angle(a[:, 1], b[:, 1]))
    swapped = max(angle(a[:, 0], b[:, 1]), angle(a[:, 1], b[:, 0]))
    return min(straight, swapped)


# ----------------------------------------------------------------------------------------- known stain matrices


# Pure-stain pixels must clear the OD threshold (0.15) in every channel to mark the extreme angles: real eosin
# absorbs some red and blue (the reference's E column: 0.22 red, 0.56 blue), Ruifrok's E (0.07, 0.11) hardly any,
# so with it no pure-eosin pixel of these concentrations would count and the fit would find the most eosin-like
# mixture instead (the method's known limit, not tested here).
@pytest.mark.parametrize("stains", [
    HE_REF / np.linalg.norm(HE_REF, axis=0),  # Veta's reference H&E
    np.stack([H_OD, unit([0.27, 0.80, 0.53])], axis=1),  # Ruifrok's H with a bluer eosin
])
def test_macenko_recovers_a_known_stain_matrix(stains):
    """Pixels mixed from known stain vectors and concentrations through Beer-Lambert, stored as uint8: the fit
    returns the stain vectors (H first) within half a degree (0.14-0.19 measured; exact on the float image), the
    99th-percentile concentrations, and the same matrix as MONAI's ExtractHEStains up to the column order."""
    rgb, conc = stained_image(160, 160, seed=3, stains=stains, c_max=(1.8, 1.6))
    rgb = rgb.round().astype(np.uint8)
    fit = fit_macenko(rgb)
    assert angle(fit.stain_matrix[:, 0], stains[:, 0]) < 0.5
    assert angle(fit.stain_matrix[:, 1], stains[:, 1]) < 0.5
    np.testing.assert_allclose(np.linalg.norm(fit.stain_matrix, axis=0), 1.0, atol=1e-9)
    np.testing.assert_allclose(fit.max_conc, np.percentile(conc.reshape(2, -1), 99, axis=1), rtol=0.01)
    monai_he = ExtractHEStains()(rgb)
    assert same_columns_any_order(fit.stain_matrix, monai_he) < 0.5
    # the order is decided by the red optical density, not by how the image was made
    swapped, _ = stained_image(160, 160, seed=3, stains=stains[:, ::-1], c_max=(1.6, 1.8))
    np.testing.assert_allclose(fit_macenko(swapped.round().astype(np.uint8)).stain_matrix, fit.stain_matrix, atol=1e-2)


def test_normalisation_matches_a_per_pixel_least_squares_reference():
    """The batched torch normalisation equals, pixel by pixel, ``Io exp(-HE_ref C maxC_ref / maxC) - 1`` with C the
    least-squares concentrations; per-tile matrices equal separate calls; the reference image maps to itself."""
    rng = np.random.default_rng(0)
    tiles = rng.integers(40, 250, (3, 3, 6, 5)).astype(np.uint8)
    # tile 1 is made of the reference stains at the reference maxima: normalising it changes nothing
    c_ref = rng.uniform(0, 1, (2, 6, 5)) * MAX_C_REF[:, None, None]
    tiles[1] = np.clip(240 * np.exp(-np.einsum("ck,khw->chw", HE_REF, c_ref)) - 1, 0, 255).round()
    he = np.stack([unit([0.7, 0.64, 0.32]), unit([0.18, 0.93, 0.33])], axis=1)
    mc = np.array([2.4, 1.7])
    out = normalize_macenko(torch.from_numpy(tiles), he, mc).numpy()
    for b in range(3):
        for i in range(6):
            for j in range(5):
                od = rgb_to_od(tiles[b, :, i, j])
                c, *_ = np.linalg.lstsq(he, od, rcond=None)
                ref = np.clip(240 * np.exp(-HE_REF @ (c * MAX_C_REF / mc)) - 1, 0, 255) / 255
                np.testing.assert_allclose(out[b, :, i, j], ref, atol=2e-5)
    hes = np.stack([he, HE_REF, he])
    mcs = np.stack([mc, MAX_C_REF, mc * 1.5])
    per = normalize_macenko(torch.from_numpy(tiles), torch.from_numpy(hes), torch.from_numpy(mcs)).numpy()
    for b in range(3):
        np.testing.assert_allclose(per[b], normalize_macenko(torch.from_numpy(tiles[b : b + 1]), hes[b], mcs[b])[0],
                                   atol=1e-6)
    np.testing.assert_allclose(per[1] * 255, tiles[1], atol=1.0)  # up to the uint8 rounding of the input


def test_glass_has_no_stain_matrix():
    with pytest.raises(MedclDataError, match="stained pixels"):
        fit_macenko(np.full((32, 32, 3), 238, np.uint8))


# ----------------------------------------------------------------------------------------- the real slide


@pytest.fixture(scope="module")
def cmu_tiles(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("stain")
    assert cli("mil", "tile", shared_data / CMU, "--out", d, "--mpp", 1.0, "--size", 128, "--thumbnail-size",
               512) == 0
    return load_tile_set(d / "CMU-1-Small-Region.h5")


def test_real_slide_stain_matrix_is_h_and_e_and_normalises_to_the_reference(cmu_tiles):
    """From the tissue tiles of the real H&E slide: a valid H&E matrix (unit, positive optical densities,
    hematoxylin first: closest to Ruifrok's H), equal to MONAI's up to the column order; after normalisation the
    re-estimated matrix is the reference's (cosine > 0.99 per column, while the slide's own is not) and so are
    the maximum concentrations."""
    ds = TileDataset([cmu_tiles])
    idx = np.unique(np.linspace(0, len(ds) - 1, min(64, len(ds))).round().astype(int))
    tiles = np.stack([ds.read(int(i)) for i in idx])  # [K, S, S, 3]
    fit = fit_tiles(ds.read, len(ds), 64)
    ds.close()
    he = fit.stain_matrix
    np.testing.assert_allclose(np.linalg.norm(he, axis=0), 1.0, atol=1e-9)
    assert (he > 0).all()
    ruifrok_h, ruifrok_e = unit(rgb_from_hed[0]), unit(rgb_from_hed[1])
    assert angle(he[:, 0], ruifrok_h) < angle(he[:, 0], ruifrok_e)
    assert angle(he[:, 1], ruifrok_e) < angle(he[:, 1], ruifrok_h)
    assert same_columns_any_order(he, ExtractHEStains()(tiles.reshape(-1, 3))) < 1.0

    ref = HE_REF / np.linalg.norm(HE_REF, axis=0)
    cos = lambda a, b: (a * b).sum(axis=0)  # noqa: E731  (unit columns)
    assert cos(he, ref).min() < 0.99  # the slide is not already in the reference's colours
    norm = normalize_macenko(torch.from_numpy(tiles).permute(0, 3, 1, 2), he, fit.max_conc)
    norm_u8 = (norm * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    refit = fit_macenko(norm_u8)
    assert cos(refit.stain_matrix, ref).min() > 0.99
    np.testing.assert_allclose(refit.max_conc, MAX_C_REF, rtol=0.1)


# ----------------------------------------------------------------------------------------- extraction, pretraining


@pytest.fixture(scope="module")
def syn_tiles(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    synthetic_slides(d / "slides", 1, size=384)
    assert cli("mil", "tile", d / "slides", "--out", d / "tiles", "--mpp", 0.5, "--size", 64, "--thumbnail-size",
               256) == 0
    return d


def _extract(d, out, *extra):
    rc = cli("mil", "extract", d / "tiles", "--encoder", "builtin-cnn", "--out", out, "--workers", 0,
             "--batch-size", 16, "--device", "cpu", *extra)
    assert rc == 0
    with h5py.File(out / "syn_0.h5") as f:
        return f["features"][()], dict(f.attrs)


def test_extract_with_macenko_is_deterministic_and_changes_the_features(syn_tiles):
    d = syn_tiles
    plain, a0 = _extract(d, d / "f_none")
    stained, a1 = _extract(d, d / "f_mac", "--stain", "macenko", "--stain-fit-tiles", 8)
    again, _ = _extract(d, d / "f_mac2", "--stain", "macenko", "--stain-fit-tiles", 8)
    assert a0["stain"] == "none" and a1["stain"] == "macenko"
    assert a1["stain_matrix"].shape == (3, 2) and a1["stain_max_conc"].shape == (2,)
    np.testing.assert_allclose(a1["stain_matrix_reference"], HE_REF)
    np.testing.assert_array_equal(stained, again)  # same slide, same fit, same features
    assert np.abs(stained - plain).mean() > 1e-3 * np.abs(plain).mean()
    # each row is the encoder applied to the normalised tile (the recorded fit)
    ts = load_tile_set(d / "tiles" / "syn_0.h5")
    ds = TileDataset([ts])
    tile = torch.from_numpy(ds.read(0).transpose(2, 0, 1).copy())[None]
    ds.close()
    enc = build_encoder("builtin-cnn")
    with torch.no_grad():
        ref = enc(normalize_macenko(tile, a1["stain_matrix"], a1["stain_max_conc"])).numpy()
    np.testing.assert_allclose(stained[0], ref[0], rtol=1e-4, atol=1e-5)
    summary = json.loads((d / "f_mac" / "summary.json").read_text())
    assert summary["counts"]["done"] == 1
    # a rerun with another stain setting in the same folder recomputes instead of resuming
    _, a2 = _extract(d, d / "f_mac", "--stain", "none")
    assert a2["stain"] == "none"


def test_pretrain_encoder_with_macenko(syn_tiles, tmp_path):
    out = tmp_path / "enc"
    assert cli("mil", "pretrain-encoder", syn_tiles / "tiles", "--out", out, "--steps", 2, "--batch-size", 4,
               "--crop", 32, "--width", 8, "--workers", 0, "--log-every", 1, "--stain", "macenko",
               "--stain-fit-tiles", 4) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["config"]["stain"] == "macenko" and record["complete"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])


def test_pretraining_normalises_each_tile_with_its_own_slides_fit(tmp_path, monkeypatch):
    """Two slides stained with different stain vectors: every tile that reaches the views is the tile normalised
    with its own slide's Macenko fit (not the other slide's, which would give another image)."""
    from medcl.wsi import pretrain_encoder as pe

    stains = [HE_REF / np.linalg.norm(HE_REF, axis=0), None]  # Veta's reference, Ruifrok's H and E
    for i, st in enumerate(stains):
        img = np.full((256, 256, 3), 242, np.uint8)
        block, _ = stained_image(192, 192, seed=i, stains=st, glass=0.0)
        img[32:224, 32:224] = block.round().astype(np.uint8)
        write_slide(tmp_path / f"s{i}.tif", img, 1.0)  # the block well above the tiler's smallest tissue area
    assert cli("mil", "tile", tmp_path / "s0.tif", tmp_path / "s1.tif", "--out", tmp_path / "t", "--mpp", 1.0,
               "--size", 64, "--thumbnail-size", 256) == 0
    seen: list[torch.Tensor] = []
    real_views = pe.random_views
    monkeypatch.setattr(pe, "random_views", lambda x, *a, **k: (seen.append(x.clone()), real_views(x, *a, **k))[1])
    assert cli("mil", "pretrain-encoder", tmp_path / "t", "--out", tmp_path / "enc", "--steps", 3, "--batch-size",
               4, "--crop", 32, "--width", 8, "--workers", 0, "--stain", "macenko", "--stain-fit-tiles", 4) == 0

    own, other = {}, {}
    sets = [load_tile_set(tmp_path / "t" / f"s{i}.h5") for i in range(2)]
    dss = [TileDataset([ts]) for ts in sets]
    fits = [fit_tiles(ds.read, len(ds), 4) for ds in dss]
    assert same_columns_any_order(fits[0].stain_matrix, fits[1].stain_matrix) > 5.0  # the slides differ
    for k, ds in enumerate(dss):
        for j in range(len(ds)):
            tile = torch.from_numpy(ds.read(j).transpose(2, 0, 1).copy())[None]
            own[k, j] = normalize_macenko(tile, fits[k].stain_matrix, fits[k].max_conc)[0]
            other[k, j] = normalize_macenko(tile, fits[1 - k].stain_matrix, fits[1 - k].max_conc)[0]
        ds.close()
    batches = torch.cat(seen[::2])  # each step draws two views of the same batch
    assert len(batches) == 12
    slides_seen = set()
    for x in batches:
        match = [key for key, ref in own.items() if torch.allclose(x, ref, atol=1e-5)]
        assert match, "a tile was not normalised with its own slide's fit"
        assert not any(torch.allclose(x, other[key], atol=1e-3) for key in match)
        slides_seen |= {k for k, _ in match}
    assert slides_seen == {0, 1}


def test_blank_slide_fails_the_stain_fit_with_a_clear_message(tmp_path):
    """A slide whose tiles hold no stain: its extraction fails with the reason, the others' would go on."""
    img = np.full((256, 256, 3), 236, np.uint8)
    img[32:224, 32:224] = [225, 200, 220]  # tinted (tissue to the tiler), too pale for the OD threshold
    write_slide(tmp_path / "pale.tif", img, 0.5)
    assert cli("mil", "tile", tmp_path / "pale.tif", "--out", tmp_path / "t", "--mpp", 0.5, "--size", 64,
               "--thumbnail-size", 256) == 0
    rc = cli("mil", "extract", tmp_path / "t", "--encoder", "builtin-cnn", "--out", tmp_path / "f", "--workers", 0,
             "--device", "cpu", "--stain", "macenko")
    assert rc == 1
    row = json.loads((tmp_path / "f" / "summary.json").read_text())["slides"][0]
    assert row["status"] == "failed" and "stained pixels" in row["message"]
