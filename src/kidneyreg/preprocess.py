"""The paper's preprocessing (Methods, "Preprocessing"), every step invertible.

CT side: RAI orientation (identity direction cosines), isotropic resampling at the profile's
spacing, a crop of ``profile.volume_shape`` voxels around the kidney centroid, padded with air where
the body ends. All three are one resampling onto a :class:`RegistrationGrid`: a rigid matrix ``G``
(internal mm -> CT world mm) plus the profile's shape and spacing. With the default pose ``G`` has
the identity rotation and the result equals the explicit :func:`reorient_rai`,
:func:`resample_isotropic`, :func:`crop_or_pad` chain; with an initial pose (``--init``) the grid is
rotated so that the pose's U/S plane is the grid's middle x slice (``docs/architecture.md``).

U/S side: frames resampled to the profile's pixel size, cropped to ``profile.us_shape`` around the
U/S kidney centroid, a window of ``profile.window`` consecutive frames (the middle one is the
target) zero-padded and centred in a volume of ``profile.volume_shape`` with the frames stacked
along R-L (:func:`build_us_window`). ``P[k]`` maps frame k's U/S image mm into internal mm, so the
initial alignment is ``M_init = G @ P[target]``: U/S kidney centroid on CT kidney centroid.

Inverses: every step is a known rigid map (``G``, ``P``) plus a known voxel grid, so any internal
point, index or transform maps back to CT world or U/S image coordinates exactly
(:meth:`RegistrationGrid.internal_to_world`, :meth:`RegistrationGrid.index_to_world`,
:meth:`RegistrationGrid.to_world_matrix`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from kidneyreg.errors import InputError
from kidneyreg.geometry import (
    DEFAULT_POSE_ROTATION,
    Interpolator,
    invert_rigid,
    is_rigid,
    make_rigid,
    sitk_interpolator,
    transform_points,
)
from kidneyreg.profiles import Profile, get_profile

__all__ = [
    "CT_AIR_HU",
    "CT_WINDOW_HU",
    "MIRROR",
    "PreparedCT",
    "RegistrationGrid",
    "UsWindow",
    "antialias_frames",
    "antialias_sigmas_mm",
    "body_midline_x",
    "build_us_window",
    "convex_hull_mask",
    "crop_or_pad",
    "distance_inside",
    "fill_renal_sinus",
    "initial_alignment",
    "kidney_centroid",
    "kidney_side",
    "normalize_ct",
    "prepare_ct",
    "renal_sinus",
    "reorient_rai",
    "resample_isotropic",
    "resample_us_frames",
    "trim_perirenal_fat",
    "us_kidney_centroid",
    "window_indices",
    "window_transforms",
]

#: Padding value of a CT where the body (or the scan) ends.
CT_AIR_HU = -1000.0

#: Reflection of the internal x (R-L) axis of a registration grid. Registration networks see a left
#: kidney through it (``G @ MIRROR``, the window's frames in reverse order), where it looks like a
#: right one; an output ``D'`` there is ``MIRROR @ D' @ MIRROR`` on the grid itself.
MIRROR = np.diag([-1.0, 1.0, 1.0, 1.0])

# Voxels above this are the body (skin, fat and everything inside), for the body midline.
_BODY_HU = -500.0

#: :func:`fill_renal_sinus`: the renal sinus lies deeper than this below the kidney's convex hull
#: (its outline on U/S), and reads between gas and enhanced parenchyma on CT.
SINUS_DEPTH_MM = 4.0
SINUS_HU_RANGE = (-400.0, 40.0)
#: :func:`renal_sinus`: inside a kidney map the sinus is fat (below this HU) on any CT, and also
#: urine (up to :data:`SINUS_HU_RANGE`'s top) on one whose parenchyma enhances.
SINUS_FAT_HU = -20.0
#: Median HU of a kidney's parenchyma (its voxels above :data:`PARENCHYMA_MIN_HU`) above which
#: the CT counts as contrast-enhanced: unenhanced parenchyma reads 20-40 HU, enhanced 100-200.
ENHANCED_PARENCHYMA_HU = 90.0
PARENCHYMA_MIN_HU = 20.0

#: Intensity window of :func:`normalize_ct` in HU. It spans retroperitoneal fat (about -100 HU),
#: soft tissue and unenhanced parenchyma (30-60 HU), contrast-enhanced renal cortex and medulla
#: (150-200 HU) and enhanced vessels (up to about 300 HU) without saturating, so the kidney and its
#: fat capsule keep their contrast in every phase; bone and air saturate, which is harmless because
#: they are not what the registration aligns. It is wider than the radiological abdomen window
#: (W 400 / L 40, i.e. -160..240 HU), which would clip enhanced cortex and vessels.
CT_WINDOW_HU = (-200.0, 400.0)

# Tolerance on direction cosines for a pure axis permutation/flip; up to it the direction is
# snapped to the exact permutation (a position change below 1e-5 * extent, ~0.005 mm at 500 mm).
_AXIS_ALIGNED_TOL = 1e-5

# Anti-aliasing: a Gaussian pre-filter of sigma 0.4 * sqrt(t**2 - s**2) mm along an axis sampled
# at s mm when the target spacing t > s. 0.4 * t is the blur that matches a t mm sampling (its
# response is ~0.45 at the new Nyquist frequency); the sqrt discounts the blur the s mm data
# already has, so nothing is smoothed when t <= s.
_ANTIALIAS_FACTOR = 0.4


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _check_image(image: sitk.Image, name: str = "image") -> None:
    if not isinstance(image, sitk.Image):
        raise TypeError(f"{name} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{name} must be a scalar 3D image")


def _positive(value: float, name: str) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return number


def _shape3(shape: Sequence[int], name: str = "shape") -> tuple[int, int, int]:
    values = tuple(int(n) for n in shape)
    if len(values) != 3 or min(values) < 1 or values != tuple(shape):
        raise ValueError(f"{name} must be three positive integers, got {shape!r}")
    return values[0], values[1], values[2]


def _point3(point: ArrayLike, name: str) -> NDArray[np.float64]:
    array = np.asarray(point, dtype=np.float64)
    if array.shape != (3,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be 3 finite numbers, got {point!r}")
    return array


def _direction(image: sitk.Image) -> NDArray[np.float64]:
    return np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def _float_pixel_type(image: sitk.Image, interpolator: str) -> int:
    # Nearest neighbour keeps labels in their type; interpolation is done and kept in float32 so
    # an integer CT is not rounded back after interpolation.
    if interpolator == "nearest":
        return int(image.GetPixelID())
    return sitk.sitkFloat32


def antialias_sigmas_mm(source_spacing: ArrayLike, target_spacing: float) -> NDArray[Any]:
    """Gaussian pre-filter sigmas (mm, per source axis) before resampling to ``target_spacing``.

    ``sigma = 0.4 * sqrt(t**2 - s**2)`` where the target spacing ``t`` is coarser than the source
    spacing ``s``, else 0. ``0.4 * t`` is the blur matched to a ``t`` mm grid (response ~0.45 at
    its Nyquist frequency); the square root discounts the blur the data already has.

    Example:
        >>> antialias_sigmas_mm((0.8, 0.8, 2.0), 1.6).round(3)
        array([0.554, 0.554, 0.   ])
    """
    s = np.asarray(source_spacing, dtype=np.float64)
    t = _positive(target_spacing, "target spacing")
    return np.asarray(_ANTIALIAS_FACTOR * np.sqrt(np.clip(t**2 - s**2, 0.0, None)))


def _smooth(image: sitk.Image, sigmas_mm: NDArray[Any]) -> sitk.Image:
    """Gaussian smoothing with per-axis sigmas in mm (float32 output); axes with 0 untouched."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    if not np.any(sigmas_mm > 0):
        return image
    gaussian = sitk.DiscreteGaussianImageFilter()
    gaussian.SetVariance(tuple(float(s) ** 2 for s in sigmas_mm))
    gaussian.SetUseImageSpacing(True)
    gaussian.SetMaximumError(1e-3)
    gaussian.SetMaximumKernelWidth(64)
    return gaussian.Execute(image)


