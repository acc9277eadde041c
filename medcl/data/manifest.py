"""Manifests: which cases a dataset holds, their channel files and labels, from any common layout.

:func:`load_manifest` accepts

* an **MSD** ``dataset.json`` or its folder (``training: [{image, label}]``, ``modality`` ``{"0": "MRI"}``
  -- several modalities mean 4D images, one channel per modality -- ``labels`` ``{"0": "background"}``);
  nnU-Net v1 folders, whose ``training`` entries name ``CASE.nii.gz`` while the files are
  ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, are read too;
* an **nnU-Net v2** raw folder or its ``dataset.json`` (``channel_names``, ``labels``
  ``{"background": 0, ...}``, ``numTraining``, ``file_ending``; files ``imagesTr/CASE_0000{ending}`` one
  per channel and ``labelsTr/CASE{ending}``; or an explicit ``dataset`` mapping);
* a **CSV** with header ``image[,label][,split][,patient][,id]`` (paths relative to the CSV; several
  channel files of one case separated by ``;``);
* a **folder** of volumes (labels paired by file name from ``labels/`` or ``labelsTr/`` inside it or beside
  it; ``CASE_0000``/``CASE_0001`` files are the channels of one case), a **DICOM** series folder, or a
  folder of DICOM series folders (one case per series);
* a single volume file.

The two ``dataset.json`` schemas are told apart by their keys (``channel_names`` is nnU-Net v2;
``modality``/``training`` is MSD) and validated; every problem is a
:class:`~medcl.core.errors.MedclDataError` naming the file and the key. Files that cannot be cases
(an unsupported format in a folder, a channel file with a bad name) do not stop listing: they are
collected in :attr:`Manifest.problems` for ``medcl data check`` to report.

:func:`medcl.data.cases.load_case` reads one case through :func:`medcl.io.read_volume` and validates
it; the two ``dataset.json`` schemas live in :mod:`medcl.data.schemas`.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import medcl.io as mio
from medcl.core.errors import MedclDataError

__all__ = ["SPLITS", "Case", "Manifest", "load_manifest", "case_id_from_path", "label_is_an_image"]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Files a folder scan passes over silently: sidecars (raw data of .mhd/.nhdr), documentation, manifests.
_SIDECAR_SUFFIXES = (".raw", ".zraw", ".json", ".csv", ".md", ".txt", ".rst", ".yaml", ".yml", ".pdf")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
_LABEL_DIRS = ("labels", "labelsTr")
# The values of a CSV ``split`` column (compared case-insensitively, stored in lower case). Only "test" changes
# what medcl does (such cases are never trained on); anything else would silently count as "train".
SPLITS = ("train", "test")


@dataclass
class Case:
    """One case of a dataset.

    Attributes:
        id: unique case id (file stem without the channel suffix, or the CSV ``id`` column).
        images: one file (or DICOM folder) per channel, or one 4D file holding every channel.
        label: the label file, or ``None`` for an unlabelled case.
        split: ``"train"`` or ``"test"`` when the manifest says so (:data:`SPLITS`), else ``None``.
        patient: patient id (CSV), to keep a patient's cases in one split.
        series_uid: the DICOM series to read when a folder holds several.
    """

    id: str
    images: list[str]
    label: str | None = None
    split: str | None = None
    patient: str | None = None
    series_uid: str | None = None


@dataclass
class Manifest:
    """The cases of a dataset and what is declared about them.

    Attributes:
        cases: the cases, in a stable order.
        channel_names: one name per image channel (``["MRI"]``, ``["T2", "ADC"]``, ``["CT"]``;
            ``["0"]`` when the source does not name them).
        labels: declared label values -> names (``{0: "background", 1: ...}``), or ``None`` when the
            source declares none (no value check then).
        kind: ``"msd"``, ``"nnunet"``, ``"csv"``, ``"folder"``, ``"dicom"`` or ``"file"``.
        root: the folder paths are relative to.
        source: the file or folder the manifest was read from.
        problems: ``(path, problem)`` pairs found while listing (files skipped); they do not stop
            training but ``medcl data check`` reports them.
    """

    cases: list[Case]
    channel_names: list[str]
    labels: dict[int, str] | None
    kind: str
    root: str
    source: str = ""
    problems: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.cases]

    def case(self, case_id: str) -> Case:
        """The case with id ``case_id`` (``MedclDataError`` when absent)."""
        for c in self.cases:
            if c.id == case_id:
                return c
        raise MedclDataError(self.source or self.root, f"no case with id '{case_id}'")


# ----------------------------------------------------------------------------------------------- helpers


def _volume_suffix(name: str) -> str | None:
    low = name.lower()
    for s in VOLUME_SUFFIXES:
        if low.endswith(s):
            return s
    return None


def case_id_from_path(path: str | PathLike) -> str:
    """Case id of a path: the file name without its extension and ``_0000`` channel suffix."""
    p = Path(path)
    suffix = _volume_suffix(p.name)
    if suffix is None and re.fullmatch(r"\.[A-Za-z]{1,5}", p.suffix):
        suffix = p.suffix  # another file type (``.dcm``, ``.png``); a UID-like ``1.2.840`` keeps its dots
    stem = p.name[: -len(suffix)] if suffix else p.name
    m = _CHANNEL_RE.match(stem)
    return m.group("case") if m else stem


def _unique_ids(cases: list[Case], source: Path) -> None:
    seen: dict[str, int] = {}
    for c in cases:
        seen[c.id] = seen.get(c.id, 0) + 1
    dup = sorted(k for k, n in seen.items() if n > 1)
    if dup:
        raise MedclDataError(source, f"duplicate case ids: {', '.join(dup[:10])}")


def _resolve(root: Path, rel: str) -> str:
    p = Path(rel)
    return str(p if p.is_absolute() else (root / p))


def _same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` are one file (same real path, or the same inode: a hard link)."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:  # one does not exist (reported when the case is read)
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def label_is_an_image(case: Case) -> str | None:
    """The image path of ``case`` that is the very file of its label (``None`` when none is)."""
    if case.label is None:
        return None
    return next((p for p in case.images if _same_file(case.label, p)), None)


def _check_labels_are_not_images(manifest: Manifest) -> None:
    for c in manifest.cases:
        if (twin := label_is_an_image(c)) is not None:
            raise MedclDataError(manifest.source or manifest.root,
                                 f"case '{c.id}': label {c.label} is the same file as its image {twin}")


def _is_dicom_file(path: Path) -> bool:
    try:
        return mio.detect_format(path) == "dicom"
    except MedclDataError:
        return False


# ---------------------------------------------------------------------------------------------- load


def load_manifest(path: str | PathLike) -> Manifest:
    """Read a dataset description from ``path`` (see the module docstring for the accepted layouts).

    Raises:
        MedclDataError: naming the file (and key) for a missing path, an unreadable or invalid
            ``dataset.json`` / CSV (a CSV ``split`` other than ``train`` / ``test``, any case), duplicate
            case ids, a label that is the same file as its image (same real path or a hard link: a
            ``labels/`` folder linked to ``images/``, one path given twice), or a folder with nothing medcl
            can read.
    """
    manifest = _load(Path(path))
    _check_labels_are_not_images(manifest)
    return manifest


def _load(p: Path) -> Manifest:
    if not p.exists():
        raise MedclDataError(p, "does not exist")
    if p.is_dir():
        if (p / "dataset.json").is_file():
            from medcl.data.schemas import load_dataset_json

            return load_dataset_json(p / "dataset.json")
        return _load_folder(p)
    low = p.name.lower()
    if low.endswith(".json"):
        from medcl.data.schemas import load_dataset_json

        return load_dataset_json(p)
    if low.endswith(".csv"):
        return _load_csv(p)
    # a single volume (the reader reports an unsupported format when it is none)
    mio.detect_format(p)
    return Manifest(
        cases=[Case(id=case_id_from_path(p), images=[str(p)])],
        channel_names=["0"],
        labels=None,
        kind="file",
        root=str(p.parent),
        source=str(p),
    )


def _load_csv(path: Path) -> Manifest:
    """Read a CSV manifest (header ``image[,label][,split][,patient][,id]``).

    ``split`` is ``train``, ``test`` (:data:`SPLITS`) or empty, compared case-insensitively (``Test`` and
    ``TRAIN`` are accepted and stored in lower case); any other value (a typo such as ``tset``, or ``val``,
    which medcl does not use) is refused with the file, the line and the allowed values, since such a case
    would silently be trained on. A label that is the same file as its image is refused too.
    """
    root = path.parent
    allowed = {"image", "label", "split", "patient", "id"}
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise MedclDataError(path, f"cannot read CSV ({exc})") from exc
    if "image" not in header:
        raise MedclDataError(path, f"CSV header must have an 'image' column (image[,label][,split][,patient]), got {header}")
    unknown = [h for h in header if h not in allowed]
    if unknown:
        raise MedclDataError(path, f"unknown CSV column(s) {unknown}; allowed: image, label, split, patient, id")
    cases = []
    n_channels = 1
    for r, row in enumerate(rows, start=2):  # line numbers as an editor shows them
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        images = [x.strip() for x in row.get("image", "").split(";") if x.strip()]
        if not images:
            raise MedclDataError(path, f"line {r}: empty 'image'")
        if r == 2:
            n_channels = len(images)
        cid = row.get("id") or case_id_from_path(images[0])
        split = row.get("split") or None
        if split is not None:
            if split.lower() not in SPLITS:
                raise MedclDataError(path, f"line {r}: unknown split {split!r} in column 'split'; allowed: "
                                           f"{', '.join(repr(s) for s in SPLITS)} (case-insensitive), "
                                           "or empty for none")
            split = split.lower()
        case = Case(
            id=cid,
            images=[_resolve(root, x) for x in images],
            label=_resolve(root, row["label"]) if row.get("label") else None,
            split=split,
            patient=row.get("patient") or None,
        )
        if (twin := label_is_an_image(case)) is not None:
            raise MedclDataError(path, f"line {r}: label {case.label} is the same file as its image {twin}")
        cases.append(case)
    _unique_ids(cases, path)
    return Manifest(cases, [str(i) for i in range(n_channels)], None, "csv", str(root), str(path))


def _load_folder(folder: Path) -> Manifest:
    if (folder / "imagesTr").is_dir():
        images_dir, label_dirs = folder / "imagesTr", [folder / "labelsTr", folder / "labels"]
    else:
        images_dir = folder
        label_dirs = [folder / n for n in _LABEL_DIRS]
        if folder.name.lower().startswith("images"):
            label_dirs += [folder.parent / n for n in _LABEL_DIRS]
    label_dir = next((d for d in label_dirs if d.is_dir()), None)
    _check_label_dirs(images_dir, [d for d in label_dirs if d.is_dir()])
    skip_dirs = {d.resolve() for d in label_dirs if d.is_dir()}
    problems: list[tuple[str, str]] = []
    volumes: list[Path] = []
    dicom_files = False
    subdirs: list[Path] = []
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_dir():
            if f.resolve() not in skip_dirs:
                subdirs.append(f)
            continue
        if _volume_suffix(f.name):
            volumes.append(f)
        elif _is_dicom_file(f):
            dicom_files = True
        elif f.name.lower().endswith(_SIDECAR_SUFFIXES) or f.name.upper().startswith(("LICENSE", "README")):
            continue
        else:
            try:
                mio.detect_format(f)
            except MedclDataError as exc:
                problems.append((str(f), f"{exc.problem}; skipped"))
    if dicom_files and not volumes:
        return _dicom_manifest(folder, [folder], problems)

    cases: list[Case] = []
    channel_names = ["0"]
    # nnU-Net-style channel files: CASE_0000, CASE_0001 ... are the channels of one case
    stems = {f: f.name[: -len(_volume_suffix(f.name) or "")] for f in volumes}
    grouped = bool(volumes) and all(_CHANNEL_RE.match(s) for s in stems.values())
    if grouped:
        by_case: dict[str, dict[int, Path]] = {}
        for f, s in stems.items():
            m = _CHANNEL_RE.match(s)
            assert m is not None
            by_case.setdefault(m.group("case"), {})[int(m.group("ch"))] = f
        n_ch = max(max(chs) for chs in by_case.values()) + 1
        channel_names = [str(i) for i in range(n_ch)]
        for cid, chs in sorted(by_case.items()):
            suffix = _volume_suffix(next(iter(chs.values())).name) or ""
            images = [str(chs.get(c, images_dir / f"{cid}_{c:04d}{suffix}")) for c in range(n_ch)]
            cases.append(Case(cid, images, _pair_label(label_dir, cid)))
    else:
        for f in volumes:
            cid = case_id_from_path(f)
            cases.append(Case(cid, [str(f)], _pair_label(label_dir, cid)))
    if label_dir is not None:
        ids = {c.id for c in cases}
        for f in sorted(label_dir.iterdir()):
            if _volume_suffix(f.name) and case_id_from_path(f) not in ids:
                problems.append((str(f), "label without a matching image"))
    dicom_dirs = [d for d in subdirs if not (d / "dataset.json").exists()]
    if dicom_dirs:
        dicom = _dicom_manifest(folder, dicom_dirs, problems)
        if dicom.cases and not cases:
            return dicom
        cases += dicom.cases
    if not cases and not problems:
        raise MedclDataError(folder, "no volumes found (NIfTI, NRRD, MHA/MHD or DICOM series)")
    _unique_ids(cases, folder)
    return Manifest(cases, channel_names, None, "folder", str(images_dir), str(folder), problems)


def _check_label_dirs(images_dir: Path, label_dirs: list[Path]) -> None:
    """Refuse a labels folder that is (a link to) the images folder or one of its image subfolders."""
    images = {images_dir.resolve(): images_dir}
    with os.scandir(images_dir) as entries:
        subdirs = [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]
    for f in subdirs:
        if f not in label_dirs:
            images.setdefault(f.resolve(), f)
    for d in label_dirs:
        other = images.get(d.resolve())
        if other is not None:
            raise MedclDataError(d, f"the labels folder is the images folder {other} (a link?): every label "
                                    "would be its own image")


def _pair_label(label_dir: Path | None, cid: str) -> str | None:
    if label_dir is None:
        return None
    for s in VOLUME_SUFFIXES:
        for name in (f"{cid}{s}", f"{cid}_0000{s}"):
            if (label_dir / name).is_file():
                return str(label_dir / name)
    return None


def _dicom_manifest(folder: Path, series_dirs: list[Path], problems: list[tuple[str, str]]) -> Manifest:
    """One case per DICOM series: ``series_dirs`` are folders (the folder itself, or its subfolders)."""
    cases: list[Case] = []
    modalities: list[str] = []
    for d in series_dirs:
        try:
            series = mio.list_dicom_series(d)
        except MedclDataError as exc:
            problems.append((exc.path, exc.problem))
            continue
        if not series:
            continue  # a subfolder without DICOM images (e.g. notes): not a case
        for s in series:
            cid = d.name if len(series) == 1 else f"{d.name}_{(s['series_uid'] or 'nouid')[-8:]}"
            cases.append(Case(cid, [str(d)], None, series_uid=s["series_uid"] if len(series) > 1 else None))
            modalities.append(s.get("modality") or "")
    mods = sorted(set(modalities))
    channel_names = [mods[0]] if len(mods) == 1 and mods[0] else ["0"]
    return Manifest(cases, channel_names, None, "dicom", str(folder), str(folder), problems)
