"""Built-in real dataset: grey/white matter on axial slices of the MNI152 2009 template (offline).

The ICBM 2009a nonlinear symmetric template ships inside the ``nilearn`` wheel
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``, 197 x 233 x 189 voxels of
1 mm, values 0..255). The files are located through the installed package's path, never downloaded, and
nilearn itself is not imported.

Rules (fixed, so every run sees the same data):

- Labels: with tissue probabilities ``p_gm = gm / 255`` and ``p_wm = wm / 255`` and the rest
  ``p_bg = max(0, 1 - p_gm - p_wm)`` (CSF, skull, air), each voxel gets ``argmax(p_bg, p_gm, p_wm)`` ->
  0 = background, 1 = grey matter, 2 = white matter; ties go to the lower label. A voxel is tissue only where
  its tissue probability beats the remainder, so the background stays background.
- Image: the T1 slice as stored (uint8, skull included), one channel.
- Slices: axial (voxel axis 2), shown with anterior at the top: ``image = volume[:, :, z].T[::-1]``, so
  ``H = 233``, ``W = 197``. Slices where brain tissue covers less than :data:`MIN_BRAIN_FRACTION` of the slice
  are skipped (133 of 189 remain).
- 3D (:func:`mni_volumes`, ``data.spatial_dims: 3``): the T1 and the two tissue maps are averaged over 2x2x2
  blocks (2 mm voxels), labelled by the same argmax, cropped to the brain (x 8..88, y 10..106) and cut into
  axial slabs of :data:`SLAB` slices (z 0..80); slab ``b`` goes to ``SPLIT_PATTERN_3D[b]`` (3 train, 1 val, 1
  test; val and test each lie between training slabs, so neither asks the network to extrapolate to the top or
  the bottom of the brain). Each slab is one volume of 80 x 96 x 16 voxels in NIfTI voxel order (x, y, z).
- Split: the kept slices, in z order, form blocks of :data:`BLOCK` consecutive slices; block ``b`` goes to
  ``SPLIT_PATTERN[b % 5]`` = train, train, val, train, test. Every split thus covers the whole brain from
  bottom to top, and neighbouring slices mostly share a split. All slices come from one template, so the
  splits are not independent subjects: this set is for demos and tests, not for reporting accuracy.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from diffmis.errors import DataError
from diffmis.utils import atomic_write_text
from PIL import Image

from diffmis.data.io import read_volume

__all__ = ["CLASS_NAMES", "MniSlices", "MniVolumes", "mni_data_dir", "mni_slices", "mni_volumes", "write_mni",
           "write_mni3d"]

FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
CLASS_NAMES = ("background", "grey matter", "white matter")
#: Minimum fraction of a slice's pixels labelled grey or white matter for the slice to be kept.
MIN_BRAIN_FRACTION = 0.05
#: Consecutive kept slices per split block.
BLOCK = 4
SPLIT_PATTERN = ("train", "train", "val", "train", "test")
#: Axial slices (of 2 mm) per 3D slab; the crop of the 2 mm volume (voxel order x, y, z).
SLAB = 16
CROP_3D = (slice(8, 88), slice(10, 106), slice(0, 5 * SLAB))
SPACING_3D = (2.0, 2.0, 2.0)
SPLIT_PATTERN_3D = ("train", "val", "train", "test", "train")


def mni_data_dir() -> Path:
    """Folder of the template files inside the installed nilearn package (nilearn is not imported).

    Raises:
        DataError: nilearn is not installed, or a template file is missing from it.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in MNI dataset needs the 'nilearn' package (pip install nilearn); "
                        "its wheel ships the template, nothing is downloaded")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    for name in FILES.values():
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: MNI template file missing from the installed nilearn package")
    return folder


@dataclass(frozen=True)
class MniSlices:
    """The prepared slices.

    Attributes:
        ids: ``mni_zNNN`` (NNN = axial voxel index), in z order.
        images: ``(N, 233, 197)`` uint8 T1 slices.
        labels: ``(N, 233, 197)`` uint8 label maps in {0, 1, 2}.
        splits: split name -> indices into ``ids``.
    """

    ids: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    splits: dict[str, tuple[int, ...]]


