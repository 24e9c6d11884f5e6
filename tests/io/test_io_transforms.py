"""Tests of kidneyreg.io.transforms: transforms.json, ITK .tfm files and the parameter CSV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kidneyreg.io import transforms as transforms_io
from kidneyreg.io.transforms import (
    CONVENTION,
    TransformSequence,
    read_parameters_csv,
    read_tfm,
    read_transforms_json,
    write_parameters_csv,
    write_tfm,
    write_transforms_json,
)


def _rigid(seed: int) -> np.ndarray:
    """A random proper rigid 4x4 (rotation from a QR decomposition, translation in mm)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    matrix = np.eye(4)
    matrix[:3, :3] = q
    matrix[:3, 3] = rng.uniform(-200, 200, 3)
    return matrix


def _document(n: int = 4) -> dict:
    return {
        "convention": CONVENTION,
        "frames": [{"index": k, "matrix": _rigid(k).tolist()} for k in range(n)],
    }


def test_transforms_json_round_trip_is_exact(tmp_path: Path) -> None:
    matrices = np.stack([_rigid(k) for k in range(5)])
    extras = {"model": "kidneyregnet", "timing_s": np.float32(1.5), "cycle": np.array([0, 3])}
    frame_extras = [{"confidence": float(k) / 4, "loss": np.float64("nan")} for k in range(5)]
    path = write_transforms_json(
        tmp_path / "out" / "transforms.json", matrices, frame_extras=frame_extras, extras=extras
    )
    document = json.loads(path.read_text())
    assert document["convention"] == "us_image_mm_to_ct_world_lps"
    assert [frame["index"] for frame in document["frames"]] == list(range(5))
    assert document["frames"][2]["matrix"][3] == [0.0, 0.0, 0.0, 1.0]
    assert document["frames"][1]["loss"] is None  # JSON has no NaN
    assert path.read_text().count("\n") < 20  # one frame per line, not one number per line

    back = read_transforms_json(path, expected_frames=5)
    assert back.matrices.dtype == np.float64
    np.testing.assert_array_equal(back.matrices, matrices)  # repr precision: bit-exact
    assert back.indices == list(range(5))
    assert back.frame_extras[3] == {"confidence": 0.75, "loss": None}
    assert back.extras == {"model": "kidneyregnet", "timing_s": 1.5, "cycle": [0, 3]}
    assert back.source == str(path) and len(back) == 5

    single = read_transforms_json(write_transforms_json(tmp_path / "one.json", matrices[0]))
    assert single.matrices.shape == (1, 4, 4)


def test_broadcast_one_pose_to_every_frame(tmp_path: Path, expect_input_error) -> None:
    path = write_transforms_json(tmp_path / "init.json", _rigid(3), frame_extras=[{"w": 1}])
    poses = read_transforms_json(path).broadcast_to(6)
    assert poses.matrices.shape == (6, 4, 4) and poses.indices == list(range(6))
    np.testing.assert_array_equal(poses.matrices[5], _rigid(3))
    assert poses.frame_extras[4] == {"w": 1}
    many = read_transforms_json(write_transforms_json(tmp_path / "three.json", [np.eye(4)] * 3))
    assert many.broadcast_to(3) is many
    expect_input_error(lambda: many.broadcast_to(5), "three.json", "expected 1 .* or 5")


def _bad(document: dict, mutate: str) -> dict | str:
    frames = document["frames"]
    if mutate == "wrong convention":
        document["convention"] = "ras"
    elif mutate == "no convention":
        del document["convention"]
    elif mutate == "no frames":
        del document["frames"]
    elif mutate == "empty frames":
        document["frames"] = []
    elif mutate == "3x4 matrix":
        frames[3]["matrix"] = frames[3]["matrix"][:3]
    elif mutate == "text in matrix":
        frames[3]["matrix"][0][0] = "one"
    elif mutate == "bottom row":
        frames[3]["matrix"][3] = [0, 0, 0.5, 1]
    elif mutate == "scaled":
        frames[3]["matrix"] = (np.diag([1.01, 1, 1, 1]) @ np.array(frames[3]["matrix"])).tolist()
    elif mutate == "mirror":
        frames[3]["matrix"] = (np.diag([-1, 1, 1, 1]) @ np.array(frames[3]["matrix"])).tolist()
    elif mutate == "NaN":
        text = json.dumps(document)
        return text.replace(str(frames[3]["matrix"][0][3]), "NaN", 1)
    elif mutate == "unsorted":
        frames[1]["index"], frames[2]["index"] = 2, 1
    elif mutate == "duplicate":
        frames[2]["index"] = 1
    elif mutate == "from one":
        for frame in frames:
            frame["index"] += 1
    elif mutate == "no index":
        del frames[0]["index"]
    elif mutate == "list":
        return json.dumps(frames)
    return document


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        ("wrong convention", 'convention is "ras", expected "us_image_mm_to_ct_world_lps"'),
        ("no convention", "convention is missing"),
        ("no frames", "no 'frames' list"),
        ("empty frames", "no 'frames' list"),
        ("3x4 matrix", r"frame 3 matrix is not 4x4"),
        ("text in matrix", "frame 3 matrix is not a 4x4 array of numbers"),
        ("bottom row", r"frame 3 matrix bottom row is not \[0, 0, 0, 1\]"),
        ("scaled", "frame 3 matrix is not rigid"),
        ("mirror", "frame 3 matrix is not rigid .*determinant -1"),
        ("NaN", "frame 3 matrix has non-finite values"),
        ("unsorted", "frame indices must be 0..3 in order; entry 1 has index 2"),
        ("duplicate", "entry 2 has index 1"),
        ("from one", "entry 0 has index 1"),
        ("no index", "frame entry 0 lacks 'index'"),
        ("list", "is not a JSON object"),
    ],
)
def test_transforms_json_validation(
    tmp_path: Path, mutate: str, pattern: str, expect_input_error
) -> None:
    document = _bad(_document(), mutate)
    path = tmp_path / "transforms.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    expect_input_error(lambda: read_transforms_json(path), path, pattern)


