"""Tests of kidneyreg.geometry against SimpleITK itself."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from kidneyreg import geometry as g

RNG_SEED = 20260424


def _random_params(rng: np.random.Generator, n: int, margin: float = 0.1) -> np.ndarray:
    """Random rigid parameters with |ry| < pi/2 - margin (away from gimbal lock)."""
    angles = np.stack(
        [
            rng.uniform(-np.pi + 1e-3, np.pi - 1e-3, n),
            rng.uniform(-np.pi / 2 + margin, np.pi / 2 - margin, n),
            rng.uniform(-np.pi + 1e-3, np.pi - 1e-3, n),
        ],
        axis=1,
    )
    return np.concatenate([angles, rng.uniform(-100, 100, (n, 3))], axis=1)


def _sitk_euler(params: np.ndarray) -> sitk.Euler3DTransform:
    transform = sitk.Euler3DTransform()
    transform.SetComputeZYX(True)
    transform.SetCenter((0.0, 0.0, 0.0))
    transform.SetRotation(*(float(a) for a in params[:3]))
    transform.SetTranslation(tuple(float(t) for t in params[3:]))
    return transform


def _sitk_affine(matrix: np.ndarray) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(x) for x in matrix[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(x) for x in matrix[:3, 3]))
    return transform


# ----------------------------------------------------------------------------------------------
# Parameters <-> matrices
# ----------------------------------------------------------------------------------------------


def test_matrix_matches_sitk_euler_and_affine_on_points() -> None:
    rng = np.random.default_rng(RNG_SEED)
    points = rng.uniform(-200, 200, (20, 3))
    for params in _random_params(rng, 10, margin=0.0):
        matrix = g.euler_to_matrix(params)
        ours = g.transform_points(matrix, points)
        euler = _sitk_euler(params)
        affine = _sitk_affine(matrix)
        expected_euler = np.array([euler.TransformPoint(tuple(p)) for p in points])
        expected_affine = np.array([affine.TransformPoint(tuple(p)) for p in points])
        np.testing.assert_allclose(ours, expected_euler, atol=1e-9)
        np.testing.assert_allclose(ours, expected_affine, atol=1e-9)
        np.testing.assert_allclose(
            matrix[:3, :3], np.array(euler.GetMatrix()).reshape(3, 3), atol=1e-12
        )


def test_rotation_order_is_z_y_x() -> None:
    rx, ry, rz = 0.3, -0.4, 0.5
    single = [g.euler_to_matrix(p) for p in ([rx, 0, 0, 0, 0, 0], [0, ry, 0, 0, 0, 0])]
    single.append(g.euler_to_matrix([0, 0, rz, 0, 0, 0]))
    rot_x, rot_y, rot_z = single
    np.testing.assert_allclose(
        g.euler_to_matrix([rx, ry, rz, 0, 0, 0]), rot_z @ rot_y @ rot_x, atol=1e-12
    )
    # Positive rx turns +y towards +z (right-handed).
    np.testing.assert_allclose(
        g.transform_points(g.euler_to_matrix([np.pi / 2, 0, 0, 0, 0, 0]), [0, 1, 0]),
        [0, 0, 1],
        atol=1e-12,
    )


def test_euler_round_trip_away_from_gimbal_lock() -> None:
    rng = np.random.default_rng(RNG_SEED + 1)
    params = _random_params(rng, 200)
    recovered = g.matrix_to_euler(g.euler_to_matrix(params))
    np.testing.assert_allclose(recovered, params, atol=1e-9)
    # Single matrix in, single parameter vector out.
    assert g.matrix_to_euler(g.euler_to_matrix(params[0])).shape == (6,)


def test_euler_agrees_with_sitk_angles() -> None:
    rng = np.random.default_rng(RNG_SEED + 2)
    for params in _random_params(rng, 5):
        transform = sitk.Euler3DTransform()
        transform.SetComputeZYX(True)
        transform.SetMatrix(tuple(g.euler_to_matrix(params)[:3, :3].ravel()))
        sitk_angles = [transform.GetAngleX(), transform.GetAngleY(), transform.GetAngleZ()]
        recovered = g.matrix_to_euler(g.euler_to_matrix(params))[:3]
        np.testing.assert_allclose(
            g.euler_to_matrix([*recovered, 0, 0, 0]),
            g.euler_to_matrix([*sitk_angles, 0, 0, 0]),
            atol=1e-9,
        )


@pytest.mark.parametrize("ry", [np.pi / 2, -np.pi / 2])
def test_gimbal_lock_rebuilds_the_same_matrix(ry: float) -> None:
    matrix = g.euler_to_matrix([0.7, ry, -0.4, 1.0, 2.0, 3.0])
    params = g.matrix_to_euler(matrix)
    assert params[2] == 0.0
    assert abs(params[1] - ry) < 1e-6
    np.testing.assert_allclose(g.euler_to_matrix(params), matrix, atol=1e-9)
    params_t = g.matrix_to_euler_torch(torch.from_numpy(matrix))
    assert torch.all(torch.isfinite(params_t))
    np.testing.assert_allclose(g.euler_to_matrix(params_t.numpy()), matrix, atol=1e-9)


def test_numpy_and_torch_agree_and_keep_dtype_device() -> None:
    rng = np.random.default_rng(RNG_SEED + 3)
    params = _random_params(rng, 12).reshape(3, 4, 6)
    matrices = g.euler_to_matrix(params)
    assert matrices.shape == (3, 4, 4, 4)
    as_torch = g.euler_to_matrix_torch(torch.from_numpy(params))
    np.testing.assert_allclose(as_torch.numpy(), matrices, atol=1e-12)
    np.testing.assert_allclose(
        g.matrix_to_euler_torch(torch.from_numpy(matrices)).numpy(),
        g.matrix_to_euler(matrices),
        atol=1e-9,
    )
    np.testing.assert_allclose(
        g.invert_rigid_torch(torch.from_numpy(matrices)).numpy(),
        g.invert_rigid(matrices),
        atol=1e-12,
    )
    points = rng.uniform(-50, 50, (7, 3))
    np.testing.assert_allclose(
        g.transform_points_torch(torch.from_numpy(matrices[0, 0]), torch.from_numpy(points)),
        g.transform_points(matrices[0, 0], points),
        atol=1e-12,
    )
    single = torch.tensor(params[0, 0], dtype=torch.float32)
    for out in (
        g.euler_to_matrix_torch(single),
        g.invert_rigid_torch(g.euler_to_matrix_torch(single)),
    ):
        assert out.dtype == torch.float32 and out.device == single.device and out.shape == (4, 4)
    assert g.matrix_to_euler_torch(g.euler_to_matrix_torch(single)).dtype == torch.float32


def test_torch_gradients_flow() -> None:
    rng = np.random.default_rng(RNG_SEED + 4)
    params = torch.tensor(_random_params(rng, 3), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(g.euler_to_matrix_torch, (params,))
    matrices = g.euler_to_matrix_torch(params.detach()).requires_grad_(True)
    assert torch.autograd.gradcheck(g.invert_rigid_torch, (matrices,))
    # matrix_to_euler only along rigid directions: compose with the parameter map.
    assert torch.autograd.gradcheck(
        lambda p: g.matrix_to_euler_torch(g.euler_to_matrix_torch(p)), (params,)
    )
    # A loss on composed transforms reaches the parameters.
    loss = (
        g.invert_rigid_torch(g.euler_to_matrix_torch(params))
        @ torch.ones(4, 1, dtype=torch.float64)
    ).sum()
    loss.backward()
    assert params.grad is not None and torch.all(torch.isfinite(params.grad))
    assert torch.any(params.grad != 0)


def test_invert_and_compose_identities() -> None:
    rng = np.random.default_rng(RNG_SEED + 5)
    a, b, c = g.euler_to_matrix(_random_params(rng, 3))
    np.testing.assert_allclose(g.compose(a, g.invert_rigid(a)), np.eye(4), atol=1e-12)
    np.testing.assert_allclose(g.compose(g.invert_rigid(a), a), np.eye(4), atol=1e-12)
    np.testing.assert_allclose(g.invert_rigid(g.invert_rigid(a)), a, atol=1e-12)
    np.testing.assert_allclose(
        g.invert_rigid(g.compose(a, b)), g.compose(g.invert_rigid(b), g.invert_rigid(a)), atol=1e-12
    )
    np.testing.assert_allclose(g.compose(a, b, c), a @ b @ c, atol=1e-12)
    # The last matrix acts first on points.
    point = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(
        g.transform_points(g.compose(a, b), point),
        g.transform_points(a, g.transform_points(b, point)),
        atol=1e-9,
    )
    np.testing.assert_allclose(g.invert_rigid(a), np.linalg.inv(a), atol=1e-12)
    np.testing.assert_allclose(g.translation([1, 2, 3]) @ [0, 0, 0, 1], [1, 2, 3, 1])
    with pytest.raises(ValueError, match="at least one"):
        g.compose()


def test_is_rigid_rejects_non_rigid_matrices() -> None:
    rigid = g.euler_to_matrix([0.1, 0.2, 0.3, 10, 20, 30])
    assert g.is_rigid(rigid)
    assert g.is_rigid(np.stack([rigid, np.eye(4)]))
    scaled = rigid @ np.diag([1.01, 1.0, 1.0, 1.0])
    sheared = rigid.copy()
    sheared[0, 1] += 0.01
    reflected = rigid @ np.diag([-1.0, 1.0, 1.0, 1.0])
    bad_row = rigid.copy()
    bad_row[3, 0] = 0.5
    with_nan = rigid.copy()
    with_nan[0, 3] = np.nan
    for bad in (
        scaled,
        sheared,
        reflected,
        bad_row,
        with_nan,
        np.eye(3),
        np.stack([rigid, scaled]),
    ):
        assert not g.is_rigid(bad)
    # Within the tolerance (float32 round-off) is still rigid.
    assert g.is_rigid(rigid.astype(np.float32))


def test_rotation_angle_deg() -> None:
    for angle in (0.0, 1e-6, 5.0, 90.0, 179.0):
        axis = np.array([1.0, -2.0, 0.5]) / np.linalg.norm([1.0, -2.0, 0.5])
        rotation = sitk.VersorRigid3DTransform()
        rotation.SetRotation(tuple(axis), float(np.deg2rad(angle)))
        matrix = np.eye(4)
        matrix[:3, :3] = np.array(rotation.GetMatrix()).reshape(3, 3)
        assert abs(g.rotation_angle_deg(matrix) - angle) < 1e-7
    batch = g.euler_to_matrix(np.array([[0, 0, 0.5, 0, 0, 0], [0.5, 0, 0, 1, 1, 1]]))
    np.testing.assert_allclose(g.rotation_angles_deg(batch), np.degrees([0.5, 0.5]))
    with pytest.raises(ValueError):
        g.rotation_angle_deg(batch)


# ----------------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------------


def test_default_pose_rotation_follows_the_architecture() -> None:
    rot = g.DEFAULT_POSE_ROTATION
    np.testing.assert_array_equal(rot[:, 0], [0, 0, 1])  # u -> superior (+z in LPS)
    np.testing.assert_array_equal(rot[:, 1], [0, 1, 0])  # v -> posterior (+y)
    np.testing.assert_array_equal(rot[:, 2], np.cross(rot[:, 0], rot[:, 1]))
    np.testing.assert_array_equal(rot[:, 2], [-1, 0, 0])  # normal -> right (-x)
    assert g.is_rigid(g.make_rigid(rot, [0, 0, 0]))
    with pytest.raises(ValueError):
        rot[0, 0] = 1.0


def test_frame_pose_builds_and_checks_axes() -> None:
    pose = g.frame_pose([0, 0, 2.0], [0, 3.0, 0], [1, 2, 3])
    np.testing.assert_allclose(pose[:3, :3], g.DEFAULT_POSE_ROTATION)
    np.testing.assert_allclose(pose[:3, 3], [1, 2, 3])
    # Slightly non-orthogonal input is orthonormalised; u keeps its direction.
    nearly = g.frame_pose([1.0, 0, 0], [1e-4, 1.0, 0], [0, 0, 0])
    assert g.is_rigid(nearly, tol=1e-12)
    np.testing.assert_allclose(nearly[:3, 0], [1, 0, 0])
    with pytest.raises(ValueError, match="not orthogonal"):
        g.frame_pose([1.0, 0, 0], [0.5, 1.0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="non-zero"):
        g.frame_pose([0.0, 0, 0], [0, 1.0, 0], [0, 0, 0])


def test_us_pixel_to_mm_and_reference_image_place_pixels() -> None:
    rng = np.random.default_rng(RNG_SEED + 6)
    matrix = g.euler_to_matrix(_random_params(rng, 1)[0])
    pixel_size = (0.4, 0.7)
    ref = g.frame_reference_image(matrix, (5, 6), pixel_size)
    assert ref.GetSize() == (6, 5, 1)
    to_world = matrix @ g.us_pixel_to_mm(pixel_size)
    for row, col in [(0, 0), (4, 5), (2, 3)]:
        expected = (to_world @ [col, row, 0, 1])[:3]
        np.testing.assert_allclose(ref.TransformIndexToPhysicalPoint((col, row, 0)), expected)
    with pytest.raises(ValueError):
        g.us_pixel_to_mm((0.0, 1.0))
    with pytest.raises(ValueError):
        g.frame_reference_image(np.diag([2.0, 1, 1, 1]), (5, 6), pixel_size)
    with pytest.raises(ValueError):
        g.frame_reference_image(matrix, (0, 6), pixel_size)


# ----------------------------------------------------------------------------------------------
# Resampling on frames
# ----------------------------------------------------------------------------------------------


def _label_volume() -> sitk.Image:
    """A 40^3 label map (ellipsoids), stored with anisotropic spacing and a flipped direction."""
    z, y, x = np.mgrid[0:40, 0:40, 0:40].astype(np.float64)
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[((x - 20) / 14) ** 2 + ((y - 18) / 10) ** 2 + ((z - 21) / 16) ** 2 <= 1] = 1
    labels[((x - 24) / 5) ** 2 + ((y - 20) / 4) ** 2 + ((z - 18) / 6) ** 2 <= 1] = 2
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((2.5, 3.0, 3.5))
    image.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    image.SetOrigin((40.0, 50.0, -60.0))
    return image


def _oblique_pose(volume: sitk.Image, seed: int) -> np.ndarray:
    """A frame pose through the volume centre, tilted away from the default sagittal pose."""
    rng = np.random.default_rng(seed)
    centre = np.array(volume.TransformContinuousIndexToPhysicalPoint((19.5, 19.5, 19.5)))
    tilt = g.euler_to_matrix([*rng.uniform(-0.4, 0.4, 3), 0, 0, 0])
    pose = tilt @ g.make_rigid(g.DEFAULT_POSE_ROTATION, [0, 0, 0])
    # Put the frame's middle on the volume centre.
    pose[:3, 3] = centre - pose[:3, :3] @ np.array([30.0, 25.0, 0.0])
    return pose


def test_resample_on_frame_matches_sitk_resample_with_affine_transform() -> None:
    volume = _label_volume()
    frame_shape, pixel_size = (50, 60), (1.0, 1.0)
    for seed in range(3):
        pose = _oblique_pose(volume, seed)
        ours = g.resample_on_frame(volume, pose, frame_shape, pixel_size, interpolator="nearest")
        # SimpleITK on its own: a 2D-like reference at the U/S image coordinates, the pose as the
        # transform that maps output (U/S mm) points to input (world) points.
        reference = sitk.Image(frame_shape[1], frame_shape[0], 1, sitk.sitkUInt8)
        reference.SetSpacing((*pixel_size, 1.0))
        expected = sitk.GetArrayFromImage(
            sitk.Resample(volume, reference, _sitk_affine(pose), sitk.sitkNearestNeighbor, 0)
        )[0]
        assert ours.dtype == np.uint8
        assert np.count_nonzero(expected == 2) > 20  # the frame cuts the inner ellipsoid
        np.testing.assert_array_equal(ours, expected)
        linear = g.resample_on_frame(
            sitk.Cast(volume, sitk.sitkFloat32), pose, frame_shape, pixel_size
        )
        expected_linear = sitk.GetArrayFromImage(
            sitk.Resample(
                sitk.Cast(volume, sitk.sitkFloat32), reference, _sitk_affine(pose), sitk.sitkLinear
            )
        )[0]
        np.testing.assert_allclose(linear, expected_linear, atol=1e-5)


def test_resample_on_frames_stacks_frames_and_handles_outside() -> None:
    volume = sitk.Cast(_label_volume(), sitk.sitkFloat32)
    poses = np.stack([_oblique_pose(volume, seed) for seed in range(4)])
    far = poses[0].copy()
    far[:3, 3] += 1000.0  # entirely outside the volume
    poses = np.concatenate([poses, far[None]])
    for interpolator in ("nearest", "linear", "bspline"):
        stack = g.resample_on_frames(
            volume, poses, (30, 40), (1.5, 1.5), interpolator=interpolator, default_value=-5.0
        )
        assert stack.shape == (5, 30, 40)
        assert np.all(stack[4] == -5.0)
        for k in range(4):
            single = g.resample_on_frame(
                volume, poses[k], (30, 40), (1.5, 1.5), interpolator=interpolator, default_value=-5
            )
            np.testing.assert_allclose(stack[k], single, atol=1e-5)


def test_bspline_cropping_matches_uncropped_resampling(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(RNG_SEED + 7)
    noise = sitk.GetImageFromArray(rng.normal(0, 100, (80, 80, 80)).astype(np.float32))
    noise.SetSpacing((1.0, 1.2, 0.9))
    pose = _oblique_pose(noise, 5)
    crops: list[tuple[int, ...]] = []
    original_crop = g._footprint_crop

    def recording_crop(*args: object) -> sitk.Image | None:
        out = original_crop(*args)  # type: ignore[arg-type]
        crops.append(out.GetSize() if out is not None else ())
        return out

    monkeypatch.setattr(g, "_footprint_crop", recording_crop)
    ours = g.resample_on_frame(noise, pose, (20, 24), (0.7, 0.7), interpolator="bspline")
    assert len(crops) == 1 and np.prod(crops[0]) < 0.5 * 80**3  # it really cropped
    reference = g.frame_reference_image(pose, (20, 24), (0.7, 0.7))
    full = sitk.GetArrayFromImage(
        sitk.Resample(noise, reference, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    )[0]
    assert np.abs(full).max() > 10
    np.testing.assert_allclose(ours, full, atol=1e-3)  # noise std 100: relative 1e-5


def test_resampling_rejects_bad_arguments() -> None:
    volume = _label_volume()
    with pytest.raises(ValueError, match="interpolator"):
        g.resample_on_frame(volume, np.eye(4), (5, 5), (1, 1), interpolator="cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rigid"):
        g.resample_on_frames(volume, np.diag([1, 2, 1, 1])[None], (5, 5), (1, 1))
    with pytest.raises(ValueError, match="pixel_size"):
        g.resample_on_frame(volume, np.eye(4), (5, 5), (1, -1))
    with pytest.raises(TypeError):
        g.resample_on_frame(np.zeros((3, 3, 3)), np.eye(4), (5, 5), (1, 1))  # type: ignore[arg-type]


def test_interpolate_rigid_slerps_rotations_and_blends_translations() -> None:
    first = g.euler_to_matrix([0.1, -0.2, 0.3, 1.0, 2.0, 3.0])
    last = g.euler_to_matrix([0.3, 0.1, 0.2, -5.0, 4.0, 9.0])
    out = g.interpolate_rigid([2, 6], [first, last], [0, 2, 3, 6, 9])
    np.testing.assert_allclose(out[[0, 1]], [first, first], atol=1e-12)  # before and at the start
    np.testing.assert_allclose(out[[3, 4]], [last, last], atol=1e-12)  # at and after the end
    assert all(g.is_rigid(m) for m in out)
    # A quarter of the way: a quarter of the relative rotation, a quarter of the translation.
    relative = np.linalg.inv(first[:3, :3]) @ out[2, :3, :3]
    whole = np.linalg.inv(first[:3, :3]) @ last[:3, :3]
    assert np.isclose(g.rotation_angle_deg(relative), g.rotation_angle_deg(whole) / 4)
    np.testing.assert_allclose(out[2, :3, 3], first[:3, 3] + (last[:3, 3] - first[:3, 3]) / 4)
    with pytest.raises(ValueError, match="increasing"):
        g.interpolate_rigid([3, 1], [first, last], [2])
    with pytest.raises(ValueError, match="one time per matrix"):
        g.interpolate_rigid([1], [first, last], [2])
