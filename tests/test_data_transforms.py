"""Transforms: nearest resizing keeps labels, patches, aligned augmentation, seeding, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmis.config import AugmentConfig, ConfigError, DataConfig
from diffmis.data import Augmenter, build_dataset, normalize_intensity, resize_image, resize_labels
from diffmis.data.transforms import random_patch


def test_nearest_resize_keeps_label_values_and_bilinear_keeps_dtype() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 3, 7], np.uint8), size=(37, 53))
    for size in ((16, 20), (90, 64)):
        out = resize_labels(labels, size)
        assert out.shape == size and out.dtype == np.uint8 and set(np.unique(out)) <= {0, 3, 7}
    wide = resize_labels(labels.astype(np.int32) * 1000, (20, 20))
    assert wide.dtype == np.int32 and set(np.unique(wide)) <= {0, 3000, 7000}
    img = rng.integers(0, 256, size=(3, 37, 53), dtype=np.uint8)
    assert resize_image(img, (16, 16)).dtype == np.uint8 and resize_image(img, (16, 16)).shape == (3, 16, 16)
    multi = rng.normal(size=(5, 37, 53)).astype(np.float32)
    assert resize_image(multi, (10, 12)).shape == (5, 10, 12)


def test_normalisation_modes() -> None:
    x = np.random.default_rng(1).normal(50, 30, size=(2, 16, 16)).astype(np.float32)
    mm = normalize_intensity(x, "minmax")
    assert mm.min() == 0.0 and mm.max() == pytest.approx(1.0)
    z = normalize_intensity(x, "zscore")
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(1, 2)), 1.0, atol=1e-4)
    ct = normalize_intensity(np.array([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]]), "ct_window", (-160, 240))
    np.testing.assert_allclose(ct[0, 0], [0.0, 0.0, 0.5, 1.0, 1.0])
    assert not normalize_intensity(np.full((1, 4, 4), 9.0), "minmax").any()


def test_random_patch_size_padding_and_fov() -> None:
    rng = np.random.default_rng(0)
    img, lab = np.ones((3, 40, 50), np.float32), np.ones((40, 50), np.uint8)
    fov = np.zeros((40, 50), np.uint8)
    fov[30:, 40:] = 1
    for _ in range(5):
        pi, pl, pf = random_patch(img, lab, fov, (16, 16), rng)
        assert pi.shape == (3, 16, 16) and pl.shape == pf.shape == (16, 16) and pf.any()
    pi, pl, pf = random_patch(img, lab, None, (48, 64), rng)  # larger than the image: zero padding
    assert pi.shape == (3, 48, 64) and pf is None and pl.sum() == 40 * 50


def _square_sample() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = torch.zeros(32, 32, dtype=torch.long)
    labels[4:14, 6:20] = 1  # off-centre block: every flip/rotation moves it
    return labels[None].float().repeat(3, 1, 1), labels, labels.float()


@pytest.mark.parametrize("aug", [dict(flip=True), dict(rotate90=True),
                                 dict(rotate_degrees=30.0, scale_range=0.2, affine=True)])
def test_augmentation_moves_image_mask_and_fov_together(aug: dict) -> None:
    image, labels, fov = _square_sample()
    augment = Augmenter(AugmentConfig(prob=1.0, **aug))
    moved = 0
    for seed in range(6):
        im, lab, fv = augment(image, labels, fov, np.random.default_rng(seed))
        assert im.shape == image.shape and lab.dtype == torch.long and fv is not None
        assert torch.equal(lab.float(), fv)  # nearest for both: identical geometry
        inside, outside = im[0][lab == 1], im[0][lab == 0]
        assert inside.mean() > 0.85 and outside.mean() < 0.15  # image content follows the mask
        moved += int(not torch.equal(lab, labels))
    assert moved >= 4


def test_flip_moves_both_exactly() -> None:
    image, labels, _ = _square_sample()
    augment = Augmenter(AugmentConfig(flip=True, prob=1.0))  # horizontal then vertical: a 180-degree turn
    im, lab, _ = augment(image, labels, None, np.random.default_rng(0))
    assert torch.equal(lab, labels.flip(-1).flip(-2)) and torch.equal(im, image.flip(-1).flip(-2))


def test_intensity_and_colour_jitter_leave_the_mask_alone() -> None:
    image, labels, _ = _square_sample()
    augment = Augmenter(AugmentConfig(intensity=0.2, color_jitter=0.3, prob=1.0))
    im, lab, _ = augment(image, labels, None, np.random.default_rng(3))
    assert torch.equal(lab, labels) and not torch.equal(im, image)


def test_training_items_are_reproducible_given_the_seed() -> None:
    cfg = DataConfig(kind="synthetic", in_channels=3, num_classes=1, image_size=(48, 48), patch_size=(32, 32),
                     augment=AugmentConfig(flip=True, rotate_degrees=20, intensity=0.1, prob=0.7))
    ds = build_dataset(cfg, "train", train=True)
    ds.set_item_seed(11)
    a = ds[2]
    ds.set_item_seed(11)
    b = ds[2]
    ds.set_item_seed(12)
    c = ds[2]
    assert a["image"].shape == (3, 32, 32) and a["mask"].shape == (1, 32, 32)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])
    val = build_dataset(cfg, "val", train=False)[0]  # evaluation: whole image, no randomness
    assert val["image"].shape == (3, 48, 48)


def test_patch_larger_than_image_size_is_a_config_error() -> None:
    cfg = DataConfig(kind="synthetic", image_size=(32, 32), patch_size=(48, 48))
    with pytest.raises(ConfigError, match="patch_size"):
        build_dataset(cfg, "train", train=True)
    with pytest.raises(ConfigError, match="data.labels"):
        build_dataset(DataConfig(kind="synthetic", num_classes=3, labels=[0, 1]), "train", train=True)


def test_dataloader_workers_are_seeded_from_the_loader_generator() -> None:
    cfg = DataConfig(kind="synthetic", in_channels=1, num_classes=1, image_size=(24, 24),
                     synthetic={"n_train": 4}, augment=AugmentConfig(flip=True, intensity=0.3, prob=0.5))
    ds = build_dataset(cfg, "train", train=True)

    def epoch(seed: int) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1,
                                             generator=torch.Generator().manual_seed(seed))
        return next(iter(loader))["image"]

    assert torch.equal(epoch(5), epoch(5)) and not torch.equal(epoch(5), epoch(6))
