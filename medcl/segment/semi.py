"""Semi-supervised fine-tuning: a mean teacher and a consistency loss on the unlabelled pool.

With few labelled volumes most of the information is in the unlabelled ones. Each step adds, to the supervised
loss on labelled patches, a consistency term on ``U`` unlabelled patches (Tarvainen & Valpola, "Mean teachers are
better role models", NeurIPS 2017; Yu et al., UA-MT, MICCAI 2019, on 3D MRI; Sohn et al., FixMatch, NeurIPS 2020):

1. the unlabelled patch gets a *weak* view (the stream's crop and flips, :class:`UnlabelledPatches`) for the
   teacher -- an exponential moving average of the student (:class:`medcl.models.EMATeacher`) -- and a *strong*
   view for the student: the same voxels with strong intensity augmentation (:func:`strong_intensity`: gamma,
   brightness, contrast, noise, blur). Geometry is applied to the weak view only, so both stay voxel-aligned;
2. with probability ``cutmix_prob`` a box of a labelled patch is pasted into the strong unlabelled view, with
   its true labels as the target there (copy-paste between labelled and unlabelled patches, as bidirectional
   copy-paste, Bai et al., CVPR 2023; :func:`paste_boxes`);
3. the consistency term (:func:`consistency_loss`) is either the cross-entropy to the teacher's hard
   pseudo-labels on the voxels it is confident about (``pseudo``, FixMatch), or the squared difference of class
   probabilities (``mse``, mean teacher); its weight ramps up along ``exp(-5 (1 - t/T)^2)`` (:func:`rampup`).

The teacher is what is evaluated and saved. Unlabelled cases are read **without** their labels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from medcl.engine.seeding import sample_seed
from medcl.engine.stream import StreamIndex
from medcl.segment.config import StrongAugmentConfig

__all__ = ["UnlabelledPatches", "SemiPatchStream", "strong_intensity", "paste_boxes", "consistency_loss", "rampup"]


def rampup(step: int, rampup_steps: int) -> float:
    """Sigmoid ramp-up ``exp(-5 (1 - t)^2)``, ``t = min(step / rampup_steps, 1)`` (1 from the start when 0)."""
    if rampup_steps <= 0:
        return 1.0
    t = min(max(step, 0) / rampup_steps, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class UnlabelledPatches(Dataset):
    """Stream position -> a weak view ``[C, *P]`` float32 of an unlabelled case (no label is ever read).

    The crop centre is uniform in the volume's foreground box with probability 0.9 (else anywhere), the crop
    lies inside the (padded) volume, and each axis is flipped with probability 0.5; all drawn from
    ``(seed, epoch, position)``, so the stream resumes exactly.

    Args:
        cases: a :class:`medcl.data.CaseDataset` built with ``with_label=False``.
        patch_size: ``P``.
        seed: the stream seed.
    """

    def __init__(self, cases: Dataset, patch_size: tuple[int, int, int], seed: int) -> None:
        if len(cases) == 0:  # type: ignore[arg-type]
            raise ValueError("no unlabelled case")
        self.cases, self.patch, self.seed = cases, tuple(int(p) for p in patch_size), int(seed)
        self.index = StreamIndex(len(cases), sample_seed(seed, 0, 0, "unlabelled") % (2**31))  # type: ignore[arg-type]
        self._prepared: dict[int, tuple[Tensor, np.ndarray]] = {}

    def __len__(self) -> int:
        return 2**62

    def _volume(self, i: int) -> tuple[Tensor, np.ndarray]:
        if i not in self._prepared:
            from medcl.segment.data import pad_to_patch

            item = self.cases[i]
            image = item["image"].as_tensor() if hasattr(item["image"], "as_tensor") else item["image"]
            image = image.float()
            image, _ = pad_to_patch(image, torch.zeros((1, *image.shape[1:]), dtype=torch.long), self.patch)
            box = np.asarray(item.get("fg_box", [[0, 0, 0], list(image.shape[1:])]), dtype=np.int64).reshape(2, 3)
            self._prepared[i] = (image, box)
        return self._prepared[i]

    def __getitem__(self, position: int) -> Tensor:
        epoch, i = self.index(position)
        image, box = self._volume(i)
        rs = np.random.RandomState(sample_seed(self.seed, epoch, position, "unlabelled") % (2**32))
        shape = np.asarray(image.shape[1:])
        patch = np.asarray(self.patch)
        lo, hi = (np.clip(box[0], 0, shape - 1), np.clip(box[1], 1, shape)) if rs.rand() < 0.9 else (0 * shape, shape)
        centre = np.array([rs.randint(a, max(a + 1, b)) for a, b in zip(lo, hi)])
        start = np.clip(centre - patch // 2, 0, shape - patch)
        crop = image[:, start[0]:start[0] + patch[0], start[1]:start[1] + patch[1], start[2]:start[2] + patch[2]]
        flips = [a + 1 for a in range(3) if rs.rand() < 0.5]
        return (crop.flip(flips) if flips else crop).contiguous()


class SemiPatchStream(Dataset):
    """Position -> the labelled patch of :class:`medcl.segment.data.PatchStream` plus ``u_image`` ``[U, C, *P]``,
    the weak views of ``U`` unlabelled patches (positions ``U p .. U p + U - 1`` of the unlabelled stream)."""

    def __init__(self, labelled: Dataset, unlabelled: UnlabelledPatches, per_sample: int) -> None:
        self.labelled, self.unlabelled, self.per_sample = labelled, unlabelled, int(per_sample)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, position: int) -> dict[str, Tensor]:
        out = dict(self.labelled[position])
        k = self.per_sample
        out["u_image"] = torch.stack([self.unlabelled[position * k + j] for j in range(k)])
        return out


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``x`` ``[C, *S]`` (3D), edges replicated."""
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    y = x[None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0] * 3
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.reshape(shape).expand(c, 1, *shape[2:]), groups=c)
    return y[0]


