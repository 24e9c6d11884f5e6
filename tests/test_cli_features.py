"""``kidneyreg segment`` and ``kidneyreg train-features`` end to end on tiny synthetic data."""

from __future__ import annotations

import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from kidneyreg.checkpoint import load_checkpoint, save_checkpoint
from kidneyreg.cli import app, main
from kidneyreg.features.config import feature_config
from kidneyreg.features.ulbnet import CHECKPOINT_KIND, ULBNet, model_payload

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(tmp_path: Path, modality: str) -> Path:
    torch.manual_seed(1)
    net = ULBNet(feature_config(modality, "tiny"))
    return save_checkpoint(
        tmp_path / f"{modality}.pt", model_payload(net, half=True), kind=CHECKPOINT_KIND
    )


def _ct(path: Path) -> sitk.Image:
    rng = np.random.default_rng(0)
    values = (-100 + 40 * rng.standard_normal((18, 22, 26))).astype(np.int16)
    values[6:12, 8:14, 9:17] = 180
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((1.5, 1.5, 2.5))
    image.SetOrigin((-10.0, 5.0, 30.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return image


def _run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["kidneyreg", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0), capsys.readouterr().err


def test_segment_a_ct_volume_writes_a_mask_on_its_grid(tmp_path: Path) -> None:
    ct = _ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out" / "mask.nii.gz"
    args = ["segment", "--modality", "ct", "--input", str(tmp_path / "ct.nii.gz")]
    result = runner.invoke(app, [*args, "--out", str(out), "--model", str(_model(tmp_path, "ct"))])
    assert result.exit_code == 0, result.output
    assert "kidney:" in result.output
    mask = sitk.ReadImage(str(out))
    assert mask.GetSize() == ct.GetSize() and mask.GetDirection() == ct.GetDirection()
    assert np.allclose(mask.GetSpacing(), ct.GetSpacing())
    assert np.allclose(mask.GetOrigin(), ct.GetOrigin())
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    probs_out = tmp_path / "probs.nii.gz"
    model = str(_model(tmp_path, "ct"))
    result = runner.invoke(
        app, [*args, "--out", str(probs_out), "--model", model, "--probabilities"]
    )
    assert result.exit_code == 0, result.output
    probs = sitk.GetArrayFromImage(sitk.ReadImage(str(probs_out)))
    assert probs.dtype == np.float32 and 0.0 <= probs.min() and probs.max() <= 1.0


def test_segment_a_png_with_spacing_writes_a_png_of_its_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    picture = rng.integers(0, 80, (37, 53, 3), dtype=np.uint8)  # colour, odd size
    iio.imwrite(tmp_path / "frame.png", picture)
    out = tmp_path / "frame_mask.png"
    model = str(_model(tmp_path, "us"))
    result = runner.invoke(
        app,
        [
            "segment",
            "--modality",
            "us",
            "--input",
            str(tmp_path / "frame.png"),
            "--out",
            str(out),
            "--spacing",
            "0.45",
            "--model",
            model,
        ],
    )
    assert result.exit_code == 0, result.output
    mask = iio.imread(out)
    assert mask.shape == (37, 53) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}


def test_segment_a_us_sequence_keeps_its_file_grid(tmp_path: Path) -> None:
    frames = np.random.default_rng(3).integers(0, 255, (4, 30, 41), dtype=np.uint8)
    image = sitk.GetImageFromArray(frames)
    image.SetSpacing((0.6, 0.5, 2.0))
    sitk.WriteImage(image, str(tmp_path / "us.nii.gz"))
    out = tmp_path / "us_mask.nii.gz"
    model = str(_model(tmp_path, "us"))
    result = runner.invoke(
        app,
        [
            *["segment", "--modality", "us", "--input", str(tmp_path / "us.nii.gz")],
            *["--out", str(out), "--model", model],
        ],
    )
    assert result.exit_code == 0, result.output
    mask = sitk.ReadImage(str(out))
    assert mask.GetSize() == (41, 30, 4)
    assert np.allclose(mask.GetSpacing(), (0.6, 0.5, 2.0))


def test_segment_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _ct(tmp_path / "ct.nii.gz")
    ct_args = ["segment", "--modality", "ct", "--input", str(tmp_path / "ct.nii.gz")]
    model = str(_model(tmp_path, "us"))
    code, err = _run_main(
        monkeypatch, capsys, *ct_args, "--out", str(tmp_path / "m.nii.gz"), "--model", model
    )
    assert code == 2 and err.count("\n") == 1 and "is a US feature model" in err
    iio.imwrite(tmp_path / "f.png", np.zeros((20, 20), np.uint8))
    code, err = _run_main(
        monkeypatch,
        capsys,
        *["segment", "--modality", "us", "--input", str(tmp_path / "f.png")],
        *["--out", str(tmp_path / "o.png"), "--model", model],
    )
    assert code == 2 and "--spacing" in err and "--us-spacing" not in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage")
    code, err = _run_main(
        monkeypatch, capsys, *ct_args, "--out", str(tmp_path / "m.nii.gz"), "--model", str(bad)
    )
    assert code == 2 and str(bad) in err and err.count("\n") == 1
    assert not (tmp_path / "m.nii.gz").exists()
    for view, problem in (("flank", "a CT has one"), ("coronal", "must be one of sagittal")):
        code, err = _run_main(
            monkeypatch, capsys, *ct_args, "--out", str(tmp_path / "m.nii.gz"), "--view", view
        )
        assert code == 2 and "--view" in err and problem in err and err.count("\n") == 1
    assert not (tmp_path / "m.nii.gz").exists()


def test_train_features_command(tmp_path: Path) -> None:
    for i in range(2):
        folder = tmp_path / "cohort" / f"case_{i:03d}"
        folder.mkdir(parents=True)
        ct = _ct(folder / "ct.nii.gz")
        mask = sitk.GetImageFromArray((sitk.GetArrayFromImage(ct) > 100).astype(np.uint8))
        mask.CopyInformation(ct)
        sitk.WriteImage(mask, str(folder / "ct_kidney_mask.nii.gz"))
    out = tmp_path / "run" / "ct.pt"
    args = ["train-features", "--modality", "ct", "--data", str(tmp_path / "cohort")]
    options = ["--out", str(out), "--profile", "tiny", "--epochs", "1", "--steps", "1"]
    scale = ["--patch-scale", "1.5", "--ce-weight", "0.5"]
    result = runner.invoke(
        app,
        [*args, *options, *scale, "--batch-size", "1", "--export", str(tmp_path / "small.pt")],
    )
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" in result.output
    saved = load_checkpoint(out, kind=CHECKPOINT_KIND)
    assert saved["settings"]["patch_scale"] == 1.5
    assert saved["settings"]["cross_entropy_weight"] == 0.5
    for name in ("ct.pt", "ct.best.pt", "ct.log.csv"):
        assert (tmp_path / "run" / name).is_file()
    assert (tmp_path / "small.pt").is_file()
    bad = runner.invoke(app, [*args, "--out", str(out), "--modality", "mri"])
    assert bad.exit_code != 0
    bad = runner.invoke(app, [*args, *options, "--patch-scale", "0.5"])
    assert bad.exit_code != 0 and "--patch-scale" in str(bad.exception or bad.output)
    bad = runner.invoke(app, [*args, *options, "--acoustic-bands"])  # a U/S augmentation
    assert bad.exit_code != 0 and "--acoustic-bands" in str(bad.exception or bad.output)
    bad = runner.invoke(app, [*args, *options, "--ce-weight", "-1"])
    assert bad.exit_code != 0 and "--ce-weight" in str(bad.exception or bad.output)
