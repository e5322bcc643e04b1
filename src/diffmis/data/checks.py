"""Dataset checks: every problem with the file it concerns, before any training step.

Two depths share one code path:

- quick (``full=False``, what :func:`diffmis.data.build_dataset` runs at start): listing, pairing, split files,
  image/mask sizes and channel counts from file headers only (no pixel decoding for 2D images; NIfTI headers).
- full (``full=True``, what ``diffmis data check`` runs): additionally decodes every image, mask and FOV
  (a truncated JPEG fails here) and checks every mask's values against the declared labels.

Problems found:

- unreadable or corrupt image/mask/FOV file; a missing mask (or FOV, or channel file, or label file);
- mask or FOV size different from its image; channel count different from ``data.in_channels``;
- mask values outside the declared labels (binary: {0, 1} or {0, 255}); a FOV that is not binary;
- split ids without files, ids listed twice, an empty split, ids shared by two splits, a missing split file;
- duplicate stems (one id with two suffixes), masks/FOVs/labels without an image;
- nnU-Net: dataset.json missing keys, unsupported file ending, numTraining mismatch, channel files or label
  files that do not match, different shapes or spacings among the channels and the label of one case.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, TypeVar, Union

import numpy as np
from diffmis.errors import DataError

from diffmis.data.io import (
    NIFTI_SUFFIXES,
    image_header,
    load_image_array,
    load_mask_array,
    read_volume,
    split_suffix,
    volume_affine,
    volume_shape,
)
from diffmis.data.labels import LabelSpec, fmt_values, fov_problem, lossy_hint
from diffmis.data.layouts import (
    FolderIndex,
    NnunetIndex,
    Problem,
    ResolvedSplit,
    detect_layout,
    index_folder,
    index_nnunet,
    resolve_split,
)

__all__ = ["DatasetReport", "check_dataset", "check_index", "nnunet_label_spec", "parallel_map"]

PathLike = Union[str, Path]
T = TypeVar("T")
R = TypeVar("R")

#: Problems listed in a DataError message before it says how many more there are.
MAX_LISTED = 50


@dataclass
class DatasetReport:
    """Result of :func:`check_dataset`.

    Attributes:
        root: dataset folder.
        layout: ``"folder"``, ``"nnunet"`` or ``"unknown"``.
        problems: ``(file, message)`` pairs; empty when the dataset is clean.
        counts: e.g. ``images``, ``masks``, ``fov``, ``split:<name>``, ``empty_masks`` (full check),
            ``cases_train``/``cases_test`` (nnU-Net).
        size_min, size_max: smallest and largest image by pixel count, ``(H, W)`` (folder, 2D nnU-Net) or volume
            shape ``(X, Y, Z)`` (nnU-Net volumes); None when nothing could be read.
        channels: distinct channel counts found.
        label_values: distinct mask values found (full check only).
        full: whether pixels were decoded.
    """

    root: str
    layout: str
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    size_min: Optional[tuple[int, ...]] = None
    size_max: Optional[tuple[int, ...]] = None
    channels: list[int] = field(default_factory=list)
    label_values: list[int] = field(default_factory=list)
    full: bool = True

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def summary(self) -> str:
        """Multi-line text: status, counts, sizes, then every problem as ``file: message``."""
        status = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        depth = "full decode" if self.full else "headers only"
        lines = [f"dataset {self.root} ({self.layout} layout, {depth}): {status}"]
        plain = {k: v for k, v in self.counts.items() if not k.startswith("split:")}
        if plain:
            lines.append("  " + ", ".join(f"{k} {v}" for k, v in plain.items()))
        splits = {k[6:]: v for k, v in self.counts.items() if k.startswith("split:")}
        if splits:
            lines.append("  splits: " + ", ".join(f"{k} {v}" for k, v in splits.items()))
        if self.size_min is not None and self.size_max is not None:
            axes = "HxW" if len(self.size_min) == 2 else "XxYxZ"
            fmt = "x".join
            lines.append(f"  size ({axes}): min {fmt(map(str, self.size_min))}, max {fmt(map(str, self.size_max))}"
                         f"; channels {', '.join(map(str, self.channels)) or '?'}")
        if self.label_values:
            lines.append(f"  mask values: {fmt_values(self.label_values)}")
        lines.extend(f"  PROBLEM {f}: {m}" for f, m in self.problems)
        return "\n".join(lines)

    def error(self) -> DataError:
        """A DataError listing the problems (at most :data:`MAX_LISTED`), for fail-fast loading."""
        listed = [f"  {f}: {m}" for f, m in self.problems[:MAX_LISTED]]
        more = len(self.problems) - MAX_LISTED
        if more > 0:
            listed.append(f"  ... and {more} more (run `diffmis data check {self.root}`)")
        return DataError(f"dataset {self.root} has {len(self.problems)} problem(s):\n" + "\n".join(listed))


def _workers(workers: Optional[int]) -> int:
    if workers is not None:
        return max(1, workers)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: Optional[int] = None) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool (PIL and zlib release the GIL while decoding)."""
    n = _workers(workers)
    if n == 1 or len(items) < 4:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, items))


