"""medcl.views: geometry of the views (against MONAI and an independent interpolation), samplers,
VoCo targets, SSIM (against scikit-image), mining, masking, reproducibility."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    AdjustContrast,
    Flip,
    GaussianSmooth,
    Resize,
    Rotate90,
    ScaleIntensity,
    ShiftIntensity,
    SpatialCrop,
)
from scipy import ndimage
from skimage.metrics import structural_similarity

from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.core.provenance import ROLE_BASE, ROLE_RANDOM, ViewBatch
from medcl.engine.seeding import generator_for
from medcl.losses.position import voco_overlap_targets
from medcl.views import (
    BlockMasking,
    CropSpec,
    CrossVolumePairSampler,
    IntensityAugment,
    NormalisedMatcher,
    PartitionViewSampler,
    PositionViewSampler,
    RandomViewSampler,
    SourceVolume,
    SpatialAugment,
    SSIMMatcher,
    apply_intensity,
    block_mask,
    ssim3d,
)
from medcl.views.augment import PLANES, make_draw
from medcl.views.base import ViewSamplerBase
from medcl.views.crop import inside_fraction

NO_INTENSITY = None




def gen(seed: int = 0) -> torch.Generator:
    return generator_for(seed, 0, 0)


def world_field(affine: torch.Tensor, shape: tuple[int, int, int], wavelength: float = 60.0) -> torch.Tensor:
    """A smooth intensity defined in world mm, voxelised through ``affine``: ``[1, X, Y, Z]`` float32."""
    idx = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in shape), indexing="ij"), -1)
    xyz = idx @ affine[:3, :3].T + affine[:3, 3]
    return field_at(xyz, wavelength)[None].float()


def field_at(xyz: torch.Tensor, wavelength: float = 60.0) -> torch.Tensor:
    k = 2 * math.pi / wavelength
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    return torch.sin(k * x + 0.3) + 0.7 * torch.cos(0.8 * k * y - 0.5) + 0.5 * torch.sin(1.3 * k * z + 0.9 * k * x)


def view_world(affine: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``[N, D, H, W, 3]`` world mm of every view voxel."""
    idx = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in shape), indexing="ij"), -1)
    return torch.einsum("nij,dhwj->ndhwi", affine[:, :3, :3], idx) + affine[:, None, None, None, :3, 3]


def permuted_affine(spacing=(2.0, 1.0, 1.0)) -> torch.Tensor:
    """Array axis 0 -> Superior, 1 -> Left, 2 -> Posterior (no obliquity)."""
    a = torch.zeros(4, 4, dtype=torch.float64)
    a[2, 0] = spacing[0]
    a[0, 1] = -spacing[1]
    a[1, 2] = -spacing[2]
    a[:3, 3] = torch.tensor([30.0, 40.0, -20.0])
    a[3, 3] = 1.0
    return a


def vox_of(batch: ViewBatch, vol: SourceVolume) -> torch.Tensor:
    return torch.linalg.inv(vol.affine) @ batch.affine


# ----------------------------------------------------------------------------------- geometry vs MONAI
@pytest.mark.parametrize("flip_axis,plane,k", [(None, -1, 0), (0, -1, 0), (None, 0, 1), (1, 0, 3), (2, 0, 2), (0, 0, 1)])
def test_crop_flip_rot90_equal_monai_metatensor(flip_axis, plane, k):
    """Our crop + flip + rot90 is exactly MONAI's SpatialCrop -> Flip -> Rotate90: voxels and tracked affine."""
    torch.manual_seed(0)
    aff = permuted_affine((2.0, 1.5, 1.5))  # axes 1 and 2 share a spacing: plane (1, 2) of the source
    img = torch.randn(2, 20, 22, 18)
    vol = SourceVolume(img, aff, None, 0)
    out = (6, 8, 5)
    base = ViewSamplerBase(CropSpec(out), orient="source")
    flip = torch.zeros(1, 3, dtype=torch.bool)
    if flip_axis is not None:
        flip[0, flip_axis] = True
    draw = make_draw(flip, torch.tensor([plane]), torch.tensor([k]))
    extent = (base.linear(vol, draw).abs() @ torch.tensor(out, dtype=torch.float64))[0]
    start = torch.tensor([3, 4, 5])
    vox = base.vox_maps(vol, (start + (extent - 1) / 2)[None], draw, clamp=False)
    ours = base.render(vol, vox, gen(), intensity=False)[0]

    ref = SpatialCrop(roi_start=start.tolist(), roi_end=(start + extent.long()).tolist())(MetaTensor(img, affine=aff))
    if flip_axis is not None:
        ref = Flip(spatial_axis=flip_axis)(ref)
    if plane >= 0:
        ref = Rotate90(k=k, spatial_axes=PLANES[plane])(ref)
    assert torch.equal(ref.as_tensor(), ours)
    assert torch.allclose(ref.affine.double(), aff @ vox[0], atol=1e-9)


