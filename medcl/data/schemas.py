"""The two ``dataset.json`` schemas: Medical Segmentation Decathlon and nnU-Net v2, told apart and validated.

* **MSD** (Antonelli et al., 2022): ``modality`` ``{"0": "FLAIR", "1": "T1w"}`` (several modalities: 4D
  images, one channel per modality), ``labels`` ``{"0": "background", ...}``, ``numTraining``,
  ``training: [{"image", "label"}]``, optional ``test: [path]``. nnU-Net v1 folders (the same schema, but
  ``CASE.nii.gz`` entries stored as ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``) are read too.
* **nnU-Net v2** (Isensee et al., 2021): ``channel_names`` ``{"0": "T2", "1": "ADC"}``, ``labels``
  ``{"background": 0, "PZ": 1, ...}`` (a list of values for region-based labels), ``numTraining``,
  ``file_ending``; cases from ``imagesTr/CASE_XXXX{file_ending}`` + ``labelsTr/CASE{file_ending}``, or an
  explicit ``dataset`` mapping.

``channel_names`` means nnU-Net v2; ``modality`` or ``training`` means MSD; both, or neither, is an error.
Every error is a :class:`~medcl.core.errors.MedclDataError` naming the file and the key; problems that
do not stop listing (a wrong ``numTraining``, a badly named channel file) go to ``Manifest.problems``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medcl.core.errors import MedclDataError
from medcl.data.manifest import (
    _CHANNEL_RE,
    Case,
    Manifest,
    _resolve,
    _unique_ids,
    _volume_suffix,
    case_id_from_path,
)

__all__ = ["load_dataset_json"]


def load_dataset_json(path: str | Path) -> Manifest:
    """Read an MSD or nnU-Net v2 ``dataset.json`` (see the module docstring) into a :class:`Manifest`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MedclDataError(path, f"cannot read ({exc.strerror or exc})") from exc
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MedclDataError(path, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(d, dict):
        raise MedclDataError(path, "a dataset.json must hold a JSON object at the top level")
    if "channel_names" in d:
        if "modality" in d:
            raise MedclDataError(
                path, "has both 'channel_names' (nnU-Net v2) and 'modality' (MSD): cannot tell the schema"
            )
        return _load_nnunet(path, d)
    if "modality" in d or "training" in d:
        return _load_msd(path, d)
    raise MedclDataError(
        path,
        "neither an MSD dataset.json (keys 'training', 'modality', 'labels') nor an nnU-Net v2 one "
        "(keys 'channel_names', 'labels', 'numTraining', 'file_ending')",
    )


def _index_dict(path: Path, key: str, value: Any) -> list[str]:
    """``{"0": "T2", "1": "ADC"}`` -> ``["T2", "ADC"]``; keys must be 0..n-1."""
    if not isinstance(value, dict) or not value:
        raise MedclDataError(path, f"key '{key}' must be a non-empty mapping like {{\"0\": \"MRI\"}}, got {value!r}")
    try:
        idx = {int(k): v for k, v in value.items()}
    except (TypeError, ValueError) as exc:
        raise MedclDataError(path, f"key '{key}': keys must be channel indices \"0\", \"1\", ...") from exc
    if sorted(idx) != list(range(len(idx))):
        raise MedclDataError(path, f"key '{key}': channel indices must be 0..{len(idx) - 1}, got {sorted(idx)}")
    for i, v in idx.items():
        if not isinstance(v, str):
            raise MedclDataError(path, f"key '{key}.{i}': the channel name must be a string, got {v!r}")
    return [idx[i] for i in range(len(idx))]


def _load_msd(path: Path, d: dict[str, Any]) -> Manifest:
    root = path.parent
    if "modality" not in d:
        raise MedclDataError(path, "MSD dataset.json: key 'modality' is missing (e.g. {\"0\": \"MRI\"})")
    channels = _index_dict(path, "modality", d["modality"])
    labels: dict[int, str] | None = None
    if "labels" in d:
        raw = d["labels"]
        if not isinstance(raw, dict):
            raise MedclDataError(path, f"key 'labels' must map values to names, got {raw!r}")
        labels = {}
        for k, v in raw.items():
            try:
                labels[int(k)] = str(v)
            except ValueError as exc:
                raise MedclDataError(
                    path, f"key 'labels.{k}': MSD label keys are integer values (\"0\", \"1\", ...)"
                ) from exc
    training = d.get("training")
    if not isinstance(training, list):
        raise MedclDataError(path, f"key 'training' must be a list of {{image, label}}, got {type(training).__name__}")
    problems: list[tuple[str, str]] = []
    cases: list[Case] = []
    for i, entry in enumerate(training):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise MedclDataError(path, f"key 'training[{i}]' must be {{\"image\": path, \"label\": path}}, got {entry!r}")
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise MedclDataError(path, f"key 'training[{i}].label' must be a path string, got {label!r}")
        cases.append(_msd_case(root, entry["image"], label, len(channels), "train"))
    test = d.get("test", [])
    if not isinstance(test, list):
        raise MedclDataError(path, f"key 'test' must be a list of paths, got {type(test).__name__}")
    for i, entry in enumerate(test):
        img = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(img, str):
            raise MedclDataError(path, f"key 'test[{i}]' must be a path, got {entry!r}")
        cases.append(_msd_case(root, img, None, len(channels), "test"))
    n_declared = d.get("numTraining")
    if n_declared is not None and n_declared != len(training):
        problems.append((str(path), f"numTraining is {n_declared} but 'training' lists {len(training)} cases"))
    _unique_ids(cases, path)
    return Manifest(cases, channels, labels, "msd", str(root), str(path), problems)


def _msd_case(root: Path, image: str, label: str | None, n_channels: int, split: str) -> Case:
    img = Path(_resolve(root, image))
    images = [str(img)]
    if not img.exists():
        # nnU-Net v1 layout: the entry names CASE.nii.gz, the files are CASE_0000.nii.gz, CASE_0001 ...
        suffix = _volume_suffix(img.name) or ""
        stem = img.name[: -len(suffix)] if suffix else img.name
        chans = [img.parent / f"{stem}_{c:04d}{suffix}" for c in range(n_channels)]
        if chans[0].exists():
            images = [str(c) for c in chans]
    return Case(
        id=case_id_from_path(img),
        images=images,
        label=_resolve(root, label) if label else None,
        split=split,
    )


def _load_nnunet(path: Path, d: dict[str, Any]) -> Manifest:
    root = path.parent
    channels = _index_dict(path, "channel_names", d["channel_names"])
    for key in ("labels", "numTraining", "file_ending"):
        if key not in d:
            raise MedclDataError(path, f"nnU-Net v2 dataset.json: required key '{key}' is missing")
    raw = d["labels"]
    if not isinstance(raw, dict):
        raise MedclDataError(path, f"key 'labels' must map names to values ({{\"background\": 0, ...}}), got {raw!r}")
    if raw.get("background") != 0:
        raise MedclDataError(path, "key 'labels.background': nnU-Net v2 needs \"background\": 0")
    labels: dict[int, str] = {}
    for name, value in raw.items():
        values = value if isinstance(value, list) else [value]  # region-based training lists values
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise MedclDataError(path, f"key 'labels.{name}': label values must be integers, got {value!r}")
            labels.setdefault(v, name)
    ending = d["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise MedclDataError(path, f"key 'file_ending' must be a file ending like \".nii.gz\", got {ending!r}")
    n_train = d["numTraining"]
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 0:
        raise MedclDataError(path, f"key 'numTraining' must be a non-negative integer, got {n_train!r}")

    problems: list[tuple[str, str]] = []
    if "dataset" in d:
        cases = _nnunet_explicit(path, root, d["dataset"])
    else:
        cases = _nnunet_scan(path, root, ending, len(channels), problems)
    if len(cases) != n_train:
        problems.append((str(path), f"numTraining is {n_train} but {len(cases)} training cases were found"))
    _unique_ids(cases, path)
    return Manifest(cases, channels, labels, "nnunet", str(root), str(path), problems)


def _nnunet_explicit(path: Path, root: Path, dataset: Any) -> list[Case]:
    if not isinstance(dataset, dict):
        raise MedclDataError(path, "key 'dataset' must map case ids to {\"images\": [...], \"label\": ...}")
    cases = []
    for cid, entry in dataset.items():
        imgs = entry.get("images") if isinstance(entry, dict) else None
        if not isinstance(imgs, list) or not imgs or not all(isinstance(x, str) for x in imgs):
            raise MedclDataError(path, f"key 'dataset.{cid}.images' must be a non-empty list of paths")
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise MedclDataError(path, f"key 'dataset.{cid}.label' must be a path, got {label!r}")
        cases.append(Case(str(cid), [_resolve(root, x) for x in imgs], _resolve(root, label) if label else None,
                          split="train"))
    return cases


def _nnunet_scan(path: Path, root: Path, ending: str, n_channels: int,
                 problems: list[tuple[str, str]]) -> list[Case]:
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise MedclDataError(path, f"nnU-Net v2 raw folder without imagesTr/ (looked in {images_dir})")
    found: dict[str, set[int]] = {}
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith(".") or f.is_dir():
            continue
        if not f.name.endswith(ending):
            problems.append((str(f), f"does not end with the dataset's file_ending '{ending}'; skipped"))
            continue
        m = _CHANNEL_RE.match(f.name[: -len(ending)])
        if m is None:
            problems.append((str(f), f"nnU-Net image files must be named CASE_XXXX{ending} (XXXX the channel); skipped"))
            continue
        ch = int(m.group("ch"))
        if ch >= n_channels:
            problems.append((str(f), f"channel {ch} but channel_names declares {n_channels} channel(s); skipped"))
            continue
        found.setdefault(m.group("case"), set()).add(ch)
    labels_dir = root / "labelsTr"
    cases = []
    for cid in sorted(found):
        # every declared channel is listed: a missing one is then reported by load_case as a missing file
        images = [str(images_dir / f"{cid}_{c:04d}{ending}") for c in range(n_channels)]
        cases.append(Case(cid, images, str(labels_dir / f"{cid}{ending}"), split="train"))
    if labels_dir.is_dir():
        for f in sorted(labels_dir.iterdir()):
            if f.name.endswith(ending) and f.name[: -len(ending)] not in found:
                problems.append((str(f), "label without a matching image in imagesTr/"))
    return cases
