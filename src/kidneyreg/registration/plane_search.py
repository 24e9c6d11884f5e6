"""Explicit search of one plane correction common to many frames, scored on structure overlap.

The registration network regresses each frame's pose from the kidney maps. What those maps cannot
pin down is where the U/S plane cuts the kidney out of plane: on the side of the kidney's widest
section, moving the plane several millimetres along its normal or tilting it by 10 degrees
changes the kidney outline by less than a feature map's own error (``benchmarks/
tilt_observability.py``). Structures inside the kidney change much faster: the renal sinus (sinus
fat and collecting system, the central echo complex of a U/S image) is cut by central planes
only. Given the sinus (or any other structure) on both sides, this module searches explicitly for
the rigid correction of the plane that makes the CT sections overlap the U/S maps best.

The correction is one :class:`PlaneOffset`, in each frame's own axes (u lateral, v depth, w
normal): a tilt about u and about v through a pivot (the frame's U/S kidney centroid), a move
along the normal and an in-plane shift. Over a breathing cycle the probe is held still and the
kidney slides under it, so the network's error out of the plane is a per-patient bias (its sign
stays over the sequence) that one correction, found on the adaptation frames, removes from every
later frame.

The search (:func:`search_plane_offset`) is deterministic: a grid over the normal offset (the
largest error, with two local optima on either side of the kidney's widest section), then
coordinate ascent over the five parameters with halving steps. The score is the sum over the
structures of their Dice pooled over the frames.

Example:
    >>> offset = PlaneOffset(normal_mm=-2.0, shift_u_mm=1.0)
    >>> offset.apply(np.eye(4)[None], np.zeros((1, 2)))[0, :3, 3].tolist()
    [1.0, 0.0, -2.0]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray

from kidneyreg.geometry import resample_on_frames

__all__ = [
    "PlaneOffset",
    "PlaneSearchResult",
    "search_plane_offset",
    "structure_overlap",
]

#: Normal offsets (mm) of the first, exhaustive stage.
NORMAL_GRID_MM: tuple[float, ...] = tuple(float(w) for w in range(-12, 13, 2))
#: Coordinate-ascent steps (tilt u, tilt v in degrees; normal, shift u, shift v in mm), in turn.
ASCENT_STEPS: tuple[tuple[float, float, float, float, float], ...] = (
    (4.0, 4.0, 2.0, 2.0, 2.0),
    (2.0, 2.0, 1.0, 1.0, 1.0),
    (1.0, 1.0, 0.5, 0.5, 0.5),
)
#: Bounds of the correction (degrees, mm): beyond them the frames' evidence is not a small
#: correction of the network's estimate but another anatomy.
MAX_TILT_DEG = 20.0
MAX_NORMAL_MM = 16.0
MAX_SHIFT_MM = 10.0


@dataclass(frozen=True)
class PlaneOffset:
    """A rigid correction of a U/S frame's pose, in the frame's own axes.

    Applied to a pose ``M`` (U/S image mm -> CT world mm) with pivot ``p = (pu, pv)`` mm on the
    frame: ``M @ T(p) @ Rv(tilt_v) @ Ru(tilt_u) @ T(-p + normal * w) @ T(shift_u, shift_v)``.
    The pivot stays where it was under the tilts.

    Attributes:
        tilt_u_deg: Rotation about the frame's lateral axis u (columns), degrees.
        tilt_v_deg: Rotation about the frame's depth axis v (rows), degrees.
        normal_mm: Move along the frame's normal w, mm.
        shift_u_mm: In-plane shift along u, mm.
        shift_v_mm: In-plane shift along v, mm.
    """

    tilt_u_deg: float = 0.0
    tilt_v_deg: float = 0.0
    normal_mm: float = 0.0
    shift_u_mm: float = 0.0
    shift_v_mm: float = 0.0

    @classmethod
    def from_vector(cls, values: ArrayLike) -> PlaneOffset:
        """From ``(tilt_u_deg, tilt_v_deg, normal_mm, shift_u_mm, shift_v_mm)``."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.shape != (5,) or not np.all(np.isfinite(v)):
            raise ValueError(f"a plane offset needs 5 finite values, got {values!r}")
        return cls(*(float(x) for x in v))

    def vector(self) -> NDArray[np.float64]:
        """``(tilt_u_deg, tilt_v_deg, normal_mm, shift_u_mm, shift_v_mm)``."""
        return np.array(
            [self.tilt_u_deg, self.tilt_v_deg, self.normal_mm, self.shift_u_mm, self.shift_v_mm]
        )

    def local_matrix(self, pivot_uv: ArrayLike) -> NDArray[np.float64]:
        """The correction as a 4x4 matrix in frame coordinates (right-multiplies a pose)."""
        pivot = np.asarray(pivot_uv, dtype=np.float64).reshape(2)
        a, b = np.deg2rad(self.tilt_u_deg), np.deg2rad(self.tilt_v_deg)
        rot_u = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        rot_v = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        rotation = np.eye(4)
        rotation[:3, :3] = rot_v @ rot_u
        to_pivot, from_pivot = np.eye(4), np.eye(4)
        to_pivot[:3, 3] = [pivot[0], pivot[1], 0.0]
        from_pivot[:3, 3] = [
            -pivot[0] + self.shift_u_mm,
            -pivot[1] + self.shift_v_mm,
            self.normal_mm,
        ]
        return to_pivot @ rotation @ from_pivot

    def apply(self, poses: ArrayLike, pivots_uv: ArrayLike) -> NDArray[np.float64]:
        """Corrected ``(n, 4, 4)`` poses, each about its own ``(n, 2)`` pivot (mm)."""
        matrices = np.asarray(poses, dtype=np.float64)
        pivots = np.asarray(pivots_uv, dtype=np.float64)
        if matrices.ndim != 3 or matrices.shape[1:] != (4, 4):
            raise ValueError(f"poses must have shape (n, 4, 4), got {matrices.shape}")
        if pivots.shape != (len(matrices), 2):
            raise ValueError(f"pivots must have shape ({len(matrices)}, 2), got {pivots.shape}")
        return np.stack([m @ self.local_matrix(p) for m, p in zip(matrices, pivots, strict=True)])

    def to_dict(self) -> dict[str, float]:
        """JSON-serialisable parameters."""
        return {name: float(value) for name, value in asdict(self).items()}


