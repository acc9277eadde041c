"""medcl.io: readers on real data (cross-checked against nibabel and SimpleITK), synthetic DICOM series
written with pydicom (ordering, positions, rescale, geometry against the DICOM standard's formula), every
bad-input case, and the NIfTI write/read round trip."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medcl.core.errors import MedclDataError
from medcl.core.geometry import Volume, affine_from_itk, lps_to_ras
from medcl.io import detect_format, list_dicom_series, read_volume, write_nifti

PATIENT_NAME = "Secret^Patient"
PATIENT_ID = "PID-998877"


# ----------------------------------------------------------------------------------------------------
# helpers


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _oblique_affine() -> np.ndarray:
    """Oblique, non-RAS (one flipped axis), anisotropic, entries not representable in float32."""
    aff = np.eye(4)
    aff[:3, :3] = _rotation(0.3, -0.2, 0.7) @ np.diag([0.7, -1.3, 2.9])
    aff[:3, 3] = [-12.345678901, 40.1, 7.77]
    return aff


def _write_slice(
    path: Path,
    pixels: np.ndarray,
    position,
    *,
    series_uid: str,
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    spacing=(0.7, 0.5),
    slope: float | None = None,
    intercept: float | None = None,
    modality: str = "CT",
    description: str = "synthetic",
    instance: int = 1,
) -> None:
    """One uncompressed DICOM slice, with patient fields filled in (they must never leak)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20200101", "120000", "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.PixelSpacing = [f"{v:.6f}" for v in spacing]
    ds.SliceThickness = "9.9"  # deliberately wrong: spacing must come from the positions
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if slope is not None:
        ds.RescaleSlope = f"{slope:g}"
    if intercept is not None:
        ds.RescaleIntercept = f"{intercept:g}"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _slice_pixels(k: int, rows: int, cols: int) -> np.ndarray:
    """Stored values that identify slice k, row r and column c."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return (100 * k + 10 * r + c).astype(np.int16)


def _write_series(
    folder: Path,
    n: int = 6,
    rows: int = 5,
    cols: int = 4,
    *,
    series_uid: str | None = None,
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    step: float = 2.5,
    origin=(10.0, -20.0, 30.0),
    skip: tuple[int, ...] = (),
    names=None,
    drift=(0.0, 0.0, 0.0),
    **kw,
) -> dict:
    """A series of n slices along the normal of ``orientation``; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    positions = {}
    for k in range(n):
        if k in skip:
            continue
        pos = np.asarray(origin) + k * (step * normal + np.asarray(drift))
        name = names[k] if names else f"slice_{k:03d}.dcm"
        _write_slice(
            folder / name,
            _slice_pixels(k, rows, cols),
            pos,
            series_uid=uid,
            orientation=orientation,
            instance=k + 1,
            **kw,
        )
        positions[k] = pos
    return {"uid": uid, "positions": positions, "iop": iop}


def _expect_error(match: str, path, **kw) -> MedclDataError:
    with pytest.raises(MedclDataError, match=match) as info:
        read_volume(path, **kw)
    err = info.value
    assert Path(err.path).name == Path(path).name or str(path) in str(err)
    return err


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


# ----------------------------------------------------------------------------------------------------
# real data


def test_hippocampus_nifti_matches_nibabel(shared_data):
    img_path = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    lab_path = shared_data / "hippocampus" / "labelsTr" / img_path.name
    vol = read_volume(img_path)
    ref = nib.load(str(img_path))
    assert vol.array.dtype == np.float32 and vol.array.shape == (1, *ref.shape)
    assert np.array_equal(vol.array[0], ref.get_fdata().astype(np.float32))
    assert np.array_equal(vol.affine, ref.affine)
    lab = read_volume(lab_path, is_label=True)
    assert np.issubdtype(lab.array.dtype, np.integer) and lab.array.shape == vol.array.shape
    assert set(np.unique(lab.array).tolist()) <= {0, 1, 2} and lab.array.max() > 0


