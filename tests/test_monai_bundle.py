"""MONAI bundle export (issue 19): a fine-tuned model runs with ``python -I -m monai.bundle run`` in an interpreter
where medcl cannot be imported and segments an oblique, anisotropic, non-RAS CT phantom as ``medcl predict`` does;
the plan's MONAI transforms reproduce medcl's pipeline; plan steps without a MONAI equivalent are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
import venv
from pathlib import Path

import monai  # noqa: F401  (imported once per session)
import nibabel as nib
import numpy as np
import pytest
import torch

from medcl.cli import main
from medcl.core.errors import MedclDataError
from medcl.core.geometry import Volume
from medcl.data import PreprocessingPlan, make_phantom, write_phantom_dataset
from medcl.data.transforms import volume_to_metatensor
from medcl.segment.export import ExportOptions, run_export

VOXEL = 160.0 / 24  # the phantoms' voxel size (mm)
TRAIN = ["--device", "cpu", "--threads", "1", "backbone.filters=[8,16,32]", "backbone.strides=[1,2,2]",
         "sampling.patch_size=[16,16,16]", "sampling.batch_size=4", "augment.affine_prob=0", "inference.overlap=0.25",
         "trainer.log_every=20", f"data.plan.spacing=[{VOXEL},{VOXEL},{VOXEL}]", "data.plan.foreground=threshold",
         "data.plan.foreground_threshold=-500", "data.plan.crop_foreground=true", "optim.lr=1e-2"]


def _oblique(shape, spacing) -> np.ndarray:
    """Rotated 15 degrees about z, L-flipped (not RAS), anisotropic; float32-exact, so that nibabel (MONAI) and
    medcl read the same affine from the file."""
    a = np.deg2rad(15)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    m = rz @ np.diag(spacing) @ np.diag([-1.0, 1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = -m @ ((np.asarray(shape) - 1) / 2)
    return aff.astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DynUNet fine-tuned for 80 steps on CT phantoms: CT window, 6.7 mm spacing, crop at -500 HU."""
    root = tmp_path_factory.mktemp("bundle")
    data = write_phantom_dataset(root / "ph", n=4, size=24, seed=0, modality="ct")
    assert main(["finetune", "--data", str(data), "--out", str(root / "ft"), "--max-steps", "80", *TRAIN]) == 0
    return root / "ft"


