"""Registration metrics: contour distances (HD, MCD), pose errors (TRE, angles) and summaries.

Contour distances follow the paper (Methods, "Evaluation Metrics") on the contours of
:mod:`kidneyreg.evaluation.contours`, with ``d`` the exact Euclidean distance in mm between
contour pixel centres (anisotropic pixels handled exactly, nearest neighbours by a KD-tree):

* Hausdorff distance ``HD(U, C) = max(max_c min_u d(c, u), max_u min_c d(u, c))``.
* Mean contour distance. The paper writes ``mean over u in U, c in C of d(u, c)`` "on the distance
  map"; read literally (every pair) it would not be zero for identical contours, so we read
  ``d(u, c)`` as the distance map of one contour evaluated on the other's points, in both
  directions: ``MCD = (sum_u min_c d(u, c) + sum_c min_u d(c, u)) / (|U| + |C|)``, the standard
  symmetric mean contour (surface) distance, the same as MONAI's
  ``compute_average_surface_distance(symmetric=True)``.

When either contour is empty (the kidney is not in view on one of the images) HD and MCD are NaN;
:func:`summarise` leaves NaN values out and counts them.

Pose errors compare an estimated frame pose ``M_est`` with the true one ``M_true`` (both 4x4, U/S
image mm -> CT world mm):

* target registration error at U/S points ``p``: ``|| M_est p - M_true p ||`` mm;
* plane angle: the angle between the two frames' plane normals (third rotation column), as
  unoriented lines, in [0, 90] degrees;
* rotation error: the angle of ``R_true^T R_est``, in [0, 180] degrees;
* translation error at a point ``c`` (the U/S kidney centroid): ``|| M_est c - M_true c ||``; at the
  kidney rather than at the frame origin (pixel (0, 0), far from the kidney), so that a small
  rotation does not show up as a large translation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import KDTree

from kidneyreg.evaluation.contours import contour_points_mm
from kidneyreg.geometry import rotation_angles_deg

__all__ = [
    "ContourDistances",
    "Summary",
    "contour_distances",
    "directed_distances",
    "hausdorff_distance",
    "mean_contour_distance",
    "plane_angle_deg",
    "point_errors_mm",
    "rotation_error_deg",
    "summarise",
    "translation_error_mm",
]


class ContourDistances(NamedTuple):
    """Hausdorff and mean contour distance between two contours, in mm (NaN when undefined)."""

    hausdorff: float
    mean: float


class Summary(NamedTuple):
    """Statistics of one metric over frames; NaN frames are left out and counted.

    Attributes:
        mean: Mean of the finite values.
        std: Population standard deviation (``ddof=0``): the spread of the frames themselves.
        median: Median.
        p95: 95th percentile (numpy's default linear interpolation).
        n: Number of finite values used.
        n_missing: Number of NaN values left out (e.g. frames without the kidney in view).
    """

    mean: float
    std: float
    median: float
    p95: float
    n: int
    n_missing: int


def _points(points: ArrayLike, name: str) -> NDArray[np.float64]:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] not in (2, 3):
        raise ValueError(f"{name} must have shape (N, 2) or (N, 3), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return array


def directed_distances(from_points: ArrayLike, to_points: ArrayLike) -> NDArray[np.float64]:
    """Distance from each point of ``from_points`` to its nearest point of ``to_points``.

    Exact Euclidean distances (KD-tree nearest neighbours), in the points' unit (mm).

    Args:
        from_points: ``(N, 2)`` or ``(N, 3)`` coordinates.
        to_points: ``(M, d)`` coordinates, ``M >= 1``, same ``d``.

    Returns:
        float64 ``(N,)``.

    Raises:
        ValueError: ``to_points`` is empty or the dimensions differ.

    Example:
        >>> directed_distances([[0.0, 0.0], [3.0, 4.0]], [[0.0, 0.0]])
        array([0., 5.])
    """
    source = _points(from_points, "from_points")
    target = _points(to_points, "to_points")
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"point dimensions differ: {source.shape[1]} vs {target.shape[1]}")
    if len(target) == 0:
        raise ValueError("to_points is empty: no nearest point exists")
    if len(source) == 0:
        return np.zeros(0, dtype=np.float64)
    distances, _ = KDTree(target).query(source, k=1)
    return np.asarray(distances, dtype=np.float64)


def _both_directions(
    points_a: ArrayLike, points_b: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    a = _points(points_a, "points_a")
    b = _points(points_b, "points_b")
    if len(a) == 0 or len(b) == 0:
        return None
    return directed_distances(a, b), directed_distances(b, a)


def hausdorff_distance(points_a: ArrayLike, points_b: ArrayLike) -> float:
    """Symmetric Hausdorff distance between two point sets (contours), NaN if one is empty.

    Example:
        >>> hausdorff_distance([[0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]])
        2.0
    """
    both = _both_directions(points_a, points_b)
    if both is None:
        return math.nan
    return float(max(both[0].max(), both[1].max()))


def mean_contour_distance(points_a: ArrayLike, points_b: ArrayLike) -> float:
    """Symmetric mean contour distance (see the module docstring), NaN if one set is empty.

    Example:
        >>> mean_contour_distance([[0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]])  # (0 + 0 + 2) / 3
        0.6666666666666666
    """
    both = _both_directions(points_a, points_b)
    if both is None:
        return math.nan
    return float(np.concatenate(both).mean())


def contour_distances(
    mask_a: ArrayLike, mask_b: ArrayLike, pixel_size: tuple[float, float]
) -> ContourDistances:
    """HD and MCD (mm) between the contours of two 2D masks on the same pixel grid.

    Args:
        mask_a: 2D mask ``(rows, cols)``, e.g. the CT kidney mask resliced on a U/S frame.
        mask_b: 2D mask of the same shape, e.g. the U/S kidney mask.
        pixel_size: ``(sx, sy)`` mm.

    Returns:
        ``ContourDistances(hausdorff, mean)``; both NaN when either mask is empty.

    Example:
        >>> a = np.zeros((8, 8)); a[2:5, 2:5] = 1
        >>> b = np.zeros((8, 8)); b[2:5, 3:6] = 1
        >>> contour_distances(a, b, (1.0, 1.0))
        ContourDistances(hausdorff=1.0, mean=0.5)
    """
    a = np.asarray(mask_a)
    b = np.asarray(mask_b)
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, got {a.shape} and {b.shape}")
    both = _both_directions(contour_points_mm(a, pixel_size), contour_points_mm(b, pixel_size))
    if both is None:
        return ContourDistances(math.nan, math.nan)
    return ContourDistances(
        float(max(both[0].max(), both[1].max())), float(np.concatenate(both).mean())
    )


def _pose(matrix: ArrayLike, name: str) -> NDArray[np.float64]:
    array = np.asarray(matrix, dtype=np.float64)
    if array.ndim < 2 or array.shape[-2:] != (4, 4):
        raise ValueError(f"{name} must have shape (..., 4, 4), got {array.shape}")
    return array


def point_errors_mm(
    estimated: ArrayLike, true: ArrayLike, points_uv: ArrayLike
) -> NDArray[np.float64]:
    """Target registration error ``|| M_est p - M_true p ||`` (mm) at U/S image points.

    Args:
        estimated: Estimated frame pose, 4x4.
        true: True frame pose, 4x4.
        points_uv: ``(N, 2)`` U/S image coordinates ``(u, v)`` mm (``w = 0``), e.g. the kidney
            pixels of the frame (:func:`kidneyreg.evaluation.contours.mask_points_mm`).

    Returns:
        float64 ``(N,)``.

    Example:
        >>> shifted = np.eye(4); shifted[1, 3] = 3.0
        >>> point_errors_mm(shifted, np.eye(4), [[0.0, 0.0], [10.0, 5.0]])
        array([3., 3.])
    """
    m_est = _pose(estimated, "estimated")
    m_true = _pose(true, "true")
    if m_est.shape != (4, 4) or m_true.shape != (4, 4):
        raise ValueError("point_errors_mm takes one 4x4 pose each")
    uv = _points(points_uv, "points_uv")
    if uv.shape[1] != 2:
        raise ValueError(f"points_uv must have shape (N, 2), got {uv.shape}")
    # (M_est - M_true) applied to (u, v, 0, 1): only the u, v and translation columns matter.
    delta = m_est - m_true
    difference = uv @ delta[:3, :2].T + delta[:3, 3]
    return np.asarray(np.linalg.norm(difference, axis=1), dtype=np.float64)


def translation_error_mm(estimated: ArrayLike, true: ArrayLike, centre_uv: ArrayLike) -> float:
    """Translation error (mm) of a frame at the point ``centre_uv`` (the U/S kidney centroid).

    Example:
        >>> turned = np.eye(4); turned[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
        >>> translation_error_mm(turned, np.eye(4), [0.0, 0.0])  # rotation about the point
        0.0
    """
    centre = np.asarray(centre_uv, dtype=np.float64)
    if centre.shape != (2,):
        raise ValueError(f"centre_uv must have shape (2,), got {centre.shape}")
    return float(point_errors_mm(estimated, true, centre[None])[0])


def plane_angle_deg(estimated: ArrayLike, true: ArrayLike) -> NDArray[np.float64]:
    """Angle (degrees, in [0, 90]) between the plane normals of estimated and true frame poses.

    The normal is the third rotation column ``u x v``; the planes are compared as unoriented
    planes, so a frame flipped over has angle 0. Computed with ``atan2(|n1 x n2|, |n1 . n2|)``,
    accurate for small angles.

    Args:
        estimated: ``(..., 4, 4)`` poses.
        true: ``(..., 4, 4)`` poses (broadcast against ``estimated``).

    Returns:
        float64 array of the broadcast batch shape (a 0-d array for single poses).

    Example:
        >>> from kidneyreg.geometry import euler_to_matrix
        >>> float(plane_angle_deg(euler_to_matrix([0.2, 0, 0, 0, 0, 0]), np.eye(4)))
        11.459155902616466
    """
    n_est = _pose(estimated, "estimated")[..., :3, 2]
    n_true = _pose(true, "true")[..., :3, 2]
    cross = np.linalg.norm(np.cross(n_est, n_true), axis=-1)
    dot = np.abs(np.sum(n_est * n_true, axis=-1))
    return np.asarray(np.degrees(np.arctan2(cross, dot)), dtype=np.float64)


def rotation_error_deg(estimated: ArrayLike, true: ArrayLike) -> NDArray[np.float64]:
    """Angle (degrees, in [0, 180]) of the residual rotation ``R_true^T R_est``.

    Args:
        estimated: ``(..., 4, 4)`` poses.
        true: ``(..., 4, 4)`` poses (broadcast against ``estimated``).

    Returns:
        float64 array of the broadcast batch shape.

    Example:
        >>> from kidneyreg.geometry import euler_to_matrix
        >>> turned = euler_to_matrix([0, 0, np.pi / 6, 5, 0, 0])
        >>> round(float(rotation_error_deg(turned, np.eye(4))), 9)
        30.0
    """
    r_est = _pose(estimated, "estimated")[..., :3, :3]
    r_true = _pose(true, "true")[..., :3, :3]
    residual = np.swapaxes(r_true, -1, -2) @ r_est
    return np.asarray(rotation_angles_deg(residual), dtype=np.float64)


def summarise(values: ArrayLike) -> Summary:
    """Mean, std, median and 95th percentile of per-frame values, leaving NaN out.

    Args:
        values: 1D per-frame values; NaN marks a frame where the metric is undefined.

    Returns:
        The :class:`Summary`; every statistic is NaN when no value is finite.

    Example:
        >>> summarise([1.0, 2.0, 3.0, float("nan")])
        Summary(mean=2.0, std=0.816496580927726, median=2.0, p95=2.9, n=3, n_missing=1)
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"values must be 1D, got shape {array.shape}")
    if np.any(np.isinf(array)):
        raise ValueError("values contain infinities; undefined frames must be NaN")
    finite = array[np.isfinite(array)]
    missing = int(array.size - finite.size)
    if finite.size == 0:
        return Summary(math.nan, math.nan, math.nan, math.nan, 0, missing)
    return Summary(
        mean=float(finite.mean()),
        std=float(finite.std()),
        median=float(np.median(finite)),
        p95=float(np.percentile(finite, 95)),
        n=int(finite.size),
        n_missing=missing,
    )