def test_ct_series_geometry_values_and_simpleitk_agreement(shared_data):
    folder = shared_data / "dicom_ct" / "series"
    vol = read_volume(folder)
    assert vol.shape == (512, 512, 20) and vol.channels == 1 and vol.array.dtype == np.float32
    assert np.allclose(vol.spacing, [0.977, 0.977, 2.0], atol=0.01)  # SliceThickness says 3 mm
    hu = vol.array
    assert hu.min() in (-1024.0, -2048.0) and hu.max() > 1000
    assert (hu < -900).mean() > 0.05  # air around the body
    assert ((hu > -100) & (hu < 100)).mean() > 0.05  # soft tissue
    assert vol.meta["modality"] == "CT" and vol.meta["rescale_applied"] is True
    assert vol.meta["rescale_intercept"] == -1024.0

    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    ref = reader.Execute()
    ref_affine = affine_from_itk(ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection())
    assert np.allclose(vol.affine, ref_affine, atol=1e-6)
    # same voxels in the same order (SimpleITK's array is [Z, Y, X])
    assert np.array_equal(vol.array[0], np.transpose(sitk.GetArrayViewFromImage(ref), (2, 1, 0)))
    # a single slice's path reads the whole series it belongs to
    one = read_volume(sorted(folder.iterdir())[3])
    assert one.shape == vol.shape and np.array_equal(one.affine, vol.affine)
    assert list_dicom_series(folder) == [
        {"series_uid": "", "n_files": 20, "modality": "CT", "description": "CT Body 3.0"}
    ]


def test_nrrd_brain_and_mask(shared_data):
    vol = read_volume(shared_data / "nrrd" / "brain1_image.nrrd")
    assert vol.shape == (256, 256, 25)
    assert np.allclose(vol.spacing, [0.78, 0.78, 6.5], atol=0.01)
    ref = sitk.ReadImage(str(shared_data / "nrrd" / "brain1_image.nrrd"))
    assert np.allclose(vol.affine, affine_from_itk(ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection()))
    mask = read_volume(shared_data / "nrrd" / "brain1_label.nrrd", is_label=True)
    assert np.issubdtype(mask.array.dtype, np.integer) and set(np.unique(mask.array).tolist()) == {0, 1}
    assert mask.shape == vol.shape and np.allclose(mask.affine, vol.affine)


# ----------------------------------------------------------------------------------------------------
# synthetic DICOM


def test_dicom_series_shuffled_without_extension_round_trips(tmp_path):
    n, rows, cols = 7, 5, 4
    iop = np.concatenate([_rotation(0.2, 0.1, -0.3)[:, 0], _rotation(0.2, 0.1, -0.3)[:, 1]])
    names = [f"IMG{v}" for v in random.Random(0).sample(range(1000, 9999), n)]  # no extension, shuffled
    folder = tmp_path / "series"
    written = _write_series(
        folder,
        n,
        rows,
        cols,
        orientation=iop,
        step=1.7,
        names=names,
        slope=2.0,
        intercept=-100.0,
        spacing=(0.7, 0.5),
    )
    (folder / "README.txt").write_text("not dicom\n")
    (folder / "notes").write_bytes(b"\x00\x01junk without extension")
    vol = read_volume(folder)

    assert vol.shape == (cols, rows, n) and vol.array.dtype == np.float32
    expected = np.stack([_slice_pixels(k, rows, cols).T for k in range(n)], axis=-1) * 2.0 - 100.0
    assert np.array_equal(vol.array[0], expected)
    assert np.allclose(vol.spacing, [0.5, 0.7, 1.7])
    # DICOM PS3.3 C.7.6.2.1.1: P(r, c) = IPP + c * col_spacing * row_cosine + r * row_spacing * col_cosine
    for k, ipp in written["positions"].items():
        for r, c in [(0, 0), (rows - 1, 0), (2, cols - 1)]:
            lps = ipp + c * 0.5 * iop[:3] + r * 0.7 * iop[3:]
            world = vol.affine @ np.array([c, r, k, 1.0])
            assert np.allclose(world[:3], lps_to_ras(np.append(lps, 1.0))[:3], atol=1e-4)
    assert vol.meta["rescale_applied"] is True and vol.meta["ignored_files"] == 2
    assert vol.meta["series_uid"] == written["uid"] and vol.meta["slice_spacing_mm"] == pytest.approx(
        1.7, abs=1e-4
    )
    assert PATIENT_NAME not in repr(vol.meta) and PATIENT_ID not in repr(vol.meta)

    # an independent reader agrees on the geometry
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    assert np.allclose(
        vol.affine, affine_from_itk(ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection()), atol=1e-4
    )


