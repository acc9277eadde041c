"""The MONAI dictionary pipeline built from a :class:`~medcl.data.plan.PreprocessingPlan`, and its inverse.

The medcl-specific pieces are small MONAI ``MapTransform``\\s -- :class:`LoadVolumed` (reads through
:func:`medcl.io.read_volume`), :class:`ForegroundMaskd`, :class:`PlanIntensityd`, :class:`ForegroundBoxd`,
:class:`CastLabeld` -- around MONAI's own invertible ``Orientationd``, ``Spacingd`` and
``CropForegroundd``. MONAI records those three in each MetaTensor's ``applied_operations``, so
:func:`invert_to_original` (MONAI ``Invertd``) resamples a prediction made on the preprocessed grid back
onto the original voxel grid, with the crop undone.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    Invertd,
    MapTransform,
    Orientationd,
    Spacingd,
)
from monai.utils import TraceKeys

import medcl.io as mio
from medcl.core.errors import MedclDataError
from medcl.core.geometry import Volume
from medcl.data.cases import read_channels

if TYPE_CHECKING:
    from medcl.data.plan import PreprocessingPlan

__all__ = [
    "LoadVolumed",
    "ForegroundMaskd",
    "PlanIntensityd",
    "ForegroundBoxd",
    "CastLabeld",
    "build_pipeline",
    "invert_to_original",
    "volume_to_metatensor",
]

FG_KEY = "foreground"
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_MAX_STAT_VOXELS = 2_000_000  # percentiles / Otsu on at most this many voxels (a strided subsample)


def volume_to_metatensor(vol: Volume) -> MetaTensor:
    """``Volume`` -> MetaTensor ``[C, X, Y, Z]`` with ``affine`` (voxel -> RAS mm) and the original geometry.

    The array is copied, so later in-place work never touches the caller's volume.
    """
    affine = torch.as_tensor(np.asarray(vol.affine, dtype=np.float64))
    meta = {
        "filename_or_obj": str(vol.path),
        "original_affine": affine.clone(),
        "spatial_shape": torch.as_tensor(vol.shape),
        "original_channel_dim": 0,
        "space": "RAS",
    }
    return MetaTensor(torch.from_numpy(np.array(vol.array, copy=True)), affine=affine, meta=meta)


class LoadVolumed(MapTransform):
    """Read volumes with :func:`medcl.io.read_volume` into MetaTensors ``[C, X, Y, Z]``.

    A value may be a path, a list of paths (one per channel), or an already read
    :class:`~medcl.core.geometry.Volume` (then nothing is decoded). Keys in ``label_keys`` are read with
    ``is_label=True`` (integer, one channel).
    """

    def __init__(self, keys: Sequence[Hashable], label_keys: Sequence[Hashable] = (),
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = set(label_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, MetaTensor):
                continue
            if not isinstance(value, Volume):
                if key in self.label_keys:
                    value = mio.read_volume(value, is_label=True)
                else:
                    paths = [value] if isinstance(value, str | PathLike) else list(value)
                    value = read_channels(paths, series_uid=d.get("series_uid"))
            d[key] = volume_to_metatensor(value)
        return d


def _subsample(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    step = max(1, flat.numel() // _MAX_STAT_VOXELS)
    return flat[::step]


class ForegroundMaskd(MapTransform):
    """Add ``mask_key``: a ``[1, X, Y, Z]`` uint8 foreground mask of ``keys[0]`` (the image).

    Methods: ``"otsu"`` (channel 0 above Otsu's threshold, Otsu 1979, via scikit-image), ``"nonzero"``
    (any channel != 0), ``"threshold"`` (channel 0 > ``threshold``), ``"all"``. An empty mask becomes
    ``"all"`` so that statistics and boxes stay defined.
    """

    def __init__(self, keys: Sequence[Hashable], method: str = "otsu", threshold: float = 0.0,
                 mask_key: str = FG_KEY) -> None:
        super().__init__(keys, allow_missing_keys=False)
        self.method, self.threshold, self.mask_key = method, float(threshold), mask_key

    def mask(self, img: torch.Tensor) -> torch.Tensor:
        x = img.as_tensor() if isinstance(img, MetaTensor) else img
        if self.method == "all":
            m = torch.ones_like(x[:1], dtype=torch.bool)
        elif self.method == "nonzero":
            m = (x != 0).any(dim=0, keepdim=True)
        elif self.method == "threshold":
            m = x[:1] > self.threshold
        else:
            from skimage.filters import threshold_otsu

            sample = _subsample(x[0]).float().numpy()
            t = float(threshold_otsu(sample)) if sample.min() < sample.max() else float(sample.min())
            m = x[:1] > t
        if not bool(m.any()):
            m = torch.ones_like(m)
        return m.to(torch.uint8)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.keys[0]]
        d[self.mask_key] = MetaTensor(self.mask(img), meta=copy.copy(dict(img.meta)))
        return d


class PlanIntensityd(MapTransform):
    """Per-channel intensity normalisation of the image ``keys[0]`` as the plan's ``IntensitySpec``\\s say.

    * ``ct``: clip to ``window`` (HU) and scale linearly to [0, 1];
    * ``mri``: clip to the ``percentiles`` of the channel's non-zero voxels, then subtract the mean and
      divide by the standard deviation of the foreground voxels (``mask_key``);
    * ``none``: unchanged.

    Input and output ``[C, X, Y, Z]`` float32 MetaTensor (geometry and trace kept).
    """

    def __init__(self, keys: Sequence[Hashable], plan: PreprocessingPlan, mask_key: str = FG_KEY) -> None:
        super().__init__(keys, allow_missing_keys=False)
        self.plan, self.mask_key = plan, mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        img: MetaTensor = d[key]
        n = int(img.shape[0])
        names = self.plan.channel_names
        src = img.meta.get("filename_or_obj", key)
        if names and n != len(names):
            raise MedclDataError(src, f"has {n} channel(s) but the plan expects {len(names)} ({', '.join(names)})")
        if len(self.plan.intensity) not in (1, n):
            raise MedclDataError(src, f"has {n} channel(s) but the plan gives {len(self.plan.intensity)} intensity specs")
        x = img.as_tensor().float()
        fg = d[self.mask_key].as_tensor()[0].bool() if self.mask_key in d else torch.ones_like(x[0], dtype=torch.bool)
        out = torch.empty_like(x)
        for c in range(n):
            spec = self.plan.spec_for(c)
            xc = x[c]
            if spec.scheme == "ct":
                lo, hi = spec.window
                out[c] = (xc.clamp(lo, hi) - lo) / (hi - lo)
            elif spec.scheme == "mri":
                nz = xc[xc != 0]
                sample = _subsample(nz if nz.numel() else xc).double().numpy()
                lo, hi = np.percentile(sample, spec.percentiles)
                xc = xc.clamp(float(lo), float(hi))
                vals = xc[fg] if bool(fg.any()) else xc.reshape(-1)
                mean, std = vals.double().mean(), vals.double().std(unbiased=False)
                out[c] = ((xc.double() - mean) / std.clamp_min(1e-8)).float()
            else:
                out[c] = xc
        d[key] = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return d


class ForegroundBoxd(MapTransform):
    """Store ``fg_box``: LongTensor ``[2, 3]`` (start, stop) box of ``mask_key`` in current voxels; drop the mask."""

    def __init__(self, mask_key: str = FG_KEY, box_key: str = "fg_box") -> None:
        super().__init__([mask_key], allow_missing_keys=False)
        self.mask_key, self.box_key = mask_key, box_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        m = d.pop(self.mask_key).as_tensor()[0].bool()
        box = torch.zeros(2, 3, dtype=torch.long)
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            idx = torch.nonzero(m.any(dim=other)).reshape(-1)
            box[0, ax] = idx.min() if idx.numel() else 0
            box[1, ax] = idx.max() + 1 if idx.numel() else m.shape[ax]
        d[self.box_key] = box
        return d


class CastLabeld(MapTransform):
    """Round label MetaTensors and cast them to int64 (resampling works in float); geometry kept."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            d[key] = MetaTensor(torch.round(lab.as_tensor()).to(torch.int64), meta=lab.meta,
                                applied_operations=lab.applied_operations)
        return d