def test_scaled_crop_equals_monai_resize():
    """A scaled view is MONAI's SpatialCrop -> Resize (trilinear): same affine, same voxels."""
    torch.manual_seed(1)
    aff = permuted_affine()
    img = torch.randn(1, 20, 22, 18)
    vol = SourceVolume(img, aff, None, 0)
    out = (6, 8, 4)
    base = ViewSamplerBase(CropSpec(out), orient="source")
    draw = make_draw(scale=torch.tensor([[1.5, 1.5, 1.5]]))
    extent = torch.tensor([9.0, 12.0, 6.0])
    start = torch.tensor([3, 4, 5])
    vox = base.vox_maps(vol, (start + (extent - 1) / 2)[None], draw, clamp=False)
    ours = base.render(vol, vox, gen(), intensity=False)[0]
    ref = SpatialCrop(roi_start=start.tolist(), roi_end=(start + extent.long()).tolist())(MetaTensor(img, affine=aff))
    ref = Resize(out, mode="trilinear", align_corners=False)(ref)
    assert torch.allclose(ref.affine.double(), aff @ vox[0], atol=1e-9)
    assert torch.allclose(ref.as_tensor(), ours, atol=1e-5)


# -------------------------------------------------------------------------------- correspondences
def _aniso_volume():
    aff = torch.tensor(
        [[1.0, 0, 0, -20.0], [0, 1.0, 0, 5.0], [0, 0, 2.0, 10.0], [0, 0, 0, 1]], dtype=torch.float64
    )  # RAS, spacing (1, 1, 2)
    shape = (40, 40, 24)
    return SourceVolume(world_field(aff, shape), aff, torch.tensor([[8, 8, 4], [32, 32, 20]]), 3)


CASES = {
    "flip": dict(flip=[[True, False, True]]),
    "rot90": dict(plane=[0], k=[1]),
    "scale": dict(scale=[[1.3, 1.3, 1.3]]),
    "flip+rot+scale": dict(flip=[[False, True, True]], plane=[0], k=[3], scale=[[0.8, 0.8, 0.8]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_augmented_copy_maps_each_point_to_the_same_anatomy(case):
    """View a (plain) and b (flipped / rotated / scaled copy of the same crop) on an anisotropic volume:
    b at inv(A_b) @ A_a @ v shows what a shows at v, and both show the world field at their affine."""
    vol = _aniso_volume()
    out = (12, 12, 6)
    base = ViewSamplerBase(CropSpec(out))
    kw = {key: torch.tensor(v) for key, v in CASES[case].items()}
    draw_b = make_draw(**kw)
    centre = torch.tensor([[19.5, 20.5, 11.5]], dtype=torch.float64)
    vox_a = base.vox_maps(vol, centre, make_draw(n=1), clamp=False)
    vox_b = base.vox_maps(vol, centre, draw_b, clamp=False)
    a = base.render(vol, vox_a, gen(), intensity=False)[0, 0]
    b = base.render(vol, vox_b, gen(), intensity=False)[0, 0]
    aff_a, aff_b = vol.affine @ vox_a, vol.affine @ vox_b
    # both views show the anatomy (the analytic field) at their world coordinates
    exact = case in ("flip", "rot90")
    tol = 1e-5 if exact else 0.02
    assert torch.allclose(a.double(), field_at(view_world(aff_a, out))[0], atol=1e-5)
    assert torch.allclose(b.double(), field_at(view_world(aff_b, out))[0], atol=tol)
    # corresponding points: sample b (independent trilinear interpolation) where a's voxels land
    corr = torch.linalg.inv(aff_b[0]) @ aff_a[0]
    idx = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in out), indexing="ij"), -1)
    q = idx @ corr[:3, :3].T + corr[:3, 3]
    inside = ((q >= 0) & (q <= torch.tensor(out, dtype=torch.float64) - 1)).all(-1)
    assert inside.float().mean() > 0.2
    b_at_q = ndimage.map_coordinates(b.numpy().astype(np.float64), q[inside].T.numpy(), order=1)
    assert np.allclose(b_at_q, a[inside].double().numpy(), atol=tol)
    if exact:  # whole-voxel correspondences
        assert torch.allclose(q, q.round(), atol=1e-9)


def oblique_affine() -> torch.Tensor:
    """Spacing (2, 1, 1), rotated 20 degrees about world z and 10 about x."""
    a, b = math.radians(20), math.radians(10)
    rz = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]], dtype=torch.float64)
    aff = torch.eye(4, dtype=torch.float64)
    aff[:3, :3] = rz @ rx @ permuted_affine((2.0, 1.0, 1.0))[:3, :3]
    aff[:3, 3] = torch.tensor([5.0, -7.0, 12.0])
    return aff


