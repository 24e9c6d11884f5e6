"""Training: the loss, learning on synthetic blobs, checkpoints, bit-exact resumption."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from feature_cases import blob_volume, us_frames, write_ct_case
from kidneyreg.checkpoint import load_checkpoint
from kidneyreg.errors import InputError
from kidneyreg.features.config import feature_config
from kidneyreg.features.data import CaseData, PatchSampler, normalize_us
from kidneyreg.features.infer import load_feature_model
from kidneyreg.features.train import (
    TrainSettings,
    default_train_settings,
    export_model,
    random_patch_size,
    segmentation_loss,
    soft_dice_loss,
    train_feature_net,
    train_from_folder,
    training_paths,
)
from kidneyreg.features.ulbnet import CHECKPOINT_KIND, inference_window


def test_soft_dice_loss_values() -> None:
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    assert float(soft_dice_loss(target, target, smooth=0.0)) == pytest.approx(0.0)
    half = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    assert float(soft_dice_loss(half, target, smooth=0.0)) == pytest.approx(0.5)
    # No kidney anywhere and an empty prediction: a perfect score thanks to the smoothing.
    empty = torch.zeros(1, 1, 4)
    assert float(soft_dice_loss(empty, empty)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="differ"):
        soft_dice_loss(empty, torch.zeros(1, 4))


def test_segmentation_loss_adds_weighted_cross_entropy() -> None:
    p = torch.tensor([[[0.9, 0.2, 0.6, 0.05]]])
    g = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    assert torch.equal(segmentation_loss(p, g), soft_dice_loss(p, g))
    bce = -(np.log(0.9) + np.log(0.8) + np.log(0.4) + np.log(0.95)) / 4
    expected = float(soft_dice_loss(p, g)) + 0.5 * bce
    assert float(segmentation_loss(p, g, 0.5)) == pytest.approx(expected, rel=1e-5)
    # Saturated wrong outputs stay finite (clamped).
    wrong = segmentation_loss(torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]]), 1.0)
    assert torch.isfinite(wrong)


def _ambiguous_gradient(cross_entropy_weight: float) -> float:
    """Gradient of the loss on a group of pixels at 0.5 of which 45 % are kidney."""
    certain = torch.ones(100)  # kidney, found
    false_alarms = torch.ones(40)  # background marked as kidney: batch Dice about 0.8
    ambiguous = torch.full((20,), 0.5, requires_grad=True)
    p = torch.cat([certain, false_alarms, ambiguous])
    g = torch.cat([torch.ones(100), torch.zeros(40), torch.ones(9), torch.zeros(11)])
    segmentation_loss(p[None], g[None], cross_entropy_weight).backward()
    assert ambiguous.grad is not None
    return float(ambiguous.grad.sum())


def test_dice_alone_grows_uncertain_outlines_cross_entropy_does_not() -> None:
    # Soft Dice rewards marking pixels whose chance of being kidney (0.45) exceeds half the
    # batch's Dice (about 0.4): a negative gradient raises them. Cross-entropy lowers them.
    assert _ambiguous_gradient(0.0) < 0.0
    assert _ambiguous_gradient(1.0) > 0.0


def _blob_cases() -> tuple[list[CaseData], list[CaseData]]:
    train = [CaseData.from_arrays(f"t{i}", *blob_volume(i)) for i in range(2)]
    return train, [CaseData.from_arrays("v", *blob_volume(9))]


def _fixed_loss(net: torch.nn.Module, cases: list[CaseData]) -> float:
    sampler = PatchSampler(cases, feature_config("ct", "tiny"), kidney_fraction=1.0)
    g = torch.Generator().manual_seed(123)
    batch = [sampler.sample(g) for _ in range(4)]
    images = torch.stack([b[0] for b in batch])
    masks = torch.stack([b[1] for b in batch])
    net.eval()
    with torch.no_grad():
        return float(soft_dice_loss(net(images), masks))


def test_a_tiny_training_run_lowers_the_loss(tmp_path: Path) -> None:
    config = feature_config("ct", "tiny")
    train, val = _blob_cases()
    settings = TrainSettings(
        epochs=1, steps_per_epoch=1, batch_size=2, learning_rate=3e-3, val_patches=2
    )
    first = train_feature_net(config, train, val, settings, tmp_path / "a.pt", progress=False)
    before = _fixed_loss(first.net, train)
    longer = TrainSettings(
        epochs=4, steps_per_epoch=5, batch_size=2, learning_rate=3e-3, val_patches=2
    )
    result = train_feature_net(
        config, train, val, longer, tmp_path / "a.pt", resume=True, progress=False
    )
    after = _fixed_loss(result.net, train)
    assert after < before - 0.05, (before, after)
    assert len(result.history) == 4
    rows = list(csv.DictReader(result.log.open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert float(rows[-1]["val_dice"]) >= 0.0


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path: Path) -> None:
    config = feature_config("us", "tiny", window=3)
    frames, masks = us_frames(n=5, rows=56, cols=72)
    cases = [CaseData.from_arrays("us", normalize_us(frames), masks)]
    two = TrainSettings(epochs=2, steps_per_epoch=2, batch_size=1, val_patches=1, seed=4)
    one = TrainSettings(epochs=1, steps_per_epoch=2, batch_size=1, val_patches=1, seed=4)
    straight = train_feature_net(config, cases, cases, two, tmp_path / "s.pt", progress=False)
    train_feature_net(config, cases, cases, one, tmp_path / "r.pt", progress=False)
    resumed = train_feature_net(
        config, cases, cases, two, tmp_path / "r.pt", resume=True, progress=False
    )
    a, b = _state(straight.net), _state(resumed.net)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    pa = load_checkpoint(straight.checkpoint, kind=CHECKPOINT_KIND)
    pb = load_checkpoint(resumed.checkpoint, kind=CHECKPOINT_KIND)
    assert pa["epoch"] == pb["epoch"] == 2
    assert torch.equal(pa["rng"]["sampler"], pb["rng"]["sampler"])
    assert torch.equal(pa["rng"]["torch"], pb["rng"]["torch"])
    for ra, rb in zip(pa["history"], pb["history"], strict=True):
        assert {k: v for k, v in ra.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in rb.items() if k != "seconds"}, nan_ok=True
        )
    # The weights changed at all (the comparison above is not vacuous).
    fresh = train_feature_net(
        config,
        cases,
        cases,
        TrainSettings(epochs=1, steps_per_epoch=1, val_patches=0),
        tmp_path / "f.pt",
        progress=False,
    )
    assert any(not torch.equal(a[k], _state(fresh.net)[k]) for k in a if "combine" in k)


def test_resume_refuses_another_configuration(tmp_path: Path) -> None:
    train, _ = _blob_cases()
    settings = TrainSettings(epochs=1, steps_per_epoch=1, batch_size=1, val_patches=0)
    config = feature_config("ct", "tiny")
    train_feature_net(config, train, [], settings, tmp_path / "m.pt", progress=False)
    other = feature_config("ct", "tiny", seed=5)
    with pytest.raises(InputError, match="another configuration"):
        train_feature_net(other, train, [], settings, tmp_path / "m.pt", resume=True)
    best = training_paths(tmp_path / "m.pt")[1]
    with pytest.raises(InputError, match="cannot be resumed"):
        train_feature_net(config, train, [], settings, best, resume=True)
    # A fine-tuning stage: the resumed run takes the new learning rate.
    finer = TrainSettings(
        epochs=2, steps_per_epoch=1, batch_size=1, val_patches=0, learning_rate=5e-5
    )
    result = train_feature_net(
        config, train, [], finer, tmp_path / "m.pt", resume=True, progress=False
    )
    payload = load_checkpoint(result.checkpoint, kind=CHECKPOINT_KIND)
    assert payload["optimizer"]["param_groups"][0]["lr"] == 5e-5
    assert [row["learning_rate"] for row in payload["history"]] == [1e-4, 5e-5]


def test_train_from_folder_writes_every_file_and_exports(tmp_path: Path) -> None:
    for i in range(3):
        write_ct_case(tmp_path / "cohort" / f"case_{i:03d}", seed=i)
    settings = default_train_settings("tiny", epochs=1, steps_per_epoch=1, batch_size=1)
    lines: list[str] = []
    result = train_from_folder(
        "ct",
        tmp_path / "cohort",
        tmp_path / "run" / "ct.pt",
        profile="tiny",
        settings=settings,
        progress=False,
        log=lines.append,
    )
    assert lines[0].startswith("3 CT case(s): 2 training, 1 validation")
    assert result.checkpoint.is_file() and result.best.is_file() and result.log.is_file()
    payload = load_checkpoint(result.checkpoint, kind=CHECKPOINT_KIND)
    assert len(payload["split"]["train"]) == 2 and len(payload["split"]["val"]) == 1
    exported = export_model(result.best, tmp_path / "small.pt")
    assert exported.stat().st_size < result.best.stat().st_size * 0.6
    model = load_feature_model(exported, modality="ct")
    assert model.config == feature_config("ct", "tiny")
    assert next(model.net.parameters()).dtype == torch.float32


def test_training_can_start_from_given_weights(tmp_path: Path) -> None:
    config = feature_config("ct", "tiny")
    train, val = _blob_cases()
    settings = TrainSettings(epochs=1, steps_per_epoch=2, batch_size=2, val_patches=2)
    first = train_feature_net(config, train, val, settings, tmp_path / "a.pt", progress=False)
    zero = TrainSettings(
        epochs=1, steps_per_epoch=1, batch_size=2, val_patches=2, learning_rate=1e-12
    )
    tuned = train_feature_net(
        config, train, val, zero, tmp_path / "b.pt", progress=False, initial_weights=first.best
    )
    start = _state(first.net)
    for key, value in _state(tuned.net).items():
        assert torch.allclose(value, start[key], atol=1e-6), key
    frames, masks = us_frames(n=5, rows=56, cols=72)
    other = train_feature_net(
        feature_config("us", "tiny", window=3),
        [CaseData.from_arrays("us", normalize_us(frames), masks)],
        [],
        settings,
        tmp_path / "us.pt",
        progress=False,
    )
    with pytest.raises(InputError, match="same modality"):
        train_feature_net(
            config, train, val, zero, tmp_path / "c.pt", progress=False, initial_weights=other.best
        )
    # A kidney model starts a sinus model (same network, another target).
    sinus = train_feature_net(
        dataclasses.replace(config, structure="sinus"),
        train,
        val,
        zero,
        tmp_path / "sinus.pt",
        progress=False,
        initial_weights=first.best,
    )
    assert sinus.net.config.structure == "sinus"
    for key, value in _state(sinus.net).items():
        assert torch.allclose(value, start[key], atol=1e-6), key


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Replace ``module.name`` by a wrapper that appends to the returned list on every call."""
    calls: list[int] = []
    original = getattr(module, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def _calls_off_then_on(
    config: Any, cases: list[CaseData], option: str, steps: int, calls: list[int], out: Path
) -> int:
    """Train with ``option`` off (no call may happen), then on; the calls counted in all."""
    for flag in (False, True):
        settings = TrainSettings(
            epochs=1, steps_per_epoch=steps, batch_size=2, val_patches=0, **{option: flag}
        )
        train_feature_net(config, cases, [], settings, out / f"{flag}.pt", progress=False)
        if not flag:
            assert not calls  # off: patches as rendered
    return len(calls)


def test_tissue_contrast_setting_recolours_the_training_patches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kidneyreg.features.data as data_module

    calls = _count_calls(monkeypatch, data_module, "apply_tissue_contrast")
    config = feature_config("ct", "tiny")
    image, mask = blob_volume(1)
    tissues = np.where(mask > 0, 9, 2).astype(np.uint8)  # cortex in muscle
    cases = [CaseData.from_arrays("t", image, mask, tissues)]
    # On: most of the 6 patches recoloured (probability 0.8).
    assert _calls_off_then_on(config, cases, "tissue_contrast", 3, calls, tmp_path) >= 2
    assert default_train_settings("cpu").tissue_contrast is False


def test_cross_entropy_weight_reaches_the_training_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kidneyreg.features.train as train_module

    weights: list[float] = []
    original = train_module.segmentation_loss

    def recording(p: torch.Tensor, g: torch.Tensor, weight: float = 0.0) -> torch.Tensor:
        weights.append(weight)
        return original(p, g, weight)

    monkeypatch.setattr(train_module, "segmentation_loss", recording)
    settings = TrainSettings(
        epochs=1, steps_per_epoch=2, batch_size=2, val_patches=0, cross_entropy_weight=0.7
    )
    out = tmp_path / "ce.pt"
    cases = [CaseData.from_arrays("t", *blob_volume(1))]
    train_feature_net(feature_config("ct", "tiny"), cases, [], settings, out, progress=False)
    assert weights == [0.7, 0.7]
    assert load_checkpoint(out, kind=CHECKPOINT_KIND)["settings"]["cross_entropy_weight"] == 0.7
    assert default_train_settings("cpu").cross_entropy_weight == 0.0  # the paper's loss
    with pytest.raises(ValueError, match="cross_entropy_weight"):
        TrainSettings(cross_entropy_weight=-0.1)


def test_random_patch_sizes_stay_between_the_patch_and_the_cap() -> None:
    config = feature_config("ct", "tiny")  # patch (16, 48, 48), multiples of 16
    g = torch.Generator().manual_seed(3)
    sizes = {random_patch_size(config, 2.0, (40, 200, 70), g) for _ in range(60)}
    assert len(sizes) > 3  # they vary
    for d, h, w in sizes:
        assert d in (16, 32) and 48 <= h <= 96 and w in (48, 64)
        assert h % 16 == 0
    assert random_patch_size(config, 1.0, (99, 99, 99), g) == config.patch_size
    # Without a generator: the largest size, which is the inference window of that scale.
    for scale in (1.0, 1.5, 2.0, 3.0):
        big = random_patch_size(config, scale, (999, 999, 999), None)
        assert big == inference_window(config, scale)
    us = feature_config("us", "tiny", window=3)
    for _ in range(20):
        size = random_patch_size(us, 3.0, (3, 500, 500), g)
        assert size[0] == 3 and all(n % 16 == 0 for n in size[1:])
    with pytest.raises(ValueError, match="patch_scale"):
        TrainSettings(patch_scale=0.5)


def test_patch_scale_setting_trains_on_varied_patch_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kidneyreg.features.train as train_module

    shapes: list[tuple[int, ...]] = []
    original = train_module._batch

    def recording(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = original(*args, **kwargs)
        shapes.append(tuple(images.shape[2:]))
        return images, masks

    monkeypatch.setattr(train_module, "_batch", recording)
    config = feature_config("ct", "tiny")
    cases = [CaseData.from_arrays("b", *blob_volume(2, (40, 100, 100)))]
    for scale in (1.0, 2.0):
        settings = TrainSettings(
            epochs=1, steps_per_epoch=6, batch_size=1, val_patches=0, patch_scale=scale
        )
        train_feature_net(config, cases, [], settings, tmp_path / f"{scale}.pt", progress=False)
    assert set(shapes[:6]) == {config.patch_size}
    # The model remembers the window it should be run with (the largest training patch).
    assert load_feature_model(tmp_path / "2.0.best.pt").window == (32, 96, 96)
    assert load_feature_model(tmp_path / "1.0.best.pt").window == config.patch_size
    assert len(set(shapes[6:])) > 1 and all(s[0] <= 32 and s[1] <= 96 for s in shapes[6:])
    assert default_train_settings("cpu").patch_scale == 1.0


def test_acoustic_bands_setting_shades_us_patches_and_refuses_ct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kidneyreg.features.augment as augment_module

    calls = _count_calls(monkeypatch, augment_module, "apply_acoustic_bands")
    config = feature_config("us", "tiny", window=3)
    frames, masks = us_frames(n=4, rows=60, cols=80)
    cases = [CaseData.from_arrays("us", normalize_us(frames), masks)]
    # On: about half of the 8 patches shaded (probability 0.5).
    assert _calls_off_then_on(config, cases, "acoustic_bands", 4, calls, tmp_path) >= 1
    assert default_train_settings("cpu").acoustic_bands is False

    ct_cases = [CaseData.from_arrays("t", *blob_volume(1))]
    bands = TrainSettings(epochs=1, steps_per_epoch=1, val_patches=0, acoustic_bands=True)
    out = tmp_path / "ct.pt"
    with pytest.raises(ValueError, match="U/S augmentation"):
        train_feature_net(feature_config("ct", "tiny"), ct_cases, [], bands, out, progress=False)
    assert not out.exists()  # refused before anything is written
