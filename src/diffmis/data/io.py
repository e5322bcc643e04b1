"""File input and output: 2D images and masks (PIL), NIfTI volumes (nibabel).

Arrays returned here hold raw intensities (no normalisation): images are channel-first ``(C, H, W)``, masks are
``(H, W)`` integer maps of the values stored in the file. NIfTI volumes are returned in voxel order (no
reorientation), so slicing along an axis and writing the stack back with :func:`write_volume_like` restores the
original geometry exactly. Every error is a :class:`~diffmis.errors.DataError` that names the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import nibabel as nib
import numpy as np
from diffmis.errors import DataError
from PIL import Image

from diffmis.data.transforms import resize_image, resize_labels

__all__ = [
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "LABEL_SUFFIXES",
    "file_stem",
    "read_label_map",
    "Volume",
    "split_suffix",
    "image_header",
    "check_finite",
    "load_image_array",
    "load_mask_array",
    "read_image",
    "read_mask",
    "read_volume",
    "volume_shape",
    "write_volume_like",
]

PathLike = Union[str, Path]

#: 2D image file suffixes accepted in ``images/``, ``masks/`` and ``fov/`` (case-insensitive).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: NIfTI suffixes (nnU-Net raw datasets).
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
#: lossless label-map files (predictions and references ``diffmis evaluate`` reads; JPEG is lossy, so left out)
LABEL_SUFFIXES: tuple[str, ...] = (*NIFTI_SUFFIXES, ".png", ".tif", ".tiff", ".bmp", ".gif")

# PIL modes -> the mode an image is converted to before it becomes an array (None: keep)
_IMAGE_MODES: dict[str, Optional[str]] = {
    "1": "L", "L": None, "LA": "L", "P": "RGB", "PA": "RGB", "RGB": None, "RGBA": "RGB", "RGBX": "RGB",
    "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "I": None, "I;16": None, "I;16B": None,
    "I;16L": None, "I;16N": None, "F": None,
}


def split_suffix(name: str) -> tuple[str, str]:
    """Split a file name into ``(stem, suffix)``; ``.nii.gz`` counts as one suffix; the suffix is lower-cased."""
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return name[: -len(".nii.gz")], ".nii.gz"
    dot = name.rfind(".")
    if dot <= 0:
        return name, ""
    return name[:dot], lower[dot:]


def file_stem(path: PathLike, suffixes: Sequence[str]) -> Optional[str]:
    """The name of ``path`` without its suffix (:func:`split_suffix`) when that suffix is one of ``suffixes``
    (lower case), else None."""
    stem, suffix = split_suffix(Path(path).name)
    return stem if suffix in suffixes and stem else None


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: the image is too large to decode safely ({err}); downscale it") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from None


def check_finite(arr: np.ndarray, path: PathLike) -> np.ndarray:
    """Return ``arr``; raise :class:`DataError` naming ``path`` when it holds NaN or infinite values (float data:
    a NaN would silently become a constant image after normalisation)."""
    if arr.dtype.kind == "f":
        bad = arr.size - int(np.isfinite(arr).sum())
        if bad:
            raise DataError(f"{path}: {bad} of {arr.size} values are NaN or infinite; fix or replace them "
                            "(diffmis does not guess what they should be)")
    return arr


def image_header(path: PathLike) -> tuple[int, int, int]:
    """Size and channel count of a 2D image from its header only (no pixel decoding).

    Returns:
        ``(H, W, C)``; ``C`` is the channel count after the conversion :func:`load_image_array` applies
        (palette and CMYK images count as 3 channels, alpha is dropped).

    Raises:
        DataError: the file is missing or its header is not a readable image.
    """
    path = Path(path)
    with _open(path) as im:
        w, h = im.size
        mode = _IMAGE_MODES.get(im.mode, "RGB") or im.mode
    return h, w, 3 if mode == "RGB" else 1


def _decode(im: Image.Image, path: Path) -> None:
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt or truncated image, decoding failed ({err})") from None


def load_image_array(path: PathLike, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Decode a 2D image into a channel-first array in its stored dtype.

    Args:
        path: PNG/JPEG/TIFF/BMP file.
        size: optional ``(H, W)``; the image is resized with bilinear (antialiased) interpolation. For JPEG the
            decoder first downscales by a power of two that keeps the image at least ``size`` (much faster).

    Returns:
        ``(C, H, W)`` array, ``uint8`` for 8-bit files (values 0..255), ``uint16``/``float32`` for 16-bit,
        32-bit and float files. ``C`` is 1 (grey) or 3 (colour; alpha dropped, palettes expanded).

    Raises:
        DataError: missing, unreadable, corrupt or truncated file.
    """
    path = Path(path)
    with _open(path) as im:
        if size is not None and im.format == "JPEG":
            im.draft(im.mode, (size[1], size[0]))
        _decode(im, path)
        target = _IMAGE_MODES.get(im.mode, "RGB")
        conv = im.convert(target) if target else im
        arr = np.asarray(conv)
    if arr.dtype == np.int32:  # PIL mode "I": 32-bit integers (often 16-bit data widened)
        arr = arr.astype(np.float32)
    elif arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    check_finite(arr, path)
    arr = arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))
    if size is not None and arr.shape[1:] != tuple(size):
        arr = resize_image(arr, size)
    return arr