@pytest.mark.parametrize("oblique", [False, True])
def test_every_view_is_the_source_sampled_at_its_affine(oblique):
    """Independent trilinear interpolation (scipy) of the source at inv(A_src) @ A_view @ v equals the view."""
    torch.manual_seed(2)
    aff = oblique_affine() if oblique else permuted_affine((2.0, 1.0, 1.0))
    vol = SourceVolume(torch.randn(1, 24, 26, 26), aff, torch.tensor([[4, 4, 4], [20, 22, 22]]), 0)
    aug = SpatialAugment(flip_prob=0.5, rot90_prob=0.7, scale_prob=0.6, scale_range=(0.7, 1.4), isotropic_scale=False)
    sampler = PartitionViewSampler(CropSpec((8, 10, 6)), partitions=3, n_aug=3, augment=aug, intensity=NO_INTENSITY)
    batch = sampler(vol, gen(5))
    vox = vox_of(batch, vol)
    src = vol.image[0].double().numpy()
    idx = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in (8, 10, 6)), indexing="ij"), -1)
    scaled = 0
    for n in range(len(batch)):
        p = idx @ vox[n, :3, :3].T + vox[n, :3, 3]
        ref = ndimage.map_coordinates(src, p.reshape(-1, 3).T.numpy(), order=1, mode="nearest").reshape(8, 10, 6)
        assert np.allclose(batch.views[n, 0].double().numpy(), ref, atol=1e-4), n
        scaled += not torch.allclose(vox[n, :3, :3].abs().sum(0), torch.ones(3, dtype=torch.float64))
    assert scaled > 0  # the scaled (grid_sample) and unscaled (gather) paths were both checked
    assert scaled < len(batch)


@pytest.mark.parametrize("spacing,allowed", [((1.0, 1.0, 2.5), {0}), ((0.8, 2.0, 0.8), {1}), ((1.0, 2.0, 3.0), set())])
def test_rotation_never_in_a_plane_of_unequal_spacing(spacing, allowed):
    aff = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    vol = SourceVolume(torch.zeros(1, 30, 30, 30), aff, None, 0)
    aug = SpatialAugment(flip_prob=0.5, rot90_prob=1.0, scale_prob=0.0)
    sampler = RandomViewSampler(CropSpec(6), n_views=64, augment=aug, intensity=NO_INTENSITY)
    lin = vox_of(sampler(vol, gen(1)), vol)[:, :3, :3]
    mixes = set()
    for p, (a, b) in enumerate(PLANES):
        if bool((lin[:, a, b].abs() > 0.5).any()):
            mixes.add(p)
    assert mixes == allowed
    # a view axis always keeps the spacing of its source axis (no thick axis turned in-plane)
    along = vol.spacing[lin.abs().argmax(dim=1)]
    assert torch.allclose((vol.affine[:3, :3] @ lin).norm(dim=1), along)


# -------------------------------------------------------------------------------------- samplers
AFFINES = {
    "RAS": torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, -40], [0, 0, 0, 1]], dtype=torch.float64),
    "LPS": torch.tensor([[-1.0, 0, 0, 10], [0, -1.0, 0, 20], [0, 0, 2.0, 0], [0, 0, 0, 1]], dtype=torch.float64),
    "S-first": permuted_affine((2.0, 1.0, 1.0)),
    "I-first": permuted_affine((2.0, 1.0, 1.0)) @ torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64)),
}


def _si_volume(name: str) -> SourceVolume:
    """Intensity = world S coordinate (mm); S found only through the affine."""
    aff = AFFINES[name]
    s_axis = int(aff[2, :3].abs().argmax())
    shape = [32, 32, 32]
    shape[s_axis] = 40
    box = torch.tensor([[8, 8, 8], [24, 24, 24]])
    box[:, s_axis] = torch.tensor([6, 34])
    idx = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in shape), indexing="ij"), -1)
    z = (idx @ aff[2, :3] + aff[2, 3]).float()
    return SourceVolume(z[None], aff, box, 7)


@pytest.mark.parametrize("name", list(AFFINES))
def test_partition_crops_lie_in_their_superior_inferior_partition(name):
    vol = _si_volume(name)
    s_axis = int(vol.affine[2, :3].abs().argmax())
    box = vol.fg_box[:, s_axis].double() - 0.5
    z_ends = torch.stack([vol.affine[2, s_axis] * box + vol.affine[2, 3]])
    z_lo, z_hi = float(z_ends.min()), float(z_ends.max())
    half_voxel = 0.5 * float(vol.spacing[s_axis])
    sampler = PartitionViewSampler(CropSpec((8, 8, 4)), partitions=4, n_aug=2, intensity=NO_INTENSITY)
    for seed in range(3):
        batch = sampler(vol, gen(seed))
        assert batch.partition.tolist() == [0, 1, 2, 3] * 3
        centre = batch.affine @ torch.tensor([3.5, 3.5, 1.5, 1.0], dtype=torch.float64)
        zc = centre[:, 2]
        slab = (z_hi - z_lo) / 4
        lo = z_lo + batch.partition * slab - half_voxel
        hi = z_lo + (batch.partition + 1) * slab + half_voxel
        assert bool(((zc >= lo) & (zc <= hi)).all())
        # the voxels really come from there: the mean S coordinate of a (linear) view is its centre's
        assert torch.allclose(batch.views.mean(dim=(1, 2, 3, 4)).double(), zc, atol=1e-3)
        # u_S of the centre through the stored norm matrix gives the same partition
        u = (batch.norm @ centre[..., None])[:, 2, 0]
        assert bool(((u >= batch.partition / 4 - 0.02) & (u <= (batch.partition + 1) / 4 + 0.02)).all())
    # within="crop": the whole (unscaled) crop lies inside its slab
    whole = PartitionViewSampler(
        CropSpec((8, 8, 4)), partitions=4, n_aug=0, within="crop", augment=SpatialAugment(scale_prob=0.0), intensity=None
    )
    batch = whole(vol, gen(9))
    slab = (z_hi - z_lo) / 4
    vmin, vmax = batch.views.amin(dim=(1, 2, 3, 4)).double(), batch.views.amax(dim=(1, 2, 3, 4)).double()
    assert bool((vmin >= z_lo + batch.partition * slab - half_voxel - 1e-4).all())
    assert bool((vmax <= z_lo + (batch.partition + 1) * slab + half_voxel + 1e-4).all())


