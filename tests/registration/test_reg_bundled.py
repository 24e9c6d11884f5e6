"""The bundled registration model: small, loadable at the cpu profile, and well-behaved."""

from __future__ import annotations

import math

import pytest
import torch

from kidneyreg.pipeline import bundled_registration_path, load_registration_model
from kidneyreg.profiles import get_profile
from kidneyreg.registration.network import parameter_counts


def test_bundled_registration_model_loads_and_is_small() -> None:
    path = bundled_registration_path("cpu")
    if not path.is_file():
        pytest.skip("no bundled registration model in this checkout")
    assert path.stat().st_size < 2_000_000
    model = load_registration_model()
    assert model.profile.name == "cpu"
    assert tuple(model.config.volume_shape) == tuple(get_profile("cpu").volume_shape)
    assert parameter_counts(model.net)["total"] < 1_000_000
    # The record of how it was made travels with it.
    assert model.training.get("profile") == "cpu" and "pose_model" in model.training
    # Its weights are finite and it maps a pair to rigid matrices of moderate size.
    assert all(torch.isfinite(p).all() for p in model.net.parameters())
    torch.manual_seed(0)
    w, h, d = model.config.volume_shape
    per_side = model.config.input_channels // 2
    fixed = torch.zeros(1, per_side, d, h, w)
    fixed[..., w // 2 - 2 : w // 2 + 3] = torch.rand(1, per_side, d, h, 5)
    moving = torch.rand(1, per_side, d, h, w)
    with torch.inference_mode():
        matrices = model.net(fixed, moving).matrices
    rotation = matrices[0, :, :3, :3]
    eye = torch.eye(3).expand_as(rotation)
    assert torch.allclose(rotation @ rotation.transpose(-1, -2), eye, atol=1e-4)
    assert math.isfinite(float(matrices.sum()))
