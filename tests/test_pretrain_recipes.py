"""The shipped pretraining recipes (configs/pretrain/*.yaml), loaded unmodified, do what their names say:
the positive / exclusion masks of their contrastive terms, the pairing of their local terms, the phase schedule
and freezing of gd+local, the anatomical feature matcher and its candidates, VoCo as published, and the
anatomical ablations (each exactly anatomical.yaml minus one term)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from medcl.config import load_config, read_yaml, to_dict
from medcl.core.provenance import ViewBatch
from medcl.data import write_phantom_dataset
from medcl.losses import build_masks
from medcl.models import build_backbone
from medcl.pretrain import PretrainConfig, run_pretrain
from medcl.pretrain.matching import FeatureMatcher
from medcl.pretrain.terms import UID_STRIDE, _copy_pairs, _cross_volume_pairs, _ids, build_term

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))

# what each shipped recipe's contrastive terms must be: the positives of Chaitanya et al. (2020) and the
# matched cross-volume positives of the structural / anatomical methods
EXPECTED_STRATEGY = {
    "gr": "gr", "gd": "gd", "gd_minus": "gd-", "gd_local": "gd", "gd_local_joint": "gd", "structural": "match",
    "anatomical": "match", "anatomical_contrast_only": "match",
}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "ph", n=12, size=32, seed=0)


def _batch(n_vol: int = 3, parts: int = 2, copies: int = 2, match: bool = False) -> tuple[ViewBatch, torch.Tensor]:
    """A hand-made batch: ``n_vol`` volumes x ``parts`` partitions x ``copies`` copies, in that order; for
    ``match``: volumes in pairs (0, 1), (2, ...), each crop of a volume matched to the same crop of its pair."""
    rows = [(v, p, c) for v in range(n_vol) for p in range(parts) for c in range(copies)]
    n = len(rows)
    src = torch.tensor([r[0] for r in rows])
    part = torch.tensor([r[1] for r in rows])
    uid = torch.tensor([r[0] * UID_STRIDE + i for i, r in enumerate(rows)])
    grp = None
    if match:
        # a group is named by a row: the copy-0 crop of the first volume of the pair
        grp = torch.tensor([next(j for j, s in enumerate(rows) if s == ((v // 2) * 2, p, 0)) for v, p, c in rows])
    eye = torch.eye(4, dtype=torch.float64).expand(n, 4, 4).clone()
    vb = ViewBatch(views=torch.zeros(n, 1, 4, 4, 4), source_id=src, partition=part, affine=eye, norm=eye, match=grp)
    return vb, uid


def _reference(strategy: str, vb: ViewBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks by their definitions, one pair at a time."""
    n = len(vb.source_id)
    pos = torch.zeros(n, n, dtype=torch.bool)
    exc = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            same_src = bool(vb.source_id[i] == vb.source_id[j])
            same_part = bool(vb.partition[i] == vb.partition[j])
            if i == j:
                exc[i, j] = True
            elif strategy == "gr":
                pos[i, j] = same_src
            elif strategy == "gd":
                pos[i, j] = same_part
            elif strategy == "gd-":
                pos[i, j] = same_src and same_part
                exc[i, j] = same_part and not same_src
            elif strategy == "match":
                pos[i, j] = bool(vb.match[i] == vb.match[j]) and int(vb.match[i]) >= 0
    return pos, exc


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_builds_the_masks_its_name_says(recipe):
    cfg = load_config(PretrainConfig, CONFIGS / f"{recipe}.yaml")
    backbone = build_backbone(cfg.backbone)
    contrastive = {n: t for n, t in cfg.terms.items() if t.kind == "contrastive"}
    assert bool(contrastive) == (recipe in EXPECTED_STRATEGY), f"{recipe}: contrastive terms {list(contrastive)}"
    for name, t in contrastive.items():
        assert t.strategy == EXPECTED_STRATEGY[recipe], f"{recipe}.{name}: strategy {t.strategy}"
        assert t.mode == "per_pair", f"{recipe}.{name}: the shipped denominator is Chaitanya et al.'s per-pair form"
        term = build_term(name, t, backbone, cfg.views[t.views])
        vb, uid = _batch(match=t.strategy == "match")
        pos, exc = build_masks(term.strategy, _ids(vb, uid, t.strategy), _ids(vb, uid, t.strategy))
        ref_pos, ref_exc = _reference(t.strategy, vb)
        assert torch.equal(pos, ref_pos), f"{recipe}.{name}: positives"
        assert torch.equal(exc, ref_exc), f"{recipe}.{name}: exclusions"


