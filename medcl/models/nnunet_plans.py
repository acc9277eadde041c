"""nnU-Net v2 architectures as medcl backbone configs: presets, plans files, nnU-Net / nnssl checkpoints.

nnU-Net v2 (Isensee et al., Nature Methods 2021; "nnU-Net Revisited", MICCAI 2024) describes a network in its
plans file, per configuration (nnU-Net >= 2.4)::

    "configurations": {"3d_fullres": {..., "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
                        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3], ...],
                        "strides": [[1, 1, 1], [2, 2, 2], ...], "n_conv_per_stage": [2, ...],
                        "n_conv_per_stage_decoder": [2, ...], "conv_bias": true,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": true}, "dropout_op": null,
                        "dropout_op_kwargs": null, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}},
      "3d_cascade_fullres": {"inherits_from": "3d_fullres", ...}}

(``ResidualEncoderUNet`` takes ``n_blocks_per_stage`` instead of ``n_conv_per_stage``.) This module turns such a
description into :class:`~medcl.models.backbone.BackboneConfig` fields and back:

=====================  ============================  =======================================================
medcl field            nnU-Net ``arch_kwargs``       note
=====================  ============================  =======================================================
``name``               ``network_class_name``        ``plainconv`` = PlainConvUNet, ``resenc`` = ResidualEncoderUNet
``filters``            ``features_per_stage``        ``n_stages`` = their number
``strides``            ``strides``                   per stage; the first is 1 in nnU-Net's plans
``kernel_sizes``       ``kernel_sizes``
``blocks``             ``n_conv_per_stage`` /        convolutions (plainconv) or residual blocks (resenc)
                       ``n_blocks_per_stage``
``decoder_blocks``     ``n_conv_per_stage_decoder``
``conv_bias``          ``conv_bias``
``norm``               ``norm_op`` (+ kwargs)        InstanceNorm3d / BatchNorm3d, eps 1e-5, affine
``dropout``            ``dropout_op`` (+ ``p``)      Dropout3d or none
=====================  ============================  =======================================================

The non-linearity is nnU-Net's LeakyReLU (slope 0.01, in place); other choices are refused.

**Presets** (``backbone.preset``), nnU-Net's networks for 3D data whose patch allows 5 poolings per axis -- on
isotropic data every patch from 128^3 to 224^3 (``get_pool_and_conv_props``, feature maps of at least 4 voxels):

* ``nnunet_3d_fullres``: ``PlainConvUNet``, 6 stages of 32, 64, 128, 256, 320, 320 features, 3^3 kernels, strides
  1, 2, 2, 2, 2, 2, two convolutions per encoder and decoder stage (``ExperimentPlanner``).
* ``resenc_m`` / ``resenc_l``: ``ResidualEncoderUNet`` with the same stages, 1, 3, 4, 6, 6, 6 residual blocks per
  encoder stage and one convolution per decoder stage (``nnUNetPlannerResEncM`` / ``...L``). M and L share this
  network: their planners differ in the VRAM target (8 vs 24 GB), which buys L a larger patch and batch, not
  another topology at these sizes. ``resenc_l`` is also nnssl's ``ResEncL`` (``get_res_enc_l``).

A preset fixes the topology; nnU-Net's planner would adapt stages and strides to the dataset's patch size and
spacing (anisotropic data get stride 1 along the thick axis). To match a real plan, use ``backbone.plans:
PATH:CONFIGURATION`` instead.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcl.core.errors import MedclConfigError, MedclDataError

if TYPE_CHECKING:
    from medcl.models.backbone import BackboneConfig

__all__ = ["PRESETS", "CLASS_NAMES", "missing_networks_error", "validate_nnunet_config", "resolve_nnunet_config", "parse_plans_ref",
           "read_plans", "resolve_configuration", "fields_from_architecture", "nnunet_architecture",
           "architecture_of_checkpoint"]

_SIX = (32, 64, 128, 256, 320, 320)
PRESETS: dict[str, dict[str, Any]] = {
    "nnunet_3d_fullres": {"name": "plainconv", "filters": _SIX, "strides": (1, 2, 2, 2, 2, 2), "kernel_sizes": (3,) * 6,
                          "blocks": (2,) * 6, "decoder_blocks": (2,) * 5, "conv_bias": True, "norm": "instance",
                          "dropout": 0.0},
    "resenc_m": {"name": "resenc", "filters": _SIX, "strides": (1, 2, 2, 2, 2, 2), "kernel_sizes": (3,) * 6,
                 "blocks": (1, 3, 4, 6, 6, 6), "decoder_blocks": (1,) * 5, "conv_bias": True, "norm": "instance",
                 "dropout": 0.0},
}
PRESETS["resenc_l"] = dict(PRESETS["resenc_m"])

# medcl kind -> the dynamic_network_architectures class nnU-Net names in its plans
CLASS_NAMES = {"plainconv": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
               "resenc": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"}
_RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)  # nnU-Net's ResEncUNetPlanner
_NORMS = {"InstanceNorm3d": "instance", "BatchNorm3d": "batch"}
_NORM_NAMES = {"instance": "torch.nn.modules.instancenorm.InstanceNorm3d",
               "batch": "torch.nn.modules.batchnorm.BatchNorm3d"}


def _kind_of_class(name: str) -> str | None:
    short = str(name).rsplit(".", 1)[-1]
    return {"PlainConvUNet": "plainconv", "ResidualEncoderUNet": "resenc"}.get(short)


def parse_plans_ref(text: str) -> tuple[Path, str]:
    """``"PATH:CONFIGURATION"`` -> (path, configuration); the configuration is what follows the last colon."""
    path, sep, conf = str(text).rpartition(":")
    if not sep or not path or not conf or "/" in conf or "\\" in conf:
        raise MedclConfigError("plans", f"expected PATH:CONFIGURATION (e.g. nnUNetPlans.json:3d_fullres), got {text!r}")
    return Path(path).expanduser(), conf


def read_plans(path: str | Path) -> dict[str, Any]:
    """A plans JSON file as a dict (raises :class:`MedclDataError` naming the file)."""
    p = Path(path)
    try:
        plans = json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise MedclDataError(p, "nnU-Net plans file does not exist") from exc
    except (OSError, ValueError) as exc:
        raise MedclDataError(p, f"not a readable JSON plans file ({exc})") from exc
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise MedclDataError(p, "not an nnU-Net plans file (no 'configurations' section)")
    return plans


def resolve_configuration(plans: Mapping[str, Any], name: str, where: Any = None) -> dict[str, Any]:
    """Configuration ``name`` of ``plans`` with ``inherits_from`` resolved (the child's keys win, as in nnU-Net's
    ``PlansManager``)."""
    confs = plans.get("configurations") or {}
    chain: list[str] = []
    merged: dict[str, Any] = {}
    current: str | None = name
    while current is not None:
        if current not in confs:
            raise MedclDataError(where, f"no configuration {current!r} in the plans (it has {sorted(confs)})")
        if current in chain:
            raise MedclDataError(where, f"configurations inherit in a circle: {' -> '.join([*chain, current])}")
        chain.append(current)
        merged = {**confs[current], **merged}
        current = confs[current].get("inherits_from")
    merged.pop("inherits_from", None)
    return merged


def _triples(values: Any, n: int, key: str, where: Any) -> list[list[int]]:
    if isinstance(values, int):
        values = [values] * n
    if not isinstance(values, list | tuple) or len(values) != n:
        raise MedclDataError(where, f"arch_kwargs.{key}: expected {n} entries, got {values!r}")
    out = []
    for v in values:
        t = [int(v)] * 3 if isinstance(v, int | float) else [int(x) for x in v]
        if len(t) != 3:
            raise MedclDataError(where, f"arch_kwargs.{key}: medcl builds 3D networks; got {v!r}")
        out.append(t)
    return out


def _per_stage(values: Any, n: int, key: str, where: Any) -> list[int]:
    if isinstance(values, int):
        return [values] * n
    if not isinstance(values, list | tuple) or len(values) != n:
        raise MedclDataError(where, f"arch_kwargs.{key}: expected {n} entries, got {values!r}")
    return [int(v) for v in values]


def fields_from_architecture(class_name: str, kw: Mapping[str, Any], where: Any = None) -> dict[str, Any]:
    """nnU-Net's ``network_class_name`` + ``arch_kwargs`` -> :class:`BackboneConfig` fields (refusing what medcl does
    not build: 2D, other classes, other non-linearities, custom residual blocks)."""
    kind = _kind_of_class(class_name)
    if kind is None:
        raise MedclDataError(where, f"network class {class_name!r}: medcl builds nnU-Net's PlainConvUNet (plainconv) "
                                    "and ResidualEncoderUNet (resenc) only")

    def name_of(key: str) -> str:
        v = kw.get(key)
        return "" if v is None else str(getattr(v, "__name__", v)).rsplit(".", 1)[-1]

    if name_of("conv_op") != "Conv3d":
        raise MedclDataError(where, f"conv_op {kw.get('conv_op')!r}: medcl builds 3D networks (Conv3d); "
                                    "choose a 3d configuration")
    norm = _NORMS.get(name_of("norm_op"))
    nkw = dict(kw.get("norm_op_kwargs") or {})
    if norm is None or float(nkw.get("eps", 1e-5)) != 1e-5 or not nkw.get("affine", False):
        raise MedclDataError(where, f"norm_op {kw.get('norm_op')!r} with {nkw}: medcl builds InstanceNorm3d or "
                                    "BatchNorm3d with eps 1e-5 and affine weights (nnU-Net's choice)")
    lkw = dict(kw.get("nonlin_kwargs") or {})
    if name_of("nonlin") != "LeakyReLU" or float(lkw.get("negative_slope", 0.01)) != 0.01:
        raise MedclDataError(where, f"nonlin {kw.get('nonlin')!r} with {lkw}: medcl builds nnU-Net's LeakyReLU (0.01)")
    dropout = 0.0
    if kw.get("dropout_op") is not None:
        if name_of("dropout_op") != "Dropout3d":
            raise MedclDataError(where, f"dropout_op {kw.get('dropout_op')!r}: medcl builds Dropout3d or none")
        dropout = float((kw.get("dropout_op_kwargs") or {}).get("p", 0.5))
    for extra in ("block", "bottleneck_channels", "stem_channels"):
        if kw.get(extra) is not None and not (extra == "block" and name_of("block") == "BasicBlockD"):
            raise MedclDataError(where, f"arch_kwargs.{extra}={kw[extra]!r}: medcl builds the default residual "
                                        "encoder (BasicBlockD, stem as wide as stage 0)")
    if kw.get("nonlin_first"):
        raise MedclDataError(where, "arch_kwargs.nonlin_first=true: medcl builds conv -> norm -> nonlin (the default)")
    feats = kw.get("features_per_stage")
    n = int(kw.get("n_stages") or (len(feats) if isinstance(feats, list | tuple) else 0))
    if n < 2:
        raise MedclDataError(where, f"arch_kwargs.n_stages must be >= 2, got {kw.get('n_stages')!r}")
    block_key = "n_conv_per_stage" if kind == "plainconv" else "n_blocks_per_stage"
    if block_key not in kw:  # nnssl's serialised kwargs name both counts n_blocks_per_stage
        block_key = "n_blocks_per_stage" if "n_blocks_per_stage" in kw else "n_conv_per_stage"
    return {
        "name": kind,
        "filters": _per_stage(feats, n, "features_per_stage", where),
        "strides": _triples(kw.get("strides"), n, "strides", where),
        "kernel_sizes": _triples(kw.get("kernel_sizes"), n, "kernel_sizes", where),
        "blocks": _per_stage(kw.get(block_key), n, block_key, where),
        "decoder_blocks": _per_stage(kw.get("n_conv_per_stage_decoder"), n - 1, "n_conv_per_stage_decoder", where),
        "conv_bias": bool(kw.get("conv_bias", False)),
        "norm": norm,
        "dropout": dropout,
    }


def _fields_from_plans_file(ref: str) -> dict[str, Any]:
    path, conf = parse_plans_ref(ref)
    where = f"{path}:{conf}"
    configuration = resolve_configuration(read_plans(path), conf, where)
    arch = configuration.get("architecture")
    if not isinstance(arch, Mapping):
        raise MedclDataError(where, "no 'architecture' in this configuration: a plans file older than nnU-Net 2.4; "
                                    "plan it again with nnUNetv2_plan_experiment")
    return fields_from_architecture(str(arch.get("network_class_name")), arch.get("arch_kwargs") or {}, where)


def resolve_nnunet_config(cfg: BackboneConfig) -> BackboneConfig:
    """``cfg`` with its architecture spelt out: ``plans`` (read now) or ``preset`` replace the topology fields,
    nnU-Net's defaults fill ``kernel_sizes`` / ``blocks`` / ``decoder_blocks``; ``plans`` and ``preset`` are cleared,
    so the result rebuilds the same network without the plans file.

    Raises:
        MedclConfigError: inconsistent fields, or a plans file / preset of the other kind.
        MedclDataError: an unreadable plans file, or an architecture medcl does not build.
    """
    if cfg.plans is not None and cfg.preset is not None:
        raise MedclConfigError("preset", "give either backbone.plans or backbone.preset, not both")
    fields: dict[str, Any] = {}
    if cfg.plans is not None:
        fields, source = _fields_from_plans_file(cfg.plans), f"plans {cfg.plans}"
    elif cfg.preset is not None:
        fields, source = dict(PRESETS[cfg.preset]), f"preset {cfg.preset}"
    kind = fields.pop("name", cfg.name)
    if kind != cfg.name:
        raise MedclConfigError("name", f"{source} describes a {kind} network; set backbone.name={kind}")
    out = dataclasses.replace(cfg, plans=None, preset=None, **fields)
    n = len(out.filters)
    if n < 2:
        raise MedclConfigError("filters", f"an nnU-Net network needs at least 2 stages (encoder, bottleneck), got {n}")
    if any(f < 1 for f in out.filters):
        raise MedclConfigError("filters", f"channel counts must be positive, got {list(out.filters)}")
    if out.blocks is None:
        out.blocks = (2,) * n if kind == "plainconv" else _RESENC_BLOCKS[:n] + (6,) * max(0, n - len(_RESENC_BLOCKS))
    if out.decoder_blocks is None:
        out.decoder_blocks = (2 if kind == "plainconv" else 1,) * (n - 1)
    if out.kernel_sizes is None:
        out.kernel_sizes = (3,) * n
    for key, want in (("strides", n), ("kernel_sizes", n), ("blocks", n), ("decoder_blocks", n - 1)):
        values = getattr(out, key)
        if len(values) != want:
            raise MedclConfigError(key, f"needs {want} entries ({n} filters), got {len(values)}")
    from medcl.models.backbone import as_triple

    for key in ("strides", "kernel_sizes"):
        for i, v in enumerate(getattr(out, key)):
            if min(as_triple(v)) < 1:
                raise MedclConfigError(f"{key}[{i}]", f"must be >= 1, got {v}")
    for key in ("blocks", "decoder_blocks"):
        if min(getattr(out, key)) < 1:
            raise MedclConfigError(key, f"every stage needs at least one block, got {list(getattr(out, key))}")
    return out


def missing_networks_error(kind: str, cause: object = "not installed") -> MedclConfigError:
    """The one-line error for a ``kind`` backbone without ``dynamic_network_architectures`` (the ``nnunet`` extra)."""
    return MedclConfigError("backbone.name", f"{kind} is nnU-Net's network from dynamic_network_architectures, which "
                                             f"cannot be imported here ({cause}); pip install 'medcl[nnunet]'")


def validate_nnunet_config(cfg: BackboneConfig) -> None:
    """:meth:`BackboneConfig.validate` for ``plainconv`` / ``resenc``: the optional package is installed (checked
    without importing it, so that a config fails before any data is prepared), and ``plans`` is read to check it."""
    import importlib.util

    try:
        found = importlib.util.find_spec("dynamic_network_architectures") is not None
    except (ImportError, ValueError):  # a broken or blocked entry in sys.modules
        found = False
    if not found:
        raise missing_networks_error(cfg.name)
    if cfg.plans is not None:
        parse_plans_ref(cfg.plans)
    resolve_nnunet_config(cfg)


def nnunet_architecture(cfg: BackboneConfig) -> dict[str, Any]:
    """The ``architecture`` entry of an nnU-Net plans configuration for the resolved ``cfg`` (JSON types)."""
    from medcl.models.backbone import as_triple

    cfg = resolve_nnunet_config(cfg)
    n = len(cfg.filters)
    kw: dict[str, Any] = {
        "n_stages": n,
        "features_per_stage": [int(f) for f in cfg.filters],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(as_triple(k)) for k in cfg.kernel_sizes or ()],
        "strides": [list(as_triple(s)) for s in cfg.strides],
        ("n_conv_per_stage" if cfg.name == "plainconv" else "n_blocks_per_stage"): [int(b) for b in cfg.blocks or ()],
        "n_conv_per_stage_decoder": [int(b) for b in cfg.decoder_blocks or ()],
        "conv_bias": bool(cfg.conv_bias),
        "norm_op": _NORM_NAMES[cfg.norm],
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": "torch.nn.modules.dropout.Dropout3d" if cfg.dropout else None,
        "dropout_op_kwargs": {"p": float(cfg.dropout)} if cfg.dropout else None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return {"network_class_name": CLASS_NAMES[cfg.name], "arch_kwargs": kw,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def architecture_of_checkpoint(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """BackboneConfig fields of the network an nnU-Net v2 or nnssl checkpoint holds, or ``None`` for other files.

    nnU-Net v2 (``nnUNetTrainer.save_checkpoint``): ``init_args.plans`` + ``init_args.configuration`` (+ the channels
    of ``init_args.dataset_json``). nnssl (``AbstractBaseTrainer.save_checkpoint``): ``nnssl_adaptation_plan``'s
    ``architecture_plans`` (``arch_class_name`` ``ResEncL`` = preset ``resenc_l``, or a class with ``arch_kwargs``)
    and ``pretrain_num_input_channels``.
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("network_weights"), Mapping):
        return None
    init = obj.get("init_args")
    if isinstance(init, Mapping) and isinstance(init.get("plans"), Mapping) and init.get("configuration"):
        where = f"nnU-Net checkpoint (configuration {init['configuration']})"
        conf = resolve_configuration(init["plans"], str(init["configuration"]), where)
        arch = conf.get("architecture")
        if not isinstance(arch, Mapping):
            raise MedclDataError(where, "its plans have no 'architecture' (nnU-Net < 2.4)")
        fields = fields_from_architecture(str(arch.get("network_class_name")), arch.get("arch_kwargs") or {}, where)
        ds = init.get("dataset_json") if isinstance(init.get("dataset_json"), Mapping) else {}
        channels = ds.get("channel_names") or ds.get("modality")
        if isinstance(channels, Mapping) and channels:
            fields["in_channels"] = len(channels)
        return fields
    plan = obj.get("nnssl_adaptation_plan")
    if isinstance(plan, Mapping) and isinstance(plan.get("architecture_plans"), Mapping):
        ap = plan["architecture_plans"]
        name = str(ap.get("arch_class_name"))
        if name == "ResEncL":
            fields = dict(PRESETS["resenc_l"])
        elif isinstance(ap.get("arch_kwargs"), Mapping):
            fields = fields_from_architecture(name, ap["arch_kwargs"], "nnssl checkpoint")
        else:
            raise MedclDataError("nnssl checkpoint", f"architecture {name!r}: medcl reads ResEncL, PlainConvUNet and "
                                                     "ResidualEncoderUNet (with arch_kwargs) from nnssl")
        if plan.get("pretrain_num_input_channels"):
            fields["in_channels"] = int(plan["pretrain_num_input_channels"])
        return fields
    return None
