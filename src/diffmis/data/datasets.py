"""Datasets: ``build_dataset(cfg, split, train=...)`` for folder, nnU-Net, built-in MNI and synthetic data.

Pipeline of one item::

    decode (+ resize to data.image_size: bilinear images, nearest masks)   <- cached when data.cache
    -> intensity normalisation (data.normalize)
    -> train only: random patch of data.patch_size (at the working resolution), augmentation
    -> {"image": (C,H,W) float32, "mask": (K,H,W) float32 one-hot, "id": str[, "fov": (1,H,W) float32]}

``data.image_size`` is the working resolution for training and evaluation alike; ``None`` keeps each image at
its native size (sliding-window prediction; batches then need equal sizes or batch size 1). With
``data.patch_size`` set, training items are random patches cut from the working-resolution image (DRIVE:
``image_size: null`` + ``patch_size: [128, 128]`` trains on native-resolution patches), evaluation items are
whole images.

Fail fast: ``build_dataset`` runs the quick dataset check (headers, pairing, splits; see
:mod:`diffmis.data.checks`) and raises one :class:`~diffmis.errors.DataError` listing every problem before
returning. With ``data.cache`` (default) it then decodes and resizes every item on a thread pool, keeping 8-bit
images as uint8, and again raises one DataError listing every file that fails to decode or holds undeclared mask
values: nothing can fail later in the run. Without the cache, items are decoded on access and such errors
surface when the bad item is read.

3D runs (``data.spatial_dims: 3``): each item is a whole volume ``(C, X, Y, Z)`` in voxel order (nnU-Net NIfTI
cases, or the built-in MNI slabs), resampled to ``data.spacing`` when set (MONAI ``Spacing``: trilinear
images, nearest labels) and cached; it is normalised as a whole; training items are random patches of
``data.patch_size`` (a share ``data.foreground_oversample`` centred on a foreground voxel, volumes smaller than
the patch padded) with 3D augmentation (:class:`~diffmis.data.transforms.Augmenter3D`).

2D runs: nnU-Net volumes are sliced along ``data.slice_axis`` in voxel order; each slice is one item with id
``<case>_s<NNNN>``, normalised on its own like a 2D image (as prediction does slice by slice).

Randomness: augmentation and patch positions draw from a numpy Generator. The training loop seeds it per item
through :meth:`SegmentationDataset.set_item_seed`; otherwise it is seeded from ``torch.initial_seed()``, which
DataLoader workers set from the loader's seed, so runs are reproducible given the experiment seed.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from diffmis.config import DataConfig
from diffmis.errors import ConfigError, DataError
from diffmis.masks import one_hot

from diffmis.data.checks import MAX_LISTED, check_index, nnunet_label_spec, parallel_map
from diffmis.data.io import NIFTI_SUFFIXES, load_image_array, load_mask_array, read_volume, split_suffix, volume_shape
from diffmis.data.labels import LabelSpec, fov_problem
from diffmis.data.layouts import (
    FolderIndex,
    NnunetIndex,
    detect_layout,
    index_folder,
    index_nnunet,
    resolve_split,
)
from diffmis.data.mni import CLASS_NAMES as MNI_CLASS_NAMES
from diffmis.data.mni import mni_slices, mni_volumes
from diffmis.data.synthetic import synthetic_sample
from diffmis.data.transforms import (
    Augmenter,
    Augmenter3D,
    NormalizeMode,
    normalize_intensity,
    random_patch,
    random_patch_3d,
    resample_volume,
    resize_image,
    resize_labels,
)

__all__ = ["SegmentationDataset", "build_dataset", "dataset_info", "SYNTHETIC_DEFAULT_SIZE"]

#: Raw item: image ``(C, H, W)`` (uint8/uint16/float32), class-index map ``(H, W)`` uint8, FOV ``(H, W)`` uint8
#: in {0, 1} or None.
Raw = tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]
Size = Optional[tuple[int, int]]

#: 3D training: at least this many random patches per epoch (every volume gives ``ceil(64 / volumes)``).
PATCHES_PER_EPOCH = 64

#: Image size of synthetic data when ``data.image_size`` is None.
SYNTHETIC_DEFAULT_SIZE = (64, 64)


class _Source:
    """Where raw items come from."""

    ids: list[str]

    def load(self, i: int) -> Raw:
        raise NotImplementedError

    def groups(self) -> list[list[int]]:
        """Index groups that are cheapest to load together (preloading)."""
        return [[i] for i in range(len(self.ids))]

    def load_group(self, group: list[int]) -> list[Raw]:
        return [self.load(i) for i in group]


class _FolderSource(_Source):
    """2D image files with masks (and FOVs): folder layout and 2D nnU-Net datasets."""

    def __init__(self, ids: list[str], images: list[list[Path]], masks: list[Path], fovs: list[Optional[Path]],
                 spec: LabelSpec, in_channels: int, size: Size) -> None:
        self.ids, self.images, self.masks, self.fovs = ids, images, masks, fovs
        self.spec, self.in_channels, self.size = spec, in_channels, size

    def load(self, i: int) -> Raw:
        files = self.images[i]
        parts = [load_image_array(p, self.size) for p in files]
        image = parts[0] if len(parts) == 1 else np.concatenate([p.astype(np.float32) for p in parts])
        if image.shape[0] == 1 and self.in_channels == 3:
            image = np.repeat(image, 3, axis=0)  # grey image in a colour dataset
        if image.shape[0] != self.in_channels:
            raise DataError(f"{files[0]}: image has {image.shape[0]} channel(s); data.in_channels={self.in_channels}")
        # values are checked at native size (a resize could drop a stray value), then resized
        labels = self._fit(self.spec.to_classes(load_mask_array(self.masks[i]), self.masks[i]), self.masks[i], image)
        fov_path = self.fovs[i]
        if fov_path is None:
            return image, labels, None
        fov = load_mask_array(fov_path)
        msg = fov_problem(np.unique(fov).tolist())
        if msg:
            raise DataError(f"{fov_path}: {msg}")
        return image, labels, self._fit((fov > 0).astype(np.uint8), fov_path, image)

    def _fit(self, arr: np.ndarray, path: Path, image: np.ndarray) -> np.ndarray:
        """Resize a map to the working size, or (native size) verify that it matches its image."""
        if self.size is not None:
            return resize_labels(arr, self.size)
        if arr.shape != image.shape[1:]:
            raise DataError(f"{path}: size {arr.shape[0]}x{arr.shape[1]} (HxW) differs from its image "
                            f"{image.shape[1]}x{image.shape[2]}")
        return arr


class _VolumeSource(_Source):
    """nnU-Net NIfTI cases, one item per slice along ``axis``; a small per-process cache of whole cases."""

    def __init__(self, cases: list[tuple[str, list[Path], Path, int]], spec: LabelSpec, axis: int,
                 size: Size) -> None:
        self.cases = {c: (chans, label) for c, chans, label, _ in cases}
        self.items = [(c, s) for c, _, _, n in cases for s in range(n)]
        self.ids = [f"{c}_s{s:04d}" for c, s in self.items]
        self.spec, self.axis, self.size = spec, axis, size
        self._recent: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()

    def _read_case(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``(C, X, Y, Z)`` image (stored integer dtype, or float32) and ``(X, Y, Z)`` uint8 class indices."""
        chans, label = self.cases[case]
        vols = [read_volume(p) for p in chans]
        lab = read_volume(label)
        for v in vols[1:] + [lab]:
            if v.data.shape != vols[0].data.shape:
                raise DataError(f"{v.path}: shape {v.data.shape} differs from {chans[0].name} {vols[0].data.shape}")
        image = np.stack([v.data.astype(np.float32) if v.data.dtype.kind == "f" else v.data for v in vols])
        data = lab.data
        if data.dtype.kind == "f":
            if not np.all(data == np.round(data)):
                raise DataError(f"{label}: label volume holds non-integer values")
            data = data.astype(np.int32)
        return image, self.spec.to_classes(data, label)

    def _case(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_read_case` through a cache of the two most recently used cases (uncached access)."""
        if case in self._recent:
            self._recent.move_to_end(case)
            return self._recent[case]
        self._recent[case] = self._read_case(case)
        while len(self._recent) > 2:
            self._recent.popitem(last=False)
        return self._recent[case]

    def _slice(self, image: np.ndarray, labels: np.ndarray, s: int) -> Raw:
        img = np.ascontiguousarray(np.take(image, s, axis=self.axis + 1))
        lab = np.ascontiguousarray(np.take(labels, s, axis=self.axis))
        if self.size is not None and lab.shape != tuple(self.size):
            img, lab = resize_image(img, self.size), resize_labels(lab, self.size)
        return img, lab, None

    def load(self, i: int) -> Raw:
        case, s = self.items[i]
        image, labels = self._case(case)
        return self._slice(image, labels, s)

    def groups(self) -> list[list[int]]:
        by_case: dict[str, list[int]] = {}
        for i, (case, _) in enumerate(self.items):
            by_case.setdefault(case, []).append(i)
        return list(by_case.values())

    def load_group(self, group: list[int]) -> list[Raw]:
        image, labels = self._read_case(self.items[group[0]][0])  # no shared state: safe on a thread pool
        return [self._slice(image, labels, self.items[i][1]) for i in group]


class _Volume3DSource(_VolumeSource):
    """nnU-Net NIfTI cases as whole volumes (3D runs), resampled to ``spacing`` when given."""

    def __init__(self, cases: list[tuple[str, list[Path], Path]], spec: LabelSpec,
                 spacing: Optional[Sequence[float]]) -> None:
        self.cases = {c: (chans, label) for c, chans, label in cases}
        self.ids = [c for c, _, _ in cases]
        self.spec, self.target = spec, None if spacing is None else tuple(float(v) for v in spacing)

    def load(self, i: int) -> Raw:
        case = self.ids[i]
        image, labels = self._read_case(case)
        if self.target is not None:
            spacing = volume_shape(self.cases[case][1])[1]
            image, labels = resample_volume(image, labels, spacing, self.target)
        return image, labels, None

    def groups(self) -> list[list[int]]:
        return [[i] for i in range(len(self.ids))]

    def load_group(self, group: list[int]) -> list[Raw]:
        return [self.load(i) for i in group]


class _ArraySource(_Source):
    """In-memory images and class-index maps (built-in MNI slices)."""

    def __init__(self, ids: list[str], images: np.ndarray, labels: np.ndarray, size: Size) -> None:
        self.ids, self.images, self.labels, self.size = ids, images, labels, size

    def load(self, i: int) -> Raw:
        image, labels = self.images[i][None], self.labels[i]
        if self.size is not None and labels.shape != tuple(self.size):
            image, labels = resize_image(image, self.size), resize_labels(labels, self.size)
        return image, labels, None


class _SyntheticSource(_Source):
    """Synthetic shapes generated from ``(seed, split, index)``."""

    def __init__(self, split_code: int, n: int, size: tuple[int, int], num_classes: int, channels: int,
                 seed: int, split: str) -> None:
        self.ids = [f"synth_{split}_{i:04d}" for i in range(n)]
        self.split_code, self.size, self.seed = split_code, size, seed
        self.num_classes, self.channels = num_classes, channels

    def load(self, i: int) -> Raw:
        image, labels = synthetic_sample(self.size, self.num_classes, self.channels, (self.seed, self.split_code, i))
        return image, labels, None


def _raise_all(root: str, messages: Sequence[str]) -> None:
    if not messages:
        return
    listed = [f"  {m}" for m in messages[:MAX_LISTED]]
    if len(messages) > MAX_LISTED:
        listed.append(f"  ... and {len(messages) - MAX_LISTED} more (run `diffmis data check {root}`)")
    raise DataError(f"dataset {root} has {len(messages)} problem(s):\n" + "\n".join(listed))


class SegmentationDataset(torch.utils.data.Dataset):
    """Map-style dataset of segmentation items (see the module docstring for the pipeline).

    Args:
        source: where raw items come from.
        num_classes: K of the one-hot masks.
        normalize: intensity normalisation mode (``data.normalize``).
        ct_window: window for ``ct_window`` normalisation.
        train: apply random patches and augmentation.
        patch_size: ``(ph, pw)`` of training patches, or None.
        augment: the augmentation, or None.
        cache: decode everything now (failing fast) and keep it in memory.
        root: dataset name used in error messages.
        workers: decoding threads for the cache (default: available cores, at most 8).
        spatial_dims: 3 for whole volumes (3D patches with ``foreground`` oversampling, padded when a volume
            is smaller than the patch).
        foreground: share of 3D training patches centred on a foreground voxel.
    """

    def __init__(self, source: _Source, *, num_classes: int, normalize: NormalizeMode, ct_window: tuple[float, float],
                 train: bool, patch_size: Size = None, augment: Optional[Augmenter] = None, cache: bool = True,
                 root: str = "<memory>", workers: Optional[int] = None, spatial_dims: int = 2,
                 foreground: float = 0.33) -> None:
        self.source = source
        self.spatial_dims, self.foreground = spatial_dims, foreground
        self.num_classes, self.normalize, self.ct_window = num_classes, normalize, ct_window
        self.train, self.patch_size = train, patch_size
        self.augment = augment if (augment is not None and augment.active) else None
        self._rng: Optional[np.random.Generator] = None
        self._rng_seed: Optional[int] = None
        self._cache: Optional[list[Raw]] = None
        if cache:
            self._cache = self._preload(root, workers)
            if train and patch_size is not None and spatial_dims == 2:  # every size known: a small image fails now
                small = [self._patch_problem(i, raw[1]) for i, raw in enumerate(self._cache)]
                _raise_all(root, [msg for msg in small if msg])

    def _preload(self, root: str, workers: Optional[int]) -> list[Raw]:
        groups = self.source.groups()

        def run(group: list[int]) -> Union[list[Raw], DataError]:
            try:
                return self.source.load_group(group)
            except DataError as err:
                return err

        results = parallel_map(run, groups, workers)
        _raise_all(root, [str(r) for r in results if isinstance(r, DataError)])
        out: list[Optional[Raw]] = [None] * len(self.source.ids)
        for group, raws in zip(groups, results):
            for i, raw in zip(group, raws):  # type: ignore[arg-type]
                out[i] = raw
        return out  # type: ignore[return-value]

    @property
    def ids(self) -> list[str]:
        """Item ids in index order."""
        return list(self.source.ids)

    def __len__(self) -> int:
        n = len(self.source.ids)
        if self.spatial_dims == 3 and self.train and self.patch_size is not None and n:
            return n * max(1, -(-PATCHES_PER_EPOCH // n))  # an epoch of random patches, each volume equally often
        return n

    def set_item_seed(self, seed: int) -> None:
        """Seed the generator used for the next item(s) (the training loop calls this per item)."""
        self._rng = np.random.default_rng(seed)
        self._rng_seed = torch.initial_seed()

    def _generator(self) -> np.random.Generator:
        seed = torch.initial_seed()
        if self._rng is None or self._rng_seed != seed:  # a new process (DataLoader worker) or a reseed
            self._rng, self._rng_seed = np.random.default_rng(seed), seed
        return self._rng

    def raw(self, i: int) -> Raw:
        """Decoded (and resized) item before normalisation: ``(image, class-index map, fov or None)``."""
        return self._cache[i] if self._cache is not None else self.source.load(i)

    def _patch_problem(self, i: int, labels: np.ndarray) -> Optional[str]:
        """A message when item ``i`` is smaller than ``patch_size`` (padding would train on invented background)."""
        assert self.patch_size is not None
        h, w = labels.shape[-2:]
        if h < self.patch_size[0] or w < self.patch_size[1]:
            return (f"{self.source.ids[i]}: the image is {h}x{w}, smaller than data.patch_size="
                    f"{list(self.patch_size)}; use a smaller data.patch_size, or data.image_size to resize every "
                    "image first")
        return None

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = i % len(self.source.ids)  # 3D training: several patches per volume and epoch
        image, labels, fov = self.raw(i)
        img = normalize_intensity(image, self.normalize, self.ct_window)
        if self.spatial_dims == 3:
            return self._item_3d(i, img, labels)
        if self.train and self.patch_size is not None:
            msg = self._patch_problem(i, labels)  # uncached datasets: checked as each item is read
            if msg:
                raise DataError(msg)
            img, labels, fov = random_patch(img, labels, fov, self.patch_size, self._generator())
        image_t = torch.from_numpy(np.ascontiguousarray(img))
        fov_t = None if fov is None else torch.from_numpy(fov.astype(np.float32))
        if self.train and self.augment is not None:
            image_t, labels_t, fov_t = self.augment(image_t, torch.from_numpy(labels.astype(np.int64)), fov_t,
                                                    self._generator())
            labels = labels_t.numpy()
        out: dict[str, Any] = {"image": image_t, "mask": one_hot(labels, self.num_classes, dim=0), "id": self.source.ids[i]}
        if fov_t is not None:
            out["fov"] = fov_t.unsqueeze(0)
        return out


    def _item_3d(self, i: int, img: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        if self.train and self.patch_size is not None:
            img, labels = random_patch_3d(img, labels, self.patch_size, self._generator(), self.foreground)
        image_t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
        if self.train and self.augment is not None:
            image_t, labels_t, _ = self.augment(image_t, torch.from_numpy(labels.astype(np.int64)), None,
                                                self._generator())
            labels = labels_t.numpy()
        return {"image": image_t, "mask": one_hot(labels, self.num_classes, dim=0), "id": self.source.ids[i]}


def _canonical_split(cfg: DataConfig, split: str) -> str:
    names = {cfg.train_split: "train", cfg.val_split: "val", cfg.test_split: "test"}
    if split not in names:
        raise DataError(f"data.kind={cfg.kind}: unknown split '{split}'; available: {', '.join(names)}")
    return names[split]


def _root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise ConfigError(f"data.root is required for data.kind={cfg.kind}")
    root = Path(cfg.root).expanduser()
    layout = detect_layout(root)
    if layout != cfg.kind:
        raise DataError(f"{root}: data.kind={cfg.kind} but the folder has the {layout} layout; set data.kind={layout}")
    return root


def _check_patch(cfg: DataConfig) -> None:
    if cfg.patch_size is not None and cfg.image_size is not None:
        if cfg.patch_size[0] > cfg.image_size[0] or cfg.patch_size[1] > cfg.image_size[1]:
            raise ConfigError(f"data.patch_size={list(cfg.patch_size)} exceeds data.image_size="
                              f"{list(cfg.image_size)}; patches are cut after resizing (set data.image_size: "
                              "null to cut them at native resolution)")


def _mni_spec(cfg: DataConfig) -> None:
    if cfg.in_channels != 1 or cfg.num_classes != 3 or cfg.labels not in (None, [0, 1, 2]):
        raise ConfigError(f"data.kind=mni has 1 channel and 3 classes (background, grey matter, white matter); "
                          f"set data.in_channels=1 and data.num_classes=3 (got {cfg.in_channels} and "
                          f"{cfg.num_classes}{', labels ' + str(cfg.labels) if cfg.labels is not None else ''})")


def _folder_source(cfg: DataConfig, split: str) -> tuple[_Source, str]:
    root = _root(cfg)
    index: Union[FolderIndex, NnunetIndex] = index_folder(root) if cfg.kind == "folder" else index_nnunet(root)
    extra = []
    if isinstance(index, NnunetIndex):
        spec, extra = nnunet_label_spec(index, cfg.num_classes, cfg.labels)
    else:
        spec = LabelSpec.create(cfg.num_classes, cfg.labels)
    resolved = resolve_split(index, split, train_split=cfg.train_split, val_split=cfg.val_split,
                             test_split=cfg.test_split, val_fraction=cfg.val_fraction)
    report = check_index(index, [resolved], spec, in_channels=cfg.in_channels, full=False, extra=extra)
    if not report.ok:
        raise report.error()
    ids = [i for _, i in resolved.ids]
    if isinstance(index, FolderIndex):
        nifti = [i for i in ids if split_suffix(index.images[i].name)[1] in NIFTI_SUFFIXES]
        if cfg.spatial_dims == 3:
            flat = [i for i in ids if i not in set(nifti)]
            if flat:
                raise DataError(f"{root}: data.spatial_dims=3 reads NIfTI volumes; {len(flat)} image(s) are 2D files, "
                                f"e.g. {index.images[flat[0]].name}")
            return _Volume3DSource([(i, [index.images[i]], index.masks[i]) for i in ids], spec, cfg.spacing), str(root)
        if nifti:
            raise DataError(f"{root}: images/ holds NIfTI volumes (e.g. {index.images[nifti[0]].name}); train on them "
                            "in 3D with data.spatial_dims=3, or slice by slice from the nnU-Net raw layout")
        fovs = [index.fov.get(i) if index.fov is not None else None for i in ids]
        return _FolderSource(ids, [[index.images[i]] for i in ids], [index.masks[i] for i in ids], fovs, spec,
                             cfg.in_channels, cfg.image_size), str(root)
    pairs = [(c, index.train[c], index.train_labels[c]) if c in index.train
             else (c, index.test[c], index.test_labels[c]) for c in ids]
    if cfg.spatial_dims == 3:
        if index.is_2d:
            raise ConfigError(f"{root} holds 2D images ({index.file_ending}); data.spatial_dims=3 needs NIfTI volumes")
        return _Volume3DSource(pairs, spec, cfg.spacing), str(root)
    if index.is_2d:
        return _FolderSource(ids, [p[1] for p in pairs], [p[2] for p in pairs], [None] * len(ids), spec,
                             cfg.in_channels, cfg.image_size), str(root)
    cases = [(c, chans, label, volume_shape(label)[0][cfg.slice_axis]) for c, chans, label in pairs]
    return _VolumeSource(cases, spec, cfg.slice_axis, cfg.image_size), str(root)


def build_dataset(cfg: DataConfig, split: str, *, train: bool) -> SegmentationDataset:
    """Build the dataset of one split.

    Args:
        cfg: the ``data`` section of the config.
        split: split name, e.g. ``cfg.train_split`` (folder: ``splits/<split>.txt``; see
            :func:`diffmis.data.layouts.resolve_split` for nnU-Net and ``data.val_fraction``; built-in kinds:
            the names of ``cfg.train_split``/``val_split``/``test_split``).
        train: random patches (``patch_size``) and augmentation (``augment``) on; off for evaluation.

    Returns:
        A dataset whose items are ``{"image": (C, H, W) float32, "mask": (K, H, W) float32 one-hot in {0, 1},
        "id": str}`` plus ``"fov": (1, H, W)`` float32 in {0, 1} where the dataset has field-of-view masks.
        ``C = data.in_channels``, ``K = data.num_classes``; ``(H, W)`` is ``patch_size`` (training with
        patches), ``image_size``, or the native size when ``image_size`` is None.

    Raises:
        ConfigError: inconsistent ``data`` settings (labels, patch larger than image, built-in set mismatch).
        DataError: the split is missing or the dataset fails its checks; the message lists every problem.
    """
    LabelSpec.create(cfg.num_classes, cfg.labels)
    _check_patch(cfg)
    root = f"<{cfg.kind}>"
    source: _Source
    if cfg.kind == "synthetic":
        name = _canonical_split(cfg, split)
        code = ("train", "val", "test").index(name)
        n = (cfg.synthetic.n_train, cfg.synthetic.n_val, cfg.synthetic.n_test)[code]
        size = cfg.image_size or SYNTHETIC_DEFAULT_SIZE
        source = _SyntheticSource(code, n, size, cfg.num_classes, cfg.in_channels, cfg.synthetic.seed, name)
    elif cfg.kind == "mni" and cfg.spatial_dims == 3:
        _mni_spec(cfg)
        name = _canonical_split(cfg, split)
        vols = mni_volumes()
        idx = list(vols.splits[name])
        images, labels = vols.images[idx], vols.labels[idx]
        if cfg.spacing is not None:
            pairs = [resample_volume(im[None], lab, vols.spacing, cfg.spacing) for im, lab in zip(images, labels)]
            images, labels = np.stack([p[0][0] for p in pairs]), np.stack([p[1] for p in pairs])
        source = _ArraySource([vols.ids[i] for i in idx], images, labels, None)
    elif cfg.kind == "mni":
        _mni_spec(cfg)
        name = _canonical_split(cfg, split)
        data = mni_slices()
        idx = list(data.splits[name])
        source = _ArraySource([data.ids[i] for i in idx], data.images[idx], data.labels[idx], cfg.image_size)
    else:
        source, root = _folder_source(cfg, split)
    augment: Any = None
    if train:
        augment = Augmenter3D(cfg.augment) if cfg.spatial_dims == 3 else Augmenter(cfg.augment)
    return SegmentationDataset(source, num_classes=cfg.num_classes, normalize=cfg.normalize,
                               ct_window=cfg.ct_window, train=train, patch_size=cfg.patch_size if train else None,
                               augment=augment, cache=cfg.cache, root=root,
                               workers=cfg.num_workers or None, spatial_dims=cfg.spatial_dims,
                               foreground=cfg.foreground_oversample)


def dataset_info(cfg: DataConfig) -> dict[str, Any]:
    """What the config's dataset holds, from listings only (no decoding); JSON-friendly.

    Returns:
        ``kind``, ``root``, ``in_channels``, ``num_classes``, ``class_names`` (background first; K + 1 names for
        K = 1), ``label_values`` (stored mask value per class or None for the defaults), ``splits``
        (name -> item count; slices for nnU-Net volumes; splits that cannot be resolved are left out),
        ``image_size``, ``patch_size`` and ``has_fov``.
    """
    info: dict[str, Any] = {"kind": cfg.kind, "root": cfg.root, "in_channels": cfg.in_channels,
                            "num_classes": cfg.num_classes, "label_values": cfg.labels,
                            "image_size": list(cfg.image_size) if cfg.image_size else None,
                            "patch_size": list(cfg.patch_size) if cfg.patch_size else None, "has_fov": False,
                            "spatial_dims": cfg.spatial_dims}
    default_names = ["background"] + (["foreground"] if cfg.num_classes == 1
                                      else [f"class {k}" for k in range(1, cfg.num_classes)])
    info["class_names"] = default_names
    names = [cfg.train_split, cfg.val_split, cfg.test_split]
    splits: dict[str, int] = {}
    if cfg.kind == "synthetic":
        s = cfg.synthetic
        splits = dict(zip(names, (s.n_train, s.n_val, s.n_test)))
    elif cfg.kind == "mni":
        data = mni_volumes() if cfg.spatial_dims == 3 else mni_slices()
        splits = {n: len(data.splits[c]) for n, c in zip(names, ("train", "val", "test"))}
        info["class_names"] = list(MNI_CLASS_NAMES)
    else:
        root = _root(cfg)
        index: Union[FolderIndex, NnunetIndex] = index_folder(root) if cfg.kind == "folder" else index_nnunet(root)
        for name in names:
            try:
                r = resolve_split(index, name, train_split=cfg.train_split, val_split=cfg.val_split,
                                  test_split=cfg.test_split, val_fraction=cfg.val_fraction)
            except DataError:
                continue
            if isinstance(index, NnunetIndex) and not index.is_2d and cfg.spatial_dims == 2:
                splits[name] = sum(volume_shape(index.train[c][0] if c in index.train else index.test[c][0])[0]
                                   [cfg.slice_axis] for _, c in r.ids if c in index.train or c in index.test)
            else:
                splits[name] = len(r.ids)
        if isinstance(index, FolderIndex):
            info["has_fov"] = index.fov is not None
        elif index.label_values:
            info["class_names"] = list(index.label_values)
            info["label_values"] = list(index.label_values.values())
    info["splits"] = splits
    return info
