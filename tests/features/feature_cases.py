"""Small synthetic CT and U/S cases for the feature-network tests (written with SimpleITK).

Plain helpers, imported by name (``from feature_cases import ...``): a module called ``conftest``
is ambiguous when pytest collects several test folders, each with its own conftest, at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def ellipsoid(
    shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]
) -> np.ndarray:
    """Boolean ellipsoid in an array of ``shape`` (index units)."""
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True))
    return np.asarray(inside <= 1.0)


def blob_volume(
    seed: int, shape: tuple[int, int, int] = (24, 56, 56)
) -> tuple[np.ndarray, np.ndarray]:
    """A normalised "CT" ``[z, y, x]``: noisy background, a bright ellipsoidal kidney."""
    rng = np.random.default_rng(seed)
    centre = tuple(n / 2 + rng.uniform(-3, 3) for n in shape)
    radii = (shape[0] / 4, shape[1] / 5, shape[2] / 6)
    mask = ellipsoid(shape, centre, radii)
    image = 0.2 + 0.05 * rng.standard_normal(shape) + 0.5 * mask
    return image.astype(np.float32), mask.astype(np.uint8)


def write_ct_case(folder: Path, *, seed: int = 0, layout: str = "sim") -> Path:
    """A small CT case folder (HU, RAS-stored like a NIfTI from a scanner, anisotropic voxels)."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = (20, 30, 34)  # z, y, x
    rng = np.random.default_rng(seed)
    kidney = ellipsoid(shape, (10, 15, 17), (5, 7, 6))
    hu = -80.0 + 20.0 * rng.standard_normal(shape) + 230.0 * kidney
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((2.0, 2.0, 3.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((30.0, 20.0, -40.0))
    if layout == "sim":
        names = ("ct.nii.gz", "ct_kidney_mask.nii.gz")
        labels = kidney.astype(np.uint8)
    else:
        names = ("imaging.nii.gz", "segmentation.nii.gz")
        labels = kidney.astype(np.uint8)
        labels[10:, :, :] *= 2  # KiTS: tumour label 2 is kidney too
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(image)
    sitk.WriteImage(image, str(folder / names[0]))
    sitk.WriteImage(mask, str(folder / names[1]))
    return folder


def us_frames(
    n: int = 6, rows: int = 40, cols: int = 52, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 B-mode-like frames ``(n, rows, cols)`` with a bright moving ellipse, and its mask."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, rows, cols), np.uint8)
    masks = np.empty((n, rows, cols), np.uint8)
    r, c = np.mgrid[:rows, :cols]
    for k in range(n):
        inside = ((r - rows / 2 - k) / (rows / 5)) ** 2 + ((c - cols / 2) / (cols / 4)) ** 2 <= 1
        speckle = rng.uniform(20, 60, (rows, cols)) + 120 * inside
        frames[k] = np.clip(speckle, 0, 255).astype(np.uint8)
        masks[k] = inside
    return frames, masks


def write_us_case(folder: Path, *, seed: int = 0, pixel: float = 0.8) -> Path:
    """A small U/S case folder in the DESIGN.md layout (x lateral, y depth, z frame)."""
    folder.mkdir(parents=True, exist_ok=True)
    frames, masks = us_frames(seed=seed)
    for name, values in (("us.nii.gz", frames), ("us_kidney_mask.nii.gz", masks)):
        image = sitk.GetImageFromArray(values)
        image.SetSpacing((pixel, pixel, 1.0))
        sitk.WriteImage(image, str(folder / name))
    return folder
