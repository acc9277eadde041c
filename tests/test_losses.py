"""Tests of medcl.losses against hand-computed formulas and slow, obviously-correct loop references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from medcl.core.provenance import ViewBatch
from medcl.losses import (
    ContrastIds,
    KeyQueue,
    build_masks,
    correspondence,
    gd_masks,
    gd_minus_masks,
    gr_masks,
    info_nce,
    label_masks,
    local_contrastive_loss,
    local_loss_for_views,
    masked_reconstruction_loss,
    mochi_as_keys,
    mochi_negatives,
    queue_size_for,
    read_features,
    sample_overlap_points,
    view_pairs,
    voco_loss,
    voco_overlap_targets,
)

# ------------------------------------------------------------------------------------ references


def ref_info_nce(q, k, pos, excl, temperature, mode, normalize=True):
    """Loop reference straight from the papers' formulas (float64, differentiable)."""
    if normalize:
        q = q / q.norm(dim=-1, keepdim=True)
        k = k / k.norm(dim=-1, keepdim=True)
    excl = torch.zeros_like(pos) if excl is None else excl
    per_anchor, dropped = [], 0
    for i in range(q.shape[0]):
        P = [j for j in range(k.shape[0]) if pos[i, j] and not excl[i, j]]
        N = [j for j in range(k.shape[0]) if not pos[i, j] and not excl[i, j]]
        if not P or (mode == "dcl" and not N):
            dropped += 1
            continue

        def e(j, i=i):
            return torch.exp((q[i] * k[j]).sum() / temperature)

        terms = []
        for p in P:
            if mode == "per_pair":
                den = e(p) + sum((e(n) for n in N), torch.zeros((), dtype=q.dtype))
            elif mode == "supcon":
                den = sum(e(a) for a in P + N)
            else:
                den = sum(e(n) for n in N)
            terms.append(-torch.log(e(p) / den))
        per_anchor.append(sum(terms) / len(P))
    loss = sum(per_anchor) / len(per_anchor) if per_anchor else torch.zeros((), dtype=q.dtype)
    return loss, len(per_anchor), dropped


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


VECS = [
    [1.0, 0.2, 0.0],
    [0.8, 0.5, 0.1],
    [-0.3, 1.0, 0.4],
    [0.1, 0.9, -0.6],
    [0.0, -0.4, 1.0],
    [0.7, -0.7, 0.2],
]


# ------------------------------------------------------------------------------- hand-made cases


def test_gr_is_simclr_nt_xent_by_hand():
    """G^R with per_pair (and supcon: one positive each) equals SimCLR's NT-Xent written out by hand."""
    z = VECS[:4]  # views 0, 1 of volume 0 and views 2, 3 of volume 1
    t = 0.5
    pairs = [(0, 1), (1, 0), (2, 3), (3, 2)]
    hand = 0.0
    for i, j in pairs:  # l(i, j) = -log(exp(s_ij / t) / sum_{k != i} exp(s_ik / t)); L = mean over 2N
        den = sum(math.exp(cos(z[i], z[k]) / t) for k in range(4) if k != i)
        hand += -math.log(math.exp(cos(z[i], z[j]) / t) / den)
    hand /= 4
    zt = torch.tensor(z, dtype=torch.float64)
    src, uid = torch.tensor([0, 0, 1, 1]), torch.arange(4)
    pos, excl = gr_masks(src, uid, src, uid)
    for mode in ("per_pair", "supcon"):
        res = info_nce(zt, zt, pos, excl, temperature=t, mode=mode)
        assert res.loss.item() == pytest.approx(hand, rel=1e-12)
        assert (res.n_anchors.item(), res.n_dropped.item()) == (4, 0)


def _gd_setup():
    part = torch.tensor([0, 0, 0, 1, 1, 2])  # anchor 0: positives 1, 2; negatives 3, 4, 5; view 5 alone
    uid = torch.arange(6)
    pos, excl = gd_masks(part, uid, part, uid)
    return torch.tensor(VECS, dtype=torch.float64), pos, excl


def _e(i, j, t):
    return math.exp(cos(VECS[i], VECS[j]) / t)


