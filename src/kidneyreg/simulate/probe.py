"""The curvilinear probe: its field of view, its per-case pose offset, its placement on the skin.

Frame geometry. The U/S frame shows the whole fan of a curvilinear (convex) abdominal probe. The
centre of curvature of the array (the virtual apex) lies above the image at U/S coordinates
``(u_c, v_a)`` with ``u_c`` the frame's lateral centre and ``v_a = -radius * cos(fan / 2)``, so the
array's arc touches the top row at the fan's edges and its middle, where the probe touches the
skin, sits at ``v = radius * (1 - cos(fan / 2))``. A beam at angle ``theta`` (0 = straight down,
positive towards +u) reaches the pixel at depth ``r`` (distance from the apex, ``radius <= r <=
radius + depth``) at ``(u_c + r sin theta, v_a + r cos theta)``.

Pose. A case's nominal view depends on its approach (:data:`APPROACHES`,
:func:`approach_rotation`). The ``"sagittal"`` approach is the default pose (docs/architecture.md):
the frame lies in the CT's sagittal plane through the kidney centroid, u -> superior, v (depth) ->
posterior, so the probe sits on the anterior abdomen and looks backwards at the kidney. The
``"flank"`` approach puts the probe on the patient's flank on the kidney's side, posterolaterally,
looking medially and somewhat anteriorly, its array turned along the kidney's long axis (u ->
superior and somewhat posterior): a coronal-oblique longitudinal view.
The true view of a case differs from the nominal one by a rigid offset about the kidney centroid
whose rotation and translation norms follow the paper's groups A and B.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray

from kidneyreg.errors import InputError
from kidneyreg.geometry import (
    DEFAULT_POSE_ROTATION,
    euler_to_matrix,
    invert_rigid,
    is_rigid,
    make_rigid,
    transform_points,
)
from kidneyreg.simulate.tissues import KIDNEY_TISSUES, Tissue

__all__ = [
    "APPROACHES",
    "FLANK_TILT_DEG",
    "FLANK_TWIST_DEG",
    "GROUP_STATISTICS",
    "ProbeGeometry",
    "ProbeOffset",
    "ProbePlacement",
    "RandomProbeGeometry",
    "RandomProbeOffset",
    "approach_rotation",
    "find_skin",
    "place_probe",
    "place_probe_in_window",
    "visible_kidney_fraction",
]

Group = Literal["A", "B", "mixed"]

#: Probe approaches the simulator knows: the nominal view a case's offset is applied to.
APPROACHES = ("sagittal", "flank")
_SIDES = ("right", "left")

#: Tilt (degrees) of the flank view's depth axis from pure lateral-to-medial towards anterior: the
#: probe sits posterolaterally on the flank, the usual posterolateral intercostal / subcostal
#: window for renal access, where the beam passes the flank muscles (not bowel) to reach the
#: kidney, which lies posteriorly in the retroperitoneum.
FLANK_TILT_DEG = 30.0
#: Turn (degrees) of the flank probe on the skin about its beam, moving the array's superior end
#: posteriorly (and, in the image plane, medially): a sonographer follows the kidney's long axis,
#: whose upper pole lies 10-20 degrees medial and 10-20 degrees posterior of the lower one
#: (simulate.anatomy); in a plane whose depth axis already runs medially, only the posterior part
#: of that tilt leaves the plane, about 20 degrees. With u pure superior the long axis would cross
#: the plane at ~20 degrees and the kidney would show as an oblique oval, not a longitudinal bean.
FLANK_TWIST_DEG = 20.0

#: The paper's pose-offset groups: (rotation norm mean, sd) in degrees and (translation norm mean,
#: sd) in mm, the L2 norms of the x, y and z components.
GROUP_STATISTICS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "A": ((10.37, 2.24), (3.69, 0.95)),
    "B": ((24.72, 2.28), (5.04, 1.20)),
}

# Deepest field of view a curvilinear abdominal probe offers (mm); used when a kidney lies deeper
# than the sampled depth.
_MAX_DEPTH_MM = 260.0
# Margin (mm) kept between the kidney and the bottom / the edges of the fan, on top of the
# breathing excursion.
_DEPTH_MARGIN_MM = 15.0
_EDGE_MARGIN_MM = 5.0


# ----------------------------------------------------------------------------------------------
# Approaches (nominal views)
# ----------------------------------------------------------------------------------------------


def approach_rotation(approach: str, side: str) -> NDArray[np.float64]:
    """The nominal view rotation (U/S image axes -> LPS) of a probe approach to one kidney.

    Columns are u (lateral along the array), v (depth, away from the probe) and the normal
    ``u x v``, as :data:`~kidneyreg.geometry.DEFAULT_POSE_ROTATION`.

    * ``"sagittal"``: :data:`~kidneyreg.geometry.DEFAULT_POSE_ROTATION` for either kidney (u ->
      superior, v -> posterior).
    * ``"flank"``: v points medially (towards the patient's left, +x, for the right kidney;
      towards the right, -x, for the left one), tilted :data:`FLANK_TILT_DEG` towards anterior
      (-y), so the probe sits on the posterolateral flank; u runs superior-inferior (superior
      along +u, as the default pose), turned :data:`FLANK_TWIST_DEG` about v so that its
      superior end points posteriorly, along the kidney's long axis. The plane is a
      coronal-oblique longitudinal view of the kidney; its normal is closer to A-P than to L-R.

    Args:
        approach: One of :data:`APPROACHES`.
        side: The scanned kidney, ``"right"`` or ``"left"``.

    Returns:
        A new, proper (determinant +1) 3x3 rotation.

    Raises:
        ValueError: Unknown approach or side.

    Example:
        >>> approach_rotation("flank", "right")[:, 1].round(3)  # v: medial (+x) and anterior (-y)
        array([ 0.866, -0.5  ,  0.   ])
        >>> approach_rotation("flank", "right")[:, 0].round(3)  # u: superior, turned posteriorly
        array([0.171, 0.296, 0.94 ])
    """
    if approach not in APPROACHES:
        raise ValueError(f"approach must be one of {', '.join(APPROACHES)}, got {approach!r}")
    if side not in _SIDES:
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if approach == "sagittal":
        return np.array(DEFAULT_POSE_ROTATION, dtype=np.float64)
    tilt = math.radians(FLANK_TILT_DEG)
    medial = 1.0 if side == "right" else -1.0  # +x is the patient's left in LPS
    v = np.array([medial * math.cos(tilt), -math.sin(tilt), 0.0])
    superior = np.array([0.0, 0.0, 1.0])
    # The horizontal direction across the beam that points posteriorly (+y).
    across = np.cross(superior, v)
    across *= np.sign(across[1])
    twist = math.radians(FLANK_TWIST_DEG)
    u = math.cos(twist) * superior + math.sin(twist) * across
    return np.stack([u, v, np.cross(u, v)], axis=1)


# ----------------------------------------------------------------------------------------------
# Pose offsets (groups A and B)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeOffset:
    """Rigid offset of the true view from the centroid-based default pose.

    The offset acts in CT world about the kidney centroid ``c``:
    ``x -> R (x - c) + c + t`` with ``R`` from the Euler angles (``R = Rz Ry Rx``).

    Attributes:
        group: ``"A"`` or ``"B"``.
        rotation_deg: Euler angles (rx, ry, rz) in degrees.
        translation_mm: Translation (tx, ty, tz) in mm.
    """

    group: str
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]

    @property
    def rotation_norm_deg(self) -> float:
        """L2 norm of the three rotation components (degrees), as the paper reports it."""
        return float(np.linalg.norm(self.rotation_deg))

    @property
    def translation_norm_mm(self) -> float:
        """L2 norm of the translation (mm)."""
        return float(np.linalg.norm(self.translation_mm))

    def matrix(self, centre: ArrayLike) -> NDArray[np.float64]:
        """The offset as a 4x4 world transform about ``centre`` (LPS mm).

        Example:
            >>> off = ProbeOffset("A", (0.0, 0.0, 0.0), (1.0, 2.0, 3.0))
            >>> off.matrix([5.0, 5.0, 5.0])[:3, 3]
            array([1., 2., 3.])
        """
        c = np.asarray(centre, dtype=np.float64).reshape(3)
        params = np.concatenate([np.deg2rad(self.rotation_deg), [0.0, 0.0, 0.0]])
        m = euler_to_matrix(params)
        m[:3, 3] = c - m[:3, :3] @ c + np.asarray(self.translation_mm)
        return m

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description, norms included."""
        return {
            "group": self.group,
            "rotation_deg": [float(v) for v in self.rotation_deg],
            "translation_mm": [float(v) for v in self.translation_mm],
            "rotation_norm_deg": self.rotation_norm_deg,
            "translation_norm_mm": self.translation_norm_mm,
        }


