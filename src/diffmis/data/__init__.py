"""Datasets, transforms and dataset checks (layer 4).

Public API:

- :func:`build_dataset` ``(cfg: DataConfig, split, *, train) -> SegmentationDataset`` yielding
  ``{"image": (C,H,W) float32, "mask": (K,H,W) float32 one-hot, "id": str[, "fov": (1,H,W)]}``.
- :func:`check_dataset` ``(root, *, num_classes, labels, splits, in_channels, full) -> DatasetReport``.
- :func:`dataset_info` ``(cfg) -> dict``.
- :func:`read_image` ``(path) -> (C,H,W) float32``, :func:`read_mask` ``(path) -> (H,W) int64``,
  :func:`read_label_map` ``(path) -> (labels, spacing)`` for 2D and NIfTI label maps; file suffixes and stems
  (:data:`IMAGE_SUFFIXES`, :data:`NIFTI_SUFFIXES`, :data:`LABEL_SUFFIXES`, :func:`split_suffix`, :func:`file_stem`).
- NIfTI: :func:`read_volume`, :func:`write_volume_like` (predictions back onto the input's affine/header).
- Built-in data: :func:`write_mni` (MNI152 grey/white matter), :func:`write_synthetic`, :func:`synthetic_sample`.
- Transforms: :func:`resize_image`, :func:`resize_labels`, :func:`normalize_intensity`, :class:`Augmenter`.
"""

from diffmis.data.checks import DatasetReport, check_dataset
from diffmis.data.datasets import SegmentationDataset, build_dataset, dataset_info
from diffmis.data.io import (IMAGE_SUFFIXES, LABEL_SUFFIXES, NIFTI_SUFFIXES, file_stem, read_image, read_label_map,
                             read_mask, read_volume, split_suffix, volume_shape, write_volume_like)
from diffmis.data.labels import LabelSpec
from diffmis.data.mni import write_mni, write_mni3d
from diffmis.data.synthetic import synthetic_sample, write_synthetic
from diffmis.data.transforms import Augmenter, normalize_intensity, resize_image, resize_labels

__all__ = [
    "build_dataset",
    "check_dataset",
    "dataset_info",
    "DatasetReport",
    "SegmentationDataset",
    "LabelSpec",
    "read_image",
    "read_mask",
    "read_label_map",
    "file_stem",
    "split_suffix",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "LABEL_SUFFIXES",
    "read_volume",
    "volume_shape",
    "write_volume_like",
    "write_mni",
    "write_mni3d",
    "write_synthetic",
    "synthetic_sample",
    "Augmenter",
    "normalize_intensity",
    "resize_image",
    "resize_labels",
]
