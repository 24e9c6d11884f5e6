"""``kidneyreg demo`` end to end at the tiny profile, with small explicit models."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kidneyreg.checkpoint import save_checkpoint
from kidneyreg.cli import app, main
from kidneyreg.demo import MARKER_FILE, DemoSettings
from kidneyreg.features.config import feature_config
from kidneyreg.features.ulbnet import CHECKPOINT_KIND, ULBNet, model_payload
from kidneyreg.io.transforms import read_transforms_json
from kidneyreg.registration import RegistrationConfig, RegistrationNet

runner = CliRunner()
N_FRAMES = 16
# Seed of the random feature networks: their CT map has a candidate on the patient's right, so
# the tiny demo patient (a right kidney) gets through the kidney choice.
FEATURE_SEED = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A narrow tiny registration network and tiny feature networks, saved as checkpoints."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo_models")
    config = RegistrationConfig.from_profile(
        "tiny",
        encoder_channels=(4, 8, 8),
        decoder_channels=(8, 8, 8, 8, 4, 4),
        decoder_slab_half_width=2,
        channels_last=False,
    )
    torch.manual_seed(0)
    payload = {"model": RegistrationNet(config).state_dict(), "config": config.to_dict()}
    payload["profile"] = "tiny"
    paths = {"model": save_checkpoint(root / "model.pt", payload, kind="registration-net")}
    for modality in ("ct", "us"):
        torch.manual_seed(FEATURE_SEED)
        net = ULBNet(feature_config(modality, "tiny"))
        paths[modality] = save_checkpoint(
            root / f"{modality}.pt", model_payload(net), kind=CHECKPOINT_KIND
        )
    # A CT feature network that finds no kidney anywhere (its output is 0 everywhere).
    blind = ULBNet(feature_config("ct", "tiny"))
    with torch.no_grad():
        blind.output.weight.zero_()
        blind.output.bias.fill_(-20.0)
    paths["blind"] = save_checkpoint(root / "blind.pt", model_payload(blind), kind=CHECKPOINT_KIND)
    return paths


def _args(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "demo",
        "--out",
        str(out),
        "--profile",
        "tiny",
        "--frames",
        str(N_FRAMES),
        "--model",
        str(models["model"]),
        "--ct-features",
        str(models["ct"]),
        "--us-features",
        str(models["us"]),
        "--no-video",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def demo_run(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One adapted demo run; returns its output folder."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    result = runner.invoke(app, _args(models, out))
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'report.html'}" in result.output
    assert "| TRE (mm) |" in result.output
    return out


def _error_line(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    monkeypatch.setattr(sys, "argv", ["kidneyreg", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow  # shares the module's demo run (~12 s on a loaded 2-core machine)
def test_demo_writes_the_report_with_every_figure(demo_run: Path) -> None:
    out = demo_run
    markdown = (out / "report.md").read_text(encoding="utf-8")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "not available" not in markdown and 'class="missing"' not in page
    linked = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", markdown)
    figures = sorted(str(p.relative_to(out)) for p in (out / "figures").glob("*.png"))
    assert len(figures) == 4
    expected = [*figures, "registration/overlays/montage.png", "case/preview.png"]
    assert sorted(linked) == sorted(expected)
    for link in linked:
        assert (out / link).is_file() and (out / link).stat().st_size > 1000
        assert f'src="{link}"' in page
    assert "kidneyreg demo --out" in markdown and "--profile tiny" in markdown
    for method in ("initial alignment", "pretrained model", "one-cycle adapted"):
        assert method in markdown
    transforms = read_transforms_json(
        out / "registration" / "transforms.json", expected_frames=N_FRAMES
    )
    assert transforms.extras["adaptation"]["mode"] == "one-cycle"
    assert (out / "case" / "ground_truth.json").is_file()
    # No staging folder is left beside the output.
    assert [p.name for p in out.parent.iterdir()] == [out.name]


@pytest.mark.slow  # shares the module's demo run (~12 s on a loaded 2-core machine)
def test_demo_summary_numbers_are_finite(demo_run: Path) -> None:
    document = json.loads((demo_run / MARKER_FILE).read_text(encoding="utf-8"))
    assert document["profile"] == "tiny" and document["case"]["n_frames"] == N_FRAMES
    assert set(document["summary"]) == {"initial", "pretrained", "adapted"}
    for method, metrics in document["summary"].items():
        for name, stats in metrics.items():
            # Undefined summaries (kidney never in view) are null, never NaN or infinite.
            assert stats["mean"] is None or math.isfinite(stats["mean"]), (method, name)
        for name in ("tre", "plane_angle_deg"):
            assert math.isfinite(metrics[name]["mean"]) and metrics[name]["n"] > 0
    assert document["adaptation"]["strategy"] == "one-cycle"
    timing = document["timing"]
    assert all(math.isfinite(v) and v >= 0 for v in timing.values())
    assert timing["adaptation_s"] > 0 and timing["ms_per_frame"] > 0
    for method in ("initial", "pretrained", "adapted"):
        frames = json.loads((demo_run / "evaluation" / f"{method}.json").read_text("utf-8"))
        assert len(frames["frames"]) == N_FRAMES


@pytest.mark.slow  # shares the module's demo run (~12 s on a loaded 2-core machine)
def test_a_rerun_replaces_the_folder(demo_run: Path, models: dict[str, Path]) -> None:
    torch.set_num_threads(1)
    (demo_run / "stale.txt").write_text("from an earlier run", encoding="utf-8")
    result = runner.invoke(app, _args(models, demo_run, "--no-adapt"))
    assert result.exit_code == 0, result.output
    assert not (demo_run / "stale.txt").exists()
    assert not (demo_run / "evaluation" / "adapted.json").exists()
    document = json.loads((demo_run / MARKER_FILE).read_text(encoding="utf-8"))
    assert document["adaptation"] is None and set(document["summary"]) == {
        "initial",
        "pretrained",
    }
    assert "one-cycle adapted" not in (demo_run / "report.md").read_text(encoding="utf-8")
    assert [p.name for p in demo_run.parent.iterdir()] == [demo_run.name]


@pytest.mark.slow  # shares the module's demo run (~12 s on a loaded 2-core machine)
def test_bad_out_is_a_one_line_error_and_touches_nothing(
    demo_run: Path,
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me", encoding="utf-8")
    line = _error_line(_args(models, a_file), monkeypatch, capsys)
    assert line == f"error: {a_file}: output path exists and is not a folder"
    assert a_file.read_text(encoding="utf-8") == "keep me"

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.csv").write_text("1,2", encoding="utf-8")
    (folder / MARKER_FILE).write_text('{"kind": "my own notes"}', encoding="utf-8")
    line = _error_line(_args(models, folder), monkeypatch, capsys)
    assert line.startswith(f"error: {folder}: is a non-empty folder that is not a demo output")
    assert sorted(p.name for p in folder.iterdir()) == ["data.csv", MARKER_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]


@pytest.mark.slow  # shares the module's demo run (~12 s on a loaded 2-core machine)
def test_a_failing_run_leaves_the_earlier_output_alone(
    demo_run: Path,
    models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = _snapshot(demo_run)
    argv = _args(models, demo_run)
    argv[argv.index(str(models["ct"]))] = str(models["blind"])
    # Fails after the patient was simulated into the staging folder: no kidney in the CT map.
    line = _error_line(argv, monkeypatch, capsys)
    assert "no kidney found in the CT" in line
    assert _snapshot(demo_run) == before
    assert [p.name for p in demo_run.parent.iterdir()] == [demo_run.name]
    short = _args(models, demo_run)
    short[short.index("--frames") + 1] = "3"
    line = _error_line(short, monkeypatch, capsys)
    assert line == "error: --frames: must be at least the registration window of 5, got 3"


def test_settings_give_the_command_line() -> None:
    settings = DemoSettings(out=Path("my demo"), seed=3, frames=20, video=False, device="cpu")
    assert settings.command() == (
        "kidneyreg demo --out 'my demo' --seed 3 --profile cpu --frames 20 --no-video --device cpu"
    )
    assert DemoSettings(adapt=False).methods == ("initial", "pretrained")
    flank = DemoSettings(approach="flank", adapt=False)
    assert flank.command() == (
        "kidneyreg demo --out demo_output --seed 7 --profile cpu --approach flank --no-adapt"
    )


@pytest.mark.slow  # a second demo run (~10 s), without adaptation
def test_a_flank_demo_registers_from_the_case_init(
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "flank_demo"
    result = runner.invoke(app, _args(models, out, "--approach", "flank", "--no-adapt"))
    assert result.exit_code == 0, result.output
    document = json.loads((out / MARKER_FILE).read_text(encoding="utf-8"))
    assert document["approach"] == "flank" and "--approach flank" in document["command"]
    transforms = read_transforms_json(
        out / "registration" / "transforms.json", expected_frames=N_FRAMES
    )
    # Registered from the case's coarse flank pose, as `register --init case/init.json` does.
    assert transforms.extras["initial_pose"].endswith("init.json")
    init = read_transforms_json(out / "case" / "init.json")
    truth = read_transforms_json(out / "case" / "ground_truth.json")
    flank_normal = init.matrices[0, :3, 2]
    assert abs(float(truth.matrices[0, :3, 2] @ flank_normal)) > 0.8  # a flank view, not sagittal
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "--init" in markdown and "flank view" in markdown
    line = _error_line(_args(models, out, "--approach", "axial"), monkeypatch, capsys)
    assert line == "error: --approach: must be one of sagittal, flank, got 'axial'"
