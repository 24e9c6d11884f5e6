"""Tests of kidneyreg.preprocess: the paper's preprocessing and its inverse."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from kidneyreg import geometry as g
from kidneyreg import preprocess as pp
from kidneyreg.errors import InputError
from kidneyreg.profiles import get_profile

TINY = get_profile("tiny")
RAS_LIKE = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
KIDNEY_CENTER_INDEX = np.array([22.3, 17.6, 19.2])  # x, y, z of the synthetic kidney
KIDNEY_SEMI_AXES_MM = np.array([22.0, 18.0, 32.0])


def _world_grid(image: sitk.Image) -> np.ndarray:
    """World position of every voxel, array [z, y, x, 3]."""
    size = image.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)
    idx = np.transpose(idx, (2, 1, 0, 3)).astype(np.float64)  # [z, y, x, (i, j, k)]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (idx * np.array(image.GetSpacing())) @ direction.T


def _synthetic_ct(
    direction: tuple[float, ...] = RAS_LIKE, spacing: tuple[float, float, float] = (2.5, 3.0, 3.5)
) -> tuple[sitk.Image, sitk.Image]:
    """A 40^3 CT (smooth HU field + a kidney ellipsoid) and its kidney mask, same grid."""
    reference = sitk.Image(40, 40, 40, sitk.sitkUInt8)
    reference.SetSpacing(spacing)
    reference.SetDirection(direction)
    reference.SetOrigin((35.0, -20.0, -70.0))
    world = _world_grid(reference)
    kidney_world = np.array(
        reference.TransformContinuousIndexToPhysicalPoint(tuple(KIDNEY_CENTER_INDEX))
    )
    inside = np.sum(((world - kidney_world) / KIDNEY_SEMI_AXES_MM) ** 2, axis=-1) <= 1.0
    hu = 40.0 + 60.0 * np.sin(world[..., 0] / 17.0) * np.cos(world[..., 1] / 23.0)
    hu += 0.8 * world[..., 2]
    hu[inside] += 120.0
    ct = sitk.GetImageFromArray(hu.astype(np.float32))
    ct.CopyInformation(reference)
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(reference)
    return ct, mask


def _blob_ct(center_world: np.ndarray, sigma_mm: float = 3.0) -> sitk.Image:
    """A 40^3 RAS-like image with a Gaussian blob at ``center_world``."""
    image = sitk.Image(40, 40, 40, sitk.sitkFloat32)
    image.SetSpacing((2.0, 2.5, 3.0))
    image.SetDirection(RAS_LIKE)
    image.SetOrigin((40.0, 45.0, -60.0))
    world = _world_grid(image)
    values = 1000.0 * np.exp(-np.sum((world - center_world) ** 2, axis=-1) / (2 * sigma_mm**2))
    blob = sitk.GetImageFromArray(values.astype(np.float32))
    blob.CopyInformation(image)
    return blob


def _tilted_pose(angles_deg: tuple[float, float, float]) -> np.ndarray:
    tilt = g.euler_to_matrix([*np.deg2rad(angles_deg), 0.0, 0.0, 0.0])
    return tilt @ g.make_rigid(g.DEFAULT_POSE_ROTATION, [5.0, -3.0, 12.0])


# ----------------------------------------------------------------------------------------------
# Explicit CT steps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "direction",
    [RAS_LIKE, (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)],
)
def test_reorient_rai_gives_identity_direction_and_keeps_positions(
    direction: tuple[float, ...],
) -> None:
    ct, _ = _synthetic_ct(direction)
    oriented = pp.reorient_rai(ct)
    assert oriented.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert oriented.GetPixelID() == ct.GetPixelID()
    original = sitk.GetArrayViewFromImage(ct)
    values = sitk.GetArrayViewFromImage(oriented)
    for index in [(0, 0, 0), (39, 0, 5), (7, 31, 12), (39, 39, 39)]:
        point = oriented.TransformIndexToPhysicalPoint(index)
        source = ct.TransformPhysicalPointToIndex(point)
        np.testing.assert_allclose(ct.TransformIndexToPhysicalPoint(source), point, atol=1e-9)
        assert values[index[::-1]] == original[source[::-1]]


def test_reorient_rai_resamples_an_oblique_image() -> None:
    tilt = g.euler_to_matrix([0.05, -0.08, 0.1, 0, 0, 0])[:3, :3]
    image = sitk.Image(30, 30, 30, sitk.sitkFloat32)
    image.SetDirection(tuple((tilt @ np.diag([-1.0, -1.0, 1.0])).ravel()))
    image.SetSpacing((2.0, 2.0, 2.0))
    world = _world_grid(image)
    ramp = sitk.GetImageFromArray((world @ [1.0, -2.0, 0.5]).astype(np.float32))
    ramp.CopyInformation(image)
    oriented = pp.reorient_rai(ramp, default_value=-7.0)
    assert oriented.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    values = sitk.GetArrayFromImage(oriented)
    new_world = _world_grid(oriented)
    source_index = np.array(
        [image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in new_world.reshape(-1, 3)]
    ).reshape(new_world.shape)
    # Strictly between the original voxel centres (ITK clamps within the half-voxel border).
    inside = np.all((source_index >= 0) & (source_index <= 29), axis=-1)
    outside = np.any((source_index < -0.5) | (source_index > 29.5), axis=-1)
    assert inside.mean() > 0.5 and outside.sum() > 0  # corners of the box are outside
    # Linear interpolation of a linear field is exact.
    np.testing.assert_allclose(values[inside], (new_world @ [1.0, -2.0, 0.5])[inside], atol=1e-3)
    assert np.all(values[outside] == -7.0)


def test_resample_isotropic_keeps_extent_and_values() -> None:
    ct, _ = _synthetic_ct()
    world = _world_grid(ct)
    ramp = sitk.GetImageFromArray((world @ [0.5, 1.0, -1.5]).astype(np.float32))
    ramp.CopyInformation(ct)
    out = pp.resample_isotropic(ramp, 2.0)
    assert out.GetSpacing() == (2.0, 2.0, 2.0)
    assert out.GetSize() == (50, 60, 70)  # 40 * (2.5, 3.0, 3.5) / 2
    assert out.GetDirection() == ct.GetDirection()
    centre_old = ct.TransformContinuousIndexToPhysicalPoint((19.5, 19.5, 19.5))
    centre_new = out.TransformContinuousIndexToPhysicalPoint((24.5, 29.5, 34.5))
    np.testing.assert_allclose(centre_new, centre_old, atol=1e-9)
    values = sitk.GetArrayFromImage(out)
    expected = _world_grid(out) @ [0.5, 1.0, -1.5]
    np.testing.assert_allclose(values[2:-2, 2:-2, 2:-2], expected[2:-2, 2:-2, 2:-2], atol=1e-3)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="spacing"):
            pp.resample_isotropic(ct, bad)


def test_antialiasing_suppresses_stripes_when_downsampling() -> None:
    # Period 2.5 voxels: resolved at 1 mm, far above the Nyquist frequency of a 3 mm grid.
    wave = 100.0 * np.cos(2 * np.pi * np.arange(64) / 2.5)
    image = sitk.GetImageFromArray(np.broadcast_to(wave, (8, 8, 64)).astype(np.float32))
    plain = sitk.GetArrayFromImage(pp.resample_isotropic(image, 3.0))
    smooth = sitk.GetArrayFromImage(pp.resample_isotropic(image, 3.0, antialias=True))
    assert np.ptp(plain[2, 2, 2:-2]) > 50.0  # aliased: a false low-frequency pattern
    assert np.ptp(smooth[2, 2, 2:-2]) < 0.15 * np.ptp(plain[2, 2, 2:-2])
    np.testing.assert_allclose(smooth[2, 2, 2:-2], 0.0, atol=5.0)
    np.testing.assert_allclose(pp.antialias_sigmas_mm((1.0, 3.0, 4.0), 3.0), [0.4 * 8**0.5, 0, 0])


def test_crop_or_pad_centres_and_pads() -> None:
    ct, _ = _synthetic_ct(spacing=(3.2, 3.2, 3.2))
    ct = pp.reorient_rai(ct)
    center = np.array(ct.TransformContinuousIndexToPhysicalPoint((3.4, 20.6, 35.2)))
    crop = pp.crop_or_pad(ct, center, (11, 12, 13), default_value=pp.CT_AIR_HU)
    assert crop.GetSize() == (11, 12, 13)
    assert crop.GetSpacing() == ct.GetSpacing() and crop.GetDirection() == ct.GetDirection()
    middle = np.array(crop.TransformIndexToPhysicalPoint((5, 6, 6)))
    np.testing.assert_allclose(middle, ct.TransformIndexToPhysicalPoint((3, 21, 35)))
    assert np.all(np.abs(middle - center) <= 0.5 * 3.2 + 1e-9)
    values = sitk.GetArrayViewFromImage(crop)
    source = sitk.GetArrayViewFromImage(ct)
    # x indices 3-5 .. 3+5 -> the first two crop columns are beyond the image: padded.
    assert np.all(values[:, :, :2] == pp.CT_AIR_HU)
    # z indices 35-6 .. 35+6 -> the last two crop slices are beyond the image.
    assert np.all(values[-2:] == pp.CT_AIR_HU)
    np.testing.assert_array_equal(values[:-2, :, 2:], source[29:40, 15:27, 0:9])
    entirely_outside = pp.crop_or_pad(ct, center + 1000.0, (4, 4, 4), default_value=-5.0)
    assert np.all(sitk.GetArrayViewFromImage(entirely_outside) == -5.0)


def test_kidney_centroid_of_an_ellipsoid_and_empty_mask() -> None:
    _, mask = _synthetic_ct()
    expected = np.array(mask.TransformContinuousIndexToPhysicalPoint(tuple(KIDNEY_CENTER_INDEX)))
    np.testing.assert_allclose(pp.kidney_centroid(mask), expected, atol=0.5)
    empty = sitk.Image(5, 5, 5, sitk.sitkUInt8)
    with pytest.raises(InputError, match=r"^ct_kidney_mask.nii.gz: kidney mask is empty$"):
        pp.kidney_centroid(empty, source="ct_kidney_mask.nii.gz")
    # A label map with two kidneys: pick one by its label.
    two = sitk.Image(20, 5, 5, sitk.sitkUInt8)
    two[2:4, 2, 2] = 1
    two[15:17, 2, 2] = 2
    np.testing.assert_allclose(pp.kidney_centroid(two), [9.0, 2.0, 2.0])
    np.testing.assert_allclose(pp.kidney_centroid(two, label=2), [15.5, 2.0, 2.0])
    with pytest.raises(InputError, match="label 3"):
        pp.kidney_centroid(two, label=3)


def test_normalize_ct_window() -> None:
    out = pp.normalize_ct(np.array([-3000.0, -200.0, 100.0, 400.0, 3000.0]))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert out.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# Registration grid
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("antialias", [False, True])
def test_grid_resample_equals_the_explicit_path(antialias: bool) -> None:
    ct, mask = _synthetic_ct()  # stored RAS-like, anisotropic: every step does something
    centroid = pp.kidney_centroid(mask)
    explicit = pp.crop_or_pad(
        pp.resample_isotropic(pp.reorient_rai(ct), TINY.spacing, antialias=antialias),
        centroid,
        TINY.volume_shape,
        default_value=pp.CT_AIR_HU,
    )
    explicit_values = sitk.GetArrayFromImage(explicit)
    # The crop snaps the centroid to the isotropic lattice; a grid on that lattice must give the
    # very same samples.
    snapped = np.array(
        explicit.TransformIndexToPhysicalPoint(tuple(int(n) // 2 for n in TINY.volume_shape))
    )
    assert np.all(np.abs(snapped - centroid) <= TINY.spacing / 2 + 1e-9)
    grid = pp.RegistrationGrid.around(snapped, TINY)
    ours = grid.resample(ct, default_value=pp.CT_AIR_HU, antialias=antialias)
    assert ours.shape == explicit_values.shape == TINY.volume_shape[::-1]
    assert np.count_nonzero(ours == pp.CT_AIR_HU) > 0.2 * ours.size  # padding happened
    assert np.count_nonzero(ours != pp.CT_AIR_HU) > 0.2 * ours.size
    np.testing.assert_allclose(ours, explicit_values, atol=1e-3)
    # On the exact (unsnapped) centroid the grid differs only by interpolation.
    exact = pp.RegistrationGrid.around(centroid, TINY).resample(
        ct, default_value=pp.CT_AIR_HU, antialias=antialias
    )
    both_inside = (exact != pp.CT_AIR_HU) & (explicit_values != pp.CT_AIR_HU)
    assert both_inside.mean() > 0.2
    difference = np.abs(exact - explicit_values)[both_inside]
    assert np.median(difference) < 10.0  # HU; the content varies by ~300 HU


def test_grid_coordinates_round_trip_exactly() -> None:
    rng = np.random.default_rng(7)
    pose = _tilted_pose((15.0, -10.0, 20.0))
    grid = pp.RegistrationGrid.from_initial_pose(pose, [12.0, -30.0, 40.0], TINY)
    points = rng.uniform(-150, 150, (50, 3))
    np.testing.assert_allclose(
        grid.internal_to_world(grid.world_to_internal(points)), points, atol=1e-9
    )
    np.testing.assert_allclose(grid.index_to_world(grid.world_to_index(points)), points, atol=1e-9)
    np.testing.assert_allclose(grid.index_to_world(grid.center_index), [12.0, -30.0, 40.0])
    np.testing.assert_allclose(
        grid.index_to_internal([16, 28, 36]), [0.0, 0.0, 0.0]
    )  # tiny: (32, 56, 72) // 2
    reference = grid.reference_image()
    assert reference.GetSize() == TINY.volume_shape
    for index in [(0, 0, 0), (31, 55, 71), (3, 40, 9)]:
        np.testing.assert_allclose(
            reference.TransformIndexToPhysicalPoint(index), grid.index_to_world(index), atol=1e-9
        )
    inner = g.euler_to_matrix([0.1, 0.0, -0.2, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(grid.to_world_matrix(inner), grid.matrix @ inner)
    with pytest.raises(ValueError, match="rigid"):
        pp.RegistrationGrid(TINY, np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError):
        grid.matrix[0, 0] = 5.0  # read-only


@pytest.mark.parametrize("angles", [(0.0, 0.0, 0.0), (15.0, -10.0, 20.0)])
def test_a_ct_point_comes_back_within_a_voxel(angles: tuple[float, float, float]) -> None:
    blob_world = np.array([10.0, 5.0, -3.0])
    ct = _blob_ct(blob_world)
    grid = pp.RegistrationGrid.from_initial_pose(_tilted_pose(angles), [4.0, 0.0, 2.0], TINY)
    volume = grid.resample(ct)
    peak_zyx = np.unravel_index(np.argmax(volume), volume.shape)
    peak_index = np.array(peak_zyx[::-1], dtype=np.float64)
    expected_index = grid.world_to_index(blob_world)
    assert np.all(np.abs(peak_index - expected_index) <= 1.0)
    back = grid.index_to_world(peak_index)
    assert np.linalg.norm(back - blob_world) <= np.sqrt(3) * TINY.spacing


def test_prepare_ct_puts_the_kidney_centroid_on_the_grid_origin() -> None:
    ct, mask = _synthetic_ct()
    for pose in (None, _tilted_pose((12.0, 8.0, -15.0))):
        prepared = pp.prepare_ct(ct, mask, TINY, pose=pose)
        assert prepared.image.dtype == np.float32 and prepared.image.shape == (72, 56, 32)
        assert prepared.mask is not None and prepared.mask.dtype == np.uint8
        zyx = np.array(np.nonzero(prepared.mask), dtype=np.float64)
        centroid_index = zyx.mean(axis=1)[::-1]
        assert np.all(np.abs(centroid_index - prepared.grid.center_index) <= 0.5)
        np.testing.assert_allclose(prepared.grid.matrix[:3, 3], pp.kidney_centroid(mask))
        # Kidney voxels are brighter than their surroundings, air pads the outside.
        assert prepared.image[prepared.mask == 1].mean() > prepared.image[prepared.mask == 0].mean()
        assert prepared.image.min() == pp.CT_AIR_HU
        assert 0.0 <= prepared.normalized().min() and prepared.normalized().max() <= 1.0
    with pytest.raises(InputError, match="empty"):
        pp.prepare_ct(ct, mask * 0, TINY)
    with pytest.raises(ValueError, match="mask or a centroid"):
        pp.prepare_ct(ct, None, TINY)
    without_mask = pp.prepare_ct(ct, None, "tiny", centroid_world=[0.0, 0.0, 0.0])
    assert without_mask.mask is None


def test_rotated_grid_puts_the_pose_plane_on_the_middle_x_slice() -> None:
    pose = _tilted_pose((18.0, -12.0, 25.0))
    centroid = np.array([3.0, 8.0, -5.0])
    grid = pp.RegistrationGrid.from_initial_pose(pose, centroid, TINY)
    nx, ny, nz = TINY.volume_shape
    np.testing.assert_allclose(grid.rotation[:, 1], pose[:3, 1])  # y = depth v
    np.testing.assert_allclose(grid.rotation[:, 2], pose[:3, 0])  # z = lateral u
    # Every voxel centre of the middle x slice is on the pose's plane through the centroid.
    yy, zz = np.meshgrid(np.arange(ny), np.arange(nz), indexing="ij")
    middle = np.stack([np.full(yy.size, nx // 2), yy.ravel(), zz.ravel()], axis=1)
    normal = pose[:3, 2]
    np.testing.assert_allclose((grid.index_to_world(middle) - centroid) @ normal, 0.0, atol=1e-9)
    # Content: a thin bright sheet on that plane shows on the middle slice only.
    ct = _blob_ct(np.zeros(3))
    world = _world_grid(ct)
    sheet = 1000.0 * np.exp(-((((world - centroid) @ normal) / 5.0) ** 2))
    sheet_image = sitk.GetImageFromArray(sheet.astype(np.float32))
    sheet_image.CopyInformation(ct)
    volume = grid.resample(sheet_image)
    inside = grid.resample(sitk.Cast(ct * 0 + 1, sitk.sitkFloat32)) > 0.5
    assert inside[:, :, nx // 2].mean() > 0.1
    # Linear interpolation of the 2-3 mm source loses at most ~10 % of the sheet's peak.
    assert volume[:, :, nx // 2][inside[:, :, nx // 2]].min() > 850.0
    for x in (nx // 2 - 3, nx // 2 + 3):  # 9.6 mm away: exp(-(9.6 / 5) ** 2) = 2.5 %
        assert volume[:, :, x][inside[:, :, x]].max() < 60.0


def test_target_frame_through_p_and_g_equals_m_init() -> None:
    pose = _tilted_pose((10.0, 5.0, -20.0))
    ct, mask = _synthetic_ct()
    prepared = pp.prepare_ct(ct, mask, TINY, pose=pose, antialias=False)
    grid = prepared.grid
    s = TINY.spacing
    rows, cols = TINY.us_shape
    # Centroid on the U/S lattice of pixel size s: crop pixel (r, c) is U/S pixel (r, c).
    centroid_uv = ((cols // 2) * s, (rows // 2) * s)
    transforms = pp.window_transforms(centroid_uv, TINY)
    target = transforms[TINY.window // 2]
    m_init = pp.initial_alignment(grid, target)
    assert g.is_rigid(m_init)
    np.testing.assert_allclose(m_init[:3, :3], pose[:3, :3], atol=1e-12)
    np.testing.assert_allclose(
        g.transform_points(m_init, [*centroid_uv, 0.0]), pp.kidney_centroid(mask), atol=1e-9
    )
    # Pixel (u, v) -> P -> internal -> index -> world equals M_init applied directly.
    rng = np.random.default_rng(3)
    uv = np.concatenate([rng.uniform(0, 200, (20, 2)), np.zeros((20, 1))], axis=1)
    via_grid = grid.index_to_world(grid.internal_to_index(g.transform_points(target, uv)))
    np.testing.assert_allclose(via_grid, g.transform_points(m_init, uv), atol=1e-9)
    # Rendering the CT on the target frame through M_init = the middle x slice of the grid.
    frame = g.resample_on_frame(ct, m_init, (rows, cols), (s, s), default_value=pp.CT_AIR_HU)
    middle = grid.resample(ct, default_value=pp.CT_AIR_HU)[:, :, TINY.volume_shape[0] // 2]
    assert np.count_nonzero(frame != pp.CT_AIR_HU) > 0.2 * frame.size
    np.testing.assert_allclose(middle.T, frame, atol=1e-2)
    np.testing.assert_allclose(middle.T, prepared.image[:, :, 16].T, atol=1e-2)
    with pytest.raises(ValueError, match="rigid"):
        pp.initial_alignment(grid, np.diag([1.0, 2.0, 1.0, 1.0]))


def test_default_pose_initial_alignment_is_the_sagittal_plane() -> None:
    grid = pp.RegistrationGrid.around([1.0, 2.0, 3.0], TINY)
    np.testing.assert_array_equal(grid.rotation, np.eye(3))
    same = pp.RegistrationGrid.from_initial_pose(
        g.make_rigid(g.DEFAULT_POSE_ROTATION, [50.0, 50.0, 50.0]), [1.0, 2.0, 3.0], TINY
    )
    np.testing.assert_allclose(same.matrix, grid.matrix, atol=1e-15)
    m_init = pp.initial_alignment(grid, pp.window_transforms((40.0, 30.0), TINY)[2])
    np.testing.assert_allclose(m_init[:3, :3], g.DEFAULT_POSE_ROTATION)
    np.testing.assert_allclose(m_init[:3, 3], [1.0, 2.0 - 30.0, 3.0 - 40.0])


# ----------------------------------------------------------------------------------------------
# U/S side
# ----------------------------------------------------------------------------------------------


def test_window_indices_replicate_the_ends() -> None:
    np.testing.assert_array_equal(pp.window_indices(10, 4, 5), [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(pp.window_indices(10, 0, 5), [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(pp.window_indices(10, 9, 5), [7, 8, 9, 9, 9])
    np.testing.assert_array_equal(pp.window_indices(2, 1, 5), [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(pp.window_indices(3, 1, 1), [1])
    for args in ((10, 10, 5), (10, -1, 5), (0, 0, 5), (10, 2, 0)):
        with pytest.raises(ValueError):
            pp.window_indices(*args)


def test_resample_us_frames_keeps_us_coordinates() -> None:
    rows, cols, sx, sy = 120, 90, 0.45, 0.6
    cc, rr = np.meshgrid(np.arange(cols), np.arange(rows))
    frames = np.stack([cc * sx + 2.0 * rr * sy + k for k in range(3)]).astype(np.float32)
    out, size = pp.resample_us_frames(frames, (sx, sy), 1.6, antialias=True)
    assert size == (1.6, 1.6)
    assert out.shape == (3, int((rows - 1) * sy / 1.6) + 1, int((cols - 1) * sx / 1.6) + 1)
    cc2, rr2 = np.meshgrid(np.arange(out.shape[2]), np.arange(out.shape[1]))
    expected = np.stack([cc2 * 1.6 + 2.0 * rr2 * 1.6 + k for k in range(3)])
    # Away from the border the pre-filter leaves a linear ramp unchanged.
    np.testing.assert_allclose(out[:, 3:-3, 3:-3], expected[:, 3:-3, 3:-3], atol=1e-3)
    labels = (frames > 40).astype(np.uint8)
    nearest, _ = pp.resample_us_frames(labels, (sx, sy), 1.6, interpolator="nearest")
    assert nearest.dtype == np.uint8 and set(np.unique(nearest)) == {0, 1}
    with pytest.raises(ValueError):
        pp.resample_us_frames(frames, (sx, 0.0), 1.6)
    with pytest.raises(ValueError):
        pp.resample_us_frames(frames, (sx, sy), -1.0)
    with pytest.raises(ValueError):
        pp.resample_us_frames(frames[0], (sx, sy), 1.6)


def _gaussian_frames(
    n: int, rows: int, cols: int, pixel: tuple[float, float], blobs: dict[int, tuple[float, float]]
) -> np.ndarray:
    """Frames with a Gaussian blob (sigma 4 mm) at U/S mm (u, v) in the listed frames."""
    cc, rr = np.meshgrid(np.arange(cols) * pixel[0], np.arange(rows) * pixel[1])
    frames = np.zeros((n, rows, cols), dtype=np.float32)
    for k, (u, v) in blobs.items():
        frames[k] = 200.0 * np.exp(-((cc - u) ** 2 + (rr - v) ** 2) / (2 * 4.0**2))
    return frames


def test_a_us_blob_lands_at_the_right_place_of_the_window() -> None:
    pixel = (0.5, 0.4)
    blob_uv = (120.0, 40.0)
    centroid_uv = (101.3, 57.9)  # deliberately off every lattice
    frames = _gaussian_frames(7, 300, 400, pixel, {3: blob_uv})
    window = pp.build_us_window(frames, pixel, 3, centroid_uv, TINY)
    volume, transforms = window
    nx, ny, nz = TINY.volume_shape
    s = TINY.spacing
    assert volume.shape == (nz, ny, nx) and volume.dtype == np.float32
    assert transforms.shape == (TINY.window, 4, 4) and window.P is transforms
    middle = volume[:, :, nx // 2]
    zz, yy = np.meshgrid(np.arange(nz), np.arange(ny), indexing="ij")
    weights = np.where(middle > 0.01 * middle.max(), middle, 0.0)
    found = np.array([(weights * yy).sum(), (weights * zz).sum()]) / weights.sum()
    expected = np.array(
        [ny // 2 + (blob_uv[1] - centroid_uv[1]) / s, nz // 2 + (blob_uv[0] - centroid_uv[0]) / s]
    )
    np.testing.assert_allclose(found, expected, atol=0.05)
    # The blob is only in the target frame; all frames lie on their x slices; zero elsewhere.
    others = [x for x in range(nx) if x != nx // 2]
    assert np.abs(volume[:, :, others]).max() < 1e-3 * middle.max()
    ones = pp.build_us_window(np.ones_like(frames), pixel, 3, centroid_uv, TINY).volume
    occupied = np.flatnonzero(ones.max(axis=(0, 1)) > 0)
    np.testing.assert_array_equal(occupied, np.arange(nx // 2 - 2, nx // 2 + 3))
    # P maps the blob to the internal point of the voxel where it landed.
    internal = g.transform_points(transforms[TINY.window // 2], [*blob_uv, 0.0])
    np.testing.assert_allclose(
        internal, [0.0, (expected[0] - ny // 2) * s, (expected[1] - nz // 2) * s], atol=1e-9
    )


def test_window_frames_go_to_their_slices_and_edges_replicate() -> None:
    pixel = (0.5, 0.5)
    centroid_uv = (80.0, 60.0)
    blobs = {k: (60.0 + 10.0 * k, 60.0) for k in range(4)}
    frames = _gaussian_frames(4, 240, 320, pixel, blobs)
    nx, _, nz = TINY.volume_shape
    s = TINY.spacing
    for center, expected_frames in ((0, [0, 0, 0, 1, 2]), (3, [1, 2, 3, 3, 3])):
        volume, transforms = pp.build_us_window(frames, pixel, center, centroid_uv, TINY)
        for k, frame_index in enumerate(expected_frames):
            x = nx // 2 + k - TINY.window // 2
            slice_ = volume[:, :, x]
            z_peak = np.unravel_index(np.argmax(slice_), slice_.shape)[0]
            u_blob = blobs[frame_index][0]
            assert abs(z_peak - (nz // 2 + (u_blob - centroid_uv[0]) / s)) <= 0.5
            np.testing.assert_allclose(transforms[k][0, 3], (k - TINY.window // 2) * s)


def test_us_window_resampling_is_exact_in_mm() -> None:
    pixel = (0.3, 0.35)
    rows, cols = 500, 700
    cc, rr = np.meshgrid(np.arange(cols) * pixel[0], np.arange(rows) * pixel[1])
    ramp = np.stack([cc + 1000.0 * rr] * 6).astype(np.float64)  # value encodes (u, v)
    centroid_uv = (97.37, 61.21)
    volume, transforms = pp.build_us_window(ramp, pixel, 2, centroid_uv, TINY, antialias=False)
    _, ny, nz = TINY.volume_shape
    s = TINY.spacing
    zz, yy = np.meshgrid(np.arange(nz), np.arange(ny), indexing="ij")
    u = centroid_uv[0] + (zz - nz // 2) * s
    v = centroid_uv[1] + (yy - ny // 2) * s
    inside = (u <= (cols - 1) * pixel[0]) & (v <= (rows - 1) * pixel[1]) & (u >= 0) & (v >= 0)
    assert inside.mean() > 0.5 and (~inside).any()
    middle = volume[:, :, TINY.volume_shape[0] // 2]
    np.testing.assert_allclose(middle[inside], (u + 1000.0 * v)[inside], rtol=1e-6, atol=0.05)
    far_outside = (u > (cols - 1) * pixel[0] + s) | (v > (rows - 1) * pixel[1] + s)
    assert np.all(middle[far_outside] == 0.0)
    # And P takes (u, v) exactly to the internal mm of that voxel.
    internal = g.transform_points(transforms[2], np.stack([u[3, 4], v[3, 4], 0.0]))
    np.testing.assert_allclose(internal, [0.0, (4 - ny // 2) * s, (3 - nz // 2) * s], atol=1e-9)


def test_us_kidney_centroid_and_nearest_window_for_masks() -> None:
    mask = np.zeros((7, 200, 260), dtype=np.uint8)
    mask[:, 80:121, 100:161] = 1
    uv = pp.us_kidney_centroid(mask[3], (0.5, 0.4))
    np.testing.assert_allclose(uv, [130 * 0.5, 100 * 0.4])
    volume, _ = pp.build_us_window(mask, (0.5, 0.4), 3, uv, TINY, interpolator="nearest")
    assert set(np.unique(volume)) == {0.0, 1.0}
    z, y = np.nonzero(volume[:, :, TINY.volume_shape[0] // 2])
    assert abs(z.mean() - TINY.volume_shape[2] // 2) <= 0.5
    assert abs(y.mean() - TINY.volume_shape[1] // 2) <= 0.5
    with pytest.raises(InputError, match="empty"):
        pp.us_kidney_centroid(np.zeros((5, 5)), (1.0, 1.0))
    with pytest.raises(ValueError):
        pp.build_us_window(mask, (0.5, 0.0), 3, uv, TINY)
    with pytest.raises(ValueError):
        pp.build_us_window(mask, (0.5, 0.4), 7, uv, TINY)


def test_grid_resample_labels_and_outside() -> None:
    _, mask = _synthetic_ct()
    labels = sitk.Cast(mask * 3, sitk.sitkUInt8)
    grid = pp.RegistrationGrid.around(pp.kidney_centroid(mask), TINY)
    nearest = grid.resample(labels, interpolator="nearest")
    assert nearest.dtype == np.uint8 and set(np.unique(nearest)) == {0, 3}
    smooth = grid.resample(labels, interpolator="bspline")
    assert smooth.dtype == np.float32 and abs(float(smooth[36, 28, 16]) - 3.0) < 0.1
    far = pp.RegistrationGrid.around([5000.0, 0.0, 0.0], TINY)
    assert np.all(far.resample(labels, interpolator="nearest", default_value=7) == 7)
    assert np.all(far.resample(labels, default_value=-1000.0) == -1000.0)


def test_prefiltered_frames_give_the_same_windows() -> None:
    rng = np.random.default_rng(4)
    frames = rng.random((7, 260, 300)).astype(np.float32)  # 0.3 mm pixels, cpu profile 1.6 mm
    filtered = pp.antialias_frames(frames, (0.3, 0.3), "cpu")
    assert filtered.shape == frames.shape and filtered.std() < frames.std()
    for centre, uv in ((0, (45.0, 39.0)), (3, (40.0, 30.0)), (6, (60.0, 50.0))):
        direct = pp.build_us_window(frames, (0.3, 0.3), centre, uv, "cpu").volume
        prefiltered = pp.build_us_window(
            filtered, (0.3, 0.3), centre, uv, "cpu", antialias=False
        ).volume
        np.testing.assert_allclose(prefiltered, direct, atol=1e-4)
    # Frames already at (or coarser than) the profile's spacing are not filtered.
    coarse = rng.random((3, 40, 50)).astype(np.float32)
    np.testing.assert_array_equal(pp.antialias_frames(coarse, (2.0, 2.0), "cpu"), coarse)


@pytest.fixture(scope="module")
def tiny_case() -> Any:
    """A tiny simulated patient (both kidneys in its label map, the right one in its mask)."""
    from kidneyreg.simulate.case import simulate_case_data

    return simulate_case_data(0, frames=2, profile="tiny")


def _mask_on(reference: sitk.Image, array: np.ndarray) -> sitk.Image:
    """``array`` as a uint8 mask on ``reference``'s grid."""
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_fill_renal_sinus_gives_a_parenchyma_only_mask_its_capsule(tiny_case: Any) -> None:
    case = tiny_case
    capsule = sitk.GetArrayFromImage(case.ct_kidney_mask) > 0
    sinus = sitk.GetArrayFromImage(case.sinus_masks()[0]) > 0
    assert (capsule & sinus).sum() > 0.1 * capsule.sum()

    def mask_image(array: np.ndarray) -> sitk.Image:
        return _mask_on(case.ct_kidney_mask, array)

    # A mask that already holds its sinus (the simulator's) is left as it is.
    same, added = pp.fill_renal_sinus(case.ct_kidney_mask, case.ct)
    assert added == 0 and np.array_equal(sitk.GetArrayFromImage(same) > 0, capsule)
    # The parenchyma alone, as TotalSegmentator labels a kidney: its sinus comes back.
    parenchyma = capsule & ~sinus
    filled, added = pp.fill_renal_sinus(mask_image(parenchyma), case.ct)
    result = sitk.GetArrayFromImage(filled) > 0
    assert added == int((result & ~parenchyma).sum()) > 0.7 * (capsule & sinus).sum()
    assert not (result & ~capsule).any()
    dice = 2 * (result & capsule).sum() / (result.sum() + capsule.sum())
    assert dice > 0.98 > 2 * parenchyma.sum() / (parenchyma.sum() + capsule.sum())
    # Enhanced tissue (a contrast-filled vessel in the hilum) is not sinus; an empty mask stays.
    hu = sitk.GetArrayFromImage(case.ct).astype(np.float32)
    hu[capsule & sinus] = 250.0
    bright = sitk.GetImageFromArray(hu)
    bright.CopyInformation(case.ct)
    assert pp.fill_renal_sinus(mask_image(parenchyma), bright)[1] == 0
    assert pp.fill_renal_sinus(mask_image(np.zeros_like(capsule)), case.ct)[1] == 0


