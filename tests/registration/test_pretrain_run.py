"""Pretraining: the loss goes down, a killed run resumes to the same weights, the files."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_pairs_cohort import make_cohort

from kidneyreg.checkpoint import load_checkpoint
from kidneyreg.cli import app
from kidneyreg.errors import InputError
from kidneyreg.registration.config import RegistrationConfig
from kidneyreg.registration.distributed import resolve_device, shard_indices
from kidneyreg.registration.pairs import TrainingPairs
from kidneyreg.registration.pose_model import GaussianPoseModel
from kidneyreg.registration.train import (
    CHECKPOINT_KIND,
    LOG_COLUMNS,
    epoch_order,
    log_path,
    pose_errors,
    pretrain,
)

# Small and fast: the finest decoder levels on the loss's slab only, one thread.
FAST = {"decoder_slab_half_width": 2}
COMMON: dict[str, Any] = {
    "profile": "tiny",
    "device": "cpu",
    "num_workers": 0,
    "config_overrides": FAST,
    "progress": False,
    "lr": 1e-3,
    "supervision": 0.0,  # the paper's unsupervised loss unless a test says otherwise
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("pretrain") / "cohort", n_cases=3, seed=4)


# Eight epochs of the same 4 pairs, with wide offsets (floors of 8 deg / 6 mm) so that there is
# something to correct.
LEARNING: dict[str, Any] = {
    "epochs": 8,
    "pairs": 4,
    "batch_size": 2,
    "seed": 0,
    "val_fraction": 0.0,
    "min_std_deg": 8.0,
    "min_std_mm": 6.0,
    **COMMON,
    "lr": 3e-3,
}


def test_tiny_pretraining_lowers_the_loss(cohort: Path, tmp_path: Path) -> None:
    result = pretrain(cohort, tmp_path / "model.pt", **LEARNING)
    # The same 4 pairs every epoch: without learning the epoch loss would not change at all.
    losses = [row["loss"] for row in result.history[1:]]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.005, losses
    assert result.val_cases == [] and math.isnan(result.history[-1]["val_mcd_mm"])


def test_supervised_pretraining_lowers_the_pose_error(cohort: Path, tmp_path: Path) -> None:
    result = pretrain(cohort, tmp_path / "supervised.pt", **{**LEARNING, "supervision": 1.0})
    errors = [row["loss_supervision_mm"] for row in result.history[1:]]
    assert all(math.isfinite(x) and x > 0 for x in errors)
    assert errors[-1] < 0.8 * errors[0], errors
    saved = _state(tmp_path / "supervised.pt")
    assert saved["training"]["supervision"] == 1.0
    with pytest.raises(InputError, match="supervision"):
        settings = {**LEARNING, "epochs": 9, "supervision": 0.5}
        pretrain(cohort, tmp_path / "supervised.pt", resume=True, **settings)


def test_pretraining_can_start_from_given_weights(cohort: Path, tmp_path: Path) -> None:
    settings = {**COMMON, "epochs": 1, "pairs": 2, "batch_size": 2, "val_fraction": 0.0}
    source = tmp_path / "source.pt"
    pretrain(cohort, source, **{**settings, "seed": 1})
    # A learning rate too small to move the weights: the run ends where it started.
    tuned = pretrain(
        cohort, tmp_path / "tuned.pt", initial_weights=source, **{**settings, "lr": 1e-12}
    )
    start = _state(source)["model"]
    for name, value in tuned.model.state_dict().items():
        torch.testing.assert_close(value, start[name], atol=1e-6, rtol=0.0)
    assert _state(tmp_path / "tuned.pt")["training"]["initial_weights"] == str(source)
    # Seed 0 alone starts elsewhere, and weights of another configuration are refused.
    fresh = pretrain(cohort, tmp_path / "fresh.pt", **{**settings, "lr": 1e-12})
    assert any(
        not torch.allclose(value, start[name]) for name, value in fresh.model.state_dict().items()
    )
    with pytest.raises(InputError, match="another network configuration"):
        pretrain(cohort, tmp_path / "x.pt", initial_weights=source, window=3, **settings)


def test_widened_network_computes_what_the_feature_only_one_did() -> None:
    from kidneyreg.registration.network import RegistrationNet, widen_to_images

    torch.manual_seed(0)
    base = RegistrationConfig.from_profile("tiny", window=3, **FAST)
    source = RegistrationNet(base)
    for parameter in source.parameters():  # non-zero heads, so the outputs are not all 0
        parameter.data.normal_(0.0, 0.1)
    wide = RegistrationNet(base.with_changes(use_images=True))
    wide.load_state_dict(widen_to_images(source.state_dict(), wide.config))
    fixed, moving = torch.rand(2, 2, 72, 56, 32), torch.rand(2, 2, 72, 56, 32)
    expected = source(fixed, moving).params
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(wide(fixed, moving).params, expected, atol=1e-5, rtol=0.0)
    # The images now reach the network: other images, other output (once they have weight).
    wide.encoder[0][0].weight.data[:, 1] += 0.5
    assert not torch.allclose(wide(fixed, moving).params, wide(fixed, moving.flip(2)).params)
    with pytest.raises(ValueError, match="use_images"):
        widen_to_images(source.state_dict(), base)


def test_images_run_can_start_from_a_feature_only_model(cohort: Path, tmp_path: Path) -> None:
    settings = {**COMMON, "epochs": 1, "pairs": 2, "batch_size": 2, "val_fraction": 0.0}
    source = tmp_path / "source.pt"
    pretrain(cohort, source, **{**settings, "seed": 1})
    overrides = {**FAST, "use_images": True}
    tuned = pretrain(
        cohort,
        tmp_path / "images.pt",
        initial_weights=source,
        **{**settings, "lr": 1e-12, "config_overrides": overrides},
    )
    assert tuned.model.config.use_images
    start = _state(source)["model"]
    first = tuned.model.state_dict()["encoder.0.0.weight"]
    torch.testing.assert_close(first[:, [0, 2]], start["encoder.0.0.weight"], atol=1e-6, rtol=0)
    assert first[:, [1, 3]].abs().max() < 1e-6


def test_negative_supervision_is_rejected(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--supervision"):
        pretrain(cohort, tmp_path / "x.pt", epochs=1, pairs=2, **{**COMMON, "supervision": -1.0})


def _state(path: Path) -> dict[str, Any]:
    return load_checkpoint(path, kind=CHECKPOINT_KIND)


def test_killed_run_resumes_to_the_same_result(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings: dict[str, Any] = {
        "epochs": 2,
        "pairs": 3,
        "batch_size": 2,
        "seed": 5,
        "val_fraction": 0.34,
        "val_per_case": 2,
        **COMMON,
    }
    whole = pretrain(cohort, tmp_path / "whole.pt", **settings)

    # Kill the second run during epoch 2 (after epoch 1's checkpoint was written).
    original = TrainingPairs.__getitem__
    calls = {"n": 0}

    def dying(self: TrainingPairs, index: int) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] > settings["pairs"] + 1:
            raise RuntimeError("killed")
        return original(self, index)

    monkeypatch.setattr(TrainingPairs, "__getitem__", dying)
    killed = tmp_path / "killed.pt"
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(cohort, killed, **settings)
    monkeypatch.setattr(TrainingPairs, "__getitem__", original)
    saved = _state(killed)
    assert saved["epoch"] == 1 and len(saved["history"]) == 2

    resumed = pretrain(cohort, killed, resume=True, **settings)
    final_whole, final_resumed = _state(tmp_path / "whole.pt"), _state(killed)
    assert final_resumed["epoch"] == final_whole["epoch"] == 2
    for key, value in final_whole["model"].items():
        assert torch.equal(value, final_resumed["model"][key]), key
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in b.items() if k != "seconds"}, nan_ok=True, rel=0, abs=0
        )
    adam_whole = final_whole["optimizer"]["state"]
    adam_resumed = final_resumed["optimizer"]["state"]
    assert all(
        torch.equal(adam_whole[i]["exp_avg"], adam_resumed[i]["exp_avg"]) for i in adam_whole
    )

    # The checkpoint holds everything needed to rebuild and to keep training.
    assert RegistrationConfig.from_dict(final_whole["config"]) == whole.config
    assert final_whole["profile"] == "tiny"
    assert GaussianPoseModel.from_dict(final_whole["training"]["pose_model"]) == whole.pose_model
    assert final_whole["training"]["train_cases"] == whole.train_cases
    assert final_whole["best"]["epoch"] in (1, 2)
    assert len(whole.val_cases) == 1 and set(whole.train_cases).isdisjoint(whole.val_cases)
    rows = list(csv.DictReader(log_path(tmp_path / "whole.pt").open()))
    assert tuple(rows[0]) == LOG_COLUMNS
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["loss"] == "" and float(rows[0]["val_mcd_mm"]) >= 0.0
    assert float(rows[2]["val_tre_mm"]) > 0.0

    # Resuming a finished run trains nothing; other settings cannot be resumed.
    again = pretrain(cohort, killed, resume=True, **settings)
    assert len(again.history) == 3
    with pytest.raises(InputError, match="n_pairs"):
        pretrain(cohort, killed, resume=True, **{**settings, "pairs": 4})


def test_epoch_order_and_shards() -> None:
    order = epoch_order(3, 2, 10)
    assert np.array_equal(order, epoch_order(3, 2, 10))
    assert not np.array_equal(order, epoch_order(3, 3, 10))
    shards = [shard_indices(order, rank, 3) for rank in range(3)]
    assert {len(s) for s in shards} == {4}
    assert set(np.concatenate(shards)) == set(range(10))


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            resolve_device("cuda")


def test_pose_errors() -> None:
    predicted = torch.eye(4).repeat(2, 1, 1)
    target = torch.tensor([[0.0, 0, 0, 0, 0, 0], [0, 0, math.radians(10), 1, 0, 0]])
    rotation, translation = pose_errors(predicted, target)
    np.testing.assert_allclose(rotation, [0.0, 10.0], atol=1e-5)
    np.testing.assert_allclose(translation, [0.0, 1.0], atol=1e-6)


def test_cli_pretrain_rejects_bad_options(cohort: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    runner = CliRunner()
    base = ["pretrain", "--cohort", str(cohort), "--out", str(tmp_path / "m.pt")]
    for extra, message in (
        (["--epochs", "0"], "--epochs"),
        (["--window", "4"], "--window"),
        (["--features", "labels"], "--features"),
        (["--profile", "huge"], "--profile"),
    ):
        outcome = runner.invoke(app, [*base, *extra])
        assert isinstance(outcome.exception, InputError), extra
        assert message in str(outcome.exception)
    missing = runner.invoke(app, ["pretrain", "--cohort", str(tmp_path / "x"), "--out", "m.pt"])
    assert isinstance(missing.exception, InputError)
    assert "does not exist" in str(missing.exception)
    assert runner.invoke(app, ["pretrain", "--help"]).exit_code == 0


def test_cli_pretrain_runs(cohort: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    out = tmp_path / "cli" / "model.pt"
    args = ["pretrain", "--cohort", str(cohort), "--out", str(out), "--profile", "tiny"]
    args += ["--epochs", "1", "--pairs", "1", "--batch-size", "1", "--device", "cpu"]
    args += ["--window", "3", "--no-mind", "--images", "--val-fraction", "0"]
    export = tmp_path / "cli" / "compact.pt"
    outcome = CliRunner().invoke(app, [*args, "--export", str(export)])
    assert outcome.exit_code == 0, outcome.output
    assert f"wrote {out}" in outcome.output
    saved = load_checkpoint(out, kind=CHECKPOINT_KIND)
    config = RegistrationConfig.from_dict(saved["config"])
    assert config.window == 3 and not config.use_mind and saved["epoch"] == 1
    assert config.use_images
    # The compact copy: same weights (no validation, so the last epoch's), no optimizer.
    compact = load_checkpoint(export, kind=CHECKPOINT_KIND)
    assert "optimizer" not in compact and compact["training"]["exported_epoch"] == 1
    assert compact["config"] == saved["config"] and compact["profile"] == "tiny"
    for name, value in saved["model"].items():
        assert torch.equal(compact["model"][name], value)
    from kidneyreg.pipeline import load_registration_model

    assert load_registration_model(export).config.window == 3
