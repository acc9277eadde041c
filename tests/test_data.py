"""medcl.data: manifests of every kind, the preprocessing plan and its invertible MONAI pipeline, the
cache, and the synthetic phantoms (against their known anatomy)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import monai  # noqa: F401  (imported once per session)
import nibabel as nib
import numpy as np
import pytest
import torch
from _geometry import oblique_affine
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import medcl.io
from medcl.config import load_config
from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.core.geometry import Volume, orientation_from_affine, spacing_from_affine
from medcl.data import (
    PHANTOM_LABELS,
    CaseDataset,
    PreprocessingPlan,
    default_affine,
    invert_to_original,
    load_case,
    load_manifest,
    make_phantom,
    write_phantom_dataset,
)
from medcl.data.phantoms import phantom_world_coordinates
from medcl.io import write_nifti

REPO = Path(__file__).resolve().parents[1]

# An LPS, anisotropic, non-cubic grid with the phantom inside it (origin = the RAS corner of voxel 0).
LPS_AFFINE = np.array([[-4.0, 0, 0, 90.0], [0, -5.0, 0, 95.0], [0, 0, 8.0, -84.0], [0, 0, 0, 1]])
LPS_SHAPE = (44, 38, 22)


def _world_centroid(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    ijk = np.argwhere(label == value).astype(np.float64)
    return (ijk @ affine[:3, :3].T + affine[:3, 3]).mean(axis=0)


# ------------------------------------------------------------------------------------------- phantoms


def test_phantom_is_deterministic_and_seeds_differ(tmp_path):
    a_img, a_lab = make_phantom(7, (24, 20, 28))
    b_img, b_lab = make_phantom(7, (24, 20, 28))
    assert a_img.array.tobytes() == b_img.array.tobytes() and a_lab.array.tobytes() == b_lab.array.tobytes()
    c_img, c_lab = make_phantom(8, (24, 20, 28))
    assert not np.array_equal(a_lab.array, c_lab.array)
    # whole datasets: identical bytes for the same seed
    d1 = write_phantom_dataset(tmp_path / "a", n=2, size=16, seed=3)
    d2 = write_phantom_dataset(tmp_path / "b", n=2, size=16, seed=3)
    files = sorted(p.relative_to(d1) for p in d1.rglob("*") if p.is_file())
    assert len(files) == 5
    for f in files:
        assert (d1 / f).read_bytes() == (d2 / f).read_bytes(), f


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_phantom_organs_have_their_designed_intensities(modality):
    img, lab = make_phantom(11, (48, 48, 48), modality=modality)
    x, y = img.array[0], lab.array[0]
    assert img.array.dtype == np.float32 and y.dtype == np.uint8 and img.shape == (48, 48, 48)
    assert set(np.unique(y)) == set(PHANTOM_LABELS)
    # body tissue: labelled background but above the air level (Otsu-free: a fixed, design-based split)
    body = (y == 0) & (x > (200.0 if modality == "mri" else -500.0))
    means = {k: float(x[y == k].mean()) for k in (1, 2, 3)}
    means["body"] = float(np.median(x[body]))
    if modality == "mri":  # T1-like: liver > body > kidneys > bladder (fluid)
        assert means[1] > means["body"] + 60 > means[2] + 60 > means[3] + 60
    else:  # CT: kidneys > liver > body > bladder, in HU
        assert means[2] > means[1] + 20 > means["body"] + 40 > means[3] + 60
        assert -1050 < float(x[~body & (y == 0)].min()) and float(x[y == 0].min()) < -900  # air


def test_phantom_anatomy_is_defined_in_world_mm():
    seed = 5
    # the same grid stored LPS (axes i, j reversed): the labels are the exactly flipped array
    shape = (40, 36, 44)
    ras = default_affine(shape)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = ras.copy()
    lps[:3, :3] = ras[:3, :3] @ flip[:3, :3]
    lps[:3, 3] = ras[:3, :3] @ [shape[0] - 1, shape[1] - 1, 0] + ras[:3, 3]
    _, l_ras = make_phantom(seed, shape, ras)
    _, l_lps = make_phantom(seed, shape, lps)
    assert np.array_equal(l_lps.array[0], l_ras.array[0][::-1, ::-1, :])
    assert orientation_from_affine(lps) == "LPS"
    # an oblique anisotropic grid: organs keep their superior-inferior order and their volume in mm^3
    obl_shape = (46, 52, 36)
    obl = oblique_affine(obl_shape)
    _, l_obl = make_phantom(seed, obl_shape, obl)
    vox_ras, vox_obl = np.prod(spacing_from_affine(ras)), abs(np.linalg.det(obl[:3, :3]))
    for lab, aff in ((l_ras.array[0], ras), (l_obl.array[0], obl)):
        z = [_world_centroid(lab, aff, k)[2] for k in (1, 2, 3)]
        assert z[0] > z[1] + 15 > z[2] + 30, z  # liver above kidneys above bladder (world S)
    for k in (1, 2, 3):
        v1 = (l_ras.array == k).sum() * vox_ras
        v2 = (l_obl.array == k).sum() * vox_obl
        assert abs(v1 - v2) / v1 < 0.12, (k, v1, v2)
        c1, c2 = _world_centroid(l_ras.array[0], ras, k), _world_centroid(l_obl.array[0], obl, k)
        assert np.linalg.norm(c1 - c2) < 2.0, (k, c1, c2)
    # the kidneys are a left/right pair: their world x centroids sit on both sides of the midline
    ijk = np.argwhere(l_obl.array[0] == 2).astype(np.float64)
    wx = (ijk @ obl[:3, :3].T + obl[:3, 3])[:, 0]
    assert (wx > 10).sum() > 20 and (wx < -10).sum() > 20


def test_phantom_layout_is_consistent_across_subjects_with_variation():
    aff = default_affine((32, 32, 32))
    world = phantom_world_coordinates((32, 32, 32), aff)
    assert np.allclose(world[0, 0, 0], aff[:3, 3]) and np.allclose(world[31, 0, 0], aff[:3, :3] @ [31, 0, 0] + aff[:3, 3])
    cents, vols = [], []
    for s in range(6):
        _, lab = make_phantom(s, (32, 32, 32), aff)
        cents.append([_world_centroid(lab.array[0], aff, k) for k in (1, 2, 3)])
        vols.append([(lab.array == k).sum() for k in (1, 2, 3)])
    cents, vols = np.array(cents), np.array(vols)
    assert (cents[:, 0, 2] > cents[:, 1, 2]).all() and (cents[:, 1, 2] > cents[:, 2, 2]).all()
    spread = cents.std(axis=0)  # per-subject jitter: present, but small next to the organ spacing
    assert (spread > 0.3).all() and (spread < 8).all()
    assert (vols.std(axis=0) > 0).all()


# --------------------------------------------------------------------------------------------- plan


def test_plan_round_trip_yaml_and_errors(tmp_path):
    plan = PreprocessingPlan(spacing=(1.0, 2.0, 3.0), intensity=[{"scheme": "ct", "window": (-100, 200)}],
                             crop_foreground=True, labels={0: "bg", 1: "organ"}, channel_names=["CT"])
    d = plan.to_dict()
    assert json.loads(json.dumps(d))["spacing"] == [1.0, 2.0, 3.0]  # plain JSON types only: no default= needed
    assert PreprocessingPlan.from_dict(d) == plan
    assert PreprocessingPlan.from_dict(json.loads(json.dumps(d))) == plan  # int label keys came back as str
    assert plan.cache_key() == PreprocessingPlan.from_dict(d).cache_key()
    assert plan.cache_key() != PreprocessingPlan.from_dict({**d, "spacing": [1.0, 2.0, 2.0]}).cache_key()
    for name in ("mri.yaml", "ct.yaml", "phantoms.yaml"):
        p = load_config(PreprocessingPlan, REPO / "configs" / "data" / name)
        assert PreprocessingPlan.from_dict(p.to_dict()) == p
    with pytest.raises(MedclConfigError, match="orientation"):
        PreprocessingPlan(orientation="RAX")
    with pytest.raises(MedclConfigError, match="spacing"):
        PreprocessingPlan.from_dict({"spacing": [1, 0, 1]})
    with pytest.raises(MedclConfigError, match="crop_margins"):
        PreprocessingPlan.from_dict({"crop_margins": 3})
    with pytest.raises(MedclConfigError, match="percentiles"):
        PreprocessingPlan.from_dict({"intensity": [{"scheme": "mri", "percentiles": [99, 1]}]})
    with pytest.raises(MedclConfigError, match="intensity"):
        PreprocessingPlan(channel_names=["a", "b", "c"], intensity=[{"scheme": "mri"}] * 2)


def _lps_phantom(modality="ct", seed=2):
    return make_phantom(seed, LPS_SHAPE, LPS_AFFINE, modality=modality)


def test_pipeline_gives_requested_geometry_and_intensities():
    img, lab = _lps_phantom("ct")
    assert img.orientation == "LPS"
    plan = PreprocessingPlan(spacing=(2.0, 2.5, 4.0), intensity=[{"scheme": "ct"}], foreground="threshold",
                             foreground_threshold=-500.0, channel_names=["CT"])
    out = plan.transforms()({"image": img, "label": lab})
    a = out["image"].affine.numpy()
    assert orientation_from_affine(a) == "RAS"
    assert np.allclose(spacing_from_affine(a), (2.0, 2.5, 4.0))
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.int64
    # MONAI keeps the extent of the voxel centres: (n - 1) * old / new + 1 voxels per axis
    assert tuple(out["image"].shape[1:]) == (87, 75, 43) and out["label"].shape == out["image"].shape
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    # the window maps air to 0 and soft tissue (45 HU) to (45 + 175) / 425
    assert float(out["image"][0][out["label"][0] == 0].min()) == 0.0
    # organs keep their world position through reorientation and resampling (to the tie-breaking of
    # nearest-neighbour upsampling: under one new voxel; the kidneys are a pair, so their joint centroid
    # would move with any volume imbalance between the two and is left out)
    for k in (1, 3):
        c0 = _world_centroid(lab.array[0], LPS_AFFINE, k)
        c1 = _world_centroid(out["label"][0].numpy(), a, k)
        assert np.all(np.abs(c0 - c1) < (2.0, 2.5, 4.0)), (k, c0, c1)
    # fg_box: the body's box, inside the volume
    box = out["fg_box"]
    assert box.dtype == torch.long and box.shape == (2, 3)
    body = (out["image"][0] > 0.2).nonzero()
    assert (box[0] <= body.min(0).values).all() and (box[1] >= body.max(0).values + 1).all()
    assert (box[1] - box[0] < torch.tensor(out["image"].shape[1:])).any()  # air around the body excluded


def test_mri_zscore_inside_foreground():
    img, lab = _lps_phantom("mri")
    plan = PreprocessingPlan(intensity=[{"scheme": "mri"}], foreground="otsu")
    out = plan.transforms(("image",))({"image": img})
    x = out["image"][0]
    b = out["fg_box"]
    fg = x[b[0, 0]:b[1, 0], b[0, 1]:b[1, 1], b[0, 2]:b[1, 2]]
    # recompute the reference by hand: Otsu mask of the reoriented raw image, percentile clip, z-score
    from skimage.filters import threshold_otsu

    raw = np.flip(img.array[0], axis=(0, 1))  # LPS -> RAS
    lo, hi = np.percentile(raw[raw != 0], (0.5, 99.5))
    clipped = np.clip(raw, lo, hi)
    mask = raw > threshold_otsu(raw)
    ref = (clipped - clipped[mask].mean()) / clipped[mask].std()
    assert np.allclose(x.numpy(), ref, atol=1e-4)
    assert abs(float(x.numpy()[mask].mean())) < 1e-4 and abs(float(x.numpy()[mask].std()) - 1) < 1e-4
    assert fg.numel() < x.numel()


def test_invert_to_original_is_voxel_exact_with_crop():
    img, lab = _lps_phantom("ct")
    plan = PreprocessingPlan(spacing=(2.0, 2.5, 4.0), intensity=[{"scheme": "ct"}], crop_foreground=True,
                             crop_margin=1, foreground="threshold", foreground_threshold=-500.0)
    out = plan.transforms()({"image": img, "label": lab})
    assert out["image"].shape[1] < 2 * LPS_SHAPE[0]  # the crop did cut something
    back = invert_to_original(out["label"], out, plan)
    assert back.dtype == torch.int64 and tuple(back.shape) == (1, *LPS_SHAPE)
    assert np.array_equal(back.affine.numpy(), LPS_AFFINE)
    assert np.array_equal(back.numpy(), lab.array)
    # probabilities (float): linear resampling back, argmax still the label
    probs = torch.nn.functional.one_hot(out["label"][0], 4).permute(3, 0, 1, 2).float()
    pback = invert_to_original(probs, out, plan)
    assert pback.shape == (4, *LPS_SHAPE) and torch.is_floating_point(pback)
    assert np.array_equal(pback.argmax(0).numpy(), lab.array[0])


# ------------------------------------------------------------------------------------------ caching


@pytest.fixture(scope="module")
def phantom_ds(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "ds", n=3, size=24, seed=1)


def _count_reads(monkeypatch) -> list[int]:
    calls = [0]
    real = medcl.io.read_volume

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(medcl.io, "read_volume", counting)
    return calls


def test_disk_cache_second_pass_decodes_nothing(phantom_ds, tmp_path, monkeypatch):
    m = load_manifest(phantom_ds)
    plan = PreprocessingPlan.for_manifest(m, spacing=(5.0, 5.0, 5.0), crop_foreground=True)
    calls = _count_reads(monkeypatch)
    first = [CaseDataset(m, plan, cache="disk", cache_dir=tmp_path)[i] for i in range(3)]
    assert calls[0] == 6  # image + label per case
    ds = CaseDataset(m, plan, cache="disk", cache_dir=tmp_path)  # a new epoch, even a new process
    second = [ds[i] for i in range(3)]
    assert calls[0] == 6
    for a, b in zip(first, second):
        assert a["id"] == b["id"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["image"].affine, b["image"].affine) and torch.equal(a["fg_box"], b["fg_box"])
    # the cache file is pickle-free: JSON + raw tensor bytes
    from medcl.data.blobfile import read_blob

    blob = read_blob(ds.cache_path(0))
    assert blob["id"] == m.cases[0].id and ds.cache_path(0).read_bytes()[:8] == b"MEDCLB2\n"
    # a cached item still inverts to the original grid exactly
    lab0 = medcl.io.read_volume(m.cases[0].label, is_label=True)
    back = invert_to_original(second[0]["label"], second[0], plan)
    assert back.shape == lab0.array.shape and np.allclose(back.affine.numpy(), lab0.affine)
    # another plan -> another file; a changed input file -> another file
    other = PreprocessingPlan.for_manifest(m, spacing=(6.0, 6.0, 6.0))
    assert CaseDataset(m, other, cache_dir=tmp_path).cache_path(0).parent != ds.cache_path(0).parent
    old = ds.cache_path(1)
    st = os.stat(m.cases[1].images[0])
    os.utime(m.cases[1].images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ds.cache_path(1) != old
    before = calls[0]
    ds[1]
    assert calls[0] == before + 2


def test_corrupt_cache_file_is_rebuilt_and_ram_cache(phantom_ds, tmp_path, monkeypatch):
    m = load_manifest(phantom_ds)
    plan = PreprocessingPlan.for_manifest(m)
    ds = CaseDataset(m, plan, cases=[m.cases[2].id], cache="disk", cache_dir=tmp_path)
    ref = ds[0]
    p = ds.cache_path(0)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.warns(UserWarning, match="rebuilding"):
        again = ds[0]
    assert torch.equal(again["image"], ref["image"]) and p.stat().st_size > 1000
    calls = _count_reads(monkeypatch)
    ram = CaseDataset(m, plan, cache="ram", with_label=False)
    for _ in range(2):
        items = [ram[i] for i in range(len(ram))]
    assert calls[0] == 3 and "label" not in items[0]
    items[0]["image"].mul_(0)  # the caller's copy; the cache is untouched
    assert float(ram[0]["image"].abs().sum()) > 0


# -------------------------------------------------------------------------------------------- manifests


def _vol(path: Path, shape=(10, 12, 8), affine=None, seed=0, channels=1, label=False) -> Path:
    rng = np.random.default_rng(seed)
    if label:
        arr = rng.integers(0, 3, size=(1, *shape)).astype(np.uint8)
    else:
        arr = rng.normal(100, 20, size=(channels, *shape)).astype(np.float32)
    write_nifti(Volume(arr, np.eye(4) if affine is None else affine), path)
    return path


def test_folder_manifest_pairs_labels_and_groups_channels(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for c in ("a", "b"):
        _vol(img_dir / f"{c}.nii.gz")
        _vol(tmp_path / "labels" / f"{c}.nii.gz", label=True)
    _vol(img_dir / "c.nii.gz")  # unlabelled
    (img_dir / "notes.txt").write_text("ignored")
    m = load_manifest(img_dir)
    assert m.kind == "folder" and m.ids == ["a", "b", "c"] and not m.problems
    assert m.cases[0].label.endswith("labels/a.nii.gz") and m.cases[2].label is None
    image, label = load_case(m.cases[0], m)
    assert image.shape == (10, 12, 8) and label.array.dtype.kind in "iu"
    # channel files CASE_0000 / CASE_0001 in a folder are one two-channel case
    ch = tmp_path / "channels"
    ch.mkdir()
    for c in ("x", "y"):
        for k in range(2):
            _vol(ch / f"{c}_{k:04d}.nii.gz", seed=k)
    m2 = load_manifest(ch)
    assert m2.ids == ["x", "y"] and m2.channel_names == ["0", "1"]
    image, _ = load_case(m2.cases[1], m2)
    assert image.channels == 2


def test_csv_manifest(tmp_path):
    for c in ("p1", "p2"):
        for k in range(2):
            _vol(tmp_path / "img" / f"{c}_{k}.nii.gz", seed=k)
        _vol(tmp_path / "lab" / f"{c}.nii.gz", label=True)
    csv_path = tmp_path / "cases.csv"
    csv_path.write_text(
        "image,label,split,patient\n"
        "img/p1_0.nii.gz;img/p1_1.nii.gz,lab/p1.nii.gz,train,P01\n"
        f"{tmp_path}/img/p2_0.nii.gz; img/p2_1.nii.gz,,test,P02\n"
    )
    m = load_manifest(csv_path)
    assert m.kind == "csv" and m.channel_names == ["0", "1"] and m.labels is None
    a, b = m.cases
    assert (a.id, a.split, a.patient, b.split, b.label) == ("p1_0", "train", "P01", "test", None)
    image, label = load_case(a, m)
    assert image.channels == 2 and label is not None
    bad = tmp_path / "bad.csv"
    bad.write_text("image,labels\nimg/p1_0.nii.gz,lab/p1.nii.gz\n")
    with pytest.raises(MedclDataError, match=r"bad\.csv.*unknown CSV column.*labels"):
        load_manifest(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("image\nimg/p1_0.nii.gz\nimg/p1_0.nii.gz\n")
    with pytest.raises(MedclDataError, match="duplicate case ids"):
        load_manifest(dup)


def test_csv_split_values_are_checked(tmp_path):
    """A typo in ``split`` ('tset') must not silently train on the intended test cases."""
    for c in ("a", "b", "c"):
        _vol(tmp_path / f"{c}.nii.gz", seed=ord(c))
    csv_path = tmp_path / "cases.csv"
    csv_path.write_text("image,split\na.nii.gz,train\nb.nii.gz,tset\nc.nii.gz,test\n")
    with pytest.raises(MedclDataError) as info:
        load_manifest(csv_path)
    err = info.value
    assert err.path == str(csv_path)
    for words in ("line 3", "'tset'", "'train'", "'test'", "case-insensitive"):
        assert words in err.problem, (words, err.problem)
    # case and surrounding blanks do not matter; the value is stored in lower case; empty means no split
    csv_path.write_text("image,split\na.nii.gz,TRAIN\nb.nii.gz, Test \nc.nii.gz,\n")
    assert [c.split for c in load_manifest(csv_path).cases] == ["train", "test", None]
    # 'val' is not a split medcl knows: such a case would be trained on
    csv_path.write_text("image,split\na.nii.gz,train\nb.nii.gz,val\n")
    with pytest.raises(MedclDataError, match=r"cases\.csv: line 3: unknown split 'val'"):
        load_manifest(csv_path)


def _int_vol(path: Path, shape=(6, 5, 4)) -> Path:
    """An integer-valued image (CT-like): it also reads as a label map, so a label that is this very file would
    be trained on silently."""
    arr = np.arange(int(np.prod(shape)), dtype=np.int16).reshape((1, *shape)) - 100
    write_nifti(Volume(arr, np.eye(4)), path)
    return path


def test_label_that_is_its_own_image_is_refused(tmp_path):
    img = _int_vol(tmp_path / "a.nii.gz")
    _int_vol(tmp_path / "b.nii.gz")
    _vol(tmp_path / "lab_b.nii.gz", shape=(6, 5, 4), label=True)
    # the same path twice in a CSV, spelt differently
    csv_path = tmp_path / "cases.csv"
    csv_path.write_text("image,label\nb.nii.gz,lab_b.nii.gz\na.nii.gz,./sub/../a.nii.gz\n")
    (tmp_path / "sub").mkdir()
    with pytest.raises(MedclDataError) as info:
        load_manifest(csv_path)
    assert info.value.path == str(csv_path) and "line 3" in info.value.problem
    assert "a.nii.gz" in info.value.problem and "same file" in info.value.problem
    # a hard link is the same file too
    os.link(img, tmp_path / "a_label.nii.gz")
    csv_path.write_text("image,label\na.nii.gz,a_label.nii.gz\n")
    with pytest.raises(MedclDataError, match=r"line 2: .*a_label\.nii\.gz.* same file .*a\.nii\.gz"):
        load_manifest(csv_path)
    # a labels/ folder that is a link back to images/
    (tmp_path / "ds" / "images").mkdir(parents=True)
    _int_vol(tmp_path / "ds" / "images" / "x.nii.gz")
    (tmp_path / "ds" / "labels").symlink_to("images", target_is_directory=True)
    for where in (tmp_path / "ds" / "images", tmp_path / "ds"):
        with pytest.raises(MedclDataError, match=r"labels.* is the images folder .*images"):
            load_manifest(where)
    # an MSD dataset.json whose label is its image
    msd = tmp_path / "msd"
    _int_vol(msd / "imagesTr" / "m.nii.gz")
    (msd / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background"}, "numTraining": 1,
        "training": [{"image": "./imagesTr/m.nii.gz", "label": "./imagesTr/m.nii.gz"}]}))
    with pytest.raises(MedclDataError, match=r"case 'm': label .*imagesTr/m\.nii\.gz is the same file as its image"):
        load_manifest(msd)
    # and a manifest built in code: load_case refuses it too
    from medcl.data import Case, Manifest

    m = Manifest([Case("a", [str(img)], str(tmp_path / "a_label.nii.gz"))], ["0"], None, "csv", str(tmp_path))
    with pytest.raises(MedclDataError, match="same file as its image"):
        load_case(m.cases[0], m)


def test_msd_manifest_with_4d_two_modality_images(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    training = []
    for c in ("brats_001", "brats_002"):
        _vol(tmp_path / "imagesTr" / f"{c}.nii.gz", channels=2)
        _vol(tmp_path / "labelsTr" / f"{c}.nii.gz", label=True)
        training.append({"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"})
    desc = {"modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "edema", "2": "tumour"},
            "numTraining": 2, "training": training, "test": []}
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    m = load_manifest(tmp_path)
    assert m.kind == "msd" and m.channel_names == ["FLAIR", "T1w"] and m.labels == {0: "background", 1: "edema",
                                                                                      2: "tumour"}
    image, label = load_case(m.cases[0], m)
    assert image.array.shape == (2, 10, 12, 8) and label.array.shape == (1, 10, 12, 8)
    plan = PreprocessingPlan.for_manifest(m)
    assert [s.scheme for s in plan.intensity] == ["mri", "mri"]
    item = CaseDataset(m, plan, cache="none")[1]
    assert item["image"].shape == (2, 10, 12, 8)
    # errors name the file and the key
    for broken, key in (({**desc, "modality": {"1": "T1"}}, "modality"),
                        ({**desc, "training": {"image": "x"}}, "training"),
                        ({**desc, "labels": {"bg": "background"}}, "labels.bg"),
                        ({"name": "x"}, "neither an MSD")):
        (tmp_path / "dataset.json").write_text(json.dumps(broken))
        with pytest.raises(MedclDataError, match=f"dataset.json.*{key}"):
            load_manifest(tmp_path / "dataset.json")
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(MedclDataError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_nnunet_v2_manifest_two_channels(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    for c in ("prostate_00", "prostate_01"):
        for k in range(2):
            _vol(tmp_path / "imagesTr" / f"{c}_{k:04d}.nii.gz", seed=k)
        _vol(tmp_path / "labelsTr" / f"{c}.nii.gz", label=True)
    desc = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
            "numTraining": 2, "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    m = load_manifest(tmp_path)
    assert m.kind == "nnunet" and m.ids == ["prostate_00", "prostate_01"] and not m.problems
    assert m.channel_names == ["T2", "ADC"] and m.labels == {0: "background", 1: "PZ", 2: "TZ"}
    image, label = load_case(m.cases[1], m)
    assert image.channels == 2 and label is not None
    assert np.array_equal(image.array[1], medcl.io.read_volume(m.cases[1].images[1]).array[0])
    # a missing channel file is listed (and then reported by load_case); numTraining is checked
    os.remove(tmp_path / "imagesTr" / "prostate_01_0001.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({**desc, "numTraining": 3}))
    m = load_manifest(tmp_path)
    assert any("numTraining is 3" in q for _, q in m.problems)
    with pytest.raises(MedclDataError, match="prostate_01_0001.nii.gz.*does not exist"):
        load_case(m.cases[1], m)
    for broken, key in ((dict(desc, file_ending="nii"), "file_ending"),
                        ({k: v for k, v in desc.items() if k != "numTraining"}, "numTraining"),
                        (dict(desc, labels={"PZ": 1}), "background"),
                        (dict(desc, modality={"0": "MRI"}), "both")):
        (tmp_path / "dataset.json").write_text(json.dumps(broken))
        with pytest.raises(MedclDataError, match=f"dataset.json.*{key}"):
            load_manifest(tmp_path)


def test_load_case_validates_geometry_and_label_values(tmp_path):
    shift = np.eye(4)
    shift[0, 3] = 0.01
    _vol(tmp_path / "i.nii.gz")
    _vol(tmp_path / "i1.nii.gz", affine=shift)
    _vol(tmp_path / "l_shape.nii.gz", shape=(10, 12, 9), label=True)
    _vol(tmp_path / "l_aff.nii.gz", affine=shift, label=True)
    arr = np.zeros((1, 10, 12, 8), np.uint8)
    arr[0, 0, 0, 0] = 7
    write_nifti(Volume(arr, np.eye(4)), tmp_path / "l_val.nii.gz")
    from medcl.data import Case, Manifest

    m = Manifest([], ["0"], {0: "bg", 1: "a", 2: "b"}, "csv", str(tmp_path))
    cases = {
        "label shape": Case("s", [str(tmp_path / "i.nii.gz")], str(tmp_path / "l_shape.nii.gz")),
        "label affine differs": Case("a", [str(tmp_path / "i.nii.gz")], str(tmp_path / "l_aff.nii.gz")),
        r"label values \[7\] outside": Case("v", [str(tmp_path / "i.nii.gz")], str(tmp_path / "l_val.nii.gz")),
    }
    for msg, case in cases.items():
        with pytest.raises(MedclDataError, match=msg):
            load_case(case, m)
    m2 = Manifest([], ["0", "1"], None, "csv", str(tmp_path))
    with pytest.raises(MedclDataError, match="i1.nii.gz: channel affine differs"):
        load_case(Case("c", [str(tmp_path / "i.nii.gz"), str(tmp_path / "i1.nii.gz")]), m2)
    with pytest.raises(MedclDataError, match="has 1 channel but the dataset has 2$"):
        load_case(Case("c", [str(tmp_path / "i.nii.gz")]), m2)
    # with_label=False reads the image only
    image, label = load_case(cases["label shape"], m, with_label=False)
    assert label is None


def _dicom_series(folder: Path, n: int = 3, uid: str | None = None) -> None:
    folder.mkdir(parents=True)
    uid = uid or generate_uid()
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", uid, k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.Rows, ds.Columns = 6, 5
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.PixelData = np.full((6, 5), k, dtype=np.int16).tobytes()
        ds.save_as(folder / f"slice{k}", enforce_file_format=True)


def test_single_file_and_dicom_manifests(tmp_path):
    f = _vol(tmp_path / "one.nii.gz")
    m = load_manifest(f)
    assert m.kind == "file" and m.ids == ["one"]
    _dicom_series(tmp_path / "dcm" / "s1")
    m = load_manifest(tmp_path / "dcm" / "s1")
    assert m.kind == "dicom" and m.ids == ["s1"] and m.channel_names == ["CT"]
    _dicom_series(tmp_path / "dcm" / "s2", n=4)
    m = load_manifest(tmp_path / "dcm")
    assert m.kind == "dicom" and m.ids == ["s1", "s2"]
    image, _ = load_case(m.cases[1], m)
    assert image.shape == (5, 6, 4) and np.allclose(image.spacing, (0.8, 0.8, 2.5))
    with pytest.raises(MedclDataError, match="does not exist"):
        load_manifest(tmp_path / "nothing")


def test_hippocampus_manifest(shared_data):
    m = load_manifest(shared_data / "hippocampus" / "dataset.json")
    assert m.kind == "msd" and len(m) == 60 and m.labels == {0: "background", 1: "anterior", 2: "posterior"}
    image, label = load_case(m.cases[0], m)
    assert set(np.unique(label.array)) <= {0, 1, 2} and image.shape == label.shape


def test_label_nifti_stays_integer_through_writer(tmp_path):
    # a phantom label written by write_phantom_dataset reads back as the same integers
    out = write_phantom_dataset(tmp_path / "p", n=1, size=(20, 16, 24), seed=4, modality="ct")
    img = nib.load(out / "labelsTr" / "phantom_000.nii.gz")
    _, lab = make_phantom(int(np.random.SeedSequence([4, 0]).generate_state(1)[0]), (20, 16, 24), modality="ct")
    assert np.array_equal(np.asarray(img.dataobj), lab.array[0])
    d = json.loads((out / "dataset.json").read_text())
    assert d["modality"] == {"0": "CT"} and d["numTraining"] == 1 and d["labels"]["1"] == "liver"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_manifest(out).cases[0].id == "phantom_000"


def test_disk_cache_round_trips_metadata_trace_and_label_dtype(phantom_ds, tmp_path):
    """The JSON-packed metadata and MONAI trace come back with the same values and container types, and a
    label stored as uint8 comes back in its original dtype."""
    from medcl.data.dataset import to_plain

    m = load_manifest(phantom_ds)
    plan = PreprocessingPlan.for_manifest(m, spacing=(5.0, 5.0, 5.0), crop_foreground=True)
    ref = CaseDataset(m, plan, cache="disk", cache_dir=tmp_path)[0]  # preprocessed now, and written
    ds = CaseDataset(m, plan, cache="disk", cache_dir=tmp_path)
    back = ds[0]
    from medcl.data.blobfile import read_blob

    blob = read_blob(ds.cache_path(0))
    assert blob["label"]["data"].dtype == torch.uint8 and back["label"].dtype == ref["label"].dtype
    for key in ("image", "label"):
        assert torch.equal(back[key].as_tensor(), ref[key].as_tensor())
        got, want = to_plain(dict(back[key].meta)), to_plain(dict(ref[key].meta))
        assert repr(got) == repr(want)
        assert repr(to_plain(list(back[key].applied_operations))) == repr(to_plain(list(ref[key].applied_operations)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool, torch.int16])
def test_blob_file_round_trip_and_damage(tmp_path, dtype):
    """Every dtype and odd shapes (0-d, empty, non-contiguous) come back equal; a truncated or foreign file
    raises ValueError (the dataset turns that into a rebuild)."""
    from medcl.data.blobfile import read_blob, write_blob

    g = torch.Generator().manual_seed(0)
    big = (torch.randn(3, 5, 7, generator=g) * 100).to(dtype)
    obj = {"a": big, "b": [big.transpose(0, 2), {"c": torch.tensor(3).to(dtype)}], "e": torch.empty(0, 4, dtype=dtype),
           "s": "text", "n": None, "f": 1.5, "t": (1, 2)}
    p = tmp_path / "x.medcl"
    write_blob(obj, p)
    back = read_blob(p)
    assert torch.equal(back["a"], big) and back["a"].dtype == dtype
    assert torch.equal(back["b"][0], big.transpose(0, 2)) and torch.equal(back["b"][1]["c"], obj["b"][1]["c"])
    assert back["e"].shape == (0, 4) and back["s"] == "text" and back["n"] is None and back["f"] == 1.5
    assert back["t"] == [1, 2]
    back["a"].zero_()  # owns its memory
    assert torch.equal(read_blob(p)["a"], big)
    data = p.read_bytes()
    for broken in (data[: len(data) // 2], data[:20], b"PK\x03\x04" + data[4:]):
        p.write_bytes(broken)
        with pytest.raises(ValueError):
            read_blob(p)
