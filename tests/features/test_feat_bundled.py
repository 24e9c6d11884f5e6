"""The bundled feature models: small, loadable, and good on the real CT of ../shared/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kidneyreg.features.config import feature_config
from kidneyreg.features.infer import (
    bundled_model_path,
    load_feature_model,
    predict_ct,
    predict_us,
)
from kidneyreg.features.metrics import dice
from kidneyreg.features.ulbnet import inference_window
from kidneyreg.io.image import read_ct, read_mask
from kidneyreg.io.us import UltrasoundSequence
from kidneyreg.simulate.case import simulate_case_data

REAL_CT_DICE_FLOOR = 0.80


def _bundled(modality: str, view: str = "sagittal") -> Path:
    path = bundled_model_path(modality, "cpu", view=view)
    if not path.is_file():
        pytest.skip(f"no bundled {view}-view {modality} model in this checkout")
    return path


@pytest.mark.parametrize(
    ("modality", "view"), [("ct", "sagittal"), ("us", "sagittal"), ("us", "flank")]
)
def test_bundled_models_are_small_and_load(modality: str, view: str) -> None:
    path = _bundled(modality, view)
    assert path.stat().st_size < 5_000_000
    model = load_feature_model(modality=modality, view=view)
    assert model.config == feature_config(modality, "cpu")
    # The CT model was trained on patches up to twice the configured size and runs with that
    # window; the U/S model with its training window.
    scale = 2 if modality == "ct" else 1
    assert model.inference_window == inference_window(model.config, scale)


@pytest.mark.slow
@pytest.mark.realdata
def test_bundled_ct_model_on_the_real_ct(real_ct_dir: Path) -> None:
    _bundled("ct")
    ct = read_ct(real_ct_dir / "ct.nii.gz")
    truth = read_mask(real_ct_dir / "kidneys.nii.gz", ct, labels=(1, 2))
    probs = predict_ct(load_feature_model(modality="ct"), ct)
    score = dice(sitk.GetArrayFromImage(probs) >= 0.5, sitk.GetArrayFromImage(truth))
    # The feature-network issue's bar (the bundled model reaches 0.85 with its 96 x 160 x 160
    # inference window; 0.64 before it was trained on patches of varied size).
    assert score >= REAL_CT_DICE_FLOOR, score
    assert np.isfinite(sitk.GetArrayFromImage(probs)).all()


@pytest.mark.slow
def test_the_flank_view_model_maps_a_flank_view_the_sagittal_one_cannot() -> None:
    """A flank patient the models never saw (training seeds 100-123, 9500-9611): the flank
    model outlines its kidney, the sagittal one does not (8 held-out flank cases: cleaned
    Dice 0.95 against 0.61, docs/models.md)."""
    _bundled("us", "flank")
    flank = simulate_case_data(31337, frames=10, approach="flank", group="B")
    sequence = UltrasoundSequence(flank.frames.astype(np.float32), (flank.pixel_size,) * 2)
    truth = flank.us_kidney_mask != 0
    scores = {
        view: dice(predict_us(load_feature_model(modality="us", view=view), sequence) >= 0.5, truth)
        for view in ("sagittal", "flank")
    }
    assert scores["flank"] >= 0.85, scores
    assert scores["flank"] > scores["sagittal"] + 0.05, scores
