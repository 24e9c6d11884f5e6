"""Inference: maps on the input's own grid, U/S windows centred on their frame."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from feature_cases import us_frames, write_ct_case
from kidneyreg.errors import InputError
from kidneyreg.features.infer import (
    bundled_model_path,
    load_feature_model,
    predict_ct,
    predict_us,
    predict_us_frames,
    segment_file,
)
from kidneyreg.io.us import UltrasoundSequence


def test_ct_probabilities_lie_on_the_input_grid(
    tmp_path: Path, tiny_model: Callable[[str], Path]
) -> None:
    folder = write_ct_case(tmp_path / "case")
    ct = sitk.ReadImage(str(folder / "ct.nii.gz"), sitk.sitkFloat32)
    probs = predict_ct(load_feature_model(tiny_model("ct"), modality="ct"), ct)
    assert probs.GetSize() == ct.GetSize()
    assert probs.GetSpacing() == ct.GetSpacing() and probs.GetOrigin() == ct.GetOrigin()
    assert probs.GetDirection() == ct.GetDirection()
    values = sitk.GetArrayFromImage(probs)
    assert 0.0 <= values.min() and values.max() <= 1.0 and np.isfinite(values).all()


class _FirstFrameOfWindow(nn.Module):
    """A stand-in network whose output, for every frame of a window, is the window's first frame."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :1].expand_as(x).clone()


