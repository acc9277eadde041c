"""Views rendered after the transfer: the stream ships render plans and sub-boxes, never views, and rendering
them gives the views the worker path renders (bit for bit on the CPU), for every sampler of the shipped
recipes."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch

from medcl.config import load_config
from medcl.core.device import cuda_available
from medcl.core.provenance import ViewBatch
from medcl.engine.seeding import generator_for
from medcl.engine.stream import StreamLoader, StreamSampler
from medcl.pretrain import PretrainConfig
from medcl.pretrain.data import PretrainStream, collate_views, render_views
from medcl.views import CropSpec, PartitionViewSampler, RandomViewSampler, SourceVolume, SpatialAugment
from medcl.views.crop import _linear_views, _sample_views, render
from medcl.views.pending import PendingViews

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "pretrain"
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
OPTIONAL = ("mask", "target", "role", "targets", "match")


def _small(cfg_path: Path) -> list[str]:
    """Every view set at 16^3 (VoCo base crops 8^3), pair samplers with 2 crops and 3 candidates."""
    cfg = load_config(PretrainConfig, cfg_path)
    out = []
    for name, v in cfg.views.items():
        size = 8 if v.kind == "position" else 16
        out.append(f"views.{name}.crop=[{size},{size},{size}]")
        if v.kind == "pair":
            out += [f"views.{name}.crops_per_volume=2", f"views.{name}.candidates=3"]
    return out


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """Six phantoms (32^3), decoded once (RAM cache)."""
    from medcl.data import CaseDataset, load_manifest, write_phantom_dataset
    from medcl.data.plan import PreprocessingPlan

    root = write_phantom_dataset(tmp_path_factory.mktemp("ph") / "ph", n=6, size=32, seed=0)
    cfg = load_config(PretrainConfig, CONFIGS / "gd.yaml")
    assert isinstance(cfg.data.plan, PreprocessingPlan)
    ds = CaseDataset(load_manifest(root), cfg.data.plan, with_label=False, cache="ram")
    for i in range(len(ds)):
        ds[i]
    return ds


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside dicts, lists, tuples and dataclasses."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []


def _assert_same_batch(a: ViewBatch, b: ViewBatch, what: str) -> None:
    assert torch.equal(a.views, b.views), f"{what}: views differ (max {float((a.views - b.views).abs().max())})"
    for name in ("source_id", "partition", "affine", "norm", *OPTIONAL):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), f"{what}: {name} set in one path only"
        if x is not None:
            assert torch.equal(x, y), f"{what}: {name} differs"


@pytest.mark.parametrize("recipe", RECIPES)
def test_stream_ships_no_view_and_renders_the_worker_views(recipe, volumes):
    """For every shipped recipe (every sampler kind they use: partition, random, position, feature-matched
    candidate pairs, SSIM-mined pairs, block masking): the deferred item holds no tensor of the views' shape
    and no image larger than its volume, and rendering it equals the worker path bit for bit."""
    path = CONFIGS / f"{recipe}.yaml"
    cfg = load_config(PretrainConfig, path, _small(path))
    sets = sorted({t.views for t in cfg.terms.values()})
    deferred = PretrainStream(volumes, cfg, sets, render="device")
    worker = PretrainStream(volumes, cfg, sets, render="worker")
    vol_shapes = {tuple(volumes[i]["image"].shape[1:]) for i in range(len(volumes))}
    for position in (0, 3, 7):  # 7: second epoch
        item, ref = deferred[position], worker[position]
        for name in sets:
            pv, vb = item["views"][name], ref["views"][name]
            assert isinstance(pv, PendingViews) and isinstance(vb, ViewBatch)
            shape = tuple(vb.views.shape)
            for t in _tensors(item):
                assert tuple(t.shape) != shape and not (t.ndim == 5 and tuple(t.shape[2:]) == shape[2:]), (
                    f"{recipe}/{name}: the item holds a rendered view {tuple(t.shape)}")
            for image in pv.images:
                assert any(all(a <= b for a, b in zip(image.shape[1:], s)) for s in vol_shapes)
            assert pv.out_shape == shape[2:] and len(pv) == len(vb)
        rendered = render_views(collate_views([item]))
        for name in sets:
            _assert_same_batch(rendered["views"][name], ref["views"][name], f"{recipe}/{name}@{position}")
        assert torch.equal(torch.cat(list(item["uid"].values())), torch.cat(list(ref["uid"].values())))
        assert item["stats"].keys() == ref["stats"].keys()


def test_dataloader_output_holds_no_rendered_view(volumes):
    """Through the job's loader (a worker process, collation): no rendered view crosses it, and the batch
    rendered after it is the collated worker-rendered batch."""
    path = CONFIGS / "gd_local.yaml"
    cfg = load_config(PretrainConfig, path, _small(path))
    deferred = PretrainStream(volumes, cfg, ["partition"])
    assert deferred.render == "device"  # the default
    worker = PretrainStream(volumes, cfg, ["partition"], render="worker")
    loader = StreamLoader(deferred, StreamSampler(2, 3), collate_fn=collate_views, num_workers=1)
    batches = list(loader)
    assert len(batches) == 3
    for b, batch in enumerate(batches):
        pv = batch["views"]["partition"]
        assert isinstance(pv, PendingViews)
        n, d = len(pv), pv.out_shape
        assert not any(t.ndim == 5 and tuple(t.shape[2:]) == d for t in _tensors(batch)), "a rendered view in the batch"
        ref = collate_views([worker[p] for p in range(2 * b, 2 * b + 2)])
        out = render_views(batch)["views"]["partition"]
        assert len(out) == n
        _assert_same_batch(out, ref["views"]["partition"], f"batch {b}")


@pytest.mark.parametrize("padding", ["border", "zeros", "reflection"])
def test_sub_box_with_shifted_maps_equals_the_full_volume(padding):
    """Cropped volume + maps shifted by the box start == full volume + maps: bit for bit for gathered and
    scaled axis-aligned views (positions in float64), to float rounding for oblique maps (grid_sample)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 30, 26, 22, generator=g).cumsum(1)
    vol = SourceVolume(image, torch.diag(torch.tensor([1.2, 1.0, 2.0, 1.0], dtype=torch.float64)), None, 1)
    aug = SpatialAugment(flip_prob=0.5, rot90_prob=0.5, scale_prob=0.7, scale_range=(0.7, 1.4))
    for seed in range(6):
        sampler = RandomViewSampler(CropSpec(10), n_views=4, fg_prob=0.5, augment=aug, padding_mode=padding)
        pv = sampler.plan(vol, generator_for(seed, 0, 0))
        # push two views partly outside the volume: padding must be reproduced from the sub-box
        vox = pv.jobs[0].vox_map.clone()
        vox[0, :3, 3] -= 7.3
        vox[1, :3, 3] += torch.tensor([20.0, 3.0, 12.0], dtype=torch.float64)
        job = type(pv.jobs[0])(0, vox, pv.out_shape, padding, pv.jobs[0].intensity, pv.jobs[0].noise_seed)
        pv = PendingViews([image], [job], pv.source_id, pv.partition, vol.affine @ vox, pv.norm)
        sub = pv.crop()
        assert all(a <= b for a, b in zip(sub.images[0].shape, image.shape))
        assert torch.equal(sub.render().views, pv.render().views), (padding, seed)
    # an oblique map: grid_sample on the sub-box, equal to float32 coordinate rounding
    theta = torch.tensor(0.3, dtype=torch.float64)
    rot = torch.eye(4, dtype=torch.float64)
    rot[:2, :2] = torch.tensor([[torch.cos(theta), -torch.sin(theta)], [torch.sin(theta), torch.cos(theta)]])
    rot[:3, 3] = torch.tensor([8.0, 6.5, 5.0], dtype=torch.float64)
    job = type(pv.jobs[0])(0, rot[None], (8, 8, 8), padding)
    pv = PendingViews([image], [job], torch.zeros(1, dtype=torch.long), torch.full((1,), -1), rot[None], rot[None])
    assert torch.allclose(pv.crop().render().views, pv.render().views, atol=1e-4)


