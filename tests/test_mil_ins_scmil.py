"""INS (bag prediction as published, pseudo-labels, prototypes, queue) and SC-MIL (SupCon on bag views,
schedule, batches)."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medcl.config import apply_overrides, from_dict
from medcl.mil.augment import subsample_instances
from medcl.mil.bags import Bag, BagDataset, collate_bags
from medcl.mil.config import MILConfig
from medcl.mil.heads import TrainingInfo, build_head
from medcl.mil.heads.abmil import AttentionPool
from medcl.mil.heads.ins import INSAttentionHead, INSHead
from medcl.mil.heads.scmil import SCMILHead, transition_weight
from medcl.mil.metrics import binary_auc
from medcl.mil.sampling import BagBatchSampler
from medcl.mil.train import evaluate, fit_head

D = 8


def toy_instances(n_bags: int, seed: int) -> tuple[BagDataset, np.ndarray]:
    """Negative bags: N(0, I) instances. Positive bags: 20-50% instances from N(mu, I). Returns instance labels."""
    g = np.random.default_rng(seed)
    mu = np.zeros(D, dtype=np.float32)
    mu[:3] = 2.0
    bags, inst = [], []
    for i in range(n_bags):
        y = i % 2
        n = int(g.integers(8, 16))
        lab = np.zeros(n, dtype=np.int64)
        if y:
            lab[g.choice(n, size=max(1, int(g.uniform(0.2, 0.5) * n)), replace=False)] = 1
        x = g.normal(size=(n, D)).astype(np.float32) + lab[:, None] * mu
        bags.append(Bag(id=f"b{i}", label=y, n=n, features=torch.from_numpy(x)))
        inst.append(lab)
    return BagDataset(bags, ["neg", "pos"], D), np.concatenate(inst)


def ins_cfg(**over) -> MILConfig:
    base = {"head": "ins", "encoder": {"hidden": [32]}, "ins": {"proj_dim": 16, "queue_size": 512},
            "train": {"epochs": 30, "batch_size": 8}, "optim": {"lr": 3e-3}}
    return from_dict(MILConfig, apply_overrides(base, [f"{k}={v}" for k, v in over.items()]))


def test_ins_pseudo_labels_recover_instance_labels():
    train, inst = toy_instances(40, seed=0)
    head = fit_head(ins_cfg(**{"train.epochs": 60}), train, seed=0, device="cpu").head
    assert isinstance(head, INSHead)
    conf = head.pseudo_labels
    assert conf is not None and conf.shape == (train.n_instances, 2)
    in_pos_bag = np.concatenate([np.full(b.n, b.label == 1) for b in train.bags])
    # negative-bag instances are certain negatives; the test is on the ambiguous ones (positive bags)
    assert torch.all(conf[torch.from_numpy(~in_pos_bag)].argmax(1) == 0)
    auc_pseudo = binary_auc(inst[in_pos_bag], conf[torch.from_numpy(in_pos_bag), 1].numpy())
    assert auc_pseudo > 0.9, f"pseudo-label instance AUC {auc_pseudo:.3f}"
    # the instance classifier generalises to new bags
    test, inst_t = toy_instances(20, seed=1)
    pred = evaluate(head, test)
    assert binary_auc(inst_t, np.concatenate(pred.instance_scores)) > 0.9
    # ... and its mean instance probability ranks the bags (the official INS reports this AUC)
    assert binary_auc(test.labels.numpy(), pred.probs[:, 1]) > 0.9


@pytest.mark.parametrize("n_classes", [2, 3])
def test_ins_bag_prediction_is_mean_of_instance_probabilities(n_classes):
    """INS train_withbag_cam.py::test: bag score = torch.mean(softmax(instance outputs)[:, 1], dim=0)."""
    torch.manual_seed(0)
    head = build_head(ins_cfg(), D, n_classes).eval()
    head.set_standardization(torch.randn(D) * 0.1, torch.rand(D) + 0.5)
    sizes = [1, 3, 8]
    x = torch.randn(len(sizes), 11, D) * 1e3  # garbage padding
    mask = torch.zeros(len(sizes), 11, dtype=torch.bool)
    for i, n in enumerate(sizes):
        x[i, :n] = torch.randn(n, D)
        mask[i, :n] = True
    with torch.no_grad():
        out = head(x, mask)
    probs = head.predict(x, mask)
    for i, n in enumerate(sizes):
        inst = torch.softmax(out.extras["instance_logits"][i, :n], dim=1)  # [n, K], the instance classifier
        torch.testing.assert_close(probs[i], inst.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(probs[i, 1], torch.mean(inst[:, 1], dim=0), atol=1e-6, rtol=1e-5)
        with torch.no_grad():  # the bag alone: padding changes nothing
            alone = head.predict(x[i : i + 1, :n], mask[i : i + 1, :n])[0]
        torch.testing.assert_close(alone, probs[i], atol=1e-6, rtol=1e-5)


def test_ins_published_head_has_no_attention_or_bag_head():
    head = build_head(ins_cfg(), D, 2)
    assert type(head) is INSHead
    assert not any(isinstance(m, AttentionPool) for m in head.modules())
    assert not any(name.split(".")[0] in ("pool", "classifier") for name, _ in head.named_parameters())
    assert "attention" not in head(torch.randn(1, 4, D)).extras
    train, _ = toy_instances(8, seed=0)
    head.prepare_training(TrainingInfo(8, train.n_instances, train.labels, 1, 1, train.n_instances))
    terms = head.training_loss(collate_bags([train[i] for i in range(8)]), progress=0.5)
    assert set(terms) == {"loss", "instance", "contrastive"}  # no bag loss
    # the earlier variant keeps its gated-attention bag head under another name
    variant = build_head(ins_cfg(head="ins_attention"), D, 2)
    assert type(variant) is INSAttentionHead
    assert any(isinstance(m, AttentionPool) for m in variant.modules())


def test_ins_prototype_update_matches_sequential_ema():
    head = INSHead(D, 3, hidden=[16], proj_dim=4, proto_momentum=0.7)
    head.prototypes.copy_(F.normalize(torch.randn(3, 4), dim=1))
    z = F.normalize(torch.randn(9, 4), dim=1)
    lab = torch.tensor([0, 2, 2, 1, 0, 2, 0, 0, 1])
    ref = head.prototypes.clone()
    for zi, li in zip(z, lab):  # PiCO: one EMA step per instance, normalised after the loop
        ref[li] = 0.7 * ref[li] + 0.3 * zi
    ref = F.normalize(ref, dim=1)
    head._update_prototypes(z, lab)
    torch.testing.assert_close(head.prototypes, ref, atol=1e-6, rtol=1e-6)


def test_ins_queue_sized_to_data_and_no_state_in_checkpoint():
    head = INSHead(D, 2, hidden=[16], proj_dim=4, queue_size=10_000)
    head.prepare_training(TrainingInfo(n_bags=10, n_instances=300, labels=torch.zeros(10, dtype=torch.long),
                                       epochs=1, steps_per_epoch=2, max_batch_instances=60))
    assert head._train_state["queue"].size == 240  # never two copies of an instance, nor the current batch
    assert not any(k.startswith("_") or "queue" in k for k in head.state_dict())


def test_ins_candidates():
    head = INSHead(D, 3, hidden=[16], proj_dim=4, negative_class=0)
    cand = head.candidates(torch.tensor([0, 1, 2]))
    assert cand.tolist() == [[True, False, False], [True, True, False], [True, False, True]]


def test_transition_weight_schedules():
    assert transition_weight(0.0) == 0.0 and transition_weight(1.0) == 1.0
    assert math.isclose(transition_weight(0.5, "parabolic"), 0.25)
    assert math.isclose(transition_weight(0.3, "linear"), 0.3)
    assert math.isclose(transition_weight(0.5, "cosine"), 0.5)
    assert transition_weight(0.49, "step", 0.5) == 0.0 and transition_weight(0.5, "step", 0.5) == 1.0


def test_scmil_contrastive_loss_against_loop():
    """SupCon (Khosla L_out) over two subsampled views per bag, checked with an explicit double loop."""
    torch.manual_seed(0)
    cfg = from_dict(MILConfig, {"head": "scmil", "encoder": {"hidden": [16]}, "scmil": {"temperature": 0.5}})
    head = build_head(cfg, D, 2)
    assert isinstance(head, SCMILHead)
    items = [{"features": torch.randn(n, D), "label": y, "id": str(i)}
             for i, (n, y) in enumerate([(5, 0), (9, 1), (3, 0), (12, 1), (7, 1)])]
    batch = collate_bags(items)
    torch.manual_seed(5)
    got = head.contrastive_loss(batch)
    torch.manual_seed(5)  # replay the same views
    u = []
    for _ in range(2):
        keep = 0.5 + 0.4 * torch.rand(len(items))
        u.append(head.base(batch.features, subsample_instances(batch.mask, keep)).bag_embedding)
    u = F.normalize(head.projector(torch.cat(u)), dim=1)
    y = torch.cat([batch.labels, batch.labels])
    losses = []
    for a in range(len(u)):
        denom = sum(torch.exp(u[a] @ u[j] / 0.5) for j in range(len(u)) if j != a)
        pos = [p for p in range(len(u)) if p != a and y[p] == y[a]]
        losses.append(-sum(torch.log(torch.exp(u[a] @ u[p] / 0.5) / denom) for p in pos) / len(pos))
    torch.testing.assert_close(got, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)


def test_sampler_min_per_class_and_balanced():
    labels = torch.tensor([0] * 30 + [1] * 3)  # 10% positives
    for mode in ("random", "balanced"):
        s = BagBatchSampler(labels, batch_size=8, mode=mode, min_per_class=2, seed=0)
        for epoch in range(3):
            batches = s.epoch(epoch)
            assert len(batches) == len(s)
            for bt in batches:
                assert sum(int(labels[i]) == 1 for i in bt) >= 2 and sum(int(labels[i]) == 0 for i in bt) >= 2
            if mode == "random":  # every bag at least once per epoch
                assert set(range(33)) <= {i for bt in batches for i in bt}
    s = BagBatchSampler(labels, batch_size=8, mode="balanced", seed=0)
    drawn = torch.tensor([int(labels[i]) for e in range(50) for bt in s.epoch(e) for i in bt], dtype=torch.float)
    assert 0.4 < drawn.mean() < 0.6  # classes drawn uniformly
    assert s.epoch(3) == BagBatchSampler(labels, 8, "balanced", seed=0).epoch(3)  # pure function of the seed


def test_scmil_trains_under_imbalance():
    train, _ = toy_instances(40, seed=3)
    keep = [i for i, b in enumerate(train.bags) if b.label == 0 or i % 8 == 1]  # 5 positive bags of 25
    sub = train.subset(keep)
    cfg = from_dict(MILConfig, {"head": "scmil", "encoder": {"hidden": [32]}, "scmil": {"proj_dim": 16},
                                "train": {"epochs": 30, "batch_size": 8}, "optim": {"lr": 3e-3}})
    fit = fit_head(cfg, sub, seed=0, device="cpu")
    assert fit.history[0]["cls_weight"] < 0.05 and fit.history[-1]["cls_weight"] > 0.9
    assert fit.history[-1]["contrastive"] < fit.history[0]["contrastive"]
    test, _ = toy_instances(30, seed=4)
    probs = evaluate(fit.head, test).probs
    bal = np.mean([np.mean(probs[test.labels.numpy() == c].argmax(1) == c) for c in (0, 1)])
    assert bal > 0.75


def _ddp_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ds, _ = toy_instances(16, 0)
    torch.manual_seed(0)
    head = INSHead(D, 2, hidden=[16], proj_dim=8, queue_size=100, warmup=0.0)
    head.prepare_training(TrainingInfo(16, ds.n_instances, ds.labels, 1, 4, 60))

    class Step(torch.nn.Module):  # DDP syncs gradients of what forward() computes
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, batch):
            return self.head.training_loss(batch, 0.5)["loss"]

    model = torch.nn.parallel.DistributedDataParallel(Step())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # each rank draws its own views
    for step in range(3):
        idx = range(step * 4 + rank * 2, step * 4 + rank * 2 + 2)  # each rank its own bags
        loss = model(collate_bags([ds[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    st = head._train_state
    for t in (head.prototypes, st["queue"].keys, st["queue"].uid, st["confidence"], next(head.encoder.parameters())):
        gathered = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(gathered, t.contiguous())
        assert torch.equal(gathered[0], gathered[1])
    # every rank's table holds pseudo-labels of the instances of both ranks' bags (0-11), none of bags 12-15
    seen = [bool(st["seen"][int(ds.offsets[i]) : int(ds.offsets[i]) + ds.bags[i].n].any()) for i in range(16)]
    assert seen == [True] * 12 + [False] * 4
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's threads can hang or abort it (seen in CI); nothing is left to write.
    os._exit(0)


def test_ins_under_ddp_keeps_one_state():
    """Two gloo ranks on different bags: queue, prototypes and pseudo-label table stay identical."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_ddp_worker, args=(2, port), nprocs=2, join=False)
    deadline = time.time() + 120
    while not ctx.join(timeout=2):  # raises with the rank's traceback if a rank failed
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two INS ranks did not finish within 120 s")
