"""Prediction in the input's own geometry: what ``medcl predict`` and the test evaluation run.

For each input volume: the checkpoint's preprocessing plan (from its run record) prepares it exactly as in
training; sliding-window inference gives class probabilities on the preprocessed grid; MONAI's inverse of
the plan (:func:`medcl.data.invert_to_original`) resamples the *probabilities* back onto the original
voxel grid (linear; the foreground crop undone, outside it background), and only then the argmax is taken.
The written label map has the input's shape and affine (for a DICOM series: the series' own grid in RAS); with
``fmt="dicom-seg"`` a DICOM series' labels are written as a DICOM Segmentation of it instead
(:mod:`medcl.io.dicom_seg`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcl.config import from_dict
from medcl.core.errors import MedclDataError
from medcl.core.geometry import Volume
from medcl.core.record import RunRecord
from medcl.data import PreprocessingPlan, invert_to_original
from medcl.data.transforms import volume_to_metatensor
from medcl.models import Backbone, BackboneConfig, build_backbone, load_backbone
from medcl.segment.config import InferenceConfig
from medcl.segment.inference import LogitsFn, logits_fn, predict_probabilities
from medcl.segment.init import accept_checkpoint, read_checkpoint

log = logging.getLogger(__name__)

__all__ = ["SegmentationModel", "load_model", "predict_item", "predict_volume", "predict_to_folder", "label_dtype",
           "OUTPUT_FORMATS"]

# --format -> the label file's suffix
OUTPUT_FORMATS = {"nifti": ".nii.gz", "dicom-seg": ".dcm"}


@dataclass
class SegmentationModel:
    """A fine-tuned network with everything prediction needs.

    Attributes:
        backbone: the network (eval mode), head of ``num_classes``.
        plan: the preprocessing plan it was trained with.
        inference: sliding-window settings of the run.
        roi_size: the window (the training patch unless ``inference.roi_size``).
        num_classes, class_names: the classes.
        record: the run record (plain dict).
        path: the checkpoint read.
    """

    backbone: Backbone
    plan: PreprocessingPlan
    inference: InferenceConfig
    roi_size: tuple[int, int, int]
    num_classes: int
    class_names: dict[int, str]
    record: dict[str, Any]
    path: Path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", allow_incomplete: bool = False
               ) -> SegmentationModel:
    """Read a fine-tuning checkpoint (``model.pt``, a Lightning ``.ckpt`` of ``medcl finetune``, or its run folder).

    Raises:
        MedclDataError: not a fine-tuned segmentation model (e.g. a pretraining checkpoint), no run record,
            or weights that do not fill the network.
    """
    ckpt = read_checkpoint(path)
    if ckpt.record is not None:
        accept_checkpoint(ckpt, allow_incomplete=allow_incomplete)  # a half-trained model is refused
    if ckpt.record is None:
        raise MedclDataError(ckpt.path, "no run record (medcl_record) in this checkpoint: prediction needs the "
                                        "preprocessing plan it stores")
    record = RunRecord.from_dict(ckpt.record, str(ckpt.path)).to_dict()
    if record["kind"] != "finetune":
        raise MedclDataError(ckpt.path, f"this is a '{record['kind']}' checkpoint, not a fine-tuned segmentation "
                                        "model; fine-tune it first (medcl finetune --init ...)")
    if ckpt.backbone is None or not ckpt.backbone.get("out_channels"):
        raise MedclDataError(ckpt.path, "the checkpoint's backbone has no segmentation head")
    cfg = from_dict(BackboneConfig, dict(ckpt.backbone), prefix="backbone")
    net = build_backbone(cfg)
    report = load_backbone(net, ckpt.contents, adapt=None)
    if report.missing or report.mismatched:
        raise MedclDataError(ckpt.path, f"the weights do not fill the network:\n{report}")
    conf = record.get("config") or {}
    inf = from_dict(InferenceConfig, dict(conf.get("inference") or {}), prefix="inference")
    patch = tuple(int(v) for v in ((conf.get("sampling") or {}).get("patch_size") or (32, 32, 32)))
    roi = tuple(int(v) for v in (inf.roi_size or patch))
    plan = PreprocessingPlan.from_dict(record["plan"])
    k = int(cfg.out_channels or 0)
    names = {i: (plan.labels or {}).get(i, str(i)) for i in range(k)}
    net.eval().to(device)
    return SegmentationModel(net, plan, inf, roi, k, names, record, ckpt.path)  # type: ignore[arg-type]


def predict_item(fn: LogitsFn, item: Mapping[str, Any], plan: PreprocessingPlan, inference: InferenceConfig,
                 roi_size: tuple[int, int, int], device: str | torch.device = "cpu") -> torch.Tensor:
    """Probabilities ``[K, X, Y, Z]`` on the *original* grid of a preprocessed item (``CaseDataset`` item or
    :func:`predict_volume`'s), float32 on the CPU; outside the crop all classes are 0 (argmax: background)."""
    probs = predict_probabilities(fn, item["image"], inference, roi_size, device)
    back = invert_to_original(probs, item, plan)
    out = back.as_tensor() if hasattr(back, "as_tensor") else back
    shape = tuple(int(s) for s in item["image"].meta["spatial_shape"])
    if tuple(out.shape[1:]) != shape:
        raise MedclDataError(item["image"].meta.get("filename_or_obj"),
                             f"inverted prediction has shape {tuple(out.shape[1:])}, the input {shape}")
    return out.float()


def predict_volume(fn: LogitsFn, image: Volume, plan: PreprocessingPlan, inference: InferenceConfig,
                   roi_size: tuple[int, int, int], device: str | torch.device = "cpu") -> torch.Tensor:
    """Probabilities ``[K, X, Y, Z]`` on ``image``'s own grid (see :func:`predict_item`)."""
    item = plan.transforms(("image",), load=False)({"image": volume_to_metatensor(image)})
    return predict_item(fn, item, plan, inference, roi_size, device)


def label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int16)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and (os.path.samefile(a, b) or a.resolve() == b.resolve())
    except OSError:
        return False


