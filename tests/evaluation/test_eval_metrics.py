"""HD / MCD against hand-computed values, SimpleITK and MONAI; pose errors; summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from numpy.typing import NDArray

from kidneyreg.evaluation.contours import contour_mask, contour_points_mm
from kidneyreg.evaluation.metrics import (
    contour_distances,
    directed_distances,
    hausdorff_distance,
    mean_contour_distance,
    plane_angle_deg,
    point_errors_mm,
    rotation_error_deg,
    summarise,
    translation_error_mm,
)
from kidneyreg.geometry import euler_to_matrix, make_rigid, translation

RTOL = 1e-6

# --------------------------------------------------------------------------------------------
# Hand-computed values on tiny masks
# --------------------------------------------------------------------------------------------


def test_two_single_pixels_anisotropic() -> None:
    a = np.zeros((8, 8))
    b = np.zeros((8, 8))
    a[2, 1] = 1
    b[5, 5] = 1
    # 4 columns of 0.5 mm and 3 rows of 2 mm apart.
    expected = math.sqrt(2.0**2 + 6.0**2)
    hd, mcd = contour_distances(a, b, (0.5, 2.0))
    assert hd == pytest.approx(expected, rel=1e-12)
    assert mcd == pytest.approx(expected, rel=1e-12)


def test_shifted_three_by_three_squares() -> None:
    a = np.zeros((8, 8))
    b = np.zeros((8, 8))
    a[2:5, 2:5] = 1
    b[2:5, 3:6] = 1
    # Each 8-pixel ring: 4 pixels lie on the other ring, 4 are one pixel away.
    hd, mcd = contour_distances(a, b, (1.0, 1.0))
    assert hd == 1.0
    assert mcd == 0.5
    hd, mcd = contour_distances(a, b, (0.3, 7.0))  # the shift is along columns: 0.3 mm
    assert hd == pytest.approx(0.3, rel=1e-12)
    assert mcd == pytest.approx(0.15, rel=1e-12)


def test_concentric_squares() -> None:
    inner = np.zeros((9, 9))
    outer = np.zeros((9, 9))
    inner[3:6, 3:6] = 1  # ring at Chebyshev radius 1 (8 pixels)
    outer[1:8, 1:8] = 1  # ring at Chebyshev radius 3 (24 pixels)
    # inner -> outer: every pixel is 2 away. outer -> inner: 4 corners sqrt(8), 8 pixels next to
    # the corners sqrt(5), 12 others 2.
    expected_mcd = (8 * 2 + 4 * math.sqrt(8) + 8 * math.sqrt(5) + 12 * 2) / 32
    hd, mcd = contour_distances(inner, outer, (1.0, 1.0))
    assert hd == pytest.approx(math.sqrt(8), rel=1e-12)
    assert mcd == pytest.approx(expected_mcd, rel=1e-12)
    # The measures are symmetric.
    assert contour_distances(outer, inner, (1.0, 1.0)) == (hd, mcd)


def test_identical_masks_give_zero() -> None:
    mask = np.zeros((10, 12))
    mask[2:8, 3:9] = 1
    assert contour_distances(mask, mask, (0.4, 0.6)) == (0.0, 0.0)


@pytest.mark.parametrize("empty_first", [True, False])
def test_empty_contour_gives_nan(empty_first: bool) -> None:
    mask = np.zeros((6, 6))
    mask[2:4, 2:4] = 1
    pair = (np.zeros((6, 6)), mask) if empty_first else (mask, np.zeros((6, 6)))
    hd, mcd = contour_distances(*pair, (1.0, 1.0))
    assert math.isnan(hd) and math.isnan(mcd)
    points = contour_points_mm(mask, (1.0, 1.0))
    assert math.isnan(hausdorff_distance(points, np.zeros((0, 2))))
    assert math.isnan(mean_contour_distance(np.zeros((0, 2)), points))


def test_directed_distances_and_point_set_functions() -> None:
    a = np.array([[0.0, 0.0], [0.0, 2.0]])
    b = np.array([[0.0, 0.0]])
    np.testing.assert_array_equal(directed_distances(a, b), [0.0, 2.0])
    assert hausdorff_distance(a, b) == 2.0
    assert mean_contour_distance(a, b) == pytest.approx(2.0 / 3.0)
    with pytest.raises(ValueError, match="empty"):
        directed_distances(a, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="dimensions"):
        directed_distances(a, np.zeros((1, 3)))


def test_mismatched_mask_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="same shape"):
        contour_distances(np.ones((3, 3)), np.ones((3, 4)), (1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Agreement with SimpleITK and MONAI
# --------------------------------------------------------------------------------------------


def _ellipse(
    shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float], angle: float
) -> NDArray[np.bool_]:
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    dr, dc = rows - centre[0], cols - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    a = (c * dc + s * dr) / radii[1]
    b = (-s * dc + c * dr) / radii[0]
    return np.asarray(a * a + b * b <= 1.0)


def _mask_pairs() -> list[tuple[NDArray[np.bool_], NDArray[np.bool_], tuple[float, float]]]:
    """Irregular, anisotropic test pairs: overlapping blobs, a holed blob, a border-cut blob."""
    rng = np.random.default_rng(7)
    shape = (70, 90)
    pairs = []
    for spacing in [(0.3, 0.7), (1.0, 1.0), (0.55, 0.25)]:
        first = _ellipse(shape, (30, 40), (14, 22), 0.3) | _ellipse(shape, (45, 55), (8, 10), 0.0)
        second = _ellipse(shape, (33 + rng.uniform(-3, 3), 44 + rng.uniform(-3, 3)), (12, 25), -0.2)
        pairs.append((first, second, spacing))
    holed = _ellipse(shape, (35, 45), (20, 30), 0.1) & ~_ellipse(shape, (35, 45), (5, 8), 0.0)
    pairs.append((holed, _ellipse(shape, (37, 42), (18, 28), 0.0), (0.4, 0.9)))
    cut = _ellipse(shape, (5, 45), (15, 30), 0.0)  # runs off the top of the image
    pairs.append((cut, _ellipse(shape, (8, 40), (15, 28), 0.2), (0.5, 0.5)))
    return pairs


def _sitk_image(array: NDArray[np.bool_], spacing: tuple[float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)  # (sx columns, sy rows), as the U/S pixel size
    return image


@pytest.mark.parametrize("pair", range(5))
def test_agrees_with_simpleitk_hausdorff_filter(pair: int) -> None:
    first, second, spacing = _mask_pairs()[pair]
    ours_hd, _ = contour_distances(first, second, spacing)
    a = directed_distances(contour_points_mm(first, spacing), contour_points_mm(second, spacing))
    b = directed_distances(contour_points_mm(second, spacing), contour_points_mm(first, spacing))
    # SimpleITK's filter compares the foreground sets of two images: give it the contours.
    hd_filter = sitk.HausdorffDistanceImageFilter()
    hd_filter.Execute(
        _sitk_image(contour_mask(first), spacing), _sitk_image(contour_mask(second), spacing)
    )
    assert ours_hd > 0
    assert ours_hd == pytest.approx(hd_filter.GetHausdorffDistance(), rel=RTOL)
    # Its "average Hausdorff distance" is the mean of the two directed means.
    assert (a.mean() + b.mean()) / 2 == pytest.approx(
        hd_filter.GetAverageHausdorffDistance(), rel=RTOL
    )


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")
@pytest.mark.parametrize("pair", range(5))
def test_agrees_with_monai_surface_distances(pair: int) -> None:
    first, second, spacing = _mask_pairs()[pair]
    ours_hd, ours_mcd = contour_distances(first, second, spacing)
    # MONAI takes the masks themselves and extracts edges as mask XOR its cross erosion, our
    # contour definition; its spacing follows the array axes (rows, then columns).
    y_pred = torch.from_numpy(first[None, None].astype(np.float32))
    y = torch.from_numpy(second[None, None].astype(np.float32))
    monai_spacing = (spacing[1], spacing[0])
    monai_hd = compute_hausdorff_distance(y_pred, y, include_background=True, spacing=monai_spacing)
    monai_mcd = compute_average_surface_distance(
        y_pred, y, include_background=True, symmetric=True, spacing=monai_spacing
    )
    assert ours_mcd > 0
    assert ours_hd == pytest.approx(float(monai_hd.item()), rel=RTOL)
    assert ours_mcd == pytest.approx(float(monai_mcd.item()), rel=RTOL)


# --------------------------------------------------------------------------------------------
# Pose errors
# --------------------------------------------------------------------------------------------


def _about_point(rotation: NDArray[np.float64], point: NDArray[np.float64]) -> NDArray[np.float64]:
    return translation(point) @ make_rigid(rotation, [0, 0, 0]) @ translation(-point)


def test_point_errors_of_a_rotation_about_a_point() -> None:
    true = euler_to_matrix([0.3, -0.2, 1.0, 10, -20, 30])
    centre = np.array([12.0, 5.0, 0.0])
    turn = euler_to_matrix([0, 0, np.pi / 2, 0, 0, 0])[:3, :3]  # 90 degrees about the normal
    estimated = true @ _about_point(turn, centre)
    points = np.array([[12.0, 5.0], [15.0, 5.0], [12.0, 1.0]])
    # A point at distance r from the centre moves by r * sqrt(2) under a quarter turn.
    np.testing.assert_allclose(
        point_errors_mm(estimated, true, points),
        [0.0, 3 * math.sqrt(2), 4 * math.sqrt(2)],
        atol=1e-12,
    )
    assert translation_error_mm(estimated, true, centre[:2]) == pytest.approx(0.0, abs=1e-12)
    assert translation_error_mm(estimated, true, [0.0, 0.0]) == pytest.approx(
        math.hypot(12, 5) * math.sqrt(2)
    )


@pytest.mark.parametrize(
    ("params", "plane", "rotation"),
    [
        ([0.0, 0.0, 0.4, 1, 2, 3], 0.0, math.degrees(0.4)),  # about the normal: in-plane
        ([0.25, 0.0, 0.0, 0, 0, 0], math.degrees(0.25), math.degrees(0.25)),  # about u
        ([0.0, -0.1, 0.0, 0, 0, 0], math.degrees(0.1), math.degrees(0.1)),  # about v
        ([np.pi, 0.0, 0.0, 0, 0, 0], 0.0, 180.0),  # flipped over: the same plane
        ([np.radians(100), 0.0, 0.0, 0, 0, 0], 80.0, 100.0),  # planes are unoriented
    ],
)
def test_plane_and_rotation_angles(params: list[float], plane: float, rotation: float) -> None:
    true = euler_to_matrix([0.5, 0.1, -0.7, 4, 5, 6])
    estimated = true @ euler_to_matrix(params)  # an offset expressed in the frame's own axes
    assert float(plane_angle_deg(estimated, true)) == pytest.approx(plane, abs=1e-9)
    assert float(rotation_error_deg(estimated, true)) == pytest.approx(rotation, abs=1e-9)


def test_angles_are_batched() -> None:
    true = np.stack([np.eye(4)] * 3)
    estimated = euler_to_matrix([[0.1, 0, 0, 0, 0, 0], [0, 0, 0.2, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(plane_angle_deg(estimated, true), np.degrees([0.1, 0, 0]), atol=1e-9)
    np.testing.assert_allclose(
        rotation_error_deg(estimated, true), np.degrees([0.1, 0.2, 0]), atol=1e-9
    )


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def test_summary_leaves_nan_out_and_counts_it() -> None:
    values = np.array([4.0, np.nan, 1.0, 3.0, 2.0, np.nan])
    stats = summarise(values)
    finite = np.array([4.0, 1.0, 3.0, 2.0])
    assert stats.n == 4 and stats.n_missing == 2
    assert stats.mean == 2.5
    assert stats.std == pytest.approx(float(np.std(finite)))
    assert stats.median == 2.5
    assert stats.p95 == pytest.approx(3.85)  # linear: 1 + 0.95 * 3 = position 3.85 -> 3.85


def test_summary_of_nothing_is_nan() -> None:
    stats = summarise([np.nan, np.nan])
    assert stats.n == 0 and stats.n_missing == 2
    assert all(math.isnan(v) for v in (stats.mean, stats.std, stats.median, stats.p95))


def test_summary_rejects_infinity_and_2d() -> None:
    with pytest.raises(ValueError, match="infinities"):
        summarise([1.0, np.inf])
    with pytest.raises(ValueError, match="1D"):
        summarise(np.zeros((2, 2)))
