"""Tests of the FIM loss, Eq. (1)-(4) (registration/loss.py)."""

from __future__ import annotations

import math

import pytest
import torch

from kidneyreg.geometry import euler_to_matrix_torch
from kidneyreg.registration.config import RegistrationConfig
from kidneyreg.registration.loss import fim_loss, motion_loss, pose_supervision_loss, soft_dice
from kidneyreg.registration.transformer import embed_window, grid_axis_mm

CONFIG = RegistrationConfig.from_profile("tiny")  # 32 x 56 x 72 at 3.2 mm, Nw = 5


def _blob_pair(
    config: RegistrationConfig, ct_centre_mm: tuple[float, float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A soft ellipsoid "kidney" with texture in the CT at ``ct_centre_mm``; the U/S window shows
    the same kidney centred on the grid origin (all frames its central cross-section)."""
    nx, ny, nz = config.volume_shape
    s = config.spacing
    gen = torch.Generator().manual_seed(1)
    texture = 0.5 + 0.5 * torch.rand(1, 1, nz, ny, nx, generator=gen)

    def blob(centre: tuple[float, float, float]) -> torch.Tensor:
        x = grid_axis_mm(nx, s) - centre[0]
        y = grid_axis_mm(ny, s)[:, None] - centre[1]
        z = grid_axis_mm(nz, s)[:, None, None] - centre[2]
        r = torch.sqrt((x / 22.0) ** 2 + (y / 30.0) ** 2 + (z / 45.0) ** 2)
        return torch.sigmoid((1.0 - r) * 8.0)[None, None]

    ct_map = blob(ct_centre_mm)
    ct = torch.cat([ct_map, ct_map * texture + 0.2 * texture], dim=1)
    us_map = blob((0.0, 0.0, 0.0))
    us_full = torch.cat([us_map, us_map * 0.8 + 0.1 * texture], dim=1)
    central = us_full[..., nx // 2 : nx // 2 + 1].expand(-1, -1, -1, -1, config.window)
    return embed_window(central, nx), ct


def _random_matrices(batch: int, frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    params = torch.empty(batch, frames, 6)
    params[..., :3] = (torch.rand(batch, frames, 3, generator=gen) - 0.5) * 0.5
    params[..., 3:] = (torch.rand(batch, frames, 3, generator=gen) - 0.5) * 10.0
    return euler_to_matrix_torch(params)


# ----------------------------------------------------------------------------------------------
# L_d, Eq. (4)
# ----------------------------------------------------------------------------------------------


def test_motion_loss_is_zero_at_the_identity() -> None:
    loss, per_frame, second = motion_loss(torch.eye(4).repeat(3, 5, 1, 1))
    assert loss.tolist() == [0.0, 0.0, 0.0]
    assert per_frame.abs().max() == 0 and second.abs().max() == 0


def test_constant_transform_sequence_has_only_the_identity_term() -> None:
    d = euler_to_matrix_torch(torch.tensor([0.1, -0.2, 0.05, 2.0, -1.0, 3.0]))
    seq = d.repeat(1, 5, 1, 1)
    loss, per_frame, second = motion_loss(seq)
    assert second.abs().max().item() == pytest.approx(0.0, abs=1e-6)
    # 0.01 * ||D - I|| / Nw with the Frobenius norm of the five stacked matrices.
    offset = float(torch.linalg.matrix_norm(d - torch.eye(4)))
    assert loss.item() == pytest.approx(0.01 * math.sqrt(5) * offset / 5, rel=1e-5)
    torch.testing.assert_close(per_frame, torch.full((1, 5), offset))


def test_jerky_sequence_is_penalised_more_than_a_linear_one() -> None:
    steps = torch.linspace(0.0, 4.0, 5)
    linear = torch.zeros(1, 5, 6)
    linear[..., 5] = steps  # constant velocity along z: second differences vanish
    jerky = linear.clone()
    jerky[0, 2, 5] += 3.0
    lin_loss, _, lin_second = motion_loss(euler_to_matrix_torch(linear))
    jerk_loss, _, jerk_second = motion_loss(euler_to_matrix_torch(jerky))
    assert lin_second.abs().max().item() == pytest.approx(0.0, abs=1e-6)
    assert jerk_second.min().item() > 0
    # the middle frame's jump of 3 mm appears as 6 mm in its own second difference
    assert jerk_second[0, 1].item() == pytest.approx(6.0, rel=1e-5)
    assert jerk_loss.item() > lin_loss.item() + 0.99 * 2.0


def test_motion_loss_without_triplets_has_no_smoothness_term() -> None:
    d = euler_to_matrix_torch(torch.tensor([[[0.0, 0.0, 0.0, 3.0, 0.0, 4.0]]]))
    loss, _, second = motion_loss(d)
    assert second.shape == (1, 0)
    assert loss.item() == pytest.approx(0.01 * 5.0, rel=1e-6)


def test_motion_loss_gradient_is_finite_at_the_identity() -> None:
    params = torch.zeros(1, 5, 6, requires_grad=True)
    loss, _, _ = motion_loss(euler_to_matrix_torch(params))
    loss.sum().backward()
    assert params.grad is not None and torch.isfinite(params.grad).all()


# ----------------------------------------------------------------------------------------------
# Full FIM loss
# ----------------------------------------------------------------------------------------------


def test_soft_dice_values() -> None:
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert soft_dice(x, y).item() == pytest.approx(2 / 3, rel=1e-5)
    assert soft_dice(x, torch.zeros(2, 2)).item() == 0.0


@pytest.mark.parametrize("window", [1, 3, 5])
def test_slab_loss_equals_full_volume_loss(window: int) -> None:
    config = CONFIG.with_changes(window=window)
    fixed, moving = _blob_pair(config, (3.0, -4.0, 6.0))
    fixed, moving = fixed.repeat(2, 1, 1, 1, 1), moving.repeat(2, 1, 1, 1, 1)
    matrices = _random_matrices(2, window, seed=window)
    slab = fim_loss(matrices, fixed, moving, config, warp="slab")
    full = fim_loss(matrices, fixed, moving, config, warp="full")
    for name in ("total", "feature", "image", "motion", "dice", "mind_difference"):
        torch.testing.assert_close(getattr(slab, name), getattr(full, name), atol=1e-5, rtol=1e-5)
    assert slab.dice.shape == (2, window)
    assert slab.motion_second_difference.shape == (2, max(window - 2, 0))
    assert slab.image.item() > 0


def test_loss_terms_combine_with_the_paper_weights() -> None:
    fixed, moving = _blob_pair(CONFIG, (0.0, 3.0, -3.0))
    matrices = _random_matrices(1, 5, seed=7)
    terms = fim_loss(matrices, fixed, moving, CONFIG)
    expected = terms.feature + 0.01 * terms.image + 0.001 * terms.motion
    assert terms.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms.feature.item() == pytest.approx(-terms.dice.mean().item(), rel=1e-6)
    assert set(terms.scalars()) == {"total", "feature", "image", "motion"}


def test_use_mind_off_drops_the_image_term_and_needs_no_image_channel() -> None:
    config = CONFIG.with_changes(use_mind=False)
    fixed, moving = _blob_pair(config, (0.0, 3.0, -3.0))
    terms = fim_loss(torch.eye(4).repeat(1, 5, 1, 1), fixed[:, :1], moving[:, :1], config)
    assert terms.image.item() == 0.0
    assert terms.total.item() == pytest.approx(terms.feature.item(), rel=1e-6)
    with pytest.raises(ValueError, match="channel"):
        fim_loss(torch.eye(4).repeat(1, 5, 1, 1), fixed[:, :1], moving[:, :1], CONFIG)


def test_aligned_pair_scores_better_than_misaligned() -> None:
    fixed, moving = _blob_pair(CONFIG, (0.0, 0.0, 0.0))
    aligned = fim_loss(torch.eye(4).repeat(1, 5, 1, 1), fixed, moving, CONFIG)
    shift = euler_to_matrix_torch(torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0, 12.0]))
    off = fim_loss(shift.repeat(1, 5, 1, 1), fixed, moving, CONFIG)
    # soft maps: Dice of a map with itself is sum(x^2) / sum(x) < 1
    assert torch.all(aligned.dice > off.dice + 0.05)
    assert aligned.feature.item() < off.feature.item()
    assert aligned.image.item() < off.image.item()


def test_gradient_descent_on_free_parameters_recovers_the_translation_sign() -> None:
    # The CT kidney sits at c; the U/S shows it at the origin. warped(p) = CT(D p), so the right
    # D translates by +c. Optimising D's parameters with the loss alone must move toward +c.
    centre = (5.0, -6.0, 8.0)
    fixed, moving = _blob_pair(CONFIG, centre)
    params = torch.zeros(1, 5, 6, requires_grad=True)
    optimiser = torch.optim.Adam([params], lr=0.5)
    first = None
    for _ in range(25):
        optimiser.zero_grad()
        terms = fim_loss(euler_to_matrix_torch(params), fixed, moving, CONFIG)
        terms.total.backward()
        optimiser.step()
        first = terms.total.item() if first is None else first
    final = fim_loss(euler_to_matrix_torch(params.detach()), fixed, moving, CONFIG)
    assert final.total.item() < first
    translation = params.detach()[0, :, 3:]
    for axis, c in enumerate(centre):
        assert torch.all(torch.sign(translation[:, axis]) == math.copysign(1.0, c)), translation


def test_bad_loss_inputs_raise() -> None:
    fixed, moving = _blob_pair(CONFIG, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="matrices"):
        fim_loss(torch.eye(4).repeat(1, 3, 1, 1), fixed, moving, CONFIG)
    with pytest.raises(ValueError, match="moving"):
        fim_loss(torch.eye(4).repeat(1, 5, 1, 1), fixed, moving[..., :16], CONFIG)
    with pytest.raises(ValueError, match="warp"):
        fim_loss(torch.eye(4).repeat(1, 5, 1, 1), fixed, moving, CONFIG, warp="all")  # type: ignore[arg-type]


def test_pose_supervision_is_the_mean_corner_displacement() -> None:
    eye = torch.eye(4).repeat(2, 3, 1, 1)
    assert pose_supervision_loss(eye, eye).tolist() == pytest.approx([0.0, 0.0], abs=1e-3)
    # A rotation by 90 degrees about z moves a corner (r, r, z) to (-r, r, z): the distance is
    # 2 r for every corner.
    turned = eye.clone()
    turned[1, :] = euler_to_matrix_torch(torch.tensor([0.0, 0.0, math.pi / 2, 0.0, 0.0, 0.0]))
    loss = pose_supervision_loss(turned, eye, radius_mm=10.0)
    assert loss[0].item() == pytest.approx(0.0, abs=1e-3)
    assert loss[1].item() == pytest.approx(20.0, rel=1e-5)
    # Translation: every corner moves by the shift.
    shifted = eye.clone()
    shifted[..., :3, 3] = torch.tensor([3.0, 4.0, 0.0])
    assert pose_supervision_loss(shifted, eye).tolist() == pytest.approx([5.0, 5.0])


def test_pose_supervision_gradient_is_finite_at_the_truth() -> None:
    params = torch.zeros(1, 2, 6, requires_grad=True)
    loss = pose_supervision_loss(euler_to_matrix_torch(params), torch.eye(4).repeat(1, 2, 1, 1))
    loss.sum().backward()
    assert params.grad is not None and torch.isfinite(params.grad).all()


def test_pose_supervision_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="targets"):
        pose_supervision_loss(torch.eye(4).repeat(1, 2, 1, 1), torch.eye(4).repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="radius"):
        pose_supervision_loss(torch.eye(4)[None, None], torch.eye(4)[None, None], radius_mm=0.0)