def test_dicom_without_preamble_is_read(tmp_path):
    written = _write_series(tmp_path / "raw", 3)
    for f in sorted((tmp_path / "raw").iterdir()):
        ds = dcmread(f)
        ds.preamble = None  # a bare DICOM stream, as some old exporters write it, and no extension
        ds.save_as(f.with_suffix(""), enforce_file_format=False)
        f.unlink()
    assert detect_format(tmp_path / "raw" / "slice_001") == "dicom"
    vol = read_volume(tmp_path / "raw")
    assert vol.shape == (4, 5, 3) and vol.array[0, 1, 2, 2] == 200 + 20 + 1
    assert np.allclose(vol.affine[:3, 3], lps_to_ras(np.append(written["positions"][0], 1.0))[:3])


def test_dicom_media_layout_with_dicomdir(tmp_path):
    """A CD/PACS export: DICOMDIR at the top, slices in PT*/ST*/SE* folders, named IM* without extension."""
    _write_series(tmp_path / "flat", 4)
    fileset = FileSet()
    for f in sorted((tmp_path / "flat").iterdir()):
        fileset.add(dcmread(f))
    fileset.write(tmp_path / "cd")
    assert (tmp_path / "cd" / "DICOMDIR").is_file()
    vol = read_volume(tmp_path / "cd")
    assert vol.shape == (4, 5, 4) and vol.meta["ignored_files"] == 1
    assert np.array_equal(vol.array, read_volume(tmp_path / "flat").array)


def test_dicom_label_keeps_integer_dtype(tmp_path):
    _write_series(tmp_path / "s", 4)
    lab = read_volume(tmp_path / "s", is_label=True)
    assert lab.array.dtype == np.int16 and lab.array[0, 3, 4, 2] == 200 + 40 + 3


def test_dicom_gap_names_folder_and_place(tmp_path):
    _write_series(tmp_path / "gap", 8, skip=(4,), step=2.0)
    err = _expect_error("missing slice", tmp_path / "gap")
    assert "slice_003.dcm" in err.problem and "slice_005.dcm" in err.problem and "4.000" in err.problem


def test_dicom_gap_among_three_slices(tmp_path):
    _write_series(tmp_path / "three", 4, skip=(2,), step=2.0)  # steps 2 and 4: the median alone hides it
    _expect_error("missing slice", tmp_path / "three")


def test_dicom_gantry_tilt_keeps_true_positions(tmp_path):
    rows, cols = 5, 4
    # positions drift 0.4 mm along the column direction per slice (tilted gantry), 2 mm along the normal
    written = _write_series(
        tmp_path / "tilt", 5, rows, cols, step=2.0, drift=(0.0, 0.4, 0.0), spacing=(0.7, 0.5)
    )
    vol = read_volume(tmp_path / "tilt")
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(np.degrees(np.arctan2(0.4, 2.0)), abs=1e-3)
    for k, ipp in written["positions"].items():
        lps = ipp + (cols - 1) * 0.5 * np.array([1.0, 0, 0]) + (rows - 1) * 0.7 * np.array([0, 1.0, 0])
        world = vol.affine @ np.array([cols - 1, rows - 1, k, 1.0])
        assert np.allclose(world[:3], lps_to_ras(np.append(lps, 1.0))[:3], atol=1e-4)


def test_dicom_irregular_spacing(tmp_path):
    folder = tmp_path / "irregular"
    folder.mkdir()
    for k, z in enumerate([0.0, 2.0, 4.0, 6.5, 8.5, 10.5]):  # one step of 2.5 mm among 2 mm steps
        _write_slice(folder / f"s{k}.dcm", _slice_pixels(k, 3, 3), (0.0, 0.0, z), series_uid="1.2.3")
    _expect_error("inconsistent slice spacing", folder)


