"""Datasets: manifests, the preprocessing plan and its MONAI pipeline, caching, synthetic phantoms.

Public API::

    Case, Manifest, load_manifest(path), load_case(case, manifest) -> (image Volume, label Volume | None)
    PreprocessingPlan, IntensitySpec            # plan.transforms(keys) -> MONAI Compose (invertible)
    invert_to_original(pred, item, plan)        # prediction -> original grid (MONAI Invertd)
    CaseDataset(manifest, plan, cases=None, with_label=True, cache="disk"|"ram"|"none", cache_dir=None)
    make_phantom(seed, shape, affine, modality), write_phantom_dataset(out, n, size, seed, modality)
    check_dataset(path), inspect_volume(path)   # what `medcl data check` / `medcl data info` print

Names are loaded lazily (PEP 562): ``import medcl.data`` imports neither MONAI nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medcl.core.lazy import lazy_exports

if TYPE_CHECKING:
    from medcl.data.cases import inspect_case, load_case
    from medcl.data.check import check_dataset, inspect_volume
    from medcl.data.dataset import CaseDataset
    from medcl.data.manifest import Case, Manifest, load_manifest
    from medcl.data.phantoms import PHANTOM_LABELS, default_affine, make_phantom, write_phantom_dataset
    from medcl.data.plan import IntensitySpec, PreprocessingPlan
    from medcl.data.transforms import LoadVolumed, invert_to_original

_LAZY = {
    "Case": "medcl.data.manifest",
    "Manifest": "medcl.data.manifest",
    "load_manifest": "medcl.data.manifest",
    "load_case": "medcl.data.cases",
    "inspect_case": "medcl.data.cases",
    "PreprocessingPlan": "medcl.data.plan",
    "IntensitySpec": "medcl.data.plan",
    "LoadVolumed": "medcl.data.transforms",
    "invert_to_original": "medcl.data.transforms",
    "CaseDataset": "medcl.data.dataset",
    "make_phantom": "medcl.data.phantoms",
    "write_phantom_dataset": "medcl.data.phantoms",
    "default_affine": "medcl.data.phantoms",
    "PHANTOM_LABELS": "medcl.data.phantoms",
    "check_dataset": "medcl.data.check",
    "inspect_volume": "medcl.data.check",
}

__all__ = [
    "PHANTOM_LABELS",
    "Case",
    "CaseDataset",
    "IntensitySpec",
    "LoadVolumed",
    "Manifest",
    "PreprocessingPlan",
    "check_dataset",
    "default_affine",
    "inspect_case",
    "inspect_volume",
    "invert_to_original",
    "load_case",
    "load_manifest",
    "make_phantom",
    "write_phantom_dataset",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
