"""Fast MIL training against the reference computation, for every registered head.

* Batch source: the fold's bags preloaded on the device (:mod:`medcl.mil.fast`) train the *same* model as the
  streaming path (batches collated on the host), bit for bit, for a fixed seed (dropout, instance subsampling,
  class-balanced samplers and SC-MIL's per-class minimum included): a fast batch holds exactly the tensors
  ``collate_bags`` builds and the sampler's draws are the same.
* Packed instance MLP (``train.pack_instances``, :func:`medcl.mil.heads.base.packed_apply`): the same model as
  the padded computation up to float rounding (the same random draws), checked after several epochs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcl.config import apply_overrides, from_dict
from medcl.mil.bags import Bag, BagDataset, collate_bags
from medcl.mil.config import MILConfig
from medcl.mil.fast import PackedBags, fast_path_choice
from medcl.mil.heads import build_head, head_names
from medcl.mil.heads.base import packed_apply
from medcl.mil.sampling import BagBatchSampler
from medcl.mil.train import evaluate, fit_head

D = 6


def varied_bags(n_bags: int = 24, seed: int = 0) -> BagDataset:
    """Bags of 1 to 30 instances (a wide spread, so batches pad differently); class 1 holds a shifted instance."""
    g = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        n = int(g.choice([1, 2, 3, 5, 8, 13, 30]))
        x = g.normal(size=(n, D)).astype(np.float32)
        if i % 2:
            x[int(g.integers(n))] += 3.0
        bags.append(Bag(id=f"b{i}", label=i % 2, n=n, features=torch.from_numpy(x)))
    return BagDataset(bags, ["0", "1"], D)


def cfg_for(kind: str, fast: bool, **over) -> MILConfig:
    base = {
        "head": kind, "device": "cpu", "encoder": {"hidden": [16], "dropout": 0.25}, "abmil": {"attention_dim": 8},
        "transmil": {"dim": 16, "heads": 2, "landmarks": 4}, "dsmil": {"query_dim": 8},
        "clam": {"attention_dim": 8, "k": 2, "dropout": 0.25}, "ins": {"proj_dim": 8, "queue_size": 64},
        "scmil": {"proj_dim": 8}, "train": {"epochs": 3, "batch_size": 6, "fast": fast}, "optim": {"lr": 3e-3},
    }
    return from_dict(MILConfig, apply_overrides(base, [f"{k}={v}" for k, v in over.items()]))


def assert_same_fit(kind: str, ds: BagDataset, **over) -> None:
    """The fast and the streaming path give bit-identical fits."""
    ref = fit_head(cfg_for(kind, fast=False, **over), ds, seed=7)
    fast = fit_head(cfg_for(kind, fast=True, **over), ds, seed=7)
    assert not ref.fast and fast.fast
    assert ref.steps == fast.steps and ref.history == fast.history
    a, b = ref.head.state_dict(), fast.head.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{kind}: parameter/buffer {k} differs between the fast and streaming paths"
    pa, pb = evaluate(ref.head, ds, batch_size=5).probs, evaluate(fast.head, ds, batch_size=5).probs
    np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("kind", head_names())
def test_fast_path_trains_the_same_model(kind):
    """Every head: same weights, buffers (INS queues and pseudo-labels), loss history and predictions."""
    assert_same_fit(kind, varied_bags())


def test_fast_path_same_without_packing():
    assert_same_fit("gated_abmil", varied_bags(seed=3), **{"train.pack_instances": "false"})


@pytest.mark.parametrize("kind", head_names())
def test_packed_instances_train_the_padded_model(kind):
    """Every head, 5 epochs with dropout: packed and padded instance MLPs give the same weights and predictions up
    to float rounding (a different random draw or a head reading padding rows would differ by far more)."""
    ds = varied_bags(seed=4)
    fits = [fit_head(cfg_for(kind, fast=True, **{"train.pack_instances": str(p).lower(), "train.epochs": 5}), ds,
                     seed=11) for p in (False, True)]
    a, b = fits[0].head.state_dict(), fits[1].head.state_dict()
    for k in a:
        if k.endswith("pool.w.bias"):
            # the attention score's bias: a softmax is shift-invariant, so its true gradient is 0 and AdamW turns
            # the rounding noise of either computation into lr-sized steps; it changes no output (checked below)
            continue
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{kind} {k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), f"{kind}: {k}"
    pa, pb = (evaluate(f.head, ds, batch_size=5).probs for f in fits)
    np.testing.assert_allclose(pb, pa, atol=1e-5)
    assert not any(getattr(m, "pack_instances", False) for m in fits[1].head.modules())  # prediction is padded


def test_packed_apply_equals_the_module_on_real_rows():
    """Real rows equal the padded module's (eval), padding rows are zero, and in training the dropout noise is
    the padded call's (same seed -> same real rows) and the generator ends in the same state."""
    ds = varied_bags(seed=5)
    head = build_head(cfg_for("abmil", fast=True), D, 2)
    batch = collate_bags([ds[i] for i in range(8)])
    x, mask = head.prepare_input(batch.features, batch.mask), batch.mask
    head.eval()
    ref, got = head.encoder(x), packed_apply(head.encoder, x, mask)
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-6, atol=1e-6)
    assert torch.all(got[~mask] == 0)
    head.train()
    torch.manual_seed(0)
    ref = head.encoder(x)
    after_ref = torch.rand(3)
    torch.manual_seed(0)
    got = packed_apply(head.encoder, x, mask)
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-6, atol=1e-6)
    assert (ref[mask] == 0).any()  # dropout did drop something
    assert torch.equal(torch.rand(3), after_ref)


def test_fast_path_same_with_augmentation_and_balanced_sampler():
    """Instance subsampling draws over the padded batch and the balanced sampler's draws: still identical."""
    assert_same_fit("abmil", varied_bags(seed=1), **{"train.instance_keep": 0.6, "train.sampler": "balanced"})


def test_packed_batch_equals_collated_batch():
    ds = varied_bags(seed=2)
    packed = PackedBags(ds, "cpu")
    for idx in ([0], [3, 1, 4, 1, 5], list(range(len(ds)))[::-1]):
        ref = collate_bags([ds[i] for i in idx])
        t = torch.tensor(idx)
        got = packed.batch(t, int(packed.sizes_host[t].max()))
        for name in ("features", "mask", "labels", "index", "instance_index"):
            r, g = getattr(ref, name), getattr(got, name)
            assert r.dtype == g.dtype and torch.equal(r, g), name


@pytest.mark.parametrize("mode,min_per_class", [("random", 0), ("random", 2), ("balanced", 0), ("balanced", 2)])
def test_epoch_index_is_the_epoch_flattened(mode, min_per_class):
    labels = torch.tensor([0] * 9 + [1] * 4)
    s = BagBatchSampler(labels, batch_size=5, mode=mode, min_per_class=min_per_class, seed=3)
    for epoch in range(3):
        batches = s.epoch(epoch)
        order, lengths = s.epoch_index(epoch)
        assert lengths == [len(b) for b in batches]
        assert order.tolist() == [i for b in batches for i in b]


def test_fast_path_choice_falls_back_to_streaming():
    ds = varied_bags()
    assert fast_path_choice(ds, True, 1.0)[0]
    assert not fast_path_choice(ds, False, 1.0)[0]
    assert not fast_path_choice(ds, True, 1e-9)[0]  # more features than data.max_memory_gb
    lazy = BagDataset([Bag(id="x", label=0, n=3, path="x.h5")], ["0", "1"], D)
    use, why = fast_path_choice(lazy, True, 1.0)
    assert not use and "lazily" in why