def build_pipeline(plan: PreprocessingPlan, keys: Sequence[str] = ("image", "label"), *, load: bool = True) -> Compose:
    """MONAI ``Compose`` for ``plan``: load -> orient -> resample -> foreground -> intensity -> crop -> box.

    Args:
        plan: the preprocessing plan.
        keys: ``keys[0]`` is the image, the others labels. Label keys may be absent from an item.
        load: start with :class:`LoadVolumed` (values are paths or Volumes); ``False`` when the items
            already hold MetaTensors.

    Output item: image ``[C, X, Y, Z]`` float32 MetaTensor (``.affine`` preprocessed voxel -> RAS mm),
    labels ``[1, X, Y, Z]`` int64, ``fg_box`` LongTensor ``[2, 3]``.
    """
    keys = list(keys)
    image_key, label_keys = keys[0], keys[1:]
    xs: list[Any] = []
    if load:
        xs.append(LoadVolumed(keys, label_keys=label_keys))
    xs.append(Orientationd(keys, axcodes=plan.orientation, labels=_RAS_LABELS, allow_missing_keys=True))
    if plan.spacing is not None:
        modes = ["bilinear"] + ["nearest"] * len(label_keys)
        xs.append(Spacingd(keys, pixdim=plan.spacing, mode=modes, padding_mode="border", allow_missing_keys=True))
    xs.append(ForegroundMaskd([image_key], method=plan.foreground, threshold=plan.foreground_threshold))
    xs.append(PlanIntensityd([image_key], plan))
    if plan.crop_foreground:
        xs.append(CropForegroundd([*keys, FG_KEY], source_key=FG_KEY, margin=plan.crop_margin,
                                  allow_smaller=True, allow_missing_keys=True))
    xs.append(ForegroundBoxd())
    if label_keys:
        xs.append(CastLabeld(label_keys, allow_missing_keys=True))
    return Compose(xs)


