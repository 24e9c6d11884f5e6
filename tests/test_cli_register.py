"""``kidneyreg register`` and ``kidneyreg adapt`` end to end on a tiny simulated case."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from kidneyreg.checkpoint import load_checkpoint, save_checkpoint
from kidneyreg.cli import app, main
from kidneyreg.io.transforms import read_transforms_json
from kidneyreg.io.us import UltrasoundSequence, read_us_sequence, write_us_sequence
from kidneyreg.pipeline import bundled_registration_path, load_registration_model
from kidneyreg.registration import RegistrationConfig, RegistrationNet
from kidneyreg.simulate.case import simulate_case

runner = CliRunner()
N_FRAMES = 12


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny simulated case folder and a tiny registration checkpoint."""
    root = tmp_path_factory.mktemp("cli_register")
    folder = simulate_case(root / "case", 1, frames=N_FRAMES, profile="tiny", preview=False)
    config = RegistrationConfig.from_profile(
        "tiny",
        encoder_channels=(4, 8, 8),
        decoder_channels=(8, 8, 8, 8, 4, 4),
        decoder_slab_half_width=2,
        channels_last=False,
    )
    torch.manual_seed(0)
    net = RegistrationNet(config)
    model = root / "model.pt"
    payload = {"model": net.state_dict(), "config": config.to_dict(), "profile": "tiny"}
    save_checkpoint(model, payload, kind="registration-net")
    return {
        "root": root,
        "ct": folder / "ct.nii.gz",
        "ct_mask": folder / "ct_kidney_mask.nii.gz",
        "us": folder / "us.nii.gz",
        "us_mask": folder / "us_kidney_mask.nii.gz",
        "model": model,
    }


def _args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "register",
        "--ct",
        str(files["ct"]),
        "--us",
        str(files["us"]),
        "--ct-mask",
        str(files["ct_mask"]),
        "--us-mask",
        str(files["us_mask"]),
        "--model",
        str(files["model"]),
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


