"""Small slides for the whole-slide tests: regions cut from the real SVS, and synthetic H&E made from known stains.

Slides are single-level tiled TIFFs (uncompressed: pixels read back exactly) with their mpp in the resolution tags,
so ``medcl mil tile`` and both slide backends read them like any slide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

CMU = "wsi/CMU-1-Small-Region.svs"
# level-0 (x, y) corners of 600 x 600 tissue regions of CMU-1-Small-Region (2220 x 2967 at 0.499 um/px)
CMU_REGIONS = ((690, 440), (940, 1430), (590, 2070), (1180, 1920), (840, 940))
# Ruifrok & Johnston's H and E optical-density vectors (scikit-image's rgb_from_hed rows), normalised
H_OD = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E_OD = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])


def write_slide(path: Path, rgb: np.ndarray, mpp: float) -> Path:
    """``rgb`` ``[H, W, 3]`` uint8 as a tiled, uncompressed TIFF at ``mpp`` microns per pixel."""
    tifffile.imwrite(path, rgb, tile=(128, 128), photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp),
                     resolutionunit="CENTIMETER")
    return path


def cut_cmu_regions(svs: Path, out: Path, size: int = 600, regions=CMU_REGIONS) -> list[Path]:
    """Each region of the real slide written as its own slide (``cmu_{i}.tif``, same mpp)."""
    from medcl.io.slide import open_slide

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with open_slide(svs) as s:
        mpp = float(s.mpp[0])
        for i, (x, y) in enumerate(regions):
            paths.append(write_slide(out / f"cmu_{i}.tif", s.read_region((x, y), 0, (size, size)), mpp))
    return paths


def stained_image(h: int, w: int, seed: int, stains: np.ndarray | None = None, io: float = 240.0,
                  glass: float = 0.25, c_max: tuple[float, float] = (1.2, 0.9)) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic H&E: smooth random H and E concentrations in ``[0.15, 0.15 + c_max]`` (about a quarter of the
    pixels pure H or pure E, a ``glass`` fraction unstained), mixed with ``stains`` (``[3, 2]`` OD columns,
    default Ruifrok's H and E)
    through Beer-Lambert: ``I = io * exp(-OD) - 1``.

    Returns:
        ``(rgb [h, w, 3] float64 in [0, 255], concentrations [2, h, w])``.
    """
    from scipy import ndimage

    stains = np.stack([H_OD, E_OD], axis=1) if stains is None else np.asarray(stains, float)
    rng = np.random.default_rng(seed)
    c = np.stack([ndimage.gaussian_filter(rng.random((h, w)), 3) for _ in range(2)])
    c = (c - c.min(axis=(1, 2), keepdims=True)) / np.ptp(c, axis=(1, 2), keepdims=True)
    c = c * np.array(c_max)[:, None, None] + 0.15
    u = rng.random((h, w))
    c[1][u < 0.12] = 0.0  # pure hematoxylin
    c[0][(u >= 0.12) & (u < 0.24)] = 0.0  # pure eosin
    c[:, u >= 1.0 - glass] = 0.0  # glass
    od = np.einsum("ck,khw->hwc", stains, c)
    return np.clip(io * np.exp(-od) - 1.0, 0.0, 255.0), c


def synthetic_slides(out: Path, n: int, size: int = 512, mpp: float = 0.5) -> list[Path]:
    """``n`` synthetic H&E slides (``syn_{i}.tif``): a stained block on glass, different content per slide."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = np.full((size, size, 3), 242, np.uint8)
        m = size // 8
        block, _ = stained_image(size - 2 * m, size - 2 * m - 16 * i, seed=i, glass=0.0)
        img[m : size - m, m : size - m - 16 * i] = block.round().astype(np.uint8)
        paths.append(write_slide(out / f"syn_{i}.tif", img, mpp))
    return paths