def _monai_only_python(root: Path) -> Path:
    """An interpreter that sees this environment's packages except medcl (a venv whose site-packages links every
    entry of ours but medcl's, its editable-install hook included); ``-I`` keeps the cwd and PYTHON* out."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    exe = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    theirs = Path(subprocess.run([str(exe), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if "medcl" not in entry.name.lower() and not (theirs / entry.name).exists():
            (theirs / entry.name).symlink_to(entry.resolve())
    return exe


def _run(exe: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(exe), "-I", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=240)


def _run_bundle(exe: Path, *, cwd: Path, **args: str) -> subprocess.CompletedProcess:
    """``python -I -m monai.bundle run --KEY VALUE ...``, MONAI's command line, which needs ``fire`` (MONAI's
    ``fire`` extra). Where ``fire`` is not installed, the same ``monai.bundle.scripts.run`` it dispatches to is
    called with the same arguments, so the bundle itself is still run by MONAI alone."""
    if _run(exe, "-c", "import fire", cwd=cwd).returncode == 0:
        return _run(exe, "-m", "monai.bundle", "run", *[x for k, v in args.items() for x in (f"--{k}", v)], cwd=cwd)
    call = f"from monai.bundle.scripts import run; run(**{args!r})"
    return _run(exe, "-c", call, cwd=cwd)


def test_bundle_runs_in_monai_alone_and_matches_medcl_predict(trained, tmp_path):
    shape = (44, 38, 30)
    aff = _oblique(shape, (3.5, 4.0, 5.0))
    img, lab = make_phantom(1234, shape, aff, modality="ct")
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(img.array[0], aff), str(tmp_path / "in" / "subject.nii.gz"))

    bundle = tmp_path / "bundle"
    assert main(["export", "--ckpt", str(trained), "--format", "monai-bundle", "--out", str(bundle)]) == 0
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    inf = json.loads((bundle / "configs" / "inference.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "kidneys", "3": "bladder"}
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == meta["labels"]
    assert inf["network_def"]["_target_"] == "DynUNet" and inf["network_def"]["deep_supervision"] is False
    assert [t["_target_"] for t in inf["preprocessing"]["transforms"]] == [
        "LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd", "CropForegroundd", "ScaleIntensityRanged",
        "EnsureTyped"]

    exe = _monai_only_python(tmp_path / "venv")
    no_medcl = _run(exe, "-c", "import medcl", cwd=tmp_path)
    assert no_medcl.returncode != 0 and "No module named 'medcl'" in no_medcl.stderr
    run = _run_bundle(exe, config_file=str(bundle / "configs" / "inference.json"),
                      meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
                      dataset_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "monai"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]

    assert main(["predict", "--ckpt", str(trained), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "medcl"), "--device", "cpu", "--threads", "1"]) == 0
    theirs = nib.load(str(tmp_path / "monai" / "subject_seg.nii.gz"))
    ours = nib.load(str(tmp_path / "medcl" / "subject.nii.gz"))
    a, b = np.asarray(ours.dataobj), np.asarray(theirs.dataobj)
    assert a.shape == b.shape == shape
    assert np.allclose(theirs.affine, aff, atol=1e-4) and np.allclose(ours.affine, aff, atol=1e-4)
    assert (a == b).mean() >= 0.999, (a == b).mean()
    truth = lab.array[0]
    liver = 2 * ((b == 1) & (truth == 1)).sum() / ((b == 1).sum() + (truth == 1).sum())
    assert liver > 0.5, liver  # a real segmentation, in the right place: a flip or shift would break it


def _pipeline(transforms):
    from monai.bundle import ConfigParser

    return ConfigParser({"t": {"_target_": "Compose", "transforms": transforms[2:]}}).get_parsed_content("t")


@pytest.mark.parametrize("plan", [
    PreprocessingPlan(spacing=(2.5, 3.0, 2.0), intensity=[{"scheme": "ct"}], foreground="threshold",
                      foreground_threshold=-300.0, crop_foreground=True, crop_margin=1),
    PreprocessingPlan(orientation="LPI", intensity=[{"scheme": "none"}], foreground="nonzero", crop_foreground=True),
    PreprocessingPlan(spacing=(4.0, 4.0, 4.0), intensity=[{"scheme": "ct", "window": [-1000, 1000]}]),
])
def test_plan_as_monai_transforms_gives_medcl_pipeline_output(plan):
    from medcl.segment.export.monai_plan import preprocessing_transforms

    shape = (30, 26, 20)
    aff = _oblique(shape, (2.0, 2.2, 3.1))
    img, _ = make_phantom(7, shape, aff, modality="ct")
    vol = Volume(np.where(img.array < -600, 0.0, img.array).astype(np.float32), aff)  # zeros for "nonzero"
    ours = plan.transforms(("image",), load=False)({"image": volume_to_metatensor(vol)})["image"]
    x = volume_to_metatensor(vol)  # after LoadImaged + EnsureChannelFirstd: the same MetaTensor
    theirs = _pipeline(preprocessing_transforms(plan, 1))({"image": x})["image"]
    assert tuple(theirs.shape) == tuple(ours.shape)
    assert torch.allclose(theirs.affine.double(), ours.affine.double(), atol=1e-6)
    assert torch.allclose(theirs.as_tensor().float(), ours.as_tensor().float(), atol=1e-5)


def _variant(trained: Path, tmp: Path, **plan_changes) -> Path:
    obj = torch.load(trained / "model.pt", weights_only=True)
    rec = obj["medcl_record"]
    if "tta" in plan_changes:
        rec["config"]["inference"]["tta"] = plan_changes.pop("tta")
    rec["plan"].update(plan_changes)
    tmp.mkdir()
    torch.save(obj, tmp / "model.pt")
    return tmp / "model.pt"


def test_export_refuses_plan_steps_without_monai_equivalent(trained, tmp_path, capsys):
    mri = _variant(trained, tmp_path / "mri", intensity=[{"scheme": "mri"}])
    with pytest.raises(MedclDataError, match="plan step 'intensity: mri' has no MONAI transform equivalent"):
        run_export(mri, "monai-bundle", tmp_path / "b1")
    otsu = _variant(trained, tmp_path / "otsu", foreground="otsu")
    assert main(["export", "--ckpt", str(otsu), "--format", "monai-bundle", "--out", str(tmp_path / "b2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'crop_foreground' with 'foreground: otsu'" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "b2").exists()  # refused before anything is written
    tta = _variant(trained, tmp_path / "tta", tta=True)
    with pytest.raises(MedclDataError, match="pass tta=off"):
        run_export(tta, "monai-bundle", tmp_path / "b3")
    summary = run_export(tta, "monai-bundle", tmp_path / "b3", ExportOptions(extra={"tta": "off"}))
    assert summary["tta"] is False and (tmp_path / "b3" / "models" / "model.pt").is_file()
    with pytest.raises(Exception, match="unknown monai-bundle option"):
        run_export(tta, "monai-bundle", tmp_path / "b4", ExportOptions(extra={"mirror": "no"}))


def test_swinunetr_backbone_exports_to_monai_swinunetr_with_its_logits():
    from monai.networks.nets import SwinUNETR

    from medcl.models import BackboneConfig, build_backbone
    from medcl.segment.export.monai_bundle import monai_network

    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="swinunetr", in_channels=1, out_channels=3, feature_size=12,
                                             depths=(1, 1, 1, 1), use_v2=True))
    net, cfg, diff = monai_network(backbone, "test")
    assert isinstance(net, SwinUNETR) and cfg["use_v2"] is True and diff < 1e-4
    assert set(net.state_dict()) == set(SwinUNETR(**{k: v for k, v in cfg.items() if k != "_target_"}).state_dict())
