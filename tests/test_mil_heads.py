"""MIL heads: padding never changes a prediction, planted key instances are learnt, multi-class, small bags;
DSMIL against a slow loop reference of the published method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medcl.config import apply_overrides, from_dict
from medcl.mil.bags import Bag, BagDataset, collate_bags
from medcl.mil.config import MILConfig
from medcl.mil.heads import build_head, head_names
from medcl.mil.heads.nystrom import iterative_pinv
from medcl.mil.heads.transmil import square_side
from medcl.mil.train import evaluate, fit_head

D = 8


def small_cfg(kind: str, **over) -> MILConfig:
    base = {
        "head": kind, "encoder": {"hidden": [32], "dropout": 0.0}, "abmil": {"attention_dim": 16},
        "transmil": {"dim": 32, "heads": 4, "landmarks": 4}, "dsmil": {"query_dim": 16},
        "clam": {"attention_dim": 16, "k": 3, "dropout": 0.0}, "ins": {"proj_dim": 16, "queue_size": 256},
        "scmil": {"proj_dim": 16}, "train": {"epochs": 25, "batch_size": 8}, "optim": {"lr": 3e-3},
    }
    return from_dict(MILConfig, apply_overrides(base, [f"{k}={v}" for k, v in over.items()]))


def planted_bags(n_bags: int, n_classes: int, seed: int) -> BagDataset:
    """Bag of class c > 0 holds 1-2 key instances of pattern c among noise; class 0 holds noise only."""
    g = np.random.default_rng(seed)
    keys = np.zeros((n_classes, D), dtype=np.float32)
    for c in range(1, n_classes):
        keys[c, c - 1] = 4.0
    bags = []
    for i in range(n_bags):
        c = i % n_classes
        n = int(g.integers(6, 16))
        x = g.normal(size=(n, D)).astype(np.float32)
        if c > 0:
            for j in g.choice(n, size=int(g.integers(1, 3)), replace=False):
                x[j] += keys[c]
        bags.append(Bag(id=f"b{i}", label=c, n=n, features=torch.from_numpy(x)))
    return BagDataset(bags, [str(c) for c in range(n_classes)], D)


@pytest.mark.parametrize("kind", head_names())
def test_padding_never_changes_prediction(kind):
    torch.manual_seed(0)
    head = build_head(small_cfg(kind), D, 3).eval()
    sizes = [1, 2, 5, 9, 17, 30]
    bags = [torch.randn(n, D) for n in sizes]
    n_max = 41
    x = torch.randn(len(bags), n_max, D) * 1e4  # garbage padding, including NaN and inf
    x[0, 3, 2] = float("nan")
    x[1, 7, 0] = float("inf")
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    with torch.no_grad():
        batched = head(x, mask)
        for i, b in enumerate(bags):
            alone = head(b[None], torch.ones(1, len(b), dtype=torch.bool))
            torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched.bag_embedding[i], alone.bag_embedding[0], atol=1e-5, rtol=1e-5)
            if alone.instance_scores is not None:
                torch.testing.assert_close(
                    batched.instance_scores[i, : len(b)], alone.instance_scores[0], atol=1e-5, rtol=1e-5
                )
    assert torch.isfinite(batched.logits).all()


@pytest.mark.parametrize("kind", ["abmil", "transmil", "dsmil", "dsmil_softmax", "clam_sb"])
def test_mask_with_holes_equals_compact_bag(kind):
    """Padding may sit anywhere (not only at the end): real instances keep their order."""
    torch.manual_seed(1)
    head = build_head(small_cfg(kind), D, 2).eval()
    real = torch.randn(11, D)
    holes = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    x = torch.randn(len(holes), D) * 100
    x[holes] = real
    with torch.no_grad():
        a = head(x[None], holes[None]).logits
        b = head(real[None], torch.ones(1, 11, dtype=torch.bool)).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dsmil_critical_instance_is_a_real_one():
    torch.manual_seed(0)
    head = build_head(small_cfg("dsmil"), D, 3).eval()
    x = torch.randn(2, 10, D)
    x[:, 4:] = 1e3  # padding that would win every max if it were considered
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :4] = True
    crit = head(x, mask).extras["critical"]
    assert (crit < 4).all()


def test_nystrom_pinv_and_square_side():
    a = torch.softmax(torch.randn(3, 6, 6, dtype=torch.float64), -1).requires_grad_()
    b = a.detach().clone().requires_grad_()
    z, ref = iterative_pinv(a, 20), torch.linalg.inv(b)
    torch.testing.assert_close(z, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn(3, 6, 6, dtype=torch.float64)
    (z * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)  # the inverse's gradient, in closed form
    n = torch.arange(1, 200)
    assert torch.equal(square_side(n), torch.tensor([int(np.ceil(np.sqrt(int(v)))) for v in n]))


def test_transmil_small_bag_attention_is_exact():
    """With no more tokens than landmarks every token is its own landmark: Nystrom equals softmax attention."""
    from medcl.mil.heads.nystrom import masked_nystrom_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(1, 5, dtype=torch.bool)
    out, first = masked_nystrom_attention(q, k, v, mask, landmarks=8, pinv_iterations=30)
    attn = torch.softmax(q @ k.transpose(-1, -2), -1)
    torch.testing.assert_close(out, attn @ v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(first, attn[:, :, 0], atol=1e-6, rtol=1e-5)


# INS is left out: its bag probability is the mean of its instances' probabilities (the published rule), which
# stays below 1/2 in a bag whose 1-2 key instances are among 6-15 noise ones, so argmax accuracy is not its
# measure; tests/test_mil_ins_scmil.py checks its bag AUC.
@pytest.mark.parametrize("kind", [k for k in head_names() if k != "ins"])
def test_head_learns_planted_key_instance(kind):
    train, test = planted_bags(64, 2, seed=0), planted_bags(40, 2, seed=1)
    head = fit_head(small_cfg(kind), train, seed=0, device="cpu").head
    probs = evaluate(head, test).probs
    acc = float((probs.argmax(1) == test.labels.numpy()).mean())
    assert acc >= 0.8, f"{kind}: accuracy {acc:.2f} on a planted key instance (chance 0.5)"


@pytest.mark.parametrize("kind", ["abmil", "transmil", "dsmil", "dsmil_softmax", "clam_sb", "ins_attention"])
def test_three_classes(kind):
    train, test = planted_bags(90, 3, seed=2), planted_bags(45, 3, seed=3)
    cfg = small_cfg(kind, **{"train.epochs": 30, "clam.subtyping": "true"})
    head = fit_head(cfg, train, seed=0, device="cpu").head
    probs = evaluate(head, test).probs
    assert probs.shape == (45, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    acc = float((probs.argmax(1) == test.labels.numpy()).mean())
    assert acc >= 0.7, f"{kind}: 3-class accuracy {acc:.2f} (chance 0.33)"


@pytest.mark.parametrize("kind", ["clam_sb", "dsmil", "transmil"])
def test_bags_smaller_than_top_k(kind):
    """Bags of 1 and 2 instances with k = 3 (CLAM) or fewer instances than landmarks (TransMIL)."""
    torch.manual_seed(0)
    head = build_head(small_cfg(kind), D, 2)
    items = [{"features": torch.randn(n, D), "label": n % 2, "id": f"s{n}"} for n in (1, 2, 3, 7)]
    batch = collate_bags(items)
    terms = head.training_loss(batch)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_clam_instance_loss_against_loop():
    """CLAM-SB clustering loss equals an explicit per-bag loop with k clamped to n // 2."""
    torch.manual_seed(0)
    head = build_head(small_cfg("clam_sb", **{"clam.subtyping": "true"}), D, 3)
    sizes, labels = [1, 3, 5, 12], torch.tensor([0, 1, 2, 1])
    batch = collate_bags([{"features": torch.randn(n, D), "label": int(y), "id": str(i)}
                          for i, (n, y) in enumerate(zip(sizes, labels))])
    out = head(batch.features, batch.mask)
    got = head.instance_loss(out, labels)
    h, e = out.extras["instance_embeddings"], out.extras["attention_logits"]
    terms = []
    for b, n in enumerate(sizes):
        kb = min(head.k, n // 2)
        order = torch.argsort(e[b, :n], descending=True)
        top, bottom = order[:kb], torch.flip(order, [0])[:kb]
        y = int(labels[b])
        for idx, target in [(top, 1), (bottom, 0)]:
            for i in idx:
                logit = head.instance_weight[y] @ h[b, i] + head.instance_bias[y]
                terms.append(torch.nn.functional.cross_entropy(logit[None], torch.tensor([target])))
        for c in range(3):
            if c != y:
                for i in top:
                    logit = head.instance_weight[c] @ h[b, i] + head.instance_bias[c]
                    terms.append(torch.nn.functional.cross_entropy(logit[None], torch.tensor([0])))
    torch.testing.assert_close(got, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- DSMIL
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy().copy()


class DSMILReference:
    """DSMIL as published (Li et al., 2021; binli123/dsmil-wsi ``dsmil.py``, ``train_tcga.py``), one bag at a
    time with plain loops over outputs and instances, in float64, on weights copied from a medcl head."""

    def __init__(self, head) -> None:
        self.mean, self.std = _np(head.feature_mean), _np(head.feature_std)
        self.enc = [(_np(m.weight), _np(m.bias)) for m in head.encoder if isinstance(m, nn.Linear)]
        self.w0, self.b0 = _np(head.instance_classifier.weight), _np(head.instance_classifier.bias)
        self.wq1, self.bq1 = _np(head.query[0].weight), _np(head.query[0].bias)
        self.wq2, self.bq2 = _np(head.query[2].weight), _np(head.query[2].bias)
        lin = [m for m in head.value if isinstance(m, nn.Linear)][0]
        self.wv, self.bv = _np(lin.weight), _np(lin.bias)
        self.wc, self.bc = _np(head.fcc.weight), _np(head.fcc.bias)  # Conv1d(C, C, kernel_size=E): [C, C, E]
        self.k = head.n_classes
        self.pos = [k for k in range(self.k) if k != head.negative_class]

    @staticmethod
    def relu(v: np.ndarray) -> np.ndarray:
        return np.maximum(v, 0.0)

    @staticmethod
    def sigmoid(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v))

    def embed(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        for w, b in self.enc:
            z = self.relu(w @ z + b)
        return z

    def forward(self, x: np.ndarray) -> dict:
        n, c_out = len(x), len(self.pos)
        h = [self.embed(x[i]) for i in range(n)]
        c = [[float(self.w0[j] @ h[i] + self.b0[j]) for j in range(c_out)] for i in range(n)]
        q = [np.tanh(self.wq2 @ self.relu(self.wq1 @ h[i] + self.bq1) + self.bq2) for i in range(n)]
        v = [self.relu(self.wv @ h[i] + self.bv) for i in range(n)]  # the value branch ends in a ReLU
        max_logits, bags = [], []
        for j in range(c_out):
            m = 0
            for i in range(1, n):
                if c[i][j] > c[m][j]:
                    m = i
            max_logits.append(c[m][j])
            s = [float(q[i] @ q[m]) / math.sqrt(len(q[m])) for i in range(n)]
            e = [math.exp(si - max(s)) for si in s]
            u = [ei / sum(e) for ei in e]
            bags.append(sum(u[i] * v[i] for i in range(n)))
        bag_logits = [float(sum(self.wc[j, jj] @ bags[jj] for jj in range(c_out)) + self.bc[j]) for j in range(c_out)]
        p = [0.5 * (self.sigmoid(bag_logits[j]) + self.sigmoid(max_logits[j])) for j in range(c_out)]
        odds = [pj / (1 - pj) for pj in p]
        probs = np.zeros(self.k)
        for j, k in enumerate(self.pos):
            probs[k] = odds[j] / (1 + sum(odds)) if len(self.pos) < self.k else odds[j] / sum(odds)
        if len(self.pos) < self.k:
            probs[[k for k in range(self.k) if k not in self.pos][0]] = 1 / (1 + sum(odds))
        return {"bag_logits": bag_logits, "max_logits": max_logits, "p": p, "probs": probs}

    def loss(self, x: np.ndarray, y: int) -> float:
        out = self.forward(x)

        def bce(s: float, t: float) -> float:
            return -(t * math.log(self.sigmoid(s)) + (1 - t) * math.log(1 - self.sigmoid(s)))

        t = [1.0 if y == k else 0.0 for k in self.pos]
        bag = sum(bce(s, tj) for s, tj in zip(out["bag_logits"], t)) / len(t)
        mx = sum(bce(s, tj) for s, tj in zip(out["max_logits"], t)) / len(t)
        return 0.5 * bag + 0.5 * mx


def _padded(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n_max = max(len(b) for b in bags) + 3
    x = torch.randn(len(bags), n_max, D) * 1e3  # garbage padding
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask


@pytest.mark.parametrize("n_classes,negative", [(2, 0), (3, 0), (3, 1), (3, None)])
def test_dsmil_matches_loop_reference(n_classes, negative):
    """Probabilities, both streams and the loss equal the loop reference, bag by bag, in a padded batch."""
    torch.manual_seed(0)
    neg = "null" if negative is None else negative
    head = build_head(small_cfg("dsmil", **{"dsmil.negative_class": neg}), D, n_classes).eval()
    head.set_standardization(torch.randn(D) * 0.1, torch.rand(D) + 0.5)
    ref = DSMILReference(head)
    bags = [torch.randn(n, D) for n in (1, 4, 7)]
    labels = torch.tensor([0, 1, n_classes - 1])
    x, mask = _padded(bags)
    with torch.no_grad():
        out = head(x, mask)
        loss = head.loss(out, labels)["loss"]
    probs = torch.softmax(out.logits.double(), -1).numpy()
    for i, b in enumerate(bags):
        r = ref.forward(b.double().numpy())
        np.testing.assert_allclose(out.extras["bag_logits"][i].numpy(), r["bag_logits"], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(out.extras["max_logits"][i].numpy(), r["max_logits"], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(out.extras["probs"][i].numpy(), r["p"], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(probs[i], r["probs"], atol=1e-5, rtol=1e-4)
    ref_loss = np.mean([ref.loss(b.double().numpy(), int(y)) for b, y in zip(bags, labels)])
    assert abs(float(loss) - ref_loss) < 1e-5
    if n_classes == 2:  # binary: softmax(logits) = (1 - p, p), p the mean of the two streams' sigmoids
        p = 0.5 * (torch.sigmoid(out.extras["bag_logits"]) + torch.sigmoid(out.extras["max_logits"]))
        torch.testing.assert_close(torch.softmax(out.logits, -1)[:, 1], p[:, 0], atol=1e-6, rtol=1e-5)


def test_dsmil_value_branch_has_relu():
    """Values are ReLU(W_v h + b): with every pre-activation negative the class-wise bag embeddings are 0."""
    torch.manual_seed(0)
    head = build_head(small_cfg("dsmil"), D, 3).eval()
    lin = [m for m in head.value if isinstance(m, nn.Linear)][0]
    with torch.no_grad():
        lin.bias.fill_(-1e3)
        out = head(torch.randn(2, 6, D), torch.ones(2, 6, dtype=torch.bool))
    assert torch.equal(out.bag_embedding, torch.zeros_like(out.bag_embedding))
    torch.testing.assert_close(out.extras["bag_logits"], head.fcc.bias.expand(2, -1))


def test_dsmil_has_no_output_for_the_negative_class():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 5, D), torch.ones(2, 5, dtype=torch.bool)
    for negative, outputs in [(0, [1, 2]), (2, [0, 1]), (None, [0, 1, 2])]:
        neg = "null" if negative is None else negative
        head = build_head(small_cfg("dsmil", **{"dsmil.negative_class": neg}), D, 3).eval()
        assert head.instance_classifier.out_features == len(outputs)
        assert head.fcc.in_channels == head.fcc.out_channels == len(outputs)
        assert head.positive_classes.tolist() == outputs
        with torch.no_grad():
            out = head(x, mask)
        assert out.extras["instance_logits"].shape == (2, 5, len(outputs))
        assert out.extras["bag_logits"].shape == out.extras["max_logits"].shape == (2, len(outputs))
        if negative is not None:
            assert torch.equal(out.logits[:, negative], torch.zeros(2))  # the negative class is "no output fires"
        # a negative bag's targets are all zero
        assert head.targets(torch.tensor([0, 1, 2])).tolist() == [[float(k == y) for k in outputs] for y in (0, 1, 2)]
    binary = build_head(small_cfg("dsmil"), D, 2)
    assert binary.instance_classifier.out_features == 1  # one sigmoid output, as Camelyon16's num_classes=1
