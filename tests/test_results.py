"""Tests of kidneyreg.results: the registration result folder and reading it back."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as iio
import numpy as np
import pytest
import SimpleITK as sitk

import kidneyreg.results as results
import kidneyreg.visualize as visualize
from kidneyreg.errors import InputError
from kidneyreg.geometry import (
    DEFAULT_POSE_ROTATION,
    euler_to_matrix,
    make_rigid,
    matrix_to_euler,
    resample_on_frames,
    transform_points,
)
from kidneyreg.io import (
    UltrasoundSequence,
    read_parameters_csv,
    read_transforms_json,
)
from kidneyreg.results import (
    OUTPUT_FILES,
    RegistrationResult,
    read_registration_result,
    write_registration_outputs,
)

N_FRAMES = 10
FRAME_SHAPE = (24, 32)  # rows (depth), cols (lateral)
PIXEL = (1.5, 1.5)
KIDNEY_CENTRE = np.array([2.0, -4.0, 6.0])


@dataclass
class Scene:
    ct: sitk.Image
    mask: sitk.Image
    us: UltrasoundSequence
    us_masks: np.ndarray
    matrices: np.ndarray


def _scene() -> Scene:
    """A 40^3 CT at 2 mm (oblique direction) with an ellipsoid kidney and 10 U/S frames on it."""
    size, spacing = 40, 2.0
    # A rotated, flipped-axis grid: world coordinates must come from the image geometry.
    direction = euler_to_matrix([0.2, -0.1, np.pi / 2, 0, 0, 0])[:3, :3] @ np.diag([1, -1, -1])
    origin = -direction @ np.full(3, (size - 1) * spacing / 2)
    zyx = np.indices((size, size, size), dtype=np.float64)
    index = np.stack([zyx[2], zyx[1], zyx[0]], axis=-1)
    world = origin + (index * spacing) @ direction.T
    rel = world - KIDNEY_CENTRE
    inside = (rel[..., 0] / 12) ** 2 + (rel[..., 1] / 9) ** 2 + (rel[..., 2] / 20) ** 2 <= 1
    # Smooth background gradient so that interpolated values differ from pixel to pixel.
    hu = 40.0 + 1.5 * world[..., 0] - 2.0 * world[..., 1] + 0.8 * world[..., 2]
    hu = np.where(inside, 180.0 + hu / 4, hu)
    ct = sitk.GetImageFromArray(np.rint(hu).astype(np.int16))
    ct.SetSpacing((spacing,) * 3)
    ct.SetOrigin(tuple(origin))
    ct.SetDirection(tuple(direction.ravel()))
    ct = sitk.Cast(ct, sitk.sitkFloat32)
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(ct)
    rows, cols = FRAME_SHAPE
    half = DEFAULT_POSE_ROTATION @ np.array([cols * PIXEL[0] / 2, rows * PIXEL[1] / 2, 0.0])
    matrices = []
    for k in range(N_FRAMES):
        breathing = np.array([0.0, 1.0, 4.0]) * np.sin(2 * np.pi * k / 6)
        tilt = euler_to_matrix([0.03 * k, 0.0, -0.02 * k, 0, 0, 0])[:3, :3]
        rotation = tilt @ DEFAULT_POSE_ROTATION
        offset = KIDNEY_CENTRE + breathing - tilt @ half
        matrices.append(make_rigid(rotation, offset))
    mats = np.stack(matrices)
    planes = resample_on_frames(ct, mats, FRAME_SHAPE, PIXEL, default_value=-1024)
    frames = np.clip((planes + 200.0) / 2.0, 0, 255).round().astype(np.uint8)
    us_masks = resample_on_frames(mask, mats, FRAME_SHAPE, PIXEL, interpolator="nearest")
    us = UltrasoundSequence(frames, PIXEL, frame_rate=18.0, source="synthetic")
    return Scene(ct, mask, us, us_masks.astype(np.uint8), mats)


@pytest.fixture(scope="module")
def scene() -> Scene:
    return _scene()


def _result(scene: Scene, **changes: object) -> RegistrationResult:
    n = scene.us.n_frames
    rng = np.random.default_rng(3)
    loss = rng.uniform(0.1, 0.9, n)
    loss[4] = np.nan  # a frame without a loss value
    arguments: dict[str, object] = {
        "matrices": scene.matrices,
        "initial_matrices": scene.matrices[0] @ euler_to_matrix([0.1, 0.0, 0.0, 2.0, 0.0, 0.0]),
        "loss_terms": {"loss": loss, "mind": rng.uniform(0, 1, n)},
        "window_centres": np.clip(np.arange(n), 1, n - 2),
        "cycle_starts": [0, 6],
        "adaptation": "one-cycle",
        "adaptation_frames": (0, 6),
        "timing": {"adaptation_s": 12.5, "ms_per_frame": 20.0},
        "profile": "tiny",
        "model_id": "pretrained-tiny.pt",
        "device": "cpu",
        "extras": {"inputs": {"ct": "ct.nii.gz", "us": "us.nii.gz"}},
        "warnings": ["breathing detected on 2 cycles only"],
    }
    arguments.update(changes)
    return RegistrationResult(**arguments)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def written(scene: Scene, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("register") / "out"
    return write_registration_outputs(
        out, _result(scene), scene.ct, scene.us, ct_kidney_mask=scene.mask, us_masks=scene.us_masks
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_every_output_is_written(written: dict[str, Path]) -> None:
    assert set(written) == set(OUTPUT_FILES)
    for key, path in written.items():
        assert path.exists(), key
        if path.is_file():
            assert path.stat().st_size > 0, key
    assert sorted(p.name for p in written["tfm"].iterdir()) == [
        f"frame_{k:04d}.tfm" for k in range(N_FRAMES)
    ]
    assert _leftovers(written["transforms"].parent.parent) == []


def test_outputs_have_the_usual_permissions(written: dict[str, Path]) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [written["transforms"], written["montage"], written["tfm"] / "frame_0000.tfm"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_transforms_json_reads_back(written: dict[str, Path], scene: Scene) -> None:
    poses = read_transforms_json(written["transforms"], expected_frames=N_FRAMES)
    np.testing.assert_array_equal(poses.matrices, scene.matrices)
    document = json.loads(written["transforms"].read_text())
    assert document["cycle_starts"] == [0, 6]
    assert document["timing"] == {"adaptation_s": 12.5, "ms_per_frame": 20.0}
    assert document["adaptation"] == {"mode": "one-cycle", "frames": [0, 6]}
    assert document["profile"] == "tiny"
    assert document["frame_shape"] == list(FRAME_SHAPE)
    assert document["inputs"] == {"ct": "ct.nii.gz", "us": "us.nii.gz"}
    frames = document["frames"]
    assert frames[4]["confidence"]["loss"] is None  # NaN is written as null
    assert frames[3]["confidence"]["mind"] == pytest.approx(_result(scene).loss_terms["mind"][3])
    assert [f["window_centre"] for f in frames] == [1, 1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert [f["in_adaptation_cycle"] for f in frames] == [True] * 6 + [False] * 4
    params = matrix_to_euler(scene.matrices)
    shown = frames[7]["rigid_params"]
    assert shown["rx_deg"] == pytest.approx(np.degrees(params[7, 0]))
    assert shown["tz_mm"] == pytest.approx(params[7, 5])


def test_parameters_csv_holds_the_euler_parameters(written: dict[str, Path], scene: Scene) -> None:
    np.testing.assert_allclose(
        read_parameters_csv(written["parameters"]), matrix_to_euler(scene.matrices), atol=1e-9
    )


def test_every_tfm_maps_points_like_m(written: dict[str, Path], scene: Scene) -> None:
    points = np.array([[0.0, 0.0, 0.0], [10.0, 5.0, 0.0], [47.0, 35.0, 0.0], [3.0, -2.0, 7.0]])
    for k, matrix in enumerate(scene.matrices):
        transform = sitk.ReadTransform(str(written["tfm"] / f"frame_{k:04d}.tfm"))
        mapped = np.array([transform.TransformPoint(tuple(p)) for p in points])
        np.testing.assert_allclose(mapped, transform_points(matrix, points), atol=1e-9)


def test_ct_planes_overlay_the_us_grid_and_reslice_the_ct(
    written: dict[str, Path], scene: Scene
) -> None:
    planes = sitk.ReadImage(str(written["ct_planes"]))
    grid = scene.us.to_image()
    assert planes.GetSize() == grid.GetSize()
    assert planes.GetSpacing() == pytest.approx(grid.GetSpacing())
    assert planes.GetOrigin() == pytest.approx(grid.GetOrigin())
    assert planes.GetDirection() == pytest.approx(grid.GetDirection())
    values = sitk.GetArrayFromImage(planes)
    sx, sy = PIXEL
    for k, row, col in [(0, 12, 16), (3, 5, 30), (7, 20, 2), (9, 11, 11)]:
        world = transform_points(scene.matrices[k], [col * sx, row * sy, 0.0])
        expected = scene.ct.EvaluateAtPhysicalPoint(tuple(world), sitk.sitkLinear)
        # Stored as int16 HU: rounding changes a value by at most 0.5.
        assert abs(float(values[k, row, col]) - expected) <= 0.5 + 1e-4
    # A pixel whose plane point lies outside the CT is air.
    far = make_rigid(np.eye(3), [500.0, 500.0, 500.0])
    one = UltrasoundSequence(scene.us.frames[:1], PIXEL)
    outside = results._ct_planes(scene.ct, far[None], one)
    assert np.all(outside == -1024)


def test_kidney_mask_planes_match_the_nearest_reslice(
    written: dict[str, Path], scene: Scene
) -> None:
    kidney = sitk.GetArrayFromImage(sitk.ReadImage(str(written["ct_kidney_mask_planes"])))
    np.testing.assert_array_equal(kidney, scene.us_masks)


def test_montage_and_video(written: dict[str, Path]) -> None:
    montage = iio.imread(written["montage"])
    assert montage.shape[0] > 300 and montage.shape[1] > 300
    reader = iio.get_reader(written["video"], format="FFMPEG")
    try:
        assert reader.count_frames() == N_FRAMES
        first = reader.get_data(0)
    finally:
        reader.close()
    assert first.shape[0] % 16 == 0 and first.shape[1] % 16 == 0
    assert first.shape[1] == 4 * FRAME_SHAPE[1]  # small frames are upscaled (at most 4 times)


def test_timing_json(written: dict[str, Path]) -> None:
    timing = json.loads(written["timing"].read_text())
    assert timing["adaptation_s"] == 12.5
    assert timing["ms_per_frame"] == 20.0
    assert timing["frames_per_second"] == pytest.approx(50.0)
    assert timing["n_frames"] == N_FRAMES
    assert timing["outputs_s"] > 0


def test_read_registration_result_round_trip(written: dict[str, Path], scene: Scene) -> None:
    original = _result(scene)
    back = read_registration_result(written["transforms"].parent)
    np.testing.assert_array_equal(back.matrices, original.matrices)
    assert original.initial_matrices is not None and back.initial_matrices is not None
    np.testing.assert_array_equal(back.initial_matrices, original.initial_matrices)
    assert set(back.loss_terms) == {"loss", "mind"}
    np.testing.assert_array_equal(back.loss_terms["loss"], original.loss_terms["loss"])
    assert back.window_centres is not None and original.window_centres is not None
    np.testing.assert_array_equal(back.window_centres, original.window_centres)
    assert back.cycle_starts == [0, 6]
    assert back.adaptation == "one-cycle"
    assert back.adaptation_frames == (0, 6)
    assert back.timing == original.timing
    assert (back.profile, back.model_id, back.device) == ("tiny", "pretrained-tiny.pt", "cpu")
    assert back.extras == {"inputs": {"ct": "ct.nii.gz", "us": "us.nii.gz"}}
    assert back.warnings == original.warnings
    assert back.frame_extras is None


def test_read_registration_result_rejects_bad_metadata(tmp_path: Path, scene: Scene) -> None:
    out = tmp_path / "out"
    write_registration_outputs(out, _result(scene), scene.ct, scene.us, overlays=False, video=False)
    document = json.loads((out / "transforms.json").read_text())
    document["frames"][2]["window_centre"] = 99
    (out / "transforms.json").write_text(json.dumps(document))
    with pytest.raises(InputError, match=r"transforms\.json"):
        read_registration_result(out)
    with pytest.raises(InputError, match="does not exist"):
        read_registration_result(tmp_path / "nothing")


def test_failure_midway_leaves_previous_outputs_intact(
    tmp_path: Path, scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    write_registration_outputs(
        out, _result(scene), scene.ct, scene.us, ct_kidney_mask=scene.mask, video=False
    )
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)

    def broken(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("disk full")

    # The video is the last output written: everything else is staged when it fails.
    monkeypatch.setattr(visualize, "write_overlay_video", broken)
    moved = scene.matrices.copy()
    moved[:, :3, 3] += 1.0
    with pytest.raises(RuntimeError, match="disk full"):
        write_registration_outputs(
            out, _result(scene, matrices=moved), scene.ct, scene.us, ct_kidney_mask=scene.mask
        )
    assert _snapshot(out) == before
    assert _leftovers(tmp_path) == []


def test_failure_on_a_new_folder_creates_nothing(
    tmp_path: Path, scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> Path:
        raise OSError("cannot write")

    monkeypatch.setattr(results, "write_image", broken)
    with pytest.raises(OSError, match="cannot write"):
        write_registration_outputs(tmp_path / "new", _result(scene), scene.ct, scene.us)
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_own_outputs_and_keeps_others(tmp_path: Path, scene: Scene) -> None:
    out = tmp_path / "out"
    write_registration_outputs(
        out, _result(scene), scene.ct, scene.us, ct_kidney_mask=scene.mask, video=False
    )
    (out / "report.html").write_text("<p>kept</p>")
    (out / "tfm" / "frame_0009.tfm").stat()
    # A shorter sequence, without the kidney map and without overlays.
    short = UltrasoundSequence(scene.us.frames[:4], PIXEL)
    result = RegistrationResult(scene.matrices[:4])
    paths = write_registration_outputs(out, result, scene.ct, short, overlays=False, video=False)
    assert (out / "report.html").read_text() == "<p>kept</p>"
    assert sorted(p.name for p in (out / "tfm").iterdir()) == [
        f"frame_{k:04d}.tfm" for k in range(4)
    ]
    assert not (out / "overlays" / "montage.png").exists()  # stale: other transforms
    assert not (out / "ct_kidney_mask_planes.nii.gz").exists()
    assert "montage" not in paths and "video" not in paths
    assert read_transforms_json(out / "transforms.json").n_frames == 4
    assert _leftovers(tmp_path) == []


def test_soft_kidney_map_is_thresholded(tmp_path: Path, scene: Scene) -> None:
    soft = sitk.SmoothingRecursiveGaussian(sitk.Cast(scene.mask, sitk.sitkFloat32), 1.0)
    paths = write_registration_outputs(
        tmp_path / "out",
        _result(scene),
        scene.ct,
        scene.us,
        ct_kidney_mask=soft,
        overlays=False,
        video=False,
    )
    kidney = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["ct_kidney_mask_planes"])))
    assert set(np.unique(kidney)) <= {0, 1}
    overlap = (
        np.logical_and(kidney, scene.us_masks).sum() / np.logical_or(kidney, scene.us_masks).sum()
    )
    assert overlap > 0.85


def test_bad_inputs_raise_before_writing(tmp_path: Path, scene: Scene) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="frames"):
        write_registration_outputs(out, RegistrationResult(scene.matrices[:3]), scene.ct, scene.us)
    with pytest.raises(ValueError, match="us_masks"):
        write_registration_outputs(
            out, _result(scene), scene.ct, scene.us, us_masks=scene.us_masks[:, :5]
        )
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        write_registration_outputs(tmp_path / "file", _result(scene), scene.ct, scene.us)
    (tmp_path / "file").unlink()
    with pytest.raises(TypeError, match="SimpleITK"):
        write_registration_outputs(out, _result(scene), np.zeros((4, 4, 4)), scene.us)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_registration_result_validation(scene: Scene) -> None:
    n = N_FRAMES
    with pytest.raises(ValueError, match="rigid"):
        RegistrationResult(scene.matrices * 2)
    with pytest.raises(ValueError, match="loss term"):
        RegistrationResult(scene.matrices, loss_terms={"loss": np.zeros(n - 1)})
    with pytest.raises(ValueError, match="window_centres"):
        RegistrationResult(scene.matrices, window_centres=np.full(n, n))
    with pytest.raises(ValueError, match="cycle_starts"):
        RegistrationResult(scene.matrices, cycle_starts=[5, 2])
    with pytest.raises(ValueError, match="adaptation_frames"):
        RegistrationResult(scene.matrices, adaptation_frames=(4, 4))
    with pytest.raises(ValueError, match="timing"):
        RegistrationResult(scene.matrices, timing={"ms_per_frame": float("nan")})
    with pytest.raises(ValueError, match="initial_matrices"):
        RegistrationResult(scene.matrices, initial_matrices=np.zeros((n, 4, 4)))
    with pytest.raises(ValueError, match="frame_extras may not use"):
        RegistrationResult(scene.matrices, frame_extras=[{"matrix": 1}] * n)
    result = RegistrationResult(scene.matrices, initial_matrices=np.eye(4))
    assert result.initial_matrices is not None and result.initial_matrices.shape == (n, 4, 4)
