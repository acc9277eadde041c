"""A hostile user's catalogue of bad data: broken volumes, DICOM series and manifests through ``medcl.cli.main``.

Every input is tiny and built in the test (phantoms of 16^3 voxels, DICOM series of 4x4 slices). Each case asserts
a non-zero exit code, no traceback, and that no input changed (sha256 of every input file, and the set of files,
before and after). Two kinds of command:

* ``strict`` (``data info``, ``finetune``, ``pretrain``, ``split``): exactly ONE line on stderr,
  ``medcl: error: ...``, naming the file and the problem; a training command fails before it trains.
* ``check`` (``data check``, which lists every problem on purpose): exit 1, every problem on its own stdout line
  starting with the path of an input file, one of them naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medcl.cli import main
from medcl.core.geometry import Volume
from medcl.data import write_phantom_dataset
from medcl.io import read_volume, write_nifti

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------------------------------- helpers


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (a link is recorded as its target, a linked file also hashed)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[f"{p} ->"] = os.readlink(p)
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _phantoms(t: Path) -> Path:
    return write_phantom_dataset(t / "in" / "ph", n=4, size=16, seed=0)


def _phantom_csv(t: Path, rows: list[str], header: str = "image,label,split") -> Path:
    """A CSV beside the phantoms' imagesTr/labelsTr; ``rows`` use ``{i}`` for a case index."""
    ph = _phantoms(t)
    csv_path = ph / "cases.csv"
    csv_path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return csv_path


def _csv_rows(splits: list[str]) -> list[str]:
    return [f"imagesTr/phantom_{i:03d}.nii.gz,labelsTr/phantom_{i:03d}.nii.gz,{s}" for i, s in enumerate(splits)]


def _raw_nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _dicom_series(folder: Path, n: int = 4, skip: tuple[int, ...] = (), rescale: dict | None = None) -> Path:
    """A CT series of ``n`` 4x4 slices ``slice_00K.dcm`` 2.5 mm apart; ``rescale`` ``{k: {"RescaleSlope": "0"}}``
    overrides the (valid) rescale of slice k."""
    folder.mkdir(parents=True)
    uid = generate_uid()
    for k in range(n):
        if k in skip:
            continue
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
        ds.Rows, ds.Columns = 4, 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about 'nan': the very value under test
            for key, value in (rescale or {}).get(k, {}).items():
                setattr(ds, key, value)
        ds.PixelData = np.full((4, 4), 1000 + k, dtype=np.int16).tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)
    return folder


def _rewrite_label(ph: Path, i: int, fn: Callable[[np.ndarray], np.ndarray], shape=None) -> Path:
    path = ph / "labelsTr" / f"phantom_{i:03d}.nii.gz"
    lab = read_volume(path, is_label=True)
    arr = fn(lab.array.copy()) if shape is None else np.zeros((1, *shape), lab.array.dtype)
    path.unlink()
    write_nifti(Volume(arr, lab.affine), path)
    return path


def _shift_sform(path: Path, dz: float = 4.0) -> Path:
    """Move the sform ``dz`` mm and keep the qform: what a tool that edits only the sform leaves behind."""
    img = nib.load(str(path))
    data, hdr = np.asanyarray(img.dataobj), img.header.copy()
    aff = hdr.get_sform()
    aff[2, 3] += dz
    hdr.set_sform(aff, code=1)
    assert int(hdr["qform_code"]) == 1
    path.unlink()
    nib.save(nib.Nifti1Image(data, None, hdr), str(path))
    return path


# ------------------------------------------------------------------------------------------------ builders
# Each builder takes tmp_path, builds its inputs under tmp_path/"in" and returns (argv, needles): every needle
# must be on the error line (strict) or on one problem line (check). Outputs go to tmp_path/"out".


def _finetune(t: Path, data: Path) -> list[str]:
    return ["finetune", "--data", str(data), "--out", str(t / "out" / "ft"), "--max-steps", "1", "--device", "cpu"]


def b_finetune_split_typo(t):
    csv_path = _phantom_csv(t, _csv_rows(["train", "tset", "test", "train"]))
    return _finetune(t, csv_path), ["cases.csv", "line 3", "unknown split 'tset'", "'test'", "case-insensitive"]


def b_pretrain_split_typo(t):
    csv_path = _phantom_csv(t, _csv_rows(["train", "train", "Test", "tset"]))
    argv = ["pretrain", "--config", str(CONFIGS / "pretrain" / "gd.yaml"), "--data", str(csv_path), "--out",
            str(t / "out" / "pre"), "--max-steps", "1", "--device", "cpu", "--no-progress"]
    return argv, ["cases.csv", "line 5", "unknown split 'tset'"]


