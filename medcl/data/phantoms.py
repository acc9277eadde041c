"""Synthetic MRI- and CT-like torso phantoms with organ labels: the embedded default for demos and tests.

The anatomy is defined **in world millimetres** (RAS+) as implicit shapes, and a phantom is voxelised by
evaluating those shapes at the world position of every voxel centre (``affine @ [i, j, k, 1]``). Any affine
-- oblique, non-RAS, anisotropic, non-cubic grid -- therefore gives a correct voxelisation, and the label of a
voxel is exactly the organ whose surface contains its centre (the image uses the same surfaces, softened
by a 1 mm sigmoid, so an organ's boundary sits where the label changes).

Layout (the same for every subject, so that *where* a structure is depends on where you are along the
superior-inferior axis, as in real anatomy and as partition-based contrastive pretraining assumes,
Chaitanya et al., 2020):

* a body: a rounded elliptic cylinder along z (superior +z), with a subcutaneous fat shell;
* an unlabelled spine posterior to the organs, with vertebrae and discs alternating along z;
* label 1 ``liver``: a large lobe in the upper part (z ~ +34 mm), with vessel-like texture;
* label 2 ``kidneys``: a left/right pair at mid height (z ~ 0), cortex brighter than medulla;
* label 3 ``bladder``: a fluid-filled organ in the lower part (z ~ -36 mm);
* unlabelled look-alikes, as in real anatomy: a spleen with liver-like tissue (upper left, posterior), a
  fluid-filled stomach (upper left) and bowel loops (mid-lower abdomen) that look like the bladder, so that
  telling an organ from its look-alike needs context (where in the body it is), not intensity alone.

Per-subject variation: body size, global position, organ position jitter, size, rotation, bumpy surfaces,
a smooth random deformation of space, tissue intensities, an MRI bias field and noise (Rician for MRI,
Gaussian for CT). Everything is drawn from ``numpy.random.default_rng(seed)`` in a fixed order and
computed in float64 with vectorised NumPy, so a seed gives identical bytes on every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medcl.core.errors import MedclDataError
from medcl.core.files import atomic_write_json
from medcl.core.geometry import Volume

__all__ = [
    "PHANTOM_LABELS",
    "default_affine",
    "make_phantom",
    "write_phantom_dataset",
    "phantom_world_coordinates",
]

PHANTOM_LABELS: dict[int, str] = {0: "background", 1: "liver", 2: "kidneys", 3: "bladder"}

# Tissue intensities: MRI in arbitrary T1-like units, CT in Hounsfield units.
_TISSUE = {
    "mri": {
        "air": 0.0, "body": 400.0, "fat": 900.0, "bone": 300.0, "disc": 150.0,
        "liver": 560.0, "cortex": 290.0, "medulla": 200.0, "bladder": 120.0,
    },
    "ct": {
        "air": -1000.0, "body": 45.0, "fat": -100.0, "bone": 450.0, "disc": 90.0,
        "liver": 105.0, "cortex": 190.0, "medulla": 135.0, "bladder": 5.0,
    },
}
_NOISE_SIGMA = {"mri": 18.0, "ct": 12.0}

# Mean anatomy (mm): centres and semi-axes. The field of view of default_affine is 160 mm.
_BODY_RADII = np.array([60.0, 46.0, 68.0])
_LIVER = (np.array([10.0, 6.0, 34.0]), np.array([36.0, 26.0, 20.0]))
_KIDNEY = (np.array([31.0, -12.0, -2.0]), np.array([12.0, 10.0, 18.0]))  # mirrored in x for the left one
_BLADDER = (np.array([0.0, 10.0, -38.0]), np.array([22.0, 17.0, 15.0]))
_SPINE_XY, _SPINE_RADIUS, _VERTEBRA_PERIOD = np.array([0.0, -32.0]), 9.0, 22.0
# unlabelled look-alikes: (centre, semi-axes); spleen ~ liver tissue, stomach and bowel ~ bladder fluid
_SPLEEN = (np.array([-34.0, -14.0, 30.0]), np.array([12.0, 9.0, 16.0]))
_STOMACH = (np.array([-20.0, 14.0, 20.0]), np.array([14.0, 10.0, 11.0]))
_BOWEL = [(np.array([16.0, 18.0, -14.0]), np.array([8.0, 7.0, 7.0])),
          (np.array([-14.0, 16.0, -18.0]), np.array([8.0, 7.0, 7.0]))]
_EDGE_MM = 0.75  # softness of image boundaries (the label is the hard 0-level set)


def default_affine(shape: Sequence[int] = (48, 48, 48), fov_mm: float | Sequence[float] = 160.0) -> np.ndarray:
    """RAS affine ``[4, 4]`` covering ``fov_mm`` (per axis or one value) centred on the world origin.

    Voxel spacing is ``fov_mm / shape`` per axis, so a non-cubic ``shape`` gives an anisotropic grid.
    """
    shape_a = np.asarray(shape, dtype=np.float64)
    spacing = np.broadcast_to(np.asarray(fov_mm, dtype=np.float64), (3,)) / shape_a
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -spacing * (shape_a - 1.0) / 2.0
    return aff


def phantom_world_coordinates(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World RAS mm of every voxel centre, ``[X, Y, Z, 3]`` float64."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    a = np.asarray(affine, dtype=np.float64)
    return ijk @ a[:3, :3].T + a[:3, 3]


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A random rotation matrix: uniform axis, angle uniform in [-max_deg, max_deg]."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    ang = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * (k @ k)


def _waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float]):
    """``n`` random plane waves: wave vectors ``[n, 3]`` (rad/mm) and phases ``[n]``."""
    dirs = rng.standard_normal((n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = dirs * (2 * np.pi / rng.uniform(*wavelength, size=(n, 1)))
    return k, rng.uniform(0, 2 * np.pi, size=n)


def _wave_sum(p: np.ndarray, k: np.ndarray, phase: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """``sum_n amp[n] * sin(k[n] . p + phase[n])``; ``p`` ``[..., 3]``, ``amp`` ``[n]`` or ``[n, d]``."""
    s = np.sin(p @ k.T + phase)  # [..., n]
    return s @ amp


class _Blob:
    """A rotated ellipsoid with a bumpy surface; ``level(p) < 0`` inside (about mm / mean radius)."""

    def __init__(self, rng: np.random.Generator, centre: np.ndarray, radii: np.ndarray,
                 jitter_mm: float, scale: float, max_rot_deg: float, bumps: float) -> None:
        self.centre = centre + rng.normal(0.0, jitter_mm, size=3)
        self.radii = radii * rng.uniform(1 - scale, 1 + scale, size=3)
        self.rot = _rotation(rng, max_rot_deg)
        self.k, self.phase = _waves(rng, 4, (20.0, 50.0))
        self.amp = rng.uniform(0.4, 1.0, size=4) * bumps / 4

    def level(self, p: np.ndarray) -> np.ndarray:
        """Level set at points ``p`` ``[..., 3]``; evaluated only near the blob (far points get 10)."""
        out = np.full(p.shape[:-1], 10.0)
        # cheap bounding test first: the bumps move the surface by at most sum(amp)
        reach = self.radii.max() * (1.0 + self.amp.sum()) + 4 * _EDGE_MM
        near = np.all(np.abs(p - self.centre) <= reach, axis=-1)
        q = p[near]
        local = ((q - self.centre) @ self.rot) / self.radii
        out[near] = np.sqrt((local**2).sum(-1)) - 1.0 + _wave_sum(q, self.k, self.phase, self.amp)
        return out


def _soft(signed_mm: np.ndarray) -> np.ndarray:
    """Soft inside-indicator of an (approximate) signed distance in mm."""
    return 0.5 * (1.0 - np.tanh(signed_mm / (2 * _EDGE_MM)))


def make_phantom(
    seed: int,
    shape: Sequence[int] = (48, 48, 48),
    affine: np.ndarray | None = None,
    modality: str = "mri",
) -> tuple[Volume, Volume]:
    """One synthetic subject, voxelised on the grid ``shape`` with voxel -> RAS mm ``affine``.

    Args:
        seed: subject seed; the same seed gives the same subject (bit for bit) on any grid.
        shape: grid size ``(X, Y, Z)``.
        affine: ``[4, 4]`` voxel -> RAS mm; default :func:`default_affine` (160 mm field of view, RAS).
            The anatomy lives in world mm, so any affine voxelises the same subject.
        modality: ``"mri"`` (T1-like, bias field, Rician noise) or ``"ct"`` (Hounsfield units, Gaussian noise).

    Returns:
        ``(image, label)``: image ``[1, X, Y, Z]`` float32; label ``[1, X, Y, Z]`` uint8 with values in
        :data:`PHANTOM_LABELS` (0 background, 1 liver, 2 kidneys, 3 bladder).
    """
    if modality not in _TISSUE:
        raise MedclDataError("phantom", f"modality must be 'mri' or 'ct', got {modality!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise MedclDataError("phantom", f"shape must be three positive sizes, got {shape}")
    affine = default_affine(shape) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise MedclDataError("phantom", "affine must be an invertible 4x4 matrix")

    rng = np.random.default_rng(seed)
    # --- subject parameters (drawn in a fixed order) ---
    shift = rng.normal(0.0, 3.0, size=3)
    body_radii = _BODY_RADII * rng.uniform(0.92, 1.08, size=3)
    fat_mm = rng.uniform(4.0, 8.0)
    warp_k, warp_phase = _waves(rng, 5, (70.0, 140.0))
    warp_amp = rng.normal(0.0, 1.6, size=(5, 3))
    liver = _Blob(rng, _LIVER[0], _LIVER[1], 3.0, 0.12, 12.0, 0.25)
    kid_r = _Blob(rng, _KIDNEY[0], _KIDNEY[1], 2.5, 0.12, 10.0, 0.12)
    kid_l = _Blob(rng, _KIDNEY[0] * np.array([-1.0, 1.0, 1.0]), _KIDNEY[1], 2.5, 0.12, 10.0, 0.12)
    bladder = _Blob(rng, _BLADDER[0], _BLADDER[1], 3.0, 0.15, 10.0, 0.15)
    spine_xy = _SPINE_XY + rng.normal(0.0, 1.5, size=2)
    vert_phase = rng.uniform(0, 2 * np.pi)
    tissue = {k: v + rng.normal(0.0, 0.04 * abs(v) + (8.0 if modality == "ct" else 0.0))
              for k, v in _TISSUE[modality].items() if k != "air"}
    tissue["air"] = _TISSUE[modality]["air"]
    gain = rng.uniform(0.8, 1.25) if modality == "mri" else 1.0
    tex_k, tex_phase = _waves(rng, 4, (8.0, 16.0))
    tex_amp = rng.uniform(0.5, 1.0, size=4) / 4
    ves_k, ves_phase = _waves(rng, 3, (25.0, 45.0))
    bias_k, bias_phase = _waves(rng, 3, (150.0, 300.0))
    bias_amp = rng.uniform(0.05, 0.12, size=3) if modality == "mri" else np.zeros(3)
    spleen = _Blob(rng, _SPLEEN[0], _SPLEEN[1], 3.0, 0.15, 12.0, 0.2)
    stomach = _Blob(rng, _STOMACH[0], _STOMACH[1], 3.0, 0.15, 12.0, 0.2)
    bowel = [_Blob(rng, c, r, 4.0, 0.2, 20.0, 0.2) for c, r in _BOWEL]

    # --- world coordinates, deformed ---
    world = phantom_world_coordinates(shape, affine)
    p = world - shift
    p = p + _wave_sum(p, warp_k, warp_phase, warp_amp)

    # body: superellipse cross-section (p=2.6) and flattened ends (q=6)
    body_lv = ((np.abs(p[..., 0]) / body_radii[0]) ** 2.6 + (np.abs(p[..., 1]) / body_radii[1]) ** 2.6) ** (
        1 / 2.6
    )
    ends = np.abs(p[..., 2]) / body_radii[2]
    body_lv = (body_lv**4 + ends**4) ** (1 / 4) - 1.0
    body_sd = body_lv * body_radii[:2].mean()  # approximate signed distance (mm)
    texture = _wave_sum(p, tex_k, tex_phase, tex_amp)  # in [-1, 1], fine-scale tissue texture
    vessel_field = _wave_sum(p, ves_k, ves_phase, np.full(3, 1.0 / 3))

    img = np.full(shape, tissue["air"], dtype=np.float64)
    label = np.zeros(shape, dtype=np.uint8)

    def paint(mask_soft: np.ndarray, value: np.ndarray | float) -> None:
        nonlocal img
        img = img * (1.0 - mask_soft) + value * mask_soft

    scale_body = tissue["body"] - tissue["air"] if modality == "mri" else 60.0
    paint(_soft(body_sd), tissue["fat"] * (1.0 + 0.03 * texture))
    paint(_soft(body_sd + fat_mm), tissue["body"] + 0.06 * scale_body * texture)

    # spine: a cylinder, vertebral bodies alternating with discs along z
    r_spine = np.sqrt(((p[..., :2] - spine_xy) ** 2).sum(-1))
    in_body_z = _soft(np.abs(p[..., 2]) - 0.92 * body_radii[2])
    vert = 0.5 * (1 + np.tanh(3.0 * np.cos(2 * np.pi * p[..., 2] / _VERTEBRA_PERIOD + vert_phase)))
    paint(_soft(r_spine - _SPINE_RADIUS) * in_body_z, tissue["disc"] + vert * (tissue["bone"] - tissue["disc"]))

    # organs, painted in order; the label follows the same order at the 0-level set
    organ_scale = abs(tissue["liver"] - tissue["body"])
    # unlabelled look-alikes first, so a labelled organ that touches one is drawn on top
    paint(_soft(spleen.level(p) * spleen.radii.mean()), tissue["liver"] * (1.0 + 0.03 * texture))
    for fluid in (stomach, *bowel):
        paint(_soft(fluid.level(p) * fluid.radii.mean()), tissue["bladder"] + 0.1 * organ_scale * texture)
    lv = liver.level(p)
    vessels = np.clip(1.0 - np.abs(vessel_field) * 5.0, 0.0, 1.0)  # thin tubes where the field crosses 0
    paint(_soft(lv * liver.radii.mean()), tissue["liver"] * (1.0 + 0.03 * texture) - 0.8 * organ_scale * vessels)
    label[lv < 0] = 1
    for kid in (kid_r, kid_l):
        lv = kid.level(p)
        medulla = _soft((lv + 0.4) * kid.radii.mean())
        paint(_soft(lv * kid.radii.mean()), tissue["cortex"] + medulla * (tissue["medulla"] - tissue["cortex"]))
        label[lv < 0] = 2
    lv = bladder.level(p)
    paint(_soft(lv * bladder.radii.mean()), tissue["bladder"] + 0.1 * organ_scale * texture)
    label[lv < 0] = 3

    # acquisition: bias field (MRI), global gain, noise
    img = img * np.exp(_wave_sum(world, bias_k, bias_phase, bias_amp)) * gain
    sigma = _NOISE_SIGMA[modality] * (gain if modality == "mri" else 1.0)
    n1 = rng.standard_normal(shape)
    if modality == "mri":  # Rician: magnitude of a complex signal with Gaussian noise
        n2 = rng.standard_normal(shape)
        img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    else:
        img = img + sigma * n1

    meta = {"modality": modality.upper(), "phantom_seed": int(seed)}
    image = Volume(img[None].astype(np.float32), affine.copy(), path="", meta=dict(meta))
    lab = Volume(label[None], affine.copy(), path="", meta=dict(meta))
    return image, lab


def _subject_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_phantom_dataset(
    out: str | Path,
    n: int,
    size: int | Sequence[int] = 48,
    seed: int = 0,
    modality: str = "mri",
) -> Path:
    """Write ``n`` phantoms in Medical Segmentation Decathlon layout and return ``out``.

    Layout: ``out/imagesTr/phantom_000.nii.gz``, ``out/labelsTr/phantom_000.nii.gz``, ...,
    ``out/dataset.json`` (``modality`` ``{"0": "MRI"|"CT"}``, ``labels``, ``numTraining``, ``training``).
    Subject ``i`` uses the seed derived from ``(seed, i)``, so a dataset is deterministic and its first
    ``m`` subjects do not depend on ``n``.
    """
    if n < 1:
        raise MedclDataError(str(out), f"the number of phantoms must be >= 1, got {n}")
    shape = (int(size),) * 3 if np.isscalar(size) else tuple(int(s) for s in size)  # type: ignore[arg-type]
    root = Path(out)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    from medcl.io import write_nifti

    training = []
    for i in range(n):
        image, label = make_phantom(_subject_seed(seed, i), shape=shape, modality=modality)
        name = f"phantom_{i:03d}.nii.gz"
        write_nifti(image, root / "imagesTr" / name)
        write_nifti(label, root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    desc = {
        "name": f"medcl synthetic {modality.upper()} phantoms",
        "description": "Synthetic torso phantoms (medcl.data.phantoms); organs defined in world mm",
        "reference": "medcl",
        "licence": "Apache-2.0",
        "tensorImageSize": "3D",
        "modality": {"0": modality.upper()},
        "labels": {str(k): v for k, v in PHANTOM_LABELS.items()},
        "numTraining": n,
        "numTest": 0,
        "training": training,
        "test": [],
        "medcl": {"generator": "medcl.data.phantoms", "seed": int(seed), "size": list(shape)},
    }
    atomic_write_json(desc, root / "dataset.json")
    return root