@dataclass
class _Item:
    problems: list[Problem] = field(default_factory=list)
    size: Optional[tuple[int, ...]] = None
    channels: Optional[int] = None
    values: frozenset[int] = frozenset()
    empty: bool = False


def _distinct(arr: np.ndarray) -> frozenset[int]:
    if arr.dtype == np.uint8:
        return frozenset(np.flatnonzero(np.bincount(arr.ravel(), minlength=256)).tolist())
    return frozenset(np.unique(arr).tolist())


def _channel_problem(c: int, in_channels: Optional[int]) -> Optional[str]:
    if in_channels is None or c == in_channels or (c == 1 and in_channels == 3):
        return None
    return f"image has {c} channel(s); data.in_channels={in_channels}"


def _size_msg(what: str, got: tuple[int, ...], ref: Path, want: tuple[int, ...]) -> str:
    return (f"{what} size {'x'.join(map(str, got))} (HxW) differs from its image {ref.name} "
            f"{'x'.join(map(str, want))}")


def _is_nifti(path: Path) -> bool:
    return split_suffix(path.name)[1] in NIFTI_SUFFIXES


def _probe_volume(path: Path, is_label: bool, full: bool
                  ) -> tuple[tuple[int, ...], tuple[float, ...], Optional[frozenset[int]]]:
    """Shape, spacing and (full check, labels) distinct values of one NIfTI volume; a full check decodes it and
    refuses non-integer label values."""
    if not full:
        return (*volume_shape(path), None)
    vol = read_volume(path)
    if not is_label:
        return vol.data.shape, vol.spacing, None
    if vol.data.dtype.kind == "f" and not np.all(vol.data == np.round(vol.data)):
        raise DataError(f"{path}: label volume holds non-integer values")
    return vol.data.shape, vol.spacing, frozenset(int(v) for v in np.unique(vol.data))


def _grid_problem(ref: Path, ref_name: str, ref_shape: tuple[int, ...], ref_sp: Optional[tuple[float, ...]],
                  path: Path, shape: tuple[int, ...], sp: Optional[tuple[float, ...]], where: str) -> Optional[str]:
    """Why ``path`` does not lie on the grid of ``ref`` (named ``ref_name`` in the message): its shape, then (volumes,
    which have a spacing) its voxel spacing and its affine; None when it does. ``where`` ends each message."""
    if shape != ref_shape:
        return f"shape {shape} differs from {ref_name} {ref_shape}{where}"
    if sp is None or ref_sp is None:  # 2D files: the shape is the grid
        return None
    if not np.allclose(sp, ref_sp, rtol=1e-3, atol=1e-5):
        return (f"voxel spacing {tuple(round(v, 4) for v in sp)} differs from {ref_name} "
                f"{tuple(round(v, 4) for v in ref_sp)}{where}")
    if not np.allclose(volume_affine(path), volume_affine(ref), rtol=1e-3, atol=1e-3):
        return (f"its affine (origin/orientation) differs from {ref_name}'s{where}: the label lies on another grid "
                "in space; resample it onto the image (same voxels, same affine)")
    return None


