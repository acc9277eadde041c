"""``medcl export --format monai-bundle``: a fine-tuned model as a MONAI bundle that MONAI runs without medcl.

The bundle (MONAI's bundle specification, the layout of the MONAI model zoo)::

    OUT/configs/metadata.json    version, monai/pytorch/numpy versions, network_data_format (inputs, outputs with
                                 the class names as channel_def), labels, and what medcl exported (plan, window)
    OUT/configs/inference.json   LoadImaged -> the plan as MONAI transforms (:mod:`.monai_plan`) -> SlidingWindowInferer
                                 (medcl's window, overlap, blending) over DynUNet / SwinUNETR + softmax -> Invertd on
                                 the probabilities -> AsDiscreted(argmax) -> SaveImaged (uint8, ``{name}_seg.nii.gz``);
                                 no ignite: a plain loop of bundle expressions
    OUT/models/model.pt          the network's state dict under MONAI's own names (``network_def`` loads it strictly)
    OUT/docs/README.md           how to run it

``python -m monai.bundle run --config_file OUT/configs/inference.json --meta_file OUT/configs/metadata.json
--bundle_root OUT --dataset_dir IMAGES --output_dir PRED`` then gives what ``medcl predict`` gives: medcl's
prediction is the same computation (per-window softmax blended with MONAI's sliding window, the probabilities
inverted with MONAI's ``Invertd``, argmax last). Mirror test-time augmentation has no MONAI inferer: a model whose
runs use it is refused unless ``tta=off`` is given (the bundle then matches ``medcl predict --no-tta``).

Weights are renamed with the backbone's key map run backwards (:func:`medcl.models.keymaps.to_foreign`), loaded
into the MONAI class built from the very config dict the bundle declares, and checked at export: the MONAI network's
logits must equal medcl's on a test input, or nothing is written.
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.models.backbone import Backbone, BackboneConfig, as_triple

log = logging.getLogger(__name__)

HELP = "a MONAI bundle folder (configs/metadata.json, configs/inference.json, models/model.pt) for monai.bundle run"

_OPTIONS = {"tta": ("off",)}
_LOGIT_RTOL = 1e-4  # relative to the largest logit: float32 reassociation only


def network_config(cfg: BackboneConfig) -> dict[str, Any]:
    """The MONAI ``DynUNet`` / ``SwinUNETR`` that computes ``cfg``'s medcl backbone, as a bundle config dict
    (the arguments :mod:`medcl.models.dynunet` / :mod:`medcl.models.swin` build it with; deep supervision off)."""
    out = max(1, int(cfg.out_channels or 0))
    if cfg.name == "dynunet":
        strides = [list(as_triple(s)) for s in cfg.strides]
        kernels = [list(as_triple(k)) for k in (cfg.kernel_sizes or (3,) * len(cfg.filters))]
        return {"_target_": "DynUNet", "spatial_dims": 3, "in_channels": cfg.in_channels, "out_channels": out,
                "kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:],
                "filters": list(cfg.filters), "dropout": cfg.dropout or None,
                "norm_name": [cfg.norm.upper(), {"affine": True}], "deep_supervision": False,
                "res_block": cfg.res_block}
    if cfg.name == "swinunetr":
        return {"_target_": "SwinUNETR", "spatial_dims": 3, "in_channels": cfg.in_channels, "out_channels": out,
                "feature_size": cfg.feature_size, "depths": list(cfg.depths), "num_heads": list(cfg.num_heads),
                "window_size": cfg.window_size, "norm_name": cfg.norm, "drop_rate": cfg.dropout,
                "dropout_path_rate": cfg.drop_path, "use_checkpoint": False, "use_v2": cfg.use_v2,
                "normalize": True}
    raise MedclDataError(cfg.name, f"no MONAI network for backbone {cfg.name!r}")


def monai_network(backbone: Backbone, where: Any) -> tuple[torch.nn.Module, dict[str, Any], float]:
    """(MONAI network holding ``backbone``'s weights, its config dict, the largest logit difference found).

    Raises:
        MedclDataError: a weight without a MONAI counterpart, or logits that differ (the export would be wrong).
    """
    from monai.bundle import ConfigParser

    from medcl.models.keymaps import find_component, get_keymap, to_foreign
    from medcl.segment.inference import logits_fn

    net_cfg = network_config(backbone.config)
    net = ConfigParser({"net": net_cfg}).get_parsed_content("net")  # as monai.bundle will build it
    keymap = get_keymap(f"monai-{backbone.config.name}")
    missing, unexpected = net.load_state_dict(to_foreign(keymap, backbone, backbone.state_dict()), strict=False)
    missing = [k for k in missing if not any(find_component(k, d) == 0 for d in keymap.drop)]  # shared copies
    if missing or unexpected:
        raise MedclDataError(where, f"the weights do not map onto MONAI's {net_cfg['_target_']} (missing "
                                    f"{missing[:3]}, unexpected {unexpected[:3]})")
    net.eval()
    backbone.eval()
    side = [2 * s for s in backbone.total_stride]  # the smallest input that keeps every norm above one voxel
    x = torch.randn(1, backbone.in_channels, *side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = logits_fn(backbone)(x), net(x)
    diff = float((ours - theirs).abs().max())
    if not diff <= _LOGIT_RTOL * max(1.0, float(ours.abs().max())):
        raise MedclDataError(where, f"MONAI's {net_cfg['_target_']} with the exported weights gives other logits than "
                                    f"medcl's backbone (max difference {diff:.3g}); not exported")
    return net, net_cfg, diff


def inference_config(net_cfg: dict[str, Any], preprocessing: list[dict[str, Any]], roi_size: list[int],
                     inference: Any) -> dict[str, Any]:
    """The bundle's ``configs/inference.json`` (MONAI model-zoo names; run ids ``initialize`` and ``run``).

    The loop is plain bundle expressions over a MONAI ``Dataset`` rather than an ignite ``SupervisedEvaluator``:
    the bundle then needs MONAI and nibabel only (plus ``fire`` for the ``python -m monai.bundle`` command line).
    """
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/input'",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))",
        # the bundle runs without medcl (no medcl.core.device): its own first-GPU-else-CPU rule, overridable
        "device": "$torch.device('cuda:0' if torch.cuda.device_count() > 0 else 'cpu')",
        "network_def": net_cfg,
        # medcl blends per-window probabilities, not logits: the softmax runs inside each window
        "network": "$torch.nn.Sequential(@network_def, torch.nn.Softmax(dim=1)).to(@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi_size, "sw_batch_size": inference.sw_batch_size,
                    "overlap": inference.overlap, "mode": inference.mode, "sw_device": "@device",
                    "device": "$torch.device('cpu')"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False},
        ]},
        # one case: [C, *S] -> probabilities of the window batch [1, K, *S] -> [K, *S] -> inverted, argmax, saved
        "predict": "$lambda d: @postprocessing(dict(d, pred=@inferer(d['image'][None].to(@device), @network)[0]))",
        "initialize": ["$@network_def.load_state_dict(torch.load(@bundle_root + '/models/model.pt', "
                       "map_location=@device, weights_only=True), strict=True)"],
        "run": ["$torch.set_grad_enabled(False)", "$[@predict(d) for d in @dataset]"],
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def metadata_config(model: Any, net_cfg: dict[str, Any], roi_size: list[int]) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` (MONAI's metadata schema fields, plus ``labels`` and ``medcl``)."""
    import monai
    import numpy

    from medcl.segment.export.monai_plan import input_format

    fmt, modality = input_format(model.plan)
    names = {str(i): n for i, n in sorted(model.class_names.items())}
    required = {d: v for d in ("nibabel", "fire") if (v := _version(d)) is not None}
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medcl from {model.path.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": required,
        "task": f"3D segmentation of {', '.join(n for i, n in names.items() if i != '0')}",
        "description": f"A medcl fine-tuned {net_cfg['_target_']} ({model.num_classes} classes)",
        "authors": "medcl export",
        "copyright": "as the exported model's",
        "intended_use": "research; not for diagnostic use",
        "data_type": "nibabel",
        "image_classes": f"{model.backbone.in_channels} channel(s), {modality}, prepared as in medcl's plan",
        "label_classes": ", ".join(f"{i} is {n}" for i, n in names.items()),
        "pred_classes": f"{model.num_classes} channels of probabilities, then argmax: " +
                        ", ".join(f"{i} is {n}" for i, n in names.items()),
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": fmt, "modality": modality,
                                 "num_channels": model.backbone.in_channels, "spatial_shape": roi_size,
                                 "dtype": "float32", "value_range": [0, 1] if fmt == "hounsfield" else [],
                                 "is_patch_data": True,
                                 "channel_def": {str(i): n for i, n in
                                                 enumerate(model.plan.channel_names or ["image"])}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": model.num_classes,
                                 "spatial_shape": roi_size, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": names}},
        },
        "labels": names,
        "medcl": {"checkpoint": str(model.path), "step": model.record.get("step"),
                  "plan": model.plan.to_dict(), "roi_size": roi_size, "overlap": model.inference.overlap,
                  "mode": model.inference.mode, "tta": False},
    }