@pytest.mark.parametrize("mode", ["per_pair", "supcon", "dcl"])
def test_gd_modes_by_hand(mode):
    """Chaitanya's per-pair G^D, Khosla's SupCon L_out and Yeh's DCL on a case with 2 positives per anchor."""
    z, pos, excl = _gd_setup()
    t = 0.2
    groups = {0: [0, 1, 2], 1: [3, 4]}
    anchors = []
    for members in groups.values():
        for a in members:
            P = [p for p in members if p != a]
            N = [n for n in range(6) if n not in members]
            neg = sum(_e(a, n, t) for n in N)
            if mode == "per_pair":
                ls = [-math.log(_e(a, p, t) / (_e(a, p, t) + neg)) for p in P]
            elif mode == "supcon":
                ls = [-math.log(_e(a, p, t) / (sum(_e(a, x, t) for x in P) + neg)) for p in P]
            else:
                ls = [-math.log(_e(a, p, t) / neg) for p in P]
            anchors.append(sum(ls) / len(ls))
    hand = sum(anchors) / len(anchors)
    res = info_nce(z, z, pos, excl, temperature=t, mode=mode)
    assert res.loss.item() == pytest.approx(hand, rel=1e-12)
    assert res.n_anchors.item() == 5 and res.n_dropped.item() == 1  # view 5 has no positive


def test_per_pair_and_supcon_differ_with_several_positives():
    z, pos, excl = _gd_setup()
    a = info_nce(z, z, pos, excl, 0.2, "per_pair").loss
    b = info_nce(z, z, pos, excl, 0.2, "supcon").loss
    assert b.item() > a.item() + 1e-3  # supcon also puts the other positives in the denominator


# --------------------------------------------------------------------------- loop-reference grid


@pytest.mark.parametrize("nq,nk,d", [(1, 1, 2), (3, 4, 5), (6, 7, 3), (5, 2, 4)])
def test_info_nce_matches_loop_reference(nq, nk, d):
    g = torch.Generator().manual_seed(nq * 100 + nk * 10 + d)
    for temperature, mode, normalize in itertools.product(
        (0.07, 0.5, 1.3), ("per_pair", "supcon", "dcl"), (True, False)
    ):
        q = torch.randn(nq, d, generator=g, dtype=torch.float64)
        k = torch.randn(nk, d, generator=g, dtype=torch.float64)
        if not normalize:
            q, k = 0.3 * q, 0.3 * k
        pos = torch.rand(nq, nk, generator=g) < 0.35
        excl = torch.rand(nq, nk, generator=g) < 0.25
        q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
        q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
        res = info_nce(q1, k1, pos, excl, temperature, mode, normalize)
        ref, n_kept, n_drop = ref_info_nce(q2, k2, pos, excl, temperature, mode, normalize)
        assert (res.n_anchors.item(), res.n_dropped.item()) == (n_kept, n_drop)
        torch.testing.assert_close(res.loss, ref.detach(), rtol=1e-10, atol=1e-12)
        res.loss.backward()
        if n_kept:
            ref.backward()
            torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(k1.grad, k2.grad, rtol=1e-8, atol=1e-10)
        else:
            assert q1.grad.abs().max() == 0 and k1.grad.abs().max() == 0


def test_batched_info_nce_pools_anchors():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    pos = torch.rand(3, 4, 4, generator=g) < 0.4
    excl = torch.eye(4, dtype=torch.bool).expand(3, 4, 4)
    res = info_nce(q, q, pos, excl, 0.3, "supcon")
    terms, n = 0.0, 0
    for b in range(3):
        r, kept, _ = ref_info_nce(q[b], q[b], pos[b], excl[b], 0.3, "supcon")
        terms, n = terms + r.item() * kept, n + kept
    assert res.n_anchors.item() == n
    assert res.loss.item() == pytest.approx(terms / n, rel=1e-10)


# ------------------------------------------------------------------ dropping, stability, errors


def test_anchors_without_positive_are_dropped_never_nan():
    z = torch.randn(5, 4, requires_grad=True)
    pos = torch.zeros(5, 5, dtype=torch.bool)
    pos[0, 1] = True
    excl = torch.eye(5, dtype=torch.bool)
    res = info_nce(z, z, pos, excl, 0.1)
    assert (res.n_anchors.item(), res.n_dropped.item()) == (1, 4)
    res.loss.backward()
    assert torch.isfinite(z.grad).all()
    # nothing kept: 0, attached to the graph, zero gradient
    z.grad = None
    none = info_nce(z, z, torch.zeros(5, 5, dtype=torch.bool), excl, 0.1)
    assert none.loss.item() == 0.0 and none.loss.requires_grad and none.n_dropped.item() == 5
    none.loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    # dcl drops an anchor whose only other key is its positive
    pos2 = torch.tensor([[False, True], [True, False]])
    d = info_nce(z[:2], z[:2], pos2, torch.eye(2, dtype=torch.bool), 0.1, "dcl")
    assert d.n_dropped.item() == 2 and d.loss.item() == 0.0
    pp = info_nce(z[:2], z[:2], pos2, torch.eye(2, dtype=torch.bool), 0.1, "per_pair")
    assert pp.n_anchors.item() == 2 and pp.loss.item() == pytest.approx(0.0, abs=1e-7)  # -log(1)