def _unit_vector(rng: np.random.Generator) -> NDArray[np.float64]:
    while True:
        v = rng.standard_normal(3)
        n = float(np.linalg.norm(v))
        if n > 1e-6:
            return v / n


def _positive_normal(rng: np.random.Generator, mean: float, sd: float, floor: float) -> float:
    # A Gaussian truncated below at ``floor`` (by rejection; the floors sit > 3 sd below the
    # means, so the truncation does not move the statistics).
    while True:
        x = float(rng.normal(mean, sd))
        if x >= floor:
            return x


@dataclass(frozen=True)
class RandomProbeOffset:
    """Sampler of the per-case pose offset of the paper's group A, B, or either at random.

    The rotation and translation norms are drawn from the group's Gaussians; their directions are
    uniform on the sphere, so the plane may tilt in any direction while, at these angles
    (below ~35 degrees), it stays a longitudinal view of the kidney.

    Args:
        group: ``"A"``, ``"B"`` or ``"mixed"`` (A or B with equal probability).

    Example:
        >>> offset = RandomProbeOffset("A").sample(np.random.default_rng(0))
        >>> offset.group
        'A'
    """

    group: Group = "mixed"

    def __post_init__(self) -> None:
        if self.group not in ("A", "B", "mixed"):
            raise ValueError(f"group must be 'A', 'B' or 'mixed', got {self.group!r}")

    def sample(self, rng: np.random.Generator) -> ProbeOffset:
        """Draw one offset."""
        group = self.group
        if group == "mixed":
            group = "A" if rng.uniform() < 0.5 else "B"
        (r_mean, r_sd), (t_mean, t_sd) = GROUP_STATISTICS[group]
        r_norm = _positive_normal(rng, r_mean, r_sd, 0.5)
        t_norm = _positive_normal(rng, t_mean, t_sd, 0.1)
        rotation = r_norm * _unit_vector(rng)
        shift = t_norm * _unit_vector(rng)
        return ProbeOffset(
            group=group,
            rotation_deg=(float(rotation[0]), float(rotation[1]), float(rotation[2])),
            translation_mm=(float(shift[0]), float(shift[1]), float(shift[2])),
        )

    def sample_candidates(self, rng: np.random.Generator, n: int) -> list[ProbeOffset]:
        """Draw one offset, then ``n - 1`` more with the same group and norms, other directions.

        A sonographer looks for an acoustic window: the case writer keeps the candidate whose
        view of the kidney is least shadowed. Sharing the norms keeps their distribution exactly
        the group's, whichever candidate wins.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        first = self.sample(rng)
        out = [first]
        for _ in range(n - 1):
            rotation = first.rotation_norm_deg * _unit_vector(rng)
            shift = first.translation_norm_mm * _unit_vector(rng)
            out.append(
                ProbeOffset(
                    group=first.group,
                    rotation_deg=(float(rotation[0]), float(rotation[1]), float(rotation[2])),
                    translation_mm=(float(shift[0]), float(shift[1]), float(shift[2])),
                )
            )
        return out


# ----------------------------------------------------------------------------------------------
# Probe geometry (field of view and frame grid)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeGeometry:
    """A curvilinear probe's field of view on a U/S frame grid.

    Attributes:
        radius_mm: Radius of curvature of the array.
        fan_deg: Full opening angle of the fan.
        depth_mm: Imaging depth below the array.
        frequency_mhz: Centre frequency.
        focus_mm: Transmit focus depth below the array.
        pixel_size: Frame pixel size in mm (square pixels).

    Example:
        >>> geo = ProbeGeometry(55.0, 65.0, 160.0, 3.5, 100.0, 0.8)
        >>> geo.frame_shape
        (212, 290)
    """

    radius_mm: float
    fan_deg: float
    depth_mm: float
    frequency_mhz: float
    focus_mm: float
    pixel_size: float

    def __post_init__(self) -> None:
        if min(self.radius_mm, self.fan_deg, self.depth_mm, self.pixel_size) <= 0:
            raise ValueError("probe radius, fan angle, depth and pixel size must be positive")
        if self.fan_deg >= 170:
            raise ValueError(f"fan_deg must be below 170, got {self.fan_deg}")

    @property
    def half_angle(self) -> float:
        """Half the fan opening in radians."""
        return math.radians(self.fan_deg) / 2.0

    @property
    def frame_shape(self) -> tuple[int, int]:
        """Frame size ``(rows, cols)`` holding the whole fan."""
        outer = self.radius_mm + self.depth_mm
        cols = math.ceil(2.0 * outer * math.sin(self.half_angle) / self.pixel_size) + 1
        bottom = self.apex[1] + outer
        rows = math.ceil(bottom / self.pixel_size) + 1
        return rows, cols

    @property
    def apex(self) -> tuple[float, float]:
        """U/S image coordinates ``(u_c, v_a)`` (mm) of the virtual apex (centre of curvature)."""
        outer = self.radius_mm + self.depth_mm
        cols = math.ceil(2.0 * outer * math.sin(self.half_angle) / self.pixel_size) + 1
        return (cols - 1) * self.pixel_size / 2.0, -self.radius_mm * math.cos(self.half_angle)

    @property
    def face_centre(self) -> tuple[float, float]:
        """U/S image coordinates (mm) of the middle of the array, where it touches the skin."""
        u_c, v_a = self.apex
        return u_c, v_a + self.radius_mm

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description including the frame grid."""
        data: dict[str, Any] = asdict(self)
        data["frame_shape"] = list(self.frame_shape)
        data["apex_mm"] = list(self.apex)
        return data

    def with_depth(self, depth_mm: float) -> ProbeGeometry:
        """The same probe at another imaging depth."""
        return replace(self, depth_mm=float(depth_mm))

    def polar_of(
        self, u: ArrayLike, v: ArrayLike
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Beam angle (radians) and distance from the apex (mm) of U/S points ``(u, v)``."""
        u_c, v_a = self.apex
        du = np.asarray(u, dtype=np.float64) - u_c
        dv = np.asarray(v, dtype=np.float64) - v_a
        return np.arctan2(du, dv), np.hypot(du, dv)

    def in_fan(self, u: ArrayLike, v: ArrayLike, *, margin_mm: float = 0.0) -> NDArray[np.bool_]:
        """Whether U/S points ``(u, v)`` (mm) lie in the field of view (shrunk by ``margin_mm``)."""
        theta, r = self.polar_of(u, v)
        lateral_ok = np.abs(theta) * np.maximum(r, 1e-9) <= self.half_angle * r - margin_mm
        radial_ok = (r >= self.radius_mm) & (r <= self.radius_mm + self.depth_mm - margin_mm)
        return np.asarray(lateral_ok & radial_ok)

    def fan_mask(self) -> NDArray[np.uint8]:
        """uint8 ``(rows, cols)`` mask of the pixels inside the fan."""
        rows, cols = self.frame_shape
        v, u = np.mgrid[0:rows, 0:cols].astype(np.float64) * self.pixel_size
        return self.in_fan(u, v).astype(np.uint8)


@dataclass(frozen=True)
class RandomProbeGeometry:
    """Sampler of a curvilinear abdominal probe: radius 50-60 mm, fan 60-70 deg, depth 15-18 cm.

    Example:
        >>> RandomProbeGeometry().sample(np.random.default_rng(0), pixel_size=0.8).frequency_mhz
        3.5
    """

    radius_range_mm: tuple[float, float] = (50.0, 60.0)
    fan_range_deg: tuple[float, float] = (60.0, 70.0)
    depth_range_mm: tuple[float, float] = (150.0, 180.0)
    frequency_mhz: float = 3.5

    def sample(self, rng: np.random.Generator, *, pixel_size: float) -> ProbeGeometry:
        """Draw one probe; the focus is set later, at the kidney (see :func:`place_probe`)."""
        depth = float(rng.uniform(*self.depth_range_mm))
        return ProbeGeometry(
            radius_mm=float(rng.uniform(*self.radius_range_mm)),
            fan_deg=float(rng.uniform(*self.fan_range_deg)),
            depth_mm=depth,
            frequency_mhz=self.frequency_mhz,
            focus_mm=0.6 * depth,
            pixel_size=float(pixel_size),
        )


# ----------------------------------------------------------------------------------------------
# Placement on the skin
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbePlacement:
    """Where the probe sits and what it sees.

    Attributes:
        matrix: ``M_probe``, the frame pose (U/S image mm -> CT world LPS mm) at end-expiration.
        geometry: The probe with its final depth and focus.
        skin_point: World position (mm) of the middle of the array on the skin.
        kidney_depth_mm: Distance from the skin point to the kidney centre along the view.
        lateral_shift_mm: Lateral offset of the kidney centre from the central beam (mm, +u).
    """

    matrix: NDArray[np.float64]
    geometry: ProbeGeometry
    skin_point: NDArray[np.float64]
    kidney_depth_mm: float
    lateral_shift_mm: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description."""
        return {
            "matrix": self.matrix.tolist(),
            "geometry": self.geometry.to_dict(),
            "skin_point_mm": [float(v) for v in self.skin_point],
            "kidney_depth_mm": float(self.kidney_depth_mm),
            "lateral_shift_mm": float(self.lateral_shift_mm),
        }


def _world_to_index(image: sitk.Image, points: NDArray[np.float64]) -> NDArray[np.float64]:
    """Continuous (x, y, z) indices of world points in ``image`` (any direction)."""
    origin = np.asarray(image.GetOrigin())
    spacing = np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return ((points - origin) @ direction) / spacing


def _labels_along(
    labels: sitk.Image, array: NDArray[Any], points: NDArray[np.float64]
) -> NDArray[Any]:
    """Nearest-neighbour labels at world points; -1 outside the volume."""
    index = np.rint(_world_to_index(labels, points)).astype(np.int64)
    size = np.asarray(labels.GetSize())
    inside = np.all((index >= 0) & (index < size), axis=1)
    out = np.full(len(points), -1, dtype=np.int64)
    ix, iy, iz = index[inside].T
    out[inside] = array[iz, iy, ix]
    return out


def find_skin(
    labels: sitk.Image, start: ArrayLike, direction: ArrayLike, *, source: str = "label map"
) -> NDArray[np.float64]:
    """The point where a ray from inside the body leaves it (last non-air label along the ray).

    Args:
        labels: Tissue label map (``Tissue.AIR`` outside the body).
        start: World point inside the body (mm).
        direction: Ray direction (any length).
        source: Name of the input, for error messages.

    Raises:
        InputError: If ``start`` lies outside the volume or the body reaches the volume's edge
            along the ray (the image is too small to hold the probe).
    """
    array = sitk.GetArrayViewFromImage(labels)
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    step = 0.5 * min(labels.GetSpacing())
    extent = float(np.linalg.norm(np.asarray(labels.GetSize()) * np.asarray(labels.GetSpacing())))
    t = np.arange(0.0, extent + step, step)
    points = np.asarray(start, dtype=np.float64)[None, :] + t[:, None] * d[None, :]
    values = _labels_along(labels, array, points)
    if values[0] < 0:
        raise InputError(source, "the kidney lies outside the image")
    outside = np.nonzero(values < 0)[0]
    end = int(outside[0]) if len(outside) else len(values)
    body = np.nonzero(values[:end] != int(Tissue.AIR))[0]
    if len(body) == 0:
        raise InputError(source, "no body tissue around the kidney")
    last = int(body[-1])
    if last >= end - 1:
        raise InputError(
            source,
            "CT too small to hold the probe's field of view: the body reaches the image edge "
            "between the kidney and the skin",
        )
    return np.asarray(points[last + 1], dtype=np.float64)


def _probe_matrix(
    rotation: NDArray[np.float64], geometry: ProbeGeometry, skin: NDArray[np.float64]
) -> NDArray[np.float64]:
    u_f, v_f = geometry.face_centre
    origin = skin - u_f * rotation[:, 0] - v_f * rotation[:, 1]
    return make_rigid(rotation, origin)


def _checked_rotation(rotation: ArrayLike) -> NDArray[np.float64]:
    r = np.asarray(rotation, dtype=np.float64)
    if r.shape != (3, 3) or not is_rigid(make_rigid(r, (0.0, 0.0, 0.0))):
        raise ValueError(f"base_rotation must be a proper 3x3 rotation, got {r.tolist()}")
    return r


def place_probe(
    labels: sitk.Image,
    kidney_points: ArrayLike,
    offset_matrix: ArrayLike,
    centre: ArrayLike,
    geometry: ProbeGeometry,
    *,
    lateral_shift_mm: float = 0.0,
    breathing_margin_mm: float = 12.0,
    base_rotation: ArrayLike = DEFAULT_POSE_ROTATION,
    source: str = "label map",
) -> ProbePlacement:
    """Put the probe on the skin so that its view is the offset nominal view.

    The view's plane is the nominal view ``base_rotation`` (by default the sagittal default pose,
    u -> superior, v -> posterior; see :func:`approach_rotation`) through the kidney centroid,
    moved by the offset about the centroid. The probe sits where the view's depth axis through the
    (offset) kidney centre, shifted laterally by ``lateral_shift_mm``, leaves the body. The depth
    grows beyond the sampled one when the kidney would not fit (up to 26 cm), and the lateral
    shift shrinks when the kidney would leave the fan.

    Args:
        labels: Tissue label map in CT world.
        kidney_points: World points (n, 3) of the scanned kidney (e.g. its voxel centres).
        offset_matrix: The :class:`ProbeOffset` as a 4x4 world matrix.
        centre: Kidney centroid (world mm).
        geometry: Sampled probe.
        lateral_shift_mm: Wanted lateral position of the kidney centre relative to the fan axis.
        breathing_margin_mm: Extra room kept around the kidney for its breathing motion.
        base_rotation: Nominal view rotation (3x3, columns u, v, normal in LPS) the offset acts
            on.
        source: Name of the input, for error messages.

    Raises:
        InputError: If the body does not fit in the image along the view, or the kidney lies
            too deep for the probe.
        ValueError: If ``base_rotation`` is not a proper rotation.

    Example:
        >>> placement = place_probe(labels, pts, np.eye(4), centre, geometry)  # doctest: +SKIP
    """
    offset = np.asarray(offset_matrix, dtype=np.float64)
    rotation = offset[:3, :3] @ _checked_rotation(base_rotation)
    c = transform_points(offset, np.asarray(centre, dtype=np.float64)[None, :])[0]
    u_dir, v_dir = rotation[:, 0], rotation[:, 1]
    pts = np.asarray(kidney_points, dtype=np.float64).reshape(-1, 3)
    # Points within a few mm of the plane: what the view shows of the kidney.
    plane_tol = max(2.0, 1.5 * min(labels.GetSpacing()))

    last_error: InputError | None = None
    for shift in (lateral_shift_mm, 0.0):
        anchor = c - shift * u_dir
        skin = find_skin(labels, anchor, -v_dir, source=source)
        kidney_depth = float(np.dot(c - skin, v_dir))
        geo = geometry
        matrix = _probe_matrix(rotation, geo, skin)
        local = transform_points(invert_rigid(matrix), pts)
        near = local[np.abs(local[:, 2]) <= plane_tol]
        if len(near) == 0:
            near = local
        theta, r = geo.polar_of(near[:, 0], near[:, 1])
        needed = float(r.max()) - geo.radius_mm + _DEPTH_MARGIN_MM + 0.5 * breathing_margin_mm
        if needed > _MAX_DEPTH_MM:
            raise InputError(
                source,
                f"the kidney lies {needed:.0f} mm deep along the view, deeper than the probe's "
                f"{_MAX_DEPTH_MM:.0f} mm",
            )
        if needed > geo.depth_mm:
            geo = geo.with_depth(math.ceil(needed))
            # The frame grows with the depth: the apex moves, so place the probe again.
            matrix = _probe_matrix(rotation, geo, skin)
            local = transform_points(invert_rigid(matrix), pts)
            near = local[np.abs(local[:, 2]) <= plane_tol]
            if len(near) == 0:
                near = local
            theta, r = geo.polar_of(near[:, 0], near[:, 1])
        lateral = np.abs(theta) * r + breathing_margin_mm + _EDGE_MARGIN_MM
        if np.all(lateral <= geo.half_angle * r) or shift == 0.0:
            geo = replace(geo, focus_mm=float(np.clip(kidney_depth, 40.0, geo.depth_mm)))
            matrix = _probe_matrix(rotation, geo, skin)
            return ProbePlacement(
                matrix=matrix,
                geometry=geo,
                skin_point=skin,
                kidney_depth_mm=kidney_depth,
                lateral_shift_mm=float(shift),
            )
        last_error = InputError(source, "the kidney does not fit in the probe's fan")
    raise last_error if last_error is not None else InputError(source, "probe placement failed")


def visible_kidney_fraction(
    labels: sitk.Image, placement: ProbePlacement, *, step_mm: float = 1.5, n_beams: int = 64
) -> float:
    """Fraction of the kidney in the fan that no bone, gas or lung shadows (0 if none in view).

    Beams are traced from the array through the end-expiration view; a kidney sample counts as
    visible when no shadowing tissue lies between it and the probe.

    Args:
        labels: Tissue label map in CT world.
        placement: The probe placement to judge.
        step_mm: Sampling step along the beams.
        n_beams: Number of beams traced.
    """
    geo = placement.geometry
    theta = np.linspace(-geo.half_angle, geo.half_angle, n_beams)
    r = geo.radius_mm + np.arange(0.0, geo.depth_mm, step_mm)
    u_c, v_a = geo.apex
    t, rr = np.meshgrid(theta, r, indexing="ij")
    local = np.stack(
        [u_c + rr * np.sin(t), v_a + rr * np.cos(t), np.zeros_like(t)], axis=-1
    ).reshape(-1, 3)
    world = transform_points(placement.matrix, local)
    values = _labels_along(labels, sitk.GetArrayViewFromImage(labels), world).reshape(t.shape)
    kidney = np.isin(values, [int(x) for x in KIDNEY_TISSUES])
    if not kidney.any():
        return 0.0
    blocking = np.isin(values, [int(Tissue.BONE), int(Tissue.GAS), int(Tissue.LUNG)])
    # Air counts only once the beam has entered the body (the probe presses the skin in).
    inside = np.cumsum(values > 0, axis=1) > 0
    blocking |= inside & (values == int(Tissue.AIR))
    shadowed = np.cumsum(blocking, axis=1) > 0
    return float((kidney & ~shadowed).sum() / kidney.sum())


def place_probe_in_window(
    labels: sitk.Image,
    kidney_points: ArrayLike,
    centre: ArrayLike,
    candidates: list[tuple[ProbeOffset, float]],
    geometry: ProbeGeometry,
    *,
    tolerance: float = 0.05,
    batch: int | None = None,
    enough: float = 0.9,
    base_rotation: ArrayLike = DEFAULT_POSE_ROTATION,
    source: str = "label map",
    reject: Callable[[ProbePlacement], str | None] | None = None,
) -> tuple[ProbePlacement, ProbeOffset, float]:
    """Choose the candidate view a sonographer would: unshadowed, then closest to the kidney.

    Candidates are placed in order, ``batch`` at a time (all at once when None), until the best
    visible kidney fraction reaches ``enough``; among those placed whose visible fraction is
    within ``tolerance`` of the best, the one with the kidney nearest to the skin wins (the
    first in order on ties).

    Args:
        labels: Tissue label map in CT world.
        kidney_points: World points (n, 3) of the scanned kidney.
        centre: Kidney centroid (world mm).
        candidates: ``(offset, lateral_shift_mm)`` pairs to try, in order.
        geometry: Sampled probe.
        tolerance: Visible fraction that may be traded for a shallower kidney.
        batch: Number of candidates tried before checking ``enough``.
        enough: Visible fraction that ends the search after a batch.
        base_rotation: Nominal view rotation the offsets act on (see :func:`place_probe`).
        source: Name of the input, for error messages.
        reject: Returns why a placed candidate cannot be used (e.g. its fan leaves the CT), or
            None; rejected candidates are skipped like those that cannot be placed.

    Returns:
        The placement, its offset, and its visible kidney fraction.

    Raises:
        InputError: From :func:`place_probe`, or with the last ``reject`` reason, when no
            candidate can be used.

    Example:
        >>> place_probe_in_window(labels, pts, c, [(offset, 0.0)], geo)  # doctest: +SKIP
    """
    if not candidates:
        raise ValueError("no candidate views")
    placed: list[tuple[ProbePlacement, ProbeOffset, float]] = []
    error: InputError | None = None
    step = batch if batch is not None else len(candidates)
    for count, (offset, shift) in enumerate(candidates):
        if count and count % step == 0 and placed and max(p[2] for p in placed) >= enough:
            break
        try:
            placement = place_probe(
                labels,
                kidney_points,
                offset.matrix(centre),
                centre,
                geometry,
                lateral_shift_mm=shift,
                base_rotation=base_rotation,
                source=source,
            )
        except InputError as exc:
            error = exc
            continue
        problem = reject(placement) if reject is not None else None
        if problem is not None:
            error = InputError(source, problem)
            continue
        placed.append((placement, offset, visible_kidney_fraction(labels, placement)))
    if not placed:
        assert error is not None
        raise error
    best_visible = max(p[2] for p in placed)
    good = [p for p in placed if p[2] >= best_visible - tolerance]
    return min(good, key=lambda p: p[0].kidney_depth_mm)