def test_each_us_frame_comes_from_the_window_it_centres(
    tiny_model: Callable[[str], Path],
) -> None:
    model = load_feature_model(tiny_model("us"), modality="us")
    window = model.config.window
    model.net = _FirstFrameOfWindow()  # type: ignore[assignment]
    n = 7
    frames = np.stack([np.full((48, 64), k / 10.0, np.float32) for k in range(n)])
    out = predict_us_frames(model, frames)
    assert out.shape == frames.shape
    for k in range(n):
        # Middle of the window centred on k is k; its first frame is k - Nw // 2, clamped.
        expected = max(0, k - window // 2) / 10.0
        assert np.allclose(out[k], expected, atol=1e-5), k


class _CountingIdentity(nn.Module):
    """A stand-in network that returns its input and counts the windows it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += int(x.shape[0])
        return x.clone()


@pytest.mark.parametrize("n", [7, 8])
def test_strided_windows_give_every_frame_its_own_output(
    tiny_model: Callable[[str], Path], n: int
) -> None:
    model = load_feature_model(tiny_model("us"), modality="us")
    window = model.config.window
    frames = np.stack([np.full((48, 64), k / 10.0, np.float32) for k in range(n)])
    for stride in range(1, window + 1):
        counter = _CountingIdentity()
        model.net = counter  # type: ignore[assignment]
        out = predict_us_frames(model, frames, stride=stride)
        # Each frame's map is the network's output at that frame's own position.
        np.testing.assert_allclose(out[:, 0, 0], np.arange(n) / 10.0, atol=1e-5)
        assert counter.windows == -(-n // stride), stride
    with pytest.raises(ValueError, match="stride"):
        predict_us_frames(model, frames, stride=window + 1)


def test_us_maps_return_to_the_original_pixel_grid(tiny_model: Callable[[str], Path]) -> None:
    model = load_feature_model(tiny_model("us"), modality="us")
    frames, _ = us_frames(n=3, rows=70, cols=45)
    sequence = UltrasoundSequence(frames, (1.1, 0.7))
    probs = predict_us(model, sequence)
    assert probs.shape == sequence.shape and probs.dtype == np.float32
    assert 0.0 <= probs.min() and probs.max() <= 1.0


def test_model_loading_errors(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    with pytest.raises(InputError, match="is a CT feature model"):
        load_feature_model(tiny_model("ct"), modality="us")
    with pytest.raises(InputError, match="no bundled"):
        load_feature_model(modality="ct", profile="tiny")
    assert bundled_model_path("us", "cpu").name == "features_us_cpu.pt"
    with pytest.raises(InputError, match="does not exist"):
        load_feature_model(tmp_path / "none.pt", modality="ct")
    with pytest.raises(InputError, match="no bundled flank-view US"):
        load_feature_model(modality="us", profile="tiny", view="flank")


def test_bundled_models_per_view() -> None:
    assert bundled_model_path("us", "cpu", view="flank").name == "features_us_flank_cpu.pt"
    assert bundled_model_path("us", "cpu", view="sagittal") == bundled_model_path("us", "cpu")
    with pytest.raises(ValueError, match="view must be one of sagittal, flank"):
        bundled_model_path("us", "cpu", view="coronal")
    with pytest.raises(ValueError, match="only U/S models"):
        bundled_model_path("ct", "cpu", view="flank")


def test_inference_window_comes_from_the_checkpoint(
    tmp_path: Path, tiny_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import monai.inferers

    from kidneyreg.checkpoint import load_checkpoint, save_checkpoint
    from kidneyreg.features.train import export_model
    from kidneyreg.features.ulbnet import CHECKPOINT_KIND

    plain = load_feature_model(tiny_model("ct"), modality="ct")
    assert plain.window == plain.config.patch_size == plain.inference_window == (16, 48, 48)
    payload = load_checkpoint(tiny_model("ct"), kind=CHECKPOINT_KIND)
    payload["inference_scale"] = 2.0
    wide_path = save_checkpoint(tmp_path / "wide.pt", payload, kind=CHECKPOINT_KIND)
    wide = load_feature_model(wide_path, modality="ct")
    assert wide.inference_window == (32, 96, 96)
    # The sliding window uses it.
    seen = []
    original = monai.inferers.sliding_window_inference

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs["roi_size"])
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(monai.inferers, "sliding_window_inference", spy)
    ct = sitk.ReadImage(str(write_ct_case(tmp_path / "case") / "ct.nii.gz"))
    predict_ct(wide, ct)
    assert seen == [(32, 96, 96)]
    # Export keeps it unless told otherwise; older checkpoints (no key) mean 1.
    assert load_feature_model(export_model(wide_path, tmp_path / "e.pt")).window == (32, 96, 96)
    narrowed = export_model(wide_path, tmp_path / "n.pt", inference_scale=1.0)
    assert load_feature_model(narrowed).window == (16, 48, 48)
    del payload["inference_scale"]
    old = save_checkpoint(tmp_path / "old.pt", payload, kind=CHECKPOINT_KIND)
    assert load_feature_model(old).window == (16, 48, 48)
    payload["inference_scale"] = "huge"
    bad = save_checkpoint(tmp_path / "bad.pt", payload, kind=CHECKPOINT_KIND)
    with pytest.raises(InputError, match=r"bad\.pt.*inference_scale"):
        load_feature_model(bad)


def test_segment_file_output_rules(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    folder = write_ct_case(tmp_path / "case")
    model = tiny_model("ct")
    with pytest.raises(InputError, match="unsupported output"):
        segment_file("ct", folder / "ct.nii.gz", tmp_path / "mask.png", model=model)
    with pytest.raises(InputError, match="--spacing"):
        segment_file("ct", folder / "ct.nii.gz", tmp_path / "m.nii.gz", spacing=1.0, model=model)
    frames, _ = us_frames(n=2)
    image = sitk.GetImageFromArray(frames)
    image.SetSpacing((0.9, 0.9, 1.0))
    sitk.WriteImage(image, str(tmp_path / "us.nrrd"))
    with pytest.raises(InputError, match="one frame"):
        segment_file("us", tmp_path / "us.nrrd", tmp_path / "m.png", model=tiny_model("us"))


def test_keep_kidney_components_drops_small_look_alikes() -> None:
    from kidneyreg.features.infer import keep_kidney_components

    probs = np.zeros((20, 20, 40), np.float32)
    probs[5:12, 5:12, 2:10] = 0.9  # right kidney, 392 voxels
    probs[5:11, 5:12, 25:33] = 0.8  # left kidney, 336 voxels
    probs[15:17, 15:17, 15:17] = 0.95  # a small bright blob elsewhere
    probs[0, 0, 20] = 0.3  # below the threshold, outside the kidneys: zeroed
    cleaned = keep_kidney_components(probs, margin=1)
    assert cleaned[8, 8, 5] == pytest.approx(0.9) and cleaned[8, 8, 28] == pytest.approx(0.8)
    assert cleaned[16, 16, 16] == 0.0 and cleaned[0, 0, 20] == 0.0
    # Soft borders next to a kept kidney stay (margin).
    probs[4, 8, 5] = 0.2
    assert keep_kidney_components(probs, margin=1)[4, 8, 5] == pytest.approx(0.2)
    # One kidney: a second component far smaller than the first is not kept.
    single = probs.copy()
    single[5:11, 5:12, 25:33] = 0.0
    single[15:17, 15:17, 30:32] = 0.9
    assert keep_kidney_components(single)[16, 16, 31] == 0.0
    # Nothing above the threshold: unchanged.
    empty = np.full((3, 3, 3), 0.1, np.float32)
    assert np.array_equal(keep_kidney_components(empty), empty)