@pytest.mark.parametrize(
    "field, kwargs, match",
    [
        (
            "orientation",
            {"orientation": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)},
            "inconsistent ImageOrientationPatient",
        ),
        ("spacing", {"spacing": (0.9, 0.5)}, "inconsistent PixelSpacing"),
        ("size", {}, "inconsistent Rows/Columns"),
    ],
)
def test_dicom_inconsistent_slices(tmp_path, field, kwargs, match):
    folder = tmp_path / field
    written = _write_series(folder, 5, rows=4, cols=4)
    pixels = _slice_pixels(9, 6, 4) if field == "size" else _slice_pixels(9, 4, 4)
    # overwrite slice 2 with a slice that disagrees in one field (same position along z)
    _write_slice(
        folder / "slice_002.dcm", pixels, written["positions"][2], series_uid=written["uid"], **kwargs
    )
    _expect_error(match, folder)


def test_dicom_mixed_series_lists_series_and_selects(tmp_path):
    folder = tmp_path / "mixed"
    a = _write_series(folder / "a", 3, modality="CT", description="venous")
    b = _write_series(folder / "b", 4, modality="MR", description="T1 axial")
    err = _expect_error("mixed series", folder)
    for text in (a["uid"], b["uid"], "3 files", "4 files", "CT", "MR", "venous", "T1 axial"):
        assert text in err.problem
    assert PATIENT_NAME not in str(err) and PATIENT_ID not in str(err)
    assert {(s["series_uid"], s["n_files"]) for s in list_dicom_series(folder)} == {
        (a["uid"], 3),
        (b["uid"], 4),
    }
    assert read_volume(folder, series_uid=b["uid"]).shape == (4, 5, 4)
    _expect_error("not found", folder, series_uid="9.9.9")


def test_dicom_single_slice_empty_folder_and_truncated_pixels(tmp_path):
    _write_series(tmp_path / "one", 1)
    _expect_error("not a 3D volume", tmp_path / "one")
    (tmp_path / "nodicom").mkdir()
    (tmp_path / "nodicom" / "a.txt").write_text("hello")
    _expect_error("no DICOM image files", tmp_path / "nodicom")
    _write_series(tmp_path / "multi", 2)
    frames = tmp_path / "multi" / "slice_000.dcm"
    ds = dcmread(frames)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(frames)
    _expect_error("multi-frame DICOM", tmp_path / "multi")
    _write_series(tmp_path / "cut", 3, rows=16, cols=16)
    victim = tmp_path / "cut" / "slice_001.dcm"
    victim.write_bytes(victim.read_bytes()[:-200])
    with pytest.raises(MedclDataError, match="slice_001.dcm") as info:
        read_volume(tmp_path / "cut")
    assert "DICOM" in info.value.problem


def _set_rescale(path: Path, **values: str) -> None:
    """Rewrite RescaleSlope / RescaleIntercept of one written slice (values as the DS strings to store)."""
    import warnings

    ds = dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about 'nan' / 'inf', which is what the test wants
        for key, value in values.items():
            setattr(ds, key, value)
    ds.save_as(path)


def test_dicom_rescale_per_slice_is_applied_per_slice(tmp_path):
    """Different slopes / intercepts per slice are legal DICOM and must be applied slice by slice."""
    _write_series(tmp_path / "s", 4, rows=4, cols=4, slope=1.0, intercept=0.0)
    _set_rescale(tmp_path / "s" / "slice_001.dcm", RescaleSlope="2", RescaleIntercept="-1024")
    _set_rescale(tmp_path / "s" / "slice_003.dcm", RescaleSlope="0.5", RescaleIntercept="10")
    vol = read_volume(tmp_path / "s")
    for k, (slope, intercept) in enumerate([(1, 0), (2, -1024), (1, 0), (0.5, 10)]):
        assert np.array_equal(vol.array[0, :, :, k], _slice_pixels(k, 4, 4).T * slope + intercept), k
    assert vol.meta["rescale_slope"] == "per slice" and vol.meta["rescale_intercept"] == "per slice"


