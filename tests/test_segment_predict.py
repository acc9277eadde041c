"""Prediction in the original geometry: sliding window + TTA stitching, the inverse of the plan on an oblique,
anisotropic, non-cubic, non-RAS phantom (voxel for voxel), and a real DICOM series against SimpleITK."""

from __future__ import annotations

import monai  # noqa: F401  (imported once per session)
import numpy as np
import torch
from _geometry import oblique_affine

from medcl.core.geometry import Volume, affine_from_itk, orientation_from_affine, spacing_from_affine
from medcl.data import PreprocessingPlan, make_phantom
from medcl.segment.config import InferenceConfig
from medcl.segment.inference import mirror_flips, predict_probabilities
from medcl.segment.predict import predict_volume

STEP = 100.0  # the "image" encodes label k as intensity k * STEP




def nearest_level_logits(x: torch.Tensor, k: int = 4) -> torch.Tensor:
    """A pointwise 'model': logits peaked at the class whose level k * STEP is nearest to the intensity."""
    levels = torch.arange(k, dtype=x.dtype, device=x.device).view(1, k, 1, 1, 1) * STEP
    return -((x[:, :1] - levels) ** 2) / STEP


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_sliding_window_and_mirror_tta_stitch_exactly():
    x = torch.randint(0, 4, (1, 21, 18, 13)).float() * STEP  # not a multiple of the window anywhere
    ref = torch.softmax(nearest_level_logits(x[None]), dim=1)[0]
    for tta in (False, True):
        cfg = InferenceConfig(overlap=0.5, sw_batch_size=3, tta=tta)
        p = predict_probabilities(nearest_level_logits, x, cfg, (8, 8, 8))
        assert p.shape == (4, 21, 18, 13)
        assert torch.allclose(p, ref, atol=1e-5)  # a flip not undone would move every voxel
    assert len(mirror_flips([0, 1, 2])) == 8 and mirror_flips([1]) == [(), (3,)]

    # a position-dependent model: mirror TTA must equal the average of the flipped-back predictions
    def ramp(t: torch.Tensor) -> torch.Tensor:
        g = torch.linspace(-2, 2, t.shape[2]).view(1, 1, -1, 1, 1).expand(t.shape[0], 1, *t.shape[2:])
        return torch.cat([g, -g], dim=1)

    cfg = InferenceConfig(overlap=0.0, tta=True, mirror_axes=[0])
    y = torch.zeros(1, 8, 8, 8)
    p = predict_probabilities(ramp, y, cfg, (8, 8, 8))
    assert torch.allclose(p, torch.full_like(p, 0.5), atol=1e-5)  # the ramp and its mirror cancel


def test_predict_round_trip_oblique_non_ras_phantom_is_voxel_exact():
    shape = (30, 26, 20)
    aff = oblique_affine(shape)
    assert orientation_from_affine(aff) != "RAS" and len(set(np.round(spacing_from_affine(aff), 3))) == 3
    _, lab = make_phantom(5, shape, aff)
    image = Volume((lab.array.astype(np.float32) * STEP), aff)
    truth = lab.array[0].astype(np.int64)
    assert len(np.unique(truth)) == 4

    # reorientation + foreground crop: exact, so the prediction must equal the phantom's label everywhere
    plan = PreprocessingPlan(intensity=[{"scheme": "none"}], foreground="threshold", foreground_threshold=0.5 * STEP,
                             crop_foreground=True, crop_margin=1)
    probs = predict_volume(nearest_level_logits, image, plan, InferenceConfig(overlap=0.5), (16, 16, 16))
    assert probs.shape == (4, *shape)
    pred = probs.argmax(0).numpy()
    assert np.array_equal(pred, truth)

    # resampled to 2.5 mm isotropic and back. The image is now the one-hot label (4 channels), so linear
    # resampling of it behaves like that of probabilities; the organs must land on themselves
    onehot = Volume(np.eye(4, dtype=np.float32)[truth].transpose(3, 0, 1, 2).copy(), aff)
    plan2 = PreprocessingPlan(spacing=(2.5, 2.5, 2.5), intensity=[{"scheme": "none"}], foreground="all")
    probs2 = predict_volume(lambda x: 20.0 * x, onehot, plan2, InferenceConfig(), (16, 16, 16))
    pred2 = probs2.argmax(0).numpy()
    assert pred2.shape == shape
    for k in (1, 2, 3):
        assert _dice(pred2 == k, truth == k) > 0.9, k
    assert (pred2 == truth).mean() > 0.98


def test_predict_dicom_series_in_series_geometry(shared_data, tmp_path):
    import SimpleITK as sitk

    from medcl.io import read_volume
    from medcl.segment.predict import SegmentationModel, predict_to_folder

    series = shared_data / "dicom_ct" / "series"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    ref = reader.Execute()
    ref_aff = affine_from_itk(ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection())
    ref_hu = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)  # ITK z, y, x -> i, j, k

    plan = PreprocessingPlan(spacing=(4.0, 4.0, 4.0), intensity=[{"scheme": "ct"}], foreground="all",
                             channel_names=["CT"], labels={0: "background", 1: "body"})

    class Threshold(torch.nn.Module):  # body = above -150 HU, i.e. above 0.06 after the CT window
        in_channels = 1

        def forward(self, x):
            return torch.cat([torch.zeros_like(x), (x - 0.06) * 200.0], dim=1)

    model = SegmentationModel(Threshold(), plan, InferenceConfig(), (32, 32, 8), 2, {0: "background", 1: "body"},
                              {}, tmp_path)
    out = predict_to_folder(model, series, tmp_path / "pred")
    assert len(out) == 1
    pred = read_volume(out[0], is_label=True)
    assert pred.shape == tuple(ref.GetSize())
    assert np.allclose(pred.affine, ref_aff, atol=1e-4)
    body = ref_hu > -150
    assert _dice(pred.array[0] == 1, body) > 0.95
