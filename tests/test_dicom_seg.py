"""DICOM-SEG output (issue 19): a label volume on a DICOM series' grid written as a DICOM Segmentation
(:mod:`medcl.io.dicom_seg`) and ``medcl predict --format dicom-seg``.

The geometry tests define an asymmetric, slice-varying label pattern as a function of the *patient position*
(LPS mm). The labels handed to the writer are computed from medcl's reading of the series (its affine); each frame of
the written SEG is then checked against the pattern computed from the geometry of the source file that the frame
references (that file's ImagePositionPatient / ImageOrientationPatient / PixelSpacing, read independently with
pydicom). A row, column or slice flip, or a frame that references the wrong source slice, changes the pattern."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from medcl.cli import main
from medcl.core.errors import MedclDataError
from medcl.core.geometry import Volume, lps_to_ras
from medcl.data import write_phantom_dataset
from medcl.io import read_volume
from medcl.io.dicom_seg import series_slices, write_dicom_seg

NAMES = {0: "background", 1: "liver", 2: "kidneys", 3: "bladder"}  # 3 stays empty
VOXEL = 160.0 / 24  # the CT phantoms' voxel size (mm)


# ---- the pattern ------------------------------------------------------------------------------------------------
def _pattern(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Labels of LPS points ``[..., 3]`` inside the box ``lo..hi``: 1 = a box whose right edge moves with z, on the
    lower 60 % of the slices; 2 = a wedge in the upper rows of the upper 70 %; 3 nowhere. No mirror symmetry."""
    u = (points - lo) / (hi - lo)
    x, y, z = u[..., 0], u[..., 1], u[..., 2]
    out = np.zeros(points.shape[:-1], dtype=np.uint8)
    out[(x > 0.1) & (x < 0.3 + 0.4 * z) & (y > 0.05) & (y < 0.35) & (z < 0.6)] = 1
    out[(x - 0.6 > 0.5 * (y - 0.5)) & (y > 0.5) & (z > 0.3)] = 2
    return out


def _source_grid(ds: Dataset) -> np.ndarray:
    """LPS position of every pixel ``[Rows, Columns, 3]`` of one source slice, from its own header."""
    ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    ps = np.asarray(ds.PixelSpacing, dtype=np.float64)
    r, c = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
    return ipp + c[..., None] * iop[:3] * ps[1] + r[..., None] * iop[3:] * ps[0]


def _sources(folder: Path) -> dict[str, Dataset]:
    """Source headers by SOPInstanceUID (the file meta's where the dataset's was blanked)."""
    out = {}
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out[str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)] = ds
    return out


def _bounds(sources: dict[str, Dataset]) -> tuple[np.ndarray, np.ndarray]:
    pts = np.concatenate([_source_grid(ds).reshape(-1, 3) for ds in sources.values()])
    return pts.min(axis=0), pts.max(axis=0)


def _labels_on_medcl_grid(image: Volume, lo: np.ndarray, hi: np.ndarray) -> Volume:
    """The pattern on medcl's grid of the series, through medcl's affine: ``[1, X, Y, Z]``."""
    shape = image.array.shape[1:]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    lps = lps_to_ras(image.affine)
    points = ijk @ lps[:3, :3].T + lps[:3, 3]
    return Volume(_pattern(points, lo, hi)[None], image.affine, "", {})


def _check_frames(path: Path, series: Path) -> tuple[int, int]:
    """Every frame of SEG ``path`` against the pattern on the geometry of the source it references; every
    (segment, slice) that holds the pattern has its frame. Returns (frames, sources referenced)."""
    sources = _sources(series)
    lo, hi = _bounds(sources)
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == SegmentationStorage and seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "kidneys", "bladder"]  # the empty one kept
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3]
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(sources)  # the whole source series
    first = next(iter(sources.values()))
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    seen = set()
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        src = sources[uid]
        assert np.allclose(np.asarray(fg.PlanePositionSequence[0].ImagePositionPatient, float),
                           np.asarray(src.ImagePositionPatient, float), atol=1e-3)
        expected = _pattern(_source_grid(src), lo, hi) == number
        assert np.array_equal(frames[i].astype(bool), expected), (i, number, uid)
        seen.add((number, uid))
    want = {(n, uid) for uid, ds in sources.items() for n in (1, 2, 3) if (_pattern(_source_grid(ds), lo, hi) == n).any()}
    assert seen == want and {n for n, _ in want} == {1, 2}
    return len(seen), len({u for _, u in seen})


