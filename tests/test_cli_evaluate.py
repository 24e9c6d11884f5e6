"""``kidneyreg evaluate`` end to end on a small synthetic case folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from kidneyreg.cli import app, main
from kidneyreg.geometry import DEFAULT_POSE_ROTATION, make_rigid, resample_on_frames, translation
from kidneyreg.io.image import write_mask
from kidneyreg.io.transforms import write_transforms_json
from kidneyreg.io.us import UltrasoundSequence, write_us_sequence

runner = CliRunner()
PIXEL_SIZE = (0.5, 1.0)
FRAME_SHAPE = (48, 64)
REQUIRED = ("hd_ctus", "mcd_ctus", "hd_ctct", "mcd_ctct", "tre", "plane_angle_deg")


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30^3 x 2 mm CT with an ellipsoid kidney, 3 sagittal frames through it."""
    folder = tmp_path_factory.mktemp("cli_eval") / "case_000"
    z, y, x = np.mgrid[:30, :30, :30].astype(np.float64) * 2.0
    inside = ((x - 30) / 10) ** 2 + ((y - 30) / 14) ** 2 + ((z - 30) / 20) ** 2 <= 1
    ct_mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    ct_mask.SetSpacing((2.0, 2.0, 2.0))
    frame_centre = np.array([32 * PIXEL_SIZE[0], 24 * PIXEL_SIZE[1], 0.0])
    true = np.stack(
        [
            make_rigid(
                DEFAULT_POSE_ROTATION,
                np.array([30.0 + dx, 30.0, 30.0]) - DEFAULT_POSE_ROTATION @ frame_centre,
            )
            for dx in (-3.0, 0.0, 3.0)
        ]
    )
    us_mask = resample_on_frames(ct_mask, true, FRAME_SHAPE, PIXEL_SIZE, interpolator="nearest")
    write_mask(ct_mask, folder / "ct_kidney_mask.nii.gz")
    write_us_sequence(
        UltrasoundSequence(40.0 + 100 * us_mask.astype(np.float32), PIXEL_SIZE),
        folder / "us.nii.gz",
    )
    write_us_sequence(
        UltrasoundSequence(us_mask.astype(np.float32), PIXEL_SIZE), folder / "us_kidney_mask.nii.gz"
    )
    write_transforms_json(folder / "ground_truth.json", true)
    write_transforms_json(folder.parent / "shifted.json", true @ translation([0.0, 2.0, 0.0]))
    write_transforms_json(folder.parent / "two_frames.json", true[:2])
    return folder


def test_help_lists_evaluate() -> None:
    result = runner.invoke(app, ["evaluate", "--help"])
    assert result.exit_code == 0
    assert "--case" in result.output and "--pred" in result.output and "--json" in result.output


def test_evaluate_prints_table_and_writes_json(case: Path, tmp_path: Path) -> None:
    out = tmp_path / "results" / "metrics.json"
    pred = case.parent / "shifted.json"
    result = runner.invoke(
        app, ["evaluate", "--case", str(case), "--pred", str(pred), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    for name in REQUIRED:
        assert name in result.output
    tre_line = next(line for line in result.output.splitlines() if line.startswith("tre (mm)"))
    assert tre_line.split()[2:5] == ["2.00", "±", "0.00"]
    assert tre_line.endswith("3/3")
    document = json.loads(out.read_text(encoding="utf-8"))
    assert set(document) == {"summary", "frames"}
    for name in REQUIRED:
        assert set(document["summary"][name]) == {"mean", "std", "median", "p95"}
    assert document["summary"]["tre"]["mean"] == pytest.approx(2.0)
    assert document["summary"]["plane_angle_deg"]["p95"] == pytest.approx(0.0, abs=1e-6)
    assert len(document["frames"]) == 3
    assert all(set(REQUIRED) <= set(frame) for frame in document["frames"])
    assert [frame["index"] for frame in document["frames"]] == [0, 1, 2]
    assert not list(out.parent.glob("*.tmp*"))  # the atomic writer left nothing behind


def test_evaluate_without_ground_truth(case: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    for name in ("ct_kidney_mask.nii.gz", "us.nii.gz", "us_kidney_mask.nii.gz"):
        (real / name).write_bytes((case / name).read_bytes())
    out = tmp_path / "real.json"
    gt = case / "ground_truth.json"
    args = ["evaluate", "--case", str(real), "--pred", str(gt), "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "CT-US metrics only" in result.output
    assert set(json.loads(out.read_text(encoding="utf-8"))["summary"]) == {"hd_ctus", "mcd_ctus"}


def test_mismatched_prediction_is_one_line_error(
    case: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pred = case.parent / "two_frames.json"
    monkeypatch.setattr(
        sys, "argv", ["kidneyreg", "evaluate", "--case", str(case), "--pred", str(pred)]
    )
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: {pred}: has 2 frames, the U/S sequence has 3"