def test_partition_grid_and_other_axis():
    vol = _si_volume("S-first")
    grid = PartitionViewSampler(CropSpec(6), partitions=(2, 1, 3), n_aug=0, intensity=None)(vol, gen())
    assert grid.partition.tolist() == list(range(6))
    centre = grid.affine @ torch.tensor([2.5, 2.5, 2.5, 1.0], dtype=torch.float64)
    u = (grid.norm @ centre[..., None])[..., 0]
    # (a centre may sit up to half a voxel beyond the box face: clamp into the grid)
    cell = torch.stack([(u[:, 0] * 2).floor().clamp(0, 1), (u[:, 2] * 3).floor().clamp(0, 2)], 1)
    assert (cell[:, 0] * 3 + cell[:, 1]).long().tolist() == list(range(6))
    ap = PartitionViewSampler(CropSpec(6), partitions=2, axis="AP", n_aug=0, intensity=None)(vol, gen())
    u = (ap.norm @ (ap.affine @ torch.tensor([2.5, 2.5, 2.5, 1.0], dtype=torch.float64))[..., None])[..., 0]
    assert (u[:, 1] * 2).floor().clamp(0, 1).long().tolist() == [0, 1]
    with pytest.raises(MedclConfigError, match="views.axis"):
        PartitionViewSampler(partitions=4, axis="X")


def test_random_crops_biased_to_the_foreground():
    vol = SourceVolume(torch.zeros(1, 48, 48, 48), torch.eye(4, dtype=torch.float64), torch.tensor([[4, 4, 4], [16, 16, 16]]), 0)

    def in_fg(fg_prob: float) -> float:
        sampler = RandomViewSampler(CropSpec(12), n_views=200, fg_prob=fg_prob, intensity=None)
        centre = vox_of(sampler(vol, gen(3)), vol) @ torch.tensor([5.5, 5.5, 5.5, 1.0], dtype=torch.float64)
        return float(((centre[:, :3] >= 3.5) & (centre[:, :3] <= 15.5)).all(dim=1).double().mean())

    assert in_fg(0.9) > 0.8
    assert in_fg(0.0) < 0.15
    batch = RandomViewSampler(CropSpec(12), intensity=None)(vol, gen())
    assert len(batch) == 2 and batch.partition.tolist() == [-1, -1] and batch.source_id.tolist() == [0, 0]
    # crops are kept inside the volume
    assert torch.allclose(inside_fraction(vox_of(batch, vol), (12, 12, 12), vol.shape), torch.ones(2, dtype=torch.float64))


def test_random_views_with_max_offset_overlap():
    vol = _aniso_volume()
    sampler = RandomViewSampler(CropSpec(8), n_views=4, max_offset=0.25, augment=SpatialAugment(scale_prob=0), intensity=None)
    batch = sampler(vol, gen(4))
    for b in range(1, 4):
        overlap = voco_overlap_targets(batch.affine[b : b + 1], (8, 8, 8), batch.affine[:1], (8, 8, 8))
        assert float(overlap) > 0.1


def test_crop_in_mm():
    aff = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0], dtype=torch.float64))
    vol = SourceVolume(torch.zeros(1, 64, 64, 24), aff, None, 0)
    crop = CropSpec((32.0, 32.0, 40.0), unit="mm", out_shape=(16, 16, 16))
    batch = RandomViewSampler(crop, augment=SpatialAugment(scale_prob=0.0), intensity=None)(vol, gen())
    extent = batch.affine[:, :3, :3].norm(dim=1) * 16  # mm per view voxel x voxels
    assert torch.allclose(extent, torch.tensor([32.0, 32.0, 40.0], dtype=torch.float64).expand(2, 3))
    with pytest.raises(MedclConfigError, match="crop.out_shape"):
        CropSpec(30.0, unit="mm")


# ----------------------------------------------------------------------------------------- VoCo
def _voxel_sets(vox: torch.Tensor, shape: tuple[int, int, int]) -> list[set]:
    idx = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in shape), indexing="ij"), -1)
    pts = torch.einsum("nij,dhwj->ndhwi", vox[:, :3, :3], idx) + vox[:, None, None, None, :3, 3]
    return [set(map(tuple, p.reshape(-1, 3).round().long().tolist())) for p in pts]