def test_renal_sinus_is_read_from_hu_inside_either_kind_of_kidney_mask(tiny_case: Any) -> None:
    from kidneyreg.simulate.tissues import Tissue

    case = tiny_case
    capsule = sitk.GetArrayFromImage(case.ct_kidney_mask) > 0
    truth = capsule & (sitk.GetArrayFromImage(case.sinus_masks()[0]) > 0)

    def mask_image(array: np.ndarray) -> sitk.Image:
        return _mask_on(case.ct_kidney_mask, array)

    from_capsule = sitk.GetArrayFromImage(pp.renal_sinus(case.ct_kidney_mask, case.ct)) > 0
    assert from_capsule.sum() > 0.5 * truth.sum() and _dice(from_capsule, truth) > 0.75
    # A parenchyma-only mask (the sinus left out) gives the same sinus: it lies in the hull.
    from_parenchyma = pp.renal_sinus(mask_image(capsule & ~truth), case.ct)
    assert _dice(sitk.GetArrayFromImage(from_parenchyma) > 0, from_capsule) > 0.95
    # Unenhanced (parenchyma at 30 HU, as urine nearly): inside the map only the fat is sinus.
    hu = sitk.GetArrayFromImage(case.ct).astype(np.float32)
    hu[capsule & ~truth] = 30.0
    unenhanced = sitk.GetImageFromArray(hu)
    unenhanced.CopyInformation(case.ct)
    plain = sitk.GetArrayFromImage(pp.renal_sinus(case.ct_kidney_mask, unenhanced)) > 0
    labels = sitk.GetArrayFromImage(case.labels)
    fat = from_capsule & (labels == int(Tissue.SINUS_FAT))
    urine = from_capsule & (labels == int(Tissue.COLLECTING))
    assert not (plain & ~from_capsule).any() and (hu[plain] < pp.SINUS_FAT_HU).all()
    assert (plain & fat).sum() > 0.9 * fat.sum() and (plain & urine).sum() < 0.3 * urine.sum()
    assert from_parenchyma.GetSpacing() == case.ct.GetSpacing()
    # Enhanced tissue is not sinus, and an empty mask has none.
    bright = sitk.Image(case.ct) * 0 + 250.0
    assert not sitk.GetArrayFromImage(pp.renal_sinus(case.ct_kidney_mask, bright)).any()
    empty = pp.renal_sinus(mask_image(np.zeros_like(capsule)), case.ct)
    assert not sitk.GetArrayFromImage(empty).any()


