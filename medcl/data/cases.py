"""Reading one case and validating it: every channel, the label, and their agreement.

:func:`inspect_case` collects *every* problem of a case (for ``medcl data check``); :func:`load_case`
raises on them (for training). Both read through :func:`medcl.io.read_volume`, looked up at call time.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np

import medcl.io as mio
from medcl.core.errors import MedclDataError
from medcl.core.geometry import Volume
from medcl.data.manifest import Case, Manifest, label_is_an_image

__all__ = ["AFFINE_TOL_MM", "inspect_case", "load_case", "read_channels"]

AFFINE_TOL_MM = 1e-3  # largest difference of two affines' entries (mm) that still counts as equal


def _channel_problems(vols: Sequence[Volume]) -> list[tuple[str, str]]:
    """Shape and affine disagreements between the channel volumes of one image."""
    ref = vols[0]
    problems = []
    for v in vols[1:]:
        if v.shape != ref.shape:
            problems.append((v.path, f"channel shape {v.shape} differs from {ref.shape} of {ref.path}"))
        elif (d := _affine_diff(v.affine, ref.affine)) > AFFINE_TOL_MM:
            problems.append((v.path, f"channel affine differs from that of {ref.path} by {d:.4g} mm"))
    return problems


def _stack(vols: Sequence[Volume]) -> Volume:
    ref = vols[0]
    array = ref.array if len(vols) == 1 else np.concatenate([v.array for v in vols], axis=0)
    return Volume(array, ref.affine, ref.path, dict(ref.meta))


def read_channels(paths: Sequence[str | PathLike], series_uid: str | None = None) -> Volume:
    """Read one image from one file per channel (or one multi-channel file): ``[C, X, Y, Z]`` float32.

    Raises:
        MedclDataError: a file's problem, or channel files whose shape or affine differ.
    """
    vols = [mio.read_volume(p, series_uid=series_uid, allow_multichannel=len(paths) == 1) for p in paths]
    problems = _channel_problems(vols)
    if problems:
        raise MedclDataError(*problems[0])
    return _stack(vols)


def _affine_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def inspect_case(
    case: Case, manifest: Manifest, *, with_label: bool = True, warnings: list[tuple[str, str]] | None = None
) -> tuple[Volume | None, Volume | None, list[tuple[str, str]]]:
    """Read a case and collect *every* problem instead of stopping at the first.

    Args:
        warnings: when given, ``(path, problem)`` pairs that do not stop training but that ``medcl data
            check`` reports are appended to it: a NIfTI whose sform and qform disagree (read with the sform;
            ITK-based tools may use the qform).

    Returns:
        ``(image, label, problems)``: ``image`` ``[C, X, Y, Z]`` float32 with all channels (``None`` when
        a channel could not be read), ``label`` ``[1, X, Y, Z]`` integer (``None`` when absent, unreadable,
        the image's own file, or not asked for), and ``(path, problem)`` pairs.
    """
    problems: list[tuple[str, str]] = []
    n_declared = len(manifest.channel_names)
    # one file may hold every channel (MSD 4D); its channel count is checked against the manifest below
    single = len(case.images) == 1
    vols: list[Volume] = []
    for p in case.images:
        try:
            vols.append(mio.read_volume(p, series_uid=case.series_uid, allow_multichannel=single))
        except MedclDataError as exc:
            problems.append((exc.path or p, exc.problem))
    image: Volume | None = None
    if vols and len(vols) == len(case.images):
        channel_problems = _channel_problems(vols)
        problems.extend(channel_problems)
        if not channel_problems:
            image = _stack(vols)
            if image.channels != n_declared and manifest.kind != "file":  # a lone file declares nothing
                names = manifest.channel_names
                named = "" if all(n.isdigit() for n in names) else f" ({', '.join(names)})"
                c = image.channels
                problems.append((case.images[0], f"has {c} channel{'s' * (c != 1)} but the dataset has "
                                                 f"{n_declared}{named}"))
    label: Volume | None = None
    twin = label_is_an_image(case) if with_label else None
    if twin is not None:
        problems.append((str(case.label), f"label is the same file as its image {twin}"))
    elif with_label and case.label is not None:
        try:
            label = mio.read_volume(case.label, is_label=True)
        except MedclDataError as exc:
            problems.append((exc.path or case.label, exc.problem))
        if label is not None and image is not None:
            if label.shape != image.shape:
                problems.append((case.label, f"label shape {label.shape} does not match image shape {image.shape}"))
            elif (d := _affine_diff(label.affine, image.affine)) > AFFINE_TOL_MM:
                problems.append((case.label, f"label affine differs from the image affine by {d:.4g} mm "
                                             f"(tolerance {AFFINE_TOL_MM} mm)"))
        if label is not None and manifest.labels is not None:
            values = np.unique(label.array)
            extra = sorted(int(v) for v in values if int(v) not in manifest.labels)
            if extra:
                problems.append((case.label, f"label values {extra} outside the declared set "
                                             f"{sorted(manifest.labels)}"))
    if warnings is not None:
        for v in [*vols, *([label] if label is not None else [])]:
            if v.meta.get("transform_warning"):
                warnings.append((v.path, str(v.meta["transform_warning"])))
    return image, label, problems


def load_case(case: Case, manifest: Manifest, *, with_label: bool = True) -> tuple[Volume, Volume | None]:
    """Read and validate one case through :func:`medcl.io.read_volume`.

    Checks: every channel file readable (3D, finite), all channel files of the case the same shape and
    affine, the channel count equal to ``manifest.channel_names``; the label (if any, and if
    ``with_label``) another file than the image, the same shape as the image, its affine equal to 1e-3 mm,
    its values within ``manifest.labels``. A NIfTI whose sform and qform disagree is read (with the sform)
    and not refused here; ``medcl data check`` reports it.

    Returns:
        ``(image, label)``: image ``[C, X, Y, Z]`` float32 with every channel, label ``[1, X, Y, Z]``
        integer or ``None``.

    Raises:
        MedclDataError: naming the first file with a problem; the message lists the others too.
    """
    image, label, problems = inspect_case(case, manifest, with_label=with_label)
    if problems:
        path, problem = problems[0]
        if len(problems) > 1:
            problem += "; also " + "; ".join(f"{p}: {q}" for p, q in problems[1:])
        raise MedclDataError(path, problem)
    assert image is not None
    return image, label