def test_gr_gd_and_gd_minus_differ_as_the_paper_says():
    """On one batch: G^D- positives (same volume and partition) are the intersection of G^R's (same volume) and
    G^D's (same partition); G^D- excludes what G^D calls positive in other volumes."""
    vb, uid = _batch()
    ids = _ids(vb, uid, "gd")
    gr, _ = build_masks("gr", ids, ids)
    gd, _ = build_masks("gd", ids, ids)
    gdm, gdm_exc = build_masks("gd_minus", ids, ids)
    assert torch.equal(gdm, gr & gd)
    assert torch.equal(gdm_exc & ~torch.eye(len(uid), dtype=torch.bool), gd & ~gr)
    assert (gd & ~gr).any() and (gr & ~gd).any()  # the batch distinguishes all three


def test_local_terms_pair_copies_or_volumes_as_configured():
    """gd_local pairs the two augmented copies of each crop; a cross-volume local term pairs the same partition
    of two different volumes."""
    cfg = load_config(PretrainConfig, CONFIGS / "gd_local.yaml")
    local = cfg.terms["local"]
    assert local.kind == "local" and not local.cross_volume
    vb, uid = _batch(n_vol=3, parts=4, copies=cfg.views[local.views].copies)
    a, b = _copy_pairs(vb, uid, cfg.views[local.views].copies)
    assert len(a) == 3 * 4
    assert torch.equal(vb.source_id[a], vb.source_id[b]) and torch.equal(vb.partition[a], vb.partition[b])
    assert (a != b).all() and len(set(a.tolist()) | set(b.tolist())) == 24  # every view used once
    a, b = _cross_volume_pairs(vb, uid, 2)
    assert len(a) == 3 * 4
    assert torch.equal(vb.partition[a], vb.partition[b]) and (vb.source_id[a] != vb.source_id[b]).all()


def test_gd_local_freezes_exactly_the_configured_stages_from_the_configured_step(phantoms, tmp_path, monkeypatch):
    """gd_local.yaml unmodified (4 steps): the encoder and bottleneck move during the global phase and stay fixed
    from step round(0.5 * 4) = 2 on, while the decoder moves only in the local phase."""
    cfg = load_config(PretrainConfig, CONFIGS / "gd_local.yaml")
    assert [(p.until, p.terms, p.frozen) for p in cfg.phases] == [(0.5, ["global"], []),
                                                                    (1.0, ["local"], ["encoder", "bottleneck"])]
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            snaps[trainer.global_step] = {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}

    import medcl.pretrain.run as run_mod

    make = run_mod.make_trainer
    monkeypatch.setattr(run_mod, "make_trainer", lambda *a, callbacks=None, **k: make(
        *a, callbacks=[*(callbacks or []), Snap()], **k))
    out = run_pretrain(CONFIGS / "gd_local.yaml", phantoms, tmp_path / "run", max_steps=4, progress=False,
                       overrides=["trainer.num_workers=0"], device="cpu")
    L.seed_everything(cfg.seed, verbose=False)
    init = build_backbone(cfg.backbone).state_dict()

    def moved(a: dict, b: dict, prefix: tuple[str, ...]) -> bool:
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix) and a[k].is_floating_point())

    enc, dec = ("encoder", "bottleneck"), ("decoder",)
    assert moved(init, snaps[2], enc), "the encoder did not train in the global phase"
    assert not moved(init, snaps[2], dec), "the decoder moved while no term used it"
    assert not moved(snaps[2], snaps[4], enc), "the encoder moved while frozen"
    assert moved(snaps[2], snaps[4], dec), "the decoder did not train in the local phase"
    assert (out / "backbone.pt").is_file()