def test_renal_sinus_takes_each_kidney_of_a_two_kidney_mask_on_its_own(tiny_case: Any) -> None:
    from kidneyreg.simulate.tissues import kidney_labels, sinus_labels

    case = tiny_case
    labels = sitk.GetArrayFromImage(case.labels)
    both = np.isin(labels, kidney_labels())
    pieces, count = ndimage.label(both, structure=np.ones((3, 3, 3), bool))
    assert count == 2  # the simulated abdomen has both kidneys, apart

    def image(array: np.ndarray) -> sitk.Image:
        return _mask_on(case.ct, array)

    joint = sitk.GetArrayFromImage(pp.renal_sinus(image(both), case.ct)) > 0
    apart = [
        sitk.GetArrayFromImage(pp.renal_sinus(image(pieces == k), case.ct)) > 0 for k in (1, 2)
    ]
    np.testing.assert_array_equal(joint, apart[0] | apart[1])
    truth = np.isin(labels, sinus_labels())
    assert _dice(joint, truth) > 0.75
    # Filling a two-kidney mask adds nothing between the kidneys either.
    filled, _ = pp.fill_renal_sinus(image(both), case.ct)
    assert not ((sitk.GetArrayFromImage(filled) > 0) & ~both & ~truth).any()


def test_trim_perirenal_fat_takes_a_map_back_to_the_capsule(tiny_case: Any) -> None:
    case = tiny_case
    capsule = sitk.GetArrayFromImage(case.ct_kidney_mask) > 0
    sinus = capsule & (sitk.GetArrayFromImage(case.sinus_masks()[0]) > 0)
    hu = sitk.GetArrayFromImage(case.ct).astype(np.float32)
    # A network-like map: soft, and spilling one voxel into the fat around the kidney.
    spilled = ndimage.binary_dilation(capsule)
    probabilities = ndimage.gaussian_filter(spilled.astype(np.float32), 0.5)
    soft = sitk.GetImageFromArray(probabilities)
    soft.CopyInformation(case.ct)
    trimmed, removed = pp.trim_perirenal_fat(soft, case.ct)
    after = sitk.GetArrayFromImage(trimmed)
    assert trimmed.GetSpacing() == case.ct.GetSpacing() and after.dtype == np.float32
    before_dice = _dice(probabilities >= 0.5, capsule)
    assert _dice(after >= 0.5, capsule) > max(before_dice + 0.03, 0.9)
    assert removed == int(((probabilities >= 0.5) & (after < 0.5)).sum()) > 0
    # Only fat goes, to 0, and the renal sinus fat deep in the kidney stays.
    changed = after != probabilities
    assert (after[changed] == 0).all()
    assert (ndimage.median_filter(hu, 3)[changed] < pp.SINUS_FAT_HU).all()
    deep_fat = sinus & (pp.distance_inside(capsule, case.ct.GetSpacing()) > 2 * pp.SINUS_DEPTH_MM)
    assert deep_fat.any() and not changed[deep_fat].any()
    # Where nothing reads fat the map stays as it was; an empty map stays empty.
    lean_ct = sitk.GetImageFromArray(np.maximum(hu, 40.0))
    lean_ct.CopyInformation(case.ct)
    lean_map, lean_removed = pp.trim_perirenal_fat(soft, lean_ct)
    assert lean_removed == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lean_map), probabilities)
    zero = sitk.Image(soft) * 0.0
    assert pp.trim_perirenal_fat(zero, case.ct)[1] == 0
    with pytest.raises(ValueError, match="one grid"):
        pp.trim_perirenal_fat(soft[:-1, :, :], case.ct)


@pytest.mark.parametrize("ndim", [2, 3])
def test_convex_hull_mask_holds_every_point_on_the_inner_side_of_every_facet(ndim: int) -> None:
    from scipy.spatial import ConvexHull

    rng = np.random.default_rng(ndim)
    for _ in range(10):
        shape = tuple(int(v) for v in rng.integers(4, 14, size=ndim))
        mask = rng.random(shape) > 0.8
        hull = pp.convex_hull_mask(mask)
        # The definition, voxel by voxel: n . p + b <= 0 for every facet plane of the hull.
        equations = ConvexHull(np.argwhere(mask)).equations
        points = np.indices(shape).reshape(ndim, -1).T
        inside = np.all(points @ equations[:, :ndim].T + equations[:, ndim] <= 1e-6, axis=1)
        np.testing.assert_array_equal(hull, inside.reshape(shape) | mask)
        assert hull[mask].all()