def _smoothing_margin(image: sitk.Image, sigmas_mm: NDArray[Any]) -> int:
    """Voxels beyond which the pre-filter of :func:`_smooth` has no influence (kernel radius)."""
    sigma_voxels = np.asarray(sigmas_mm) / np.array(image.GetSpacing())
    return math.ceil(4.0 * float(sigma_voxels.max(initial=0.0))) + 2


def _resample(
    image: sitk.Image,
    reference: sitk.Image,
    interpolator: str,
    default_value: float,
    sigmas_mm: NDArray[Any] | None,
) -> sitk.Image:
    """Optionally pre-smooth ``image`` (interpolating modes only), then resample onto ``reference``.

    The input is first cut down to the reference's footprint (plus the filter and interpolation
    margin) so that smoothing a whole CT is never needed for a kidney-sized crop.
    """
    smoothing = sigmas_mm is not None and interpolator != "nearest" and np.any(sigmas_mm > 0)
    # Linear/nearest need 1 voxel around the footprint; the cubic B-spline prefilter is recursive
    # (pole -0.268), 12 voxels make the crop's influence negligible (~1e-7).
    margin = 12 if interpolator == "bspline" else 3
    if smoothing and sigmas_mm is not None:
        margin += _smoothing_margin(image, sigmas_mm)
    source = _footprint(image, reference, margin)
    pixel_type = _float_pixel_type(image, interpolator)
    if source is None:
        dtype = sitk.GetArrayViewFromImage(sitk.Image(1, 1, 1, pixel_type)).dtype
        empty = sitk.GetImageFromArray(
            np.full(reference.GetSize()[::-1], default_value, dtype=dtype)
        )
        empty.CopyInformation(reference)
        return empty
    if smoothing and sigmas_mm is not None:
        source = _smooth(source, sigmas_mm)
    return sitk.Resample(
        source,
        reference,
        sitk.Transform(3, sitk.sitkIdentity),
        sitk_interpolator(interpolator),
        float(default_value),
        pixel_type,
    )


def _footprint(image: sitk.Image, reference: sitk.Image, margin: int) -> sitk.Image | None:
    """The part of ``image`` covering ``reference``'s voxels plus ``margin`` voxels, or None."""
    size = np.array(reference.GetSize())
    corners = np.array(np.meshgrid(*[[0.0, float(n - 1)] for n in size])).reshape(3, -1).T
    index = np.array(
        [
            image.TransformPhysicalPointToContinuousIndex(
                reference.TransformContinuousIndexToPhysicalPoint(tuple(float(c) for c in corner))
            )
            for corner in corners
        ]
    )
    lo = np.maximum(np.floor(index.min(axis=0)).astype(int) - margin, 0)
    hi = np.minimum(np.ceil(index.max(axis=0)).astype(int) + margin + 1, np.array(image.GetSize()))
    if np.any(hi <= lo):
        return None
    return image[int(lo[0]) : int(hi[0]), int(lo[1]) : int(hi[1]), int(lo[2]) : int(hi[2])]


# ----------------------------------------------------------------------------------------------
# CT: the explicit steps
# ----------------------------------------------------------------------------------------------


def reorient_rai(
    image: sitk.Image, *, interpolator: Interpolator = "linear", default_value: float = 0.0
) -> sitk.Image:
    """Reorient to the paper's "RAI" array orientation: identity direction cosines in LPS.

    ("RAI" is the ITK-SNAP name: the axes run from right, anterior and inferior, i.e. towards
    L, P and S, which SimpleITK's ``DICOMOrient`` calls ``"LPS"``.) Every voxel keeps its physical
    position and value. An axis-aligned image (any flip or permutation, e.g. a NIfTI stored RAS)
    is only re-indexed, without interpolation; an oblique one (gantry tilt) is resampled onto an
    axis-aligned grid with its spacing covering its bounding box, using ``interpolator`` and
    ``default_value`` outside.

    Args:
        image: Scalar 3D image.
        interpolator: Used only for oblique images.
        default_value: Value outside the original image (oblique images only).

    Returns:
        An image with identity direction.

    Example:
        >>> img = sitk.Image(4, 5, 6, sitk.sitkInt16)
        >>> img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
        >>> reorient_rai(img).GetDirection()
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    """
    _check_image(image)
    oriented = sitk.DICOMOrient(image, "LPS")
    direction = _direction(oriented)
    if np.max(np.abs(direction - np.eye(3))) <= _AXIS_ALIGNED_TOL:
        oriented.SetDirection(tuple(np.eye(3).ravel()))
        return oriented
    # Oblique: sample on the axis-aligned box around the image's voxel centres.
    spacing = np.array(oriented.GetSpacing())
    size = np.array(oriented.GetSize())
    corners = np.array(np.meshgrid(*[[0.0, float(n - 1)] for n in size])).reshape(3, -1).T
    world = np.array([oriented.TransformContinuousIndexToPhysicalPoint(tuple(c)) for c in corners])
    lo, hi = world.min(axis=0), world.max(axis=0)
    new_size = np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1
    reference = sitk.Image([int(n) for n in new_size], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(s) for s in spacing))
    reference.SetOrigin(tuple(float(x) for x in lo))
    return _resample(oriented, reference, interpolator, default_value, None)


def resample_isotropic(
    image: sitk.Image,
    spacing: float,
    *,
    interpolator: Interpolator = "linear",
    default_value: float = 0.0,
    antialias: bool = False,
) -> sitk.Image:
    """Resample to isotropic ``spacing`` mm over the same physical extent and direction.

    The new size per axis is ``round(n * old_spacing / spacing)`` (at least 1) and the image
    centre stays where it was, so the covered box is the same to within half a voxel.

    Args:
        image: Scalar 3D image (any direction).
        spacing: New voxel size in mm, > 0.
        interpolator: ``"linear"`` (float32 output), ``"nearest"`` (keeps the pixel type) or
            ``"bspline"``.
        default_value: Value outside the original image.
        antialias: Gaussian pre-filter along axes that get coarser (:func:`antialias_sigmas_mm`);
            ignored for nearest neighbour.

    Raises:
        ValueError: If ``spacing`` is not finite and positive.

    Example:
        >>> img = sitk.Image(10, 10, 4, sitk.sitkFloat32)
        >>> img.SetSpacing((1.0, 1.0, 2.5))
        >>> resample_isotropic(img, 2.0).GetSize()
        (5, 5, 5)
    """
    _check_image(image)
    new_spacing = _positive(spacing, "spacing")
    old_spacing = np.array(image.GetSpacing())
    old_size = np.array(image.GetSize())
    new_size = np.maximum(np.round(old_size * old_spacing / new_spacing).astype(int), 1)
    direction = _direction(image)
    centre = np.array(image.GetOrigin()) + direction @ (old_spacing * (old_size - 1) / 2.0)
    origin = centre - direction @ (np.full(3, new_spacing) * (new_size - 1) / 2.0)
    reference = sitk.Image([int(n) for n in new_size], sitk.sitkUInt8)
    reference.SetSpacing((new_spacing,) * 3)
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(tuple(float(x) for x in origin))
    sigmas = antialias_sigmas_mm(old_spacing, new_spacing) if antialias else None
    return _resample(image, reference, interpolator, default_value, sigmas)


