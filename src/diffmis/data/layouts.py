"""On-disk dataset layouts: listing files, pairing images with masks, reading and resolving splits.

Folder layout (``../shared/data``)::

    root/images/<id>.<png|jpg|jpeg|tif|tiff|bmp>
    root/masks/<id>.<same suffixes>            same stem as the image
    root/fov/<id>.<...> or <id>_mask.<...>     optional field-of-view masks (DRIVE)
    root/splits/<name>.txt                     one id per line (blank lines and '#' comments ignored)

nnU-Net raw layout::

    root/dataset.json                          channel_names, labels, file_ending (numTraining checked)
    root/imagesTr/<case>_<XXXX><file_ending>   one file per channel XXXX = 0000, 0001, ...
    root/labelsTr/<case><file_ending>
    root/imagesTs/..., root/labelsTs/...       optional test cases (labels needed to train/evaluate on them)
    root/splits/<name>.txt                     optional case-id lists (else see :func:`resolve_split`)

Listing never decodes pixels; problems found while listing are collected as ``(file, message)`` pairs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
from diffmis.errors import DataError

from diffmis.data.io import IMAGE_SUFFIXES, NIFTI_SUFFIXES, split_suffix

__all__ = [
    "Problem",
    "FolderIndex",
    "NnunetIndex",
    "detect_layout",
    "index_folder",
    "index_nnunet",
    "read_split_file",
    "carve_validation",
    "ResolvedSplit",
    "resolve_split",
]

Problem = tuple[str, str]
PathLike = Union[str, Path]

#: Seed of the fixed permutation that carves a validation subset out of the training ids (``data.val_fraction``).
VAL_CARVE_SEED = 0


def detect_layout(root: PathLike) -> str:
    """``"nnunet"`` (``dataset.json`` or ``imagesTr/``), ``"folder"`` (``images/``), else DataError."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir():
        return "nnunet"
    if (root / "images").is_dir():
        return "folder"
    raise DataError(f"{root}: not a dataset folder; expected images/ + masks/ + splits/ (folder layout) or "
                    "dataset.json + imagesTr/ + labelsTr/ (nnU-Net raw layout)")


