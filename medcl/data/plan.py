"""The preprocessing plan: a small, serialisable description of how volumes are prepared.

A :class:`PreprocessingPlan` is set from YAML (``configs/data/*.yaml``, through :func:`medcl.config.from_dict`),
stored as a plain dict in every run record (:meth:`PreprocessingPlan.to_dict`), and turned into the MONAI
dictionary pipeline with :meth:`PreprocessingPlan.transforms`. The pipeline is

1. read (``medcl.io.read_volume``) -> MetaTensors with the voxel -> RAS mm affine;
2. reorient to :attr:`orientation` (MONAI ``Orientationd``);
3. resample to :attr:`spacing` mm (MONAI ``Spacingd``; images linear, labels nearest), if set;
4. foreground mask of channel 0 (:attr:`foreground`);
5. intensity per channel (:class:`IntensitySpec`): CT -> clip to an HU window and scale to [0, 1];
   MRI -> clip to percentiles (of the non-zero voxels) and z-score with the mean and standard deviation
   of the foreground (the nnU-Net schemes, Isensee et al., 2021);
6. crop to the foreground box plus :attr:`crop_margin` voxels (MONAI ``CropForegroundd``), if
   :attr:`crop_foreground`;
7. ``fg_box``: the foreground box in preprocessed voxels.

Steps 2, 3 and 6 are recorded by MONAI, so :func:`medcl.data.transforms.invert_to_original` (MONAI
``Invertd``) maps a prediction back to the original grid, crop undone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from medcl.core.errors import MedclConfigError

if TYPE_CHECKING:
    from monai.transforms import Compose

    from medcl.data.manifest import Manifest

__all__ = ["IntensitySpec", "PreprocessingPlan", "PIPELINE_VERSION"]

# Bumped whenever the pipeline's output for a given plan changes (invalidates disk caches).
PIPELINE_VERSION = 1

_AXES = ({"L", "R"}, {"P", "A"}, {"I", "S"})


@dataclass
class IntensitySpec:
    """Intensity normalisation of one channel.

    Attributes:
        scheme: ``"ct"`` (HU window then scale to [0, 1]), ``"mri"`` (percentile clip then z-score
            inside the foreground) or ``"none"``.
        window: ``(low, high)`` Hounsfield units for ``"ct"`` (default: the abdominal soft-tissue window).
        percentiles: ``(low, high)`` clip percentiles for ``"mri"``.
    """

    scheme: Literal["ct", "mri", "none"] = "mri"
    window: tuple[float, float] = (-175.0, 250.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        # floats, so that equal plans serialise (and hash) identically whether built from ints or YAML
        self.window = tuple(float(v) for v in self.window)  # type: ignore[assignment]
        self.percentiles = tuple(float(v) for v in self.percentiles)  # type: ignore[assignment]

    def validate(self) -> None:
        if self.scheme not in ("ct", "mri", "none"):
            raise MedclConfigError("intensity.scheme", f"must be 'ct', 'mri' or 'none', got {self.scheme!r}")
        if len(self.window) != 2 or len(self.percentiles) != 2:
            raise MedclConfigError("intensity", "window and percentiles take two values (low, high)")
        lo, hi = self.window
        if not lo < hi:
            raise MedclConfigError("intensity.window", f"low must be below high, got {list(self.window)}")
        plo, phi = self.percentiles
        if not 0.0 <= plo < phi <= 100.0:
            raise MedclConfigError("intensity.percentiles", f"need 0 <= low < high <= 100, got {list(self.percentiles)}")


@dataclass
class PreprocessingPlan:
    """How volumes are prepared for a network; stored with every checkpoint.

    Attributes:
        orientation: target axis codes (``"RAS"``: array axes i, j, k point Right, Anterior, Superior).
        spacing: target voxel spacing in mm along i, j, k, or ``None`` to keep the source spacing.
        intensity: one :class:`IntensitySpec` per channel, or a single one applied to every channel.
        foreground: how the foreground mask (used for the MRI z-score, the crop and ``fg_box``) is
            found on channel 0: ``"otsu"`` (Otsu's threshold: body vs air), ``"nonzero"`` (any channel
            != 0), ``"threshold"`` (channel 0 > :attr:`foreground_threshold`, in source units, e.g. HU)
            or ``"all"``.
        foreground_threshold: the threshold for ``foreground="threshold"``.
        crop_foreground: crop every volume to its foreground box (plus :attr:`crop_margin` voxels);
            undone by the inverse.
        crop_margin: margin of the crop, in preprocessed voxels.
        channel_names: the channels the plan was made for (checked against the data when set).
        labels: label values -> names, e.g. ``{0: "background", 1: "liver"}``.
    """

    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    intensity: list[IntensitySpec] = field(default_factory=lambda: [IntensitySpec()])
    foreground: Literal["otsu", "nonzero", "threshold", "all"] = "otsu"
    foreground_threshold: float = 0.0
    crop_foreground: bool = False
    crop_margin: int = 2
    channel_names: list[str] = field(default_factory=list)
    labels: dict[int, str] | None = None

    def __post_init__(self) -> None:
        if self.labels is not None:  # JSON/YAML round trips may turn the integer keys into strings
            try:
                self.labels = {int(k): str(v) for k, v in self.labels.items()}
            except (TypeError, ValueError) as exc:
                raise MedclConfigError("labels", f"keys must be integer label values, got {list(self.labels)}") from exc
        self.intensity = [IntensitySpec(**s) if isinstance(s, dict) else s for s in self.intensity]
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.foreground_threshold = float(self.foreground_threshold)
        self.channel_names = [str(n) for n in self.channel_names]
        self.validate()

    def validate(self) -> None:
        """Raise :class:`MedclConfigError` naming the key for any invalid value."""
        o = self.orientation
        if not (isinstance(o, str) and len(o) == 3 and all(any(c in ax for c in o) for ax in _AXES)
                and all(c in set().union(*_AXES) for c in o)):
            raise MedclConfigError("orientation", f"must be three axis codes, one of L/R, P/A, I/S each (e.g. 'RAS'), got {o!r}")
        if self.spacing is not None:
            if len(self.spacing) != 3 or not all(s > 0 for s in self.spacing):
                raise MedclConfigError("spacing", f"must be three positive numbers (mm) or null, got {self.spacing}")
        if not self.intensity:
            raise MedclConfigError("intensity", "needs at least one entry (one per channel, or one for all)")
        for spec in self.intensity:
            spec.validate()
        if self.foreground not in ("otsu", "nonzero", "threshold", "all"):
            raise MedclConfigError("foreground", f"must be otsu, nonzero, threshold or all, got {self.foreground!r}")
        if self.crop_margin < 0:
            raise MedclConfigError("crop_margin", f"must be >= 0, got {self.crop_margin}")
        if self.channel_names and len(self.intensity) not in (1, len(self.channel_names)):
            raise MedclConfigError(
                "intensity",
                f"{len(self.intensity)} entries for {len(self.channel_names)} channels (give one, or one per channel)",
            )

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def for_manifest(cls, manifest: Manifest, **overrides: Any) -> PreprocessingPlan:
        """A plan for ``manifest``: its channel and label names, CT scheme for channels named CT, MRI else."""
        specs = [IntensitySpec(scheme="ct" if n.strip().upper() == "CT" else "mri") for n in manifest.channel_names]
        kw: dict[str, Any] = {
            "channel_names": list(manifest.channel_names),
            "labels": dict(manifest.labels) if manifest.labels is not None else None,
            "intensity": specs or [IntensitySpec()],
        }
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessingPlan:
        """Inverse of :meth:`to_dict` (and the YAML loader: unknown or ill-typed keys raise)."""
        from medcl.config import from_dict

        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, numbers, strings; label keys as ints) for run records and YAML."""
        from medcl.config import to_dict

        return to_dict(self)

    def cache_key(self) -> str:
        """Hex digest identifying what the pipeline computes (plan + pipeline version)."""
        d = self.to_dict()
        if d.get("labels") is not None:
            d["labels"] = {str(k): v for k, v in d["labels"].items()}
        blob = json.dumps({"plan": d, "pipeline": PIPELINE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def spec_for(self, channel: int) -> IntensitySpec:
        return self.intensity[0] if len(self.intensity) == 1 else self.intensity[channel]

    # -- pipeline ------------------------------------------------------------------------------------

    def transforms(self, keys: tuple[str, ...] | list[str] = ("image", "label"), *, load: bool = True) -> Compose:
        """The MONAI dictionary pipeline of this plan (see :func:`medcl.data.transforms.build_pipeline`).

        ``keys[0]`` is the image key, the others are label keys (nearest resampling, integer output).
        """
        from medcl.data.transforms import build_pipeline

        return build_pipeline(self, keys, load=load)