@torch.no_grad()
def strong_intensity(x: Tensor, cfg: StrongAugmentConfig, generator: torch.Generator) -> Tensor:
    """Strong intensity augmentation of a batch ``x`` ``[B, C, D, H, W]`` (a new tensor; geometry untouched).

    Per patch and each with probability ``cfg.prob``: gamma (intensities rescaled to [0, 1] per patch, raised to
    the power, rescaled back), brightness (``x * f``), contrast (``m + (x - m) * f``), Gaussian noise and Gaussian
    blur. The parameters are drawn on the CPU from ``generator`` (the step's), the arithmetic runs on ``x``'s
    device.
    """
    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    def hit() -> bool:
        return float(torch.rand((), generator=generator)) < cfg.prob

    out = x.clone()
    for b in range(x.shape[0]):
        v = out[b]
        if hit():
            lo, hi = v.amin(), v.amax()
            span = (hi - lo).clamp_min(1e-6)
            v = ((v - lo) / span).clamp(0, 1) ** u(*cfg.gamma) * span + lo
        if hit():
            v = v * u(1 - cfg.brightness, 1 + cfg.brightness)
        if hit():
            m = v.mean()
            v = m + (v - m) * u(1 - cfg.contrast, 1 + cfg.contrast)
        if hit() and cfg.noise_std > 0:
            noise = torch.randn(v.shape, generator=generator).to(v) * u(0.0, cfg.noise_std)
            v = v + noise
        if hit():
            v = _gaussian_blur(v, u(*cfg.blur_sigma))
        out[b] = v
    return out


@torch.no_grad()
def paste_boxes(u: Tensor, x: Tensor, y_onehot: Tensor, prob: float, size: float, generator: torch.Generator
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Paste a box of labelled patches into unlabelled ones (copy-paste / CutMix).

    Args:
        u: ``[U, C, *P]`` unlabelled (student) views.
        x: ``[B, C, *P]`` labelled patches; unlabelled patch ``j`` takes its box from labelled patch ``j mod B``.
        y_onehot: ``[B, K, *P]`` their one-hot labels.
        prob: probability that a given unlabelled patch gets a box.
        size: box side as a fraction of the patch side.
        generator: the step's generator (CPU).

    Returns:
        ``(mixed [U, C, *P], box [U, 1, *P] bool, box_target [U, K, *P])``: the true labels inside the boxes.
    """
    mixed = u.clone()
    box = torch.zeros((u.shape[0], 1, *u.shape[2:]), dtype=torch.bool, device=u.device)
    target = torch.zeros((u.shape[0], y_onehot.shape[1], *u.shape[2:]), dtype=y_onehot.dtype, device=u.device)
    sides = [max(1, int(round(size * s))) for s in u.shape[2:]]
    for j in range(u.shape[0]):
        if float(torch.rand((), generator=generator)) >= prob:
            continue
        i = j % x.shape[0]
        st = [int(torch.randint(0, s - w + 1, (), generator=generator)) for s, w in zip(u.shape[2:], sides)]
        sl = tuple(slice(a, a + w) for a, w in zip(st, sides))
        mixed[(j, slice(None), *sl)] = x[(i, slice(None), *sl)]
        box[(j, slice(None), *sl)] = True
        target[(j, slice(None), *sl)] = y_onehot[(i, slice(None), *sl)]
    return mixed, box, target


def consistency_loss(student_logits: Tensor, teacher_probs: Tensor, mode: str, threshold: float,
                     box: Tensor | None = None, box_target: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The consistency term and the fraction of voxels it uses.

    Args:
        student_logits: ``[U, K, *P]`` on the strong (mixed) views.
        teacher_probs: ``[U, K, *P]`` the teacher's probabilities on the weak views.
        mode: ``pseudo``: ``mean_v 1[max_k p_k(v) >= threshold] * CE(student(v), argmax_k p_k(v))`` (FixMatch's
            normalisation: the mean over all voxels); ``mse``: ``mean_v sum_k (softmax(student) - p)_k^2 / K``.
        threshold: confidence of a pseudo-label.
        box, box_target: ``[U, 1, *P]`` pasted boxes and ``[U, K, *P]`` their true one-hot labels: inside a box the
            target is the true label (always used).

    Returns:
        ``(loss, mask_fraction)``: scalars; ``mask_fraction`` is the fraction of voxels with a target.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s = student_logits.float()
        p = teacher_probs.float()
        if box is not None and box_target is not None:
            p = torch.where(box, box_target.float(), p)
        if mode == "pseudo":
            conf, pseudo = p.max(dim=1)
            use = conf >= threshold
            if box is not None:
                use = use | box[:, 0]
            ce = F.cross_entropy(s, pseudo, reduction="none")
            loss = (ce * use).sum() / ce.numel()
            return loss, use.float().mean()
        if mode == "mse":
            loss = ((torch.softmax(s, dim=1) - p) ** 2).mean()
            return loss, torch.ones((), device=s.device)
    raise ValueError(f"unknown consistency mode {mode!r}")