def test_stable_for_tiny_temperature_and_under_autocast():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g, requires_grad=True)
    src, uid = torch.arange(4).repeat(2), torch.arange(8)
    pos, excl = gr_masks(src, uid, src, uid)
    res = info_nce(z, z, pos, excl, temperature=1e-3, normalize=False)  # logits ~ 1e4
    res.loss.backward()
    assert torch.isfinite(res.loss) and torch.isfinite(z.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = z.detach().bfloat16()
        amp = info_nce(zb, zb, pos, excl, 0.1)
    assert amp.loss.dtype == torch.float32
    ref = info_nce(zb.float(), zb.float(), pos, excl, 0.1)
    assert amp.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)


def test_info_nce_rejects_bad_input():
    z = torch.randn(3, 4)
    ok = torch.zeros(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode"):
        info_nce(z, z, ok, mode="ntxent")
    with pytest.raises(ValueError, match="temperature"):
        info_nce(z, z, ok, temperature=0)
    with pytest.raises(ValueError, match="pos_mask"):
        info_nce(z, z, torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        info_nce(z, z, ok.float())
    with pytest.raises(ValueError, match="embedding size"):
        info_nce(z, torch.randn(3, 5), ok)


# ------------------------------------------------------------------------------- mask builders


def _m(n, pairs):
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, j in pairs:
        m[i, j] = True
    return m


def test_mask_builders_on_hand_made_provenance():
    # 6 views: volumes 0 and 1, partitions 0, 0, 1 each (two crops of partition 0 per volume)
    src = torch.tensor([0, 0, 0, 1, 1, 1])
    part = torch.tensor([0, 0, 1, 0, 0, 1])
    uid = torch.arange(6)
    eye = torch.eye(6, dtype=torch.bool)

    pos, excl = gr_masks(src, uid, src, uid)
    same_vol = [(i, j) for i in range(6) for j in range(6) if i != j and (i < 3) == (j < 3)]
    assert torch.equal(pos, _m(6, same_vol)) and torch.equal(excl, eye)

    pos, excl = gd_masks(part, uid, part, uid)
    p0, p1 = [0, 1, 3, 4], [2, 5]
    same_part = [(i, j) for g in (p0, p1) for i in g for j in g if i != j]
    assert torch.equal(pos, _m(6, same_part)) and torch.equal(excl, eye)

    pos, excl = gd_minus_masks(src, part, uid, src, part, uid)
    assert torch.equal(pos, _m(6, [(0, 1), (1, 0), (3, 4), (4, 3)]))
    other_vol_same_part = [(0, 3), (0, 4), (1, 3), (1, 4), (3, 0), (4, 0), (3, 1), (4, 1), (2, 5), (5, 2)]
    assert torch.equal(excl, eye | _m(6, other_vol_same_part))
    # negatives of view 0 under G^D-: exactly the other partitions (views 2 and 5)
    assert (~pos[0] & ~excl[0]).nonzero().flatten().tolist() == [2, 5]

    lab = torch.tensor([1, 1, -1, 0, 1, -1])
    pos, excl = label_masks(lab, uid, lab, uid)
    assert torch.equal(pos, _m(6, [(0, 1), (1, 0), (0, 4), (4, 0), (1, 4), (4, 1)])) and torch.equal(
        excl, eye
    )

    # rectangular, and through ContrastIds / build_masks
    q = ContrastIds(uid=uid[:2], source_id=src[:2], partition=part[:2])
    k = ContrastIds(uid=uid, source_id=src, partition=part)
    pos, excl = build_masks("gd_minus", q, k)
    assert pos.shape == (2, 6) and torch.equal(pos, _m(6, [(0, 1), (1, 0), (3, 4), (4, 3)])[:2])
    with pytest.raises(ValueError, match="label"):
        build_masks("label", q, k)
    with pytest.raises(ValueError, match="integer"):
        gr_masks(src.float(), uid, src, uid)


# --------------------------------------------------------------------------------------- queue


def test_queue_ring_state_and_masks(tmp_path):
    qu = KeyQueue(size=4, dim=3)
    keys = torch.arange(18, dtype=torch.float32).reshape(6, 3)
    ids = ContrastIds(uid=torch.arange(10, 16), source_id=torch.tensor([0, 0, 1, 1, 2, 2]))
    qu.push(keys[:3], ContrastIds(uid=ids.uid[:3], source_id=ids.source_id[:3]))
    assert len(qu) == 3
    qu.push(keys[3:], ContrastIds(uid=ids.uid[3:], source_id=ids.source_id[3:]))
    # ring: slots hold keys 4, 5, 2, 3 (key 4 overwrote slot 0 ...)
    assert qu.uid.tolist() == [14, 15, 12, 13] and torch.equal(qu.keys[0], keys[4]) and len(qu) == 4

    torch.save(qu.state_dict(), tmp_path / "q.pt")
    fresh = KeyQueue(size=4, dim=3)
    fresh.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    for name in ("keys", "uid", "source_id", "filled", "ptr"):
        assert torch.equal(getattr(fresh, name), getattr(qu, name))

    # query uid 12 (its stale copy sits in the queue), source 1; batch key uid 20 is its other view
    q_ids = ContrastIds(uid=torch.tensor([12]), source_id=torch.tensor([1]))
    b_ids = ContrastIds(uid=torch.tensor([20]), source_id=torch.tensor([1]))
    all_keys, key_ids, pos, excl = fresh.masks_with_batch("gr", q_ids, torch.zeros(1, 3), b_ids)
    assert all_keys.shape == (5, 3) and key_ids.uid.tolist() == [20, 14, 15, 12, 13]
    assert pos[0].tolist() == [True, False, False, False, True]  # batch view + stale copy of the other view
    assert excl[0].tolist() == [False, False, False, True, False]  # own stale copy: never a negative
    _, _, pos, excl = fresh.masks_with_batch("gr", q_ids, torch.zeros(1, 3), b_ids, queue_positives=False)
    assert pos[0].tolist() == [True, False, False, False, False]
    assert excl[0].tolist() == [False, False, False, True, True]

    half = KeyQueue(size=4, dim=3)
    half.push(keys[:1], ContrastIds(uid=torch.tensor([5])))
    _, _, pos, excl = half.masks_with_batch(
        "label",
        ContrastIds(uid=torch.tensor([9]), label=torch.tensor([0])),
        torch.zeros(2, 3),
        ContrastIds(uid=torch.tensor([1, 2]), label=torch.tensor([0, 1])),
    )
    assert excl[0].tolist() == [False, False, False, True, True, True]  # 3 unfilled slots never used
    assert pos[0].tolist() == [True, False, False, False, False, False]

    assert queue_size_for(4096, 1000, 64) == 936 and queue_size_for(100, 1000, 64) == 100
    assert queue_size_for(10, 20, 64) == 0


# --------------------------------------------------------------------------------------- MoCHi


def test_mochi_extra_negatives_equal_appended_keys_and_mix_hardest():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 6, generator=g, dtype=torch.float64)
    k = torch.randn(9, 6, generator=g, dtype=torch.float64)
    pos = torch.zeros(3, 9, dtype=torch.bool)
    pos[0, 0] = pos[1, 1] = pos[2, 2] = True
    excl = torch.zeros(3, 9, dtype=torch.bool)
    excl[:, 3] = True
    m = mochi_negatives(
        q, k, pos, excl, n_hard=4, n_mix=5, n_query_mix=3, generator=torch.Generator().manual_seed(7)
    )
    assert m.negatives.shape == (3, 8, 6) and m.valid.all()
    torch.testing.assert_close(m.negatives.norm(dim=-1), torch.ones(3, 8, dtype=torch.float32))
    m2 = mochi_negatives(
        q, k, pos, excl, n_hard=4, n_mix=5, n_query_mix=3, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(m.negatives, m2.negatives)
    neg64 = m.negatives.double()
    for mode in ("per_pair", "supcon", "dcl"):
        a = info_nce(q, k, pos, excl, 0.2, mode, extra_negatives=neg64, extra_mask=m.valid)
        keys2, pos2, excl2 = mochi_as_keys(k, pos, excl, m._replace(negatives=neg64))
        b = info_nce(q, keys2, pos2, excl2, 0.2, mode)
        torch.testing.assert_close(a.loss, b.loss)
        base = info_nce(q, k, pos, excl, 0.2, mode)
        assert a.loss > base.loss  # more (hard) negatives, higher loss
    # n_hard=1: pairwise mixes equal the single hardest negative; query mixes lie between q and it
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    sims = (qn @ kn.T).masked_fill(pos | excl, -2)
    hardest = kn[sims.argmax(1)]
    one = mochi_negatives(
        q, k, pos, excl, n_hard=1, n_mix=2, n_query_mix=2, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(
        one.negatives[:, :2].double(), hardest[:, None].expand(3, 2, 6), rtol=1e-5, atol=1e-6
    )
    qm = one.negatives[:, 2:].double()
    assert ((qm @ qn[..., None]).squeeze(-1) >= (hardest * qn).sum(-1, keepdim=True) - 1e-6).all()
    # a query with no negative gets no valid synthetic negative
    none = mochi_negatives(q, k, torch.ones(3, 9, dtype=torch.bool), None, n_hard=2, n_mix=1, n_query_mix=1)
    assert not none.valid.any()


# ---------------------------------------------------------------------------------- local loss


def _view_affine(source, offset, shape, flip=(), scale=1.0, perm=(0, 1, 2)):
    """view voxel -> source mm: permute axes (90-degree rotation with a flip), flip, scale about the
    view centre, then place at ``offset`` (source voxels) in a source with affine ``source``."""
    m = torch.eye(4, dtype=torch.float64)
    p = torch.zeros(3, 3, dtype=torch.float64)
    for out_ax, in_ax in enumerate(perm):
        p[out_ax, in_ax] = 1.0
    m[:3, :3] = p
    f = torch.eye(4, dtype=torch.float64)
    for ax in flip:
        f[ax, ax] = -1.0
        f[ax, 3] = shape[perm[ax]] - 1  # flip inside the crop box
    s = torch.eye(4, dtype=torch.float64)
    s[:3, :3] *= scale
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    s[:3, 3] = centre * (1 - scale)
    t = torch.eye(4, dtype=torch.float64)
    t[:3, 3] = torch.tensor(offset, dtype=torch.float64)
    return source @ t @ s @ f @ m


SOURCE = torch.tensor(
    [[1.0, 0, 0, -20.0], [0, 1.5, 0, 7.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]], dtype=torch.float64
)
W_FEAT = torch.tensor(
    [[0.3, -0.2, 0.1], [0.05, 0.4, -0.1], [-0.2, 0.1, 0.25], [0.1, 0.1, 0.1]], dtype=torch.float64
)


def _linear_features(affine, view_shape, stride):
    """``[1, 4, d, h, w]`` feature map g(mm) = W mm + c at the feature-voxel centres of a strided map."""
    d = [s // stride for s in view_shape]
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in d], indexing="ij"), -1)
    v = (idx + 0.5) * (torch.tensor(view_shape, dtype=torch.float64) / torch.tensor(d)) - 0.5
    mm = v @ affine[:3, :3].T + affine[:3, 3]
    g = mm @ W_FEAT.T + torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    return g.permute(3, 0, 1, 2)[None].contiguous()


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_read_features_convention_on_strided_maps(stride):
    shape = (8, 12, 16)
    a = _view_affine(SOURCE, (3, 2, 1), shape, flip=(1,))
    feat = _linear_features(a, shape, stride)
    pts = torch.rand(1, 50, 3, generator=torch.Generator().manual_seed(stride), dtype=torch.float64)
    lo = 0.5 * stride - 0.5
    hi = torch.tensor(shape, dtype=torch.float64) - 0.5 - 0.5 * stride
    pts = lo + pts * (hi - lo)
    got = read_features(feat, pts, shape)[0]
    mm = pts[0] @ a[:3, :3].T + a[:3, 3]
    want = mm @ W_FEAT.T + torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_local_points_correspond_under_shift_flip_rotation_scale():
    sa, sb = (12, 12, 10), (10, 10, 10)
    a = _view_affine(SOURCE, (4, 2, 3), sa)
    b = _view_affine(SOURCE, (7, 4, 2), sb, flip=(0, 2), scale=1.25, perm=(1, 0, 2))
    affa, affb = a[None].repeat(2, 1, 1), b[None].repeat(2, 1, 1)
    pts = sample_overlap_points(
        affa,
        sa,
        affb,
        sb,
        40,
        feat_shape_a=(6, 6, 5),
        feat_shape_b=(5, 5, 5),
        generator=torch.Generator().manual_seed(0),
    )
    assert pts.valid.all() and pts.pair_ok.all()
    # same source position in mm
    torch.testing.assert_close(pts.pa @ a[:3, :3].T + a[:3, 3], pts.pb @ b[:3, :3].T + b[:3, 3])
    fa = read_features(torch.cat([_linear_features(a, sa, 2)] * 2), pts.pa, sa)
    fb = read_features(torch.cat([_linear_features(b, sb, 2)] * 2), pts.pb, sb)
    torch.testing.assert_close(fa, fb, rtol=1e-9, atol=1e-9)
    c = F.cosine_similarity(fa, fb, dim=-1)
    assert (c > 1 - 1e-12).all()  # positive similarity maximal
    # not hollow: ignoring the flip/rotation of b (a plain shifted crop) breaks correspondence
    wrong = _view_affine(SOURCE, (7, 4, 2), sb, scale=1.25)
    fw = read_features(torch.cat([_linear_features(wrong, sb, 2)] * 2), pts.pb, sb)
    assert (fw - fa).abs().max() > 0.1


def test_local_loss_masks_match_loop_reference_and_radius():
    sa = sb = (8, 8, 8)
    a = torch.stack([_view_affine(SOURCE, (0, 0, 0), sa), _view_affine(SOURCE, (5, 5, 5), sa)])
    b = torch.stack([_view_affine(SOURCE, (2, 1, 3), sb, flip=(2,)), _view_affine(SOURCE, (30, 30, 30), sb)])
    g = torch.Generator().manual_seed(11)
    fa = torch.randn(2, 5, 4, 4, 4, generator=g, dtype=torch.float64)
    fb = torch.randn(2, 5, 4, 4, 4, generator=g, dtype=torch.float64)
    radius, k, t = 2.5, 12, 0.3
    res = local_contrastive_loss(
        fa,
        fb,
        a,
        b,
        sa,
        n_points=k,
        radius_mm=radius,
        temperature=t,
        generator=torch.Generator().manual_seed(5),
    )
    assert res.n_pairs_dropped.item() == 1  # the second pair does not overlap
    pts = sample_overlap_points(
        a,
        sa,
        b,
        sb,
        k,
        feat_shape_a=(4, 4, 4),
        feat_shape_b=(4, 4, 4),
        generator=torch.Generator().manual_seed(5),
    )
    assert pts.valid[0].all() and not pts.valid[1].any()
    za = read_features(fa, pts.pa, sa)[0]
    zb = read_features(fb, pts.pb, sb)[0]
    z = torch.cat([za, zb])
    pos = torch.zeros(2 * k, 2 * k, dtype=torch.bool)
    excl = torch.zeros(2 * k, 2 * k, dtype=torch.bool)
    n_neg_excluded = 0
    for i in range(2 * k):
        for j in range(2 * k):
            dist = math.dist(pts.mm[0, i % k].tolist(), pts.mm[0, j % k].tolist())
            if j == (i + k) % (2 * k):
                pos[i, j] = True
            elif i == j or dist <= radius:
                excl[i, j] = True
                n_neg_excluded += i != j
    assert n_neg_excluded > 0  # the radius matters in this case
    ref, kept, _ = ref_info_nce(z, z, pos, excl, t, "per_pair")
    assert res.n_anchors.item() == kept == 2 * k
    torch.testing.assert_close(res.loss, ref)


def test_local_loss_cross_volume_and_oblique():
    # two volumes of one partition: correspondence by normalised foreground-box position
    sa = (8, 8, 8)
    src_b = SOURCE.clone()
    src_b[:3, :3] *= 1.3
    norm_a = torch.diag(torch.tensor([1 / 20, 1 / 30, 1 / 40, 1.0], dtype=torch.float64))
    norm_b = torch.diag(torch.tensor([1 / 26, 1 / 39, 1 / 52, 1.0], dtype=torch.float64))
    norm_a[:3, 3] = torch.tensor([1.0, -0.2, -0.1])
    norm_b[:3, 3] = torch.tensor([0.9, -0.15, -0.05])
    a = _view_affine(SOURCE, (2, 2, 2), sa)[None]
    b = _view_affine(src_b, (1, 2, 3), sa, flip=(0,))[None]
    pts = sample_overlap_points(
        a, sa, b, sa, 30, norm_a=norm_a[None], norm_b=norm_b[None], generator=torch.Generator().manual_seed(2)
    )
    assert pts.valid.all()
    na = pts.pa[0] @ (norm_a @ a[0])[:3, :3].T + (norm_a @ a[0])[:3, 3]
    nb = pts.pb[0] @ (norm_b @ b[0])[:3, :3].T + (norm_b @ b[0])[:3, 3]
    torch.testing.assert_close(na, nb)
    torch.testing.assert_close(
        correspondence(a, b, norm_a[None], norm_b[None])[0], torch.linalg.inv(norm_b @ b[0]) @ norm_a @ a[0]
    )
    # oblique: b rotated by 30 degrees about the k axis; rejection sampling keeps points inside b only
    th = math.radians(30)
    rot = torch.eye(4, dtype=torch.float64)
    rot[:2, :2] = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    rot[:3, 3] = torch.tensor([6.0, 2.0, 1.0])
    bo = (SOURCE @ rot)[None]
    p = sample_overlap_points(a, sa, bo, sa, 25, generator=torch.Generator().manual_seed(3), oversample=8)
    assert p.valid.sum() > 10
    inside = ((p.pb >= -1e-6) & (p.pb <= 7 + 1e-6)).all(-1)
    assert inside[p.valid].all()
    torch.testing.assert_close(
        p.pa[0] @ a[0, :3, :3].T + a[0, :3, 3], p.pb[0] @ bo[0, :3, :3].T + bo[0, :3, 3]
    )
    # the loss runs with gradients on a strided map, reproducibly
    fa = torch.randn(1, 6, 4, 4, 4, requires_grad=True)
    fb = torch.randn(1, 6, 4, 4, 4, requires_grad=True)
    r1 = local_contrastive_loss(fa, fb, a, bo, sa, n_points=16, generator=torch.Generator().manual_seed(4))
    r2 = local_contrastive_loss(fa, fb, a, bo, sa, n_points=16, generator=torch.Generator().manual_seed(4))
    assert r1.loss.item() == r2.loss.item() and r1.n_anchors.item() > 0
    r1.loss.backward()
    assert fa.grad.abs().sum() > 0 and fb.grad.abs().sum() > 0


def test_local_loss_no_overlap_is_zero_with_grad():
    sa = (8, 8, 8)
    a = _view_affine(SOURCE, (0, 0, 0), sa)[None]
    b = _view_affine(SOURCE, (40, 0, 0), sa)[None]
    f = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    res = local_contrastive_loss(f, f, a, b, sa, n_points=8)
    assert res.loss.item() == 0.0 and res.loss.requires_grad
    assert res.n_pairs_dropped.item() == 1 and res.n_anchors.item() == 0


def test_view_pairs_and_local_loss_for_views():
    src, part = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    assert view_pairs(src).tolist() == [[0, 1], [2, 3]]
    assert view_pairs(src, part, cross_volume=True).tolist() == [[0, 2], [1, 3]]
    sa = (8, 8, 8)
    aff = torch.stack([_view_affine(SOURCE, (i, 2 * i, 1), sa, flip=(i % 3,)) for i in range(4)])
    vb = ViewBatch(
        views=torch.zeros(4, 1, *sa),
        source_id=src,
        partition=part,
        affine=aff,
        norm=torch.eye(4, dtype=torch.float64).repeat(4, 1, 1),
    )
    feat = torch.randn(4, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    pairs = view_pairs(src)
    got = local_loss_for_views(feat, vb, pairs, n_points=10, generator=torch.Generator().manual_seed(1))
    want = local_contrastive_loss(
        feat[[0, 2]],
        feat[[1, 3]],
        aff[[0, 2]],
        aff[[1, 3]],
        sa,
        n_points=10,
        generator=torch.Generator().manual_seed(1),
    )
    assert got.loss.item() == want.loss.item() and got.n_anchors.item() == 40


# ---------------------------------------------------------------------------------------- VoCo


def test_voco_targets_by_hand():
    src = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    base = torch.stack([_view_affine(src, (4 * i, 4 * j, 0), (4, 4, 4)) for i in range(2) for j in range(2)])
    rand = torch.stack(
        [
            _view_affine(src, (2, 1, 0), (4, 4, 4)),  # plain crop
            _view_affine(src, (2, 1, 0), (4, 4, 4), flip=(0,)),  # same box, flipped
            _view_affine(src, (6, 6, 0), (2, 2, 4)),  # inside base (1, 1)
        ]
    )
    t = voco_overlap_targets(rand[:2], (4, 4, 4), base, (4, 4, 4))
    # x overlap 2/4 with both rows; y overlap 3/4 with column 0, 1/4 with column 1; z full
    hand = torch.tensor([6 / 16, 2 / 16, 6 / 16, 2 / 16], dtype=torch.float64)
    torch.testing.assert_close(t, hand.expand(2, 4))
    t3 = voco_overlap_targets(rand[2:], (2, 2, 4), base, (4, 4, 4))
    torch.testing.assert_close(t3, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    # a 2x zoomed-out random crop (4 voxels of 2 mm) covers [-0.5, 7.5] in x, y and [-2.5, 5.5] in z:
    # each base crop holds a quarter of it in x-y and half in z
    zoom = _view_affine(src, (2, 2, 0), (4, 4, 4), scale=2.0)
    torch.testing.assert_close(
        voco_overlap_targets(zoom[None], (4, 4, 4), base, (4, 4, 4)),
        torch.full((1, 4), 0.125, dtype=torch.float64),
    )
    rot = torch.eye(4, dtype=torch.float64)
    rot[:2, :2] = torch.tensor([[0.8, -0.6], [0.6, 0.8]])
    with pytest.raises(ValueError, match="axis-aligned"):
        voco_overlap_targets(rot[None], (4, 4, 4), base, (4, 4, 4))


def test_voco_paper_form_by_hand():
    r = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # [1, 2, 2] random crops
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # [1, 3, 2] base crops
    y = torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]])
    res = voco_loss(r, q, y, form="paper", reg_weight=0.5)
    logits = [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]]  # cosines, negatives clamped to 0
    pred = (
        -sum(math.log(1 - abs(y[0, i, j].item() - logits[i][j]) + 1e-6) for i in range(2) for j in range(3))
        / 6
    )
    reg = (abs(0.0) + abs(-1.0) + abs(0.0)) / 3
    assert res.pred_pos.item() == pytest.approx(pred, rel=1e-5)
    assert res.reg.item() == pytest.approx(reg, rel=1e-6)
    assert res.loss.item() == pytest.approx(pred + 0.5 * reg, rel=1e-5)


