"""Tests of the hierarchical rigid registration network (registration/network.py, heads.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kidneyreg.geometry import euler_to_matrix_torch
from kidneyreg.registration.config import RegistrationConfig
from kidneyreg.registration.heads import RegressionHead, combine_levels
from kidneyreg.registration.network import RegistrationNet, parameter_counts, upsample_x_range
from kidneyreg.registration.transformer import embed_window, grid_axis_mm

TINY = RegistrationConfig.from_profile("tiny")  # 32 x 56 x 72, Nw = 5


def _pair(config: RegistrationConfig, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A blob kidney pair (channel 0 map, channel 1 image) offset by a few mm."""
    nx, ny, nz = config.volume_shape
    s = config.spacing

    def blob(cx: float, cy: float, cz: float) -> torch.Tensor:
        x = grid_axis_mm(nx, s) - cx
        y = grid_axis_mm(ny, s)[:, None] - cy
        z = grid_axis_mm(nz, s)[:, None, None] - cz
        r = torch.sqrt((x / 22.0) ** 2 + (y / 30.0) ** 2 + (z / 45.0) ** 2)
        return torch.sigmoid((1.0 - r) * 8.0)[None, None]

    gen = torch.Generator().manual_seed(3)
    texture = torch.rand(1, 1, nz, ny, nx, generator=gen)
    ct_map = blob(4.0, -5.0, 7.0)
    moving = torch.cat([ct_map, ct_map * (0.5 + texture)], dim=1)
    us_map = blob(0.0, 0.0, 0.0)
    us = torch.cat([us_map, us_map * 0.7 + 0.3 * texture], dim=1)
    w = config.window
    fixed = embed_window(us[..., nx // 2 - w // 2 : nx // 2 + w // 2 + 1], nx)
    return fixed.repeat(batch, 1, 1, 1, 1), moving.repeat(batch, 1, 1, 1, 1)


def _randomise_heads(net: RegistrationNet, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for head in net.heads:
        assert isinstance(head, RegressionHead)
        with torch.no_grad():
            head.out.weight.copy_(torch.randn(head.out.weight.shape, generator=gen) * 0.5)
            head.out.bias.copy_(torch.randn(head.out.bias.shape, generator=gen) * 0.3)


# ----------------------------------------------------------------------------------------------
# Hierarchical combination
# ----------------------------------------------------------------------------------------------


def test_combine_levels_matches_a_hand_computation() -> None:
    levels = [
        torch.tensor([0.40, 0.00, -0.20, 1.0, 2.0, -1.0]),
        torch.tensor([0.20, 0.10, 0.00, -2.0, 0.0, 4.0]),
        torch.tensor([0.00, -0.30, 0.20, 4.0, 1.0, 0.0]),
        torch.tensor([-0.20, 0.20, 0.40, 8.0, -4.0, 2.0]),
    ]
    got = combine_levels(levels, (2.0, 1.0, 0.5, 0.25))
    # rotation: mean of the four; translation: 2 t0 + 1 t1 + 0.5 t2 + 0.25 t3
    expected = [
        (0.40 + 0.20 + 0.00 - 0.20) / 4,
        (0.00 + 0.10 - 0.30 + 0.20) / 4,
        (-0.20 + 0.00 + 0.20 + 0.40) / 4,
        2 * 1.0 - 2.0 + 0.5 * 4.0 + 0.25 * 8.0,
        2 * 2.0 + 0.0 + 0.5 * 1.0 - 0.25 * 4.0,
        -2 * 1.0 + 4.0 + 0.0 + 0.25 * 2.0,
    ]
    torch.testing.assert_close(got, torch.tensor(expected))


def test_network_combines_its_heads_as_the_paper() -> None:
    net = RegistrationNet(TINY).eval()
    gen = torch.Generator().manual_seed(5)
    biases = [torch.rand(30, generator=gen) * 2 - 1 for _ in net.heads]
    for head, bias in zip(net.heads, biases, strict=True):
        assert isinstance(head, RegressionHead)
        with torch.no_grad():
            head.out.bias.copy_(bias)  # weights are zero: each head outputs tanh(bias)
    fixed, moving = _pair(TINY)
    with torch.no_grad():
        out = net(fixed, moving)
    max_rot = math.radians(40.0)
    unit = 25.0 / 3.75  # mm per tanh unit: max translation over the sum of the weights
    raw = [torch.tanh(b).reshape(5, 6) for b in biases]
    rotation = sum(r[:, :3] for r in raw) / 4 * max_rot
    translation = (
        2 * raw[0][:, 3:] + raw[1][:, 3:] + 0.5 * raw[2][:, 3:] + 0.25 * raw[3][:, 3:]
    ) * unit
    torch.testing.assert_close(out.params[0, :, :3], rotation)
    torch.testing.assert_close(out.params[0, :, 3:], translation)
    torch.testing.assert_close(out.level_params[0][0, :, 3:], raw[0][:, 3:] * unit)
    torch.testing.assert_close(out.matrices, euler_to_matrix_torch(out.params))
    assert out.params[..., :3].abs().max() <= max_rot
    assert out.params[..., 3:].abs().max() <= 25.0


def test_new_network_outputs_the_identity() -> None:
    fixed, moving = _pair(TINY, batch=2)
    with torch.no_grad():
        out = RegistrationNet(TINY)(fixed, moving)
    torch.testing.assert_close(out.matrices, torch.eye(4).expand(2, 5, 4, 4))
    assert out.middle_matrices.shape == (2, 4, 4)


# ----------------------------------------------------------------------------------------------
# Shapes, switches, parameters
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("use_images", [False, True])
def test_output_shapes_on_the_tiny_profile(window: int, use_images: bool) -> None:
    config = TINY.with_changes(window=window, use_images=use_images)
    net = RegistrationNet(config)
    fixed, moving = _pair(config, batch=2)
    with torch.no_grad():
        out = net(fixed, moving)
    assert out.params.shape == (2, window, 6)
    assert out.matrices.shape == (2, window, 4, 4)
    assert len(out.level_params) == 4
    assert all(p.shape == (2, window, 6) for p in out.level_params)
    assert net.encoder[0][0].in_channels == (4 if use_images else 2)


@pytest.mark.parametrize("profile", ["tiny", "cpu", "paper"])
@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("slab", [None, 2])
def test_output_shapes_for_every_profile(profile: str, window: int, slab: int | None) -> None:
    # Shapes only: the meta device runs the graph without allocating or computing.
    config = RegistrationConfig.from_profile(profile, window=window, decoder_slab_half_width=slab)
    nx, ny, nz = config.volume_shape
    with torch.device("meta"):
        net = RegistrationNet(config)
        volume = torch.empty(2, 2, nz, ny, nx)
        out = net(volume, volume)
    assert out.params.shape == (2, window, 6)
    assert out.matrices.shape == (2, window, 4, 4)
    assert [p.shape for p in out.level_params] == [(2, window, 6)] * 4


def test_ablation_switches() -> None:
    fixed, moving = _pair(TINY)
    flat = RegistrationNet(TINY.with_changes(hierarchical=False))
    encoder_only = RegistrationNet(TINY.with_changes(use_decoder=False))
    full = RegistrationNet(TINY)
    assert len(flat.heads) == 1 and flat.head_levels == (3,)
    assert len(encoder_only.heads) == 1 and len(encoder_only.decoder) == 0
    assert encoder_only.num_parameters() < flat.num_parameters() < full.num_parameters()
    for net in (flat, encoder_only):
        _randomise_heads(net)
        with torch.no_grad():
            out = net(fixed, moving)
        assert len(out.level_params) == 1
        # one level: its parameters are the final ones, translation unscaled by weights
        torch.testing.assert_close(out.params, out.level_params[0])
        assert out.params[..., 3:].abs().max() <= 25.0


def test_parameter_count_is_small_and_reported() -> None:
    counts = parameter_counts(RegistrationNet(TINY))
    print(f"registration net parameters: {counts}")
    # widths 8,16,16 / 16,16,16,16,8,8: ~55 k in convolutions, 12-19 k per head; the paper's
    # dense heads had 282 M.
    assert 40_000 < counts["encoder"] + counts["decoder"] < 70_000
    assert counts["heads"] < 80_000
    assert counts["total"] == sum(counts[k] for k in ("encoder", "decoder", "heads"))


def test_state_dict_round_trip_through_the_config_dictionary() -> None:
    net = RegistrationNet(TINY.with_changes(window=3, decoder_slab_half_width=4))
    _randomise_heads(net)
    rebuilt = RegistrationNet(RegistrationConfig.from_dict(net.config.to_dict()))
    rebuilt.load_state_dict(net.state_dict())
    fixed, moving = _pair(net.config)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(fixed, moving).params, net(fixed, moving).params)


def test_bad_inputs_raise() -> None:
    net = RegistrationNet(TINY.with_changes(use_images=True))
    fixed, moving = _pair(TINY)
    with pytest.raises(ValueError, match="channel"):
        net(fixed[:, :1], moving)
    with pytest.raises(ValueError, match="fixed"):
        net(fixed[..., :16], moving)
    with pytest.raises(ValueError, match="batch"):
        net(fixed.repeat(2, 1, 1, 1, 1), moving)


# ----------------------------------------------------------------------------------------------
# Decoder slab
# ----------------------------------------------------------------------------------------------


def test_upsample_x_range_equals_full_upsampling() -> None:
    coarse = torch.rand(1, 3, 4, 6, 16)
    full = F.interpolate(coarse, scale_factor=2, mode="trilinear", align_corners=False)
    for start, stop in [(0, 32), (10, 19), (0, 5), (27, 32), (15, 16)]:
        got = upsample_x_range(coarse, 0, start, stop)
        torch.testing.assert_close(got, full[..., start:stop])
        # from a coarse crop holding just the needed indices
        first = max((start - 1) // 2, 0)
        last = min(stop // 2 + 1, 16)
        torch.testing.assert_close(
            upsample_x_range(coarse[..., first:last], first, start, stop), full[..., start:stop]
        )
    with pytest.raises(ValueError, match="cannot give"):
        upsample_x_range(coarse[..., 6:8], 6, 0, 32)


def test_slab_as_wide_as_the_volume_equals_the_full_decoder() -> None:
    fixed, moving = _pair(TINY)
    full = RegistrationNet(TINY.with_changes(decoder_slab_half_width=None))
    _randomise_heads(full)
    wide = RegistrationNet(TINY.with_changes(decoder_slab_half_width=TINY.volume_shape[0] // 2))
    wide.load_state_dict(full.state_dict())
    assert wide.x_ranges == full.x_ranges
    with torch.no_grad():
        torch.testing.assert_close(wide(fixed, moving).params, full(fixed, moving).params)


def test_slab_decoder_ranges_cover_the_window() -> None:
    net = RegistrationNet(TINY.with_changes(decoder_slab_half_width=4))  # nx = 32, centre 16
    # full resolution 16 +- 4; half resolution: the coarse voxels that upsampling blends there
    assert net.x_ranges == [(0, 4), (0, 8), (5, 11), (12, 21)]
    one_level = RegistrationNet(TINY.with_changes(decoder_slab_half_width=2, decoder_slab_levels=1))
    assert one_level.x_ranges == [(0, 4), (0, 8), (0, 16), (14, 19)]
    feats = net.features(*_pair(net.config))
    assert [f.shape[-1] for f in feats] == [4, 8, 6, 9]


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"decoder_slab_half_width": None},
        {"hierarchical": False},
        {"use_decoder": False},
    ],
)
def test_gradients_reach_every_head_and_then_every_parameter(changes: dict[str, object]) -> None:
    config = TINY.with_changes(window=3, **changes)
    net = RegistrationNet(config)
    fixed, moving = _pair(config)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.loss(net(fixed, moving), fixed, moving).total.backward()
    # At the identity start only the zero-initialised last layers can receive gradient ...
    for head in net.heads:
        assert isinstance(head, RegressionHead)
        assert head.out.weight.grad is not None and head.out.weight.grad.abs().sum() > 0
    optimiser.step()
    optimiser.zero_grad()
    net.loss(net(fixed, moving), fixed, moving).total.backward()
    # ... and after one step every parameter of every level does.
    for name, param in net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_a_few_steps_lower_the_loss_on_one_pair() -> None:
    config = TINY.with_changes(window=3)
    net = RegistrationNet(config)
    fixed, moving = _pair(config)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        terms = net.loss(net(fixed, moving), fixed, moving)
        terms.total.backward()
        optimiser.step()
        losses.append(terms.total.item())
    assert min(losses[-3:]) < losses[0]