def load_mask_array(path: PathLike, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Decode a 2D mask (label map) into an ``(H, W)`` integer array of the stored values.

    Grey, palette (indices are the labels), bilevel and 16/32-bit files are read as they are; colour files are
    accepted only when all colour channels are equal.

    Args:
        path: mask file.
        size: optional ``(H, W)``; nearest-neighbour resize (labels are never interpolated).

    Returns:
        ``(H, W)`` array: ``uint8`` for 8-bit files, otherwise ``int32``.

    Raises:
        DataError: missing, unreadable or truncated file; a colour mask whose channels differ; non-integer values.
    """
    path = Path(path)
    with _open(path) as im:
        _decode(im, path)
        mode = im.mode
        if mode == "1":
            arr = np.asarray(im.convert("L")) // 255
        elif mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
            rgb = np.asarray(im)
            chans = rgb[..., : (1 if mode == "LA" else 3)]
            if not (chans == chans[..., :1]).all():
                raise DataError(f"{path}: mask is a colour ({mode}) image whose channels differ; "
                                "expected a single-channel label map")
            arr = np.ascontiguousarray(chans[..., 0])
        else:
            arr = np.asarray(im)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(f"{path}: mask holds non-integer values; expected a label map")
        arr = arr.astype(np.int32)
    elif arr.dtype != np.uint8:
        arr = arr.astype(np.int32)
    if size is not None and arr.shape != tuple(size):
        arr = resize_labels(arr, size)
    return arr


def read_image(path: PathLike, *, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Read a 2D image as ``(C, H, W)`` float32 raw intensities (0..255 for 8-bit files; not normalised).

    Args:
        path: image file.
        size: optional ``(H, W)`` to resize to (bilinear, antialiased).
    """
    return load_image_array(path, size).astype(np.float32)


def read_mask(path: PathLike, *, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Read a 2D mask as an ``(H, W)`` int64 map of the stored values (e.g. {0, 255}; not remapped).

    Args:
        path: mask file.
        size: optional ``(H, W)`` to resize to (nearest-neighbour).
    """
    return load_mask_array(path, size).astype(np.int64)


@dataclass(frozen=True)
class Volume:
    """A NIfTI volume in voxel order.

    Attributes:
        data: ``(X, Y, Z)`` array (dtype as stored after the header's scaling; 2D files get ``Z = 1``).
        affine: ``(4, 4)`` voxel-to-world matrix.
        spacing: voxel size along each of the three axes (mm).
        path: the file it came from.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: Path


def _load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as err:  # nibabel raises several unrelated types for bad headers
        raise DataError(f"{path}: unreadable NIfTI header ({err})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: not a NIfTI image ({type(img).__name__})")
    return img


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) == 2:
        dims.append(1)
    if len(dims) != 3:
        raise DataError(f"{path}: volume has shape {tuple(shape)}; expected 3 spatial dimensions "
                        "(store one channel per file, as nnU-Net does)")
    return dims[0], dims[1], dims[2]


def volume_shape(path: PathLike) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape ``(X, Y, Z)`` and voxel spacing of a NIfTI file from its header only.

    Raises:
        DataError: missing file, unreadable header, or more than three non-singleton dimensions.
    """
    path = Path(path)
    img = _load_nifti(path)
    shape = _spatial_shape(img.shape, path)
    z = [float(v) for v in img.header.get_zooms()[:3]] + [1.0, 1.0]
    return shape, (z[0], z[1], z[2])


def volume_affine(path: PathLike) -> np.ndarray:
    """The ``(4, 4)`` voxel-to-world matrix of a NIfTI file, from its header only.

    Raises:
        DataError: missing file or unreadable header.
    """
    return np.asarray(_load_nifti(Path(path)).affine, dtype=np.float64)


def read_volume(path: PathLike) -> Volume:
    """Read a NIfTI volume fully (decompressing it).

    Raises:
        DataError: missing, unreadable or truncated file, or more than three non-singleton dimensions.
    """
    path = Path(path)
    img = _load_nifti(path)
    shape = _spatial_shape(img.shape, path)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated gzip streams raise EOFError/OSError/zlib.error
        raise DataError(f"{path}: corrupt or truncated volume, decoding failed ({err})") from None
    check_finite(data, path)
    z = [float(v) for v in img.header.get_zooms()[:3]] + [1.0, 1.0]
    return Volume(data.reshape(shape), np.asarray(img.affine, dtype=np.float64), (z[0], z[1], z[2]), path)


def _output_dtype(arr: np.ndarray) -> np.dtype:
    if arr.dtype == bool:
        return np.dtype(np.uint8)
    if arr.dtype.kind in "iu":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for dt in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dt)
        raise DataError(f"prediction values {lo}..{hi} do not fit a 32-bit integer volume")
    return np.dtype(np.float32)


def write_volume_like(ref_path: PathLike, slices: np.ndarray, out_path: PathLike, *, slice_axis: int = 2) -> Path:
    """Write a stack of 2D predictions as a volume with the reference file's affine and header.

    Args:
        ref_path: the input the slices were read from (NIfTI; for 2D nnU-Net datasets a PNG/TIFF image).
        slices: ``(S, H, W)`` stack in slice order along ``slice_axis``: label maps (integer or bool) or
            probabilities (float). ``(H, W)`` must be the reference's shape without ``slice_axis`` (resize
            predictions back to the native grid first).
        out_path: ``.nii.gz``/``.nii`` for NIfTI references; an image suffix (e.g. ``.png``) for 2D ones.
        slice_axis: the voxel axis (0, 1 or 2) the slices were taken along.

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: the reference cannot be read, or the stack does not match its shape.
    """
    ref_path, out_path = Path(ref_path), Path(out_path)
    slices = np.asarray(slices)
    if slices.ndim != 3:
        raise DataError(f"prediction stack for {ref_path} has shape {slices.shape}; expected (S, H, W)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = _output_dtype(slices)
    if split_suffix(ref_path.name)[1] in IMAGE_SUFFIXES:
        h, w, _ = image_header(ref_path)
        if slices.shape != (1, h, w):
            raise DataError(f"prediction stack has shape {slices.shape}; the 2D reference {ref_path} needs "
                            f"(1, {h}, {w})")
        if dtype != np.uint8:
            raise DataError(f"{out_path}: 2D predictions are written as 8-bit label maps; got {slices.dtype}")
        Image.fromarray(slices[0].astype(np.uint8)).save(out_path)
        return out_path
    ref = _load_nifti(ref_path)
    shape = _spatial_shape(ref.shape, ref_path)
    expected = (shape[slice_axis],) + tuple(s for a, s in enumerate(shape) if a != slice_axis)
    if slices.shape != expected:
        raise DataError(f"prediction stack has shape {slices.shape}; the reference {ref_path} with shape "
                        f"{shape} sliced along axis {slice_axis} needs {expected}")
    volume = np.moveaxis(slices, 0, slice_axis).astype(dtype)
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    out = type(ref)(volume, ref.affine, header=header)
    nib.save(out, str(out_path))
    return out_path


def read_label_map(path: PathLike) -> tuple[np.ndarray, Optional[tuple[float, ...]]]:
    """Read a label-map file, 2D (PNG/TIFF/BMP/GIF/JPEG) or NIfTI, as stored (no remapping of values).

    Returns:
        ``(labels, spacing)``: int64 ``(H, W)`` (2D files) or ``(X, Y, Z)`` (NIfTI), and the NIfTI voxel size
        (None for 2D files).

    Raises:
        DataError: the file cannot be read, holds non-integer values, or negative labels.
    """
    path = Path(path)
    spacing: Optional[tuple[float, ...]] = None
    if split_suffix(path.name)[1] in NIFTI_SUFFIXES:
        vol = read_volume(path)
        data, spacing = vol.data, vol.spacing
        if data.dtype.kind == "f":
            if not np.isfinite(data).all() or not (data == np.round(data)).all():
                raise DataError(f"{path}: mask values must be whole numbers (a label map), found fractional values")
        elif data.dtype.kind not in "iub":
            raise DataError(f"{path}: unsupported mask data type {data.dtype}")
        labels = np.asarray(data).astype(np.int64)
    else:
        labels = load_mask_array(path).astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: negative label {int(labels.min())}")
    return labels, spacing
