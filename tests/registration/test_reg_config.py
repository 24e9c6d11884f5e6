"""Tests of the registration configuration (registration/config.py)."""

from __future__ import annotations

import json
import math

import pytest

from kidneyreg.profiles import PROFILES
from kidneyreg.registration.config import RegistrationConfig


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_from_profile_takes_the_profile_numbers(name: str) -> None:
    config = RegistrationConfig.from_profile(name)
    profile = PROFILES[name]
    assert config.volume_shape == profile.volume_shape
    assert config.spacing == profile.spacing
    assert config.window == profile.window


def test_paper_defaults() -> None:
    config = RegistrationConfig.from_profile("cpu")
    assert config.encoder_channels == (8, 16, 16)
    assert config.decoder_channels == (16, 16, 16, 16, 8, 8)
    assert config.translation_weights == (2.0, 1.0, 0.5, 0.25)
    assert (config.lambda_image, config.lambda_motion) == (0.01, 0.001)
    assert (config.motion_identity_weight, config.motion_smoothness_weight) == (0.01, 0.99)
    assert config.levels == 4 and config.input_channels == 2
    assert config.decoder_slab_half_width == 2 and config.decoder_slab_levels == 2
    # the final translation range is max_translation_mm whatever the weights
    assert config.level_translation_scale_mm * 3.75 == pytest.approx(config.max_translation_mm)
    assert config.max_rotation_rad == pytest.approx(math.radians(config.max_rotation_deg))


def test_ablation_levels() -> None:
    base = RegistrationConfig.from_profile("tiny")
    assert base.with_changes(hierarchical=False).levels == 1
    assert base.with_changes(use_decoder=False).levels == 1
    assert base.with_changes(use_decoder=False).level_translation_weights == (1.0,)
    assert base.with_changes(use_images=True).input_channels == 4


def test_dictionary_round_trip_is_json_safe() -> None:
    config = RegistrationConfig.from_profile("tiny", window=3, decoder_slab_half_width=4)
    text = json.dumps(config.to_dict())
    assert RegistrationConfig.from_dict(json.loads(text)) == config
    with pytest.raises(ValueError, match="unknown"):
        RegistrationConfig.from_dict({**config.to_dict(), "colour": "red"})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"volume_shape": (30, 56, 72)}, "multiples of 8"),
        ({"spacing": 0.0}, "spacing"),
        ({"window": 4}, "window"),
        ({"window": 0}, "window"),
        ({"encoder_channels": (8, 16)}, "encoder_channels"),
        ({"decoder_channels": (16, 16, 16)}, "decoder_channels"),
        ({"translation_weights": (2.0, 1.0, 0.5)}, "translation_weights"),
        ({"max_rotation_deg": 0.0}, "max_rotation_deg"),
        ({"max_translation_mm": -1.0}, "max_translation_mm"),
        ({"decoder_slab_half_width": 1}, "cover the window"),
        ({"window": 7}, "cover the window"),
        ({"decoder_slab_half_width": 17}, "wider than"),
        ({"decoder_slab_levels": 3}, "decoder_slab_levels"),
        ({"lambda_image": -1.0}, "lambda_image"),
        ({"mind_epsilon": 0.0}, "epsilon"),
    ],
)
def test_invalid_values_raise(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RegistrationConfig.from_profile("tiny", **changes)