@pytest.mark.parametrize("padding", ["border", "zeros", "reflection"])
def test_separable_trilinear_equals_grid_sample(padding):
    """The axis-aligned path is grid_sample's trilinear interpolation (and padding), without its float32
    coordinate rounding."""
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 12, 9, 10, generator=g, dtype=torch.float64)
    vm = torch.zeros(3, 4, 4, dtype=torch.float64)
    vm[:, 3, 3] = 1
    vm[0, :3, :3] = torch.diag(torch.tensor([0.8, 1.3, 0.5], dtype=torch.float64))
    vm[1, :3, :3] = torch.tensor([[0.0, 0.0, -1.7], [1.1, 0.0, 0.0], [0.0, 0.9, 0.0]], dtype=torch.float64)
    vm[2, :3, :3] = torch.diag(torch.tensor([1.0, 2.5, 1.0], dtype=torch.float64))
    vm[:, :3, 3] = torch.tensor([[-3.2, 1.4, 2.0], [14.1, -2.6, 0.3], [5.5, -9.0, 11.7]], dtype=torch.float64)
    ours = _linear_views(image, vm, (7, 6, 9), padding)
    ref = _sample_views(image, vm, (7, 6, 9), padding, "bilinear")
    assert torch.allclose(ours, ref, atol=1e-10), float((ours - ref).abs().max())
    assert torch.equal(render(image, vm, (7, 6, 9), padding_mode=padding), ours)


