"""Whole-slide images: one small wrapper over OpenSlide and TiffSlide.

:class:`Slide` exposes what tiling and feature extraction need and nothing more: the pyramid (levels,
dimensions, downsamples), the physical pixel size (microns per pixel, mpp, per level), region reads and
thumbnails, always as RGB ``uint8`` NumPy arrays ``[H, W, 3]`` (transparent pixels, e.g. outside the
scanned area of an MRXS slide, are composited onto white).

Backends:

- ``openslide`` (openslide-python + the openslide-bin wheel): SVS, NDPI, MRXS, SCN, VMS, BIF, DICOM-WSI and
  generic tiled TIFF (pyramid levels as top-level IFDs).
- ``tiffslide`` (pure Python, tifffile + zarr): SVS and TIFF, including OME-TIFF pyramids stored as
  SubIFDs, which OpenSlide reads as a single level.
- ``auto`` (default): TiffSlide first for ``.tif``/``.tiff`` (SubIFD pyramids), OpenSlide first for
  everything else; the other backend is tried when the first one cannot open the file.

Every failure to open or read a slide is raised as :class:`~medcl.core.errors.MedclDataError` naming the
file. Coordinates follow OpenSlide: ``(x, y)`` = (column, row), ``location`` in level-0 pixels, ``size``
in pixels of the level that is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medcl.core.errors import MedclDataError

# File endings a folder scan treats as slides (DICOM-WSI is a folder of .dcm files, handled separately).
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".ome.tif",
    ".ome.tiff",
)
BACKENDS = ("auto", "openslide", "tiffslide")

_TIFF_SUFFIXES = (".tif", ".tiff")


def slide_id_from_path(path: str | os.PathLike) -> str:
    """The slide id used for output names: the file name without its slide ending (``a.ome.tiff`` -> ``a``);
    for a DICOM-WSI file the name of its folder."""
    p = Path(path)
    name = p.name
    if name.lower().endswith(".dcm"):
        return p.parent.name
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return p.stem


def _open_openslide(path: Path):
    try:
        import openslide
    except ImportError as exc:  # openslide-python without the shared library raises OSError too
        raise ImportError(f"openslide is not installed ({exc}); pip install openslide-python openslide-bin") from exc
    except OSError as exc:
        raise ImportError(f"openslide cannot load its library ({exc}); pip install openslide-bin") from exc
    return openslide.OpenSlide(str(path))


def _open_tiffslide(path: Path):
    try:
        import tiffslide
    except ImportError as exc:
        raise ImportError(f"tiffslide is not installed ({exc}); pip install tiffslide") from exc
    return tiffslide.TiffSlide(str(path))


_OPENERS = {"openslide": _open_openslide, "tiffslide": _open_tiffslide}


class Slide:
    """An open whole-slide image.

    Args:
        path: the slide file (for DICOM-WSI, any ``.dcm`` file of the slide's folder).
        backend: ``"auto"``, ``"openslide"`` or ``"tiffslide"``.
        assume_mpp: level-0 microns per pixel to use when the file records none; ignored when it does.

    Raises:
        MedclDataError: the file is missing, not a slide format either backend reads, or corrupt.

    Attributes:
        path, slide_id, backend (the backend actually used), level_count, dimensions ``(width, height)`` of
        level 0, level_dimensions, level_downsamples, mpp (level-0 ``(mpp_x, mpp_y)`` or ``None``) and
        mpp_source (``"metadata"``, ``"assumed"`` or ``None``).
    """

    def __init__(self, path: str | os.PathLike, backend: str = "auto", assume_mpp: float | None = None) -> None:
        self.path = Path(path)
        if backend not in BACKENDS:
            raise MedclDataError(self.path, f"unknown slide backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if not self.path.exists():
            raise MedclDataError(self.path, "slide file does not exist")
        if self.path.is_dir():
            raise MedclDataError(self.path, "is a folder; pass a slide file (for DICOM-WSI, one .dcm file of it)")
        self.slide_id = slide_id_from_path(self.path)
        if backend == "auto":
            order = ["tiffslide", "openslide"] if self.path.suffix.lower() in _TIFF_SUFFIXES else ["openslide", "tiffslide"]
        else:
            order = [backend]
        problems: list[str] = []
        self._handle = None
        for name in order:
            try:
                handle = _OPENERS[name](self.path)
            except ImportError as exc:
                problems.append(f"{name}: {exc}")
                continue
            except Exception as exc:  # each backend has its own error types for unsupported / corrupt files
                problems.append(f"{name}: {type(exc).__name__}: {str(exc).strip() or 'cannot open'}")
                continue
            try:  # a damaged file may open and fail on its pyramid (tiffslide opens lazily)
                self.level_count = int(handle.level_count)
                self.dimensions = tuple(int(v) for v in handle.dimensions)
                self.level_dimensions = [tuple(int(v) for v in d) for d in handle.level_dimensions]
                self.level_downsamples = [float(d) for d in handle.level_downsamples]
                props = dict(handle.properties)
            except Exception as exc:
                problems.append(f"{name}: cannot read the pyramid ({type(exc).__name__}: {exc})")
                handle.close()
                continue
            self._handle = handle
            self.backend = name
            break
        if self._handle is None:
            raise MedclDataError(
                self.path, "cannot open slide (unsupported format, or a corrupt or truncated file): " + "; ".join(problems)
            )
        if self.level_count < 1 or min(self.dimensions) < 1:
            self.close()
            raise MedclDataError(self.path, f"slide has no image data (dimensions {self.dimensions})")
        self.properties = props
        self.mpp = _mpp_from_properties(props)
        self.mpp_source: str | None = "metadata" if self.mpp else None
        if self.mpp is None and assume_mpp is not None:
            if not (assume_mpp > 0 and math.isfinite(assume_mpp)):
                raise MedclDataError(self.path, f"--assume-mpp must be a positive number, got {assume_mpp}")
            self.mpp = (float(assume_mpp), float(assume_mpp))
            self.mpp_source = "assumed"

    # --- geometry -------------------------------------------------------------------------------------
    def level_mpp(self, level: int) -> tuple[float, float]:
        """``(mpp_x, mpp_y)`` of a level (level-0 mpp times the per-axis size ratio).

        Raises:
            MedclDataError: the slide has no mpp (neither in the file nor assumed).
        """
        if self.mpp is None:
            raise MedclDataError(
                self.path, "slide has no microns-per-pixel metadata; pass --assume-mpp to say what level 0 is"
            )
        w0, h0 = self.dimensions
        w, h = self.level_dimensions[level]
        return self.mpp[0] * w0 / w, self.mpp[1] * h0 / h

    # --- pixels ---------------------------------------------------------------------------------------
    def read_region(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        """Pixels of ``size = (w, h)`` at ``level`` whose top-left is ``location = (x, y)`` in level-0
        pixels, as RGB ``uint8`` ``[h, w, 3]``; areas outside the slide come back white."""
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        try:
            img = self._handle.read_region((x, y), int(level), (w, h))
        except Exception as exc:
            raise MedclDataError(
                self.path, f"cannot read region at {(x, y)} level {level} size {(w, h)}: {type(exc).__name__}: {exc}"
            ) from exc
        return _to_rgb(np.asarray(img))

    def thumbnail(self, max_size: int) -> np.ndarray:
        """The whole slide, longest side ``<= max_size`` (aspect kept), RGB ``uint8`` ``[h, w, 3]``.

        Read from the smallest level that is at least as large, in horizontal stripes that are box-averaged
        by an integer factor as they arrive (memory stays bounded on a single-level slide), then resized."""
        w0, h0 = self.dimensions
        scale = min(1.0, max_size / max(w0, h0))
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        level = 0
        for i, (lw, lh) in enumerate(self.level_dimensions):
            if lw >= tw and lh >= th:
                level = i
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        k = max(1, min(lw // tw, lh // th))  # integer box factor; the final resize does the rest
        rows_per_stripe = k * max(1, (1 << 24) // (lw * k))  # about 16 M pixels read at a time
        stripes = []
        for y in range(0, (lh // k) * k, rows_per_stripe):
            hh = min(rows_per_stripe, (lh // k) * k - y)
            stripe = self.read_region((0, round(y * ds)), level, (lw, hh))[:, : (lw // k) * k]
            if k > 1:
                stripe = stripe.reshape(hh // k, k, lw // k, k, 3).mean(axis=(1, 3)).round().astype(np.uint8)
            stripes.append(stripe)
        small = np.concatenate(stripes, axis=0)
        if small.shape[:2] == (th, tw):
            return small
        from PIL import Image

        return np.asarray(Image.fromarray(small).resize((tw, th), Image.Resampling.BOX))

    # --- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            finally:
                self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, backend={self.backend!r}, levels={self.level_count}, "
            f"dimensions={self.dimensions}, mpp={self.mpp})"
        )


def open_slide(path: str | os.PathLike, backend: str = "auto", assume_mpp: float | None = None) -> Slide:
    """Open a whole-slide image; see :class:`Slide`."""
    return Slide(path, backend=backend, assume_mpp=assume_mpp)


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """RGB(A) ``uint8`` -> RGB over white (OpenSlide returns un-premultiplied RGBA)."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        if alpha.min() < 1.0:
            rgb = arr[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
            return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        arr = arr[..., :3]
    return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)


def _positive_float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 and math.isfinite(v) else None


_UNIT_TO_UM = {"centimeter": 1e4, "cm": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


def _mpp_from_properties(props: dict) -> tuple[float, float] | None:
    """Level-0 ``(mpp_x, mpp_y)`` from backend properties, or ``None`` when the file records none.

    Order: the backend's normalised ``*.mpp-x/y``; Aperio ``aperio.MPP``; TIFF resolution tags with a
    physical unit (a unit of ``none``/``inch`` with the 72 dpi default of image editors is not a scan)."""
    for prefix in ("openslide", "tiffslide"):
        mx, my = _positive_float(props.get(f"{prefix}.mpp-x")), _positive_float(props.get(f"{prefix}.mpp-y"))
        if mx and my:
            return mx, my
        if mx or my:
            return (mx or my, mx or my)  # type: ignore[return-value]
    m = _positive_float(props.get("aperio.MPP"))
    if m:
        return m, m
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    xr, yr = _positive_float(props.get("tiff.XResolution")), _positive_float(props.get("tiff.YResolution"))
    if unit in _UNIT_TO_UM and xr and yr and not (unit == "inch" and xr <= 300):
        return _UNIT_TO_UM[unit] / xr, _UNIT_TO_UM[unit] / yr
    return None
