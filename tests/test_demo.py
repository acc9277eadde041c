"""medcl demo end to end at toy scale (the real run is the README's first command)."""

from __future__ import annotations

import json

import lightning  # noqa: F401  (imported once per session)
import numpy as np
from _runfolder import assert_run_folder
from PIL import Image

from medcl.demo import make_split, run_demo


def test_split_keeps_test_out_of_labelled_and_pool():
    ids = [f"c{i:02d}" for i in range(12)]
    s = make_split(ids, n_test=4, n_labelled=2, seed=0)
    assert len(s["test"]) == 4 and len(s["labelled"]) == 2 and len(s["pool"]) == 8
    assert not set(s["test"]) & (set(s["labelled"]) | set(s["pool"]))
    assert set(s["labelled"]) <= set(s["pool"])
    assert s == make_split(ids, n_test=4, n_labelled=2, seed=0)


def test_demo_writes_table_and_figures(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, device="cpu", n_phantoms=8, phantom_size=24, n_test=3, pretrain_steps=3,
                       finetune_steps=3, seeds=(0,), progress=False)
    assert summary["kind"] == "demo" and summary["split"] == {"test": 3, "labelled": 2, "pool": 5}
    inits = [r["init"] for r in summary["table"]]
    assert inits == ["pretrained", "random"]
    for row in summary["table"]:
        assert 0.0 <= row["dice_mean"] <= 1.0
    # the pretrained run really started from the pretraining checkpoint, the random one did not
    pre = json.loads((out / "finetune_pretrained_seed0" / "load_report.json").read_text())
    assert pre["loaded"] and not [k for k in pre["missing"] if k.startswith("encoder")]
    assert not (out / "finetune_random_seed0" / "load_report.json").exists()
    # pretraining never saw a test volume
    record = json.loads((out / "pretrain" / "record.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert not set(record["cases_seen"]) & set(split["test"])
    # the run-folder contract, for the demo and the runs inside it
    from medcl.demo import DemoConfig
    from medcl.pretrain import PretrainConfig
    from medcl.segment.config import FinetuneConfig

    assert_run_folder(out, "demo", DemoConfig, step=2)
    assert_run_folder(out / "pretrain", "pretrain", PretrainConfig, step=3)
    assert_run_folder(out / "finetune_random_seed0", "finetune", FinetuneConfig, step=3)
    for name in ("dice.png", "examples.png"):
        img = np.asarray(Image.open(out / name))
        assert img.shape[0] > 100 and img.std() > 0
    assert (out / "summary.md").read_text().count("|") > 10