def _readme() -> str:
    return ("# medcl model as a MONAI bundle\n\nRun (needs `monai`, `nibabel` and `fire`; not medcl):\n\n"
            "    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\\n"
            "        --bundle_root . --dataset_dir /path/to/niftis --output_dir /path/to/predictions\n\n"
            "Each `NAME.nii.gz` of the dataset folder gives `NAME_seg.nii.gz` (uint8 labels on the input's grid; the "
            "class names are `labels` in configs/metadata.json).\n")


def _check_options(options: Any) -> dict[str, str]:
    extra = dict(getattr(options, "extra", {}) or {})
    for key, value in extra.items():
        if key not in _OPTIONS:
            raise MedclConfigError(key, f"unknown monai-bundle option; known: {', '.join(f'{k}=' for k in _OPTIONS)}")
        if value not in _OPTIONS[key]:
            raise MedclConfigError(key, f"must be one of {list(_OPTIONS[key])}, got {value!r}")
    return extra


def export(ckpt: Any, out: Path, options: Any) -> dict[str, Any]:
    """Write the MONAI bundle of fine-tuned model ``ckpt`` into folder ``out`` (see the module docstring).

    Raises:
        MedclDataError: not a fine-tuned model, a plan step with no MONAI equivalent, mirror TTA without ``tta=off``,
            or a MONAI network that does not reproduce medcl's logits.
    """
    from medcl.core.files import atomic_write_json, atomic_write_text
    from medcl.engine.checkpoint import atomic_torch_save
    from medcl.segment.export.monai_plan import preprocessing_transforms
    from medcl.segment.predict import load_model

    extra = _check_options(options)
    model = load_model(ckpt.path, allow_incomplete=bool(getattr(options, "allow_incomplete", False)))
    if model.inference.tta and extra.get("tta") != "off":
        raise MedclDataError(ckpt.path, "this model predicts with mirror test-time augmentation (inference.tta), which "
                                        "MONAI's SlidingWindowInferer does not do; pass tta=off to export it without "
                                        "(the bundle then matches `medcl predict --no-tta`)")
    preprocessing = preprocessing_transforms(model.plan, model.backbone.in_channels, ckpt.path)
    net, net_cfg, diff = monai_network(model.backbone, ckpt.path)
    roi = [int(s) for s in model.roi_size]
    out = Path(out)
    atomic_torch_save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                      out / "models" / "model.pt")
    atomic_write_json(inference_config(net_cfg, preprocessing, roi, model.inference),
                      out / "configs" / "inference.json", indent=2)
    atomic_write_json(metadata_config(model, net_cfg, roi), out / "configs" / "metadata.json", indent=2)
    atomic_write_text(_readme(), out / "docs" / "README.md")
    log.info("MONAI bundle of %s (%s, logits within %.2g of medcl's) in %s", model.path, net_cfg["_target_"], diff, out)
    return {"written": str(out), "format": "monai-bundle", "network": net_cfg["_target_"], "roi_size": roi,
            "overlap": model.inference.overlap, "mode": model.inference.mode, "tta": False,
            "max_logit_difference": diff,
            "files": ["configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"],
            "run": (f"python -m monai.bundle run --config_file {out}/configs/inference.json --meta_file "
                    f"{out}/configs/metadata.json --bundle_root {out} --dataset_dir IMAGES --output_dir PREDICTIONS")}
