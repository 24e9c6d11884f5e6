"""``kidneyreg simulate``: writes case folders; bad input gives one line and exit status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kidneyreg.cli import app, main

runner = CliRunner()


def _run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["kidneyreg", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0), capsys.readouterr().err


def test_simulate_writes_a_cohort(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    args = [
        "simulate",
        "--out",
        str(out),
        "--cases",
        "2",
        "--seed",
        "4",
        "--frames",
        "3",
        "--profile",
        "tiny",
        "--group",
        "B",
        "--no-preview",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cohort = json.loads((out / "cohort.json").read_text())
    assert [c["folder"] for c in cohort["cases"]] == ["case_000", "case_001"]
    assert all(c["group"] == "B" for c in cohort["cases"])
    for name in ("case_000", "case_001"):
        assert (out / name / "us.nii.gz").is_file() and (out / name / "ground_truth.json").is_file()
        assert not (out / name / "preview.png").exists()


def test_simulate_flank_approach(tmp_path: Path) -> None:
    out = tmp_path / "flank"
    args = ["simulate", "--out", str(out), "--seed", "2", "--frames", "2", "--profile", "tiny"]
    result = runner.invoke(app, [*args, "--group", "A", "--approach", "flank", "--no-preview"])
    assert result.exit_code == 0, result.output
    case = out / "case_000"
    info = json.loads((case / "case.json").read_text())
    assert info["approach"] == "flank"
    init = json.loads((case / "init.json").read_text())
    assert init["convention"] == "us_image_mm_to_ct_world_lps" and len(init["frames"]) == 1
    assert json.loads((out / "cohort.json").read_text())["approach"] == "flank"


def test_simulate_help() -> None:
    result = runner.invoke(app, ["simulate", "--help"])
    assert result.exit_code == 0
    assert "--cases" in result.output and "--from-ct" in result.output
    assert "--approach" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cases", "0"], "--cases: must be at least 1"),
        (["--group", "C"], "--group"),
        (["--profile", "huge"], "--profile"),
        (["--frames", "0"], "--frames"),
        (["--approach", "coronal"], "--approach: must be one of sagittal, flank, got 'coronal'"),
        (["--from-ct", "/nonexistent/ct.nii.gz"], "not found"),
    ],
)
def test_bad_input_is_one_line(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = _run_main(monkeypatch, capsys, "simulate", "--out", str(tmp_path / "o"), *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "o").exists()
