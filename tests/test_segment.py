"""medcl.segment building blocks: the masked Dice + CE loss (against MONAI and a slow reference), sparse labels,
mixup, metrics against known answers, class-balanced patches, fine-tuning modes, config resolution."""

from __future__ import annotations

import itertools
import math

import monai  # noqa: F401  (imported once per session)
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from medcl.core.errors import MedclConfigError
from medcl.data import Case, Manifest
from medcl.segment.loss import MaskedDiceCELoss, mixup, one_hot_with_ignore
from medcl.segment.metrics import case_metrics

# ------------------------------------------------------------------------------------------------ loss


def _reference_loss(logits, label, k, ignore, include_background, batch, smooth=1e-5):
    """Slow Dice + CE over the non-ignored voxels, with Python loops."""
    b = logits.shape[0]
    p = torch.softmax(logits.double(), dim=1)
    vox = list(itertools.product(*[range(s) for s in logits.shape[2:]]))
    ce_sum, n_valid = 0.0, 0
    inter: dict = {}
    psum: dict = {}
    tsum: dict = {}
    for i in range(b):
        for v in vox:
            y = int(label[(i, 0, *v)])
            if ignore is not None and y == ignore:
                continue
            n_valid += 1
            ce_sum -= math.log(float(p[(i, y, *v)]))
            for c in range(k):
                key = (0 if batch else i, c)
                pc = float(p[(i, c, *v)])
                inter[key] = inter.get(key, 0.0) + pc * (y == c)
                psum[key] = psum.get(key, 0.0) + pc
                tsum[key] = tsum.get(key, 0.0) + (y == c)
    classes = range(0 if include_background else 1, k)
    dices = [1 - (2 * inter.get((s, c), 0) + smooth) / (psum.get((s, c), 0) + tsum.get((s, c), 0) + smooth)
             for s in range(1 if batch else b) for c in classes]
    return sum(dices) / len(dices) + ce_sum / n_valid


@pytest.mark.parametrize("include_background,batch", [(False, True), (True, False), (False, False)])
def test_loss_equals_monai_dicece_and_slow_reference(include_background, batch):
    g = torch.Generator().manual_seed(0)
    k = 3
    logits = torch.randn(2, k, 4, 3, 5, generator=g)
    label = torch.randint(0, k, (2, 1, 4, 3, 5), generator=g)
    ours = MaskedDiceCELoss(include_background=include_background, batch_dice=batch)
    target, valid = one_hot_with_ignore(label, k, None)
    monai_loss = DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True, batch=batch)
    assert torch.allclose(ours(logits, target, valid)[0], monai_loss(logits, label), atol=1e-5)
    # with an ignore label (255) on a third of the voxels: the slow reference over the others
    sparse = label.clone()
    sparse[torch.rand(label.shape, generator=g) < 0.33] = 255
    t2, v2 = one_hot_with_ignore(sparse, k, 255)
    ref = _reference_loss(logits, sparse, k, 255, include_background, batch)
    assert abs(float(ours(logits, t2, v2)[0]) - ref) < 1e-5


def test_ignored_voxels_get_zero_gradient_and_do_not_change_the_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, 6, 6, generator=g, requires_grad=True)
    label = torch.randint(0, 4, (2, 1, 6, 6, 6), generator=g)
    label[:, :, :3] = 255  # half of every volume unlabelled (a few annotated slices)
    target, valid = one_hot_with_ignore(label, 4, 255)
    loss = MaskedDiceCELoss()(logits, target, valid)[0]
    loss.backward()
    ignored = (label == 255).expand_as(logits)
    assert float(logits.grad[ignored].abs().max()) == 0.0
    assert float(logits.grad[~ignored].abs().max()) > 0.0
    other = logits.detach().clone()
    other[ignored] = torch.randn(int(ignored.sum()), generator=g) * 10
    assert torch.allclose(MaskedDiceCELoss()(other, target, valid)[0], loss.detach(), atol=1e-6)


