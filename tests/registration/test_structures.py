"""Feature maps of structures beside the kidney (the renal sinus): config, data, network, loss."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kidneyreg.errors import InputError
from kidneyreg.registration.config import RegistrationConfig
from kidneyreg.registration.loss import fim_loss
from kidneyreg.registration.network import RegistrationNet, widen_inputs
from kidneyreg.registration.pairs import LABEL_FILES, load_case
from kidneyreg.registration.train import pretrain
from kidneyreg.simulate.case import simulate_case

SINUS = ("kidney", "sinus")
FAST = {"decoder_slab_half_width": 2}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("structures") / "cohort"
    for seed in (3, 4):
        simulate_case(root / f"case_{seed:03d}", seed, frames=16, profile="tiny", preview=False)
    return root


def test_config_names_its_inputs() -> None:
    base = RegistrationConfig.from_profile("tiny")
    assert base.structures == ("kidney",)
    assert (base.input_names, base.volume_channels, base.input_channels) == (("kidney",), (0,), 2)
    sinus = base.with_changes(structures=["kidney", "sinus"])
    assert sinus.structures == SINUS  # lists become tuples: checkpoints round-trip
    assert RegistrationConfig.from_dict(sinus.to_dict()) == sinus
    assert (sinus.input_names, sinus.volume_channels, sinus.input_channels) == (SINUS, (0, 2), 4)
    assert sinus.feature_volume_channels == (0, 2)
    both = sinus.with_changes(use_images=True)
    assert both.input_names == ("kidney", "image", "sinus")
    assert both.volume_channels == (0, 1, 2)
    for bad in [(), ("sinus",), ("kidney", "kidney"), ("kidney", "liver")]:
        with pytest.raises(ValueError, match="structures"):
            base.with_changes(structures=bad)


@pytest.mark.parametrize(
    "changes", [{"structures": SINUS}, {"structures": SINUS, "use_images": True}]
)
def test_widened_network_computes_what_the_kidney_only_one_did(changes: dict) -> None:
    torch.manual_seed(0)
    base = RegistrationConfig.from_profile("tiny", window=3, **FAST)
    source = RegistrationNet(base)
    for parameter in source.parameters():  # non-zero heads, so the outputs are not all 0
        parameter.data.normal_(0.0, 0.1)
    target = base.with_changes(**changes)
    wide = RegistrationNet(target)
    wide.load_state_dict(widen_inputs(source.state_dict(), base, target))
    fixed, moving = torch.rand(2, 3, 72, 56, 32), torch.rand(2, 3, 72, 56, 32)
    expected = source(fixed[:, :1], moving[:, :1]).params
    torch.testing.assert_close(wide(fixed, moving).params, expected, atol=1e-5, rtol=0.0)
    # The sinus channel reaches the network once its kernels have weight.
    moving_sinus = len(target.input_names) + target.input_names.index("sinus")
    wide.encoder[0][0].weight.data[:, moving_sinus] += 0.5
    flipped = moving.clone()
    flipped[:, 2] = flipped[:, 2].flip(1)
    assert not torch.allclose(wide(fixed, moving).params, wide(fixed, flipped).params)
    with pytest.raises(ValueError, match="drops"):
        widen_inputs(wide.state_dict(), target, base)
    with pytest.raises(ValueError, match="only add"):
        widen_inputs(source.state_dict(), base, target.with_changes(window=5))


def test_loss_averages_the_dice_over_structures() -> None:
    config = RegistrationConfig.from_profile("tiny", window=3, structures=SINUS)
    kidney_only = config.with_changes(structures=("kidney",))
    torch.manual_seed(1)
    fixed, moving = torch.rand(1, 3, 72, 56, 32), torch.rand(1, 3, 72, 56, 32)
    identity = torch.eye(4).repeat(1, 3, 1, 1)
    kidney = fim_loss(identity, fixed, moving, kidney_only).dice
    sinus_as_kidney = fim_loss(identity, fixed[:, [2, 1, 2]], moving[:, [2, 1, 2]], kidney_only)
    both = fim_loss(identity, fixed, moving, config).dice
    torch.testing.assert_close(both, (kidney + sinus_as_kidney.dice) / 2)
    # The whole-volume warp gives the same terms as the slab sampler.
    rotated = identity.clone()
    rotated[:, :, :3, :3] = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 0.98, -0.2], [0.0, 0.2, 0.98]]
    ) / torch.tensor([1.0, 1.0, 1.0])
    rotated[:, :, :3, :3] = torch.linalg.qr(rotated[0, 0, :3, :3])[0]
    slab = fim_loss(rotated, fixed, moving, config)
    full = fim_loss(rotated, fixed, moving, config, warp="full")
    torch.testing.assert_close(slab.dice, full.dice, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3 channel"):
        fim_loss(identity, fixed[:, :2], moving[:, :2], config)


def test_case_carries_the_sinus_maps(cohort: Path, tmp_path: Path) -> None:
    folder = cohort / "case_003"
    plain = load_case(folder, "tiny")
    case = load_case(folder, "tiny", structures=SINUS)
    assert plain.cache.shape[0] == 2 and plain.us_structures.shape[0] == 0
    assert case.cache.shape[0] == 3 and case.us_structures.shape[0] == 1
    torch.testing.assert_close(case.cache[:2], plain.cache)
    kidney, sinus = case.cache[0].float(), case.cache[2].float()
    assert sinus.max() > 0.5
    # The sinus lies inside the kidney: its map is small where the kidney's is.
    assert float(sinus[kidney < 0.05].max()) < 0.2
    assert float(sinus.sum()) < 0.5 * float(kidney.sum())
    k = int(case.valid_frames[len(case.valid_frames) // 2])
    fixed = case.fixed(k)
    assert fixed.shape[0] == 3
    torch.testing.assert_close(fixed[:2], plain.fixed(k))
    assert case.us_structures.max() > 0.5
    # A sinus map needs the label maps.
    broken = tmp_path / "case"
    shutil.copytree(folder, broken)
    (broken / LABEL_FILES["us"]).unlink()
    with pytest.raises(InputError, match="us_labels"):
        load_case(broken, "tiny", structures=SINUS)
    with pytest.raises(ValueError, match="masks"):
        load_case(folder, "tiny", features="network", structures=SINUS)
    with pytest.raises(ValueError, match="structures"):
        load_case(folder, "tiny", structures=("kidney", "liver"))


def test_sinus_run_starts_from_a_kidney_only_model(cohort: Path, tmp_path: Path) -> None:
    settings = {
        "profile": "tiny",
        "device": "cpu",
        "num_workers": 0,
        "progress": False,
        "epochs": 1,
        "pairs": 2,
        "batch_size": 2,
        "val_fraction": 0.0,
        "window": 3,
    }
    source = tmp_path / "source.pt"
    pretrain(cohort, source, config_overrides=FAST, seed=1, **settings)
    tuned = pretrain(
        cohort,
        tmp_path / "sinus.pt",
        initial_weights=source,
        config_overrides={**FAST, "structures": SINUS},
        lr=1e-12,
        **settings,
    )
    assert tuned.model.config.structures == SINUS
    first = tuned.model.state_dict()["encoder.0.0.weight"]
    assert first.shape[1] == 4
    assert first[:, [1, 3]].abs().max() < 1e-6  # the sinus kernels start at zero
    assert np.isfinite(tuned.history[-1]["loss"])
    assert tuned.history[-1]["loss_feature"] < 0  # minus a Dice averaged over both maps