def read_split_file(path: PathLike) -> list[tuple[int, str]]:
    """``(line number, id)`` pairs of a split file, skipping blank lines and ``#`` comments.

    Raises:
        DataError: the file cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read split file ({err})") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s and not s.startswith("#"):
            out.append((n, s))
    return out


def _split_files(root: Path) -> dict[str, Path]:
    d = root / "splits"
    return {p.stem: p for p in sorted(d.glob("*.txt"))} if d.is_dir() else {}


@dataclass
class FolderIndex:
    """Files of a folder-layout dataset, keyed by id (file stem).

    Attributes:
        root: dataset folder.
        images, masks: id -> file (the first in sorted order when a stem is duplicated).
        fov: id -> field-of-view file, or None when there is no ``fov/`` folder.
        ignored: files skipped because their suffix is not an image suffix, by stem.
        splits: split name -> split file.
        problems: listing problems (duplicate stems, masks without an image).
    """

    root: Path
    images: dict[str, Path]
    masks: dict[str, Path]
    fov: Optional[dict[str, Path]]
    ignored: dict[str, list[Path]]
    splits: dict[str, Path]
    problems: list[Problem] = field(default_factory=list)


def _list_images(folder: Path, problems: list[Problem], ignored: dict[str, list[Path]]) -> dict[str, Path]:
    groups: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        stem, suffix = split_suffix(p.name)
        if suffix in IMAGE_SUFFIXES or suffix in NIFTI_SUFFIXES:  # 2D files, or NIfTI volumes (3D runs)
            groups.setdefault(stem, []).append(p)
        else:
            ignored.setdefault(stem, []).append(p)
    out = {}
    for stem, paths in groups.items():
        out[stem] = paths[0]
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            problems.append((str(paths[1]), f"duplicate stem '{stem}' in {folder.name}/: {names}; keep one file"))
    return out


def index_folder(root: PathLike) -> FolderIndex:
    """List a folder-layout dataset (no decoding).

    Raises:
        DataError: ``root`` or ``root/images`` is missing.
    """
    root = Path(root)
    if not (root / "images").is_dir():
        raise DataError(f"{root}: no images/ folder (folder layout: images/, masks/, splits/<name>.txt)")
    problems: list[Problem] = []
    ignored: dict[str, list[Path]] = {}
    images = _list_images(root / "images", problems, ignored)
    masks: dict[str, Path] = {}
    if (root / "masks").is_dir():
        masks = _list_images(root / "masks", problems, ignored)
    else:
        problems.append((str(root / "masks"), "no masks/ folder: every image needs a mask with the same stem"))
    for mid, mpath in masks.items():
        if mid not in images:
            problems.append((str(mpath), f"mask has no image: no images/{mid}.* file"))
    fov: Optional[dict[str, Path]] = None
    if (root / "fov").is_dir():
        raw = _list_images(root / "fov", problems, ignored)
        fov = {}
        for stem, path in raw.items():
            key = stem[: -len("_mask")] if stem not in images and stem.endswith("_mask") else stem
            if key not in images:
                problems.append((str(path), f"field-of-view mask has no image: no images/{key}.* file"))
            fov[key] = path
    return FolderIndex(root, images, masks, fov, ignored, _split_files(root), problems)


@dataclass
class NnunetIndex:
    """Files of an nnU-Net raw dataset.

    Attributes:
        root: dataset folder.
        file_ending: e.g. ``.nii.gz`` or ``.png``.
        channel_names: names of the input channels, in channel order.
        label_values: class name -> stored label value, sorted by value (background first).
        train, test: case id -> channel files (channel order) from ``imagesTr/`` / ``imagesTs/``.
        train_labels, test_labels: case id -> label file from ``labelsTr/`` / ``labelsTs/``.
        splits: split name -> split file (``splits/<name>.txt``, optional).
        problems: listing problems (dataset.json, file names, missing channel or label files).
    """

    root: Path
    file_ending: str
    channel_names: list[str]
    label_values: dict[str, int]
    train: dict[str, list[Path]]
    train_labels: dict[str, Path]
    test: dict[str, list[Path]]
    test_labels: dict[str, Path]
    splits: dict[str, Path]
    problems: list[Problem] = field(default_factory=list)

    @property
    def is_2d(self) -> bool:
        """Whether cases are 2D image files (PNG, TIFF, ...) rather than volumes."""
        return self.file_ending in IMAGE_SUFFIXES


def _read_dataset_json(root: Path, problems: list[Problem]) -> tuple[str, list[str], dict[str, int]]:
    path = root / "dataset.json"
    if not path.is_file():
        problems.append((str(path), "missing: an nnU-Net raw dataset needs dataset.json "
                                    "(channel_names, labels, file_ending)"))
        return ".nii.gz", [], {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.append((str(path), f"not valid JSON ({err})"))
        return ".nii.gz", [], {}
    if not isinstance(meta, dict):
        problems.append((str(path), "the top level must be a JSON object"))
        return ".nii.gz", [], {}
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in meta]
    if missing:
        problems.append((str(path), f"missing key(s) {', '.join(missing)}"))
    ending = str(meta.get("file_ending", ".nii.gz")).lower()
    if ending not in IMAGE_SUFFIXES + NIFTI_SUFFIXES:
        problems.append((str(path), f"file_ending '{ending}' is not supported; use one of "
                                    f"{', '.join(NIFTI_SUFFIXES + IMAGE_SUFFIXES)}"))
    chan = meta.get("channel_names", meta.get("modality", {}))
    channels: list[str] = []
    if isinstance(chan, dict):
        try:
            channels = [str(chan[k]) for k in sorted(chan, key=int)]
        except ValueError:
            problems.append((str(path), "channel_names keys must be channel numbers (\"0\", \"1\", ...)"))
    labels: dict[str, int] = {}
    raw = meta.get("labels", {})
    if isinstance(raw, dict):
        for name, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append((str(path), f"label '{name}' maps to {value!r}; only integer labels are "
                                            "supported (no region-based training)"))
            else:
                labels[str(name)] = value
    labels = dict(sorted(labels.items(), key=lambda kv: kv[1]))
    n_train = meta.get("numTraining")
    if isinstance(n_train, int) and (root / "labelsTr").is_dir():
        found = sum(1 for p in (root / "labelsTr").iterdir() if p.name.lower().endswith(ending))
        if found != n_train:
            problems.append((str(path), f"numTraining is {n_train} but labelsTr/ holds {found} label files"))
    return ending, channels, labels


_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<chan>\d{4})$")


def _list_cases(folder: Path, ending: str, n_channels: int, is_2d: bool,
                problems: list[Problem]) -> dict[str, list[Path]]:
    if not folder.is_dir():
        return {}
    found: dict[str, dict[int, Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if not p.name.lower().endswith(ending):
            problems.append((str(p), f"file does not end with the dataset's file_ending '{ending}'"))
            continue
        m = _CHANNEL_RE.match(p.name[: -len(ending)])
        if not m:
            problems.append((str(p), f"name does not follow <case>_<XXXX>{ending} (XXXX = channel number)"))
            continue
        found.setdefault(m["case"], {})[int(m["chan"])] = p
    cases = {}
    for case, chans in found.items():
        top = max(chans) + 1
        # 2D image files may hold several channels each (e.g. one RGB file for 3 channels)
        need = range(top) if is_2d else range(max(n_channels, top))
        missing = [c for c in need if c not in chans]
        for c in missing:
            problems.append((str(folder / f"{case}_{c:04d}{ending}"),
                             f"missing channel file of case '{case}' (dataset.json declares "
                             f"{n_channels} channel(s))"))
        if not is_2d and top > n_channels:
            for c in range(n_channels, top):
                if c in chans:
                    problems.append((str(chans[c]), f"channel {c} is not declared in dataset.json channel_names "
                                                    f"({n_channels} channel(s))"))
        if not missing:
            cases[case] = [chans[c] for c in sorted(chans)][: top if is_2d else n_channels]
    return cases


def _list_labels(folder: Path, ending: str, cases: dict[str, list[Path]], images_dir: str,
                 problems: list[Problem]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or not p.name.lower().endswith(ending):
            continue
        case = p.name[: -len(ending)]
        out[case] = p
        if case not in cases:
            problems.append((str(p), f"label file has no image: no {images_dir}/{case}_0000{ending}"))
    return out


def index_nnunet(root: PathLike) -> NnunetIndex:
    """List an nnU-Net raw dataset (reads dataset.json; no decoding)."""
    root = Path(root)
    problems: list[Problem] = []
    ending, channels, labels = _read_dataset_json(root, problems)
    is_2d = ending in IMAGE_SUFFIXES
    n_chan = max(1, len(channels))
    if not (root / "imagesTr").is_dir():
        problems.append((str(root / "imagesTr"), "missing: an nnU-Net raw dataset needs imagesTr/"))
    train = _list_cases(root / "imagesTr", ending, n_chan, is_2d, problems)
    test = _list_cases(root / "imagesTs", ending, n_chan, is_2d, problems)
    train_labels = _list_labels(root / "labelsTr", ending, train, "imagesTr", problems)
    test_labels = _list_labels(root / "labelsTs", ending, test, "imagesTs", problems)
    return NnunetIndex(root, ending, channels, labels, train, train_labels, test, test_labels,
                       _split_files(root), problems)


def carve_validation(ids: list[str], fraction: float) -> list[str]:
    """The ids held out for validation when no validation split file exists (``data.val_fraction``).

    A fixed permutation (seed :data:`VAL_CARVE_SEED`, independent of the experiment seed) of the sorted ids;
    the first ``max(1, round(fraction * n))`` form the validation subset.

    Returns:
        Sorted validation ids (empty when ``fraction`` is 0 or there are fewer than 2 ids).
    """
    if fraction <= 0 or len(ids) < 2:
        return []
    ordered = sorted(ids)
    perm = np.random.default_rng(VAL_CARVE_SEED).permutation(len(ordered))
    n_val = min(len(ordered) - 1, max(1, round(fraction * len(ordered))))
    return sorted(ordered[i] for i in perm[:n_val])


@dataclass(frozen=True)
class ResolvedSplit:
    """Ids of one split and where they came from.

    Attributes:
        name: the split name asked for.
        ids: ``(line number or 0, id)`` pairs in file order (line 0 when not from a file).
        source: the split file, or a description (e.g. ``imagesTs/``) when ids come from the layout.
        file: the split file when there is one (problems about ids are reported against it).
    """

    name: str
    ids: list[tuple[int, str]]
    source: str
    file: Optional[Path]


def resolve_split(
    index: Union[FolderIndex, NnunetIndex],
    split: str,
    *,
    train_split: str = "train",
    val_split: str = "val",
    test_split: str = "test",
    val_fraction: float = 0.0,
) -> ResolvedSplit:
    """Find the ids of ``split``.

    Rules, in order:

    1. ``split`` is the validation split, its file is missing and ``val_fraction > 0``: a fixed subset of the
       training ids (:func:`carve_validation`); the training split then leaves these ids out.
    2. ``splits/<split>.txt`` exists: its ids.
    3. nnU-Net only, without split files: the training split is every ``imagesTr`` case, the test split every
       ``imagesTs`` case.

    Raises:
        DataError: none applies; the message names the split file and the available splits.
    """
    files = index.splits
    is_train, is_val, is_test = split == train_split, split == val_split, split == test_split
    carve = val_fraction > 0 and val_split not in files

    def train_ids() -> tuple[list[tuple[int, str]], str, Optional[Path]]:
        if train_split in files:
            return read_split_file(files[train_split]), str(files[train_split]), files[train_split]
        if isinstance(index, NnunetIndex):
            return [(0, c) for c in sorted(index.train)], "imagesTr/", None
        raise _missing(index, train_split)

    if is_val and carve:
        ids, source, _ = train_ids()
        held = carve_validation([i for _, i in ids], val_fraction)
        return ResolvedSplit(split, [(0, i) for i in held], f"{val_fraction:g} of {source}", None)
    if is_train and (train_split in files or isinstance(index, NnunetIndex)):
        ids, source, path = train_ids()
        if carve:
            held = set(carve_validation([i for _, i in ids], val_fraction))
            ids = [(n, i) for n, i in ids if i not in held]
        return ResolvedSplit(split, ids, source, path)
    if split in files:
        return ResolvedSplit(split, read_split_file(files[split]), str(files[split]), files[split])
    if isinstance(index, NnunetIndex) and is_test and index.test:
        return ResolvedSplit(split, [(0, c) for c in sorted(index.test)], "imagesTs/", None)
    raise _missing(index, split, val_split)


def _missing(index: Union[FolderIndex, NnunetIndex], split: str, val_split: str = "val") -> DataError:
    available = ", ".join(sorted(index.splits)) or "none"
    hint = ""
    if split == val_split:
        hint = "; set data.val_split to an existing split or data.val_fraction > 0 to hold out training ids"
    return DataError(f"{index.root / 'splits' / (split + '.txt')}: split file not found (available splits: "
                     f"{available}){hint}")