@functools.lru_cache(maxsize=1)
def mni_slices() -> MniSlices:
    """Load the template and derive slices, labels and splits (cached per process; about 0.5 s)."""
    folder = mni_data_dir()
    vols = {k: read_volume(folder / name).data for k, name in FILES.items()}
    p_gm = vols["gm"].astype(np.float32) / 255.0
    p_wm = vols["wm"].astype(np.float32) / 255.0
    p_bg = np.clip(1.0 - p_gm - p_wm, 0.0, 1.0)
    labels3d = np.argmax(np.stack([p_bg, p_gm, p_wm]), axis=0).astype(np.uint8)
    brain = (labels3d > 0).mean(axis=(0, 1))
    keep = np.flatnonzero(brain >= MIN_BRAIN_FRACTION)
    images = np.stack([np.ascontiguousarray(vols["t1"][:, :, z].T[::-1]) for z in keep]).astype(np.uint8)
    labels = np.stack([np.ascontiguousarray(labels3d[:, :, z].T[::-1]) for z in keep])
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i in range(len(keep)):
        splits[SPLIT_PATTERN[(i // BLOCK) % len(SPLIT_PATTERN)]].append(i)
    return MniSlices(tuple(f"mni_z{z:03d}" for z in keep), images, labels,
                     {k: tuple(v) for k, v in splits.items()})


@dataclass(frozen=True)
class MniVolumes:
    """The 3D slabs (see the module docstring).

    Attributes:
        ids: ``mni3d_zNN`` (NN = first 2 mm slice of the slab).
        images: ``(N, 80, 96, 16)`` float32 T1 (0..255, averaged over 2x2x2 blocks).
        labels: ``(N, 80, 96, 16)`` uint8 label maps in {0, 1, 2}.
        spacing: voxel size in mm.
        splits: split name -> indices into ``ids``.
    """

    ids: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    splits: dict[str, tuple[int, ...]]


@functools.lru_cache(maxsize=1)
def mni_volumes() -> MniVolumes:
    """Load the template and derive the 2 mm slabs, labels and splits (cached per process; about 1 s)."""
    folder = mni_data_dir()
    vols = {}
    for k, name in FILES.items():
        v = read_volume(folder / name).data.astype(np.float32)
        x, y, z = (d - d % 2 for d in v.shape)
        v = v[:x, :y, :z].reshape(x // 2, 2, y // 2, 2, z // 2, 2)
        vols[k] = v.mean(axis=(1, 3, 5))[CROP_3D]  # 2x2x2 block means = 2 mm voxels
    p_gm, p_wm = vols["gm"] / 255.0, vols["wm"] / 255.0
    p_bg = np.clip(1.0 - p_gm - p_wm, 0.0, 1.0)
    labels = np.argmax(np.stack([p_bg, p_gm, p_wm]), axis=0).astype(np.uint8)
    n = labels.shape[2] // SLAB
    images = np.stack([np.ascontiguousarray(vols["t1"][:, :, b * SLAB:(b + 1) * SLAB]) for b in range(n)])
    labs = np.stack([np.ascontiguousarray(labels[:, :, b * SLAB:(b + 1) * SLAB]) for b in range(n)])
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for b in range(n):
        splits[SPLIT_PATTERN_3D[b % len(SPLIT_PATTERN_3D)]].append(b)
    return MniVolumes(tuple(f"mni3d_z{b * SLAB:02d}" for b in range(n)), images.astype(np.float32), labs,
                      SPACING_3D, {k: tuple(v) for k, v in splits.items()})


def write_mni(out_dir: Union[str, Path]) -> Path:
    """Write the MNI brain set in the folder layout.

    Files: ``images/mni_zNNN.png`` (8-bit grey T1), ``masks/mni_zNNN.png`` (8-bit label maps 0/1/2),
    ``splits/{train,val,test}.txt`` and a ``README.md`` stating the rules. Read it back with
    ``data.kind=folder``, ``data.in_channels=1``, ``data.num_classes=3``.

    Returns:
        ``out_dir`` as a Path.
    """
    root = Path(out_dir)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    data = mni_slices()
    for i, sid in enumerate(data.ids):
        Image.fromarray(data.images[i]).save(root / "images" / f"{sid}.png")
        Image.fromarray(data.labels[i]).save(root / "masks" / f"{sid}.png")
    for name, idx in data.splits.items():
        atomic_write_text(root / "splits" / f"{name}.txt", "".join(f"{data.ids[i]}\n" for i in idx))
    counts = ", ".join(f"{k} {len(v)}" for k, v in data.splits.items())
    atomic_write_text(root / "README.md", (
        "# MNI brain: grey/white matter on axial slices of the MNI152 2009a template\n\n"
        "Written by `diffmis data prepare mni-brain` from the template files inside the nilearn package.\n\n"
        f"- {len(data.ids)} axial slices, 233x197 (HxW), 1 channel (T1, 8-bit); splits: {counts}.\n"
        "- masks: 0 = background, 1 = grey matter, 2 = white matter: argmax of (1 - p_gm - p_wm, p_gm, p_wm).\n"
        f"- slices with less than {MIN_BRAIN_FRACTION:.0%} brain are skipped; splits are interleaved blocks of "
        f"{BLOCK} slices (train, train, val, train, test).\n"
        "- one template: the splits are not independent subjects (demos and tests only).\n"
        "- config: data.kind=folder, data.in_channels=1, data.num_classes=3.\n"
    ))
    return root


def write_mni3d(out_dir: Union[str, Path]) -> Path:
    """Write the 3D MNI slabs (:func:`mni_volumes`) in the nnU-Net raw layout.

    Files: ``imagesTr/<id>_0000.nii.gz`` (float32 T1), ``labelsTr/<id>.nii.gz`` (uint8 0/1/2), both with a 2 mm
    diagonal affine; ``dataset.json``; ``splits/{train,val,test}.txt``; a ``README.md``. Read it back with
    ``data.kind=nnunet``, ``data.spatial_dims=3``, ``data.in_channels=1``, ``data.num_classes=3``.

    Returns:
        ``out_dir`` as a Path.
    """
    import json

    import nibabel as nib

    root = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    data = mni_volumes()
    affine = np.diag([*data.spacing, 1.0])
    for i, vid in enumerate(data.ids):
        image = nib.Nifti1Image(data.images[i].astype(np.float32), affine)
        nib.save(image, str(root / "imagesTr" / f"{vid}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(data.labels[i].astype(np.uint8), affine), str(root / "labelsTr" / f"{vid}.nii.gz"))
    for name, idx in data.splits.items():
        atomic_write_text(root / "splits" / f"{name}.txt", "".join(f"{data.ids[i]}\n" for i in idx))
    meta = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "grey matter": 1, "white matter": 2},
            "numTraining": len(data.ids), "file_ending": ".nii.gz",
            "name": "MNI152 2009a grey/white matter, 2 mm axial slabs (diffmis built-in)"}
    atomic_write_text(root / "dataset.json", json.dumps(meta, indent=2) + "\n")
    counts = ", ".join(f"{k} {len(v)}" for k, v in data.splits.items())
    shape = "x".join(str(d) for d in data.images.shape[1:])
    atomic_write_text(root / "README.md", (
        "# MNI brain 3D: grey/white matter in 2 mm axial slabs of the MNI152 2009a template\n\n"
        "Written by diffmis from the template files inside the nilearn package (nnU-Net raw layout).\n\n"
        f"- {len(data.ids)} volumes of {shape} voxels (x, y, z) at 2 mm, 1 channel (T1); splits: {counts}.\n"
        "- labels: 0 = background, 1 = grey matter, 2 = white matter: argmax of (1 - p_gm - p_wm, p_gm, p_wm) "
        "after 2x2x2 block means.\n"
        "- one template cut into slabs: the splits are not independent subjects (demos and tests only).\n"
        "- config: data.kind=nnunet, data.spatial_dims=3, data.in_channels=1, data.num_classes=3.\n"
    ))
    return root
