"""Contours of 2D masks: the 4-neighbourhood erosion definition and points in mm."""

from __future__ import annotations

import numpy as np
import pytest

from kidneyreg.evaluation.contours import contour_mask, contour_points_mm, mask_points_mm


def test_square_contour_is_its_ring() -> None:
    mask = np.zeros((7, 7), dtype=np.uint8)
    mask[1:6, 1:6] = 1
    expected = np.zeros((7, 7), dtype=bool)
    expected[1:6, 1:6] = True
    expected[2:5, 2:5] = False
    np.testing.assert_array_equal(contour_mask(mask), expected)


def test_diagonal_background_does_not_make_a_contour_pixel() -> None:
    # A one-pixel hole at (3, 3): its edge neighbours are contour pixels (the inner outline), its
    # diagonal neighbours touch the background only at a corner and stay interior.
    mask = np.ones((7, 7), dtype=np.uint8)
    mask[3, 3] = 0
    contour = contour_mask(mask)
    assert contour[2, 3] and contour[4, 3] and contour[3, 2] and contour[3, 4]
    assert not (contour[2, 2] or contour[2, 4] or contour[4, 2] or contour[4, 4])
    assert int(contour[1:-1, 1:-1].sum()) == 4


def test_outside_the_image_is_background() -> None:
    contour = contour_mask(np.ones((4, 5)))
    assert contour[0].all() and contour[-1].all() and contour[:, 0].all() and contour[:, -1].all()
    assert not contour[1:-1, 1:-1].any()


def test_single_pixel_and_thin_line_are_all_contour() -> None:
    mask = np.zeros((5, 5))
    mask[2, 2] = 1
    np.testing.assert_array_equal(contour_mask(mask), mask.astype(bool))
    line = np.zeros((5, 9))
    line[2, 1:8] = 1
    np.testing.assert_array_equal(contour_mask(line), line.astype(bool))


def test_empty_mask_gives_empty_contour_and_no_points() -> None:
    assert not contour_mask(np.zeros((3, 4))).any()
    assert contour_points_mm(np.zeros((3, 4)), (0.5, 0.5)).shape == (0, 2)


def test_points_use_column_then_row_pixel_size() -> None:
    mask = np.zeros((4, 6), dtype=bool)
    mask[3, 5] = True
    mask[1, 2] = True
    np.testing.assert_allclose(mask_points_mm(mask, (0.25, 2.0)), [[0.5, 2.0], [1.25, 6.0]])
    np.testing.assert_allclose(contour_points_mm(mask, (0.25, 2.0)), [[0.5, 2.0], [1.25, 6.0]])


@pytest.mark.parametrize("bad", [(0.0, 1.0), (1.0,), (1.0, float("nan")), (-1.0, 1.0)])
def test_bad_pixel_size_is_rejected(bad: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="pixel_size"):
        mask_points_mm(np.ones((2, 2)), bad)


def test_non_2d_mask_is_rejected() -> None:
    with pytest.raises(ValueError, match="2D"):
        contour_mask(np.ones((2, 2, 2)))