@pytest.mark.parametrize("inside", [True, False])
def test_voco_targets_are_voxel_overlaps(inside):
    vol = SourceVolume(torch.randn(1, 36, 50, 36), torch.eye(4, dtype=torch.float64), None, 2)
    sampler = PositionViewSampler(CropSpec(4), grid=(3, 2, 2), n_random=6, inside=inside, intensity=None)
    batch = sampler(vol, gen(11))
    nb = 12
    assert batch.role.tolist() == [ROLE_BASE] * nb + [ROLE_RANDOM] * 6
    assert batch.partition.tolist() == list(range(nb)) + [-1] * 6
    assert torch.equal(batch.targets[:nb], torch.eye(nb))
    sets = _voxel_sets(vox_of(batch, vol), (4, 4, 4))
    region = set().union(*sets[:nb])
    assert len(region) == nb * 64  # base crops tile the region without overlap
    for r in range(nb, nb + 6):
        expect = [len(sets[r] & sets[j]) / 64 for j in range(nb)]
        assert np.allclose(batch.targets[r].numpy(), expect, atol=1e-6)
        assert math.isclose(float(batch.targets[r].sum()), len(sets[r] & region) / 64, abs_tol=1e-6)
        if inside:
            assert math.isclose(float(batch.targets[r].sum()), 1.0, abs_tol=1e-6)


def test_voco_straddling_crop_hand_example():
    vol = SourceVolume(torch.randn(1, 20, 20, 20), permuted_affine((1.5, 1.5, 1.5)), None, 0)
    batch = PositionViewSampler(CropSpec(4), grid=(2, 2, 2), intensity=None)(vol, gen())
    shift = torch.eye(4, dtype=torch.float64)
    shift[0, 3] = 2.0  # half a crop along view axis 0: half in base cell (0,0,0), half in (1,0,0)
    rand = batch.affine[:1] @ shift
    t = voco_overlap_targets(rand, (4, 4, 4), batch.affine[:8], (4, 4, 4))
    assert np.allclose(t.numpy(), [[0.5, 0, 0, 0, 0.5, 0, 0, 0]])
    shift[:3, 3] = torch.tensor([2.0, 2.0, 2.0])  # straddles all eight cells
    t = voco_overlap_targets(batch.affine[:1] @ shift, (4, 4, 4), batch.affine[:8], (4, 4, 4))
    assert np.allclose(t.numpy(), 0.125)


def test_voco_defaults_fit_a_hippocampus_sized_volume():
    aff = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    vol = SourceVolume(torch.randn(1, 36, 50, 36), aff, torch.tensor([[2, 5, 3], [33, 45, 34]]), 0)
    sampler = PositionViewSampler()
    batch = sampler(vol, gen())
    assert batch.views.shape == (12, 1, 16, 16, 16) and batch.targets.shape == (12, 8)
    assert torch.allclose(inside_fraction(vox_of(batch, vol)[:8], (16, 16, 16), vol.shape), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(batch.targets[8:].sum(1), torch.ones(4))


# ------------------------------------------------------------------------------------------ SSIM
def _smooth_noise(shape, seed, sigma=1.5):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma)