def b_split_cmd_split_typo(t):
    csv_path = _phantom_csv(t, _csv_rows(["train", "train", "TSET", "test"]))
    return (["split", str(csv_path), "--out", str(t / "out" / "split.json"), "--budgets", "1", "--test", "1"],
            ["cases.csv", "line 4", "unknown split 'TSET'"])


def b_check_split_typo(t):
    csv_path = _phantom_csv(t, _csv_rows(["train", "tset", "test", "train"]))
    return ["data", "check", str(csv_path), "--no-progress"], ["cases.csv", "line 3", "unknown split 'tset'"]


def b_finetune_label_is_image_csv(t):
    rows = [f"imagesTr/phantom_{i:03d}.nii.gz,labelsTr/phantom_{i:03d}.nii.gz," for i in range(3)]
    rows.append("imagesTr/phantom_003.nii.gz,./imagesTr/phantom_003.nii.gz,")  # the same path twice
    csv_path = _phantom_csv(t, rows)
    return _finetune(t, csv_path), ["cases.csv", "line 5", "phantom_003.nii.gz", "same file as its image"]


def b_check_labels_folder_links_to_images(t):
    images = t / "in" / "ds" / "images"
    images.mkdir(parents=True)
    ph = _phantoms(t)
    for i in range(2):
        (images / f"c{i}.nii.gz").write_bytes((ph / "imagesTr" / f"phantom_{i:03d}.nii.gz").read_bytes())
    (t / "in" / "ds" / "labels").symlink_to("images", target_is_directory=True)
    return ["data", "check", str(images), "--no-progress"], ["labels", "is the images folder", "images"]


def b_check_msd_label_is_image(t):
    ph = _phantoms(t)
    desc = json.loads((ph / "dataset.json").read_text())
    desc["training"][1]["label"] = desc["training"][1]["image"]
    (ph / "dataset.json").write_text(json.dumps(desc))
    return ["data", "check", str(ph), "--no-progress"], ["dataset.json", "case 'phantom_001'", "same file as its image"]


def b_info_dicom_slope_zero(t):
    series = _dicom_series(t / "in" / "series", rescale={2: {"RescaleSlope": "0"}})
    return ["data", "info", str(series)], ["slice_002.dcm", "invalid RescaleSlope 0"]


def b_check_dicom_intercept_nan(t):
    _dicom_series(t / "in" / "dcm" / "series", rescale={1: {"RescaleIntercept": "nan"}})
    return ["data", "check", str(t / "in" / "dcm"), "--no-progress"], ["slice_001.dcm", "invalid RescaleIntercept nan"]


def b_check_dicom_slope_inf(t):
    series = _dicom_series(t / "in" / "series", n=5, rescale={4: {"RescaleSlope": "inf"}})
    return ["data", "check", str(series), "--no-progress"], ["slice_004.dcm", "invalid RescaleSlope inf"]


def b_info_dicom_missing_slice(t):
    series = _dicom_series(t / "in" / "series", n=6, skip=(3,))
    return ["data", "info", str(series)], ["series", "missing slice", "slice_002.dcm", "slice_004.dcm"]


def b_check_sform_qform_disagree(t):
    ph = _phantoms(t)
    _shift_sform(ph / "imagesTr" / "phantom_001.nii.gz")
    return ["data", "check", str(ph), "--no-progress"], ["imagesTr/phantom_001.nii.gz", "sform and qform disagree",
                                                         "4 mm", "medcl uses the sform"]


def b_info_truncated_nifti(t):
    ph = _phantoms(t)
    f = ph / "imagesTr" / "phantom_000.nii.gz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ["data", "info", str(f)], ["phantom_000.nii.gz", "truncated"]


