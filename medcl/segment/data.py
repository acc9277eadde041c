"""Training patches: class-balanced crops of the labelled volumes, augmented, as a resumable stream.

:class:`PatchStream` is a map-style dataset over *stream positions* (see :mod:`medcl.engine.stream`):
position ``p`` is volume ``perm_e[p mod n]`` of epoch ``e``, and every random draw for it (the class of the
patch centre, the centre voxel, the augmentation) comes from a seed derived from ``(seed, e, p)``. A killed
run resumed from its checkpoint therefore sees exactly the patches an uninterrupted run would have seen.

Class-balanced sampling (as MONAI ``RandCropByLabelClassesd``, whose helpers it uses): the class of the
centre is drawn with ``class_ratios`` (equal by default, background included) among the classes present in
the volume, then a voxel of that class is the centre; the crop is shifted to lie inside the volume. Ignored
voxels (sparse labels) are never centres. Volumes smaller than the patch are padded once (image with its
minimum, label with background).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialCrop,
)
from monai.transforms.utils import generate_label_classes_crop_centers, map_classes_to_indices
from torch.utils.data import Dataset

from medcl.core.errors import MedclDataError
from medcl.engine.seeding import sample_seed
from medcl.engine.stream import StreamIndex
from medcl.segment.config import PatchAugmentConfig

__all__ = ["PatchStream", "build_augmentation", "pad_to_patch"]


def build_augmentation(cfg: PatchAugmentConfig) -> Compose | None:
    """The MONAI dictionary pipeline (keys ``image`` ``[C, *S]`` float, ``label`` ``[1, *S]``) of ``cfg``."""
    keys = ["image", "label"]
    xs: list[Any] = []
    if cfg.affine_prob > 0:
        r = math.radians(cfg.rotate_deg)
        xs.append(RandAffined(keys, prob=cfg.affine_prob, rotate_range=(r, r, r),
                              scale_range=(cfg.scale, cfg.scale, cfg.scale), mode=("bilinear", "nearest"),
                              padding_mode=("border", "zeros")))
    if cfg.flip:
        xs += [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(3)]
    if cfg.rot90:
        xs.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)))
    if cfg.intensity_prob > 0:
        xs.append(RandScaleIntensityd("image", factors=0.1, prob=cfg.intensity_prob))
        xs.append(RandShiftIntensityd("image", offsets=0.1, prob=cfg.intensity_prob))
    if cfg.noise_prob > 0:
        xs.append(RandGaussianNoised("image", prob=cfg.noise_prob, std=cfg.noise_std))
    return Compose(xs) if xs else None


def pad_to_patch(image: torch.Tensor, label: torch.Tensor, patch: tuple[int, int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``image [C, *S]`` (with its minimum) and ``label [1, *S]`` (with 0) symmetrically to at least
    ``patch``."""
    need = [max(0, p - s) for p, s in zip(patch, image.shape[1:])]
    if not any(need):
        return image, label
    pads: list[int] = []
    for n in reversed(need):  # F.pad takes the last axis first
        pads += [n // 2, n - n // 2]
    image = torch.nn.functional.pad(image, pads, value=float(image.min()))
    label = torch.nn.functional.pad(label, pads, value=0)
    return image, label


class PatchStream(Dataset):
    """Stream position -> ``{"image": [C, *P] float32, "label": [1, *P] int64}`` (``P`` the patch size).

    Args:
        cases: a :class:`medcl.data.CaseDataset` of the labelled (training) cases, with labels.
        num_classes: ``K`` classes including background (label values ``0 .. K-1``).
        patch_size: the patch ``P``.
        seed: the stream seed (permutations, centres, augmentation).
        class_ratios: centre-class weights ``[K]`` (``None`` = equal).
        augment: the augmentation pipeline (:func:`build_augmentation`) or ``None``.
        ignore_label: voxels with this value are never centres (and stay in the patch for the loss to mask).
    """

    def __init__(self, cases: Dataset, num_classes: int, patch_size: tuple[int, int, int], seed: int,
                 class_ratios: list[float] | None = None, augment: Compose | None = None,
                 ignore_label: int | None = None) -> None:
        if len(cases) == 0:  # type: ignore[arg-type]
            raise MedclDataError(None, "no labelled case to train on")
        if class_ratios is not None and len(class_ratios) != num_classes:
            raise MedclDataError(None, f"sampling.class_ratios has {len(class_ratios)} entries for {num_classes} classes")
        self.cases, self.k = cases, int(num_classes)
        self.patch = tuple(int(p) for p in patch_size)
        self.seed, self.ratios = int(seed), class_ratios
        self.augment, self.ignore_label = augment, ignore_label
        self.index = StreamIndex(len(cases), seed)  # type: ignore[arg-type]
        self._prepared: dict[int, tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]] = {}

    def __len__(self) -> int:
        return 2**62  # a stream: positions are unbounded, the sampler decides which are read

    def prepared(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
        """Volume ``i``, padded, with its per-class flat voxel indices (computed once per process)."""
        if i not in self._prepared:
            item = self.cases[i]
            if "label" not in item:
                raise MedclDataError(item.get("id"), "training case has no label")
            image = item["image"].as_tensor() if hasattr(item["image"], "as_tensor") else item["image"]
            label = item["label"].as_tensor() if hasattr(item["label"], "as_tensor") else item["label"]
            image, label = pad_to_patch(image.float(), label.long(), self.patch)
            bad = (label >= self.k) | (label < 0)
            if self.ignore_label is not None:
                bad &= label != self.ignore_label
            if bool(bad.any()):
                vals = sorted({int(v) for v in torch.unique(label[bad])})
                raise MedclDataError(item.get("id"), f"label values {vals} outside 0..{self.k - 1}"
                                                     + ("" if self.ignore_label is None else
                                                        f" and not the ignore label {self.ignore_label}"))
            small = label.numel() < 2**31  # int32 flat indices halve the memory of the (background) index list
            indices = [np.asarray(ix).astype(np.int32 if small else np.int64)
                       for ix in map_classes_to_indices(label.numpy(), self.k)]
            self._prepared[i] = (image, label, indices)
        return self._prepared[i]

    def _ratios(self, indices: list[np.ndarray]) -> list[float]:
        ratios = [1.0] * self.k if self.ratios is None else [float(r) for r in self.ratios]
        ratios = [r if len(ix) else 0.0 for r, ix in zip(ratios, indices)]
        if sum(ratios) <= 0:  # every weighted class is absent from this volume: any labelled voxel
            ratios = [1.0 if len(ix) else 0.0 for ix in indices]
        if sum(ratios) <= 0:
            raise MedclDataError(None, "a training volume has no labelled voxel (all ignored)")
        return ratios

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        epoch, i = self.index(position)
        image, label, indices = self.prepared(i)
        s = sample_seed(self.seed, epoch, position, "patch")
        rs = np.random.RandomState(s % (2**32))
        shape = tuple(int(x) for x in label.shape[1:])
        centre = generate_label_classes_crop_centers(self.patch, 1, shape, indices, self._ratios(indices), rs,
                                                     allow_smaller=False, warn=False)[0]
        crop = SpatialCrop(roi_center=[int(c) for c in centre], roi_size=self.patch)
        d = {"image": crop(image), "label": crop(label)}
        if self.augment is not None:
            self.augment.set_random_state(seed=int(rs.randint(2**31)))
            d = self.augment(d)
        img = d["image"].as_tensor() if hasattr(d["image"], "as_tensor") else torch.as_tensor(d["image"])
        lab = d["label"].as_tensor() if hasattr(d["label"], "as_tensor") else torch.as_tensor(d["label"])
        return {"image": img.float().contiguous(), "label": torch.round(lab).long().contiguous()}