def crop_or_pad(
    image: sitk.Image,
    center_world: ArrayLike,
    shape: Sequence[int],
    *,
    default_value: float = 0.0,
) -> sitk.Image:
    """Cut a ``shape`` voxel box out of ``image`` (no interpolation), padding outside it.

    The voxel nearest to ``center_world`` becomes index ``shape // 2`` of the result (so the
    centre lands within half a voxel of that index); voxels beyond the image get
    ``default_value`` (use :data:`CT_AIR_HU` for CT, 0 for masks). Spacing, direction and pixel
    type are kept; every kept voxel keeps its physical position.

    Args:
        image: Scalar 3D image.
        center_world: World point (LPS mm).
        shape: Output size in voxels, ITK order ``(nx, ny, nz)``.
        default_value: Padding value.

    Example:
        >>> img = sitk.Image(10, 10, 10, sitk.sitkInt16)
        >>> crop_or_pad(img, (0.0, 0.0, 0.0), (4, 4, 4), default_value=-1000).GetOrigin()
        (-2.0, -2.0, -2.0)
    """
    _check_image(image)
    out_shape = _shape3(shape)
    center = _point3(center_world, "center_world")
    continuous = np.array(image.TransformPhysicalPointToContinuousIndex(tuple(center)))
    start = np.floor(continuous + 0.5).astype(int) - np.array(out_shape) // 2
    source = sitk.GetArrayViewFromImage(image)  # [z, y, x]
    out = np.full(out_shape[::-1], default_value, dtype=source.dtype)
    size = np.array(image.GetSize())
    lo = np.maximum(start, 0)
    hi = np.minimum(start + np.array(out_shape), size)
    if np.all(hi > lo):
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start, strict=True))
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        out[dst[::-1]] = source[src[::-1]]
    result = sitk.GetImageFromArray(out)
    result.SetSpacing(image.GetSpacing())
    result.SetDirection(image.GetDirection())
    result.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(tuple(float(i) for i in start)))
    return result


def kidney_centroid(
    mask: sitk.Image, *, label: int | None = None, source: str = "kidney mask"
) -> NDArray[np.float64]:
    """World position (LPS mm) of the centroid of a mask's kidney voxels.

    Args:
        mask: Scalar 3D mask or label map.
        label: The kidney's label value; None counts every non-zero voxel (a 0/1 mask). Use it
            for label maps holding both kidneys, whose joint centroid lies between them.
        source: Name of the mask's file, for the error message.

    Raises:
        InputError: If the mask has no non-zero voxel.

    Example:
        >>> m = sitk.Image(5, 5, 5, sitk.sitkUInt8)
        >>> m[1, 2, 3] = 1
        >>> kidney_centroid(m)
        array([1., 2., 3.])
    """
    _check_image(mask, "mask")
    values = sitk.GetArrayViewFromImage(mask)
    nonzero = np.nonzero(values if label is None else values == label)
    if nonzero[0].size == 0:
        what = (
            "kidney mask is empty"
            if label is None
            else f"kidney mask has no voxel of label {label}"
        )
        raise InputError(source, what)
    index_xyz = np.array([axis.mean() for axis in nonzero[::-1]], dtype=np.float64)
    return np.array(mask.TransformContinuousIndexToPhysicalPoint(tuple(index_xyz)))