def _check_highdicom(path: Path, series: Path) -> None:
    """highdicom reads it back: segments, and its own volume of the frames holds the pattern at its positions."""
    import highdicom as hd

    lo, hi = _bounds(_sources(series))
    seg = hd.seg.segread(path)
    assert seg.get_segment_numbers() == [1, 2, 3]
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == ["liver", "kidneys", "bladder"]
    vol = seg.get_volume(combine_segments=True)  # [slices, rows, cols], affine -> LPS
    arr = np.asarray(vol.array)
    for s in range(arr.shape[0]):
        r, c = np.meshgrid(np.arange(arr.shape[1]), np.arange(arr.shape[2]), indexing="ij")
        idx = np.stack([np.full_like(r, s), r, c], axis=-1).astype(np.float64)
        points = idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]
        assert np.array_equal(arr[s], _pattern(points, lo, hi)), s


# ---- a small oblique series written here (runs without the real data) -------------------------------------------
def _oblique_series(folder: Path, n: int = 7, rows: int = 18, cols: int = 14) -> Path:
    """An oblique CT series (rotated 25 degrees about z, tilted 10 about x) with anisotropic pixels; the files are
    named in reverse slice order so that the file order is not the slice order."""
    folder.mkdir(parents=True)
    a, b = np.deg2rad(25), np.deg2rad(10)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    normal = np.cross(row, col)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime, ds.StudyID = "Test^Case", "T1", "20240101", "1200", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array([12.0, -30.0, 40.0]) + 2.5 * k * normal]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = ["0.800000", "0.700000"]  # row spacing (between rows), column spacing
        if k:  # the first slice has none (type 2, yet left out by some exports)
            ds.SliceThickness = "2.5"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.PixelData = np.full((rows, cols), 1000 + k, dtype=np.int16).tobytes()
        ds.save_as(folder / f"im{n - k:03d}.dcm", enforce_file_format=True)
    return folder


def test_seg_of_an_oblique_series_references_each_slice_without_flips(tmp_path):
    series = _oblique_series(tmp_path / "series")
    image = read_volume(series)
    lo, hi = _bounds(_sources(series))
    out = write_dicom_seg(_labels_on_medcl_grid(image, lo, hi), series, tmp_path / "out" / "seg.dcm", NAMES)
    assert _check_frames(out, series)[1] >= 4
    _check_highdicom(out, series)
    seg = pydicom.dcmread(out)
    assert seg.StudyInstanceUID == pydicom.dcmread(next(series.iterdir())).StudyInstanceUID  # in the source study


@pytest.mark.parametrize("case", ["slices reversed", "rows flipped", "one slice less", "unnamed label"])
def test_labels_that_do_not_match_the_series_are_refused(case, tmp_path):
    series = _oblique_series(tmp_path / "series")
    image = read_volume(series)
    labels = _labels_on_medcl_grid(image, *_bounds(_sources(series)))
    arr, aff = labels.array, labels.affine.copy()
    if case == "slices reversed":  # the same voxels in the world, stored last slice first
        arr = arr[..., ::-1]
        aff[:3, 3] += aff[:3, 2] * (arr.shape[-1] - 1)
        aff[:3, 2] *= -1
        match = "slice 0 of the label volume lies at"
    elif case == "rows flipped":
        arr = arr[:, :, ::-1]
        aff[:3, 3] += aff[:3, 1] * (arr.shape[2] - 1)
        aff[:3, 1] *= -1
        match = "row / column axes are not the series'"
    elif case == "one slice less":
        arr = arr[..., :-1]
        match = "not a segmentation of this series"
    else:
        arr = np.where(arr == 2, 5, arr).astype(np.uint8)
        match = r"label values \[0, 1, 5\] do not match the classes"
    with pytest.raises(MedclDataError, match=match):
        write_dicom_seg(Volume(np.ascontiguousarray(arr), aff, "", {}), series, tmp_path / "seg.dcm", NAMES)
    assert not (tmp_path / "seg.dcm").exists()


