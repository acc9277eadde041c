import math
import os
import random

import numpy as np
import torch

from medcl.engine.checkpoint import AtomicCheckpointIO, atomic_torch_save, safe_torch_load
from medcl.engine.plots import plot_curves
from medcl.engine.seeding import rng_state, sample_seed, set_rng_state


def test_atomic_save_leaves_no_temp_and_loads_weights_only(tmp_path):
    p = tmp_path / "a" / "x.ckpt"
    atomic_torch_save({"w": torch.ones(3), "rng": rng_state()}, p)
    assert p.is_file() and not [f for f in os.listdir(p.parent) if f.endswith(".tmp")]
    d = safe_torch_load(p)
    assert torch.equal(d["w"], torch.ones(3))
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"a": torch.zeros(2)}}, tmp_path / "l.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "l.ckpt")["state_dict"]["a"], torch.zeros(2))


def test_corrupt_checkpoint_names_file(tmp_path):
    p = tmp_path / "bad.ckpt"
    p.write_bytes(b"not a checkpoint")
    try:
        safe_torch_load(p)
    except Exception as exc:
        assert "bad.ckpt" in str(exc)
    else:
        raise AssertionError("corrupt checkpoint accepted")


def test_rng_state_roundtrip():
    s = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(s)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b


def test_sample_seed_stable_and_distinct():
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)
    assert len({sample_seed(1, e, i) for e in range(3) for i in range(50)}) == 150


def test_plot_curves(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,probe/knn\n0,0,2.0,\n0,1,1.5,\n0,1,,0.4\n")
    out = plot_curves(csv, tmp_path / "loss.png")
    assert out is not None and out.stat().st_size > 1000


def test_stream_ranks_partition_the_single_process_batches():
    from medcl.engine.stream import StreamIndex, StreamSampler

    single = list(StreamSampler(batch_size=4, total_batches=3))
    r0 = list(StreamSampler(batch_size=2, total_batches=3, world_size=2, rank=0))
    r1 = list(StreamSampler(batch_size=2, total_batches=3, world_size=2, rank=1))
    for b in range(3):
        assert sorted(r0[2 * b : 2 * b + 2] + r1[2 * b : 2 * b + 2]) == single[4 * b : 4 * b + 4]
    resumed = StreamSampler(batch_size=4, total_batches=3, start_batch=1)
    assert list(resumed) == single[4:] and len(resumed) == 12  # the length stays the whole run
    idx = StreamIndex(5, seed=3)
    epoch0 = sorted(idx(p)[1] for p in range(5))
    assert epoch0 == list(range(5)) and idx(7)[0] == 1  # each epoch is a permutation
    assert [idx(p) for p in range(10)] == [StreamIndex(5, seed=3)(p) for p in range(10)]


def test_monitor_statistics_against_definitions():
    from medcl.engine.monitor import effective_rank, embedding_std, knn_accuracy

    z = torch.randn(64, 3) @ torch.diag(torch.tensor([1.0, 1.0, 0.0]))  # rank 2, equal spread
    er = float(effective_rank(z))
    assert 1.8 < er <= 2.0 + 1e-6
    assert float(effective_rank(torch.ones(8, 4))) <= 1.0 + 1e-6  # collapsed (centred to zero)
    collapsed = torch.ones(10, 16)
    assert float(embedding_std(collapsed)) < 1e-6
    spread = torch.eye(16)
    manual = torch.nn.functional.normalize(spread, dim=1).std(dim=0).mean()
    assert torch.isclose(embedding_std(spread), manual)
    # two clusters, two groups: leave-one-group-out 1-NN finds the right cluster
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 0, 1])
    groups = torch.tensor([0, 0, 1, 1])
    assert knn_accuracy(emb, labels, groups, k=1) == 1.0
    assert knn_accuracy(emb, torch.tensor([0, 1, 1, 0]), groups, k=1) == 0.0  # labels swapped in group 1


# ------------------------------------------------------------------------------------------- convergence
def test_convergence_rule_on_known_curves():
    """A loss that has flattened is converged; one still falling 5% per fifth is not; too few steps never is."""
    from medcl.engine.convergence import converged

    t = torch.arange(1000, dtype=torch.float64)
    assert converged(1.0 + torch.exp(-t / 50))  # flat for the last 800 steps
    assert not converged(2.0 - t / 1000)  # the last fifth is ~16% lower than the fifth before
    assert not converged(torch.ones(2))  # windows of round(0.2 * 2) = 0 steps: nothing to compare
    noisy = 1.0 + 0.1 * torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert converged(noisy, tolerance=0.05)  # noise around a constant: window means agree within 5%


def test_convergence_stop_halts_training_and_survives_a_checkpoint():
    from medcl.engine.convergence import ConvergenceStop

    stop = ConvergenceStop(min_steps=100, tail=0.2, tolerance=0.01, check_every=10)
    trainer = type("T", (), {"global_step": 0, "should_stop": False})()
    for step in range(1, 400):
        trainer.global_step = step
        stop.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0 + math.exp(-step / 10))}, None, step)
        if trainer.should_stop:
            break
    assert stop.stopped_at == 100 and trainer.should_stop  # flat long before step 100: stops at the first check
    again = ConvergenceStop(min_steps=100)
    again.load_state_dict(stop.state_dict())
    assert again.stopped_at == 100 and len(again._losses) == 100