def _check_volume_pair(image: Path, mask: Optional[Path], spec: LabelSpec, full: bool) -> _Item:
    """Checks of one NIfTI image with its NIfTI label volume (folder layout, 3D runs): shape, spacing and affine
    agree; with ``full`` both decode and the labels are whole numbers of the declared values."""
    item = _Item()
    try:
        shape, spacing, _ = _probe_volume(image, False, full)
        item.size, item.channels = shape, 1
    except DataError as err:
        item.problems.append((str(image), _strip(err, image)))
        return item
    if mask is None:
        return item
    if not _is_nifti(mask):
        item.problems.append((str(mask), f"the image {image.name} is a NIfTI volume; its mask must be one too"))
        return item
    try:
        mshape, mspacing, vals = _probe_volume(mask, True, full)
        msg = _grid_problem(image, f"its image {image.name}", shape, spacing, mask, mshape, mspacing, "")
        if msg:
            item.problems.append((str(mask), msg))
        if vals is not None:
            msg = spec.problem(sorted(vals))
            if msg:
                item.problems.append((str(mask), msg))
            item.values, item.empty = vals, vals <= {0}
    except DataError as err:
        item.problems.append((str(mask), _strip(err, mask)))
    return item


def _check_2d_pair(image: Path, mask: Optional[Path], fov: Optional[Path], spec: LabelSpec,
                   in_channels: Optional[int], full: bool) -> _Item:
    """Checks of one image with its mask and FOV (2D files; NIfTI volumes go to :func:`_check_volume_pair`)."""
    if _is_nifti(image):
        return _check_volume_pair(image, mask, spec, full)
    item = _Item()
    try:
        if full:
            arr = load_image_array(image)
            c, h, w = arr.shape
        else:
            h, w, c = image_header(image)
        item.size, item.channels = (h, w), c
        msg = _channel_problem(c, in_channels)
        if msg:
            item.problems.append((str(image), msg))
    except DataError as err:
        item.problems.append((str(image), _strip(err, image)))
    for path, what in ((mask, "mask"), (fov, "field-of-view mask")):
        if path is None:
            continue
        try:
            if full:
                m = load_mask_array(path)
                msize: tuple[int, ...] = m.shape
                vals = _distinct(m)
                msg = spec.problem(sorted(vals)) if what == "mask" else fov_problem(vals)
                if msg:
                    item.problems.append((str(path), msg + lossy_hint(path)))
                if what == "mask":
                    item.values, item.empty = vals, vals <= {0}
            else:
                mh, mw, _ = image_header(path)
                msize = (mh, mw)
        except DataError as err:
            item.problems.append((str(path), _strip(err, path)))
            continue
        if item.size is not None and msize != item.size:
            item.problems.append((str(path), _size_msg(what, msize, image, item.size)))
    return item


def _strip(err: DataError, path: Path) -> str:
    """The message of an error raised for ``path`` without the leading ``path: ``."""
    text = str(err)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _add_items(report: DatasetReport, items: Iterable[_Item], *, key_values: bool) -> None:
    sizes, chans, values, empty = [], set(), set(), 0
    for it in items:
        report.problems.extend(it.problems)
        if it.size is not None:
            sizes.append(it.size)
        if it.channels is not None:
            chans.add(it.channels)
        values |= it.values
        empty += int(it.empty)
    if sizes:
        report.size_min = min(sizes, key=lambda s: (int(np.prod(s)), s))
        report.size_max = max(sizes, key=lambda s: (int(np.prod(s)), s))
    report.channels = sorted(chans)
    if report.full and key_values:
        report.label_values = sorted(values)
        report.counts["empty_masks"] = empty