def test_transforms_json_file_problems(tmp_path: Path, expect_input_error) -> None:
    missing = tmp_path / "missing.json"
    expect_input_error(lambda: read_transforms_json(missing), missing, "does not exist")
    broken = tmp_path / "broken.json"
    broken.write_text('{"convention": "us_image_mm_to_ct_world_lps",\n "frames": [')
    expect_input_error(lambda: read_transforms_json(broken), broken, "not valid JSON .* line 2")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_document(4)))
    expect_input_error(
        lambda: read_transforms_json(good, expected_frames=6), good, "has 4 frames, the U/S .* 6"
    )


def test_writer_rejects_what_the_reader_would(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="frame 1 matrix is not rigid"):
        write_transforms_json(tmp_path / "t.json", [np.eye(4), np.diag([2.0, 1, 1, 1])])
    with pytest.raises(ValueError, match=r"\(n, 4, 4\)"):
        write_transforms_json(tmp_path / "t.json", np.eye(3))
    with pytest.raises(ValueError, match="keys"):
        write_transforms_json(tmp_path / "t.json", np.eye(4), extras={"frames": 1})
    with pytest.raises(ValueError, match="keys"):
        write_transforms_json(tmp_path / "t.json", np.eye(4), frame_extras=[{"matrix": 1}])
    with pytest.raises(ValueError, match="2 frame_extras for 1"):
        write_transforms_json(tmp_path / "t.json", np.eye(4), frame_extras=[{}, {}])
    with pytest.raises(TypeError, match="cannot be written"):
        write_transforms_json(tmp_path / "t.json", np.eye(4), extras={"x": object()})
    assert not list(tmp_path.iterdir())


def test_tfm_round_trip_through_simpleitk(tmp_path: Path) -> None:
    matrix = _rigid(7)
    path = write_tfm(tmp_path / "frame_0003.tfm", matrix)
    transform = sitk.ReadTransform(str(path))
    assert transform.GetName() == "AffineTransform"
    points = np.random.default_rng(0).uniform(-100, 100, (6, 3))
    for point in points:
        expected = matrix[:3, :3] @ point + matrix[:3, 3]
        assert transform.TransformPoint(point.tolist()) == pytest.approx(expected, abs=1e-9)
    np.testing.assert_allclose(read_tfm(path), matrix, atol=1e-12)


def test_tfm_reslices_the_ct_on_the_us_frame(tmp_path: Path) -> None:
    # A CT whose value is a linear function of the LPS position: linear interpolation is exact,
    # so the resliced frame must equal the function at M @ [u, v, 0, 1].
    def value(points: np.ndarray) -> np.ndarray:
        return points @ np.array([1.0, -2.0, 0.5]) + 10.0

    grid = np.stack(np.meshgrid(*[np.arange(60)] * 3, indexing="ij"), axis=-1)  # (i, j, k)
    positions = grid * 2.0 - 60.0
    ct = sitk.GetImageFromArray(np.transpose(value(positions), (2, 1, 0)))
    ct.SetSpacing((2.0, 2.0, 2.0))
    ct.SetOrigin((-60.0, -60.0, -60.0))

    pose = np.eye(4)
    pose[:3, :3] = _rigid(11)[:3, :3]
    pose[:3, 3] = (-5.0, 3.0, 2.0)
    path = write_tfm(tmp_path / "pose.tfm", pose)
    sx, sy, rows, cols = 0.5, 0.4, 30, 40
    frame = sitk.Image(cols, rows, 1, sitk.sitkFloat64)
    frame.SetSpacing((sx, sy, 1.0))
    resliced = sitk.Resample(ct, frame, sitk.ReadTransform(str(path)), sitk.sitkLinear)
    got = sitk.GetArrayFromImage(resliced)[0]
    rr, cc = np.mgrid[0:rows, 0:cols]
    us_points = np.stack([cc * sx, rr * sy, np.zeros_like(rr), np.ones_like(rr)], axis=-1)
    world = (us_points.astype(float) @ pose.T)[..., :3]
    np.testing.assert_allclose(got, value(world), atol=1e-6)


