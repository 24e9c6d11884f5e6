"""Kidney contours of 2D binary masks: boundary pixels and their positions in U/S image mm.

Definition used by every contour metric of this package (and by the tests that compare them with
SimpleITK and MONAI): the **contour** of a 2D mask is the mask minus its binary erosion by the
3x3 *cross* (the 4-neighbourhood), i.e. every foreground pixel with at least one of its four
edge neighbours in the background. The resulting contour is an 8-connected line one pixel thick.
The cross is also the structuring element of ``scipy.ndimage.binary_erosion``'s default, which is
what MONAI's ``get_mask_edges`` uses, so the two agree pixel for pixel.

Pixels outside the image count as background, so a mask cut by the image border has a contour
along that border. This is deliberate: the kidney outline seen on a frame is cut by the field of
view in the same way on both images being compared, and MONAI does the same.

Contour points are placed at pixel centres in U/S image coordinates
``(u, v) = (col * sx, row * sy)`` mm (DESIGN.md section 1), so anisotropic pixels are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

__all__ = ["CONTOUR_STRUCTURE", "contour_mask", "contour_points_mm", "mask_points_mm"]

#: Structuring element of the erosion that defines a contour: the 4-neighbourhood cross.
CONTOUR_STRUCTURE: NDArray[np.bool_] = ndimage.generate_binary_structure(2, 1)
CONTOUR_STRUCTURE.setflags(write=False)


def _as_mask(mask: ArrayLike) -> NDArray[np.bool_]:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"mask must be a 2D array (rows, cols), got shape {array.shape}")
    return array != 0


def _checked_pixel_size(pixel_size: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(s) for s in pixel_size)
    if len(values) != 2 or not all(np.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"pixel_size must be two finite values > 0 (sx, sy), got {pixel_size!r}")
    return values[0], values[1]


def contour_mask(mask: ArrayLike) -> NDArray[np.bool_]:
    """The contour (boundary pixels) of a 2D binary mask.

    A pixel is on the contour when it is foreground and at least one of its four edge neighbours
    is background (outside the image counts as background). See the module docstring.

    Args:
        mask: 2D array ``(rows, cols)``; every nonzero pixel is foreground.

    Returns:
        Boolean array of the same shape, True on the contour. An empty mask gives an empty contour.

    Example:
        >>> square = np.zeros((5, 5), dtype=np.uint8)
        >>> square[1:4, 1:4] = 1
        >>> contour_mask(square).astype(int)[1:4, 1:4]
        array([[1, 1, 1],
               [1, 0, 1],
               [1, 1, 1]])
    """
    foreground = _as_mask(mask)
    eroded = ndimage.binary_erosion(foreground, structure=CONTOUR_STRUCTURE, border_value=0)
    return np.asarray(foreground & ~eroded)


def mask_points_mm(mask: ArrayLike, pixel_size: Sequence[float]) -> NDArray[np.float64]:
    """U/S image coordinates ``(u, v)`` mm of every nonzero pixel of a 2D mask.

    Args:
        mask: 2D array ``(rows, cols)``.
        pixel_size: ``(sx, sy)`` mm: column (lateral) and row (depth) pixel size.

    Returns:
        float64 ``(N, 2)``: ``u = col * sx``, ``v = row * sy``, in row-major pixel order.

    Example:
        >>> mask_points_mm([[0, 1], [0, 0]], (0.5, 2.0))
        array([[0.5, 0. ]])
    """
    sx, sy = _checked_pixel_size(pixel_size)
    rows, cols = np.nonzero(_as_mask(mask))
    return np.stack([cols * sx, rows * sy], axis=1).astype(np.float64)


def contour_points_mm(mask: ArrayLike, pixel_size: Sequence[float]) -> NDArray[np.float64]:
    """U/S image coordinates ``(u, v)`` mm of the contour pixels of a 2D mask.

    Args:
        mask: 2D array ``(rows, cols)``; every nonzero pixel is foreground.
        pixel_size: ``(sx, sy)`` mm.

    Returns:
        float64 ``(N, 2)``; ``N = 0`` for an empty mask.

    Example:
        >>> square = np.zeros((4, 4))
        >>> square[1:3, 1:3] = 1
        >>> contour_points_mm(square, (1.0, 2.0))
        array([[1., 2.],
               [2., 2.],
               [1., 4.],
               [2., 4.]])
    """
    return mask_points_mm(contour_mask(mask), pixel_size)
