"""Transforms: resizing, intensity normalisation, random patches, augmentation, one-hot masks.

Deterministic steps (resizing) work on numpy arrays through PIL, which is single-threaded per call and releases
the GIL, so a thread pool decodes and resizes a dataset in parallel without oversubscribing torch's threads.
Random steps draw every number from a caller-supplied :class:`numpy.random.Generator`, so an item is a pure
function of (stored data, generator state): seeding the generator makes augmentation reproducible. MONAI's
dictionary transforms would also work but carry MetaTensor overhead per call and keep their own random state;
the few operations needed here are short in plain numpy/torch.

Augmentation (``AugmentConfig``), each part applied independently with probability ``prob``:

- ``flip``: horizontal flip, then (independently) vertical flip.
- ``rotate90``: rotation by k x 90 degrees, k uniform in {1, 2, 3} (only k = 2 for non-square images, so the
  shape is kept).
- ``rotate_degrees`` > 0: rotation by an angle uniform in [-d, d].
- ``scale_range`` = s > 0: isotropic zoom by a factor uniform in [1 - s, 1 + s].
- ``affine``: shear uniform in [-0.1, 0.1] on each axis and translation up to 10 % of the size.
  Rotation, zoom, shear and translation are composed into one matrix and resampled once: bilinear for the image,
  nearest for the mask and the field of view, zero padding (background for masks, outside for the FOV).
- ``intensity`` = i > 0: ``x * c + b`` with c uniform in [1 - i, 1 + i] and b uniform in [-i, i] (after
  normalisation, so i is in units of the normalised range).
- ``color_jitter`` = j > 0 (images with more than one channel): saturation factor uniform in [1 - j, 1 + j]
  (blend with the channel mean), then a gain per channel uniform in [1 - j, 1 + j].
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffmis.config import AugmentConfig
from diffmis.errors import DataError
from PIL import Image

__all__ = [
    "resample_volume",
    "random_patch_3d",
    "Augmenter3D",
    "resize_image",
    "resize_labels",
    "normalize_intensity",
    "random_patch",
    "Augmenter",
    "NormalizeMode",
]

NormalizeMode = Literal["minmax", "zscore", "zscore_nonzero", "ct_window", "none"]


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a channel-first image with bilinear interpolation (antialiased when downscaling).

    Args:
        image: ``(C, H, W)`` array of any real dtype.
        size: target ``(H, W)``.

    Returns:
        ``(C, *size)`` array of the input dtype (integer dtypes are rounded and clipped to their range).
    """
    h, w = int(size[0]), int(size[1])
    if image.dtype == np.uint8 and image.shape[0] in (1, 3):
        pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        out = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR))
        return out[None] if out.ndim == 2 else np.ascontiguousarray(out.transpose(2, 0, 1))
    chans = [
        np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)).resize((w, h), Image.Resampling.BILINEAR))
        for c in image
    ]
    out_f = np.stack(chans)
    if image.dtype.kind in "iu":
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(out_f), info.min, info.max).astype(image.dtype)
    return out_f.astype(image.dtype, copy=False)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a label map with nearest-neighbour sampling, so no new label values appear.

    Args:
        labels: ``(H, W)`` integer array.
        size: target ``(H, W)``.

    Returns:
        ``size`` array of the input dtype.
    """
    h, w = int(size[0]), int(size[1])
    if labels.dtype == np.uint8:
        return np.asarray(Image.fromarray(labels).resize((w, h), Image.Resampling.NEAREST))
    pil = Image.fromarray(labels.astype(np.int32), mode="I")
    return np.asarray(pil.resize((w, h), Image.Resampling.NEAREST)).astype(labels.dtype)


def normalize_intensity(
    image: np.ndarray, mode: NormalizeMode, ct_window: tuple[float, float] = (-160.0, 240.0)
) -> np.ndarray:
    """Normalise intensities of one image or volume.

    Args:
        image: ``(C, ...)`` array of raw intensities (any spatial rank).
        mode: ``minmax``: ``(x - min) / (max - min)`` over all channels together (keeps colour balance) ->
            [0, 1]; ``zscore``: per channel ``(x - mean) / std`` -> mean 0, std 1; ``ct_window``: clip to
            ``ct_window`` (HU) and scale -> [0, 1]; ``none``: unchanged. Constant images become zeros.
        ct_window: ``(low, high)`` used by ``ct_window``.

    Returns:
        float32 array of the input's shape.
    """
    x = image.astype(np.float32, copy=True)
    if mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
        if hi > lo:
            x -= lo
            x *= 1.0 / (hi - lo)
        else:
            x[...] = 0.0
    elif mode == "zscore":
        axes = tuple(range(1, x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True)
        x -= mean
        x /= np.where(std > 1e-8, std, 1.0)
    elif mode == "zscore_nonzero":
        for c in range(x.shape[0]):  # statistics of the non-zero voxels; the zero background stays 0
            inside = x[c] != 0
            if inside.any():
                vals = x[c][inside]
                mean, std = float(vals.mean()), float(vals.std())
                x[c][inside] = (vals - mean) / (std if std > 1e-8 else 1.0)
    elif mode == "ct_window":
        lo, hi = float(ct_window[0]), float(ct_window[1])
        if hi <= lo:
            raise DataError(f"data.ct_window={ct_window}: the upper bound must exceed the lower one")
        np.clip(x, lo, hi, out=x)
        x -= lo
        x *= 1.0 / (hi - lo)
    elif mode != "none":
        raise DataError(f"unknown intensity normalisation '{mode}'")
    return x


def random_patch(
    image: np.ndarray,
    labels: np.ndarray,
    fov: Optional[np.ndarray],
    patch: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Cut one random patch out of an image and its label map (and field of view), at native resolution.

    Images smaller than the patch are zero-padded (background for labels, outside for the FOV). Where a field of
    view is given, the patch centre is drawn among FOV pixels, so patches rarely fall into the black border.

    Args:
        image: ``(C, H, W)`` float array (normalised).
        labels: ``(H, W)`` class-index map.
        fov: ``(H, W)`` {0, 1} field of view, or None.
        patch: ``(ph, pw)``.
        rng: random source.

    Returns:
        ``(C, ph, pw)``, ``(ph, pw)`` and ``(ph, pw)`` (or None) arrays.
    """
    ph, pw = int(patch[0]), int(patch[1])
    h, w = labels.shape
    pad_h, pad_w = max(0, ph - h), max(0, pw - w)
    if pad_h or pad_w:
        image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)))
        labels = np.pad(labels, ((0, pad_h), (0, pad_w)))
        fov = None if fov is None else np.pad(fov, ((0, pad_h), (0, pad_w)))
        h, w = labels.shape
    inside = None if fov is None else np.flatnonzero(fov)
    if inside is not None and inside.size:
        cy, cx = divmod(int(inside[rng.integers(inside.size)]), w)
        top = min(max(cy - ph // 2, 0), h - ph)
        left = min(max(cx - pw // 2, 0), w - pw)
    else:
        top = int(rng.integers(h - ph + 1))
        left = int(rng.integers(w - pw + 1))
    sl = (slice(top, top + ph), slice(left, left + pw))
    return image[(slice(None), *sl)], labels[sl], None if fov is None else fov[sl]


class Augmenter:
    """Random spatial and intensity augmentation applied identically to image, mask and field of view.

    Args:
        cfg: which augmentations are enabled and with which strength (see the module docstring).
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    @property
    def active(self) -> bool:
        """Whether any augmentation is enabled (and can fire: ``prob > 0``)."""
        c = self.cfg
        enabled = (c.flip or c.rotate90 or c.rotate_degrees > 0 or c.affine or c.scale_range > 0
                   or c.intensity > 0 or c.color_jitter > 0)
        return bool(enabled and c.prob > 0)

    def _fires(self, rng: np.random.Generator) -> bool:
        return bool(rng.random() < self.cfg.prob)

    def _affine_theta(self, h: int, w: int, rng: np.random.Generator) -> Optional[torch.Tensor]:
        """Output->input sampling matrix in ``affine_grid``'s normalised coordinates, or None for identity."""
        c = self.cfg
        m = np.eye(2)
        shift = np.zeros(2)
        used = False
        if c.rotate_degrees > 0 and self._fires(rng):
            a = np.deg2rad(rng.uniform(-c.rotate_degrees, c.rotate_degrees))
            m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ m
            used = True
        if c.scale_range > 0 and self._fires(rng):
            m = m / rng.uniform(1.0 - c.scale_range, 1.0 + c.scale_range)
            used = True
        if c.affine and self._fires(rng):
            sx, sy = rng.uniform(-0.1, 0.1, size=2)
            m = m @ np.array([[1.0, sx], [sy, 1.0]])
            shift = rng.uniform(-0.1, 0.1, size=2) * np.array([w, h])
            used = True
        if not used:
            return None
        half = np.array([w / 2.0, h / 2.0])  # pixel (x, y) offsets from the centre -> normalised coordinates
        theta = np.zeros((2, 3))
        theta[:, :2] = (m * half[None, :]) / half[:, None]
        theta[:, 2] = shift / half
        return torch.as_tensor(theta, dtype=torch.float32).unsqueeze(0)

    def __call__(
        self,
        image: torch.Tensor,
        labels: torch.Tensor,
        fov: Optional[torch.Tensor],
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Augment one sample.

        Args:
            image: ``(C, H, W)`` float32, normalised.
            labels: ``(H, W)`` int64 class indices.
            fov: ``(H, W)`` float32 {0, 1} or None.
            rng: random source (the only one used).

        Returns:
            The transformed ``(image, labels, fov)`` with the same shapes and dtypes.
        """
        c = self.cfg
        spatial = [labels.float()] + ([] if fov is None else [fov])
        masks = torch.stack(spatial)  # (1 or 2, H, W): label map and FOV move together
        if c.flip:
            for dim in (-1, -2):
                if self._fires(rng):
                    image, masks = image.flip(dim), masks.flip(dim)
        if c.rotate90 and self._fires(rng):
            k = int(rng.integers(1, 4)) if image.shape[-1] == image.shape[-2] else 2
            image, masks = torch.rot90(image, k, (-2, -1)), torch.rot90(masks, k, (-2, -1))
        theta = self._affine_theta(image.shape[-2], image.shape[-1], rng)
        if theta is not None:
            grid = F.affine_grid(theta, [1, 1, image.shape[-2], image.shape[-1]], align_corners=False)
            image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
            masks = F.grid_sample(masks[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
        if c.intensity > 0 and self._fires(rng):
            gain = rng.uniform(1.0 - c.intensity, 1.0 + c.intensity)
            bias = rng.uniform(-c.intensity, c.intensity)
            image = image * float(gain) + float(bias)
        if c.color_jitter > 0 and image.shape[0] > 1 and self._fires(rng):
            j = c.color_jitter
            mean = image.mean(dim=0, keepdim=True)
            image = mean + (image - mean) * float(rng.uniform(1.0 - j, 1.0 + j))
            gains = torch.as_tensor(rng.uniform(1.0 - j, 1.0 + j, size=image.shape[0]), dtype=image.dtype)
            image = image * gains[:, None, None]
        labels = masks[0].round().long()
        fov = None if fov is None else masks[1]
        return image.contiguous(), labels.contiguous(), None if fov is None else fov.contiguous()


# ======================================================================================================
# 3D: resampling to a voxel size, foreground-weighted patches, augmentation (MONAI transforms)
# ======================================================================================================


def resample_volume(image: np.ndarray, labels: Optional[np.ndarray], spacing: Sequence[float],
                    target: Sequence[float]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Resample a volume (and its label map) from voxel size ``spacing`` to ``target`` with MONAI's ``Spacing``.

    Args:
        image: ``(C, X, Y, Z)`` intensities (any real dtype).
        labels: ``(X, Y, Z)`` class indices, or None.
        spacing: the volume's voxel size (mm) along X, Y, Z.
        target: the wanted voxel size.

    Returns:
        ``(C, X', Y', Z')`` float32 (trilinear) and ``(X', Y', Z')`` uint8/int (nearest) on the same grid;
        the inputs themselves when the spacings already agree (to 1e-3 mm).
    """
    if np.allclose(spacing, target, atol=1e-3):
        return image, labels
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    affine = torch.diag(torch.tensor([*map(float, spacing), 1.0], dtype=torch.float64))
    img = Spacing(pixdim=tuple(target), mode="bilinear")(MetaTensor(torch.from_numpy(image.astype(np.float32)),
                                                                     affine=affine))
    out_img = np.ascontiguousarray(img.as_tensor().numpy())
    if labels is None:
        return out_img, None
    lab = Spacing(pixdim=tuple(target), mode="nearest")(MetaTensor(torch.from_numpy(labels[None].astype(np.float32)),
                                                                   affine=affine))
    out_lab = np.rint(lab.as_tensor().numpy()[0]).astype(labels.dtype)
    return out_img, np.ascontiguousarray(out_lab)


def random_patch_3d(image: np.ndarray, labels: np.ndarray, patch: Sequence[int], rng: np.random.Generator,
                    foreground: float) -> tuple[np.ndarray, np.ndarray]:
    """Cut one random ``patch`` out of a volume; with probability ``foreground`` it is centred on a random
    foreground voxel (nnU-Net's oversampling), else its position is uniform.

    A volume smaller than the patch along an axis is zero-padded at both ends of that axis (background for the
    labels), as sliding-window prediction pads it.

    Args:
        image: ``(C, X, Y, Z)`` float array (normalised).
        labels: ``(X, Y, Z)`` class-index map.
        patch: ``(px, py, pz)``.
        rng: random source.
        foreground: probability of a foreground-centred patch (volumes without foreground get a uniform one).

    Returns:
        ``(C, px, py, pz)`` and ``(px, py, pz)`` arrays.
    """
    patch = [int(p) for p in patch]
    extra = [max(0, p - d) for p, d in zip(patch, labels.shape)]
    if any(extra):
        pads = [(e // 2, e - e // 2) for e in extra]
        image = np.pad(image, [(0, 0)] + pads)
        labels = np.pad(labels, pads)
    shape = labels.shape
    centre = None
    if foreground > 0 and rng.random() < foreground:
        fg = np.flatnonzero(labels)
        if fg.size:
            centre = np.unravel_index(int(fg[rng.integers(fg.size)]), shape)
    if centre is None:
        starts = [int(rng.integers(d - p + 1)) for d, p in zip(shape, patch)]
    else:
        starts = [min(max(int(c) - p // 2, 0), d - p) for c, p, d in zip(centre, patch, shape)]
    sl = tuple(slice(a, a + p) for a, p in zip(starts, patch))
    return image[(slice(None), *sl)], labels[sl]


class Augmenter3D:
    """3D augmentation with MONAI's dictionary transforms, applied identically to the volume and its labels.

    ``AugmentConfig`` keys, each applied with probability ``prob``: ``flip`` (each axis independently),
    ``rotate90`` (k x 90 degrees in the X-Y plane, k in {1, 2, 3}; k = 2 where X != Y), ``rotate_degrees`` and
    ``scale_range`` (one random affine: rotations about the three axes uniform in [-d, d], zoom in [1 - s,
    1 + s]; trilinear for the image, nearest for the labels, zero padding), ``intensity`` (``x * c + b`` as in
    2D). ``affine`` (shear) and ``color_jitter`` are 2D-only and ignored here.

    Randomness: MONAI's own generators are reseeded from the caller's numpy Generator on every call, so an item
    is a pure function of (stored data, generator state), as in 2D.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        from monai.transforms import Compose, RandAffined, RandFlipd

        self.cfg = cfg
        keys = ("image", "label")
        parts: list = []
        if cfg.flip:
            parts += [RandFlipd(keys, prob=cfg.prob, spatial_axis=a) for a in range(3)]
        if cfg.rotate_degrees > 0 or cfg.scale_range > 0:
            r = float(np.deg2rad(cfg.rotate_degrees))
            parts.append(RandAffined(keys, prob=cfg.prob, rotate_range=(r, r, r) if r > 0 else None,
                                     scale_range=(cfg.scale_range,) * 3 if cfg.scale_range > 0 else None,
                                     mode=("bilinear", "nearest"), padding_mode="zeros"))
        self.spatial = Compose(parts) if parts else None

    @property
    def active(self) -> bool:
        """Whether any 3D augmentation is enabled (and can fire: ``prob > 0``)."""
        return bool((self.spatial is not None or self.cfg.rotate90 or self.cfg.intensity > 0) and self.cfg.prob > 0)

    def __call__(self, image: torch.Tensor, labels: torch.Tensor, fov: Optional[torch.Tensor],
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Augment one ``(C, X, Y, Z)`` float32 volume and its ``(X, Y, Z)`` int64 labels (``fov`` is passed
        through); returns the same shapes and dtypes (``rotate90`` keeps the shape: k = 2 where X != Y)."""
        if self.spatial is not None:
            self.spatial.set_random_state(seed=int(rng.integers(2**31 - 1)))
            out = self.spatial({"image": image, "label": labels[None].float()})
            image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float()
            labels = torch.as_tensor(out["label"]).as_subclass(torch.Tensor)[0].round().long()
            if tuple(labels.shape) != tuple(image.shape[1:]):
                raise DataError(f"3D augmentation changed the volume shape to {tuple(image.shape[1:])}")
        c = self.cfg
        if c.rotate90 and rng.random() < c.prob:
            k = int(rng.integers(1, 4)) if image.shape[1] == image.shape[2] else 2  # keep the shape
            image, labels = torch.rot90(image, k, (1, 2)), torch.rot90(labels, k, (0, 1))
        if c.intensity > 0 and rng.random() < c.prob:
            gain = rng.uniform(1.0 - c.intensity, 1.0 + c.intensity)
            bias = rng.uniform(-c.intensity, c.intensity)
            image = image * float(gain) + float(bias)
        return image.contiguous(), labels.contiguous(), fov