@pytest.mark.parametrize("shape,channels", [((16, 16, 16), 1), ((13, 17, 20), 2)])
def test_ssim_matches_skimage(shape, channels):
    pairs = []
    for s in range(3):
        a = np.stack([_smooth_noise(shape, 10 * s + c) for c in range(channels)])
        b = 0.7 * a + 0.3 * np.stack([_smooth_noise(shape, 100 + 10 * s + c) for c in range(channels)])
        pairs.append((a, b))
    x = torch.tensor(np.stack([p[0] for p in pairs]), dtype=torch.float32)
    y = torch.tensor(np.stack([p[1] for p in pairs]), dtype=torch.float32)
    dr = torch.tensor([float(p[0].max() - p[0].min()) for p in pairs])
    ours = ssim3d(x, y, dr)
    for i, (a, b) in enumerate(pairs):
        kw = dict(data_range=float(dr[i]), gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        ref = structural_similarity(a, b, channel_axis=0, **kw) if channels > 1 else structural_similarity(a[0], b[0], **kw)
        assert abs(float(ours[i]) - ref) < 1e-3
    # broadcasting candidates against one image equals pairwise calls
    cand = ssim3d(x[:1, None], y[None], dr[0])
    assert cand.shape == (1, 3)
    assert torch.allclose(cand[0], torch.stack([ssim3d(x[0], y[j], dr[0]) for j in range(3)]), atol=1e-6)
    assert float(ssim3d(x, x, dr).min()) > 0.999


def _shifted_pair(delta=(4, -4, 0)):
    big = torch.tensor(_smooth_noise((56, 56, 56), 7), dtype=torch.float32)
    big = (big - big.mean()) / big.std()
    a = big[4:52, 4:52, 4:52]
    b = big[4 + delta[0] : 52 + delta[0], 4 + delta[1] : 52 + delta[1], 4 + delta[2] : 52 + delta[2]]
    box = torch.tensor([[16, 16, 16], [32, 32, 32]])
    eye = torch.eye(4, dtype=torch.float64)
    return SourceVolume(a[None].clone(), eye, box, 0), SourceVolume(b[None].clone(), eye, box, 1)


def test_ssim_miner_finds_the_shift_and_rejects_noise():
    vol_a, vol_b = _shifted_pair((4, -4, 0))
    sampler = CrossVolumePairSampler(
        CropSpec(16), n_crops=4, matcher=SSIMMatcher(threshold=0.5, radius=1, step=4), augment=None, intensity=None
    )
    batch, info = sampler(vol_a, vol_b, gen(2))
    assert float(info["acceptance_rate"]) == 1.0 and bool((info["score"] > 0.99).all())
    assert batch.match.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert batch.source_id.tolist() == [0] * 4 + [1] * 4
    centre = torch.tensor([7.5, 7.5, 7.5, 1.0], dtype=torch.float64)
    moved = (batch.affine[4:] @ centre - batch.affine[:4] @ centre)[:, :3]
    assert torch.allclose(moved, torch.tensor([-4.0, 4.0, 0.0], dtype=torch.float64).expand(4, 3))
    assert torch.allclose(batch.views[:4], batch.views[4:])  # the matched crops show the same voxels

    noise = SourceVolume(torch.randn(1, 48, 48, 48), torch.eye(4, dtype=torch.float64), vol_b.fg_box, 1)
    batch, info = sampler(vol_a, noise, gen(2))
    assert float(info["acceptance_rate"]) == 0.0 and bool((info["score"] < 0.3).all())
    assert batch.match.tolist() == [-1] * 8  # never an invented positive


def test_normalised_matcher_keeps_the_normalised_position():
    aff_b = torch.tensor([[-1.5, 0, 0, 40], [0, -1.5, 0, 30], [0, 0, 1.5, -10], [0, 0, 0, 1]], dtype=torch.float64)  # LPS
    vol_a = SourceVolume(torch.randn(1, 40, 40, 40), torch.eye(4, dtype=torch.float64), torch.tensor([[5, 5, 5], [35, 30, 38]]), 0)
    vol_b = SourceVolume(torch.randn(1, 30, 30, 30), aff_b, torch.tensor([[3, 2, 4], [27, 28, 26]]), 1)
    sampler = CrossVolumePairSampler(CropSpec(7), n_crops=5, matcher=NormalisedMatcher(min_inside=0.0), augment=None, intensity=None)
    batch, info = sampler(vol_a, vol_b, gen(1))
    centre = torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    u = (batch.norm @ batch.affine @ centre)[:, :3]
    # the B crop is snapped to B's voxel grid: at most half a voxel (in u) from A's position
    tol = 0.5 / (vol_b.fg_box[1] - vol_b.fg_box[0]).double().min()
    assert torch.allclose(u[5:], u[:5], atol=float(tol))
    assert bool(info["accepted"].all()) and batch.match.tolist() == list(range(5)) * 2
    # same physical size and orientation in mm (a translation of A's crop)
    assert torch.allclose(batch.affine[5:, :3, :3], batch.affine[:5, :3, :3])


# --------------------------------------------------------------------------------------- masking
def test_block_mask_ratio_blocks_and_target():
    views = torch.randn(5, 2, 16, 16, 8)
    masked, mask, target = block_mask(views, 0.6, (4, 4, 4), gen(), fill=0.0)
    n_blocks = 4 * 4 * 2
    assert mask.shape == (5, 1, 16, 16, 8) and mask.dtype == torch.bool
    assert torch.allclose(mask.float().mean(dim=(1, 2, 3, 4)), torch.full((5,), round(0.6 * n_blocks) / n_blocks))
    blocks = mask.reshape(5, 4, 4, 4, 4, 2, 4).float()
    assert torch.equal(blocks.amin(dim=(2, 4, 6)), blocks.amax(dim=(2, 4, 6)))  # whole blocks
    assert torch.equal(target, views)
    assert bool((masked[mask.expand_as(masked)] == 0).all())
    assert torch.equal(masked[~mask.expand_as(masked)], views[~mask.expand_as(views)])
    assert not torch.equal(mask[0], mask[1])  # a different draw per view
    batch = PartitionViewSampler(CropSpec(8), partitions=2, intensity=None)(_aniso_volume(), gen())
    out = BlockMasking(ratio=0.5, block=2)(batch, gen())
    assert out.mask.shape == (4, 1, 8, 8, 8) and torch.equal(out.target, batch.views)
    assert torch.equal(out.affine, batch.affine)


# ------------------------------------------------------------------------------ intensity vs MONAI
def test_intensity_augmentation_equals_monai_transforms():
    torch.manual_seed(3)
    views = torch.randn(3, 2, 10, 12, 9)
    params = {
        "sigma": torch.tensor([[0.6, 1.1, 0.4], [0.0, 0.0, 0.0], [1.3, 0.3, 0.9]], dtype=torch.float64),
        "gamma": torch.tensor([1.3, 1.0, 0.8], dtype=torch.float64),
        "factor": torch.tensor([0.1, 0.0, -0.05], dtype=torch.float64),
        "offset": torch.tensor([0.0, 0.2, -0.1], dtype=torch.float64),
        "noise_std": torch.zeros(3, dtype=torch.float64),
    }
    ours = apply_intensity(views, params)
    for n in range(3):
        x = views[n]
        if bool((params["sigma"][n] > 0).any()):
            x = GaussianSmooth(sigma=tuple(params["sigma"][n].tolist()))(x)
        if float(params["gamma"][n]) != 1.0:
            x = AdjustContrast(gamma=float(params["gamma"][n]))(x)
        x = ScaleIntensity(minv=None, maxv=None, factor=float(params["factor"][n]))(x)
        x = ShiftIntensity(offset=float(params["offset"][n]))(x)
        assert torch.allclose(torch.as_tensor(x), ours[n], atol=1e-5), n
    # noise: drawn from the generator, std as drawn
    noisy = apply_intensity(torch.zeros(2, 1, 20, 20, 20), {**params, "sigma": torch.zeros(2, 3), "gamma": torch.ones(2),
                                                            "factor": torch.zeros(2), "offset": torch.zeros(2),
                                                            "noise_std": torch.tensor([0.0, 0.5])}, gen())
    assert float(noisy[0].abs().max()) == 0.0 and abs(float(noisy[1].std()) - 0.5) < 0.03


def test_intensity_never_changes_geometry():
    vol = _aniso_volume()
    plain = PartitionViewSampler(CropSpec(8), intensity=None)(vol, gen(8))
    aug = PartitionViewSampler(CropSpec(8), intensity=IntensityAugment(noise_prob=1.0, smooth_prob=1.0))(vol, gen(8))
    assert torch.equal(plain.affine, aug.affine) and not torch.equal(plain.views, aug.views)


# ------------------------------------------------------------------------- reproducibility, devices
def _all_samplers():
    return {
        "random": RandomViewSampler(CropSpec(12)),
        "partition": PartitionViewSampler(CropSpec(12), partitions=4, n_aug=1),
        "position": PositionViewSampler(CropSpec(8)),
    }


def test_reproducible_from_the_generator():
    vol = _aniso_volume()
    for name, sampler in _all_samplers().items():
        a, b, c = sampler(vol, gen(1)), sampler(vol, gen(1)), sampler(vol, gen(2))
        assert torch.equal(a.views, b.views) and torch.equal(a.affine, b.affine), name
        assert not torch.equal(a.views, c.views), name
    vol_a, vol_b = _shifted_pair()
    pair = CrossVolumePairSampler(CropSpec(12), n_crops=3)
    (a, ia), (b, ib) = pair(vol_a, vol_b, gen(4)), pair(vol_a, vol_b, gen(4))
    assert torch.equal(a.views, b.views) and torch.equal(a.match, b.match) and torch.equal(ia["score"], ib["score"])
    assert torch.equal(BlockMasking()(a, gen(1)).mask, BlockMasking()(a, gen(1)).mask)


def test_tensors_only_and_device_follows_input(monkeypatch):
    """No NumPy round trip in the per-view path; outputs on the input's device and dtype."""

    def forbidden(*args, **kwargs):
        raise AssertionError("NumPy round trip in the view path")

    vol = _aniso_volume()
    vol64 = SourceVolume(vol.image.double(), vol.affine, vol.fg_box, 5)
    vol_a, vol_b = _shifted_pair()
    monkeypatch.setattr(torch.Tensor, "numpy", forbidden)
    monkeypatch.setattr(torch.Tensor, "__array__", forbidden)
    for sampler in _all_samplers().values():
        for v in (vol, vol64):
            batch = sampler(v, gen())
            assert batch.views.device == v.image.device and batch.views.dtype == v.image.dtype
            assert batch.affine.dtype == torch.float64 and batch.affine.device == v.image.device
    batch, info = CrossVolumePairSampler(CropSpec(12), n_crops=2)(vol_a, vol_b, gen())
    assert batch.match.device == vol_a.image.device
    BlockMasking()(batch, gen())


def test_viewbatch_match_groups_survive_cat_and_select():
    vol_a, vol_b = _shifted_pair()
    pair = CrossVolumePairSampler(CropSpec(12), n_crops=2, matcher=SSIMMatcher(threshold=-1.0), augment=None, intensity=None)
    b1, _ = pair(vol_a, vol_b, gen(1))
    b2, _ = pair(vol_b, vol_a, gen(2))
    both = ViewBatch.cat([b1, b2])
    assert both.match.tolist() == [0, 1, 0, 1, 4, 5, 4, 5]
    sub = both.select([1, 3, 4, 6, 0])
    groups = sub.match.tolist()
    assert groups[0] == groups[1] and groups[2] == groups[3] and len({groups[0], groups[2], groups[4]}) == 3
    assert max(groups) < len(sub)
    with pytest.raises(ValueError, match="targets"):
        ViewBatch(b1.views, b1.source_id, b1.partition, b1.affine, b1.norm, targets=torch.zeros(3, 2))


# ----------------------------------------------------------------------------------- source volume
def test_source_volume_from_item_norm_and_errors():
    aff = permuted_affine((2.0, 1.0, 1.0))
    item = {"image": MetaTensor(torch.randn(1, 20, 16, 18), affine=aff.float()), "fg_box": torch.tensor([[2, 3, 4], [18, 12, 16]]), "id": "case7"}
    vol = SourceVolume.from_item(item, 7)
    assert vol.source_id == 7 and vol.affine.dtype == torch.float64 and torch.allclose(vol.affine, aff)
    assert torch.allclose(vol.spacing, torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    # the outer faces of the box map to 0 and 1 along R, A, S
    corners = torch.tensor([[lo - 0.5 if c == 0 else hi - 0.5 for c, lo, hi in zip(bits, [2, 3, 4], [18, 12, 16])] for bits in itertools.product([0, 1], repeat=3)], dtype=torch.float64)
    world = torch.cat([corners, torch.ones(8, 1, dtype=torch.float64)], 1) @ aff.T
    u = (world @ vol.norm.T)[:, :3]
    assert torch.allclose(u.amin(0), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(u.amax(0), torch.ones(3, dtype=torch.float64), atol=1e-9)
    # u[2] increases towards superior (world z)
    assert float(vol.norm[2, :3] @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)) > 0
    with pytest.raises(MedclDataError, match="case7.*fg_box"):
        SourceVolume.from_item({**item, "fg_box": torch.tensor([[2, 3, 4], [30, 12, 16]])}, 7)
    with pytest.raises(MedclDataError, match="case8.*affine"):
        SourceVolume.from_item({"image": torch.zeros(1, 4, 4, 4), "id": "case8"}, 8)


def test_samplers_on_a_real_hippocampus_crop(shared_data):
    import nibabel as nib

    files = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))
    if not files:
        pytest.skip("no hippocampus images in ../shared/data/hippocampus/imagesTr")
    img = nib.load(str(files[0]))
    data = torch.tensor(np.asarray(img.dataobj, dtype=np.float32))[None]
    data = (data - data.mean()) / data.std()
    vol = SourceVolume(data, torch.tensor(img.affine), None, 0, name=files[0].name)
    voco = PositionViewSampler()(vol, gen())
    assert torch.isfinite(voco.views).all() and torch.allclose(voco.targets[8:].sum(1), torch.ones(4))
    part = PartitionViewSampler(CropSpec(16), partitions=4)(vol, gen())
    assert part.views.shape == (8, 1, 16, 16, 16)