def test_not_a_dicom_series_and_output_inside_the_series_are_refused(tmp_path):
    series = _oblique_series(tmp_path / "series")
    labels = _labels_on_medcl_grid(read_volume(series), *_bounds(_sources(series)))
    with pytest.raises(MedclDataError, match="inside the source DICOM folder"):
        write_dicom_seg(labels, series, series / "seg.dcm", NAMES)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "README.txt").write_text("not DICOM")
    with pytest.raises(MedclDataError, match="no DICOM image files found"):
        write_dicom_seg(labels, tmp_path / "text", tmp_path / "seg.dcm", NAMES)


# ---- the real CT series -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A DynUNet fine-tuned for a few steps on CT phantoms (classes background, liver, kidneys, bladder)."""
    root = tmp_path_factory.mktemp("dseg")
    data = write_phantom_dataset(root / "ph", n=2, size=24, seed=0, modality="ct")
    assert main(["finetune", "--data", str(data), "--out", str(root / "ft"), "--max-steps", "10", "--device", "cpu",
                 "--threads", "1", "backbone.filters=[8,16,32]", "backbone.strides=[1,2,2]",
                 "sampling.patch_size=[16,16,16]", "sampling.batch_size=2", "augment.affine_prob=0",
                 f"data.plan.spacing=[{VOXEL},{VOXEL},{VOXEL}]", "trainer.log_every=5"]) == 0
    return root / "ft"


def test_seg_on_the_real_ct_series_references_each_slice_without_flips(shared_data, tmp_path):
    series = shared_data / "dicom_ct" / "series"
    image = read_volume(series)
    lo, hi = _bounds(_sources(series))
    out = write_dicom_seg(_labels_on_medcl_grid(image, lo, hi), series, tmp_path / "seg.dcm", NAMES)
    n_frames, n_slices = _check_frames(out, series)
    assert n_slices == 20 and n_frames > 20  # both segments, on every slice of the pattern
    _check_highdicom(out, series)


def test_predict_format_dicom_seg_on_the_real_series(shared_data, model, tmp_path):
    series = shared_data / "dicom_ct" / "series"
    common = ["--ckpt", str(model), "--input", str(series), "--device", "cpu", "--threads", "1"]
    assert main(["predict", *common, "--output", str(tmp_path / "seg"), "--format", "dicom-seg"]) == 0
    assert main(["predict", *common, "--output", str(tmp_path / "nii")]) == 0
    nifti = np.asarray(nib.load(str(tmp_path / "nii" / "series.nii.gz")).dataobj)  # [X, Y, Z], medcl's slice order
    seg = pydicom.dcmread(tmp_path / "seg" / "series.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "kidneys", "bladder"]  # every class, named
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 20
    # the SEG, back on medcl's grid, is the NIfTI prediction
    sources = _sources(series)
    order = {str(pydicom.dcmread(h.path, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID): k
             for k, h in enumerate(series_slices(series))}
    assert set(order) == set(sources)
    back = np.zeros_like(nifti)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        k = order[str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        back[:, :, k][frames[i].T.astype(bool)] = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    assert np.array_equal(back, nifti)


def test_predict_dicom_seg_refuses_an_input_that_is_not_a_dicom_series(model, tmp_path, capsys):
    data = write_phantom_dataset(tmp_path / "ph", n=1, size=24, seed=3, modality="ct")
    nifti = next((data / "imagesTr").iterdir())
    rc = main(["predict", "--ckpt", str(model), "--input", str(nifti), "--output", str(tmp_path / "o"), "--format",
               "dicom-seg", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert "--format dicom-seg needs a DICOM series as input" in err[0] and str(nifti) in err[0]
    assert not (tmp_path / "o").exists()
