"""The typed configs of the whole-slide commands (``medcl mil tile``, ``extract``, ``pretrain-encoder``).

Light on purpose (no torch): the CLI reads the defaults of its flags from here. Each command also takes
``--config FILE.yaml`` and ``key=value`` overrides like every other job; flags set the keys of the same name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from medcl.core.errors import MedclConfigError

__all__ = ["TilingParams", "ExtractParams", "PretrainParams", "STAIN_METHODS"]

STAIN_METHODS = ("none", "macenko")
"""Stain normalisations of ``mil extract`` and ``mil pretrain-encoder`` (:mod:`medcl.wsi.stain`)."""


def _check_stain(value: str) -> None:
    if value not in STAIN_METHODS:
        raise MedclConfigError("stain", f"must be one of {', '.join(STAIN_METHODS)}, got {value!r}")


@dataclass
class TilingParams:
    """What ``medcl mil tile`` is asked for.

    Attributes:
        mpp: target microns per pixel of the tiles (0.5 ~ 20x, 0.25 ~ 40x).
        size: tile side in pixels at the target mpp.
        overlap: overlap of neighbouring tiles in target pixels (``0 <= overlap < size``).
        tissue_threshold: minimum fraction of a tile covered by the tissue mask.
        assume_mpp: level-0 mpp for slides whose file records none (otherwise such slides fail).
        mpp_tolerance: relative tolerance under which a level's mpp counts as the target.
        thumbnail_size: longest side of the thumbnail the tissue mask is computed on.
        backend: ``auto``, ``openslide`` or ``tiffslide``.
        min_saturation: floor on the saturation threshold (an empty slide's Otsu threshold is noise).
        closing_um, min_tissue_um2, max_hole_um2: morphology in physical units (microns, square microns).
        preset: the encoder preset (:mod:`medcl.wsi.presets`) the tiles are meant for: tiling warns when ``mpp``
            differs from the preset's by more than 10% (the preset changes nothing else).
    """

    mpp: float = 0.5
    size: int = 256
    overlap: int = 0
    tissue_threshold: float = 0.25
    assume_mpp: float | None = None
    mpp_tolerance: float = 0.1
    thumbnail_size: int = 2048
    backend: str = "auto"
    min_saturation: float = 0.05
    closing_um: float = 16.0
    min_tissue_um2: float = 10_000.0
    max_hole_um2: float = 10_000.0
    preset: str | None = None

    def validate(self) -> None:
        if self.preset is not None:
            from medcl.wsi.presets import get_preset

            try:
                get_preset(self.preset)
            except MedclConfigError as exc:
                raise MedclConfigError("preset", exc.problem) from None
        if not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise MedclConfigError("mpp", f"must be a positive number, got {self.mpp}")
        if self.size < 8:
            raise MedclConfigError("size", f"must be at least 8 pixels, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise MedclConfigError("overlap", f"must be in [0, size={self.size}), got {self.overlap}")
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise MedclConfigError("tissue_threshold", f"must be in [0, 1], got {self.tissue_threshold}")
        if not 0.0 <= self.mpp_tolerance < 1.0:
            raise MedclConfigError("mpp_tolerance", f"must be in [0, 1), got {self.mpp_tolerance}")
        if self.thumbnail_size < 64:
            raise MedclConfigError("thumbnail_size", f"must be at least 64, got {self.thumbnail_size}")


@dataclass
class ExtractParams:
    """Settings of ``medcl mil extract``.

    Attributes:
        encoder: ``builtin-cnn``, a checkpoint of ``medcl mil pretrain-encoder``, ``torchvision:ARCH:WEIGHTS``,
            ``timm:ARCH:WEIGHTS`` or ``preset:NAME:WEIGHTS`` (a local weights file; presets in
            :mod:`medcl.wsi.presets`).
        batch_size: tiles per forward pass.
        workers: DataLoader worker processes reading tiles (0: read in the main process).
        input_size: resize tiles to this side before encoding (``None``: the encoder's own size).
        encoder_kwargs: extra torchvision / timm constructor arguments.
        stain: ``none`` or ``macenko`` (stain normalisation to a reference H&E appearance before encoding, one fit
            per slide: :mod:`medcl.wsi.stain`).
        stain_fit_tiles: tiles per slide (evenly spaced) the Macenko stain matrix is estimated from.
        device, threads: see every job. Under ``torchrun`` / ``srun`` each rank uses ``cuda:LOCAL_RANK``.
    """

    encoder: str = ""
    batch_size: int = 64
    workers: int = 2
    input_size: int | None = None
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    stain: str = "none"
    stain_fit_tiles: int = 64
    device: str = "auto"
    threads: int | None = None

    def validate(self) -> None:
        _check_stain(self.stain)
        if self.stain_fit_tiles < 1:
            raise MedclConfigError("stain_fit_tiles", f"must be >= 1, got {self.stain_fit_tiles}")
        if self.threads is not None and self.threads < 1:
            raise MedclConfigError("threads", f"must be >= 1 (or null), got {self.threads}")
        if not self.encoder:
            raise MedclConfigError("encoder", "no encoder given: pass --encoder (builtin-cnn, a checkpoint of 'medcl mil "
                                              "pretrain-encoder', torchvision:ARCH:WEIGHTS, timm:ARCH:WEIGHTS or "
                                              "preset:NAME:WEIGHTS)")
        if self.batch_size < 1 or self.workers < 0:
            raise MedclConfigError("batch_size", "batch_size must be >= 1 and workers >= 0")
        if self.input_size is not None and self.input_size < 8:
            raise MedclConfigError("input_size", f"must be at least 8 pixels, got {self.input_size}")


@dataclass
class PretrainParams:
    """Settings of ``medcl mil pretrain-encoder``: SimCLR on tiles with HED stain jitter (see the CLI help).

    ``stain: macenko`` normalises every tile to the reference H&E appearance (one Macenko fit per slide from
    ``stain_fit_tiles`` of its tiles, :mod:`medcl.wsi.stain`) before the views and the jitter; extract with the
    same ``--stain`` then.
    """

    steps: int = 200
    batch_size: int = 32
    crop: int = 96
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    width: int = 32
    proj_dim: int = 128
    stain_sigma: float = 0.1
    scale_min: float = 0.25
    lr_warmup_steps: int = 0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    workers: int = 2
    log_every: int = 10
    stain: str = "none"
    stain_fit_tiles: int = 64

    def validate(self) -> None:
        _check_stain(self.stain)
        if self.threads is not None and self.threads < 1:
            raise MedclConfigError("threads", f"must be >= 1 (or null), got {self.threads}")
        if self.lr_warmup_steps < 0 or self.workers < 0:
            raise MedclConfigError("lr_warmup_steps", "lr_warmup_steps and workers must be >= 0")
        for key in ("steps", "batch_size", "crop", "width", "proj_dim", "log_every", "stain_fit_tiles"):
            if int(getattr(self, key)) < 1:
                raise MedclConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.batch_size < 2:
            raise MedclConfigError("batch_size", "contrastive pretraining needs at least 2 tiles per step")
        if not 0 < self.scale_min <= 1:
            raise MedclConfigError("scale_min", f"must be in (0, 1], got {self.scale_min}")
        if self.temperature <= 0 or self.lr <= 0:
            raise MedclConfigError("temperature/lr", "must be positive")