def test_feature_matcher_rejects_a_low_confidence_match_and_accepts_a_planted_one():
    """The anatomical recipe's matcher (threshold, margin from anatomical.yaml): anchor 0's candidate 2 is the
    anchor itself (planted, accepted), anchor 1's candidates all point away from it (rejected), anchor 2 has two
    equally good candidates (accepted with the shipped margin 0, rejected with a positive margin)."""
    cfg = load_config(PretrainConfig, CONFIGS / "anatomical.yaml")
    v = cfg.views["pairs"]
    n, m, d = 3, 4, 8
    g = torch.Generator().manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    cands = torch.nn.functional.normalize(torch.randn(n, m, d, generator=g), dim=-1)
    cands[0, 2] = anchors[0]
    cands[1] = -anchors[1] + 0.05 * torch.randn(m, d, generator=g)
    cands[2, 1] = cands[2, 3] = anchors[2]
    emb = torch.cat([anchors, cands.reshape(n * m, d)])  # the ViewBatch order: anchors, then candidates
    views = emb.reshape(-1, 1, d, 1, 1)  # the fake teacher's bottleneck is the view itself
    role = torch.cat([torch.zeros(n), 1 + torch.arange(m).repeat(n)]).long()
    eye = torch.eye(4, dtype=torch.float64).expand(len(emb), 4, 4).clone()
    vb = ViewBatch(views=views, source_id=torch.cat([torch.zeros(n), torch.ones(n * m)]).long(),
                   partition=torch.full((len(emb),), -1), affine=eye, norm=eye, role=role,
                   match=torch.cat([torch.arange(n), torch.arange(n).repeat_interleave(m)]))
    uid = torch.arange(len(emb))

    class Teacher:
        def __call__(self, x, upto):
            return type("Out", (), {"bottleneck": x})()

    matcher = FeatureMatcher(v.feature_threshold, v.feature_margin, warmup_steps=0)
    out, out_uid, stats = matcher(vb, uid, step=10, teacher_backbone=Teacher())
    assert out.match.tolist() == [0, -1, 2, 0, -1, 2]
    assert torch.equal(out.views[3].flatten(), anchors[0]) and out_uid[3] == n + 0 * m + 2
    assert float(stats["acceptance"]) == pytest.approx(2 / 3)
    strict = FeatureMatcher(v.feature_threshold, 0.1, warmup_steps=0)
    assert strict(vb, uid, step=10, teacher_backbone=Teacher())[0].match.tolist() == [0, -1, -1, 0, -1, -1]
    # during warm-up the geometric proposal (candidate 0) is taken where it lies mostly inside B
    warm = FeatureMatcher(v.feature_threshold, v.feature_margin, warmup_steps=100)
    inside = torch.tensor([[0.9, 0, 0, 0], [0.2, 1, 1, 1], [0.6, 0, 0, 0]])
    o, u, _ = warm(vb, uid, step=10, teacher_backbone=Teacher(), inside=inside)
    assert o.match.tolist() == [0, -1, 2, 0, -1, 2] and u[3:].tolist() == [n + 0, n + m, n + 2 * m]


def test_candidate_pairs_lie_around_the_normalised_proposal():
    """CandidatePairSampler with the anatomical recipe's settings: candidate 0 is the normalised-position
    proposal (snapped to B's grid), the others lie within search_mm of it along each axis, in anchor-major
    order, and the inside fractions are in [0, 1]."""
    from medcl.views import SourceVolume
    from medcl.views.candidates import CandidatePairSampler
    from medcl.views.crop import CropSpec
    from medcl.views.mining import NormalisedMatcher

    cfg = load_config(PretrainConfig, CONFIGS / "anatomical.yaml")
    v = cfg.views["pairs"]
    g = torch.Generator().manual_seed(1)
    a = SourceVolume(torch.rand(1, 40, 44, 36, generator=g), torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0]).double()),
                     None, 0, "a")
    b_aff = torch.diag(torch.tensor([1.2, 0.9, 1.1, 1.0]).double())
    b_aff[:3, 3] = torch.tensor([5.0, -3.0, 2.0])
    b = SourceVolume(torch.rand(1, 36, 50, 40, generator=g), b_aff, None, 1, "b")
    sampler = CandidatePairSampler(CropSpec(tuple(v.crop)), n_crops=v.crops_per_volume, candidates=v.candidates,
                                   search_mm=v.search_mm, fg_prob=1.0)
    vb, info = sampler(a, b, torch.Generator().manual_seed(2))
    n, m = v.crops_per_volume, v.candidates
    assert len(vb.views) == n * (1 + m)
    assert vb.role.tolist() == [0] * n + [1 + j for _ in range(n) for j in range(m)]
    assert vb.match.tolist() == list(range(n)) + [k for k in range(n) for _ in range(m)]
    assert (vb.source_id[:n] == 0).all() and (vb.source_id[n:] == 1).all()
    proposal = NormalisedMatcher().propose(a, b, vb.affine[:n], tuple(v.crop))
    centre = torch.tensor([(s - 1) / 2 for s in v.crop] + [1.0], dtype=torch.float64)
    cand_c = (vb.affine[n:] @ centre)[:, :3].reshape(n, m, 3)
    prop_c = (proposal @ centre)[:, :3]
    spacing = b_aff.diagonal()[:3]
    assert torch.allclose(cand_c[:, 0], prop_c, atol=float(spacing.max()) / 2 + 1e-6)  # snapped to B's voxels
    assert ((cand_c - prop_c[:, None]).abs() <= v.search_mm + spacing.max() / 2 + 1e-6).all()
    assert (cand_c[:, 1:] - cand_c[:, :1]).abs().amax() > 1.0  # the search moves the candidates
    assert ((info["inside"] >= 0) & (info["inside"] <= 1)).all() and info["inside"].shape == (n, m)