@pytest.mark.parametrize(
    "values,words",
    [
        ({"RescaleSlope": "0"}, "RescaleSlope 0"),
        ({"RescaleSlope": "nan"}, "RescaleSlope nan"),
        ({"RescaleSlope": "-inf"}, "RescaleSlope -inf"),
        ({"RescaleIntercept": "inf"}, "RescaleIntercept inf"),
    ],
    ids=["slope0", "slope_nan", "slope_inf", "intercept_inf"],
)
def test_dicom_zero_or_non_finite_rescale_names_the_slice(tmp_path, values, words):
    _write_series(tmp_path / "s", 4, rows=4, cols=4, slope=2.0, intercept=-5.0)
    _set_rescale(tmp_path / "s" / "slice_002.dcm", **values)
    for kw in ({}, {"is_label": True}):
        with pytest.raises(MedclDataError) as info:
            read_volume(tmp_path / "s", **kw)
        assert info.value.path.endswith("slice_002.dcm") and words in info.value.problem, info.value


# ----------------------------------------------------------------------------------------------------
# NIfTI and ITK files: bad input


def test_missing_empty_unsupported(tmp_path):
    _expect_error("does not exist", tmp_path / "nope.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _expect_error("empty file", tmp_path / "empty.nii.gz")
    for name in ("image.png", "notes.txt", "blob"):
        (tmp_path / name).write_bytes(b"\x89PNG....")
        _expect_error("unsupported format", tmp_path / name)
        with pytest.raises(MedclDataError, match="unsupported format"):
            detect_format(tmp_path / name)
    assert detect_format(_nifti(tmp_path / "ok.nii", np.zeros((3, 3, 3), np.float32))) == "nifti"
    assert detect_format(tmp_path) == "dicom"


def test_unreadable_and_truncated_files(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "random.nii").write_bytes(rng.bytes(4096))
    _expect_error("unreadable NIfTI", tmp_path / "random.nii")
    good = _nifti(tmp_path / "good.nii.gz", rng.random((20, 20, 20)).astype(np.float32))
    raw = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    _expect_error("unreadable or truncated NIfTI", tmp_path / "cut.nii.gz")
    plain = gzip.decompress(raw)
    (tmp_path / "cut.nii").write_bytes(plain[: len(plain) // 2])
    _expect_error("unreadable or truncated NIfTI", tmp_path / "cut.nii")
    (tmp_path / "random.nrrd").write_bytes(rng.bytes(2048))
    _expect_error("unreadable NRRD", tmp_path / "random.nrrd")
    img = sitk.GetImageFromArray(rng.random((8, 9, 10)).astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "full.mha"), useCompression=False)
    data = (tmp_path / "full.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(data[: len(data) - 1000])
    _expect_error("unreadable or truncated MetaImage", tmp_path / "cut.mha")


def test_not_3d_channels_non_finite(tmp_path):
    _expect_error(
        r"not a 3D volume: the image is 2D", _nifti(tmp_path / "flat.nii.gz", np.zeros((8, 9), np.float32))
    )
    _expect_error(
        r"fewer than 2 voxels along axis 2", _nifti(tmp_path / "slab.nii.gz", np.zeros((8, 9, 1), np.float32))
    )
    four = np.arange(5 * 6 * 7 * 3, dtype=np.float32).reshape(5, 6, 7, 3)
    _expect_error("has 3 channels", _nifti(tmp_path / "msd.nii.gz", four))
    vol = read_volume(tmp_path / "msd.nii.gz", allow_multichannel=True)
    assert vol.array.shape == (3, 5, 6, 7) and np.array_equal(vol.array[2], four[..., 2])
    _expect_error(
        "label volume must have 1 channel", tmp_path / "msd.nii.gz", is_label=True, allow_multichannel=True
    )
    for bad in (np.nan, np.inf):
        data = np.ones((4, 4, 4), np.float32)
        data[1, 2, 3] = bad
        _expect_error("1 non-finite voxel", _nifti(tmp_path / f"bad_{bad}.nii.gz", data))


def test_label_reading(tmp_path):
    data = np.zeros((6, 6, 6), np.float32)
    data[1:3] = 2.0
    lab = read_volume(_nifti(tmp_path / "float_label.nii.gz", data), is_label=True)
    assert lab.array.dtype == np.uint8 and np.array_equal(lab.array[0], data.astype(np.uint8))
    big = np.zeros((6, 6, 6), np.int32)
    big[0, 0, 0] = -3
    big[1, 1, 1] = 70000
    assert read_volume(_nifti(tmp_path / "int.nii.gz", big), is_label=True).array.dtype == np.int32
    data[0, 0, 0] = 0.5
    _expect_error(
        r"label values are not integers .*0\.5", _nifti(tmp_path / "soft.nii.gz", data), is_label=True
    )


def test_itk_vector_image_geometry(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.random((4, 5, 6, 2)).astype(np.float32)  # SimpleITK order [Z, Y, X, C]
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.SetSpacing((0.6, 1.1, 2.4))
    img.SetOrigin((5.0, -3.0, 12.0))
    img.SetDirection(tuple(_rotation(0.1, 0.4, -0.2).ravel()))
    sitk.WriteImage(img, str(tmp_path / "vec.mha"))
    _expect_error("has 2 channels", tmp_path / "vec.mha")
    vol = read_volume(tmp_path / "vec.mha", allow_multichannel=True)
    assert vol.array.shape == (2, 6, 5, 4) and np.array_equal(vol.array, np.transpose(arr, (3, 2, 1, 0)))
    for idx in [(0, 0, 0), (5, 0, 3), (2, 4, 1)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(idx))
        assert np.allclose(vol.affine @ np.array([*idx, 1.0]), lps_to_ras(np.append(lps, 1.0)), atol=1e-9)
    # ITK writes vector pixels to NIfTI as 5D [X, Y, Z, 1, C]: the same channels and geometry come back
    sitk.WriteImage(img, str(tmp_path / "vec.nii.gz"))
    nii = read_volume(tmp_path / "vec.nii.gz", allow_multichannel=True)
    assert np.array_equal(nii.array, vol.array) and np.allclose(nii.affine, vol.affine, atol=1e-4)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 7), np.float32)), str(tmp_path / "flat.nrrd"))
    _expect_error("not a 3D volume: the image is 2D", tmp_path / "flat.nrrd")