@dataclass(frozen=True)
class PlaneSearchResult:
    """What :func:`search_plane_offset` found.

    Attributes:
        offset: The correction (identity when nothing scored better than the start).
        score_before: Overlap score of the uncorrected poses (sum of Dice over the structures).
        score_after: Overlap score of the corrected poses.
        frames: Frames the score was computed on.
        evaluations: Number of poses scored.
        seconds: Search time.
        structures: Names of the structures scored.
    """

    offset: PlaneOffset
    score_before: float
    score_after: float
    frames: tuple[int, ...]
    evaluations: int
    seconds: float
    structures: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (for ``transforms.json``)."""
        return {
            "offset": self.offset.to_dict(),
            "score_before": self.score_before,
            "score_after": self.score_after,
            "frames": [int(k) for k in self.frames],
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "structures": list(self.structures),
        }


def structure_overlap(
    ct_maps: Sequence[sitk.Image],
    us_maps: Sequence[NDArray[np.bool_]],
    poses: ArrayLike,
    pixel_size: tuple[float, float],
) -> float:
    """Sum over structures of the Dice between the CT sections at ``poses`` and the U/S maps.

    Args:
        ct_maps: One binary image per structure on the CT grid (nonzero inside).
        us_maps: One ``(n, rows, cols)`` boolean array per structure, the frames' maps.
        poses: ``(n, 4, 4)`` U/S image mm -> CT world mm.
        pixel_size: U/S ``(sx, sy)`` mm.

    Returns:
        The sum of the per-structure Dice, each pooled over the frames (a structure absent
        from both sides counts 0).
    """
    matrices = np.asarray(poses, dtype=np.float64)
    total = 0.0
    for image, fixed in zip(ct_maps, us_maps, strict=True):
        shape = (int(fixed.shape[1]), int(fixed.shape[2]))
        section = resample_on_frames(image, matrices, shape, pixel_size, interpolator="nearest")
        moving = section != 0
        denominator = float(fixed.sum() + moving.sum())
        if denominator > 0:
            total += 2.0 * float((fixed & moving).sum()) / denominator
    return total


def _validate(
    ct_maps: Sequence[sitk.Image],
    us_maps: Sequence[ArrayLike],
    poses: NDArray[np.float64],
    pivots: NDArray[np.float64],
) -> list[NDArray[np.bool_]]:
    if len(ct_maps) == 0 or len(ct_maps) != len(us_maps):
        raise ValueError(
            f"need one CT and one U/S map per structure, got {len(ct_maps)} and {len(us_maps)}"
        )
    for image in ct_maps:
        if not isinstance(image, sitk.Image) or image.GetDimension() != 3:
            raise TypeError("CT maps must be 3D SimpleITK images")
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(poses) == 0:
        raise ValueError(f"poses must have shape (n, 4, 4) with n >= 1, got {poses.shape}")
    if pivots.shape != (len(poses), 2):
        raise ValueError(f"pivots must have shape ({len(poses)}, 2), got {pivots.shape}")
    maps = [np.asarray(m) != 0 for m in us_maps]
    for m in maps:
        if m.ndim != 3 or m.shape[0] != len(poses):
            raise ValueError(
                f"U/S maps must be (n, rows, cols) with n = {len(poses)} frames, got {m.shape}"
            )
    return maps


def search_plane_offset(
    ct_maps: Sequence[sitk.Image],
    us_maps: Sequence[ArrayLike],
    poses: ArrayLike,
    pivots_uv: ArrayLike,
    pixel_size: tuple[float, float],
    *,
    frames: Sequence[int] | None = None,
    structures: Sequence[str] = (),
) -> PlaneSearchResult:
    """The common :class:`PlaneOffset` that makes the CT sections overlap the U/S maps best.

    Args:
        ct_maps: One binary image per structure on the CT grid (e.g. kidney and renal sinus).
        us_maps: One ``(n, rows, cols)`` array per structure: the frames' maps (nonzero inside).
        poses: ``(n, 4, 4)`` estimated poses of those frames (U/S image mm -> CT world mm).
        pivots_uv: ``(n, 2)`` tilt pivots (mm), the frames' U/S kidney centroids.
        pixel_size: U/S ``(sx, sy)`` mm.
        frames: Frame numbers of the ``n`` frames (recorded only).
        structures: Names of the structures (recorded only).

    Returns:
        The correction and the scores before and after (see :class:`PlaneSearchResult`).

    Raises:
        ValueError, TypeError: Inputs of the wrong shape or kind.

    Example:
        >>> result = search_plane_offset([kidney, sinus], [us_kidney, us_sinus], poses,
        ...                              centroids, (0.5, 0.5))  # doctest: +SKIP
        >>> result.offset.normal_mm  # doctest: +SKIP
        -6.0
    """
    started = time.perf_counter()
    matrices = np.asarray(poses, dtype=np.float64)
    pivots = np.asarray(pivots_uv, dtype=np.float64)
    maps = _validate(ct_maps, us_maps, matrices, pivots)
    limits = np.array([MAX_TILT_DEG, MAX_TILT_DEG, MAX_NORMAL_MM, MAX_SHIFT_MM, MAX_SHIFT_MM])
    scores: dict[tuple[float, ...], float] = {}

    def score(vector: NDArray[np.float64]) -> float:
        key = tuple(np.round(vector, 6))
        if key not in scores:
            corrected = PlaneOffset.from_vector(vector).apply(matrices, pivots)
            scores[key] = structure_overlap(ct_maps, maps, corrected, pixel_size)
        return scores[key]

    start = np.zeros(5)
    before = score(start)
    # Stage 1: the normal offset alone, exhaustively (ties keep the smallest move).
    best_vector, best = start, before
    for normal in sorted(NORMAL_GRID_MM, key=abs):
        candidate = np.array([0.0, 0.0, normal, 0.0, 0.0])
        value = score(candidate)
        if value > best:
            best_vector, best = candidate, value
    # Stage 2: coordinate ascent over the five parameters with halving steps.
    for steps in ASCENT_STEPS:
        improved = True
        while improved:
            improved = False
            for axis in range(5):
                for sign in (-1.0, 1.0):
                    candidate = best_vector.copy()
                    candidate[axis] += sign * steps[axis]
                    if abs(candidate[axis]) > limits[axis]:
                        continue
                    value = score(candidate)
                    if value > best:
                        best_vector, best, improved = candidate, value, True
    return PlaneSearchResult(
        offset=PlaneOffset.from_vector(best_vector),
        score_before=before,
        score_after=best,
        frames=tuple(int(k) for k in (frames if frames is not None else range(len(matrices)))),
        evaluations=len(scores),
        seconds=time.perf_counter() - started,
        structures=tuple(str(s) for s in structures),
    )
