"""A medcl preprocessing plan as MONAI bundle transform configs, or a refusal naming the step.

:meth:`medcl.data.PreprocessingPlan.transforms` builds medcl's pipeline from MONAI's invertible transforms plus a
few medcl ``MapTransform``\\s (foreground mask, intensity). A MONAI bundle may only name MONAI's own classes, so each
plan step is written as the MONAI transform that computes the same thing, or refused at export:

=======================================  ===========================================================  ==========
plan step (medcl)                        MONAI bundle transform                                       exact
=======================================  ===========================================================  ==========
read (``medcl.io.read_volume``, NIfTI)   ``LoadImaged`` (``NibabelReader``: the same sform/qform       yes
                                         rule) + ``EnsureChannelFirstd``
``orientation``                          ``Orientationd(axcodes)``                                    same class
``spacing``                              ``Spacingd(pixdim, bilinear, padding_mode="border")``         same class
``crop_foreground``, foreground           ``CropForegroundd(source_key="image", select_fn=x > t,        same box
``threshold`` / ``nonzero`` / ``all``    channel_indices=0)`` on the source units, before the
                                         intensity step (medcl's mask reads the same values); ``all``
                                         crops nothing
intensity ``ct`` (window, to [0, 1])     ``ScaleIntensityRanged(a_min, a_max, 0, 1, clip=True)``       to 1 ulp
intensity ``none``                       nothing                                                      yes
=======================================  ===========================================================  ==========

Refused (:class:`~medcl.core.errors.MedclDataError` naming the step): intensity ``mri`` (percentile clip of the
*non-zero* voxels, then z-score with the statistics of the *foreground*: ``NormalizeIntensityd(nonzero=True)``
leaves the zero voxels unnormalised, ``ClipIntensityPercentilesd`` counts them), channels normalised differently
(one MONAI transform covers every channel), and a foreground crop with ``foreground: otsu`` (``CropForegroundd``
has no Otsu threshold). The foreground method matters only through the crop and the ``mri`` scheme, so a plan
without either exports whatever it names. ``fg_box`` is a training-time sampling aid, not part of inference.
"""

from __future__ import annotations

from typing import Any

from medcl.core.errors import MedclDataError
from medcl.data import PreprocessingPlan

__all__ = ["IMAGE_KEY", "preprocessing_transforms", "input_format"]

IMAGE_KEY = "image"
_RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]


def _refuse(where: Any, step: str, why: str) -> MedclDataError:
    return MedclDataError(where, f"plan step {step} has no MONAI transform equivalent ({why}); a MONAI bundle can "
                                 "export plans with intensity 'ct' or 'none' and a crop by threshold, nonzero or "
                                 "all (see medcl.segment.export.monai_plan)")


def _intensity(plan: PreprocessingPlan, in_channels: int, where: Any) -> list[dict[str, Any]]:
    specs = [plan.spec_for(c) for c in range(in_channels)]
    if any(s != specs[0] for s in specs[1:]):
        raise _refuse(where, "'intensity' (one spec per channel)",
                      f"the channels are normalised differently ({[s.scheme for s in specs]}), a bundle applies one "
                      "intensity transform to every channel")
    spec = specs[0]
    if spec.scheme == "mri":
        raise _refuse(where, "'intensity: mri'",
                      "percentile clip of the non-zero voxels then z-score over the foreground: "
                      "NormalizeIntensityd(nonzero=True) leaves zero voxels unnormalised and ClipIntensityPercentilesd "
                      "counts them")
    if spec.scheme == "none":
        return []
    lo, hi = spec.window
    return [{"_target_": "ScaleIntensityRanged", "keys": IMAGE_KEY, "a_min": lo, "a_max": hi,
             "b_min": 0.0, "b_max": 1.0, "clip": True}]


def _crop(plan: PreprocessingPlan, where: Any) -> list[dict[str, Any]]:
    if not plan.crop_foreground or plan.foreground == "all":
        return []
    if plan.foreground == "otsu":
        raise _refuse(where, "'crop_foreground' with 'foreground: otsu'",
                      "CropForegroundd selects voxels with a fixed rule, not Otsu's threshold of each volume")
    crop: dict[str, Any] = {"_target_": "CropForegroundd", "keys": IMAGE_KEY, "source_key": IMAGE_KEY,
                            "margin": int(plan.crop_margin), "allow_smaller": True}
    if plan.foreground == "threshold":  # medcl: channel 0 above the threshold, in source units
        crop.update(select_fn=f"$lambda x: x > {plan.foreground_threshold!r}", channel_indices=0)
    else:  # nonzero: any channel != 0
        crop["select_fn"] = "$lambda x: x != 0"
    return [crop]


def preprocessing_transforms(plan: PreprocessingPlan, in_channels: int, where: Any = "plan") -> list[dict[str, Any]]:
    """The MONAI dictionary transforms (bundle config dicts) that compute ``plan``'s pipeline on a NIfTI file.

    Args:
        plan: the model's preprocessing plan.
        in_channels: the network's input channels (a 4D NIfTI ``[X, Y, Z, C]`` when more than one).
        where: what a refusal names (the checkpoint).

    Returns:
        ``[{"_target_": "LoadImaged", ...}, ...]`` on key ``"image"``; every spatial step is one MONAI records, so
        ``Invertd`` maps a prediction back to the input grid.

    Raises:
        MedclDataError: a plan step with no MONAI equivalent (see the module docstring), named.
    """
    xs: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": IMAGE_KEY, "reader": "NibabelReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": IMAGE_KEY},
        # medcl's labels, explicit: MONAI's default is to become the MetaTensor's space
        {"_target_": "Orientationd", "keys": IMAGE_KEY, "axcodes": plan.orientation, "labels": _RAS_LABELS},
    ]
    if plan.spacing is not None:
        xs.append({"_target_": "Spacingd", "keys": IMAGE_KEY, "pixdim": [float(s) for s in plan.spacing],
                   "mode": "bilinear", "padding_mode": "border"})
    intensity = _intensity(plan, in_channels, where)  # refusals first, whatever the order below
    xs += _crop(plan, where)
    xs += intensity
    xs.append({"_target_": "EnsureTyped", "keys": IMAGE_KEY, "dtype": "$torch.float32"})
    return xs


def input_format(plan: PreprocessingPlan) -> tuple[str, str]:
    """(``format``, ``modality``) of the bundle's input for metadata.json: ``hounsfield``/``CT`` for a CT window."""
    ct = plan.intensity[0].scheme == "ct"
    modality = "CT" if ct else (plan.channel_names[0] if plan.channel_names else "unknown")
    return ("hounsfield" if ct else "magnitude"), modality
