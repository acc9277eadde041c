"""Semi-supervised fine-tuning (medcl.segment.semi): the consistency term against a slow reference, the pasted
boxes, the ramp, and a 20-step run of configs/finetune/phantoms.yaml with semi.enabled=true: non-zero
consistency once the ramp starts, the teacher is the EMA of the student, no test case in the pool, and the pool's
label files are never read (garbage labels give a bit-identical run)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medcl.cli import main
from medcl.data import load_manifest, write_phantom_dataset
from medcl.data.splits import make_label_budget_split
from medcl.segment.config import StrongAugmentConfig
from medcl.segment.semi import consistency_loss, paste_boxes, rampup, strong_intensity

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


def test_consistency_loss_against_a_voxel_loop():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 3, 2, generator=g)
    p = torch.softmax(3 * torch.randn(2, 3, 4, 3, 2, generator=g), dim=1)
    box = torch.zeros(2, 1, 4, 3, 2, dtype=torch.bool)
    box[1, :, :2] = True
    bt = F.one_hot(torch.randint(0, 3, (2, 4, 3, 2), generator=g), 3).permute(0, 4, 1, 2, 3).float()
    loss, frac = consistency_loss(s, p, "pseudo", 0.8, box, bt)
    total, used, n = 0.0, 0, 0
    for b in range(2):
        for v in np.ndindex(4, 3, 2):
            idx = (b, slice(None), *v)
            target = bt[idx] if box[(b, 0, *v)] else p[idx]
            n += 1
            if float(target.max()) >= 0.8 or bool(box[(b, 0, *v)]):
                total += float(-torch.log_softmax(s[idx], 0)[int(target.argmax())])
                used += 1
    assert float(loss) == pytest.approx(total / n, rel=1e-5) and float(frac) == pytest.approx(used / n)
    mse, _ = consistency_loss(s, p, "mse", 0.0)
    assert float(mse) == pytest.approx(float(((torch.softmax(s, 1) - p) ** 2).mean()), rel=1e-6)


def test_paste_boxes_and_rampup():
    g = torch.Generator().manual_seed(1)
    u = torch.zeros(3, 1, 6, 6, 6)
    x = torch.ones(2, 1, 6, 6, 6)
    y = torch.zeros(2, 2, 6, 6, 6)
    y[:, 1] = 1
    mixed, box, target = paste_boxes(u, x, y, 1.0, 0.5, g)
    assert torch.equal(mixed.bool(), box) and box.sum(dim=(1, 2, 3, 4)).tolist() == [27, 27, 27]
    assert torch.equal(target[:, 1:].bool(), box) and not paste_boxes(u, x, y, 0.0, 0.5, g)[1].any()
    assert rampup(0, 100) == pytest.approx(math.exp(-5)) and rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert rampup(100, 100) == rampup(500, 100) == 1.0 and rampup(3, 0) == 1.0


def test_strong_intensity_keeps_geometry_and_is_seeded():
    x = torch.zeros(2, 1, 8, 8, 8)
    x[:, :, 2:6, 2:6, 2:6] = 1.0
    cfg = StrongAugmentConfig(prob=1.0, noise_std=0.0, blur_sigma=(0.5, 0.5))
    a = strong_intensity(x, cfg, torch.Generator().manual_seed(3))
    b = strong_intensity(x, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, x)
    # intensity only, monotone: the cube is still where it was (its centre above the far corner, in every patch)
    for b_ in range(2):
        assert a[b_, 0, 3:5, 3:5, 3:5].min() > a[b_, 0, 0:2, 0:2, 0:2].max()


@pytest.fixture(scope="module")
def semi_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("semi")
    data = write_phantom_dataset(root / "ph", n=8, size=24, seed=0)
    split = make_label_budget_split(load_manifest(data), [2], combinations=1, test=2, seed=0)
    split.save(root / "split.json")
    return root, data, split


def _run(data, split_file, out, extra=()):
    return main(["finetune", "--config", str(CONFIGS / "phantoms.yaml"), "--data", str(data), "--out", str(out),
                 "--split", str(split_file), "--labelled", "2", "--max-steps", "20", "--device", "cpu",
                 "semi.enabled=true", "semi.rampup_steps=5", "semi.threshold=0.5", "trainer.log_every=1",
                 "trainer.ckpt_every=0", *extra])


def test_semi_run_uses_the_pool_not_the_test_set_and_logs_its_terms(semi_ws):
    root, data, split = semi_ws
    assert _run(data, root / "split.json", root / "a") == 0
    record = json.loads((root / "a" / "record.json").read_text())
    unlabelled = record["extra"]["unlabelled_cases"]
    assert sorted(unlabelled) == sorted(split.pool) and not set(unlabelled) & set(split.test)
    import csv

    with open(root / "a" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("semi/consistency")]
    after = [r for r in rows if int(r["step"]) >= 1]
    assert after and all(float(r["semi/consistency"]) > 0 and float(r["semi/mask_fraction"]) > 0 for r in after)
    assert float(after[-1]["semi/weight"]) == pytest.approx(1.0)


def test_teacher_is_the_ema_of_the_student(semi_ws, tmp_path, monkeypatch):
    """After every optimiser step t (0-based): teacher = m_t * previous teacher + (1 - m_t) * student, parameter by
    parameter, with the mean teacher's warm-up m_t = min(1 - 1/(t+1), ema): the first step copies the student."""
    root, data, _ = semi_ws
    snaps: list[tuple[dict, dict]] = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            snaps.append(({k: v.detach().clone() for k, v in module.teacher.module.named_parameters()},
                          {k: v.detach().clone() for k, v in module.backbone.named_parameters()}))

    import medcl.engine.trainer as trainer_mod

    make = trainer_mod.make_trainer
    monkeypatch.setattr(trainer_mod, "make_trainer",
                        lambda *a, callbacks=None, **k: make(*a, callbacks=[*(callbacks or []), Snap()], **k))
    assert _run(data, root / "split.json", tmp_path / "ema", ["semi.ema=0.9"]) == 0
    assert len(snaps) == 20
    assert all(torch.equal(snaps[0][0][k], snaps[0][1][k]) for k in snaps[0][0])  # update 0 copies the student
    for t, ((t0, _), (t1, s1)) in enumerate(zip(snaps, snaps[1:]), start=1):
        m = min(1 - 1 / (t + 1), 0.9)  # 0.5, 0.667, ..., 0.9 from update 9 on
        for k in t1:
            assert torch.allclose(t1[k], m * t0[k] + (1 - m) * s1[k], atol=1e-6), (t, k)
    # the saved model is the teacher
    saved = torch.load(tmp_path / "ema" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], snaps[-1][0][k]) for k in snaps[-1][0])


def test_garbage_pool_labels_give_a_bit_identical_run(semi_ws, tmp_path):
    """The pool's label files (but the labelled training volumes') replaced with garbage: the run does not read
    them, so the model is bit-identical."""
    root, data, split = semi_ws
    assert _run(data, root / "split.json", tmp_path / "clean") == 0
    dirty = tmp_path / "dirty_data"
    shutil.copytree(data, dirty)
    labelled = set(split.labelled(2, 0))
    touched = 0
    for case in split.pool:
        if case not in labelled:
            (dirty / "labelsTr" / f"{case}.nii.gz").write_bytes(b"garbage, not a NIfTI file")
            touched += 1
    assert touched >= 3
    assert _run(dirty, root / "split.json", tmp_path / "dirty") == 0
    a = torch.load(tmp_path / "clean" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "dirty" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
