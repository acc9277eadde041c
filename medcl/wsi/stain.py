"""Macenko stain normalisation of H&E tiles (``--stain macenko`` of ``mil extract``, ``stain: macenko`` of
``mil pretrain-encoder``).

Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009, with the
constants of Mitko Veta's reference MATLAB implementation (``normalizeStaining.m``, github.com/mitkovetta/
staining-normalization, 2013), which MONAI's ``ExtractHEStains`` / ``NormalizeHEStains`` and most Python ports
also use:

1. optical density ``OD = -log((I + 1) / Io)`` per RGB channel, ``Io = 240`` (the transmitted light; brighter
   pixels are clipped to ``OD = 0``, as MONAI does);
2. pixels with every channel's ``OD > beta = 0.15`` are stained (the others are glass);
3. the plane of the two largest eigenvectors of the stained pixels' OD covariance; the angle of each pixel
   in that plane; the stain vectors are the directions at the ``alpha = 1`` and ``100 - alpha`` percentiles of
   the angle (robust extremes), as unit OD vectors;
4. hematoxylin is the vector with the larger red optical density (it absorbs red: nuclei look blue-purple;
   eosin absorbs green and looks pink), as in the MATLAB code. (MONAI >= 1.5's ``ExtractHEStains`` orders by
   the red/blue ratio with the lower ratio first, which on optical densities puts eosin first: compared with
   it up to the column order in the tests);
5. concentrations by least squares ``C = pinv(HE) OD``; their 99th percentiles ``maxC``;
6. normalisation: ``C * maxC_ref / maxC``, back to OD with the reference matrix, ``I = Io exp(-OD) - 1`` (the
   exact inverse of step 1; the MATLAB and MONAI code omit the ``- 1``, at most one grey level).

The reference stain matrix ``HE_REF`` (columns H, E) and maximum concentrations ``MAX_C_REF`` are the defaults of
that MATLAB code.

Fitting is **per slide**, from a deterministic sample of its tissue tiles (:func:`fit_tiles`): one matrix per
slide is faster than one per tile and stable on tiles with little hematoxylin or eosin, where a per-tile fit
swings. :func:`fit_macenko` also fits a single image (per-tile use). The fit runs in NumPy float64;
:func:`normalize_macenko` is batched torch on the tiles' device, with one matrix for the batch or one per tile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medcl.core.errors import MedclDataError

__all__ = ["IO", "BETA", "ALPHA", "HE_REF", "MAX_C_REF", "StainFit", "rgb_to_od", "fit_macenko", "fit_tiles",
           "normalize_macenko"]

IO = 240.0
BETA = 0.15
ALPHA = 1.0
HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MAX_C_REF = np.array([1.9705, 1.0308])
MIN_STAINED_PIXELS = 64


@dataclass
class StainFit:
    """One slide's (or image's) Macenko fit.

    Attributes:
        stain_matrix: ``[3, 2]`` unit OD vectors, columns hematoxylin then eosin, rows R, G, B.
        max_conc: ``[2]`` 99th-percentile concentrations of H and E.
        n_stained: pixels above the OD threshold the matrix was estimated from.
    """

    stain_matrix: np.ndarray
    max_conc: np.ndarray
    n_stained: int

    def attrs(self) -> dict:
        """The fit as feature-file attributes."""
        return {"stain": "macenko", "stain_matrix": self.stain_matrix, "stain_max_conc": self.max_conc,
                "stain_matrix_reference": HE_REF, "stain_max_conc_reference": MAX_C_REF, "stain_io": IO}


def rgb_to_od(rgb: np.ndarray, io: float = IO) -> np.ndarray:
    """RGB values in ``[0, 255]`` ``[..., 3]`` -> optical density ``[..., 3]`` (float64, >= 0)."""
    x = (np.asarray(rgb, dtype=np.float64) + 1.0) / io
    return -np.log(np.minimum(x, 1.0))


def _unit_positive(v: np.ndarray) -> np.ndarray:
    v = v if v.sum() >= 0 else -v
    return v / np.linalg.norm(v)


def fit_macenko(rgb: np.ndarray, alpha: float = ALPHA, beta: float = BETA, io: float = IO) -> StainFit:
    """Estimate the H&E stain matrix and maximum concentrations of the pixels ``rgb`` (``[..., 3]``, RGB in
    ``[0, 255]``, uint8 or float; every pixel counts for the concentrations, the stained ones for the matrix).

    Raises:
        MedclDataError: fewer than 64 stained pixels (glass, or an unstained image).
    """
    od = rgb_to_od(np.asarray(rgb).reshape(-1, 3), io)
    stained = od[(od > beta).all(axis=1)]
    if len(stained) < MIN_STAINED_PIXELS:
        raise MedclDataError(None, f"only {len(stained)} stained pixels (optical density > {beta} in every "
                                   "channel): cannot estimate the stain matrix")
    _, vecs = np.linalg.eigh(np.cov(stained.T))
    # largest eigenvector first, both oriented into the positive octant: the OD points then project to angles in
    # (-pi/2, pi/2) and the percentiles never wrap around
    plane = np.stack([_unit_positive(vecs[:, 2]), _unit_positive(vecs[:, 1])], axis=1)  # [3, 2]
    t = stained @ plane
    phi = np.arctan2(t[:, 1], t[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v_lo = _unit_positive(plane @ np.array([np.cos(lo), np.sin(lo)]))
    v_hi = _unit_positive(plane @ np.array([np.cos(hi), np.sin(hi)]))
    he = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo], axis=1)
    conc = np.linalg.pinv(he) @ od.T  # [2, P]
    max_conc = np.percentile(conc, 99, axis=1)
    if not (max_conc > 0).all():
        raise MedclDataError(None, f"degenerate stain concentrations (99th percentiles {max_conc.tolist()})")
    return StainFit(he, max_conc, int(len(stained)))


def fit_tiles(read: Callable[[int], np.ndarray], n_tiles: int, k: int = 64, **kw) -> StainFit:
    """Per-slide fit from ``k`` tiles evenly spaced through the slide's ``n_tiles`` tissue tiles (deterministic).

    Args:
        read: tile index -> RGB uint8 ``[S, S, 3]`` (e.g. :meth:`medcl.wsi.extract.TileDataset.read`).
    """
    if n_tiles < 1:
        raise MedclDataError(None, "no tiles to estimate the stain matrix from")
    idx = np.unique(np.linspace(0, n_tiles - 1, min(k, n_tiles)).round().astype(int))
    return fit_macenko(np.concatenate([read(int(i)).reshape(-1, 3) for i in idx]), **kw)


def normalize_macenko(
    rgb: torch.Tensor,
    stain_matrix: torch.Tensor | np.ndarray | Sequence,
    max_conc: torch.Tensor | np.ndarray | Sequence,
    he_ref: np.ndarray = HE_REF,
    max_c_ref: np.ndarray = MAX_C_REF,
    io: float = IO,
) -> torch.Tensor:
    """Map tiles to the reference stain appearance.

    Args:
        rgb: ``[B, 3, H, W]`` uint8 (or float in ``[0, 255]``).
        stain_matrix: ``[3, 2]`` for the whole batch or ``[B, 3, 2]`` per tile (:attr:`StainFit.stain_matrix`).
        max_conc: ``[2]`` or ``[B, 2]``.

    Returns:
        ``[B, 3, H, W]`` float32 RGB in ``[0, 1]`` (what :class:`medcl.wsi.encoders.PatchEncoder` takes).
    """
    dev = rgb.device
    kw32 = dict(device=dev, dtype=torch.float32)
    he = torch.as_tensor(np.asarray(stain_matrix, dtype=np.float64) if not torch.is_tensor(stain_matrix)
                         else stain_matrix, **kw32)
    mc = torch.as_tensor(np.asarray(max_conc, dtype=np.float64) if not torch.is_tensor(max_conc) else max_conc, **kw32)
    x = rgb.to(torch.float32)
    od = -torch.log(((x + 1.0) / io).clamp(max=1.0))
    pinv = torch.linalg.pinv(he)  # [2, 3] or [B, 2, 3]
    conc = torch.einsum("...kc,bchw->bkhw", pinv, od) if pinv.dim() == 2 else torch.einsum("bkc,bchw->bkhw", pinv, od)
    scale = torch.as_tensor(max_c_ref, **kw32) / mc  # [2] or [B, 2]
    conc = conc * (scale.view(1, 2, 1, 1) if scale.dim() == 1 else scale.view(-1, 2, 1, 1))
    od_ref = torch.einsum("ck,bkhw->bchw", torch.as_tensor(he_ref, **kw32), conc)
    return ((io * torch.exp(-od_ref) - 1.0).clamp(0.0, 255.0) / 255.0).to(torch.float32)