def _check_split_ids(splits: Sequence[ResolvedSplit], known: set[str], where: str, report: DatasetReport) -> None:
    members: dict[str, set[str]] = {}
    for s in splits:
        target = str(s.file) if s.file is not None else s.source
        report.counts[f"split:{s.name}"] = len(s.ids)
        if not s.ids:
            report.problems.append((target, "empty split: no ids"))
        seen: set[str] = set()
        for line, sid in s.ids:
            at = f"line {line}: " if line else ""
            if sid in seen:
                report.problems.append((target, f"{at}id '{sid}' is listed twice"))
            elif sid not in known:
                report.problems.append((target, f"{at}id '{sid}' has no image in {where}"))
            seen.add(sid)
        members[s.name] = seen
    names = [s for s in members]
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            shared = sorted(members[a] & members[b])
            if shared:
                target = next(s for s in splits if s.name == b)
                example = ", ".join(shared[:3]) + (", ..." if len(shared) > 3 else "")
                report.problems.append((str(target.file) if target.file else target.source,
                                        f"{len(shared)} id(s) also in split '{a}' ({example}); a sample "
                                        "belongs to one split only"))


def _check_folder(index: FolderIndex, splits: Optional[Sequence[ResolvedSplit]], spec: LabelSpec,
                  in_channels: Optional[int], full: bool, workers: Optional[int], report: DatasetReport) -> None:
    report.counts.update(images=len(index.images), masks=len(index.masks))
    if index.fov is not None:
        report.counts["fov"] = len(index.fov)
    ignored = sum(len(v) for v in index.ignored.values())
    if ignored:
        report.counts["ignored_files"] = ignored
    report.problems.extend(index.problems)
    if splits is None:
        ids = sorted(index.images)
    else:
        _check_split_ids(splits, set(index.images), "images/", report)
        ids = sorted({i for s in splits for _, i in s.ids if i in index.images})
    jobs = []
    for i in ids:
        mask = index.masks.get(i)
        if mask is None and (index.root / "masks").is_dir():
            other = ", ".join(p.name for p in index.ignored.get(i, []))
            hint = f" (found {other}: not a supported image type)" if other else ""
            report.problems.append((str(index.images[i]), f"no mask for id '{i}': expected masks/{i}.png or "
                                                          f"another image suffix{hint}"))
        fov = None
        if index.fov is not None:
            fov = index.fov.get(i)
            if fov is None:
                report.problems.append((str(index.images[i]), f"no field-of-view mask for id '{i}' in fov/"))
        jobs.append((index.images[i], mask, fov))
    items = parallel_map(lambda j: _check_2d_pair(j[0], j[1], j[2], spec, in_channels, full), jobs, workers)
    _add_items(report, items, key_values=True)


def nnunet_label_spec(index: NnunetIndex, num_classes: Optional[int],
                      labels: Optional[Sequence[int]]) -> tuple[LabelSpec, list[Problem]]:
    """The label spec of an nnU-Net dataset: ``labels`` if given, else dataset.json's labels (by value).

    With dataset.json labels ``{background: 0, a: 1}`` K may be 1 (foreground channel) or 2; with n > 2 labels
    K must be n.

    Returns:
        The spec and a problem naming dataset.json when ``num_classes`` disagrees with it.
    """
    values = list(index.label_values.values())
    if labels is not None or not values:
        return LabelSpec.create(num_classes or 1, labels), []
    n = len(values)
    allowed = (1, 2) if n == 2 else (n,)
    if num_classes is not None and num_classes not in allowed:
        names = ", ".join(f"{k}={v}" for k, v in index.label_values.items())
        want = " or ".join(map(str, allowed))
        return LabelSpec.create(allowed[0], values), [
            (str(index.root / "dataset.json"), f"declares {n} labels ({names}) so data.num_classes must be "
                                               f"{want}; got {num_classes}")]
    k = allowed[0] if num_classes is None else num_classes
    return LabelSpec.create(k, values), []


