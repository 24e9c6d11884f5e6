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
normal): a tilt about u and about v and a rotation in the plane (about w), all through a pivot
(the frame's U/S kidney centroid), a move along the normal and an in-plane shift. Over a
breathing cycle the probe is held still and the kidney slides under it, so the network's error
out of the plane is a per-patient bias (its sign stays over the sequence) that one correction,
found on the adaptation frames, removes from every later frame.

The search (:func:`search_plane_offset`) is deterministic. A coarse grid first: tilt pairs
every 8 degrees within 24 (the paper's group B offsets are 24.7 +- 2.3 degrees in norm, and a
regression network can leave most of that; a local search from the estimate stops at the first
maximum) times normal offsets every 4 mm within 12, plus the normal offsets alone every 2 mm,
scored on every other frame for speed. Then coordinate ascent over the six parameters with
halving steps from the best few grid points with distinct tilts and from the best untilted one;
the best score wins. The score is the sum over the structures of their Dice pooled over the
frames.

Example:
    >>> offset = PlaneOffset(normal_mm=-2.0, shift_u_mm=1.0)
    >>> offset.apply(np.eye(4)[None], np.zeros((1, 2)))[0, :3, 3].tolist()
    [1.0, 0.0, -2.0]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray

from kidneyreg.io.image import grid_difference

__all__ = [
    "PlaneOffset",
    "PlaneSearchResult",
    "SectionSampler",
    "search_plane_offset",
    "structure_overlap",
]

#: Tilts (degrees, about u and about v alike) of the coarse grid: pairs of these.
TILT_GRID_DEG: tuple[float, ...] = tuple(float(a) for a in range(-24, 25, 8))
#: Normal offsets (mm) paired with every grid tilt.
COARSE_NORMAL_GRID_MM: tuple[float, ...] = tuple(float(w) for w in range(-12, 13, 4))
#: Normal offsets (mm) scored without tilt (the error is largest there; finer).
NORMAL_GRID_MM: tuple[float, ...] = tuple(float(w) for w in range(-12, 13, 2))
#: Grid points (best first, tilts more than one grid step apart) the ascent starts from, besides
#: the best untilted one.
ASCENT_STARTS = 3
#: Coordinate-ascent steps, in turn, in the order of :meth:`PlaneOffset.vector` (tilt u, tilt v
#: in degrees; normal, shift u, shift v in mm; in plane in degrees).
ASCENT_STEPS: tuple[tuple[float, float, float, float, float, float], ...] = (
    (4.0, 4.0, 2.0, 2.0, 2.0, 4.0),
    (2.0, 2.0, 1.0, 1.0, 1.0, 2.0),
    (1.0, 1.0, 0.5, 0.5, 0.5, 1.0),
)
#: Bounds of the correction (degrees, mm): the tilts cover the paper's group-B offsets (2 sigma:
#: 29.3 degrees); beyond them the frames' evidence is not a correction of the network's
#: estimate but another anatomy. The network itself corrects most of the in-plane rotation.
MAX_TILT_DEG = 30.0
MAX_IN_PLANE_DEG = 20.0
MAX_NORMAL_MM = 16.0
MAX_SHIFT_MM = 10.0


@dataclass(frozen=True)
class PlaneOffset:
    """A rigid correction of a U/S frame's pose, in the frame's own axes.

    Applied to a pose ``M`` (U/S image mm -> CT world mm) with pivot ``p = (pu, pv)`` mm on the
    frame: ``M @ T(p) @ Rv(tilt_v) @ Ru(tilt_u) @ Rw(in_plane) @ T(-p + normal * w) @
    T(shift_u, shift_v)``. The pivot stays where it was under the rotations.

    Attributes:
        tilt_u_deg: Rotation about the frame's lateral axis u (columns), degrees.
        tilt_v_deg: Rotation about the frame's depth axis v (rows), degrees.
        normal_mm: Move along the frame's normal w, mm.
        shift_u_mm: In-plane shift along u, mm.
        shift_v_mm: In-plane shift along v, mm.
        in_plane_deg: Rotation in the plane (about the normal w, from u towards v), degrees.
    """

    tilt_u_deg: float = 0.0
    tilt_v_deg: float = 0.0
    normal_mm: float = 0.0
    shift_u_mm: float = 0.0
    shift_v_mm: float = 0.0
    in_plane_deg: float = 0.0

    @classmethod
    def from_vector(cls, values: ArrayLike) -> PlaneOffset:
        """From ``(tilt_u_deg, tilt_v_deg, normal_mm, shift_u_mm, shift_v_mm, in_plane_deg)``."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.shape != (6,) or not np.all(np.isfinite(v)):
            raise ValueError(f"a plane offset needs 6 finite values, got {values!r}")
        return cls(*(float(x) for x in v))

    def vector(self) -> NDArray[np.float64]:
        """``(tilt_u_deg, tilt_v_deg, normal_mm, shift_u_mm, shift_v_mm, in_plane_deg)``."""
        return np.array(
            [
                self.tilt_u_deg,
                self.tilt_v_deg,
                self.normal_mm,
                self.shift_u_mm,
                self.shift_v_mm,
                self.in_plane_deg,
            ]
        )

    def local_matrix(self, pivot_uv: ArrayLike) -> NDArray[np.float64]:
        """The correction as a 4x4 matrix in frame coordinates (right-multiplies a pose)."""
        pivot = np.asarray(pivot_uv, dtype=np.float64).reshape(2)
        a, b, c = np.deg2rad([self.tilt_u_deg, self.tilt_v_deg, self.in_plane_deg])
        rot_u = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        rot_v = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        rot_w = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
        rotation = np.eye(4)
        rotation[:3, :3] = rot_v @ rot_u @ rot_w
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
        seconds: Search time (as kept by ``Registrar.adapt``: both of its searches, with the
            network passes that give their starting estimates).
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


class SectionSampler:
    """Nearest-neighbour sections of binary CT maps on U/S frames, all structures in one gather.

    The search scores hundreds of candidate poses; one ``sitk.Resample`` per frame and structure
    would spend most of its time in call overhead. The maps are packed as the bits of one uint8
    array, cropped to their common bounding box, and every frame pixel is mapped to its nearest
    voxel with one matrix product (ITK's nearest-neighbour rule: the continuous index rounded
    half up, nothing outside the grid), so the sections equal
    :func:`~kidneyreg.geometry.resample_on_frames` with ``interpolator="nearest"``.

    Args:
        ct_maps: One to eight binary images (nonzero inside); maps on another grid than the
            first are resampled onto it (nearest neighbour).
        frame_shape: ``(rows, cols)`` of the U/S frames.
        pixel_size: U/S ``(sx, sy)`` mm.

    Example:
        >>> image = sitk.GetImageFromArray(np.ones((4, 4, 4), np.uint8))
        >>> SectionSampler([image], (2, 3), (1.0, 1.0)).sections(np.eye(4)[None])[0].shape
        (1, 2, 3)
    """

    def __init__(
        self,
        ct_maps: Sequence[sitk.Image],
        frame_shape: tuple[int, int],
        pixel_size: tuple[float, float],
    ) -> None:
        if not 1 <= len(ct_maps) <= 8:
            raise ValueError(f"need 1 to 8 CT maps, got {len(ct_maps)}")
        for image in ct_maps:
            if not isinstance(image, sitk.Image) or image.GetDimension() != 3:
                raise TypeError("CT maps must be 3D SimpleITK images")
        reference = ct_maps[0]
        packed = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
        for bit, image in enumerate(ct_maps):
            if grid_difference(image, reference) is not None:
                image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor)
            packed |= (sitk.GetArrayViewFromImage(image) != 0).astype(np.uint8) << bit
        self.n_structures = len(ct_maps)
        inside = np.argwhere(packed)
        # (z, y, x) corner of the maps' common bounding box; all empty: one empty voxel.
        self._low = inside.min(axis=0) if inside.size else np.zeros(3, dtype=np.int64)
        high = inside.max(axis=0) + 1 if inside.size else np.ones(3, dtype=np.int64)
        self._packed = np.ascontiguousarray(
            packed[self._low[0] : high[0], self._low[1] : high[1], self._low[2] : high[2]]
        )
        direction = np.array(reference.GetDirection(), dtype=np.float64).reshape(3, 3)
        scaled = direction * np.array(reference.GetSpacing(), dtype=np.float64)
        self._to_index = np.linalg.inv(scaled)  # world mm -> continuous (x, y, z) index
        self._origin = np.array(reference.GetOrigin(), dtype=np.float64)
        rows, cols = int(frame_shape[0]), int(frame_shape[1])
        self.frame_shape = (rows, cols)
        grid_v, grid_u = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        self._pixels = np.stack(
            [grid_u.ravel() * float(pixel_size[0]), grid_v.ravel() * float(pixel_size[1])]
        )  # (2, rows * cols), U/S image mm

    def sections(self, poses: ArrayLike) -> NDArray[np.bool_]:
        """``(structures, n, rows, cols)`` boolean sections at ``(n, 4, 4)`` poses."""
        matrices = np.asarray(poses, dtype=np.float64)
        # Continuous index of every pixel: A @ (R @ (u, v, 0) + t - origin), A = to_index.
        linear = np.einsum("ij,njk->nik", self._to_index, matrices[:, :3, :2])
        offset = np.einsum("ij,nj->ni", self._to_index, matrices[:, :3, 3] - self._origin)
        index = np.floor(linear @ self._pixels + offset[:, :, None] + 0.5).astype(np.int64)
        # (x, y, z) -> (z, y, x) in the crop.
        z, y, x = (
            index[:, 2] - self._low[0],
            index[:, 1] - self._low[1],
            index[:, 0] - self._low[2],
        )
        shape = self._packed.shape
        inside = (z >= 0) & (z < shape[0]) & (y >= 0) & (y < shape[1]) & (x >= 0) & (x < shape[2])
        values = np.zeros(z.shape, dtype=np.uint8)
        values[inside] = self._packed[z[inside], y[inside], x[inside]]
        values = values.reshape(len(matrices), *self.frame_shape)
        return np.stack([(values >> bit) & 1 != 0 for bit in range(self.n_structures)])

    def overlap(self, us_maps: Sequence[NDArray[np.bool_]], poses: ArrayLike) -> float:
        """Sum over structures of the Dice pooled over frames (:func:`structure_overlap`)."""
        total = 0.0
        for fixed, moving in zip(us_maps, self.sections(poses), strict=True):
            denominator = float(fixed.sum() + moving.sum())
            if denominator > 0:
                total += 2.0 * float((fixed & moving).sum()) / denominator
        return total


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
    maps = [np.asarray(m) != 0 for m in us_maps]
    if len(maps) != len(ct_maps):
        raise ValueError(f"need one U/S map per CT map, got {len(maps)} and {len(ct_maps)}")
    shape = (int(maps[0].shape[1]), int(maps[0].shape[2]))
    return SectionSampler(ct_maps, shape, pixel_size).overlap(maps, poses)


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


def _ascend(
    score: Callable[[NDArray[np.float64]], float], start: NDArray[np.float64]
) -> tuple[NDArray[np.float64], float]:
    """Coordinate ascent over the six parameters with :data:`ASCENT_STEPS`, within bounds."""
    limits = np.array(
        [MAX_TILT_DEG, MAX_TILT_DEG, MAX_NORMAL_MM, MAX_SHIFT_MM, MAX_SHIFT_MM, MAX_IN_PLANE_DEG]
    )
    best_vector = np.clip(start, -limits, limits)
    best = score(best_vector)
    for steps in ASCENT_STEPS:
        improved = True
        while improved:
            improved = False
            for axis in range(6):
                for sign in (-1.0, 1.0):
                    candidate = best_vector.copy()
                    candidate[axis] += sign * steps[axis]
                    if abs(candidate[axis]) > limits[axis]:
                        continue
                    value = score(candidate)
                    if value > best:
                        best_vector, best, improved = candidate, value, True
    return best_vector, best


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
    # Every other frame for the coarse grid: half the cost, and the grid only ranks starts.
    coarse = np.arange(0, len(matrices), 2)
    coarse_maps = [m[coarse] for m in maps]
    sampler = SectionSampler(ct_maps, (int(maps[0].shape[1]), int(maps[0].shape[2])), pixel_size)
    scores: dict[tuple[float, ...], float] = {}
    coarse_scores: dict[tuple[float, ...], float] = {}

    def score(vector: NDArray[np.float64]) -> float:
        key = tuple(np.round(vector, 6))
        if key not in scores:
            corrected = PlaneOffset.from_vector(vector).apply(matrices, pivots)
            scores[key] = sampler.overlap(maps, corrected)
        return scores[key]

    def coarse_score(vector: NDArray[np.float64]) -> float:
        key = tuple(np.round(vector, 6))
        if key not in coarse_scores:
            corrected = PlaneOffset.from_vector(vector).apply(matrices[coarse], pivots[coarse])
            coarse_scores[key] = sampler.overlap(coarse_maps, corrected)
        return coarse_scores[key]

    start = np.zeros(6)
    before = score(start)
    # Stage 1: the coarse grid; sorted by score, ties towards the smaller move.
    grid = [np.array([0.0, 0.0, w, 0.0, 0.0, 0.0]) for w in NORMAL_GRID_MM]
    grid += [
        np.array([tilt_u, tilt_v, w, 0.0, 0.0, 0.0])
        for tilt_u in TILT_GRID_DEG
        for tilt_v in TILT_GRID_DEG
        for w in COARSE_NORMAL_GRID_MM
        if (tilt_u, tilt_v) != (0.0, 0.0)
    ]
    ranked = sorted(grid, key=lambda v: (-coarse_score(v), float(np.abs(v).sum())))
    starts = [next(v for v in ranked if v[0] == 0.0 and v[1] == 0.0)]
    spacing = TILT_GRID_DEG[1] - TILT_GRID_DEG[0]
    for vector in ranked:
        if len(starts) > ASCENT_STARTS:
            break
        if all(np.abs(vector[:2] - other[:2]).max() > spacing for other in starts):
            starts.append(vector)
    # Stage 2: coordinate ascent from each start; the best score wins (the first on ties).
    best_vector, best = start, before
    for first in starts:
        vector, value = _ascend(score, first)
        if value > best:
            best_vector, best = vector, value
    return PlaneSearchResult(
        offset=PlaneOffset.from_vector(best_vector),
        score_before=before,
        score_after=best,
        frames=tuple(int(k) for k in (frames if frames is not None else range(len(matrices)))),
        evaluations=len(scores) + len(coarse_scores),
        seconds=time.perf_counter() - started,
        structures=tuple(str(s) for s in structures),
    )