def test_intensity_noise_comes_from_the_drawn_seed():
    """Immediate and deferred rendering draw the same numbers from the stream's generator: the noise comes
    from a generator seeded by one drawn seed, so the generator is left in the same state either way."""
    vol = SourceVolume(torch.randn(1, 20, 20, 20), torch.eye(4, dtype=torch.float64), None, 0)
    from medcl.views import IntensityAugment

    sampler = PartitionViewSampler(CropSpec(8), partitions=2, intensity=IntensityAugment(noise_prob=1.0))
    g1, g2 = generator_for(3, 0, 0), generator_for(3, 0, 0)
    views = sampler(vol, g1).views
    pending = sampler.plan(vol, g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert pending.jobs[0].noise_seed is not None
    assert torch.equal(pending.crop().render().views, views)


def test_the_data_module_and_the_step_render_deferred_batches(volumes):
    """PretrainDataModule.on_after_batch_transfer (the job's loader) and PretrainModule.rendered (the start of the
    step, for any other loader) turn a deferred batch into the worker batch; a rendered batch passes through."""
    from medcl.pretrain.data import PretrainDataModule
    from medcl.pretrain.module import PretrainModule

    path = CONFIGS / "mae.yaml"
    cfg = load_config(PretrainConfig, path, _small(path) + ["backbone.filters=[8,16,32]", "backbone.strides=[1,2,2]"])
    stream = PretrainStream(volumes, cfg, ["masked"])
    deferred = collate_views([stream[p] for p in range(2)])
    ref = collate_views([PretrainStream(volumes, cfg, ["masked"], render="worker")[p] for p in range(2)])
    dm, module = PretrainDataModule(stream, cfg), PretrainModule(cfg, {})
    for out in (dm.on_after_batch_transfer(deferred, 0), module.rendered(deferred)):
        _assert_same_batch(out["views"]["masked"], ref["views"]["masked"], "module")
    assert dm.on_after_batch_transfer(ref, 0) is ref and module.rendered(ref) is ref


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_rendered_on_the_gpu_equals_the_cpu(volumes):
    """On a GPU (noise aside: a CUDA generator draws other numbers from the same seed)."""
    path = CONFIGS / "gd_local.yaml"
    cfg = load_config(PretrainConfig, path, _small(path))
    stream = PretrainStream(volumes, cfg, ["partition"])
    batch = collate_views([stream[p] for p in range(2)])
    pv = batch["views"]["partition"]
    for job in pv.jobs:
        if job.intensity is not None:
            job.intensity["noise_std"].zero_()
    cpu = render_views(batch)["views"]["partition"]
    gpu = render_views({**batch, "views": {"partition": pv.pin_memory().to("cuda")}})["views"]["partition"]
    assert gpu.views.is_cuda and gpu.affine.is_cuda
    assert torch.allclose(gpu.views.cpu(), cpu.views, atol=1e-5)


def test_far_apart_views_ship_two_small_boxes_not_one_large():
    """Two crops at opposite corners: one sub-box each (less than their covering box), still bit-identical;
    copies of one crop share one box."""
    g = torch.Generator().manual_seed(2)
    image = torch.randn(1, 64, 64, 40, generator=g)
    vol = SourceVolume(image, torch.eye(4, dtype=torch.float64), None, 0)
    sampler = RandomViewSampler(CropSpec(12), n_views=3, augment=SpatialAugment(scale_prob=1.0), intensity="default")
    pv = sampler.plan(vol, generator_for(0, 0, 0))
    vox = pv.jobs[0].vox_map.clone()
    vox[0, :3, 3] = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)
    vox[1, :3, 3] = torch.tensor([48.0, 47.0, 25.0], dtype=torch.float64)
    vox[2] = vox[1]
    vox[2, :3, 3] += 0.5  # a copy of view 1, half a voxel away: shares its box
    job = type(pv.jobs[0])(0, vox, pv.out_shape, "border", pv.jobs[0].intensity, pv.jobs[0].noise_seed)
    pv = PendingViews([image], [job], pv.source_id, pv.partition, vol.affine @ vox, pv.norm)
    sub = pv.crop()
    assert len(sub.images) == 2 and sub.jobs[0].image == (0, 1, 1)
    shipped = sum(im[0].numel() for im in sub.images)
    assert shipped < image[0].numel() / 4
    assert torch.equal(sub.render().views, pv.render().views)