def test_mixup_mixes_images_and_labels_with_the_same_weight():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 5, 5, 5, generator=g)
    label = torch.randint(0, 3, (4, 1, 5, 5, 5), generator=g)
    label[0, 0, 0] = 255
    t, v = one_hot_with_ignore(label, 3, 255)
    mx, mt, mv = mixup(x, t, v, np.random.default_rng(0), alpha=0.4)
    rng = np.random.default_rng(0)
    perm, lam = rng.permutation(4), rng.beta(0.4, 0.4, size=4)
    for i in range(4):
        assert torch.allclose(mx[i], lam[i] * x[i] + (1 - lam[i]) * x[perm[i]], atol=1e-6)
    sums = mt.sum(dim=1, keepdim=True)
    assert torch.allclose(sums[mv > 0], torch.ones_like(sums[mv > 0]), atol=1e-6)
    assert float(mt[(mv == 0).expand_as(mt)].abs().sum()) == 0.0
    assert int((mv == 0).sum()) >= int((label == 255).sum())  # ignored in either sample -> ignored


# --------------------------------------------------------------------------------------------- metrics


def test_metrics_against_known_answers():
    ref = np.zeros((20, 20, 20), dtype=np.int64)
    ref[4:12, 4:12, 4:12] = 1
    pred = np.zeros_like(ref)
    pred[6:14, 4:12, 4:12] = 1  # shifted by 2 voxels along i
    pred[0, 0, 0] = 3  # class 3: predicted, absent from the reference
    spacing = (1.5, 1.0, 2.0)
    rows = case_metrics(pred, ref, 4, spacing, nsd_tolerance_mm=3.0)
    by = {r["class"]: r for r in rows}
    assert by[1]["dice"] == pytest.approx(2 * 6 * 64 / (2 * 8 * 64))
    assert 0.0 < by[1]["hd95"] <= 3.0 + 1e-6  # the shift is 2 voxels x 1.5 mm
    assert by[1]["nsd"] == pytest.approx(1.0)  # every surface point within the 3 mm tolerance
    tight = {r["class"]: r for r in case_metrics(pred, ref, 4, spacing, nsd_tolerance_mm=1.0)}
    assert tight[1]["nsd"] < 1.0
    assert by[2]["dice"] == 1.0 and by[2]["hd95"] == 0.0 and by[2]["nsd"] == 1.0  # both empty
    assert by[3]["dice"] == 0.0 and math.isnan(by[3]["hd95"]) and by[3]["nsd"] == 0.0  # one empty
    # anisotropy counts: the same shift along k (2 mm voxels) gives a larger distance
    pred_k = np.zeros_like(ref)
    pred_k[4:12, 4:12, 6:14] = 1
    assert case_metrics(pred_k, ref, 2, spacing)[0]["hd95"] == pytest.approx(4.0, abs=1e-4)


# ------------------------------------------------------------------------------- patches and modes


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_class_balanced_patches_are_reproducible_and_skip_ignored_voxels():
    from medcl.segment.data import PatchStream

    label = torch.zeros(1, 30, 30, 30, dtype=torch.long)
    label[0, 20:23, 20:23, 20:23] = 1  # a tiny structure: 27 voxels of 27000
    label[0, :10] = 255  # unlabelled slab
    image = torch.randn(1, 30, 30, 30)
    stream = PatchStream(_Items([{"image": image, "label": label, "id": "a"}]), 2, (8, 8, 8), seed=3,
                         ignore_label=255)
    patches = [stream[p] for p in range(60)]
    assert all(p["image"].shape == (1, 8, 8, 8) and p["label"].shape == (1, 8, 8, 8) for p in patches)
    with_fg = sum(bool((p["label"] == 1).any()) for p in patches)
    assert 15 <= with_fg <= 45  # about half the centres are drawn from class 1, not 27/27000 of them
    # every centre is a labelled voxel: a patch is never entirely inside the ignored slab
    assert all(bool((p["label"] != 255).any()) for p in patches)
    again = PatchStream(_Items([{"image": image, "label": label, "id": "a"}]), 2, (8, 8, 8), seed=3,
                        ignore_label=255)
    assert torch.equal(again[17]["image"], patches[17]["image"])  # a pure function of (seed, position)
    small = PatchStream(_Items([{"image": image[:, :5, :6], "label": label[:, 10:15, :6], "id": "b"}]), 2,
                        (8, 8, 8), seed=0)
    assert small[0]["image"].shape == (1, 8, 8, 8)  # padded up to the patch