def test_voco_code_form_matches_loop_reference_with_teacher():
    g = torch.Generator().manual_seed(0)
    b, nr, nb, d = 2, 3, 4, 5
    rs = torch.randn(b, nr, d, generator=g, requires_grad=True)
    qs = torch.randn(b, nb, d, generator=g, requires_grad=True)
    rt, qt = torch.randn(b, nr, d, generator=g), torch.randn(b, nb, d, generator=g)
    y = torch.rand(b, nr, nb, generator=g)
    y[y < 0.4] = 0.0
    res = voco_loss(rs, qs, y, form="code", teacher_rand_emb=rt, teacher_base_emb=qt)

    rs2, qs2 = rs.detach().clone().requires_grad_(), qs.detach().clone().requires_grad_()
    pos_t, neg_t, reg_t = 0.0, 0.0, 0.0
    for v in range(b):
        logits = torch.zeros(nr, nb)
        for i in range(nr):
            for j in range(nb):
                l1 = F.relu(F.cosine_similarity(rs2[v, i], qt[v, j], dim=0))
                l2 = F.relu(F.cosine_similarity(rt[v, i], qs2[v, j], dim=0))
                logits[i, j] = (l1 + l2) / 2
        lab = y[v]
        pos_t = pos_t + (-lab * torch.log(1 - (lab - logits).abs() + 1e-6)).sum() / (lab.sum() + 1e-6)
        neg_lab = (lab == 0).float()
        neg_t = neg_t + (neg_lab * logits**2).sum() / (neg_lab.sum() + 1e-6)
        reg, n = 0.0, 0
        for i in range(nb - 1):
            for j in range(i + 1, nb):
                reg = reg + F.relu(F.cosine_similarity(qs2[v, i], qs2[v, j].detach(), dim=0)) ** 2
                n += 1
        reg_t = reg_t + reg / n
    pos_t, neg_t, reg_t = pos_t / b, neg_t / b, reg_t / b
    torch.testing.assert_close(res.pred_pos, pos_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.pred_neg, neg_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.reg, reg_t, rtol=1e-5, atol=1e-6)
    res.loss.backward()
    (pos_t + neg_t + reg_t).backward()
    torch.testing.assert_close(rs.grad, rs2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(qs.grad, qs2.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        voco_loss(rs, qs, y, form="paper", teacher_rand_emb=rt, teacher_base_emb=qt)


# ------------------------------------------------------------------------------ reconstruction


def test_masked_reconstruction_by_hand():
    pred = torch.zeros(1, 2, 1, 1, 3, requires_grad=True)
    target = torch.tensor([[[[[1.0, 2.0, 100.0]]], [[[3.0, -1.0, 100.0]]]]])
    mask = torch.tensor([[[[[True, True, False]]]]])
    l2 = masked_reconstruction_loss(pred, target, mask, "l2")
    l1 = masked_reconstruction_loss(pred, target, mask, "l1")
    assert l2.item() == pytest.approx((1 + 4 + 9 + 1) / 4)  # unmasked 100s ignored
    assert l1.item() == pytest.approx((1 + 2 + 3 + 1) / 4)
    l2.backward()
    assert pred.grad[..., 2].abs().sum() == 0
    none = masked_reconstruction_loss(pred, target, torch.zeros_like(mask), "l1")
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="mask"):
        masked_reconstruction_loss(pred, target, mask.float(), "l1")
