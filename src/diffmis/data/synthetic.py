"""Synthetic segmentation data: textured ellipses and polygons on a smooth noisy background.

Each sample is a pure function of its seed. Class k (1..K-1) has its own mean intensity, colour tint and stripe
texture, so a network can learn the task in a few hundred steps; the background carries a smooth multiplicative
bias field and Gaussian noise. Binary tasks (K = 1) draw shapes of one foreground class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
from diffmis.errors import DataError
from diffmis.utils import atomic_write_text
from PIL import Image, ImageDraw

__all__ = ["synthetic_sample", "write_synthetic", "SPLIT_FRACTIONS"]

#: Fractions of ``n`` written to the train / val / test split files by :func:`write_synthetic`.
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int, value: int) -> None:
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    r = min(h, w) * rng.uniform(0.08, 0.22, size=2)
    if rng.random() < 0.5:
        draw.ellipse([cx - r[1], cy - r[0], cx + r[1], cy + r[0]], fill=value)
        return
    n = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
    radii = rng.uniform(0.6, 1.0, size=n)
    pts = [(float(cx + r[1] * q * np.cos(a)), float(cy + r[0] * q * np.sin(a))) for a, q in zip(angles, radii)]
    draw.polygon(pts, fill=value)


def synthetic_sample(
    size: tuple[int, int], num_classes: int, channels: int, seed: Union[int, Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one image and its label map.

    Args:
        size: ``(H, W)``.
        num_classes: K; 1 = binary (label map {0, 1}), K >= 2 = label map 0..K-1.
        channels: image channels C (any >= 1; 1 = grey, 3 = colour).
        seed: integer or sequence of integers (e.g. ``(seed, split, index)``).

    Returns:
        ``image`` ``(C, H, W)`` uint8 in 0..255 and ``labels`` ``(H, W)`` uint8 class indices.
    """
    if channels < 1 or num_classes < 1:
        raise DataError(f"synthetic data needs channels >= 1 and num_classes >= 1; got {channels}, {num_classes}")
    h, w = int(size[0]), int(size[1])
    rng = np.random.default_rng(seed)
    k = max(2, num_classes)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for cls in range(1, k):
        for _ in range(int(rng.integers(1, 3))):
            _draw_shape(draw, rng, h, w, cls)
    labels = np.asarray(canvas).copy()

    levels = np.linspace(60.0, 200.0, k)
    tint = np.ones((k, channels)) if channels == 1 else rng.uniform(0.75, 1.25, size=(k, channels))
    tint[0] = 1.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    freq = rng.uniform(0.15, 0.35, size=k)
    theta = rng.uniform(0, np.pi, size=k)
    stripes = np.sin(freq[labels] * (xx * np.cos(theta[labels]) + yy * np.sin(theta[labels])))
    stripes *= np.where(labels > 0, 18.0, 6.0)
    coarse = rng.normal(size=(4, 4)).astype(np.float32)
    bias = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))
    base = levels[labels] * (1.0 + 0.12 * bias) + stripes
    image = np.empty((channels, h, w), dtype=np.float32)
    for c in range(channels):
        image[c] = base * tint[labels, c] + rng.normal(0.0, 10.0, size=(h, w))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


def _split_counts(n: int) -> tuple[int, int, int]:
    if n < 3:
        return n, 0, 0
    n_val = max(1, round(SPLIT_FRACTIONS[1] * n))
    n_test = max(1, round(SPLIT_FRACTIONS[2] * n))
    return n - n_val - n_test, n_val, n_test


def write_synthetic(
    out_dir: Union[str, Path],
    n: int,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 1,
    channels: int = 3,
    seed: int = 0,
) -> Path:
    """Write ``n`` synthetic samples in the folder layout.

    Files: ``images/synth_NNNN.png`` (grey or RGB), ``masks/synth_NNNN.png`` ({0, 255} for K = 1, class index
    0..K-1 for K >= 2) and ``splits/{train,val,test}.txt`` (:data:`SPLIT_FRACTIONS` of ``n``, in id order;
    at least one id in val and test when ``n >= 3``).

    Args:
        out_dir: folder to create or fill.
        n: number of samples (>= 1).
        size: ``(H, W)``.
        num_classes: K.
        channels: 1 or 3 (PNG).
        seed: sample ``i`` uses seed ``(seed, i)``.

    Returns:
        ``out_dir`` as a Path.
    """
    if channels not in (1, 3):
        raise DataError(f"write_synthetic: PNG files hold 1 or 3 channels; got channels={channels}")
    if n < 1:
        raise DataError(f"write_synthetic: n must be >= 1; got {n}")
    root = Path(out_dir)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"synth_{i:04d}" for i in range(n)]
    for i, sid in enumerate(ids):
        image, labels = synthetic_sample(size, num_classes, channels, (seed, i))
        Image.fromarray(image[0] if channels == 1 else image.transpose(1, 2, 0)).save(root / "images" / f"{sid}.png")
        mask = labels * 255 if num_classes == 1 else labels
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{sid}.png")
    n_train, n_val, _ = _split_counts(n)
    parts = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
    for name, part in parts.items():
        if part:
            atomic_write_text(root / "splits" / f"{name}.txt", "".join(f"{i}\n" for i in part))
    return root