def test_frozen_and_warmup_modes_train_the_right_stages():
    from medcl.models import BackboneConfig, build_backbone
    from medcl.segment.config import FinetuneConfig
    from medcl.segment.module import SegmentationModule

    def run(mode: str, steps: int, warmup: int = 0):
        torch.manual_seed(0)
        net = build_backbone(BackboneConfig(in_channels=1, out_channels=2, filters=(4, 8, 16), strides=(1, 2, 2)))
        cfg = FinetuneConfig()
        cfg.optim.mode, cfg.optim.freeze_steps, cfg.optim.lr, cfg.trainer.max_steps = mode, warmup, 1e-2, steps
        m = SegmentationModule(net, cfg, 2, None, {})
        opt_cfg = m.configure_optimizers()
        opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
        x = torch.randn(2, 1, 8, 8, 8)
        y = (x > 0).long()
        snaps = []
        for step in range(steps):
            m._apply_freeze(m.encoder_frozen_at(step))
            opt.zero_grad()
            target, valid = one_hot_with_ignore(y, 2, None)
            m.loss_fn(net(x).logits, target, valid)[0].backward()
            opt.step()
            sched.step()
            snaps.append((net.encoder[0].conv1.conv.weight.detach().clone(), net.head.conv.conv.weight.detach().clone()))
        return snaps

    frozen = run("frozen", 3)
    assert torch.equal(frozen[0][0], frozen[-1][0]) and not torch.equal(frozen[0][1], frozen[-1][1])
    warm = run("warmup", 5, warmup=2)
    assert torch.equal(warm[0][0], warm[1][0])  # steps 0 and 1: encoder frozen
    assert not torch.equal(warm[1][0], warm[3][0])  # released at step 2
    full = run("full", 2)
    assert not torch.equal(full[0][0], full[1][0])


def test_labels_ignore_and_plan_resolution():
    from medcl.segment.prepare import finetune_config_from_dict, resolve_labels, resolve_plan

    m = Manifest(cases=[Case("a", ["a.nii.gz"], "la.nii.gz")], channel_names=["T1"],
                 labels={0: "background", 1: "tumour", 2: "ignore"}, kind="msd", root="/x", source="ds.json")
    info = resolve_labels(m, finetune_config_from_dict({}))
    assert (info.num_classes, info.ignore_label, info.names) == (2, 2, {0: "background", 1: "tumour"})
    info = resolve_labels(m, finetune_config_from_dict({"data": {"ignore_label": 255, "num_classes": 3}}))
    assert info.ignore_label == 255 and 255 in info.manifest.labels  # so that load_case accepts the value
    with pytest.raises(MedclConfigError, match="ignore_label"):
        resolve_labels(m, finetune_config_from_dict({"data": {"ignore_label": 1}}))
    # the checkpoint's plan is the base; config keys on top; channels and labels from the dataset
    cfg = finetune_config_from_dict({"data": {"plan": {"crop_foreground": True}}, "trainer": {"max_steps": 7}})
    assert cfg.trainer.max_steps == 7 and cfg.trainer.num_workers == 0  # a partial section keeps our defaults
    plan = resolve_plan(m, cfg, {"spacing": [1.0, 1.0, 2.0], "channel_names": ["MRI"]}, resolve_labels(m, cfg))
    assert plan.spacing == (1.0, 1.0, 2.0) and plan.crop_foreground and plan.channel_names == ["T1"]
    assert plan.labels == {0: "background", 1: "tumour"}
    with pytest.raises(MedclConfigError, match="optim.freeze_steps"):
        finetune_config_from_dict({"optim": {"mode": "warmup"}})
    with pytest.raises(MedclConfigError, match="optim.freeze_steps"):  # no silent no-op in mode full
        finetune_config_from_dict({"optim": {"mode": "full", "freeze_steps": 5}})
    with pytest.raises(MedclConfigError, match="init.load"):
        finetune_config_from_dict({"init": {"load": ["encoder", "heads"]}})