def normalize_ct(hu: ArrayLike) -> NDArray[np.float32]:
    """Map HU to [0, 1] through the window :data:`CT_WINDOW_HU` (-200..400 HU), clipping outside.

    Example:
        >>> normalize_ct([-1000.0, -200.0, 100.0, 400.0, 1000.0])
        array([0. , 0. , 0.5, 1. , 1. ], dtype=float32)
    """
    low, high = CT_WINDOW_HU
    values = np.asarray(hu, dtype=np.float32)
    return np.asarray(np.clip((values - low) / (high - low), 0.0, 1.0), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# The registration grid
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RegistrationGrid:
    """The voxel grid the networks see, placed in CT world space.

    Internal mm of voxel index ``i`` (ITK order x, y, z) are ``(i - n // 2) * spacing``; the rigid
    ``matrix`` ``G`` maps internal mm to CT world LPS mm. Its rotation columns are the grid's x,
    y, z axes in LPS (identity for the default pose) and its translation is the CT kidney
    centroid.

    Attributes:
        profile: Resolution profile (shape and spacing).
        matrix: ``G``, 4x4 rigid, read-only.
    """

    profile: Profile
    matrix: NDArray[np.float64] = field(repr=False)

    def __post_init__(self) -> None:
        profile = get_profile(self.profile)
        matrix = np.array(self.matrix, dtype=np.float64)
        if matrix.shape != (4, 4) or not is_rigid(matrix):
            raise ValueError("RegistrationGrid.matrix must be a rigid 4x4 matrix")
        _positive(profile.spacing, "profile spacing")
        _shape3(profile.volume_shape, "profile volume_shape")
        matrix.setflags(write=False)
        object.__setattr__(self, "profile", profile)
        object.__setattr__(self, "matrix", matrix)

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def around(
        cls,
        centroid_world: ArrayLike,
        profile: Profile | str,
        rotation: ArrayLike | None = None,
    ) -> RegistrationGrid:
        """The grid centred on ``centroid_world`` with axes ``rotation`` (columns; None = identity).

        Example:
            >>> RegistrationGrid.around((1.0, 2.0, 3.0), "tiny").matrix[:3, 3]
            array([1., 2., 3.])
        """
        center = _point3(centroid_world, "centroid_world")
        rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
        if rot.shape != (3, 3):
            raise ValueError(f"rotation must be 3x3, got shape {rot.shape}")
        return cls(get_profile(profile), make_rigid(rot, center))

    @classmethod
    def from_initial_pose(
        cls, pose_matrix: ArrayLike, centroid_world: ArrayLike, profile: Profile | str
    ) -> RegistrationGrid:
        """The grid whose middle x slice is the plane of an initial U/S pose, through the centroid.

        Grid y = the pose's v (depth) direction, z = its u (lateral) direction, x = y cross z; the
        pose's translation is not used (kidney-centroid matching sets it). The default pose gives
        the identity rotation.

        Args:
            pose_matrix: 4x4 rigid U/S image mm -> CT world mm (e.g. from ``--init``).
            centroid_world: CT kidney centroid (LPS mm), the grid origin.
            profile: Resolution profile.

        Example:
            >>> from kidneyreg.geometry import make_rigid, DEFAULT_POSE_ROTATION
            >>> pose = make_rigid(DEFAULT_POSE_ROTATION, (0, 0, 0))
            >>> RegistrationGrid.from_initial_pose(pose, (0, 0, 0), "tiny").matrix[:3, :3]
            array([[1., 0., 0.],
                   [0., 1., 0.],
                   [0., 0., 1.]])
        """
        pose = np.asarray(pose_matrix, dtype=np.float64)
        if pose.shape != (4, 4) or not is_rigid(pose):
            raise ValueError("pose_matrix must be a rigid 4x4 matrix")
        y_axis = pose[:3, 1]
        z_axis = pose[:3, 0]
        rotation = np.stack([np.cross(y_axis, z_axis), y_axis, z_axis], axis=1)
        return cls.around(centroid_world, profile, rotation)

    # -- geometry -------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid size in voxels, ITK order ``(nx, ny, nz)``."""
        return self.profile.volume_shape

    @property
    def spacing(self) -> float:
        """Isotropic voxel size in mm."""
        return float(self.profile.spacing)

    @property
    def center_index(self) -> NDArray[np.int64]:
        """Index of the internal origin, ``n // 2`` per axis (x, y, z)."""
        return np.array(self.shape, dtype=np.int64) // 2

    @property
    def rotation(self) -> NDArray[np.float64]:
        """Grid axes in LPS as columns (3x3)."""
        return np.array(self.matrix[:3, :3])

    def reference_image(self) -> sitk.Image:
        """An empty uint8 image with the grid's size, spacing, direction and origin.

        Example:
            >>> RegistrationGrid.around((0.0, 0.0, 0.0), "tiny").reference_image().GetSize()
            (32, 56, 72)
        """
        ref = sitk.Image([int(n) for n in self.shape], sitk.sitkUInt8)
        ref.SetSpacing((self.spacing,) * 3)
        ref.SetDirection(tuple(float(x) for x in self.rotation.ravel()))
        ref.SetOrigin(tuple(float(x) for x in self.index_to_world(np.zeros(3))))
        return ref

    def index_to_internal(self, index: ArrayLike) -> NDArray[np.float64]:
        """Continuous voxel indices ``(..., 3)`` (x, y, z) -> internal mm."""
        idx = np.asarray(index, dtype=np.float64)
        return np.asarray((idx - self.center_index) * self.spacing)

    def internal_to_index(self, points: ArrayLike) -> NDArray[np.float64]:
        """Internal mm ``(..., 3)`` -> continuous voxel indices (x, y, z)."""
        pts = np.asarray(points, dtype=np.float64)
        return np.asarray(pts / self.spacing + self.center_index)

    def internal_to_world(self, points: ArrayLike) -> NDArray[np.float64]:
        """Internal mm ``(..., 3)`` -> CT world LPS mm (applies ``G``)."""
        return transform_points(self.matrix, points)

    def world_to_internal(self, points: ArrayLike) -> NDArray[np.float64]:
        """CT world LPS mm ``(..., 3)`` -> internal mm (applies ``G^-1``)."""
        return transform_points(invert_rigid(self.matrix), points)

    def index_to_world(self, index: ArrayLike) -> NDArray[np.float64]:
        """Continuous voxel indices ``(..., 3)`` (x, y, z) -> CT world LPS mm.

        Example:
            >>> grid = RegistrationGrid.around((10.0, 0.0, 0.0), "tiny")
            >>> grid.index_to_world(grid.center_index)
            array([10.,  0.,  0.])
        """
        return self.internal_to_world(self.index_to_internal(index))

    def world_to_index(self, points: ArrayLike) -> NDArray[np.float64]:
        """CT world LPS mm ``(..., 3)`` -> continuous voxel indices (x, y, z)."""
        return self.internal_to_index(self.world_to_internal(points))

    def to_world_matrix(self, internal_matrix: ArrayLike) -> NDArray[np.float64]:
        """``G @ internal_matrix``: a map *into* internal mm becomes a map into CT world mm.

        E.g. the result for window frame k is ``grid.to_world_matrix(D_k @ P_k)`` (U/S image mm
        -> CT world mm), with ``D_k`` the network's rigid transform in internal mm.

        Example:
            >>> grid = RegistrationGrid.around((1.0, 2.0, 3.0), "tiny")
            >>> grid.to_world_matrix(np.eye(4))[:3, 3]
            array([1., 2., 3.])
        """
        m = np.asarray(internal_matrix, dtype=np.float64)
        if m.shape[-2:] != (4, 4):
            raise ValueError(f"internal_matrix must have shape (..., 4, 4), got {m.shape}")
        return np.asarray(self.matrix @ m)

    def resample(
        self,
        image: sitk.Image,
        *,
        interpolator: Interpolator = "linear",
        default_value: float = 0.0,
        antialias: bool = False,
    ) -> NDArray[Any]:
        """Sample a world-space image on the grid: array ``[z, y, x]`` of ``shape[::-1]``.

        One interpolation straight from the original image (whatever its direction or spacing);
        with identity rotation it equals ``crop_or_pad(resample_isotropic(reorient_rai(image)))``
        when the grid's lattice is that of the isotropic image, and agrees within interpolation
        error otherwise.

        Args:
            image: Scalar 3D image in CT world space (CT, mask, label map).
            interpolator: ``"linear"`` / ``"bspline"`` (float32 output) or ``"nearest"`` (keeps
                the pixel type).
            default_value: Value outside the image (:data:`CT_AIR_HU` for CT, 0 for masks).
            antialias: Gaussian pre-filter along the image axes whose spacing is finer than the
                grid's (:func:`antialias_sigmas_mm`); ignored for nearest neighbour.

        Example:
            >>> ct = sitk.Image(40, 40, 40, sitk.sitkInt16) - 1000
            >>> grid = RegistrationGrid.around((20.0, 20.0, 20.0), "tiny")
            >>> grid.resample(ct, default_value=-1000.0).shape
            (72, 56, 32)
        """
        _check_image(image)
        sigmas = antialias_sigmas_mm(image.GetSpacing(), self.spacing) if antialias else None
        out = _resample(image, self.reference_image(), interpolator, default_value, sigmas)
        return sitk.GetArrayFromImage(out)


# ----------------------------------------------------------------------------------------------
# CT preparation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PreparedCT:
    """A CT (and kidney mask) resampled on its registration grid.

    Attributes:
        grid: The registration grid (``G`` maps internal mm to the CT file's world mm).
        image: CT in HU, float32 ``[z, y, x]`` of ``grid.shape[::-1]``, air outside the scan.
        mask: Kidney mask, uint8 0/1 on the same grid, or None.
    """

    grid: RegistrationGrid
    image: NDArray[np.float32]
    mask: NDArray[np.uint8] | None = None

    def normalized(self) -> NDArray[np.float32]:
        """The image through :func:`normalize_ct` (values in [0, 1])."""
        return normalize_ct(self.image)


def prepare_ct(
    ct: sitk.Image,
    kidney_mask: sitk.Image | None,
    profile: Profile | str,
    *,
    pose: ArrayLike | None = None,
    centroid_world: ArrayLike | None = None,
    antialias: bool = True,
    source: str = "kidney mask",
) -> PreparedCT:
    """The paper's CT preprocessing: RAI, isotropic, kidney-centred crop, in one resampling.

    The grid origin is the kidney centroid (``centroid_world`` if given, else the mask's); the
    grid axes follow ``pose`` (an initial U/S pose, see
    :meth:`RegistrationGrid.from_initial_pose`), or are the identity (the paper's default
    sagittal pose). The CT is linearly interpolated (with an anti-aliasing pre-filter where the
    profile is coarser than the scan), padded with :data:`CT_AIR_HU`; the mask is linearly
    interpolated and thresholded at 0.5.

    Args:
        ct: CT in HU (world space of the file).
        kidney_mask: Mask of the kidney on any grid in the same world space, or None when
            ``centroid_world`` is given.
        profile: Resolution profile (or its name).
        pose: Optional 4x4 initial pose (U/S image mm -> CT world mm); only its rotation is used.
        centroid_world: Optional kidney centroid (LPS mm) overriding the mask's.
        antialias: Pre-filter the CT when downsampling (see :func:`antialias_sigmas_mm`).
        source: File name of the mask, for the error on an empty mask.

    Raises:
        InputError: If the mask is empty.
        ValueError: If neither a mask nor a centroid is given.

    Example:
        >>> ct = sitk.Image(40, 40, 40, sitk.sitkInt16)
        >>> mask = sitk.Image(40, 40, 40, sitk.sitkUInt8)
        >>> mask[18:22, 18:22, 18:22] = 1
        >>> prepare_ct(ct, mask, "tiny").image.shape
        (72, 56, 32)
    """
    _check_image(ct, "ct")
    prof = get_profile(profile)
    if centroid_world is not None:
        center = _point3(centroid_world, "centroid_world")
    elif kidney_mask is not None:
        center = kidney_centroid(kidney_mask, source=source)
    else:
        raise ValueError("prepare_ct needs a kidney mask or a centroid_world")
    if pose is None:
        grid = RegistrationGrid.around(center, prof)
    else:
        grid = RegistrationGrid.from_initial_pose(pose, center, prof)
    image = grid.resample(ct, default_value=CT_AIR_HU, antialias=antialias).astype(np.float32)
    mask = None
    if kidney_mask is not None:
        _check_image(kidney_mask, "kidney_mask")
        fraction = grid.resample(sitk.Cast(kidney_mask != 0, sitk.sitkFloat32))
        mask = (fraction >= 0.5).astype(np.uint8)
    return PreparedCT(grid, image, mask)


# ----------------------------------------------------------------------------------------------
# U/S side
# ----------------------------------------------------------------------------------------------


def _check_frames(frames: ArrayLike) -> NDArray[Any]:
    array = np.asarray(frames)
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(f"frames must have shape (n, rows, cols), got {array.shape}")
    return array


def _pixel_size(pixel_size: Sequence[float]) -> tuple[float, float]:
    values = tuple(pixel_size)
    if len(values) != 2:
        raise ValueError(f"pixel_size must be (sx, sy), got {pixel_size!r}")
    return _positive(values[0], "pixel size sx"), _positive(values[1], "pixel size sy")


def _frames_image(frames: NDArray[Any], pixel_size: tuple[float, float]) -> sitk.Image:
    """Frames ``(n, rows, cols)`` as a float32 3D image (cols, rows, n), origin 0."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(frames, dtype=np.float32))
    image.SetSpacing((pixel_size[0], pixel_size[1], 1.0))
    return image


def resample_us_frames(
    frames: ArrayLike,
    pixel_size: Sequence[float],
    spacing: float,
    *,
    interpolator: Interpolator = "linear",
    antialias: bool = True,
) -> tuple[NDArray[Any], tuple[float, float]]:
    """Resample U/S frames to square pixels of ``spacing`` mm, keeping U/S image mm.

    New pixel ``(col, row)`` is at ``(col * spacing, row * spacing)`` mm, the same U/S image
    coordinates as before (pixel 0 stays at 0 mm); the frame keeps its extent (the last pixel
    centre does not pass the old last one). Downsampled axes get a Gaussian pre-filter of
    ``0.4 * sqrt(spacing**2 - s**2)`` mm first (:func:`antialias_sigmas_mm`).

    Args:
        frames: ``(n, rows, cols)``.
        pixel_size: ``(sx, sy)`` mm of the input.
        spacing: Output pixel size in mm.
        interpolator: ``"linear"`` (float32 output) or ``"nearest"`` (masks; keeps the dtype, no
            pre-filter) or ``"bspline"``.
        antialias: Whether to pre-filter when downsampling.

    Returns:
        ``(frames_resampled (n, rows', cols'), (spacing, spacing))``.

    Example:
        >>> out, size = resample_us_frames(np.zeros((2, 100, 80)), (0.4, 0.5), 0.8)
        >>> out.shape, size
        ((2, 62, 40), (0.8, 0.8))
    """
    array = _check_frames(frames)
    sx, sy = _pixel_size(pixel_size)
    new = _positive(spacing, "spacing")
    n, rows, cols = array.shape
    new_cols = math.floor((cols - 1) * sx / new + 1e-9) + 1
    new_rows = math.floor((rows - 1) * sy / new + 1e-9) + 1
    if interpolator == "nearest":
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing((sx, sy, 1.0))
    else:
        image = _frames_image(array, (sx, sy))
    reference = sitk.Image(new_cols, new_rows, n, sitk.sitkUInt8)
    reference.SetSpacing((new, new, 1.0))
    sigmas = None
    if antialias:
        sigmas = np.append(antialias_sigmas_mm((sx, sy), new), 0.0)
    out = _resample(image, reference, interpolator, 0.0, sigmas)
    return sitk.GetArrayFromImage(out), (new, new)


def window_indices(n_frames: int, center: int, window: int) -> NDArray[np.int64]:
    """Frame indices of the ``window`` frames whose middle (index ``window // 2``) is ``center``.

    Indices beyond the sequence repeat its first or last frame, so every frame (including the
    first and the last) can be a target.

    Example:
        >>> window_indices(10, 0, 5), window_indices(10, 9, 5)
        (array([0, 0, 0, 1, 2]), array([7, 8, 9, 9, 9]))
    """
    if int(n_frames) < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 0 <= int(center) < int(n_frames):
        raise ValueError(f"center {center} is outside the sequence of {n_frames} frames")
    offsets = np.arange(int(window), dtype=np.int64) - int(window) // 2
    return np.clip(int(center) + offsets, 0, int(n_frames) - 1)


def us_kidney_centroid(
    mask_frame: ArrayLike, pixel_size: Sequence[float], *, source: str = "U/S kidney mask"
) -> NDArray[np.float64]:
    """U/S image coordinates ``(u, v)`` mm of the centroid of a frame mask's non-zero pixels.

    Raises:
        InputError: If the frame mask is empty.

    Example:
        >>> m = np.zeros((10, 10)); m[4, 6] = 1
        >>> us_kidney_centroid(m, (0.5, 0.25))
        array([3., 1.])
    """
    array = np.asarray(mask_frame)
    if array.ndim != 2:
        raise ValueError(f"mask_frame must be 2D (rows, cols), got shape {array.shape}")
    sx, sy = _pixel_size(pixel_size)
    rows, cols = np.nonzero(array)
    if rows.size == 0:
        raise InputError(source, "kidney mask is empty in the target frame")
    return np.array([cols.mean() * sx, rows.mean() * sy], dtype=np.float64)


class UsWindow(NamedTuple):
    """A U/S window as the registration network sees it (unpacks as ``volume, P``).

    Attributes:
        volume: float32 ``[z, y, x]`` of ``profile.volume_shape[::-1]``: frame k on x index
            ``nx // 2 + k - Nw // 2``, depth rows along y, lateral columns along z, 0 elsewhere.
        P: ``(Nw, 4, 4)``; ``P[k]`` maps frame k's U/S image mm ``(u, v, 0)`` (original pixel
            size) to internal mm; ``P[Nw // 2]`` is the target frame's and puts its plane at
            x = 0.
    """

    volume: NDArray[np.float32]
    P: NDArray[np.float64]


def window_transforms(centroid_uv_mm: ArrayLike, profile: Profile | str) -> NDArray[np.float64]:
    """The ``(Nw, 4, 4)`` matrices ``P[k]`` (U/S image mm -> internal mm) of a window.

    ``P[k] @ (u, v, 0) = ((k - Nw//2) * s, v - v_c, u - u_c)``: rotation
    :data:`~kidneyreg.geometry.DEFAULT_POSE_ROTATION` (u -> z, v -> y, normal -> -x), the
    centroid ``(u_c, v_c)`` on the internal origin's y-z position, frame k on its x slice.

    Example:
        >>> window_transforms((10.0, 20.0), "tiny")[2][:3, 3]
        array([  0., -20., -10.])
    """
    prof = get_profile(profile)
    uv = np.asarray(centroid_uv_mm, dtype=np.float64)
    if uv.shape != (2,) or not np.all(np.isfinite(uv)):
        raise ValueError(f"centroid_uv_mm must be 2 finite numbers (u, v), got {centroid_uv_mm!r}")
    nw = int(prof.window)
    offsets = (np.arange(nw) - nw // 2) * float(prof.spacing)
    shifts = np.stack([offsets, np.full(nw, -uv[1]), np.full(nw, -uv[0])], axis=1)
    return make_rigid(np.broadcast_to(DEFAULT_POSE_ROTATION, (nw, 3, 3)), shifts)


def antialias_frames(
    frames: ArrayLike, pixel_size: Sequence[float], profile: Profile | str
) -> NDArray[np.float32]:
    """The whole sequence pre-filtered as :func:`build_us_window` filters each window.

    ``build_us_window(antialias_frames(f, ps, p), ps, ..., antialias=False)`` equals
    ``build_us_window(f, ps, ...)``, but every frame is filtered once instead of once per window
    it belongs to (``Nw`` times); for fine U/S pixels (0.2-0.3 mm) the filter is most of a
    window's cost.

    Example:
        >>> antialias_frames(np.ones((3, 40, 50)), (0.5, 0.5), "tiny").shape
        (3, 40, 50)
    """
    array = _check_frames(frames)
    sx, sy = _pixel_size(pixel_size)
    sigmas = np.append(antialias_sigmas_mm((sx, sy), get_profile(profile).spacing), 0.0)
    if not np.any(sigmas > 0):
        return np.asarray(array, dtype=np.float32)
    smoothed = _smooth(_frames_image(array, (sx, sy)), sigmas)
    return np.asarray(sitk.GetArrayFromImage(smoothed), dtype=np.float32)


def build_us_window(
    frames: ArrayLike,
    pixel_size: Sequence[float],
    center: int,
    centroid_uv_mm: ArrayLike,
    profile: Profile | str,
    *,
    interpolator: Interpolator = "linear",
    antialias: bool = True,
) -> UsWindow:
    """The paper's U/S window: Nw frames resampled, cropped and centred in a CT-sized volume.

    The frames :func:`window_indices` picks around ``center`` are resampled to
    ``profile.spacing`` directly onto the crop (one interpolation, exact in mm): crop pixel
    ``(r, c)`` samples U/S image mm ``(u_c + (c - cols//2) * s, v_c + (r - rows//2) * s)`` with
    ``(rows, cols) = profile.us_shape``, so the given centroid lands exactly on the grid origin
    without rounding to pixels. Outside the frame the crop is 0. The crop goes to y index
    ``r + ny//2 - rows//2`` and z index ``c + nz//2 - cols//2`` (``r``, ``c`` for the profiles,
    whose U/S crop fills the y-z plane) of x slice ``nx//2 + k - Nw//2``.

    Args:
        frames: The whole sequence ``(n, rows, cols)``.
        pixel_size: ``(sx, sy)`` mm of ``frames``.
        center: Index of the target frame.
        centroid_uv_mm: U/S kidney centroid ``(u_c, v_c)`` in mm of the target frame.
        profile: Resolution profile.
        interpolator: ``"linear"`` for B-mode / feature maps, ``"nearest"`` for masks.
        antialias: Pre-filter when the profile is coarser than the frames (not for nearest).

    Returns:
        :class:`UsWindow` ``(volume, P)``.

    Example:
        >>> vol, P = build_us_window(np.ones((7, 100, 120)), (0.5, 0.5), 3, (30.0, 25.0), "tiny")
        >>> vol.shape, P.shape
        ((72, 56, 32), (5, 4, 4))
    """
    array = _check_frames(frames)
    prof = get_profile(profile)
    sx, sy = _pixel_size(pixel_size)
    s = _positive(prof.spacing, "profile spacing")
    nx, ny, nz = _shape3(prof.volume_shape, "profile volume_shape")
    rows, cols = (int(n) for n in prof.us_shape)
    nw = int(prof.window)
    if rows > ny or cols > nz or nw > nx:
        raise ValueError(
            f"profile {prof.name}: U/S crop {prof.us_shape} x window {nw} does not fit the "
            f"volume {prof.volume_shape}"
        )
    transforms = window_transforms(centroid_uv_mm, prof)
    u_c, v_c = (float(x) for x in np.asarray(centroid_uv_mm, dtype=np.float64))
    picked = array[window_indices(array.shape[0], center, nw)]
    if interpolator == "nearest":
        image = sitk.GetImageFromArray(np.ascontiguousarray(picked))
        image.SetSpacing((sx, sy, 1.0))
    else:
        image = _frames_image(picked, (sx, sy))
    reference = sitk.Image(cols, rows, nw, sitk.sitkUInt8)
    reference.SetSpacing((s, s, 1.0))
    reference.SetOrigin((u_c - (cols // 2) * s, v_c - (rows // 2) * s, 0.0))
    sigmas = np.append(antialias_sigmas_mm((sx, sy), s), 0.0) if antialias else None
    crops = sitk.GetArrayFromImage(_resample(image, reference, interpolator, 0.0, sigmas))
    volume = np.zeros((nz, ny, nx), dtype=np.float32)
    y0, z0, x0 = ny // 2 - rows // 2, nz // 2 - cols // 2, nx // 2 - nw // 2
    # crops[k, r, c] -> volume[z0 + c, y0 + r, x0 + k]
    volume[z0 : z0 + cols, y0 : y0 + rows, x0 : x0 + nw] = np.transpose(crops, (2, 1, 0))
    return UsWindow(volume, transforms)


def convex_hull_mask(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Pixels or voxels inside the convex hull of ``mask``'s pixel centres (2D or 3D).

    ``mask`` itself when it is too small or flat for a hull.

    Example:
        >>> ring = np.zeros((1, 5, 5), bool); ring[0, 1:4, 1:4] = True; ring[0, 2, 2] = False
        >>> convex_hull_mask(np.concatenate([ring, ring, ring]))[1, 2, 2]
        np.True_
        >>> convex_hull_mask(ring[0])[2, 2]
        np.True_
    """
    ndim = mask.ndim
    if ndim not in (2, 3):
        raise ValueError(f"mask must be 2D or 3D, got shape {mask.shape}")
    idx = np.argwhere(mask)
    if len(idx) < 2**ndim:
        return mask.copy()
    try:
        equations = ConvexHull(idx).equations
    except QhullError:
        return mask.copy()
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    sub = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    shape = tuple(int(v) for v in hi - lo)
    # Inside the hull: on the inner side of every facet plane, n . p + b <= 1e-6. Along each
    # row of the last axis the facets bound x to one interval (the hull is convex), so the test
    # costs rows x facets, not voxels x facets (elementwise: no BLAS call, whose first skinny
    # product took seconds here).
    rows = np.indices(shape[:-1]).reshape(ndim - 1, -1).T + lo[:-1]
    rhs = np.broadcast_to(1e-6 - equations[:, ndim], (len(rows), len(equations))).copy()
    for axis in range(ndim - 1):
        rhs -= rows[:, axis : axis + 1] * equations[:, axis]
    slope = equations[:, ndim - 1]  # the facets' coefficient of the last axis
    rising, falling = slope > 1e-12, slope < -1e-12
    flat = ~rising & ~falling
    upper = np.min(rhs[:, rising] / slope[rising], axis=1, initial=np.inf)
    lower = np.max(rhs[:, falling] / slope[falling], axis=1, initial=-np.inf)
    feasible = np.all(rhs[:, flat] >= 0.0, axis=1)
    x = np.arange(lo[-1], hi[-1])
    inside = (x >= lower[:, None]) & (x <= upper[:, None]) & feasible[:, None]
    out = np.zeros(mask.shape, bool)
    out[sub] = inside.reshape(shape)
    return out | mask


def distance_inside(
    mask: NDArray[np.bool_], spacing: float | Sequence[float]
) -> NDArray[np.float32]:
    """Depth (mm) of each voxel of ``mask`` below its surface (0 on its outer voxels and outside).

    Args:
        mask: ``(z, y, x)`` boolean array.
        spacing: Voxel size in mm, one number or ``(sx, sy, sz)``.

    Returns:
        float32 distances; infinite everywhere when nothing lies outside the mask.

    Example:
        >>> distance_inside(np.arange(7)[None, None] % 6 > 0, 2.0).ravel().tolist()
        [0.0, 0.0, 2.0, 4.0, 2.0, 0.0, 0.0]
    """
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    if mask.all():
        return np.full(mask.shape, np.inf, np.float32)
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    if isinstance(spacing, Sequence):
        size = tuple(float(v) for v in spacing)
    else:
        size = (float(spacing),) * 3
    image.SetSpacing(size)
    dist = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=True, squaredDistance=False, useImageSpacing=True
    )
    return np.maximum(sitk.GetArrayFromImage(dist), 0.0).astype(np.float32)


def fill_renal_sinus(mask: sitk.Image, ct: sitk.Image) -> tuple[sitk.Image, int]:
    """The kidney as its capsule outlines it: ``mask`` plus the renal sinus it leaves out.

    Common CT segmentations (TotalSegmentator's, for one) label the parenchyma only, a C-shape
    open at the hilum, while the kidney outline on U/S (and the bundled feature networks' maps)
    is the capsule, with the sinus fat, vessels and collecting system inside. The voxels added
    lie inside the convex hull of each of the mask's connected pieces (one per kidney), deeper
    than :data:`SINUS_DEPTH_MM` below its surface, with HU in :data:`SINUS_HU_RANGE` (the rule
    ``simulate --from-ct`` uses to give a real CT's label its sinus). A mask that already holds
    its sinus gets almost nothing: the simulator's procedural kidneys gain no voxel.

    Args:
        mask: Kidney mask (0/1) on the CT's grid.
        ct: The CT in HU.

    Returns:
        The filled mask (uint8, on the same grid) and the number of voxels added.

    Example:
        >>> filled, added = fill_renal_sinus(mask, ct)  # doctest: +SKIP
    """
    array = sitk.GetArrayViewFromImage(mask) > 0
    if not array.any():
        return sitk.Cast(mask, sitk.sitkUInt8), 0
    extra = _sinus_voxels(array, sitk.GetArrayViewFromImage(ct), mask.GetSpacing()) & ~array
    added = int(extra.sum())
    out = (array | extra).astype(np.uint8)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(mask)
    return image, added


def renal_sinus(mask: sitk.Image, ct: sitk.Image) -> sitk.Image:
    """The renal sinus of the kidney(s) in ``mask``, read from the CT's HU.

    The sinus (sinus fat, the collecting system's urine, small vessels) is what lies inside the
    kidney's capsule but is not parenchyma. The voxels returned lie inside the convex hull of
    each of the mask's connected pieces (the capsule), deeper than :data:`SINUS_DEPTH_MM` below
    its surface, and are either outside the mask with HU in :data:`SINUS_HU_RANGE` (the hilum a
    parenchyma-only label leaves out: what :func:`fill_renal_sinus` adds) or inside it and
    darker than the parenchyma: fat (below :data:`SINUS_FAT_HU`) on any CT, and urine too (up
    to :data:`SINUS_HU_RANGE`'s top) when the parenchyma enhances (its median above
    :data:`ENHANCED_PARENCHYMA_HU`). On an unenhanced CT urine and parenchyma read alike, and
    the sinus inside a map is its fat alone.

    Args:
        mask: Kidney mask (0/1) on the CT's grid; each connected piece (one per kidney) is
            taken on its own.
        ct: The CT in HU.

    Returns:
        uint8 sinus mask on the CT's grid; empty when ``mask`` is.

    Example:
        >>> sinus = renal_sinus(kidney_mask, ct)  # doctest: +SKIP
    """
    array = sitk.GetArrayViewFromImage(mask) > 0
    sinus = _sinus_voxels(array, sitk.GetArrayViewFromImage(ct), mask.GetSpacing())
    image = sitk.GetImageFromArray(sinus.astype(np.uint8))
    image.CopyInformation(mask)
    return image


def trim_perirenal_fat(
    kidney_map: sitk.Image, ct: sitk.Image, threshold: float = 0.5
) -> tuple[sitk.Image, int]:
    """A CT kidney probability map with the fat around the kidney taken out.

    The kidney's capsule is where perirenal fat begins, and fat reads below
    :data:`SINUS_FAT_HU` on any CT. A segmentation network's map can spill a millimetre or two
    into that fat (the bundled CT network's maps of the simulated held-out CTs are 4-13 % too
    large, almost all of it fat), and a kidney map that is too large moves the registration, which
    aligns the CT kidney's sections with the U/S outline. Fat inside the capsule is the renal
    sinus, which lies deeper than :data:`SINUS_DEPTH_MM` inside the kidney's convex hull (the
    capsule bridges the hilum): so the map is set to 0 wherever the CT (median-filtered over
    3 x 3 x 3 voxels, against noise) reads fat and the point is not that deep inside the convex
    hull of a piece of the map's region (``map >= threshold``; one hull per kidney).
    Everything else keeps its probability. ``register`` applies it when it is given U/S kidney
    masks and no CT mask (docs/models.md, "One side at a time": there it takes the adapted TRE
    of 8 held-out patients from 3.08 to 1.71 mm; with the U/S network's map, itself too large,
    it does not help).

    Args:
        kidney_map: Kidney probabilities (or a 0/1 mask) on the CT's grid.
        ct: The CT in HU.
        threshold: Level of ``kidney_map`` that outlines the kidney.

    Returns:
        The trimmed map (float32, on the same grid) and the number of voxels at or above
        ``threshold`` it took out.

    Raises:
        ValueError: The map and the CT are not on the same grid.

    Example:
        >>> trimmed, removed = trim_perirenal_fat(probabilities, ct)  # doctest: +SKIP
    """
    _check_image(kidney_map, "kidney_map")
    _check_image(ct, "ct")
    if kidney_map.GetSize() != ct.GetSize():
        raise ValueError(
            f"kidney map {kidney_map.GetSize()} and CT {ct.GetSize()} must share one grid"
        )
    values = sitk.GetArrayFromImage(kidney_map).astype(np.float32)
    inside = values >= float(threshold)
    removed = 0
    if inside.any():
        size = np.asarray(kidney_map.GetSpacing(), dtype=np.float64)
        # The kidney's box with a margin as deep as the rim: the map's soft fringe in the fat
        # around it goes too.
        where = np.argwhere(inside)
        box = _margin_box(where.min(axis=0), where.max(axis=0) + 1, size, values.shape)
        hu = ndimage.median_filter(sitk.GetArrayViewFromImage(ct)[box].astype(np.float32), 3)
        fat = (hu < SINUS_FAT_HU) & ~_deep_in_hulls(inside[box], size)
        removed = int((fat & inside[box]).sum())
        values[box][fat] = 0.0
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(kidney_map)
    return image, removed


def _sinus_voxels(
    organ: NDArray[np.bool_], hu: NDArray[Any], spacing: Sequence[float]
) -> NDArray[np.bool_]:
    """The renal-sinus voxels of each connected piece of ``organ`` (two kidneys: two hulls)."""
    size = np.asarray(spacing, dtype=np.float64)
    return _per_piece(organ, size, lambda inside, box: _sinus_in_box(inside, hu[box], size))


def _deep_in_hulls(organ: NDArray[np.bool_], size: NDArray[np.float64]) -> NDArray[np.bool_]:
    """:func:`_hull_core` of each connected piece of ``organ`` (two kidneys: two hulls)."""
    return _per_piece(organ, size, lambda inside, _: _hull_core(inside, size))


def _per_piece(
    organ: NDArray[np.bool_],
    size: NDArray[np.float64],
    rule: Callable[[NDArray[np.bool_], tuple[slice, ...]], NDArray[np.bool_]],
) -> NDArray[np.bool_]:
    """``rule(piece, box)`` for each connected piece of ``organ`` on its box (with a margin as
    deep as the sinus), the results combined (or) on ``organ``'s grid."""
    out = np.zeros(organ.shape, bool)
    pieces, _ = ndimage.label(organ, structure=np.ones((3, 3, 3), bool))
    for index, where in enumerate(ndimage.find_objects(pieces), start=1):
        if where is None:
            continue
        start, stop = [w.start for w in where], [w.stop for w in where]
        box = _margin_box(np.array(start), np.array(stop), size, organ.shape)
        out[box] |= rule(pieces[box] == index, box)
    return out


def _margin_box(
    start: NDArray[np.integer[Any]],
    stop: NDArray[np.integer[Any]],
    size: NDArray[np.float64],
    shape: tuple[int, ...],
) -> tuple[slice, ...]:
    """The ``(z, y, x)`` index box [start, stop) grown by :data:`SINUS_DEPTH_MM` and a voxel
    (``size``: the voxel size, ``(sx, sy, sz)`` mm), clipped to ``shape``."""
    margin = np.ceil(SINUS_DEPTH_MM / size[::-1]).astype(int) + 1
    lo = np.maximum(start - margin, 0)
    hi = np.minimum(stop + margin, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _sinus_in_box(
    inside: NDArray[np.bool_], hu: NDArray[Any], size: NDArray[np.float64]
) -> NDArray[np.bool_]:
    """The renal-sinus voxels of one kidney ``inside`` (hull, depth and HU rule) on its box."""
    deep = _hull_core(inside, size)
    low, high = SINUS_HU_RANGE
    in_range = (hu > low) & (hu < high)
    parenchyma = hu[inside & (hu > PARENCHYMA_MIN_HU)]
    enhanced = parenchyma.size > 0 and float(np.median(parenchyma)) > ENHANCED_PARENCHYMA_HU
    darker = in_range if enhanced else in_range & (hu < SINUS_FAT_HU)
    return deep & np.where(inside, darker, in_range)


def _hull_core(inside: NDArray[np.bool_], size: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Voxels deeper than :data:`SINUS_DEPTH_MM` inside the convex hull of ``inside`` (the
    capsule, bridging the hilum): where the renal sinus lies."""
    return distance_inside(convex_hull_mask(inside), tuple(size)) > SINUS_DEPTH_MM


def body_midline_x(ct: sitk.Image) -> float:
    """World x (LPS, mm) of the body's centroid: the patient's midline.

    Example:
        >>> ct = sitk.Image(10, 4, 4, sitk.sitkFloat32) - 1000.0
        >>> body_midline_x(ct)  # no body: the image's centre
        4.5
    """
    body = sitk.Cast(ct > _BODY_HU, sitk.sitkUInt8)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(body)
    if 1 not in stats.GetLabels():
        return float(
            ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in ct.GetSize()])[0]
        )
    return float(stats.GetCentroid(1)[0])


def kidney_side(centroid_world: ArrayLike, ct: sitk.Image) -> str:
    """``"right"`` or ``"left"``: the side of the body midline a kidney centroid lies on (LPS).

    Example:
        >>> ct = sitk.Image(10, 4, 4, sitk.sitkFloat32) - 1000.0
        >>> kidney_side((1.0, 2.0, 2.0), ct), kidney_side((8.0, 2.0, 2.0), ct)
        ('right', 'left')
    """
    return "right" if float(np.asarray(centroid_world)[0]) < body_midline_x(ct) else "left"


def initial_alignment(grid: RegistrationGrid, P_target: ArrayLike) -> NDArray[np.float64]:
    """Initial pose of the target frame: ``M_init = G @ P_target`` (U/S image mm -> CT world mm).

    The paper aligns the CT and the U/S by their kidney centroids ("we uniformly aligned the
    kidney on CT in the inferior-superior axis and then aligned kidney on U/S with the centroid"):
    the CT crop is centred on the CT kidney centroid (the grid origin, ``G``'s translation) and
    the U/S crop on the U/S kidney centroid (``P`` sends it to the internal origin). So
    ``M_init`` sends the U/S kidney centroid onto the CT kidney centroid with the default (or
    given) orientation: "centroid on centroid".

    Example:
        >>> grid = RegistrationGrid.around((1.0, 2.0, 3.0), "tiny")
        >>> P = window_transforms((10.0, 20.0), "tiny")[2]
        >>> initial_alignment(grid, P) @ np.array([10.0, 20.0, 0.0, 1.0])
        array([1., 2., 3., 1.])
    """
    p = np.asarray(P_target, dtype=np.float64)
    if p.shape != (4, 4) or not is_rigid(p):
        raise ValueError("P_target must be a rigid 4x4 matrix")
    return grid.to_world_matrix(p)