def _probe(index: NnunetIndex, path: Path, is_label: bool, full: bool
           ) -> tuple[tuple[int, ...], Optional[tuple[float, ...]], int, Optional[frozenset[int]]]:
    """Shape, spacing (volumes), channel count and (full check, labels) distinct values of one case file."""
    if index.is_2d:
        if not full:
            h, w, c = image_header(path)
            return (h, w), None, c, None
        if is_label:
            m = load_mask_array(path)
            return m.shape, None, 1, _distinct(m)
        arr = load_image_array(path)
        return arr.shape[1:], None, arr.shape[0], None
    shape, spacing, vals = _probe_volume(path, is_label, full)
    return shape, spacing, 1, vals


def _check_case(index: NnunetIndex, case: str, chans: list[Path], label: Optional[Path], spec: LabelSpec,
                full: bool, labels_dir: str) -> _Item:
    """Checks of one nnU-Net case: channel files and label file agree in shape (and spacing) and decode."""
    item = _Item()
    shapes: list[tuple[Path, tuple[int, ...], Optional[tuple[float, ...]]]] = []
    n_chan = 0
    readable = True
    for p in chans + ([label] if label is not None else []):
        is_label = p is label
        try:
            shape, spacing, c, vals = _probe(index, p, is_label, full)
        except DataError as err:
            item.problems.append((str(p), _strip(err, p)))
            readable = False
            continue
        if not is_label:
            n_chan += c
        elif vals is not None:
            msg = spec.problem(sorted(vals))
            if msg:
                item.problems.append((str(p), msg))
            item.values, item.empty = vals, vals <= {spec.values[0] if spec.values else 0}
        shapes.append((p, shape, spacing))
    if label is None and labels_dir:
        item.problems.append((str(chans[0]), f"no label file {labels_dir}/{case}{index.file_ending}"))
    if shapes:
        ref_p, ref_shape, ref_sp = shapes[0]
        item.size, item.channels = ref_shape, n_chan
        for p, shape, sp in shapes[1:]:
            msg = _grid_problem(ref_p, ref_p.name, ref_shape, ref_sp, p, shape, sp, f" (case '{case}')")
            if msg:
                item.problems.append((str(p), msg))
    if index.is_2d and readable and index.channel_names and n_chan != len(index.channel_names):
        item.problems.append((str(chans[0]), f"case '{case}' has {n_chan} channel(s); dataset.json declares "
                                             f"{len(index.channel_names)}"))
    return item


def _check_nnunet(index: NnunetIndex, splits: Optional[Sequence[ResolvedSplit]], spec: LabelSpec,
                  in_channels: Optional[int], full: bool, workers: Optional[int], report: DatasetReport) -> None:
    report.counts.update(cases_train=len(index.train), labels_train=len(index.train_labels),
                         cases_test=len(index.test), labels_test=len(index.test_labels))
    report.problems.extend(index.problems)
    n_chan = len(index.channel_names)
    if in_channels is not None and n_chan and n_chan != in_channels:
        report.problems.append((str(index.root / "dataset.json"), f"declares {n_chan} channel(s) "
                                                                  f"({', '.join(index.channel_names)}); "
                                                                  f"data.in_channels={in_channels}"))
    jobs: list[tuple[str, list[Path], Optional[Path], str]] = []
    if splits is None:
        jobs += [(c, p, index.train_labels.get(c), "labelsTr") for c, p in sorted(index.train.items())]
        # test cases may come without labels (prediction only)
        jobs += [(c, p, index.test_labels.get(c), "labelsTs" if index.test_labels else "")
                 for c, p in sorted(index.test.items())]
    else:
        known = set(index.train) | set(index.test)
        _check_split_ids(splits, known, "imagesTr/ or imagesTs/", report)
        for c in sorted({i for s in splits for _, i in s.ids if i in known}):
            if c in index.train:
                jobs.append((c, index.train[c], index.train_labels.get(c), "labelsTr"))
            else:
                jobs.append((c, index.test[c], index.test_labels.get(c), "labelsTs"))
    items = parallel_map(lambda j: _check_case(index, j[0], j[1], j[2], spec, full, j[3]), jobs, workers)
    _add_items(report, items, key_values=True)