def _error_line(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    monkeypatch.setattr(sys, "argv", ["kidneyreg", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ")
    return error[-1]


def test_register_writes_every_output(files: dict[str, Path]) -> None:
    torch.set_num_threads(1)
    out = files["root"] / "out"
    argv = _args(files, out, "--adapt-strategy", "one-shot", "--adapt-epochs", "1", "--no-video")
    result = runner.invoke(
        app, [*argv, "--refinements", "2", "--anchor", "0.5", "--frame-step", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "warning: no breathing detected" in result.output
    assert f"registered {N_FRAMES} frames (one-shot adaptation " in result.output
    transforms = read_transforms_json(out / "transforms.json", expected_frames=N_FRAMES)
    assert transforms.extras["adaptation"]["mode"] == "one-shot"
    assert transforms.extras["kidney"]["side"] == "right"
    assert transforms.extras["refinements"] == 2
    assert transforms.extras["frame_step"] == 3
    assert [transforms.frame_extras[k]["window_centre"] for k in range(5)] == [0, 0, 3, 3, 3]
    assert set(transforms.frame_extras[0]["confidence"]) == {"loss", "dice", "mind", "motion"}
    assert len(list((out / "tfm").glob("frame_*.tfm"))) == N_FRAMES
    for name in ("parameters.csv", "ct_planes.nii.gz", "overlays/montage.png", "timing.json"):
        assert (out / name).is_file(), name
    timing = json.loads((out / "timing.json").read_text(encoding="utf-8"))
    assert timing["adaptation_s"] > 0 and timing["ms_per_frame"] > 0
    planes = sitk.ReadImage(str(out / "ct_planes.nii.gz"))
    assert planes.GetSize()[2] == N_FRAMES


def test_adapt_saves_a_loadable_model(files: dict[str, Path]) -> None:
    torch.set_num_threads(1)
    out = files["root"] / "adapted.pt"
    argv = [
        "adapt",
        "--ct",
        str(files["ct"]),
        "--us",
        str(files["us"]),
        "--ct-mask",
        str(files["ct_mask"]),
        "--us-mask",
        str(files["us_mask"]),
        "--model",
        str(files["model"]),
        "--out",
        str(out),
        "--strategy",
        "one-shot",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--anchor",
        "0",
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    payload = load_checkpoint(out, kind="registration-net")
    assert payload["adaptation"]["strategy"] == "one-shot"
    assert payload["adaptation"]["steps"] == 2
    adapted = load_registration_model(out)
    base = load_registration_model(files["model"])
    changed = [
        not torch.equal(adapted.net.state_dict()[k], v) for k, v in base.net.state_dict().items()
    ]
    assert any(changed)


def test_short_sequence_is_a_one_line_error(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sequence = read_us_sequence(files["us"])
    short = files["root"] / "short.nii.gz"
    write_us_sequence(UltrasoundSequence(sequence.frames[:3], sequence.pixel_size), short)
    out = files["root"] / "out_short"
    argv = _args(files, out)
    argv[argv.index(str(files["us"]))] = str(short)
    line = _error_line(argv, monkeypatch, capsys)
    assert line == f"error: {short}: has 3 frames, fewer than the window of 5"
    assert not out.exists()


def test_mask_grid_mismatch_is_a_one_line_error(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mask = sitk.ReadImage(str(files["ct_mask"]))
    cropped = files["root"] / "cropped_mask.nii.gz"
    sitk.WriteImage(mask[:-2, :, :], str(cropped))
    out = files["root"] / "out_mask"
    argv = _args(files, out)
    argv[argv.index(str(files["ct_mask"]))] = str(cropped)
    line = _error_line(argv, monkeypatch, capsys)
    assert line.startswith(f"error: {cropped}: kidney mask grid differs from the image")
    assert not out.exists()


def test_bad_models_are_one_line_errors(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = files["root"] / "foreign.pt"
    torch.save({"state": np.arange(3).tolist()}, foreign)
    out = files["root"] / "out_model"
    argv = _args(files, out)
    argv[argv.index(str(files["model"]))] = str(foreign)
    line = _error_line(argv, monkeypatch, capsys)
    assert line == f"error: {foreign}: is not a kidneyreg checkpoint (foreign PyTorch file)"
    line = _error_line([*_args(files, out), "--refinements", "-1"], monkeypatch, capsys)
    assert line == "error: --refinements: must be >= 0, got -1"
    line = _error_line([*_args(files, out), "--frame-step", "0"], monkeypatch, capsys)
    assert line == "error: --frame-step: must be in 1..10, got 0"
    line = _error_line([*_args(files, out), "--anchor", "-1"], monkeypatch, capsys)
    assert line == "error: --anchor: must be >= 0, got -1.0"
    if not bundled_registration_path("tiny").is_file():
        argv = _args(files, out, "--profile", "tiny")
        index = argv.index("--model")
        del argv[index : index + 2]
        line = _error_line(argv, monkeypatch, capsys)
        assert "no bundled registration model for profile 'tiny'" in line
        assert "kidneyreg pretrain" in line
    assert not out.exists()


def _sinus_files(files: dict[str, Path]) -> tuple[Path, Path]:
    """Renal-sinus masks of the case (sinus fat + collecting system of the label maps)."""
    from kidneyreg.simulate.case import sinus_mask_image

    written = []
    for modality, labels_name in (("ct", "labels.nii.gz"), ("us", "us_labels.nii.gz")):
        sinus = sinus_mask_image(sitk.ReadImage(str(files["ct"].parent / labels_name)))
        path = files["root"] / f"{modality}_sinus.nii.gz"
        sitk.WriteImage(sinus, str(path))
        written.append(path)
    return written[0], written[1]


def test_register_with_sinus_masks_searches_the_plane(files: dict[str, Path]) -> None:
    torch.set_num_threads(1)
    ct_sinus, us_sinus = _sinus_files(files)
    out = files["root"] / "out_sinus"
    argv = _args(files, out, "--adapt-strategy", "one-shot", "--adapt-epochs", "1", "--no-video")
    sinus = ["--ct-sinus-mask", str(ct_sinus), "--us-sinus-mask", str(us_sinus)]
    result = runner.invoke(app, [*argv, *sinus])
    assert result.exit_code == 0, result.output
    assert "plane search on" in result.output
    transforms = read_transforms_json(out / "transforms.json", expected_frames=N_FRAMES)
    search = transforms.extras["plane_search"]
    assert set(search["offset"]) == {
        "tilt_u_deg",
        "tilt_v_deg",
        "normal_mm",
        "shift_u_mm",
        "shift_v_mm",
        "in_plane_deg",
    }
    assert search["score_after"] >= search["score_before"]
    assert search["structures"] == ["kidney", "sinus"]
    timing = json.loads((out / "timing.json").read_text(encoding="utf-8"))
    assert timing["plane_search_s"] > 0
    # Without adaptation the search corrects the pretrained model's estimates.
    out = files["root"] / "out_sinus_no_adapt"
    result = runner.invoke(app, [*_args(files, out, "--no-adapt", "--no-video"), *sinus])
    assert result.exit_code == 0, result.output
    assert f"registered {N_FRAMES} frames (no adaptation, " in result.output
    transforms = read_transforms_json(out / "transforms.json", expected_frames=N_FRAMES)
    assert transforms.extras["plane_search"]["sinus_source"] == {"ct": "masks", "us": "masks"}
    assert transforms.extras["adaptation"]["mode"] == "none"
    # Without the CT sinus mask the CT's sinus is read from its HU inside the kidney mask.
    out = files["root"] / "out_sinus_hu"
    argv = [*_args(files, out, "--no-adapt", "--no-video"), "--us-sinus-mask", str(us_sinus)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    transforms = read_transforms_json(out / "transforms.json", expected_frames=N_FRAMES)
    assert transforms.extras["plane_search"]["sinus_source"] == {"ct": "hu", "us": "masks"}


def test_sinus_masks_need_the_us_one_and_the_right_grid(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ct_sinus, us_sinus = _sinus_files(files)
    out = files["root"] / "out_bad_sinus"
    line = _error_line(_args(files, out, "--ct-sinus-mask", str(ct_sinus)), monkeypatch, capsys)
    assert line == "error: --ct-sinus-mask: needs --us-sinus-mask or --sinus-networks"
    # A U/S mask given as the CT sinus mask: another grid, named in the error.
    argv = _args(files, out, "--ct-sinus-mask", str(us_sinus), "--us-sinus-mask", str(us_sinus))
    line = _error_line(argv, monkeypatch, capsys)
    assert str(us_sinus) in line and "sinus mask" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("ct_mask", "us_mask", "trim"),
    [(True, True, False), (False, True, True), (False, False, False)],
)
def test_a_us_mask_without_a_ct_mask_trims_the_ct_networks_map(
    files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    ct_mask: bool,
    us_mask: bool,
    trim: bool,
) -> None:
    """Exact U/S outlines get the CT network's map cut back to the capsule (``trim_ct_fat``)."""
    import kidneyreg.pipeline as pipeline
    from kidneyreg.cli import _registrar_inputs

    seen: dict[str, bool] = {}

    class Recorder:
        def __init__(self, ct: object, model: object, **kwargs: object) -> None:
            seen["trim"] = bool(kwargs["trim_ct_fat"])

    monkeypatch.setattr(pipeline, "Registrar", Recorder)
    _registrar_inputs(
        ct=files["ct"],
        us=files["us"],
        ct_mask=files["ct_mask"] if ct_mask else None,
        us_mask=files["us_mask"] if us_mask else None,
        us_spacing=None,
        init=None,
        model=files["model"],
        ct_features=None,
        us_features=None,
        device="cpu",
        profile=None,
        kidney="auto",
    )
    assert seen == {"trim": trim}