def _check_outputs(manifest: Any, source: Path, out_dir: Path, targets: list[Path]) -> None:
    """Refuse when an output would replace an input: ``out_dir`` is the input (or the input file's place), or any
    target resolves (links followed) to an input file or lies inside an input DICOM folder."""
    inputs = [Path(f) for c in manifest.cases for f in [*c.images, *([c.label] if c.label else [])]]
    if out_dir.exists() and (_same_file(out_dir, source) or (source.is_dir() and _same_file(out_dir, source))):
        raise MedclDataError(out_dir, f"the output folder is the input {source}: the segmentations could replace the "
                                      "images; choose another --output")
    for t in targets:
        for src in inputs:
            if _same_file(t, src) or (t.resolve() == src.resolve()):
                raise MedclDataError(t, f"would overwrite the input {src}; choose another --output")
            if src.is_dir() and t.resolve().is_relative_to(src.resolve()):
                raise MedclDataError(t, f"would be written inside the input DICOM folder {src}; choose another --output")


def predict_to_folder(
    model: SegmentationModel,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    tta: bool | None = None,
    probabilities: bool = False,
    device: str | torch.device = "cpu",
    keep_going: bool = False,
    fmt: str = "nifti",
) -> list[Path]:
    """Predict every volume of ``source`` (a file, a folder of volumes, a DICOM series folder or a dataset)
    into ``output/{case_id}.nii.gz`` (and ``{case_id}_probabilities.nii.gz``, ``[X, Y, Z, K]`` float32, when
    ``probabilities``). Returns the label files written.

    Outputs never replace inputs: an ``output`` that is the input folder, or a target that resolves to an input file
    (symlinks followed), is refused before anything is written. A volume that fails stops the run with an error that
    names it and the volumes not processed; ``keep_going`` predicts the others and raises at the end with a summary of
    the failures. Every file is written atomically.

    ``fmt="dicom-seg"`` writes ``output/{case_id}.dcm``, a DICOM Segmentation referencing the source series (one
    segment per class, named after it); every input must then be a DICOM series, which is checked first.
    """
    import dataclasses

    from medcl.data import load_case, load_manifest
    from medcl.io import write_nifti

    if fmt not in OUTPUT_FORMATS:
        raise MedclDataError(None, f"unknown output format {fmt!r}; choose one of {sorted(OUTPUT_FORMATS)}")
    manifest = load_manifest(source)
    if fmt == "dicom-seg":
        _check_dicom_inputs(manifest)
    # the input's channels must match the model's; declared labels of a dataset are irrelevant here
    manifest = dataclasses.replace(manifest, labels=None)
    inference = model.inference if tta is None else dataclasses.replace(model.inference, tta=bool(tta))
    fn = logits_fn(model.backbone)
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise MedclDataError(out_dir, "--output is a file; it must be a folder")
    targets = [out_dir / f"{c.id}{OUTPUT_FORMATS[fmt]}" for c in manifest.cases]
    targets += [out_dir / f"{c.id}_probabilities.nii.gz" for c in manifest.cases] if probabilities else []
    _check_outputs(manifest, Path(source), out_dir, targets)
    written: list[Path] = []
    failed: list[tuple[str, str]] = []
    for i, case in enumerate(manifest.cases):
        try:
            path = _predict_case(model, manifest, case, fn, inference, out_dir, probabilities, device, load_case,
                                 write_nifti, fmt)
        except MedclDataError as exc:
            if not keep_going:
                rest = [c.id for c in manifest.cases[i + 1:]]
                raise MedclDataError(exc.path, f"{exc.problem}; stopped: {len(rest)} volume(s) not processed"
                                     + (f" ({', '.join(rest[:10])}{' ...' if len(rest) > 10 else ''})" if rest else "")
                                     + "; --keep-going predicts the others") from exc
            failed.append((case.id, str(exc)))
            log.warning("[%d/%d] %s: failed: %s", i + 1, len(manifest.cases), case.id, exc)
            continue
        written.append(path)
        log.info("[%d/%d] %s -> %s", i + 1, len(manifest.cases), case.id, path)
    if failed:
        raise MedclDataError(out_dir, f"{len(failed)} of {len(manifest.cases)} volume(s) failed "
                                      f"({'; '.join(f'{c}: {m}' for c, m in failed[:5])}); {len(written)} written")
    return written