# ------------------------------------------------------------------------------ plans (deferred rendering)
def test_plan_draws_what_the_call_draws_and_renders_the_same_views():
    """``sampler.plan`` makes every draw of ``sampler(...)`` (the generator ends in the same state) and renders
    into the same ViewBatch; block masks drawn from the shape alone equal :func:`block_mask`'s."""
    from medcl.views.candidates import CandidatePairSampler

    vol = _aniso_volume()
    vol_a, vol_b = _shifted_pair()
    singles = {**_all_samplers(), "first plain": PartitionViewSampler(CropSpec(12), partitions=2, augment_first=False)}
    for name, sampler in singles.items():
        g1, g2 = gen(5), gen(5)
        a, pending = sampler(vol, g1), sampler.plan(vol, g2)
        assert torch.equal(g1.get_state(), g2.get_state()), name
        b = pending.render()
        assert torch.equal(a.views, b.views) and torch.equal(a.affine, b.affine), name
        m1, m2 = BlockMasking(0.5, 4)(a, gen(6)), BlockMasking(0.5, 4).plan(pending, gen(6)).render()
        assert torch.equal(m1.views, m2.views) and torch.equal(m1.mask, m2.mask) and torch.equal(m1.target, m2.target)
    pairs = {"ssim": CrossVolumePairSampler(CropSpec(12), n_crops=2),
             "candidates": CandidatePairSampler(CropSpec(12), n_crops=2, candidates=3, intensity=IntensityAugment())}
    for name, sampler in pairs.items():
        g1, g2 = gen(7), gen(7)
        (a, ia), (pending, ib) = sampler(vol_a, vol_b, g1), sampler.plan(vol_a, vol_b, g2)
        assert torch.equal(g1.get_state(), g2.get_state()), name
        b = pending.render()
        assert torch.equal(a.views, b.views) and torch.equal(a.match, b.match), name
        assert ia.keys() == ib.keys()


def test_intensity_noise_from_a_seed_is_the_seeded_generators():
    views = torch.zeros(3, 1, 6, 6, 6)
    params = {**IntensityAugment.identity(3), "noise_std": torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)}
    a = apply_intensity(views, params, 1234)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn((2, 1, 6, 6, 6), generator=g)
    assert torch.equal(a[0], views[0]) and torch.equal(a[1:], noise * torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1, 1))
    assert torch.equal(apply_intensity(views, IntensityAugment.identity(3), 1), views)
