"""Folder loader on the real datasets in ../shared/data (Kvasir-SEG, DRIVE); skipped where absent.

The location is ``<repo>/../shared/data`` or ``$DIFFMIS_SHARED_DATA``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from diffmis.config import AugmentConfig, DataConfig
from diffmis.data import build_dataset, check_dataset

pytestmark = pytest.mark.data

SHARED = Path(os.environ.get("DIFFMIS_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def _root(name: str) -> Path:
    root = SHARED / name
    if not (root / "images").is_dir():
        pytest.skip(f"{root} not present (set DIFFMIS_SHARED_DATA to the shared data folder)")
    return root


def test_kvasir_headers_and_resized_items() -> None:
    root = _root("kvasir-seg")
    report = check_dataset(root, full=False, in_channels=3)
    assert report.ok, report.summary()
    assert report.counts["split:train"] == 880 and report.counts["split:val"] == 120
    cfg = DataConfig(kind="folder", root=str(root), image_size=(96, 96), cache=False)
    ds = build_dataset(cfg, "val", train=False)
    assert len(ds) == 120
    item = ds[0]
    assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 96, 96) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0 and item["id"] == ds.ids[0]


def test_drive_native_patches_with_field_of_view() -> None:
    root = _root("drive")
    cfg = DataConfig(kind="folder", root=str(root), image_size=None, patch_size=(96, 96), val_split="test",
                     cache=False, augment=AugmentConfig(flip=True, rotate90=True, prob=0.5))
    train = build_dataset(cfg, "train", train=True)
    assert len(train) == 20
    train.set_item_seed(0)
    item = train[0]
    assert item["image"].shape == (3, 96, 96) and item["mask"].shape == item["fov"].shape == (1, 96, 96)
    assert item["fov"].mean() > 0.2  # the patch centre is drawn inside the (disc-shaped) field of view
    test = build_dataset(cfg, cfg.val_split, train=False)
    full = test[0]
    assert full["image"].shape == (3, 584, 565) and full["fov"].shape == (1, 584, 565)
    fraction = full["mask"].mean().item()
    assert 0.04 < fraction < 0.15  # vessels: ~9 % of the image, thin structures kept at native size