# ----------------------------------------------------------------------------------------------------
# NIfTI writing


def test_nifti_round_trip_is_exact(tmp_path):
    affine = _oblique_affine()
    assert not np.array_equal(affine.astype(np.float32).astype(np.float64), affine)  # float32 would round
    rng = np.random.default_rng(2)
    image = Volume(rng.normal(size=(2, 7, 6, 5)).astype(np.float32), affine)
    path = tmp_path / "img.nii.gz"
    write_nifti(image, path)
    back = read_volume(path, allow_multichannel=True)
    assert np.array_equal(back.array, image.array) and np.array_equal(back.affine, affine)
    assert back.meta["nifti_version"] == 1

    label = Volume(rng.integers(0, 4, size=(1, 7, 6, 5)).astype(np.int16), affine)
    write_nifti(label, tmp_path / "lab.nii")
    lab = read_volume(tmp_path / "lab.nii", is_label=True)
    assert lab.array.dtype == np.int16 and np.array_equal(lab.array, label.array)
    assert np.array_equal(lab.affine, affine)
    hdr = nib.load(str(tmp_path / "lab.nii")).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    assert np.allclose(hdr.get_qform(), affine, atol=1e-4)  # the quaternion agrees with the sform

    # an independent reader sees the same geometry and voxels
    ref = sitk.ReadImage(str(tmp_path / "lab.nii"))
    assert np.allclose(
        affine_from_itk(ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection()), affine, atol=1e-4
    )
    assert np.array_equal(np.transpose(sitk.GetArrayViewFromImage(ref), (2, 1, 0)), label.array[0])