def _check_dicom_inputs(manifest: Any) -> None:
    """Every case must be one DICOM series (a folder, or a file of it) for ``--format dicom-seg``."""
    from medcl.io import detect_format

    for case in manifest.cases:
        kinds = [detect_format(p) for p in case.images]
        if kinds != ["dicom"]:
            raise MedclDataError(case.images[0], f"--format dicom-seg needs a DICOM series as input, this case is "
                                                 f"{' + '.join(kinds)}; use --format nifti")


def _predict_case(model: SegmentationModel, manifest: Any, case: Any, fn: Any, inference: Any, out_dir: Path,
                  probabilities: bool, device: str | torch.device, load_case: Any, write_nifti: Any,
                  fmt: str = "nifti") -> Path:
    image, _ = load_case(case, manifest, with_label=False)
    if image.channels != model.backbone.in_channels:
        raise MedclDataError(image.path, f"has {image.channels} channel(s), the model expects "
                                         f"{model.backbone.in_channels}")
    probs = predict_volume(fn, image, model.plan, inference, model.roi_size, device)
    labels = probs.argmax(dim=0).numpy().astype(label_dtype(model.num_classes))
    path = out_dir / f"{case.id}{OUTPUT_FORMATS[fmt]}"
    if fmt == "dicom-seg":
        from medcl.io.dicom_seg import write_dicom_seg

        series = Path(case.images[0])
        write_dicom_seg(Volume(labels[None], image.affine, str(path), {}), series if series.is_dir() else series.parent,
                        path, model.class_names, series_uid=image.meta.get("series_uid"),
                        algorithm=f"medcl {model.path.parent.name}/{model.path.name}")
    else:
        write_nifti(Volume(labels[None], image.affine, str(path), {}), path)
    if probabilities:
        write_nifti(Volume(probs.numpy().astype(np.float32), image.affine, "", {}),
                    out_dir / f"{case.id}_probabilities.nii.gz")
    return path
