"""DDP: two CPU processes (gloo, torch.multiprocessing) holding unequal numbers of views reproduce the single-process loss and,
after 3 optimiser steps under DistributedDataParallel, the single-process weights."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medcl.losses import ContrastIds, build_masks, distributed_info_nce, gather_with_grad, info_nce

N, D_IN, D_OUT = 8, 6, 4
SPLIT = (5, 3)  # unequal view counts per rank
STEPS = [("gr", "per_pair"), ("gd", "supcon"), ("gd_minus", "dcl")]
IDS = ContrastIds(
    uid=torch.arange(N),
    source_id=torch.tensor([0, 1, 2, 0, 3, 1, 2, 3]),  # each volume's two views sit on different ranks
    partition=torch.tensor([0, 1, 0, 0, 1, 1, 0, 1]),
)


def _batch(step: int) -> torch.Tensor:
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(100 + step))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, D_OUT)


def _slice(rank: int) -> slice:
    start = sum(SPLIT[:rank])
    return slice(start, start + SPLIT[rank])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = torch.nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        sl = _slice(rank)
        ids = ContrastIds(uid=IDS.uid[sl], source_id=IDS.source_id[sl], partition=IDS.partition[sl])
        losses = []
        for step, (strategy, mode) in enumerate(STEPS):
            z = model(_batch(step)[sl])
            res = distributed_info_nce(z, ids, strategy, temperature=0.5, mode=mode)
            opt.zero_grad()
            res.loss.backward()
            opt.step()
            value = res.loss.detach().clone()
            dist.all_reduce(value)
            losses.append(value / world)
        # gather_with_grad on its own: rows in rank order, padding dropped
        g = gather_with_grad(torch.full((SPLIT[rank], 2), float(rank), requires_grad=True))
        if rank == 0:
            torch.save(
                {
                    "losses": torch.stack(losses),
                    "n_anchors": res.n_anchors,
                    "weight": model.module.weight.detach(),
                    "bias": model.module.bias.detach(),
                    "gathered": g.detach(),
                },
                out,
            )
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's threads can abort it ("terminate called without an active
    # exception"), and it takes seconds. Everything this rank had to write is closed already.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_unequal_views_match_single_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    ctx = mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=False)
    deadline = time.time() + 120
    while not ctx.join(timeout=2):  # raises with the rank's traceback if a rank failed
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish within 120 s")
    got = torch.load(out, weights_only=True)

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_losses = []
    for step, (strategy, mode) in enumerate(STEPS):
        z = model(_batch(step))
        pos, excl = build_masks(strategy, IDS, IDS)
        res = info_nce(z, z, pos, excl, temperature=0.5, mode=mode)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        ref_losses.append(res.loss.detach())
    torch.testing.assert_close(got["losses"], torch.stack(ref_losses), rtol=1e-6, atol=1e-6)
    assert got["n_anchors"].item() == res.n_anchors.item()
    torch.testing.assert_close(got["weight"], model.weight.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(got["bias"], model.bias.detach(), rtol=0, atol=1e-5)
    assert not torch.allclose(got["weight"], _model().weight)  # the steps did move the weights
    assert got["gathered"][:, 0].tolist() == [0.0] * 5 + [1.0] * 3


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    z = torch.randn(6, 4)
    ids = ContrastIds(uid=torch.arange(6), source_id=torch.tensor([0, 0, 1, 1, 2, 2]))
    pos, excl = build_masks("gr", ids, ids)
    a = distributed_info_nce(z, ids, "gr", temperature=0.2)
    b = info_nce(z, z, pos, excl, temperature=0.2)
    torch.testing.assert_close(a.loss, b.loss)
    assert a.n_anchors.item() == b.n_anchors.item() == 6