def test_voco_as_published_beats_a_constant_predictor(phantoms, tmp_path):
    """configs/pretrain/voco.yaml unmodified (only steps and data): the overlap predictions on held-back volumes
    beat the best constant predictor (the mean target) after 100 steps; the recipe is the released code's
    (average-pooled encoder stages and bottleneck, teacher momentum 0.9, code form) on a batch-norm DynUNet."""
    cfg = load_config(PretrainConfig, CONFIGS / "voco.yaml")
    t = cfg.terms["voco"]
    assert (t.pool, t.form, cfg.ema.momentum, cfg.backbone.norm) == ("avg", "code", 0.9, "batch")
    run = run_pretrain(CONFIGS / "voco.yaml", phantoms, tmp_path / "voco", max_steps=100, progress=False,
                       device="cpu")
    last = json.loads((run / "summary.json").read_text())["probe_last"]
    assert last["step"] == 100 and last["probe/voco_mae"] < last["probe/voco_const_mae"], last


@pytest.mark.parametrize("ablation,removed", [("anatomical_contrast_only", "recon"), ("reconstruction", "global")])
def test_anatomical_ablations_remove_exactly_one_term(ablation, removed):
    """Each ablation resolves to anatomical.yaml minus exactly one term (and the view set only that term used);
    everything else, the EMA teacher included, is identical."""
    full = to_dict(load_config(PretrainConfig, CONFIGS / "anatomical.yaml"))
    abl = to_dict(load_config(PretrainConfig, CONFIGS / f"{ablation}.yaml"))
    expected = copy.deepcopy(full)
    view = expected["terms"].pop(removed)["views"]
    if all(t["views"] != view for t in expected["terms"].values()):
        expected["views"].pop(view)
    expected["method"] = ablation
    assert abl == expected
    assert read_yaml(CONFIGS / f"{ablation}.yaml")["method"] == ablation


def test_recipes_resolve_through_base_to_the_configs_they_were_before():
    """The recipes inherit seed, data, backbone, optim, trainer and monitor from base/common.yaml; each resolves to
    exactly the config it had before the inheritance (tests/data/pretrain_recipes_resolved.json), except for the
    renamed key (optim.warmup_steps -> optim.lr_warmup_steps) and the keys added since (threads, device,
    terms.*.target_norm, data.render, the nnU-Net backbone fields)."""
    before = json.loads((Path(__file__).parent / "data" / "pretrain_recipes_resolved.json").read_text())
    assert sorted(set(RECIPES) - set(before)) == ["mae"]  # the one recipe added since
    for name in before:
        now = to_dict(load_config(PretrainConfig, CONFIGS / f"{name}.yaml"))
        assert (now.pop("threads"), now.pop("device")) == (None, "auto")
        now["optim"]["warmup_steps"] = now["optim"].pop("lr_warmup_steps")
        assert all(t.pop("target_norm") == "none" for t in now["terms"].values())  # added since, default kept
        assert now["data"].pop("render") == "device"
        nnunet_fields = {k: now["backbone"].pop(k) for k in ("plans", "preset", "blocks", "decoder_blocks", "conv_bias")}
        assert nnunet_fields == {"plans": None, "preset": None, "blocks": None, "decoder_blocks": None,
                                 "conv_bias": True}  # added since, unused by the DynUNet / SwinUNETR recipes
        assert now == before[name], name
        raw = (CONFIGS / f"{name}.yaml").read_text()
        assert "base: base/common.yaml" in raw and "trainer:" not in raw, f"{name} repeats what the base holds"