def test_read_tfm_handles_centres_composites_and_rejects_deformations(
    tmp_path: Path, expect_input_error
) -> None:
    euler = sitk.Euler3DTransform((10.0, -4.0, 7.0), 0.2, -0.1, 0.4, (3.0, 2.0, 1.0))
    similarity = sitk.Similarity3DTransform(1.2, (0, 0, 1), 0.3, (1.0, 0.0, -2.0), (5.0, 5.0, 5.0))
    composite = sitk.CompositeTransform([euler, similarity])
    points = np.random.default_rng(1).uniform(-50, 50, (5, 3))
    for name, transform in [("euler.tfm", euler), ("composite.tfm", composite)]:
        path = tmp_path / name
        sitk.WriteTransform(transform, str(path))
        matrix = read_tfm(path)
        for point in points:
            expected = sitk.ReadTransform(str(path)).TransformPoint(point.tolist())
            got = matrix[:3, :3] @ point + matrix[:3, 3]
            np.testing.assert_allclose(got, expected, atol=1e-9)

    bspline = tmp_path / "deformable.tfm"
    sitk.WriteTransform(sitk.BSplineTransform(3), str(bspline))
    expect_input_error(lambda: read_tfm(bspline), bspline, "BSplineTransform, not an affine")
    flat = tmp_path / "flat.tfm"
    sitk.WriteTransform(sitk.Euler2DTransform(), str(flat))
    expect_input_error(lambda: read_tfm(flat), flat, "2D transform")
    junk = tmp_path / "junk.tfm"
    junk.write_text("not a transform\n")
    expect_input_error(lambda: read_tfm(junk), junk, "cannot be read as an ITK transform")
    expect_input_error(lambda: read_tfm(tmp_path / "none.tfm"), "none.tfm", "does not exist")
    with pytest.raises(ValueError):
        write_tfm(tmp_path / "bad.tfm", np.ones((4, 4)))
    with pytest.raises(ValueError, match="needs one of"):
        write_tfm(tmp_path / "pose", np.eye(4))


def test_failed_tfm_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = write_tfm(tmp_path / "pose.tfm", _rigid(1))
    before = target.read_bytes()

    def crash(transform: sitk.Transform, name: str) -> None:
        Path(name).write_text("#Insight Transform File V1.0\n")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(transforms_io.sitk, "WriteTransform", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_tfm(target, _rigid(2))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pose.tfm"]


def test_parameter_csv_round_trip_in_degrees(tmp_path: Path) -> None:
    params = np.array([[0.1, -0.2, np.pi / 6, 1.5, -2.25, 30.0], [0, 0, 0, 0, 0, 0]], float)
    path = write_parameters_csv(tmp_path / "parameters.csv", params, indices=[4, 5])
    lines = path.read_text().splitlines()
    assert lines[0] == "frame,rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm"
    first = lines[1].split(",")
    assert first[0] == "4"
    assert float(first[3]) == pytest.approx(30.0, abs=1e-12)
    assert float(first[4]) == 1.5
    np.testing.assert_allclose(read_parameters_csv(path), params, rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        write_parameters_csv(tmp_path / "p.csv", np.zeros((2, 5)))
    with pytest.raises(ValueError):
        write_parameters_csv(tmp_path / "p.csv", np.zeros((2, 6)), indices=[0])


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("frame,rx,ry,rz,tx,ty,tz\n0,0,0,0,0,0,0\n", "header must be"),
        ("frame,rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm\n", "no parameter rows"),
        ("frame,rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm\n0,1,2,3\n", "line 2 has 4 fields"),
        ("frame,rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm\n0,1,2,x,4,5,6\n", "not a number"),
        ("frame,rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm\n0,1,2,nan,4,5,6\n", "NaN"),
    ],
)
def test_parameter_csv_validation(
    tmp_path: Path, text: str, pattern: str, expect_input_error
) -> None:
    path = tmp_path / "params.csv"
    path.write_text(text)
    expect_input_error(lambda: read_parameters_csv(path), path, pattern)


def test_transform_sequence_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        TransformSequence(np.zeros((2, 3, 3)), [0, 1])
    with pytest.raises(ValueError):
        TransformSequence(np.zeros((2, 4, 4)), [0])