def _untie_ids(ops: Any) -> Any:
    """Copy of a trace with every transform id set to ``TraceKeys.NONE``, so that a freshly built
    pipeline (another process, or a disk-cached item) can invert it."""
    if isinstance(ops, dict):
        return {k: (TraceKeys.NONE if k == TraceKeys.ID else _untie_ids(v)) for k, v in ops.items()}
    if isinstance(ops, list):
        return [_untie_ids(v) for v in ops]
    return ops


def invert_to_original(
    pred: torch.Tensor,
    item: Mapping[str, Any],
    plan: PreprocessingPlan,
    *,
    image_key: str = "image",
    nearest: bool | None = None,
) -> MetaTensor:
    """Map a prediction on the preprocessed grid back onto the original voxel grid (MONAI ``Invertd``).

    Args:
        pred: ``[K, X', Y', Z']`` on the grid of ``item[image_key]`` (probabilities, logits or a label map).
        item: the preprocessed item (its image carries MONAI's trace of orientation, spacing and crop).
        plan: the plan that produced ``item``.
        nearest: nearest-neighbour resampling; default: ``True`` for integer ``pred`` (label maps), linear
            otherwise.

    Returns:
        MetaTensor ``[K, X, Y, Z]`` on the original grid (``.affine`` = the original affine); integer
        predictions keep their dtype. Voxels outside the crop are 0.
    """
    img = item[image_key]
    if not isinstance(img, MetaTensor) or not img.applied_operations:
        raise MedclDataError(str(image_key), "the item carries no MONAI trace to invert (was it preprocessed?)")
    is_int = not torch.is_floating_point(pred)
    nearest = is_int if nearest is None else nearest
    ops = _untie_ids(copy.deepcopy(img.applied_operations))
    orig = MetaTensor(img.as_tensor(), meta=copy.copy(dict(img.meta)), applied_operations=ops)
    p = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
    p = MetaTensor(p.float(), meta=copy.copy(dict(img.meta)), applied_operations=copy.deepcopy(ops))
    inverter = Invertd(keys="pred", transform=plan.transforms((image_key,), load=False), orig_keys=image_key,
                       nearest_interp=nearest, to_tensor=True)
    out = inverter({"pred": p, image_key: orig})["pred"]
    if is_int:
        out = MetaTensor(torch.round(out.as_tensor()).to(pred.dtype), meta=out.meta)
    return out
