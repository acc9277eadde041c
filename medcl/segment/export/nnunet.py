"""``medcl export --format nnunet``: pretrained weights for nnU-Net v2's ``-pretrained_weights``, and plans for them.

nnU-Net v2 starts a training from foreign weights with ``nnUNetv2_train DATASET CONFIGURATION FOLD -pretrained_weights
FILE``: ``nnunetv2.run.load_pretrained_weights`` reads ``torch.load(FILE)["network_weights"]`` and demands *every* key
of the network it built from its plans -- the ``decoder.encoder.*`` copies of the encoder included -- with the same
shape, except the segmentation layers (``.seg_layers.``). So the weights only fit a network built from plans whose
``architecture`` is the one medcl trained. This writer therefore needs a ``plainconv`` / ``resenc`` backbone
(:mod:`medcl.models.nnunet`) and writes two files::

    FILE                 {"network_weights": {nnU-Net key: tensor},   # every key but the segmentation layers
                          "backbone_config": {...}, "medcl_record": {...}}   # so medcl --init reads it back
    STEM.plans.json      the plans nnU-Net builds that network from

Without options the plans file is a *fragment*: one configuration, ``3d_fullres_medcl``, that inherits your
``3d_fullres`` and replaces its ``architecture``; merge it into the ``configurations`` of your ``nnUNetPlans.json``.
With ``plans=PATH/nnUNetPlans.json`` (what ``nnUNetv2_plan_and_preprocess`` wrote for your dataset) it is your plans
plus that configuration, under the plans name ``medclPlans``: copy it to ``$nnUNet_preprocessed/DATASET/medclPlans.json``
and train with ``-p medclPlans``. The new configuration keeps your preprocessed data (its ``data_identifier`` is
inherited) and, if needed, a patch size rounded to the network's total stride. If your configuration already has
medcl's architecture (``backbone.plans: nnUNetPlans.json:3d_fullres`` at pretraining), train it directly.

Preprocessing: nnU-Net fine-tunes on *its* preprocessing (CT: clip to the dataset's foreground percentiles and
z-score with the dataset's statistics; other modalities: z-score per image; the files' voxel order; its own target
spacing), not on medcl's plan. Each difference is named in the summary (``preprocessing``) and warned about.

Options (``key=value`` after the flags): ``plans=PATH`` (your plans file), ``configuration=3d_fullres`` (the one to
extend), ``name=3d_fullres_medcl`` (the new configuration), ``plans_name=medclPlans``, ``in_channels=N`` (the channels
nnU-Net feeds; default: your plans' channel count, else the checkpoint's; the first layer is adapted by channel mean).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

from medcl.core.errors import MedclConfigError, MedclDataError

log = logging.getLogger(__name__)

HELP = "weights nnU-Net v2 loads with -pretrained_weights (every key but the segmentation layers), and a plans file beside them"

_OPTIONS = ("plans", "configuration", "name", "plans_name", "in_channels")

_NNUNET_NORM = {  # nnU-Net's normalisation schemes (nnunetv2.preprocessing.normalization)
    "CTNormalization": "clip to the dataset's foreground 0.5-99.5 percentiles, z-score with the dataset's foreground "
                       "mean and std",
    "ZScoreNormalization": "z-score per image (inside the non-zero mask when use_mask_for_norm), no clipping",
    "NoNormalization": "none",
    "RescaleTo01Normalization": "rescale each image to [0, 1]",
    "RGBTo01Normalization": "divide by 255",
}
_SAME_IDEA = {("mri", "ZScoreNormalization"), ("none", "NoNormalization")}


def plans_path_for(out: Path) -> Path:
    """The plans file written beside weights ``out`` (``x.pth`` -> ``x.plans.json``)."""
    return out.with_name(out.stem + ".plans.json")


def _options(options: Any) -> dict[str, str]:
    extra = dict(getattr(options, "extra", {}) or {})
    for key in extra:
        if key not in _OPTIONS:
            raise MedclConfigError(key, f"unknown nnunet option; known: {', '.join(f'{k}=' for k in _OPTIONS)}")
    if "in_channels" in extra and not str(extra["in_channels"]).isdigit():
        raise MedclConfigError("in_channels", f"must be a positive integer, got {extra['in_channels']!r}")
    return extra


def _ours(spec: Any) -> str:
    if spec.scheme == "ct":
        return f"clip to the HU window [{spec.window[0]:g}, {spec.window[1]:g}], scale to [0, 1]"
    if spec.scheme == "mri":
        return (f"clip to the {spec.percentiles[0]:g}-{spec.percentiles[1]:g} percentiles, z-score over the "
                "foreground, per image")
    return "none"


def compare_preprocessing(plan: dict[str, Any] | None, configuration: dict[str, Any] | None,
                          anisotropic: bool, transpose: list[int] | None = None) -> list[dict[str, Any]]:
    """medcl's plan vs what nnU-Net will do: one ``{"item", "medcl", "nnunet", "level"}`` per aspect, ``level``
    ``"same"``, ``"note"`` (close) or ``"warning"`` (different inputs than the weights saw).

    Args:
        plan: the checkpoint's preprocessing plan (its run record), ``None`` when unknown.
        configuration: the user's resolved nnU-Net configuration, ``None`` = nnU-Net's defaults per modality.
        anisotropic: the network has anisotropic kernels or strides (axis order then matters).
        transpose: the plans' ``transpose_forward``.
    """
    from medcl.data.plan import PreprocessingPlan

    if plan is None:
        return [{"item": "plan", "medcl": "unknown (the checkpoint's run record names no preprocessing plan)",
                 "nnunet": "its own", "level": "warning"}]
    p = PreprocessingPlan.from_dict(plan)
    conf = configuration or {}
    schemes = conf.get("normalization_schemes")
    n = max(len(p.channel_names), len(p.intensity), len(schemes or []), 1)
    items = []
    for c in range(n):
        spec = p.intensity[min(c, len(p.intensity) - 1)]
        theirs = schemes[c] if schemes and c < len(schemes) else ("CTNormalization" if spec.scheme == "ct"
                                                                   else "ZScoreNormalization")
        source = "" if schemes else " (nnU-Net's default for this modality)"
        level = "note" if (spec.scheme, theirs) in _SAME_IDEA else "warning"
        if (spec.scheme, theirs) == ("none", "NoNormalization"):
            level = "same"
        items.append({"item": f"intensity, channel {c}", "medcl": f"{spec.scheme}: {_ours(spec)}",
                      "nnunet": f"{theirs}: {_NNUNET_NORM.get(theirs, 'custom')}{source}", "level": level})
    ours = p.spacing
    theirs_sp = conf.get("spacing")
    if ours is None:
        items.append({"item": "spacing", "medcl": "native (no resampling)",
                      "nnunet": f"{list(theirs_sp)} mm" if theirs_sp else "the median spacing of your dataset",
                      "level": "warning"})
    else:
        same = theirs_sp is not None and sorted(round(float(s), 3) for s in theirs_sp) == sorted(round(s, 3) for s in ours)
        items.append({"item": "spacing", "medcl": f"{list(ours)} mm (axes i, j, k)",
                      "nnunet": f"{list(theirs_sp)} mm (transposed axes)" if theirs_sp
                      else "the median spacing of your dataset", "level": "same" if same else "warning"})
    items.append({"item": "axes", "medcl": f"reoriented to {p.orientation}, array axes i, j, k",
                  "nnunet": "the files' own voxel order (SimpleITK: reversed), transposed by transpose_forward "
                            f"{transpose if transpose is not None else '(from planning)'}",
                  "level": "warning" if anisotropic else "note"})
    return items


def _user_plans(opts: dict[str, str]) -> tuple[dict[str, Any], str, dict[str, Any]] | None:
    from medcl.models.nnunet_plans import read_plans, resolve_configuration

    if "plans" not in opts:
        return None
    path = Path(opts["plans"]).expanduser()
    plans = read_plans(path)
    base = opts.get("configuration", "3d_fullres")
    return plans, base, resolve_configuration(plans, base, f"{path}:{base}")


def _same_architecture(a: Any, b: dict[str, Any]) -> bool:
    from medcl.models.nnunet_plans import fields_from_architecture

    if not isinstance(a, dict):
        return False
    try:
        fa = fields_from_architecture(str(a.get("network_class_name")), a.get("arch_kwargs") or {})
    except MedclDataError:
        return False
    return fa == fields_from_architecture(b["network_class_name"], b["arch_kwargs"])


def _plans_to_write(arch: dict[str, Any], user: tuple | None, opts: dict[str, str], stride: tuple[int, ...],
                    source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the plans dict to write, facts for the summary: kind, configuration, notes)."""
    base = opts.get("configuration", "3d_fullres")
    name = opts.get("name", f"{base}_medcl")
    if name == base:
        raise MedclConfigError("name", f"the new configuration must not replace the one it extends ({base})")
    entry: dict[str, Any] = {"inherits_from": base, "architecture": arch}
    info: dict[str, Any] = {"configuration": name, "base_configuration": base, "notes": []}
    if user is None:
        info["kind"] = "fragment"
        return {"plans_name": opts.get("plans_name", "medclPlans"), "configurations": {name: entry},
                "medcl": {"source": source, "how": f"merge configurations.{name} into your nnUNetPlans.json, or export "
                                                   "again with plans=PATH/nnUNetPlans.json for a complete file"}}, info
    plans, _, resolved = user
    plans = copy.deepcopy(plans)
    if name in plans["configurations"] and opts.get("name") is None:
        raise MedclDataError(name, "your plans already have a configuration of this name; pick another with name=NAME")
    patch = resolved.get("patch_size")
    if patch and len(patch) == 3 and any(int(p) % s for p, s in zip(patch, stride)):
        fitted = [max(2 * s, int(p) // s * s) for p, s in zip(patch, stride)]
        entry["patch_size"] = fitted
        info["notes"].append(f"patch size {list(patch)} is not a multiple of the network's total stride {list(stride)}; "
                             f"{name} uses {fitted}")
    plans["configurations"][name] = entry
    plans["plans_name"] = opts.get("plans_name", "medclPlans")
    plans["medcl"] = {"source": source, "added_configuration": name}
    info["kind"] = "complete"
    info["same_as_base"] = _same_architecture(resolved.get("architecture"), arch)
    info["dataset_name"] = plans.get("dataset_name", "DATASET")
    info["user_plans_name"] = str(user[0].get("plans_name") or "nnUNetPlans")
    info["plans_name"] = plans["plans_name"]
    return plans, info


def _channels_of(user: tuple | None) -> int | None:
    if user is None:
        return None
    props = user[0].get("foreground_intensity_properties_per_channel")
    return len(props) if isinstance(props, dict) and props else None


def _train_command(info: dict[str, Any], out: Path, plans_file: Path) -> str:
    if info["kind"] == "fragment":
        return (f"merge configurations.{info['configuration']} of {plans_file} into "
                f"$nnUNet_preprocessed/DATASET/nnUNetPlans.json, then: nnUNetv2_train DATASET {info['configuration']} "
                f"FOLD -pretrained_weights {out}")
    ds = info["dataset_name"]
    if info.get("same_as_base"):  # the user's own plans already build this network
        own = info["user_plans_name"]
        return (f"nnUNetv2_train {ds} {info['base_configuration']} FOLD"
                f"{'' if own == 'nnUNetPlans' else f' -p {own}'} -pretrained_weights {out}")
    return (f"cp {plans_file} $nnUNet_preprocessed/{ds}/{info['plans_name']}.json && nnUNetv2_train {ds} "
            f"{info['configuration']} FOLD -p {info['plans_name']} -pretrained_weights {out}")


def export(ckpt: Any, out: Path, options: Any) -> dict[str, Any]:
    """Write ``ckpt``'s plainconv/resenc backbone as nnU-Net v2 pretrained weights to ``out`` and its plans beside it.

    Raises:
        MedclDataError: another backbone kind, weights that do not cover the whole encoder and decoder, an output
            folder instead of a file, or a plans file beside ``out`` that exists (without ``--overwrite``).
    """
    from medcl.config import to_dict
    from medcl.core.files import atomic_write_json
    from medcl.engine.checkpoint import atomic_torch_save
    from medcl.models.backbone import as_triple
    from medcl.models.nnunet import to_nnunet_state_dict
    from medcl.models.nnunet_plans import nnunet_architecture
    from medcl.segment.init import build_from_checkpoint

    opts = _options(options)
    out = Path(out)
    kind = (ckpt.backbone or {}).get("name")
    if kind not in ("plainconv", "resenc"):
        raise MedclDataError(ckpt.path, f"its backbone is {kind or 'unknown'}; nnU-Net's networks are medcl's plainconv "
                                        "and resenc backbones: pretrain with backbone.name=plainconv or resenc "
                                        "(backbone.preset / backbone.plans for nnU-Net's sizes)")
    plans_file = plans_path_for(out)
    if out.is_dir():
        raise MedclDataError(out, "is a folder; --out names the weights file (e.g. medcl_pretrained.pth)")
    if plans_file.exists() and not getattr(options, "overwrite", False):
        raise MedclDataError(plans_file, "already exists; pass --overwrite to replace it")
    user = _user_plans(opts)
    in_ch = int(opts.get("in_channels") or _channels_of(user) or ckpt.backbone.get("in_channels") or 1)
    classes = int(ckpt.backbone.get("out_channels") or 0)
    load = ["encoder", "bottleneck", "decoder"] + (["head"] if classes else [])
    net, report = build_from_checkpoint(ckpt, in_ch, classes, load)
    incomplete = report.missing_in(load) + [m["key"] for m in report.mismatched]
    if incomplete:
        raise MedclDataError(ckpt.path, f"nnU-Net's loader needs every encoder and decoder weight; {len(incomplete)} "
                                        f"did not load (e.g. {incomplete[0]})\n{report}")
    weights = to_nnunet_state_dict(net)  # type: ignore[arg-type]
    arch = nnunet_architecture(net.config)
    stride = tuple(int(s) for s in net.total_stride)
    plans, info = _plans_to_write(arch, user, opts, stride, str(ckpt.path))
    anisotropic = any(len(set(as_triple(v))) > 1 for v in (*net.config.strides, *(net.config.kernel_sizes or ())))
    prep = compare_preprocessing(ckpt.plan, user[2] if user else None, anisotropic,
                                 user[0].get("transpose_forward") if user else None)
    if report.adapted:
        info["notes"].append(f"first layer adapted from {ckpt.backbone.get('in_channels')} to {in_ch} input channels "
                             "(channel mean)")
    differs = [f"{i['item']} (medcl: {i['medcl']}; nnU-Net: {i['nnunet']})" for i in prep if i["level"] == "warning"]
    if differs:
        warnings.warn("nnU-Net will fine-tune these weights on other preprocessing than medcl pretrained them on: "
                      + "; ".join(differs), stacklevel=2)
    for note in info["notes"]:
        warnings.warn(note, stacklevel=2)
    record = ckpt.record if ckpt.provenance == "recorded" else None
    atomic_torch_save({"network_weights": weights, "backbone_config": to_dict(net.config), "medcl_record": record,
                       "medcl_export": {"format": "nnunet", "source": str(ckpt.path), "plans_file": plans_file.name,
                                        "configuration": info["configuration"]}}, out)
    atomic_write_json(plans, plans_file, indent=2)
    enc = sum(1 for k in weights if k.startswith("encoder."))
    dec = sum(1 for k in weights if k.startswith("decoder.") and not k.startswith("decoder.encoder."))
    train = _train_command(info, out, plans_file)
    log.info("nnU-Net weights of %s (%s, %d tensors) in %s, plans in %s; next: %s", ckpt.path,
             arch["network_class_name"], len(weights), out, plans_file, train)
    return {"written": str(out), "format": "nnunet", "plans_file": str(plans_file), "plans_kind": info["kind"],
            "configuration": info["configuration"], "network": arch["network_class_name"], "in_channels": in_ch,
            "tensors": len(weights), "encoder_tensors": enc, "decoder_tensors": dec,
            "total_stride": list(stride), "preprocessing": prep, "notes": info["notes"],
            "train": train}
