"""A tiny synthetic cohort with exact reference poses, shared by the pair and pretraining tests.

Each case is a small CT with an ellipsoidal kidney (and a textured background so the images carry
structure), U/S frames made by resampling the CT and the mask on known planes that move with a
sinusoidal breathing motion, and those planes as ``ground_truth.json``. Other test modules import
:func:`make_cohort` from here (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from kidneyreg.geometry import (
    DEFAULT_POSE_ROTATION,
    euler_to_matrix,
    make_rigid,
    resample_on_frames,
)
from kidneyreg.io.transforms import read_transforms_json, write_transforms_json
from kidneyreg.registration.pairs import find_cases

CT_SHAPE = (40, 44, 52)  # x, y, z voxels
CT_SPACING = (3.0, 2.8, 3.2)
FRAME_SHAPE = (36, 44)  # rows (depth), cols (lateral)
PIXEL_SIZE = (2.5, 2.5)
N_FRAMES = 9


def _ct_and_mask(rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    """CT (HU) and kidney mask; returns also the kidney centre (world mm)."""
    nx, ny, nz = CT_SHAPE
    origin = rng.uniform(-20, 20, 3) + np.array([-60.0, -60.0, -80.0])
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in (nz, ny, nx)), indexing="ij")
    world = np.stack([xx * CT_SPACING[0], yy * CT_SPACING[1], zz * CT_SPACING[2]], -1) + origin
    jitter = rng.uniform(-6, 6, 3)
    # A right kidney: right of the body midline (LPS x below the CT's centre, which the body
    # fills), so that pretraining sees every case as it is, not in the mirror image.
    jitter[0] = -1.0 - abs(jitter[0])
    centre = origin + np.array(CT_SHAPE) * np.array(CT_SPACING) / 2 + jitter
    axes = np.array([22.0, 26.0, 42.0]) * rng.uniform(0.9, 1.1, 3)
    tilt = euler_to_matrix(np.r_[rng.uniform(-0.3, 0.3, 3), 0, 0, 0])[:3, :3]
    local = (world - centre) @ tilt
    r = np.sqrt(np.sum((local / axes) ** 2, axis=-1))
    kidney = r <= 1.0
    texture = ndimage.gaussian_filter(rng.normal(size=kidney.shape), 1.5) * 400.0
    hu = -80.0 + texture
    hu = np.where(r <= 1.25, 40.0 + 0.3 * texture, hu)  # a fat capsule / soft tissue rim
    hu = np.where(kidney, 170.0 + 0.3 * texture - 60.0 * (r < 0.5), hu)  # cortex and sinus
    ct = sitk.GetImageFromArray(hu.astype(np.float32))
    mask = sitk.GetImageFromArray(kidney.astype(np.uint8))
    for image in (ct, mask):
        image.SetSpacing(CT_SPACING)
        image.SetOrigin(tuple(origin))
    return ct, mask, centre


def make_case(folder: Path, seed: int, *, rotation_deg: float = 8.0) -> Path:
    """Write one synthetic case folder; returns it."""
    rng = np.random.default_rng(seed)
    ct, mask, centre = _ct_and_mask(rng)
    rows, cols = FRAME_SHAPE
    sx, sy = PIXEL_SIZE
    offset = euler_to_matrix(
        np.r_[np.radians(rng.uniform(-rotation_deg, rotation_deg, 3)), 0, 0, 0]
    )
    rotation = offset[:3, :3] @ DEFAULT_POSE_ROTATION
    # Pixel (cols/2, rows/2) of the probe frame near the kidney centre, a few mm off.
    mid = np.array([cols / 2 * sx, rows / 2 * sy, 0.0])
    origin = centre + rng.uniform(-4, 4, 3) - rotation @ mid
    probe = make_rigid(rotation, origin)
    phases = 2 * np.pi * np.arange(N_FRAMES) / 6.0 + rng.uniform(0, 2 * np.pi)
    motion = np.stack([np.zeros(N_FRAMES), 2.0 * np.sin(phases), 7.0 * np.sin(phases)], 1)
    matrices = np.stack([make_rigid(np.eye(3), m) @ probe for m in motion])
    frames = resample_on_frames(ct, matrices, FRAME_SHAPE, PIXEL_SIZE, default_value=-1000.0)
    us = np.clip((frames + 200.0) / 600.0 * 255.0, 0, 255).astype(np.uint8)
    us_mask = resample_on_frames(mask, matrices, FRAME_SHAPE, PIXEL_SIZE, interpolator="nearest")
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Cast(ct, sitk.sitkInt16), str(folder / "ct.nii.gz"))
    sitk.WriteImage(mask, str(folder / "ct_kidney_mask.nii.gz"))
    for name, array in (("us.nii.gz", us), ("us_kidney_mask.nii.gz", us_mask.astype(np.uint8))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((sx, sy, 1.0))
        sitk.WriteImage(image, str(folder / name))
    write_transforms_json(folder / "ground_truth.json", matrices)
    return folder


def make_cohort(root: Path, n_cases: int = 3, seed: int = 0) -> Path:
    """Write ``n_cases`` synthetic cases into ``root/case_000``...; returns ``root``."""
    for i in range(n_cases):
        make_case(root / f"case_{i:03d}", seed * 1000 + i)
    return root


def test_synthetic_cohort_is_consistent(tmp_path: Path) -> None:
    root = make_cohort(tmp_path / "cohort", n_cases=2)
    cases = find_cases(root)
    assert [c.name for c in cases] == ["case_000", "case_001"]
    for case in cases:
        truth = read_transforms_json(case / "ground_truth.json")
        assert truth.n_frames == N_FRAMES
        us_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "us_kidney_mask.nii.gz")))
        # The planes cut the kidney in every frame, and the breathing moves it.
        assert us_mask.reshape(N_FRAMES, -1).sum(axis=1).min() > 20
        assert np.ptp(truth.matrices[:, 2, 3]) > 8.0