def test_nifti_exact_copy_ignored_when_sform_edited_elsewhere_and_shear_kept(tmp_path):
    affine = _oblique_affine()
    write_nifti(Volume(np.zeros((1, 4, 4, 4), np.float32), affine), tmp_path / "a.nii.gz")
    img = nib.load(str(tmp_path / "a.nii.gz"))
    moved = img.affine.copy()
    moved[:3, 3] += [5.0, 0.0, -2.0]
    img.set_sform(moved, code=1)  # another tool re-positions the file; the extension travels along
    nib.save(img, str(tmp_path / "b.nii.gz"))
    back = read_volume(tmp_path / "b.nii.gz")
    assert np.allclose(back.affine, moved, atol=1e-5) and back.meta["affine_source"] == "sform"

    sheared = np.array([[1.0, 0.3, 0.0, 1.0], [0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 2.0, 3.0], [0, 0, 0, 1.0]])
    write_nifti(Volume(np.zeros((1, 4, 4, 4), np.float32), sheared), tmp_path / "s.nii.gz")
    assert np.array_equal(read_volume(tmp_path / "s.nii.gz").affine, sheared)
    assert int(nib.load(str(tmp_path / "s.nii.gz")).header["qform_code"]) == 0  # a quaternion cannot shear


def _sform_qform_file(path: Path, shift=(0.0, 0.0, 3.0)) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI whose sform (code 1) is ``shift`` mm off its qform (code 1): what a registration tool that updates
    only the sform leaves behind."""
    qform = np.diag([1.0, 1.0, 2.0, 1.0])
    qform[:3, 3] = [-4.0, 5.0, 6.0]
    sform = qform.copy()
    sform[:3, 3] += shift
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), None)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=1)
    nib.save(img, str(path))
    return sform, qform


def test_nifti_sform_qform_disagreement_is_read_with_the_sform_and_recorded(tmp_path):
    sform, qform = _sform_qform_file(tmp_path / "two.nii.gz")
    vol = read_volume(tmp_path / "two.nii.gz")  # not refused: nibabel's (and medcl's) choice is deterministic
    assert np.allclose(vol.affine, sform) and vol.meta["affine_source"] == "sform"
    assert vol.meta["sform_qform_diff_mm"] == pytest.approx(3.0, abs=1e-4)
    assert "qform" in vol.meta["transform_warning"] and "3 mm" in vol.meta["transform_warning"]
    # agreeing transforms (what write_nifti stores, float32 quaternion included) carry no warning
    write_nifti(Volume(np.zeros((1, 4, 4, 4), np.float32), _oblique_affine()), tmp_path / "ok.nii.gz")
    ok = read_volume(tmp_path / "ok.nii.gz")
    assert ok.meta["sform_qform_diff_mm"] < 1e-3 and "transform_warning" not in ok.meta
    # only one transform set: nothing to compare
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    img.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "one.nii.gz"))
    assert "sform_qform_diff_mm" not in read_volume(tmp_path / "one.nii.gz").meta


def test_write_nifti_stores_int64_and_bool_compactly(tmp_path):
    affine = _oblique_affine()
    labels = np.zeros((1, 5, 5, 5), np.int64)
    labels[0, 1:3, 2:4, 0:2] = 7
    write_nifti(Volume(labels, affine), tmp_path / "argmax.nii.gz")
    back = read_volume(tmp_path / "argmax.nii.gz", is_label=True)
    assert back.array.dtype == np.uint8 and np.array_equal(back.array, labels)
    write_nifti(Volume(labels > 0, affine), tmp_path / "mask.nii.gz")
    assert np.array_equal(
        read_volume(tmp_path / "mask.nii.gz", is_label=True).array, (labels > 0).astype(np.uint8)
    )


def test_write_nifti_refuses_bad_input(tmp_path):
    vol = Volume(np.zeros((1, 3, 3, 3), np.float32), np.eye(4))
    with pytest.raises(MedclDataError, match=r"\.nii or \.nii\.gz"):
        write_nifti(vol, tmp_path / "x.png")
    with pytest.raises(MedclDataError, match=r"\[C, X, Y, Z\]"):
        write_nifti(Volume(np.zeros((3, 3, 3), np.float32), np.eye(4)), tmp_path / "x.nii")
    with pytest.raises(MedclDataError, match="invertible"):
        write_nifti(Volume(vol.array, np.zeros((4, 4))), tmp_path / "x.nii")