def b_info_non_finite(t):
    data = np.ones((8, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    data[4, 4, 4] = np.inf
    return ["data", "info", str(_raw_nifti(t / "in" / "nan.nii.gz", data))], ["nan.nii.gz", "2 non-finite voxel"]


def b_info_5d(t):
    f = _raw_nifti(t / "in" / "five.nii.gz", np.ones((6, 6, 6, 2, 2), np.float32))
    return ["data", "info", str(f)], ["five.nii.gz", "unsupported NIfTI layout", "5D"]


def b_info_2d(t):
    f = _raw_nifti(t / "in" / "flat.nii.gz", np.ones((6, 6), np.float32))
    return ["data", "info", str(f)], ["flat.nii.gz", "not a 3D volume"]


def b_info_missing(t):
    (t / "in").mkdir()
    return ["data", "info", str(t / "in" / "nope.nii.gz")], ["nope.nii.gz", "does not exist"]


def b_info_empty_file(t):
    (t / "in").mkdir()
    (t / "in" / "empty.nii.gz").write_bytes(b"")
    return ["data", "info", str(t / "in" / "empty.nii.gz")], ["empty.nii.gz", "empty file"]


def b_info_unsupported(t):
    (t / "in").mkdir()
    (t / "in" / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return ["data", "info", str(t / "in" / "scan.png")], ["scan.png", "unsupported format"]


def b_check_label_values_outside(t):
    ph = _phantoms(t)

    def put_nine(a):
        a[0, 0, 0, 0] = 9
        return a

    _rewrite_label(ph, 2, put_nine)
    return ["data", "check", str(ph), "--no-progress"], ["labelsTr/phantom_002.nii.gz", "label values [9] outside"]


def b_check_label_shape_mismatch(t):
    ph = _phantoms(t)
    _rewrite_label(ph, 1, lambda a: a, shape=(16, 16, 15))
    return ["data", "check", str(ph), "--no-progress"], ["labelsTr/phantom_001.nii.gz", "does not match image shape"]


def b_check_label_not_integer(t):
    ph = _phantoms(t)
    path = ph / "labelsTr" / "phantom_003.nii.gz"
    lab = read_volume(path, is_label=True)
    arr = lab.array.astype(np.float32)
    arr[0, 1, 1, 1] = 0.5
    path.unlink()
    write_nifti(Volume(arr, lab.affine), path)
    return ["data", "check", str(ph), "--no-progress"], ["labelsTr/phantom_003.nii.gz", "not integers"]


def b_check_empty_folder(t):
    (t / "in" / "empty").mkdir(parents=True)
    return ["data", "check", str(t / "in" / "empty"), "--no-progress"], ["empty", "no volumes found"]


def b_finetune_empty_folder(t):
    (t / "in" / "empty").mkdir(parents=True)
    return _finetune(t, t / "in" / "empty"), ["empty", "no volumes found"]


def b_finetune_csv_unknown_column(t):
    csv_path = _phantom_csv(t, _csv_rows(["train"] * 4), header="image,labels,split")
    return _finetune(t, csv_path), ["cases.csv", "unknown CSV column", "labels"]


def b_finetune_dataset_json_not_json(t):
    ph = _phantoms(t)
    (ph / "dataset.json").write_text('{"training": [')
    return _finetune(t, ph), ["dataset.json", "not valid JSON"]


def b_check_dataset_json_not_json(t):
    ph = _phantoms(t)
    (ph / "dataset.json").write_text("modality: MRI\n")
    return ["data", "check", str(ph), "--no-progress"], ["dataset.json", "not valid JSON"]


CASES: list[tuple[str, Callable]] = [(name[2:], fn) for name, fn in sorted(globals().items())
                                     if name.startswith("b_") and callable(fn)]


# -------------------------------------------------------------------------------------------------- the test


def _kind(argv: list[str]) -> str:
    return "check" if argv[:2] == ["data", "check"] else "strict"


@pytest.mark.parametrize("name,build", CASES, ids=[c[0] for c in CASES])
def test_bad_data_fails_clearly_and_changes_nothing(name, build, tmp_path, capsys):
    argv, needles = build(tmp_path)
    inp = tmp_path / "in"
    before = digest(inp)
    capsys.readouterr()  # what building the inputs printed
    rc = main(argv)
    captured = capsys.readouterr()
    assert digest(inp) == before, "an input changed"
    assert "Traceback" not in captured.err + captured.out
    if _kind(argv) == "strict":
        assert rc == 2, (rc, captured.err)
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("medcl: error: "), captured.err
        for n in needles:
            assert n in lines[0], (n, lines[0])
        out = tmp_path / "out"
        trained = [p for p in out.rglob("*") if p.suffix in (".pt", ".ckpt")] if out.exists() else []
        assert not trained, f"it trained before failing: {trained}"
    else:
        assert rc == 1, captured.out
        assert "medcl: error" not in captured.err and "no problems found" not in captured.out
        lines = captured.out.splitlines()
        head = next(i for i, ln in enumerate(lines) if ln.endswith("case(s) affected):"))
        problems = lines[head + 1:]
        assert problems and all(ln.startswith(f"  {inp}") for ln in problems), problems
        assert any(all(n in ln for n in needles) for ln in problems), (needles, problems)


def test_catalogue_is_large_enough():
    assert len(CASES) >= 12 and len({name for name, _ in CASES}) == len(CASES)