def check_index(
    index: Union[FolderIndex, NnunetIndex],
    splits: Optional[Sequence[ResolvedSplit]],
    spec: LabelSpec,
    *,
    in_channels: Optional[int] = None,
    full: bool = True,
    workers: Optional[int] = None,
    extra: Sequence[Problem] = (),
) -> DatasetReport:
    """Check an indexed dataset; the shared core of :func:`check_dataset` and ``build_dataset``.

    Args:
        index: the listed dataset.
        splits: resolved splits whose ids are checked (per-file checks cover only their files), or None for
            every file.
        spec: declared mask values.
        in_channels: expected image channels (None: not checked).
        full: decode pixels and check mask values (else headers only).
        workers: threads for decoding (default: available cores, at most 8).
        extra: problems found earlier (e.g. a missing split file), listed first.
    """
    report = DatasetReport(str(index.root), "folder" if isinstance(index, FolderIndex) else "nnunet", full=full)
    report.problems.extend(extra)
    if isinstance(index, FolderIndex):
        _check_folder(index, splits, spec, in_channels, full, workers, report)
    else:
        _check_nnunet(index, splits, spec, in_channels, full, workers, report)
    return report


def check_dataset(
    root: PathLike,
    *,
    num_classes: Optional[int] = None,
    labels: Optional[Sequence[int]] = None,
    splits: Optional[Sequence[str]] = None,
    in_channels: Optional[int] = None,
    full: bool = True,
    workers: Optional[int] = None,
) -> DatasetReport:
    """Validate a dataset folder (folder or nnU-Net raw layout) and list every problem with its file.

    Args:
        root: dataset folder.
        num_classes: K; None: dataset.json's labels for nnU-Net datasets, binary (K = 1) for folder datasets.
        labels: stored mask value of each class, background first (see :mod:`diffmis.data.labels`).
        splits: split names to check (their files and their ids' files); None: every ``splits/*.txt`` file and
            every file of the dataset (for nnU-Net also imagesTs cases, whose labels are optional).
        in_channels: expected image channel count (None: not checked).
        full: decode every file and check mask values (True) or read headers only (False).
        workers: threads used for decoding (default: available cores, at most 8).

    Returns:
        The report; ``report.ok`` is True when no problem was found.
    """
    try:
        layout = detect_layout(root)
    except DataError as err:
        return DatasetReport(str(root), "unknown", problems=[(str(root), _strip(err, Path(root)))], full=full)
    index: Union[FolderIndex, NnunetIndex] = index_folder(root) if layout == "folder" else index_nnunet(root)
    extra: list[Problem] = []
    if isinstance(index, FolderIndex):
        spec = LabelSpec.create(num_classes or 1, labels)
        if not index.splits and splits is None:
            extra.append((str(index.root / "splits"), "no split files: add splits/<name>.txt (one id per line)"))
    else:
        spec, extra = nnunet_label_spec(index, num_classes, labels)
    names = list(splits) if splits is not None else sorted(index.splits)
    resolved: list[ResolvedSplit] = []
    for name in names:
        try:
            resolved.append(resolve_split(index, name))
        except DataError as err:
            path = index.root / "splits" / f"{name}.txt"
            extra.append((str(path), _strip(err, path)))
    scope = resolved if splits is not None else None
    report = check_index(index, scope, spec, in_channels=in_channels, full=full, workers=workers, extra=extra)
    if splits is None and resolved:
        _check_split_ids(resolved, set(index.images) if isinstance(index, FolderIndex)
                         else set(index.train) | set(index.test),
                         "images/" if isinstance(index, FolderIndex) else "imagesTr/ or imagesTs/", report)
    return report
