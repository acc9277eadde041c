"""Few-label segmentation: fine-tuning, sliding-window inference, metrics, prediction in the original
geometry, and the label-efficiency benchmark.

Public API::

    FinetuneConfig, load_finetune_config(path, overrides)         # configs/finetune/*.yaml
    run_finetune(cfg, data, out, *, selection=None, resume=False, allow_test_overlap=False, device="auto")
    load_model(ckpt) -> SegmentationModel; predict_volume(...); predict_to_folder(model, input, output)
    case_metrics(pred, ref, num_classes, spacing, nsd_tolerance_mm)   # Dice, HD95 (mm), NSD per class
    MaskedDiceCELoss, mixup                                        # Dice + CE with an ignore mask
    run_label_efficiency(cfg, finetune_base, data, out)            # `medcl benchmark label-efficiency`

Names are loaded lazily (PEP 562): ``import medcl.segment`` imports neither torch nor Lightning.
"""

from __future__ import annotations

from medcl.core.lazy import lazy_exports

_LAZY = {
    "FinetuneConfig": "medcl.segment.config",
    "InferenceConfig": "medcl.segment.config",
    "load_finetune_config": "medcl.segment.prepare",
    "CaseSelection": "medcl.segment.prepare",
    "run_finetune": "medcl.segment.finetune",
    "FinetuneResult": "medcl.segment.finetune",
    "load_model": "medcl.segment.predict",
    "predict_volume": "medcl.segment.predict",
    "predict_to_folder": "medcl.segment.predict",
    "case_metrics": "medcl.segment.metrics",
    "MaskedDiceCELoss": "medcl.segment.loss",
    "mixup": "medcl.segment.loss",
    "predict_probabilities": "medcl.segment.inference",
    "LabelEfficiencyConfig": "medcl.segment.benchmark",
    "run_label_efficiency": "medcl.segment.benchmark",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
