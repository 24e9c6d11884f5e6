"""Tests of the slab spatial transformer and the U/S window layout (registration/transformer.py)."""

from __future__ import annotations

import math

import pytest
import torch

from kidneyreg.geometry import euler_to_matrix_torch
from kidneyreg.registration.transformer import (
    embed_window,
    grid_axis_mm,
    sample_slab,
    warp_volume,
    window_frames,
    window_indices,
)

SPACING = 2.0


def _random_matrices(batch: int, frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    params = torch.empty(batch, frames, 6)
    params[..., :3] = (torch.rand(batch, frames, 3, generator=gen) - 0.5) * 0.6  # +-17 deg
    params[..., 3:] = (torch.rand(batch, frames, 3, generator=gen) - 0.5) * 8.0  # +-4 mm
    return euler_to_matrix_torch(params)


def test_identity_warp_returns_the_volume_on_grid_points() -> None:
    volume = torch.rand(2, 3, 8, 10, 12)
    warped = warp_volume(volume, torch.eye(4).repeat(2, 4, 1, 1), SPACING)
    assert warped.shape == (2, 4, 3, 8, 10, 12)
    for k in range(4):
        torch.testing.assert_close(warped[:, k], volume, atol=1e-5, rtol=0)


def test_identity_warp_is_exact_in_float64() -> None:
    volume = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64)
    warped = warp_volume(volume, torch.eye(4, dtype=torch.float64)[None, None], 1.6)
    torch.testing.assert_close(warped[:, 0], volume, atol=1e-12, rtol=0)


@pytest.mark.parametrize("half_width", [0, 1, 2, 4])
def test_slab_equals_full_warp_restricted_to_the_slab(half_width: int) -> None:
    volume = torch.rand(2, 2, 10, 12, 16)
    matrices = _random_matrices(2, 5, seed=half_width)
    full = warp_volume(volume, matrices, SPACING)
    slab = sample_slab(volume, matrices, SPACING, half_width)
    centre = 16 // 2
    assert slab.shape == (2, 5, 2, 10, 12, 2 * half_width + 1)
    torch.testing.assert_close(
        slab, full[..., centre - half_width : centre + half_width + 1], atol=1e-6, rtol=0
    )


def test_translation_convention_warped_p_reads_ct_at_d_p() -> None:
    # A single bright voxel at x index 7 (internal x = (7 - 5) * s); D translates by +2 voxels
    # in x, so warped(p) = CT(p + 2 s e_x) shows it at x index 5.
    volume = torch.zeros(1, 1, 6, 6, 10)
    volume[0, 0, 3, 3, 7] = 1.0
    shift = euler_to_matrix_torch(torch.tensor([0.0, 0.0, 0.0, 2 * SPACING, 0.0, 0.0]))
    warped = warp_volume(volume, shift[None, None], SPACING)[0, 0, 0]
    assert warped[3, 3, 5].item() == pytest.approx(1.0, abs=1e-5)
    assert warped.sum().item() == pytest.approx(1.0, abs=1e-4)


def test_rotation_is_about_the_grid_origin_in_internal_mm() -> None:
    # Rz(+90 deg) maps (x, y, z) to (-y, x, z): warped at p = (0, s, 0) reads the CT at
    # R p = (-s, 0, 0), the voxel just left of the grid origin along x.
    volume = torch.zeros(1, 1, 8, 8, 8)
    volume[0, 0, 4, 4, 3] = 1.0  # (z, y, x) = centre, centre, centre - 1
    rot = euler_to_matrix_torch(torch.tensor([0.0, 0.0, math.pi / 2, 0.0, 0.0, 0.0]))
    warped = warp_volume(volume, rot[None, None], SPACING)[0, 0, 0]
    assert warped[4, 5, 4].item() == pytest.approx(1.0, abs=1e-5)
    assert warped.sum().item() == pytest.approx(1.0, abs=1e-4)


def test_points_outside_the_volume_read_zero() -> None:
    volume = torch.ones(1, 1, 8, 8, 8)
    far = euler_to_matrix_torch(torch.tensor([0.0, 0.0, 0.0, 100.0, 0.0, 0.0]))
    assert warp_volume(volume, far[None, None], SPACING).abs().max().item() == 0.0


def test_warp_is_differentiable_in_the_matrices_and_the_volume() -> None:
    volume = torch.rand(1, 1, 8, 8, 8, requires_grad=True)
    params = torch.tensor([[[0.1, -0.1, 0.05, 1.0, -0.5, 0.3]]], requires_grad=True)
    sample_slab(volume, euler_to_matrix_torch(params), SPACING, 1).square().sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0
    assert volume.grad is not None and volume.grad.abs().sum() > 0


def test_window_layout_round_trip_and_indices() -> None:
    assert window_indices(32, 5) == [14, 15, 16, 17, 18]
    assert window_indices(64, 1) == [32]
    frames = torch.rand(2, 1, 4, 5, 3)
    grid = embed_window(frames, 16)
    assert grid.shape == (2, 1, 4, 5, 16)
    torch.testing.assert_close(grid[..., 7:10], frames)
    assert grid[..., :7].abs().max() == 0 and grid[..., 10:].abs().max() == 0
    torch.testing.assert_close(window_frames(grid, 3), frames)


def test_grid_axis_matches_the_architecture_convention() -> None:
    # internal mm = (index - n // 2) * spacing
    assert grid_axis_mm(5, 1.5).tolist() == [-3.0, -1.5, 0.0, 1.5, 3.0]
    assert grid_axis_mm(6, 1.0, start=2, stop=4).tolist() == [-1.0, 0.0]


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        warp_volume(torch.rand(1, 8, 8, 8), torch.eye(4)[None, None], 1.0)
    with pytest.raises(ValueError, match="matrices"):
        sample_slab(torch.rand(2, 1, 8, 8, 8), torch.eye(4)[None, None], 1.0, 1)
    with pytest.raises(ValueError, match="half_width"):
        sample_slab(torch.rand(1, 1, 8, 8, 8), torch.eye(4)[None, None], 1.0, -1)
    with pytest.raises(ValueError, match="odd"):
        window_indices(16, 4)
