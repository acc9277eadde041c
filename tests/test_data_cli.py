"""``medcl data check | info | phantoms``, in-process through ``medcl.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medcl.cli import main
from medcl.core.geometry import Volume
from medcl.io import write_nifti

LABELS = {"0": "background", "1": "organ", "2": "lesion"}


def _image(path: Path, shape=(10, 12, 8), affine=None, seed=0) -> Path:
    arr = np.random.default_rng(seed).normal(100, 10, size=(1, *shape)).astype(np.float32)
    write_nifti(Volume(arr, np.eye(4) if affine is None else affine), path)
    return path


def _label(path: Path, shape=(10, 12, 8), affine=None, values=(0, 1, 2)) -> Path:
    arr = np.zeros((1, *shape), np.uint8)
    for n, v in enumerate(values):
        arr[0, n] = v
    write_nifti(Volume(arr, np.eye(4) if affine is None else affine), path)
    return path


def _raw_nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _mixed_dataset(root: Path) -> dict[str, tuple[str, str]]:
    """MSD layout with two good cases and one case per kind of bad input.

    Returns ``{case: (bad file name, expected words of its problem)}``.
    """
    im, lb = root / "imagesTr", root / "labelsTr"
    im.mkdir(parents=True)
    lb.mkdir()
    for c in ("good_a", "good_b"):
        _image(im / f"{c}.nii.gz")
        _label(lb / f"{c}.nii.gz")
    trunc = _image(im / "truncated.nii.gz", shape=(30, 30, 30))
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    (im / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    _raw_nifti(im / "flat.nii.gz", np.ones((10, 12), np.float32))
    _raw_nifti(im / "fourd.nii.gz", np.ones((10, 12, 8, 2), np.float32))
    nan = np.ones((10, 12, 8), np.float32)
    nan[1, 2, 3] = np.nan
    _raw_nifti(im / "nan.nii.gz", nan)
    _image(im / "shape.nii.gz")
    _label(lb / "shape.nii.gz", shape=(10, 12, 9))
    _image(im / "affine.nii.gz")
    shifted = np.eye(4)
    shifted[2, 3] = 0.5
    _label(lb / "affine.nii.gz", affine=shifted)
    _image(im / "values.nii.gz")
    _label(lb / "values.nii.gz", values=(0, 1, 5))
    expected = {
        "missing": ("missing.nii.gz", "does not exist"),
        "truncated": ("truncated.nii.gz", "truncated"),
        "scan": ("scan.png", "unsupported format"),
        "flat": ("flat.nii.gz", "not a 3D volume"),
        "fourd": ("fourd.nii.gz", "has 2 channels but the dataset has 1 (MRI)"),
        "nan": ("nan.nii.gz", "non-finite"),
        "shape": ("labelsTr/shape.nii.gz", "does not match image shape"),
        "affine": ("labelsTr/affine.nii.gz", "label affine differs"),
        "values": ("labelsTr/values.nii.gz", "label values [5] outside the declared set [0, 1, 2]"),
    }
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("good_a", "good_b")]
    for case in expected:
        name = "scan.png" if case == "scan" else f"{case}.nii.gz"
        entry = {"image": f"./imagesTr/{name}"}
        if (lb / f"{case}.nii.gz").exists():
            entry["label"] = f"./labelsTr/{case}.nii.gz"
        training.append(entry)
    desc = {"modality": {"0": "MRI"}, "labels": LABELS, "numTraining": len(training), "training": training}
    (root / "dataset.json").write_text(json.dumps(desc))
    return expected


def test_check_mixed_dataset_lists_every_problem_and_the_good_cases(tmp_path, capsys):
    expected = _mixed_dataset(tmp_path / "ds")
    rc = main(["data", "check", str(tmp_path / "ds"), "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert rc == 1
    report = json.loads((tmp_path / "report.json").read_text())
    cases = {c["id"]: c for c in report["cases"]}
    assert set(cases) == {"good_a", "good_b", *expected}
    for good in ("good_a", "good_b"):
        c = cases[good]
        assert c["problems"] == [] and c["shape"] == [10, 12, 8] and c["spacing"] == [1.0, 1.0, 1.0]
        assert c["label_values"] == [0, 1, 2] and c["orientation"] == "RAS"
        assert any(line.startswith(good) and line.rstrip().endswith("ok") for line in out.splitlines())
    for case, (fname, words) in expected.items():
        probs = cases[case]["problems"]
        assert len(probs) == 1, (case, probs)
        assert probs[0]["path"].endswith(fname) and words in probs[0]["problem"], (case, probs)
        assert f"{fname}: " in out and words in out
    assert len(report["problems"]) == len(expected)
    assert {p["case"] for p in report["problems"]} == set(expected)


def test_check_csv_and_folder_with_bad_files(tmp_path, capsys):
    _image(tmp_path / "a.nii.gz")
    _image(tmp_path / "b_0.nii.gz")
    _image(tmp_path / "b_1.nii.gz", shape=(10, 12, 9))
    (tmp_path / "list.csv").write_text("image,split\na.nii.gz,train\nnot_here.nii.gz,train\nb_0.nii.gz;b_1.nii.gz,test\n")
    rc = main(["data", "check", str(tmp_path / "list.csv"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert rc == 1 and [c["id"] for c in report["cases"]] == ["a", "not_here", "b_0"]
    assert report["cases"][0]["problems"] == [] and "a " in out
    assert "not_here.nii.gz: does not exist" in out
    assert "b_1.nii.gz: channel shape (10, 12, 9) differs" in out
    # a folder: an unsupported file and a truncated volume are reported, the good volume listed
    folder = tmp_path / "folder"
    folder.mkdir()
    _image(folder / "ok.nii.gz")
    (folder / "slide.tif").write_bytes(b"II*\x00" + bytes(32))
    (folder / "README.txt").write_text("notes are not volumes, and not problems")
    t = _image(folder / "cut.nii.gz", shape=(30, 30, 30))
    t.write_bytes(t.read_bytes()[:300])
    rc = main(["data", "check", str(folder), "--json", str(tmp_path / "f.json")])
    report = json.loads((tmp_path / "f.json").read_text())
    assert rc == 1
    assert {c["id"]: bool(c["problems"]) for c in report["cases"]} == {"cut": True, "ok": False}
    paths = {Path(p["path"]).name for p in report["problems"]}
    assert paths == {"slide.tif", "cut.nii.gz"}


def test_broken_manifest_is_a_reported_problem(tmp_path, capsys):
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "labels": {"background": 0},
                                                       "numTraining": 1}))
    rc = main(["data", "check", str(tmp_path), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out.err
    assert "dataset.json: nnU-Net v2 dataset.json: required key 'file_ending' is missing" in out.out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["cases"] == [] and report["problems"][0]["path"].endswith("dataset.json")


def test_phantoms_then_check_is_clean(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["data", "phantoms", str(out), "--n", "3", "--size", "20", "--seed", "4", "--modality", "ct"]) == 0
    assert main(["data", "check", str(out), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kind"] == "msd" and [c["id"] for c in report["cases"]] == [f"phantom_{i:03d}" for i in range(3)]
    for c in report["cases"]:
        assert c["shape"] == [20, 20, 20] and set(c["label_values"]) <= {0, 1, 2, 3} and 1 in c["label_values"]
        assert c["intensity_range"][0] < -900  # CT air
    assert "no problems found" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "phantoms", str(out), "--size", "4,4"])


def test_info_on_a_file_and_a_bad_file(tmp_path, capsys):
    aff = np.diag([-0.5, 0.75, 2.0, 1.0])
    _image(tmp_path / "v.nii.gz", shape=(6, 7, 5), affine=aff)
    assert main(["data", "info", str(tmp_path / "v.nii.gz"), "--json", str(tmp_path / "i.json")]) == 0
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["shape"] == [6, 7, 5] and info["spacing"] == [0.5, 0.75, 2.0] and info["orientation"] == "LAS"
    assert info["format"] == "nifti" and np.allclose(info["affine"], aff) and info["problems"] == []
    assert "LAS" in capsys.readouterr().out
    (tmp_path / "bad.nii").write_bytes(b"\x00" * 40)
    assert main(["data", "info", str(tmp_path / "bad.nii"), "--json", str(tmp_path / "b.json")]) == 2
    assert json.loads((tmp_path / "b.json").read_text())["problems"][0]["path"].endswith("bad.nii")
    # an unreadable volume is one error line on stderr, as for every other command
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medcl: error: ") and "bad.nii: unreadable NIfTI" in err[0]


def _sform_qform(path: Path, dz: float = 2.5) -> Path:
    """sform (code 1) ``dz`` mm above the qform (code 1)."""
    img = nib.Nifti1Image(np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32), None)
    img.set_qform(np.eye(4), code=1)
    sform = np.eye(4)
    sform[2, 3] = dz
    img.set_sform(sform, code=1)
    nib.save(img, str(path))
    return path


def test_check_and_info_report_disagreeing_sform_and_qform(tmp_path, capsys):
    folder = tmp_path / "ds"
    folder.mkdir()
    _image(folder / "ok.nii.gz", shape=(6, 5, 4))
    bad = _sform_qform(folder / "moved.nii.gz")
    rc = main(["data", "check", str(folder), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(Path(p["path"]).name, p["case"]) for p in report["problems"]] == [("moved.nii.gz", "moved")]
    line = next(ln for ln in out.splitlines() if "moved.nii.gz:" in ln)
    assert "sform and qform disagree" in line and "2.5 mm" in line and "medcl uses the sform" in line
    # info describes the file (it is readable) and shows the disagreement
    assert main(["data", "info", str(bad), "--json", str(tmp_path / "i.json")]) == 0
    out = capsys.readouterr().out
    assert "warning" in out and "sform and qform disagree" in out and "2.5 mm" in out
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["problems"] == [] and "sform and qform disagree" in info["warnings"][0]["problem"]
    # the file still trains: reading is deterministic (sform)
    from medcl.data import load_case, load_manifest

    m = load_manifest(bad)
    image, _ = load_case(m.cases[0], m)
    assert image.affine[2, 3] == 2.5


def test_check_refuses_a_csv_with_an_unknown_split(tmp_path, capsys):
    _image(tmp_path / "a.nii.gz")
    _image(tmp_path / "b.nii.gz")
    (tmp_path / "list.csv").write_text("image,split\na.nii.gz,train\nb.nii.gz,tset\n")
    rc = main(["data", "check", str(tmp_path / "list.csv"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "no problems found" not in out
    assert "list.csv: line 3: unknown split 'tset'" in out


def test_check_hippocampus_lists_60_clean_cases(shared_data, tmp_path, capsys):
    rc = main(["data", "check", str(shared_data / "hippocampus"), "--json", str(tmp_path / "h.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "h.json").read_text())
    assert rc == 0 and report["problems"] == [] and len(report["cases"]) == 60
    assert all(set(c["label_values"]) <= {0, 1, 2} for c in report["cases"])
    assert sum(1 for line in out.splitlines() if line.startswith("hippocampus_")) == 60


def test_info_dicom_ct_series(shared_data, tmp_path):
    assert main(["data", "info", str(shared_data / "dicom_ct" / "series"), "--json", str(tmp_path / "ct.json")]) == 0
    info = json.loads((tmp_path / "ct.json").read_text())
    assert info["shape"] == [512, 512, 20] and info["format"] == "dicom"
    assert np.allclose(info["spacing"], (0.977, 0.977, 2.0), atol=0.01)
    assert -1100 < info["intensity_range"][0] < -900 and info["intensity_range"][1] > 200