def test_yaml_base_inheritance_merges_mappings_and_refuses_cycles(tmp_path):
    from medcl.core.errors import MedclConfigError

    (tmp_path / "a.yaml").write_text("x: {p: 1, q: [1, 2]}\ny: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nx: {q: [9]}\nz: 4\n")
    assert read_yaml(tmp_path / "b.yaml") == {"x": {"p": 1, "q": [9]}, "y": 3, "z": 4}
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(MedclConfigError, match="cycle"):
        read_yaml(tmp_path / "c.yaml")


# --------------------------------------------------------------------------------------------------- MAE
def _mae_step(phantoms, overrides=()):
    """One batch of configs/pretrain/mae.yaml through the stream, the backbone and its reconstruction term."""
    from medcl.data import CaseDataset, load_manifest
    from medcl.pretrain.data import PretrainStream, collate_views, render_views
    from medcl.pretrain.terms import StepContext

    cfg = load_config(PretrainConfig, CONFIGS / "mae.yaml", list(overrides))
    m = load_manifest(phantoms)
    ds = CaseDataset(m, cfg.data.plan, with_label=False, cache="none")
    stream = PretrainStream(ds, cfg, ["masked"])
    batch = render_views(collate_views([stream[p] for p in range(2)]))
    torch.manual_seed(0)
    net = build_backbone(cfg.backbone)
    term = build_term("recon", cfg.terms["recon"].__class__(**{**cfg.terms["recon"].__dict__,
                                                               "stage": net.decoder_stage_names[-1]}),
                      net, cfg.views["masked"])
    vb = batch["views"]["masked"]
    out = net(vb.views)

    def loss(views=None) -> float:
        v = vb if views is None else views
        ctx = StepContext(views={"masked": v}, uid={}, student={"masked": out}, teacher=None,
                          generator=torch.Generator(), step=0)
        return float(term.compute(ctx)[0])

    return cfg, vb, loss


def test_mae_recipe_masks_blocks_matched_to_the_stride_and_fills_them(phantoms):
    """mae.yaml: 75% of the 8^3 blocks (the encoder's total stride) masked; the encoder sees the fill value (0)
    at every masked voxel and the original intensities elsewhere."""
    cfg, vb, _ = _mae_step(phantoms)
    v = cfg.views["masked"]
    stride = build_backbone(cfg.backbone).total_stride
    assert v.mask_block == stride[0] and 0.6 <= v.mask_ratio <= 0.75 and cfg.terms["recon"].target_norm == "block"
    mask = vb.mask.expand_as(vb.views)
    assert torch.all(vb.views[mask] == 0.0)
    assert torch.equal(vb.views[~mask], vb.target[~mask])
    assert abs(float(vb.mask.float().mean()) - v.mask_ratio) < 1e-6  # 32^3 is tiled by the blocks
    # whole blocks: every 8^3 block is either fully masked or fully visible
    blocks = vb.mask.float().reshape(len(vb.mask), 1, 4, 8, 4, 8, 4, 8).mean(dim=(3, 5, 7))
    assert torch.all((blocks == 0) | (blocks == 1))


def test_mae_loss_ignores_visible_voxels_and_is_zero_without_masking(phantoms):
    from dataclasses import replace

    _, vb, loss = _mae_step(phantoms)
    base = loss()
    assert base > 0
    changed = vb.target.clone()
    changed[~vb.mask.expand_as(changed)] += 5.0  # only visible voxels, whole blocks: their normalised targets move
    assert loss(replace(vb, target=changed)) == pytest.approx(base, rel=1e-6)
    # mask ratio 0 (the config refuses it for a reconstruction recipe, so the term gets a batch masked at 0%)
    from medcl.views.masking import block_mask

    views, mask, target = block_mask(vb.target, 0.0, 8, torch.Generator().manual_seed(0))
    assert not mask.any() and loss(replace(vb, views=views, mask=mask, target=target)) == 0.0
