"""Tissue detection on slide thumbnails and the per-tile tissue fraction (used by :mod:`medcl.wsi.tiling`).

The mask follows the usual recipe of whole-slide pipelines (CLAM, Lu et al. 2021, thresholds saturation
with Otsu on a downsampled slide): stained tissue is coloured while glass, background and most dust are
grey or white. Morphology sizes are given in microns so one setting works at any thumbnail resolution.
"""

from __future__ import annotations

import inspect

import numpy as np


def _morph_kw(fn, size: int) -> dict:
    """scikit-image >= 0.26 renamed the size argument of remove_small_objects / holes to ``max_size``."""
    params = inspect.signature(fn).parameters
    if "max_size" in params:
        return {"max_size": int(size)}
    return {"min_size" if "min_size" in params else "area_threshold": int(size) + 1}


def tissue_mask(
    thumb: np.ndarray,
    thumb_mpp: float,
    min_saturation: float = 0.05,
    closing_um: float = 16.0,
    min_tissue_um2: float = 10_000.0,
    max_hole_um2: float = 10_000.0,
) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB thumbnail ``[h, w, 3]`` uint8 whose pixels are ``thumb_mpp`` microns.

    Otsu's threshold on the HSV saturation (stained tissue is coloured, glass and background are grey or
    white), floored at ``min_saturation``; then closing (disk of ``closing_um``), removal of components
    smaller than ``min_tissue_um2`` and filling of holes smaller than ``max_hole_um2``.

    Returns:
        ``(mask [h, w] bool, threshold)``.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import isotropic_closing, remove_small_holes, remove_small_objects

    rgb = thumb.astype(np.float32)
    vmax, vmin = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1e-6), 0.0)  # HSV saturation
    sat = ndimage.gaussian_filter(sat, sigma=float(np.clip(2.0 / thumb_mpp, 0.5, 4.0)))  # ~2 um: stain grain
    thr = float(threshold_otsu(sat)) if float(sat.max() - sat.min()) > 1e-6 else 1.0
    thr = max(thr, min_saturation)
    mask = sat > thr
    px_area = thumb_mpp * thumb_mpp
    mask = isotropic_closing(mask, radius=float(np.clip(closing_um / thumb_mpp, 1.0, 32.0)))
    mask = remove_small_objects(mask, **_morph_kw(remove_small_objects, max(1, min_tissue_um2 / px_area)))
    mask = remove_small_holes(mask, **_morph_kw(remove_small_holes, max(1, max_hole_um2 / px_area)))
    return mask, thr


def tile_tissue_fraction(mask: np.ndarray, coords: np.ndarray, tile0: float, scale: tuple[float, float]) -> np.ndarray:
    """Fraction of each tile's footprint covered by ``mask`` ``[h, w]``; ``scale`` = thumbnail pixels per
    level-0 pixel ``(sx, sy)``. Vectorised with a summed-area table."""
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0 = np.clip(np.round(coords[:, 0] * scale[0]).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.round(coords[:, 1] * scale[1]).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.maximum(np.round((coords[:, 0] + tile0) * scale[0]).astype(np.int64), x0 + 1), 1, w)
    y1 = np.clip(np.maximum(np.round((coords[:, 1] + tile0) * scale[1]).astype(np.int64), y0 + 1), 1, h)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (inside / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def draw_tiles(thumb: np.ndarray, mask: np.ndarray, coords: np.ndarray, tile0: float, scale: tuple[float, float]) -> np.ndarray:
    """The thumbnail with the mask tinted green (and its outline) and each tile outlined in blue."""
    from scipy import ndimage

    img = thumb.astype(np.float32)
    green = np.array([40, 200, 60], np.float32)
    img[mask] = 0.7 * img[mask] + 0.3 * green
    edge = mask & ~ndimage.binary_erosion(mask)
    img[edge] = green
    img = img.astype(np.uint8)
    h, w = mask.shape
    blue = np.array([30, 60, 230], np.uint8)
    for x, y in coords:
        c0, r0 = int(round(x * scale[0])), int(round(y * scale[1]))
        c1 = min(w - 1, max(c0 + 1, int(round((x + tile0) * scale[0])) - 1))
        r1 = min(h - 1, max(r0 + 1, int(round((y + tile0) * scale[1])) - 1))
        img[r0, c0 : c1 + 1] = blue
        img[r1, c0 : c1 + 1] = blue
        img[r0 : r1 + 1, c0] = blue
        img[r0 : r1 + 1, c1] = blue
    return img
