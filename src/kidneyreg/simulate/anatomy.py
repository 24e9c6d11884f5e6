"""Procedural abdomen: a tissue label map with two detailed kidneys, different for every seed.

The simulator's patients are built from smooth implicit shapes on a voxel grid, each organ
evaluated only inside its own bounding box and painted in anatomical order (body wall, spine,
ribs, lungs, solid organs, bowel, vessels, perirenal fat, kidneys), so that later, deeper
structures indent earlier ones the way real organs do. Everything random is drawn first, from
the seed alone (:func:`sample_anatomy_parameters`); rasterising (:func:`build_anatomy`) is then
deterministic and grid independent, so one seed gives the same patient at 1.0 mm and at 3.0 mm.

World frame: LPS millimetres (x to the patient's left, y posterior, z superior), identity
direction, isotropic spacing. World (0, 0, 0) is the centre of the L1 vertebral body; the
vertebral levels' z positions are kept in ``Anatomy.metadata["vertebra_z"]``.

Anatomy (numbers are the sampled ranges): an elliptic body 30-38 cm wide and 20-28 cm deep with a
flatter back; subcutaneous fat; abdominal wall muscles; erector spinae and quadratus lumborum behind
the kidneys; psoas beside the spine, growing caudally; vertebral bodies, discs and posterior
elements along a lordotic, slightly scoliotic spine; posterior ribs T7-T12 (T11 and T12 behind the
upper poles); iliac crests low in the field of view; lung bases in the posterior costophrenic
recesses above a two-domed diaphragm; liver with a right lobe tip reaching down antero-lateral to
the right kidney; a gallbladder of varied size, tilt and place in front of the right kidney (absent
in 10 % of patients) and, in 30 %, simple hepatic cysts; spleen posterolateral on the left; stomach
with an anterior gas cap; pancreas, duodenum, colon and small bowel loops with gas; aorta, IVC,
iliac vessels, renal arteries and veins (the left renal vein crossing in front of the aorta);
adrenals; perirenal fat; and the kidneys: a bean (ellipsoid bent towards the hilum, with a hilar
notch and low-frequency shape noise) 10-12 cm long, 5.3-6.3 cm wide and 3.3-4.3 cm thick, upper pole
near T12, lower pole near L3, the right one 1-2 cm lower, the long axis tilted 10-20 degrees
medially and posteriorly at the upper pole, the hilum turned 20-40 degrees anteriorly; inside, a 6-9
mm cortex, 8-12 medullary pyramids pointing at the sinus with columns of Bertin between them, renal
sinus fat, and a collecting system (pelvis, major and minor calyces).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage
from scipy.interpolate import make_interp_spline

from kidneyreg.simulate.tissues import Tissue

__all__ = [
    "SIDES",
    "SIDE_VALUES",
    "Anatomy",
    "AnatomyParameters",
    "KidneyInfo",
    "KidneyParameters",
    "build_anatomy",
    "generate_anatomy",
    "kidney_info_from_mask",
    "sample_anatomy_parameters",
]

#: Kidney sides, and their values in ``Anatomy.kidney_side``.
SIDES = ("right", "left")
SIDE_VALUES = {"right": 1, "left": 2}

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
# A predicate on the current (labels, compartment) of a box: where painting is allowed.
Allow = Callable[[NDArray[np.uint8], NDArray[np.uint8]], BoolArray]

# Field of view margin around each kidney centroid along S-I (mm); the probe's fan reaches
# about 9 cm either side of the kidney centre, the registration crop 11.5 cm.
_SI_MARGIN_MM = 130.0
# Margin around the body outline in the transverse plane (mm).
_BODY_MARGIN_MM = 12.0


# --------------------------------------------------------------------------------------------
# Public data classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KidneyInfo:
    """Geometry of one kidney in world (LPS mm) coordinates.

    Attributes:
        side: ``"right"`` or ``"left"``.
        centroid_world: Centroid of the kidney mask, shape (3,).
        axes: 3x3 matrix whose columns are unit vectors: the long axis (pointing to the upper
            pole), the width axis (pointing to the hilum) and the thickness axis
            (long x width).
        length: Extent of the mask along the long axis (mm).
        width: Extent along the width axis (mm).
        thickness: Extent along the thickness axis (mm).
        hilum_direction: Unit vector from the centroid towards the hilum (the width axis).
    """

    side: str
    centroid_world: FloatArray
    axes: FloatArray
    length: float
    width: float
    thickness: float
    hilum_direction: FloatArray

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (lists of floats).

        Example:
            >>> info.to_dict()["length"]  # doctest: +SKIP
            112.0
        """
        return {
            "side": self.side,
            "centroid_world": [float(v) for v in self.centroid_world],
            "axes": [[float(v) for v in row] for row in self.axes],
            "length": float(self.length),
            "width": float(self.width),
            "thickness": float(self.thickness),
            "hilum_direction": [float(v) for v in self.hilum_direction],
        }


@dataclass
class Anatomy:
    """A labelled abdomen on an isotropic, identity-direction LPS grid.

    Attributes:
        labels: uint8 :class:`~kidneyreg.simulate.tissues.Tissue` labels.
        kidney_side: uint8 on the same grid: 0 none, 1 right kidney, 2 left kidney (the whole
            organ: cortex, medulla, sinus fat and collecting system).
        compartment: uint8 on the same grid: 1 = the visceral and retroperitoneal compartment
            that moves with breathing (organs, kidneys, perirenal fat, bowel, vessels, lungs,
            diaphragm); 0 = air and the body wall (skin, subcutaneous fat, wall and back muscles,
            psoas, ribs, spine, pelvis) that stays fixed to the skin and the probe.
        kidneys: ``"right"`` / ``"left"`` -> :class:`KidneyInfo` for the kidneys present.
        seed: Seed of a procedural anatomy, None for a real one.
        source: ``"procedural"`` or the path of the real CT.
        metadata: JSON-friendly extras (sampled parameters, vertebral levels, label source).
    """

    labels: sitk.Image
    kidney_side: sitk.Image
    compartment: sitk.Image
    kidneys: dict[str, KidneyInfo]
    seed: int | None
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> float:
        """Isotropic voxel size in mm."""
        return float(self.labels.GetSpacing()[0])

    def kidney_mask(self, side: str) -> sitk.Image:
        """uint8 0/1 mask of one whole kidney on the label grid.

        Args:
            side: ``"right"`` or ``"left"``.

        Raises:
            ValueError: If ``side`` is not a side name, or that kidney is absent.

        Example:
            >>> mask = generate_anatomy(1, spacing=3.0).kidney_mask("left")
            >>> int(sitk.GetArrayViewFromImage(mask).max())
            1
        """
        value = _side_value(side)
        if side not in self.kidneys:
            raise ValueError(f"this anatomy has no {side} kidney")
        array = (sitk.GetArrayViewFromImage(self.kidney_side) == value).astype(np.uint8)
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(self.kidney_side)
        return image

    def tissue_mask(self, *tissues: Tissue) -> sitk.Image:
        """uint8 0/1 mask of the voxels labelled with any of ``tissues``.

        Example:
            >>> bone = anatomy.tissue_mask(Tissue.BONE)  # doctest: +SKIP
        """
        array = np.isin(sitk.GetArrayViewFromImage(self.labels), [int(t) for t in tissues])
        image = sitk.GetImageFromArray(array.astype(np.uint8))
        image.CopyInformation(self.labels)
        return image


def _side_value(side: str) -> int:
    if side not in SIDE_VALUES:
        raise ValueError(f"kidney side must be 'right' or 'left', got {side!r}")
    return SIDE_VALUES[side]


@dataclass(frozen=True)
class KidneyParameters:
    """Sampled shape, pose and inner structure of one kidney (mm, degrees).

    Attributes:
        side: ``"right"`` or ``"left"``.
        centre: Design centre (x, y, z) in world mm.
        length, width, thickness: Full diameters of the underlying ellipsoid.
        coronal_tilt_deg: Upper pole towards the midline.
        sagittal_tilt_deg: Upper pole towards the back.
        hilum_rotation_deg: Rotation about the long axis turning the hilum from medial to
            antero-medial.
        bend: Bean bend (pole shift towards the hilum as a fraction of the half width).
        notch: Depth of the hilar indentation.
        taper: Upper pole wider (>0) or narrower (<0) than the lower pole.
        shape_noise: Amplitude of the low-frequency surface noise.
        cortex_mm: Cortex thickness.
        parenchyma_mm: Cortex plus medulla thickness (depth at which the sinus starts).
        lateral_parenchyma_mm: Parenchyma thickness at the lateral border (across the width).
        n_pyramids: Number of medullary pyramids.
        pyramid_half_angle_deg: Cone half angle of the pyramids.
        pelvis_mm: Radius of the renal pelvis (its antero-posterior radius is 0.8 times this):
            1.5 mm collapsed to 9 mm distended.
        calyx_mm: Radius of the calyces (1 to 3.2 mm, wider with a distended pelvis).
        perirenal_mm: Thickness of the perirenal fat.
        noise_seed: Seed of the kidney's shape noise and pyramid jitter.
    """

    side: str
    centre: tuple[float, float, float]
    length: float
    width: float
    thickness: float
    coronal_tilt_deg: float
    sagittal_tilt_deg: float
    hilum_rotation_deg: float
    bend: float
    notch: float
    taper: float
    shape_noise: float
    cortex_mm: float
    parenchyma_mm: float
    lateral_parenchyma_mm: float
    n_pyramids: int
    pyramid_half_angle_deg: float
    pelvis_mm: float
    calyx_mm: float
    perirenal_mm: float
    noise_seed: int

    def axes(self) -> FloatArray:
        """3x3 matrix, columns: long (to the upper pole), width (to the hilum), thickness."""
        medial = 1.0 if self.side == "right" else -1.0  # +x is the patient's left
        long_axis = np.array(
            [
                medial * math.tan(math.radians(self.coronal_tilt_deg)),
                math.tan(math.radians(self.sagittal_tilt_deg)),
                1.0,
            ]
        )
        long_axis /= np.linalg.norm(long_axis)
        gamma = math.radians(self.hilum_rotation_deg)
        hilum = math.cos(gamma) * np.array([medial, 0.0, 0.0]) + math.sin(gamma) * np.array(
            [0.0, -1.0, 0.0]
        )
        hilum -= hilum.dot(long_axis) * long_axis
        hilum /= np.linalg.norm(hilum)
        third = np.cross(long_axis, hilum)
        return np.stack([long_axis, hilum, third], axis=1)

    def back_y(self) -> float:
        """y of the kidney's most posterior point (of the underlying ellipsoid)."""
        semi = np.array([self.length, self.width, self.thickness]) / 2
        return float(self.centre[1] + np.sqrt(np.sum((semi * self.axes()[1, :]) ** 2)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy."""
        out = dict(self.__dict__)
        out["centre"] = [float(v) for v in self.centre]
        return out


@dataclass(frozen=True)
class AnatomyParameters:
    """Everything random about one procedural patient (mm and degrees).

    Drawn by :func:`sample_anatomy_parameters`; :func:`build_anatomy` turns it into voxels
    without further randomness (shape noise comes from ``noise_seed``).

    Attributes:
        body_width: Left-right diameter of the body at L1.
        body_depth: Antero-posterior diameter of the body at L1.
        back_y: y of the skin of the back (the spine's L1 body centre is y = 0).
        body_x: Left-right offset of the body outline's centre from the spine.
        front_power, back_power: Superellipse exponents of the outline (larger = boxier).
        width_slope: Relative widening of the body per 100 mm caudally.
        fat_mm: Subcutaneous fat thickness (front; flanks and back are thinner).
        wall_mm: Abdominal wall muscle thickness.
        ql_gap: Fat between the back of each kidney and the quadratus lumborum.
        vertebra_scale: Scale of vertebral heights and widths.
        lordosis_mm: Anterior bow of the lumbar spine.
        scoliosis_mm: Left-right bow of the spine.
        psoas_mm: Radius of the psoas at L4.
        dome_right_z, dome_left_z: Heights of the diaphragm domes.
        recess_z: Height of the posterior costophrenic recesses.
        liver_tip_z: Lowest point of the right liver lobe (relative to the right kidney centre).
        liver_left_x: How far the left lobe reaches to the left.
        spleen_size: Length of the spleen.
        stomach_gas: Fraction of the stomach filled with gas.
        bowel_gas: Probability that a bowel segment holds a gas pocket.
        aorta_mm, ivc_mm: Radii of the great vessels.
        kidneys: Per-side :class:`KidneyParameters`.
        noise_seed: Seed of all shape noise fields.
        gallbladder: Centre of the gallbladder relative to the right kidney's centre (its height
            is set by the liver's inferior surface, this z is an extra offset), or ``None``
            after a cholecystectomy.
        gallbladder_scale: Scale of the gallbladder's 14 x 16 x 30 mm semi-axes.
        gallbladder_axis: Direction of its long axis, from the fundus (in front, below) to the
            neck (behind, above).
        liver_cysts: Simple hepatic cysts as (dx, dy, dz, radius) relative to the right kidney's
            centre; painted only where they fall inside the liver.
    """

    body_width: float
    body_depth: float
    back_y: float
    body_x: float
    front_power: float
    back_power: float
    width_slope: float
    fat_mm: float
    wall_mm: float
    ql_gap: float
    vertebra_scale: float
    lordosis_mm: float
    scoliosis_mm: float
    psoas_mm: float
    dome_right_z: float
    dome_left_z: float
    recess_z: float
    liver_tip_z: float
    liver_left_x: float
    spleen_size: float
    stomach_gas: float
    bowel_gas: float
    aorta_mm: float
    ivc_mm: float
    kidneys: dict[str, KidneyParameters]
    noise_seed: int
    gallbladder: tuple[float, float, float] | None = None
    gallbladder_scale: float = 1.0
    gallbladder_axis: tuple[float, float, float] = (0.0, 0.0, 1.0)
    liver_cysts: tuple[tuple[float, float, float, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy.

        Example:
            >>> sample_anatomy_parameters(np.random.default_rng(0)).to_dict()["body_width"] > 0
            True
        """
        out = {k: v for k, v in self.__dict__.items() if k != "kidneys"}
        out["kidneys"] = {side: k.to_dict() for side, k in self.kidneys.items()}
        return out


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sample_anatomy_parameters(rng: np.random.Generator) -> AnatomyParameters:
    """Draw one patient's parameters.

    Args:
        rng: Random generator; every draw of the patient comes from it, in a fixed order.

    Returns:
        The parameters; equal generator states give equal parameters.

    Example:
        >>> p = sample_anatomy_parameters(np.random.default_rng(3))
        >>> 95 <= p.kidneys["left"].length <= 125
        True
    """

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    body_width = u(300.0, 380.0)
    # Deeper bodies go with wider ones, but both stay in range.
    body_depth = float(
        np.clip(200.0 + (body_width - 300.0) * 0.6 + rng.normal(0.0, 15.0), 200, 280)
    )
    fat_mm = u(8.0, 32.0)
    back_y = u(78.0, 92.0) + 0.45 * fat_mm
    left_z = u(-22.0, -6.0)
    right_drop = u(10.0, 20.0)
    kidneys = {}
    for side in SIDES:
        sign = 1.0 if side == "left" else -1.0
        centre = (
            sign * u(70.0, 82.0),
            u(10.0, 22.0),
            left_z if side == "left" else left_z - right_drop,
        )
        kidneys[side] = KidneyParameters(
            side=side,
            centre=centre,
            length=u(100.0, 118.0),
            width=u(53.0, 62.5),
            thickness=u(31.0, 41.0),
            coronal_tilt_deg=u(10.0, 20.0),
            sagittal_tilt_deg=u(10.0, 20.0),
            hilum_rotation_deg=u(20.0, 40.0),
            bend=u(0.08, 0.16),
            notch=u(0.25, 0.45),
            taper=u(-0.08, 0.08),
            shape_noise=u(0.04, 0.07),
            cortex_mm=u(5.5, 8.0),
            parenchyma_mm=u(12.5, 16.0),
            lateral_parenchyma_mm=u(15.0, 20.0),
            n_pyramids=int(rng.integers(8, 13)),
            pyramid_half_angle_deg=u(36.0, 46.0),
            # Most adult collecting systems are collapsed (a thin line in the central echo
            # complex on U/S, hardly seen on unenhanced CT); a fifth are distended past 10 mm
            # antero-posterior (full hydration, an extrarenal pelvis). The square skews the
            # distension towards collapsed; one draw each, as before, so no other parameter moves.
            pelvis_mm=1.5 + 7.5 * (distension := u(0.0, 1.0) ** 2),
            calyx_mm=u(2.0, 3.2) * (0.5 + 0.5 * distension),
            perirenal_mm=u(7.0, 20.0),
            noise_seed=int(rng.integers(0, 2**31 - 1)),
        )
    params = AnatomyParameters(
        body_width=body_width,
        body_depth=body_depth,
        back_y=back_y,
        body_x=u(-6.0, 6.0),
        front_power=u(2.0, 2.5),
        back_power=u(2.6, 3.4),
        width_slope=u(0.0, 0.05),
        fat_mm=fat_mm,
        wall_mm=u(9.0, 15.0),
        ql_gap=u(2.0, 7.0),
        vertebra_scale=u(0.92, 1.08),
        lordosis_mm=u(8.0, 20.0),
        scoliosis_mm=u(-4.0, 4.0),
        psoas_mm=u(18.0, 26.0),
        dome_right_z=u(70.0, 95.0),
        dome_left_z=u(60.0, 85.0),
        recess_z=u(10.0, 30.0),
        liver_tip_z=u(-50.0, -10.0),
        liver_left_x=u(30.0, 80.0),
        spleen_size=u(95.0, 125.0),
        stomach_gas=u(0.15, 0.5),
        bowel_gas=u(0.3, 0.7),
        aorta_mm=u(9.0, 12.5),
        ivc_mm=u(9.0, 12.0),
        kidneys=kidneys,
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )
    fluid = _sample_fluid_structures(np.random.default_rng([params.noise_seed, 16]))
    return replace(params, **fluid)


def _sample_fluid_structures(rng: np.random.Generator) -> dict[str, Any]:
    """The gallbladder's variable place, size and orientation, and simple hepatic cysts.

    They come from their own generator (seeded from the patient's noise seed), so that adding
    them left every other draw of a seed, and with it every earlier patient, unchanged. Both are
    anechoic ovals near the right kidney that a U/S kidney detector must learn to reject. The
    gallbladder often lies in the right kidney's sagittal plane, 5.5-8.5 cm in front of it (here
    from 2.5 cm lateral to 2 cm medial of its centre; in the shared real CT 5 mm medial and 79 mm
    anterior); simple hepatic cysts are common incidental findings.
    """
    present = bool(rng.random() < 0.9)  # the rest: after a cholecystectomy
    offset = (
        float(rng.uniform(-25.0, 20.0)),
        -float(rng.uniform(55.0, 85.0)),
        float(rng.uniform(-10.0, 15.0)),
    )
    scale = float(rng.uniform(0.65, 1.25))
    axis = np.array([rng.uniform(-0.3, 0.3), rng.uniform(0.0, 1.5), 1.0])
    axis /= np.linalg.norm(axis)
    n_cysts = int(rng.choice(4, p=[0.7, 0.18, 0.08, 0.04]))
    cysts = tuple(
        (
            float(rng.uniform(-30.0, 30.0)),
            -float(rng.uniform(15.0, 90.0)),
            float(rng.uniform(-10.0, 80.0)),
            float(rng.uniform(4.0, 14.0)),
        )
        for _ in range(n_cysts)
    )
    return {
        "gallbladder": offset if present else None,
        "gallbladder_scale": scale,
        "gallbladder_axis": tuple(float(v) for v in axis),
        "liver_cysts": cysts,
    }


# --------------------------------------------------------------------------------------------
# Grid, noise and painting helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Box:
    """A sub-block of the grid: slices into (z, y, x) arrays and open-mesh world coordinates."""

    sl: tuple[slice, slice, slice]
    x: NDArray[np.float32]  # shape (1, 1, nx)
    y: NDArray[np.float32]  # shape (1, ny, 1)
    z: NDArray[np.float32]  # shape (nz, 1, 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.shape[0], self.y.shape[1], self.x.shape[2])


@dataclass(frozen=True)
class _Grid:
    origin: tuple[float, float, float]  # world x, y, z of voxel (0, 0, 0)
    spacing: float
    shape: tuple[int, int, int]  # nz, ny, nx

    def coords(self, axis: int) -> NDArray[np.float32]:
        """World coordinates along x (0), y (1) or z (2)."""
        n = self.shape[2 - axis]
        return (self.origin[axis] + self.spacing * np.arange(n)).astype(np.float32)

    def box(self, lo: ArrayLike3, hi: ArrayLike3) -> _Box | None:
        """The grid block covering world [lo, hi] (clipped); None if empty."""
        slices = []
        for axis in range(3):
            n = self.shape[2 - axis]
            i0 = max(0, math.floor((float(lo[axis]) - self.origin[axis]) / self.spacing))
            i1 = min(n, math.ceil((float(hi[axis]) - self.origin[axis]) / self.spacing) + 1)
            if i1 <= i0:
                return None
            slices.append(slice(i0, i1))
        sx, sy, sz = slices
        x = self.coords(0)[sx][None, None, :]
        y = self.coords(1)[sy][None, :, None]
        z = self.coords(2)[sz][:, None, None]
        return _Box((sz, sy, sx), x, y, z)


ArrayLike3 = tuple[float, float, float] | FloatArray


class _Noise:
    """Smooth Gaussian random field from random Fourier features (grid independent).

    ``n`` cosines with Gaussian-distributed wave vectors give a field of unit variance whose
    correlation length is about ``scale`` mm; evaluating it at world coordinates (not voxel
    indices) makes shapes identical at every grid spacing.
    """

    def __init__(self, seed: int, key: int, n: int, scale: float, dims: int = 3) -> None:
        rng = np.random.default_rng([seed, key])
        self.k = (rng.normal(size=(n, 3)) / scale).astype(np.float32)
        if dims < 3:
            self.k[:, dims:] = 0.0
        self.phase = rng.uniform(0.0, 2.0 * math.pi, n).astype(np.float32)
        self.amp = np.float32(math.sqrt(2.0 / n))

    def __call__(self, x: Any, y: Any = 0.0, z: Any = 0.0) -> Any:
        total: Any = 0.0
        for k, phase in zip(self.k, self.phase, strict=True):
            total = total + np.cos(k[0] * x + k[1] * y + k[2] * z + phase)
        return self.amp * total

    def planar(self, x: Any, y: Any) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Precomputed cosines and sines of the in-plane phases, for :meth:`at_z`."""
        arg = np.stack([k[0] * x + k[1] * y + ph for k, ph in zip(self.k, self.phase, strict=True)])
        return np.cos(arg).astype(np.float32), np.sin(arg).astype(np.float32)

    def at_z(self, planar: tuple[NDArray[np.float32], NDArray[np.float32]], z: float) -> Any:
        """The field on the plane of :meth:`planar` at height z (cheap: no cosines per pixel)."""
        cz = np.cos(self.k[:, 2] * z)
        sz = np.sin(self.k[:, 2] * z)
        cos_a, sin_a = planar
        total = np.zeros(cos_a.shape[1:], np.float32)
        for i in range(len(cz)):
            total += np.float32(cz[i]) * cos_a[i]
            total -= np.float32(sz[i]) * sin_a[i]
        return self.amp * total


def _smoothstep(x: Any, lo: float, hi: float) -> Any:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class _Canvas:
    """Label, compartment and kidney-side arrays being painted."""

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        self.labels = np.zeros(grid.shape, np.uint8)  # Tissue.AIR
        self.comp = np.zeros(grid.shape, np.uint8)
        self.side = np.zeros(grid.shape, np.uint8)

    def paint(
        self,
        box: _Box,
        mask: BoolArray,
        tissue: Tissue,
        comp: int,
        allow: Allow | None = None,
    ) -> None:
        lab = self.labels[box.sl]
        cmp_ = self.comp[box.sl]
        mask = np.broadcast_to(mask, lab.shape)
        if allow is not None:
            mask = mask & allow(lab, cmp_)
        lab[mask] = int(tissue)
        cmp_[mask] = comp


def _allow_visceral(lab: NDArray[np.uint8], comp: NDArray[np.uint8]) -> BoolArray:
    """Inside the visceral compartment (organs never cut into the body wall)."""
    return comp == 1


def _allow_not_bone(lab: NDArray[np.uint8], comp: NDArray[np.uint8]) -> BoolArray:
    return lab != int(Tissue.BONE)


def _allow_only(*tissues: Tissue) -> Allow:
    """Inside the visceral compartment and currently labelled with one of ``tissues``."""
    values = [int(t) for t in tissues]

    def allow(lab: NDArray[np.uint8], comp: NDArray[np.uint8]) -> BoolArray:
        return (comp == 1) & np.isin(lab, values)

    return allow


def _segment_distance(
    box: _Box, p0: FloatArray, p1: FloatArray
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Distance from the box voxels to segment p0-p1, and the segment parameter t in [0, 1]."""
    d = (p1 - p0).astype(np.float32)
    dd = float(d.dot(d)) or 1e-6
    rx = box.x - np.float32(p0[0])
    ry = box.y - np.float32(p0[1])
    rz = box.z - np.float32(p0[2])
    t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) / dd, 0.0, 1.0)
    dist2 = (rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rz - t * d[2]) ** 2
    return np.sqrt(dist2), t


def _paint_tube(
    canvas: _Canvas,
    points: FloatArray,
    radii: FloatArray | float,
    tissue: Tissue,
    comp: int,
    allow: Allow | None = None,
) -> None:
    """Paint a tube of varying radius along a polyline (capsule per segment, in its box)."""
    pts = np.asarray(points, float)
    rad = np.broadcast_to(np.asarray(radii, float), (len(pts),))
    for i in range(len(pts) - 1):
        p0, p1, r0, r1 = pts[i], pts[i + 1], rad[i], rad[i + 1]
        r = max(r0, r1)
        box = canvas.grid.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
        if box is None:
            continue
        dist, t = _segment_distance(box, p0, p1)
        canvas.paint(box, dist <= r0 + t * (r1 - r0), tissue, comp, allow)


def _paint_capsule(
    canvas: _Canvas,
    p0: ArrayLike3,
    p1: ArrayLike3,
    radius: float,
    tissue: Tissue,
    comp: int,
    allow: Allow | None = None,
) -> None:
    _paint_tube(canvas, np.array([p0, p1], float), radius, tissue, comp, allow)


def _paint_ellipsoid(
    canvas: _Canvas,
    centre: ArrayLike3,
    axes: FloatArray,
    radii: ArrayLike3,
    tissue: Tissue,
    comp: int,
    allow: Allow | None = None,
    noise: _Noise | None = None,
    noise_amp: float = 0.0,
) -> None:
    """Paint an oriented ellipsoid; ``axes`` columns are its unit axes, ``radii`` semi-axes."""
    c = np.asarray(centre, float)
    rad = np.asarray(radii, float)
    reach = float(rad.max()) * (1.0 + noise_amp)
    box = canvas.grid.box(c - reach, c + reach)
    if box is None:
        return
    dx, dy, dz = box.x - c[0], box.y - c[1], box.z - c[2]
    f: Any = 0.0
    for i in range(3):
        a = axes[:, i]
        f = f + ((dx * a[0] + dy * a[1] + dz * a[2]) / rad[i]) ** 2
    if noise is not None:
        f = f + noise_amp * noise(box.x, box.y, box.z)
    canvas.paint(box, f < 1.0, tissue, comp, allow)


def _spline(points: Any, step: float = 3.0) -> FloatArray:
    """Resample a smooth interpolating spline through control points every ``step`` mm."""
    pts = np.asarray(points, float)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    t = np.concatenate([[0.0], np.cumsum(seg)])
    k = min(3, len(pts) - 1)
    spline = make_interp_spline(t, pts, k=k)
    n = max(2, math.ceil(t[-1] / step) + 1)
    return np.asarray(spline(np.linspace(0.0, t[-1], n)), float)


# --------------------------------------------------------------------------------------------
# Body, spine and wall
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spine:
    """Vertebral levels and the spinal curve."""

    names: tuple[str, ...]
    z: tuple[float, ...]  # body centres
    height: tuple[float, ...]  # body heights
    p: AnatomyParameters

    def centre(self, z: Any) -> tuple[Any, Any]:
        """x, y of the vertebral body centre line at height z (0, 0 at L1)."""
        s = self.p.vertebra_scale
        x = self.p.scoliosis_mm * np.sin(np.asarray(z) / (260.0 * s))
        # Lumbar lordosis (anterior bow below L1), thoracic kyphosis above.
        y = self.p.lordosis_mm * np.sin(np.pi * np.asarray(z) / (420.0 * s))
        return x, y

    def body_size(self, z: Any) -> tuple[Any, Any]:
        """Half width and half depth of the vertebral body at height z (lumbar larger)."""
        s = self.p.vertebra_scale
        lumbar = _smoothstep(-np.asarray(z), -40.0 * s, 40.0 * s)
        return s * (17.0 + 6.0 * lumbar), s * (13.5 + 3.0 * lumbar)

    def level_z(self, name: str) -> float:
        return self.z[self.names.index(name)]


def _make_spine(p: AnatomyParameters) -> _Spine:
    names = ("T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
    s = p.vertebra_scale
    heights = [21.0, 21.5, 22.0, 23.0, 24.0, 25.0, 26.5, 27.5, 28.0, 28.0, 27.0, 30.0]
    discs = [5.0, 5.0, 5.5, 6.0, 6.5, 8.0, 9.5, 10.0, 10.5, 11.0, 11.0]
    z = [0.0] * len(names)
    i_l1 = names.index("L1")
    for i in range(i_l1 - 1, -1, -1):
        z[i] = z[i + 1] + s * (heights[i + 1] / 2 + discs[i] + heights[i] / 2)
    for i in range(i_l1 + 1, len(names)):
        z[i] = z[i - 1] - s * (heights[i - 1] / 2 + discs[i - 1] + heights[i] / 2)
    return _Spine(names, tuple(z), tuple(h * s for h in heights), p)


class _Body:
    """The body outline, subcutaneous fat and wall as functions of (angle, z)."""

    def __init__(self, p: AnatomyParameters, spine: _Spine) -> None:
        self.p = p
        self.spine = spine
        self.xc = p.body_x
        self.b_back = 0.42 * p.body_depth
        self.yc = p.back_y - self.b_back
        self.b_front = p.body_depth - self.b_back
        self.shape_noise = _Noise(p.noise_seed, 1, 8, 90.0)
        # The quadratus lumborum's front follows the back of the kidney lying on it.
        self.ql_front = {side: k.back_y() + p.ql_gap for side, k in p.kidneys.items()}
        self.fat_noise = _Noise(p.noise_seed, 2, 8, 70.0)

    def half_width(self, z: Any) -> Any:
        return 0.5 * self.p.body_width * (1.0 + self.p.width_slope * (-np.asarray(z)) / 100.0)

    def skin_radius(self, dx: Any, dy: Any, z: float) -> Any:
        """Radius of the skin along the direction of (dx, dy) from the body centre."""
        r = np.hypot(dx, dy) + 1e-6
        front = dy < 0
        power = np.where(front, self.p.front_power, self.p.back_power)
        b = np.where(front, self.b_front, self.b_back)
        a = self.half_width(z)
        v = (np.abs(dx) / a) ** power + (np.abs(dy) / b) ** power
        radius = r * v ** (-1.0 / power)
        # Low-frequency bumps of the outline, a few percent.
        ux, uy = dx / r, dy / r
        return radius * (1.0 + 0.03 * self.shape_noise(ux * 100.0, uy * 100.0, z))

    @staticmethod
    def fat_factor(ux: Any, uy: Any) -> Any:
        """Relative fat thickness: thickest in front and on the flanks, thin over the spine."""
        return 0.75 + 0.25 * np.clip(-uy, 0.0, 1.0) + 0.15 * np.abs(ux) - 0.25 * np.clip(uy, 0, 1)

    def fat_thickness(self, dx: Any, dy: Any, z: float) -> Any:
        r = np.hypot(dx, dy) + 1e-6
        ux, uy = dx / r, dy / r
        noise = 1.0 + 0.2 * self.fat_noise(ux * 100.0, uy * 100.0, z)
        return np.maximum(4.0, self.p.fat_mm * self.fat_factor(ux, uy) * noise)

    def wall_thickness(self, dx: Any, dy: Any) -> Any:
        r = np.hypot(dx, dy) + 1e-6
        ux = dx / r
        # Rectus sheath in front with a thin linea alba at the midline.
        linea = 1.0 - 0.6 * np.exp(-((dx / 6.0) ** 2)) * (dy < 0)
        return self.p.wall_mm * (0.9 + 0.3 * np.abs(ux)) * linea

    def back_front(self, x: Any, z: float) -> Any:
        """y of the front of the posterior wall (paraspinal muscles, quadratus lumborum)."""
        sx, sy = self.spine.centre(z)
        _, hd = self.spine.body_size(z)
        ax = np.abs(np.asarray(x) - sx)
        inner = sy + hd + 9.0
        # The quadratus lumborum hangs from the 12th rib: it is absent in the chest.
        ql_present = _smoothstep(self.spine.level_z("T12") + 5.0 - z, 0.0, 25.0)
        ql = np.where(np.asarray(x) < sx, self.ql_front["right"], self.ql_front["left"])
        ql_lateral = 0.5 * self.p.body_width * 0.55
        y = inner + (ql - inner) * _smoothstep(ax, 28.0, 50.0)
        # Lateral to the quadratus the wall's inner surface curves back to meet the flank
        # muscles (the renal fossa's posterolateral corner).
        y = y + 90.0 * _smoothstep(ax, ql_lateral - 10.0, ql_lateral + 55.0) ** 1.5
        release = (1.0 - ql_present) * _smoothstep(ax, 26.0, 40.0)
        return y + 400.0 * release


def _paint_body(canvas: _Canvas, body: _Body, spine: _Spine) -> None:
    """Skin, subcutaneous fat, wall muscles, back muscles and the visceral cavity, per slice."""
    grid = canvas.grid
    p = body.p
    x = grid.coords(0)[None, :]
    y = grid.coords(1)[:, None]
    dx = x - body.xc
    dy = y - body.yc
    # Everything that does not depend on z, computed once for the slice plane (this equals
    # body.skin_radius / body.fat_thickness evaluated slice by slice).
    r = np.hypot(dx, dy) + np.float32(1e-6)
    ux, uy = dx / r, dy / r
    front = dy < 0
    power = np.where(front, p.front_power, p.back_power).astype(np.float32)
    b_term = (np.abs(dy) / np.where(front, body.b_front, body.b_back)) ** power
    log_dx = np.log(np.abs(dx) + np.float32(1e-6))
    shape_planar = body.shape_noise.planar(ux * 100.0, uy * 100.0)
    fat_planar = body.fat_noise.planar(ux * 100.0, uy * 100.0)
    fat_factor = body.fat_factor(ux, uy)
    wall = body.wall_thickness(dx, dy)
    for k, z in enumerate(grid.coords(2)):
        zf = float(z)
        a = float(body.half_width(zf))
        v = np.exp(power * (log_dx - math.log(a))) + b_term
        skin = (
            r * np.exp(-np.log(v) / power) * (1.0 + 0.03 * body.shape_noise.at_z(shape_planar, zf))
        )
        fat = np.maximum(
            4.0, p.fat_mm * fat_factor * (1.0 + 0.2 * body.fat_noise.at_z(fat_planar, zf))
        )
        lab = canvas.labels[k]
        comp = canvas.comp[k]
        inside = r < skin
        lab[inside] = Tissue.FAT
        muscle = r < skin - fat
        lab[muscle] = Tissue.MUSCLE
        back = body.back_front(x, zf)
        cavity = (r < skin - fat - wall) & (y < back)
        lab[cavity] = Tissue.FAT
        comp[cavity] = 1
        # A fat plane between the erector spinae and the quadratus lumborum / latissimus.
        sx, _ = spine.centre(zf)
        plane = (
            muscle
            & ~cavity
            & (np.abs(np.abs(x - sx) - 62.0) < 1.5)
            & (y > back - 1.0)
            & (y < back + 40.0)
        )
        lab[plane] = Tissue.FAT


def _paint_spine(canvas: _Canvas, spine: _Spine, p: AnatomyParameters) -> None:
    """Vertebral bodies, discs, spinal canal and posterior elements (bone, body wall)."""
    grid = canvas.grid
    zs = grid.coords(2)
    zlo, zhi = float(zs[0]), float(zs[-1])
    s = p.vertebra_scale
    # Bodies and discs as one column; the label depends on the height.
    box = grid.box((-80, -60, zlo), (80, 60, zhi))
    assert box is not None
    sx, sy = spine.centre(box.z)
    hw, hd = spine.body_size(box.z)
    ex = (box.x - sx) / hw
    ey = (box.y - sy) / hd
    # Posterior border of the body is flattened/concave where the canal sits.
    column = (ex**2 + ey**2 < 1.0) & ~((ey > 0.55) & (np.abs(ex) < 0.45))
    in_body = np.zeros_like(box.z, dtype=bool)
    for zc, h in zip(spine.z, spine.height, strict=True):
        in_body |= np.abs(box.z - zc) <= h / 2
    canvas.paint(box, column & in_body, Tissue.BONE, 0)
    canvas.paint(box, column & ~in_body, Tissue.SOFT_TISSUE, 0)
    # Spinal canal (cerebrospinal fluid around the cord).
    canal_r = 8.5 * s
    canal = ((box.x - sx) ** 2 + ((box.y - (sy + hd + canal_r + 1.0)) * 1.15) ** 2) < canal_r**2
    canvas.paint(box, canal, Tissue.FLUID, 0)
    # Posterior elements per vertebra: pedicles, laminae, spinous and transverse processes.
    for name, zc in zip(spine.names, spine.z, strict=True):
        if zc < zlo - 40 or zc > zhi + 40:
            continue
        cx, cy = (float(v) for v in spine.centre(zc))
        hdz = float(spine.body_size(zc)[1])
        lumbar = name.startswith("L")
        back = cy + hdz
        canal_y = back + canal_r + 1.0
        for side in (-1.0, 1.0):
            ped_x = cx + side * (canal_r + 3.5)
            _paint_capsule(
                canvas,
                (ped_x, back - 3, zc + 3),
                (ped_x, canal_y + 2, zc + 3),
                4.2 * s,
                Tissue.BONE,
                0,
            )
            lam_end = (cx, canal_y + canal_r + 4.0, zc - 2.0)
            _paint_capsule(canvas, (ped_x, canal_y + 2, zc + 2), lam_end, 3.6 * s, Tissue.BONE, 0)
            tp_len = (27.0 if lumbar else 17.0) * s
            tp_y = canal_y - 1.0 if lumbar else canal_y + 5.0
            tp_end = (cx + side * (canal_r + 3.5 + tp_len), tp_y + (3.0 if lumbar else 9.0), zc + 2)
            _paint_capsule(canvas, (ped_x, canal_y, zc + 2), tp_end, 3.3 * s, Tissue.BONE, 0)
            # Facet joints.
            _paint_capsule(
                canvas,
                (ped_x + side * 2, canal_y + 5, zc + 10),
                (ped_x + side * 2, canal_y + 5, zc - 10),
                3.5 * s,
                Tissue.BONE,
                0,
            )
        spin_len = (30.0 if lumbar else 34.0) * s
        spin_drop = 8.0 if lumbar else 22.0
        _paint_capsule(
            canvas, lam_end, (cx, lam_end[1] + spin_len, zc - spin_drop), 3.6 * s, Tissue.BONE, 0
        )


def _paint_psoas(canvas: _Canvas, spine: _Spine, p: AnatomyParameters) -> None:
    grid = canvas.grid
    z_top = spine.level_z("T12")
    z_l4 = spine.level_z("L4")
    box = grid.box((-140, -80, float(grid.coords(2)[0])), (140, 80, z_top))
    if box is None:
        return
    sx, sy = spine.centre(box.z)
    hw, hd = spine.body_size(box.z)
    grow = _smoothstep(z_top - box.z, 0.0, z_top - z_l4)
    radius = 4.0 + (p.psoas_mm - 4.0) * grow**0.8
    for side in (-1.0, 1.0):
        cx = sx + side * (hw + 0.75 * radius)
        cy = sy + hd * (0.35 - 0.45 * grow)
        inside = ((box.x - cx) / radius) ** 2 + ((box.y - cy) / (0.85 * radius)) ** 2 < 1.0
        canvas.paint(box, inside, Tissue.MUSCLE, 0)


def _rib_path(body: _Body, spine: _Spine, name: str, side: float, length: float) -> FloatArray:
    """Centre line of one rib from its head at the spine around the body wall."""
    zc = spine.level_z(name)
    sx, sy = (float(v) for v in spine.centre(zc))
    _, hd = (float(v) for v in spine.body_size(zc))
    head = np.array([sx + side * 14.0, sy + hd + 4.0, zc + 6.0])
    tubercle = np.array([sx + side * 30.0, sy + hd + 20.0, zc + 3.0])
    # Then follow the inside of the wall muscles around the body, dropping as it goes.
    pts = [head, tubercle]
    angle0 = math.atan2(tubercle[1] - body.yc, side * (tubercle[0] - body.xc))
    travelled = float(np.linalg.norm(tubercle - head))
    angle = angle0
    z = tubercle[2]
    prev = tubercle
    while travelled < length:
        angle -= 0.05
        dx = side * math.cos(angle)
        dy = math.sin(angle)
        skin = float(body.skin_radius(np.array(dx * 100.0), np.array(dy * 100.0), z))
        fat = float(body.fat_thickness(np.array(dx * 100.0), np.array(dy * 100.0), z))
        wall = float(body.wall_thickness(np.array(dx * 100.0), np.array(dy * 100.0)))
        # Deep under the erector spinae near the spine, then inside the wall muscles.
        depth = fat + max(6.0, 0.55 * wall) + 22.0 * math.exp(-(((angle - angle0) / 0.35) ** 2))
        r = skin - depth
        point = np.array([body.xc + dx * r, body.yc + dy * r, z])
        step = float(np.linalg.norm(point[:2] - prev[:2]))
        if step < 1e-3:
            continue
        z -= 0.32 * step
        point[2] = z
        travelled += step
        if travelled > 25.0:
            pts.append(point)
        prev = point
    return _spline(np.array(pts), 3.0)


def _paint_ribs(canvas: _Canvas, body: _Body, spine: _Spine, p: AnatomyParameters) -> None:
    lengths = {"T7": 330.0, "T8": 330.0, "T9": 320.0, "T10": 280.0, "T11": 200.0, "T12": 125.0}
    zmax = float(canvas.grid.coords(2)[-1])
    for name, length in lengths.items():
        if spine.level_z(name) - length * 0.35 > zmax + 10.0:
            continue
        for side in (-1.0, 1.0):
            path = _rib_path(body, spine, name, side, length * p.vertebra_scale)
            radius = np.full(len(path), 4.6)
            radius[-3:] = [4.0, 3.5, 3.0]
            _paint_tube(canvas, path, radius, Tissue.BONE, 0)


def _paint_pelvis(canvas: _Canvas, body: _Body, spine: _Spine) -> None:
    """Iliac crests and wings with the iliacus, in the lowest part of the field of view."""
    grid = canvas.grid
    z_crest = spine.level_z("L4") - 5.0
    zs = grid.coords(2)
    if zs[0] > z_crest:
        return
    x = grid.coords(0)[None, :]
    y = grid.coords(1)[:, None]
    dx = x - body.xc
    dy = y - body.yc
    r = np.hypot(dx, dy)
    ang = np.arctan2(dy, np.abs(dx))  # 0 lateral, +pi/2 posterior, -pi/2 anterior
    for k, z in enumerate(zs):
        zf = float(z)
        # The crest is highest postero-laterally and descends to the anterior spine.
        crest = z_crest - 30.0 * (ang - 0.6) ** 2
        below = crest - zf
        band = (ang > -0.9) & (ang < 1.25) & (below > 0)
        if not band.any():
            continue
        skin = body.skin_radius(dx, dy, zf)
        fat = body.fat_thickness(dx, dy, zf)
        centre = skin - fat - 14.0 - 0.35 * below
        bone = band & (np.abs(r - centre) < 4.0 + 0.02 * np.minimum(below, 60.0))
        iliacus = band & (r < centre - 3.5) & (r > centre - 3.5 - np.minimum(below, 18.0))
        lab = canvas.labels[k]
        comp = canvas.comp[k]
        sel = iliacus & (lab != Tissue.BONE)
        lab[sel] = Tissue.MUSCLE
        comp[sel] = 0
        lab[bone] = Tissue.BONE
        comp[bone] = 0


# --------------------------------------------------------------------------------------------
# Thorax and solid organs
# --------------------------------------------------------------------------------------------


class _Diaphragm:
    """Two domes: z of the diaphragm's upper surface as a function of (x, y)."""

    def __init__(self, p: AnatomyParameters, body: _Body) -> None:
        self.p = p
        self.body = body
        self.noise = _Noise(p.noise_seed, 5, 6, 80.0, dims=2)

    def z(self, x: Any, y: Any) -> Any:
        p = self.p
        body = self.body
        # The diaphragm's lowest attachment: the posterior costophrenic recess, higher at the
        # flanks and highest at the costal margin in front.
        uy = np.clip((y - body.yc) / (0.5 * p.body_depth), -1.0, 1.0)
        low = p.recess_z + 22.0 * (1.0 - uy) + 8.0 * (uy < 0) * (-uy)
        domes = []
        for side, top in ((-1.0, p.dome_right_z), (1.0, p.dome_left_z)):
            cx, cy = side * 0.22 * p.body_width, body.yc
            d = np.hypot((x - cx) / (0.26 * p.body_width), (y - cy) / (0.47 * p.body_depth))
            domes.append(top - (top - low) * np.clip(d, 0.0, 1.0) ** 2.5)
        # Central tendon between the domes (under the heart), a little lower than both, and
        # the crura running down along the spine behind it.
        tendon_top = min(p.dome_right_z, p.dome_left_z) - 14.0
        ty = (y - (body.yc - 0.1 * p.body_depth)) / (0.42 * p.body_depth)
        tendon = tendon_top - (tendon_top - low) * np.clip(np.abs(ty), 0.0, 1.0) ** 2.5
        tendon = tendon - 300.0 * (1.0 - np.exp(-((x / 55.0) ** 2)))
        z = np.maximum(np.maximum(domes[0], domes[1]), tendon)
        return z + 4.0 * self.noise(x, y)


def _paint_thorax(canvas: _Canvas, dia: _Diaphragm, body: _Body, p: AnatomyParameters) -> None:
    """Diaphragm muscle, lung bases in the recesses and the heart above the central tendon."""
    grid = canvas.grid
    zs = grid.coords(2)
    box = grid.box((-400, -400, p.recess_z - 20.0), (400, 400, float(zs[-1])))
    if box is None:
        return
    zd = dia.z(box.x, box.y).astype(np.float32)
    above = box.z > zd
    heart_z = min(p.dome_left_z, p.dome_right_z) + 55.0
    heart_y = body.yc - 0.22 * p.body_depth
    heart = (
        ((box.x - 20.0) / 80.0) ** 2
        + ((box.y - heart_y) / 55.0) ** 2
        + ((box.z - heart_z) / 75.0) ** 2
    ) < 1.0
    canvas.paint(box, above & heart & (box.z > zd + 6.0), Tissue.SOFT_TISSUE, 1, _allow_visceral)
    canvas.paint(box, above & ~heart & (box.z > zd + 5.0), Tissue.LUNG, 1, _allow_visceral)
    diaphragm = (box.z > zd - 5.0) & (box.z <= zd + 5.0)
    canvas.paint(box, diaphragm, Tissue.MUSCLE, 1, _allow_only(Tissue.FAT))


def _paint_liver(canvas: _Canvas, dia: _Diaphragm, p: AnatomyParameters) -> None:
    """Liver under the right dome, its right lobe tip reaching down beside the right kidney."""
    grid = canvas.grid
    rk = p.kidneys["right"]
    z_tip = rk.centre[2] + p.liver_tip_z
    box = grid.box((-250, -250, z_tip - 5.0), (p.liver_left_x + 40.0, 200, 400))
    if box is None:
        return
    noise = _Noise(p.noise_seed, 6, 8, 60.0)
    zd = dia.z(box.x, box.y).astype(np.float32) - 5.0
    x_tip = rk.centre[0] - 45.0
    y_tip = rk.centre[1] - 25.0
    # Inferior surface: lowest antero-lateral to the right kidney, rising medially and to the back.
    bottom = (
        z_tip
        + 0.55 * np.maximum(box.x - x_tip, 0.0)
        + 0.25 * np.maximum(x_tip - box.x, 0.0)
        + 0.010 * (box.y - y_tip) ** 2
        + 0.25 * np.maximum(box.y - y_tip, 0.0)
    )
    left_edge = p.liver_left_x - 0.5 * np.maximum(box.y + 20.0, 0.0) - 0.3 * (zd - box.z)
    wobble = 8.0 * noise(box.x, box.y, box.z)
    liver = (box.z < zd) & (box.z > bottom + wobble) & (box.x < left_edge + wobble)
    canvas.paint(box, liver, Tissue.LIVER, 1, _allow_only(Tissue.FAT))
    centre = np.asarray(rk.centre, float)
    if p.gallbladder is not None:
        # Gallbladder: a fluid pear in its fossa under the liver's inferior surface.
        gb = centre + np.asarray(p.gallbladder, float)
        surface = z_tip + 0.55 * max(gb[0] - x_tip, 0.0) + 0.010 * (gb[1] - y_tip) ** 2
        gb[2] = min(float(surface) + 15.0 + p.gallbladder[2], float(dia.z(gb[0], gb[1])) - 20.0)
        long_axis = np.asarray(p.gallbladder_axis, float)
        side = np.cross(long_axis, [1.0, 0.0, 0.0])
        side /= np.linalg.norm(side)
        axes = np.stack([np.cross(side, long_axis), side, long_axis], axis=1)
        radii = p.gallbladder_scale * np.array([14.0, 16.0, 30.0])
        _paint_ellipsoid(
            canvas, gb, axes, radii, Tissue.FLUID, 1, _allow_only(Tissue.LIVER, Tissue.FAT)
        )
    for dx, dy, dz, radius in p.liver_cysts:
        cyst = centre + np.array([dx, dy, dz])
        _paint_ellipsoid(
            canvas, cyst, np.eye(3), (radius,) * 3, Tissue.FLUID, 1, _allow_only(Tissue.LIVER)
        )


def _paint_spleen_stomach(canvas: _Canvas, body: _Body, p: AnatomyParameters) -> None:
    lk = p.kidneys["left"]
    # Spleen: along the left posterolateral wall above the left kidney, long axis along the
    # 10th rib (down and forwards).
    centre = np.array(
        [0.5 * p.body_width - p.fat_mm - p.wall_mm - 38.0, lk.centre[1] + 8.0, lk.centre[2] + 55.0]
    )
    long_axis = np.array([0.25, -0.55, -0.8])
    long_axis /= np.linalg.norm(long_axis)
    normal = np.array([1.0, 0.6, 0.0])
    normal -= normal.dot(long_axis) * long_axis
    normal /= np.linalg.norm(normal)
    axes = np.stack([long_axis, np.cross(normal, long_axis), normal], axis=1)
    size = p.spleen_size
    _paint_ellipsoid(
        canvas,
        centre,
        axes,
        (size / 2, size * 0.33, size * 0.25),
        Tissue.SPLEEN,
        1,
        _allow_only(Tissue.FAT),
        _Noise(p.noise_seed, 7, 6, 50.0),
        0.15,
    )
    # Stomach: left upper quadrant in front of the spleen, gas cap anteriorly (patient supine).
    st_centre = np.array([35.0, body.yc - 0.16 * p.body_depth, lk.centre[2] + 75.0])
    st_axes = np.eye(3)
    st_radii = (55.0, 40.0, 45.0)
    _paint_ellipsoid(
        canvas,
        st_centre,
        st_axes,
        st_radii,
        Tissue.BOWEL,
        1,
        _allow_only(Tissue.FAT, Tissue.LIVER),
        _Noise(p.noise_seed, 8, 6, 50.0),
        0.15,
    )
    gas_level = st_centre[1] - st_radii[1] + 2.0 * st_radii[1] * p.stomach_gas
    box = canvas.grid.box(st_centre - 70.0, st_centre + 70.0)
    if box is not None:
        lumen = canvas.labels[box.sl] == Tissue.BOWEL
        wall = ndimage.binary_erosion(lumen, iterations=max(1, round(3.0 / canvas.grid.spacing)))
        canvas.paint(box, wall & (box.y < gas_level), Tissue.GAS, 1)


# --------------------------------------------------------------------------------------------
# Bowel and vessels
# --------------------------------------------------------------------------------------------


def _paint_bowel_path(
    canvas: _Canvas,
    path: FloatArray,
    radius: FloatArray,
    gas: BoolArray,
    rng: np.random.Generator,
    bubbles: float,
) -> None:
    """A bowel tube; where ``gas`` is set, a gas pocket fills the anterior part of the lumen."""
    allow = _allow_only(Tissue.FAT, Tissue.SOFT_TISSUE)
    _paint_tube(canvas, path, radius, Tissue.BOWEL, 1, allow)
    gas_radius = radius * 0.55
    offset = np.zeros_like(path)
    offset[:, 1] = -(radius - gas_radius - 2.0)  # towards anterior (-y)
    runs = np.flatnonzero(np.diff(np.concatenate([[0], gas.astype(int), [0]])))
    for start, stop in zip(runs[::2], runs[1::2], strict=True):
        if stop - start < 2:
            continue
        sl = slice(start, stop)
        _paint_tube(
            canvas, path[sl] + offset[sl], gas_radius[sl], Tissue.GAS, 1, _allow_only(Tissue.BOWEL)
        )
    # Scattered gas bubbles in the content (stool).
    n = int(bubbles * len(path))
    for i in rng.choice(len(path), size=min(n, len(path)), replace=False) if n else []:
        jitter = rng.normal(0.0, 0.35, 3) * radius[i]
        r = float(rng.uniform(1.5, 4.0))
        centre = path[i] + jitter
        _paint_capsule(canvas, centre, centre + 0.5, r, Tissue.GAS, 1, _allow_only(Tissue.BOWEL))


def _random_gas(rng: np.random.Generator, n: int, probability: float, run: int) -> BoolArray:
    """Gas flags along a path: runs of about ``run`` samples switched on at random."""
    flags = np.zeros(n, bool)
    for start in range(0, n, run):
        if rng.random() < probability:
            flags[start : start + run] = True
    return flags


def _paint_bowel(canvas: _Canvas, body: _Body, p: AnatomyParameters) -> None:
    rng = np.random.default_rng([p.noise_seed, 11])
    zs = canvas.grid.coords(2)
    z_lo = float(zs[0]) - 40.0
    rk, lk = p.kidneys["right"], p.kidneys["left"]
    hw = 0.5 * p.body_width
    # Inner surface of the anterior abdominal wall (behind the subcutaneous fat and muscles).
    front = body.yc - body.b_front + 1.2 * p.fat_mm + p.wall_mm
    # Colon: ascending on the right, transverse sagging in front, descending on the left.
    colon_ctrl = [
        (-0.62 * hw, -15.0, z_lo),
        (-0.66 * hw, -20.0, rk.centre[2] - 40.0),
        (-0.55 * hw, -35.0, rk.centre[2] + 5.0),
        (-0.35 * hw, front + 30.0, rk.centre[2] - 10.0),
        (0.0, front + 22.0, rk.centre[2] - 55.0 + rng.uniform(-20, 20)),
        (0.35 * hw, front + 30.0, lk.centre[2] + 10.0),
        # Splenic flexure in front of the spleen's lower pole, then down the left flank.
        (0.52 * hw, lk.centre[1] - 65.0, lk.centre[2] + 20.0),
        (0.70 * hw, lk.centre[1] - 10.0, lk.centre[2] - 45.0),
        (0.66 * hw, 10.0, z_lo),
    ]
    colon = _spline(colon_ctrl, 3.0)
    s = np.arange(len(colon)) * 3.0
    base = rng.uniform(17.0, 24.0)
    radius = (
        base
        * (1.0 + 0.12 * np.cos(2.0 * np.pi * s / 24.0))
        * (1.0 + 0.15 * np.sin(s / 90.0 + rng.uniform(0, 6.28)))
    )
    gas = _random_gas(rng, len(colon), p.bowel_gas, 10)
    _paint_bowel_path(canvas, colon, radius, gas, rng, 0.08)
    # Duodenum: C-loop around the pancreatic head, in front of the right kidney's hilum.
    duo_ctrl = [
        (-15.0, front + 50.0, rk.centre[2] + 45.0),
        (-45.0, -30.0, rk.centre[2] + 30.0),
        (-50.0, -25.0, rk.centre[2] - 10.0),
        (-30.0, -30.0, rk.centre[2] - 35.0),
        (10.0, -35.0, rk.centre[2] - 40.0),
        (30.0, -40.0, rk.centre[2] - 20.0),
    ]
    duo = _spline(duo_ctrl, 3.0)
    _paint_bowel_path(
        canvas, duo, np.full(len(duo), 11.0), _random_gas(rng, len(duo), 0.3, 8), rng, 0.0
    )
    # Small bowel: meandering, mostly fluid-filled loops filling the front of the abdomen.
    lo = np.array([-0.5 * hw, front + 12.0, z_lo])
    hi = np.array([0.5 * hw, -15.0, max(rk.centre[2], lk.centre[2]) + 10.0])
    for _ in range(int(rng.integers(6, 10))):
        point = rng.uniform(lo, hi)
        heading = rng.normal(size=3)
        pts = [point.copy()]
        for _ in range(int(rng.integers(30, 55))):
            heading = heading + rng.normal(0.0, 0.6, 3)
            heading /= np.linalg.norm(heading)
            point = point + 8.0 * heading
            # Reflect at the borders of the small-bowel region.
            for a in range(3):
                if point[a] < lo[a] or point[a] > hi[a]:
                    heading[a] = -heading[a]
                    point[a] = np.clip(point[a], lo[a], hi[a])
            pts.append(point.copy())
        path = _spline(np.array(pts), 3.0)
        r = rng.uniform(11.0, 15.0) * (1.0 + 0.1 * np.sin(np.arange(len(path)) * 0.7))
        _paint_bowel_path(canvas, path, r, _random_gas(rng, len(path), 0.2, 6), rng, 0.0)


@dataclass(frozen=True)
class _Vessels:
    aorta: FloatArray  # centre line points (N, 3), top to bottom
    ivc: FloatArray


def _paint_great_vessels(canvas: _Canvas, spine: _Spine, p: AnatomyParameters) -> _Vessels:
    """Aorta, IVC and iliac vessels; pancreas and splenic vein in front of them."""
    zs = canvas.grid.coords(2)
    z_top, z_bot = float(zs[-1]) + 10.0, float(zs[0]) - 10.0
    z_bif = spine.level_z("L4") + 5.0
    z_conf = spine.level_z("L5") + 5.0
    zz = np.arange(z_top, max(z_bif, z_bot), -3.0)
    sx, sy = spine.centre(zz)
    _, hd = spine.body_size(zz)
    aorta = np.stack([sx + 12.0, sy - hd - p.aorta_mm - 3.0, zz], axis=1)
    # The aorta runs behind the diaphragmatic crura up in the chest, close to the spine.
    aorta_r = p.aorta_mm * (1.0 - 0.15 * np.clip((z_top - zz) / 250.0, 0.0, 1.0))
    _paint_tube(canvas, aorta, aorta_r, Tissue.ARTERY, 1, _allow_visceral)
    zz2 = np.arange(z_top, max(z_conf, z_bot), -3.0)
    sx2, sy2 = spine.centre(zz2)
    _, hd2 = spine.body_size(zz2)
    # The IVC climbs forwards into the liver in its upper part.
    forward = 25.0 * _smoothstep(zz2, 20.0, 90.0)
    ivc = np.stack([sx2 - 24.0, sy2 - hd2 - p.ivc_mm - 1.0 - forward, zz2], axis=1)
    _paint_tube(
        canvas, ivc, p.ivc_mm, Tissue.VEIN, 1, _allow_only(Tissue.FAT, Tissue.LIVER, Tissue.MUSCLE)
    )
    if z_bif > z_bot:
        for side in (-1.0, 1.0):
            end = aorta[-1]
            path = _spline(
                [
                    end,
                    end + np.array([side * 25.0, -5.0, -45.0]),
                    end + np.array([side * 60.0, -20, -110]),
                ]
            )
            _paint_tube(canvas, path, p.aorta_mm * 0.6, Tissue.ARTERY, 1, _allow_visceral)
    if z_conf > z_bot:
        for side in (-1.0, 1.0):
            end = ivc[-1]
            path = _spline(
                [
                    end,
                    end + np.array([side * 25.0 + 24.0 * (side > 0), 5.0, -40.0]),
                    end + np.array([side * 55.0 + 24.0 * (side > 0), -5.0, -100.0]),
                ]
            )
            _paint_tube(canvas, path, p.ivc_mm * 0.7, Tissue.VEIN, 1, _allow_visceral)
    # Pancreas (head by the duodenum, neck in front of the aorta, tail to the splenic hilum)
    # with the splenic vein along its back.
    rk, lk = p.kidneys["right"], p.kidneys["left"]
    l1y = float(spine.centre(0.0)[1])
    pan_ctrl = [
        (-40.0, l1y - 50.0, rk.centre[2] + 5.0),
        (0.0, l1y - 62.0, rk.centre[2] + 30.0),
        (45.0, l1y - 45.0, lk.centre[2] + 40.0),
        (0.27 * p.body_width - 10.0, lk.centre[1] - 5.0, lk.centre[2] + 50.0),
    ]
    pan = _spline(pan_ctrl, 3.0)
    pan_r = np.linspace(15.0, 8.0, len(pan))
    _paint_tube(canvas, pan, pan_r, Tissue.SOFT_TISSUE, 1, _allow_only(Tissue.FAT))
    vein = pan[len(pan) // 4 :] + np.array([0.0, 1.0, 0.0]) * pan_r[len(pan) // 4 :, None] * 0.9
    _paint_tube(canvas, vein, 4.5, Tissue.VEIN, 1, _allow_only(Tissue.FAT, Tissue.SOFT_TISSUE))
    # Superior mesenteric artery in front of the aorta, behind the pancreatic neck.
    i_sma = int(np.argmin(np.abs(aorta[:, 2] - (lk.centre[2] + 35.0))))
    sma0 = aorta[i_sma] + np.array([0.0, -p.aorta_mm, 0.0])
    sma = _spline(
        [sma0, sma0 + np.array([0.0, -18.0, -20.0]), sma0 + np.array([-5.0, -30.0, -110.0])]
    )
    _paint_tube(canvas, sma, 3.5, Tissue.ARTERY, 1, _allow_only(Tissue.FAT, Tissue.SOFT_TISSUE))
    return _Vessels(aorta, ivc)


# --------------------------------------------------------------------------------------------
# Kidneys
# --------------------------------------------------------------------------------------------


def _kidney_local(box: _Box, centre: FloatArray, axes: FloatArray) -> tuple[Any, Any, Any]:
    dx, dy, dz = box.x - centre[0], box.y - centre[1], box.z - centre[2]
    out = []
    for i in range(3):
        ax = axes[:, i].astype(np.float32)
        out.append(dx * ax[0] + dy * ax[1] + dz * ax[2])
    return out[0], out[1], out[2]


def _kidney_implicit(k: KidneyParameters, a: Any, b: Any, c: Any, noise: _Noise) -> Any:
    """Bean implicit function: < 1 inside. a, b, c are local mm (long, to hilum, thickness)."""
    A, B, C = k.length / 2, k.width / 2, k.thickness / 2
    an = a / A
    # Bend: the poles lean towards the hilum, so the medial border is concave.
    bb = b - k.bend * B * an**2
    Bt = B * (1.0 + k.taper * an)
    f = an**2 + (bb / Bt) ** 2 + (c / C) ** 2
    # Hilar notch: pushes the surface in around the hilum.
    notch = (
        k.notch
        * np.exp(-((an / 0.38) ** 2) - ((c / (0.65 * C)) ** 2))
        * _smoothstep(bb / Bt, 0.0, 0.9)
    )
    f = f + notch
    return f + k.shape_noise * noise(an * 40.0, b / B * 40.0, c / C * 40.0)


def _paint_perirenal(canvas: _Canvas, k: KidneyParameters) -> None:
    axes = k.axes()
    centre = np.asarray(k.centre)
    m = k.perirenal_mm
    reach = k.length / 2 + m + 10.0
    box = canvas.grid.box(centre - reach, centre + reach)
    if box is None:
        return
    a, b, c = _kidney_local(box, centre, axes)
    # Gerota's fascia: a smooth envelope, roomier at the lower pole and laterally.
    A = k.length / 2 + m * (1.0 + 0.5 * (a < 0))
    B = k.width / 2 + m * (1.0 + 0.3 * (b < 0))
    C = k.thickness / 2 + m * 0.8
    noise = _Noise(k.noise_seed, 2, 6, 40.0)
    f = (a / A) ** 2 + (b / B) ** 2 + (c / C) ** 2 + 0.08 * noise(box.x, box.y, box.z)
    canvas.paint(box, f < 1.0, Tissue.FAT, 1, _allow_visceral)


def _hilum_point(k: KidneyParameters, depth: float = 0.0) -> FloatArray:
    """World position of the hilum opening (``depth`` mm outside the kidney surface)."""
    axes = k.axes()
    b = k.width / 2 * (1.0 - k.notch * 0.9) + depth
    return np.asarray(k.centre) + axes[:, 1] * b


def _paint_renal_vessels(
    canvas: _Canvas, k: KidneyParameters, vessels: _Vessels, p: AnatomyParameters
) -> None:
    hilum = _hilum_point(k, 0.0)
    axes = k.axes()
    inside = hilum - axes[:, 1] * 10.0
    through = (Tissue.FAT, Tissue.MUSCLE, Tissue.SOFT_TISSUE, Tissue.BOWEL, Tissue.LIVER)
    allow = _allow_only(*through)
    # Artery: from the aorta's side, behind the IVC on the right, to the back of the hilum.
    ia = int(np.argmin(np.abs(vessels.aorta[:, 2] - (k.centre[2] + 12.0))))
    origin = vessels.aorta[ia].copy()
    side = -1.0 if k.side == "right" else 1.0
    origin[0] += side * p.aorta_mm * 0.8
    art_end = inside + axes[:, 2] * (2.0 if k.side == "left" else -2.0) + np.array([0, 4.0, 0])
    ctrl = [origin]
    if k.side == "right":
        iv = int(np.argmin(np.abs(vessels.ivc[:, 2] - origin[2])))
        ctrl.append(vessels.ivc[iv] + np.array([0.0, p.ivc_mm + 5.0, -3.0]))
    ctrl.append(hilum + np.array([0.0, 6.0, 0.0]) + axes[:, 1] * 12.0)
    ctrl.append(art_end)
    _paint_tube(canvas, _spline(ctrl, 2.0), 3.0, Tissue.ARTERY, 1, allow)
    # Vein: from the front of the hilum to the IVC; the left one crosses in front of the aorta.
    iv = int(np.argmin(np.abs(vessels.ivc[:, 2] - (k.centre[2] + 8.0))))
    target = vessels.ivc[iv].copy()
    ctrl = [inside + np.array([0.0, -4.0, 0.0]), hilum + axes[:, 1] * 12.0 + np.array([0, -6.0, 0])]
    if k.side == "left":
        ctrl.append(vessels.aorta[ia] + np.array([-2.0, -(p.aorta_mm + 6.0), 0.0]))
    ctrl.append(target)
    _paint_tube(
        canvas, _spline(ctrl, 2.0), 4.5, Tissue.VEIN, 1, _allow_only(*through, Tissue.ARTERY)
    )


def _paint_adrenal(canvas: _Canvas, k: KidneyParameters) -> None:
    axes = k.axes()
    top = np.asarray(k.centre) + axes[:, 0] * (k.length / 2 + 6.0) + axes[:, 1] * 14.0
    radii = (16.0, 12.0, 3.5)
    frame = np.stack([axes[:, 0], axes[:, 1], axes[:, 2]], axis=1)
    _paint_ellipsoid(canvas, top, frame, radii, Tissue.SOFT_TISSUE, 1, _allow_only(Tissue.FAT))


def _paint_kidney(canvas: _Canvas, k: KidneyParameters) -> None:
    """Cortex, pyramids, columns of Bertin, sinus fat and collecting system of one kidney.

    The organ is evaluated on its bounding box; the inner structure only on the organ's voxels
    (flattened), in the kidney's local frame (a along the long axis, b towards the hilum, c
    across the thickness).
    """
    grid = canvas.grid
    h = grid.spacing
    axes = k.axes()
    centre = np.asarray(k.centre, float)
    reach = k.length / 2 * 1.1 + 4.0
    box = grid.box(centre - reach, centre + reach)
    if box is None:
        return
    a3, b3, c3 = _kidney_local(box, centre, axes)
    organ = _kidney_implicit(k, a3, b3, c3, _Noise(k.noise_seed, 1, 8, 35.0)) < 1.0
    organ &= canvas.labels[box.sl] != Tissue.BONE
    if not organ.any():
        return
    depth3 = ndimage.distance_transform_edt(organ, sampling=h).astype(np.float32)
    sel = np.nonzero(organ)
    a, b, c, depth = a3[sel], b3[sel], c3[sel], depth3[sel]
    wx, wy, wz = box.x[0, 0, sel[2]], box.y[0, sel[1], 0], box.z[sel[0], 0, 0]
    A, B, C = k.length / 2, k.width / 2, k.thickness / 2
    rng = np.random.default_rng([k.noise_seed, 3])
    # Renal sinus: an irregular cavity centred towards the hilum, never closer to the surface
    # than the parenchyma thickness (except at the hilar opening, the channel).
    pt = min(k.parenchyma_mm, C - 4.0)
    lateral = 1.0 - k.lateral_parenchyma_mm / (2.0 * B)  # half extent across the width
    ellipsoid = (
        (a / (0.70 * A)) ** 2
        + ((b - (1.0 - lateral) * B) / (lateral * B)) ** 2
        + (c / (0.9 * C)) ** 2
    )
    wobble = _Noise(k.noise_seed, 4, 8, 18.0)(wx, wy, wz)
    sinus_core = (ellipsoid < 1.0 + 0.15 * wobble) & (depth > pt + 1.5 * wobble)
    channel = (b > 0.25 * B) & ((a / (0.30 * A)) ** 2 + (c / (0.42 * C)) ** 2 < 1.0)
    sinus = sinus_core | channel
    labels = np.full(a.shape, np.uint8(Tissue.CORTEX))
    labels[sinus] = Tissue.SINUS_FAT
    # Pyramids: cones with their papilla at the sinus border, pointing into it, base at the
    # cortico-medullary junction; cortex left between them forms the columns of Bertin.
    directions = _pyramid_directions(k, rng)
    sinus3 = np.zeros(organ.shape, np.float32)
    sinus3[sel] = sinus
    tan2 = math.tan(math.radians(k.pyramid_half_angle_deg)) ** 2
    medulla = np.zeros(a.shape, bool)
    papillae = []
    for origin, e in directions:
        # March from inside the sinus outwards to the sinus border: the papilla.
        steps = np.arange(0.0, 60.0, 0.5 * h)
        pts_local = origin[None, :] + steps[:, None] * e[None, :]
        idx = _world_to_index(grid, box, centre[None, :] + pts_local @ axes.T)
        inside = ndimage.map_coordinates(sinus3, idx, order=1, mode="constant", cval=0.0)
        outside = np.flatnonzero(inside < 0.5)
        first = int(outside[0]) if len(outside) else 0
        papilla = pts_local[max(first - 1, 0)]
        papillae.append((papilla, origin))
        ra, rb, rc = a - papilla[0], b - papilla[1], c - papilla[2]
        hh = ra * e[0] + rb * e[1] + rc * e[2]
        rho2 = (ra - hh * e[0]) ** 2 + (rb - hh * e[1]) ** 2 + (rc - hh * e[2]) ** 2
        medulla |= (hh > -2.5) & (hh < pt + 6.0) & (rho2 < (hh + 2.5) ** 2 * tan2)
    medulla &= depth > k.cortex_mm
    labels[medulla] = Tissue.MEDULLA
    # Collecting system: pelvis at the hilum, major calyces to the poles, minor calyces cupping
    # each papilla; never through the cortex.
    local = np.stack([a, b, c], axis=1)
    allowed = sinus | (depth > 0.6 * k.cortex_mm)
    collecting = np.zeros(a.shape, bool)
    pelvis = np.array([0.0, 0.45 * B, 0.0])
    radii = np.array([1.5, 1.4, 0.8]) * k.pelvis_mm
    collecting |= np.sum(((local - pelvis) / radii) ** 2, axis=1) < 1.0
    upper = np.array([0.45 * A, 0.1 * B, 0.0])
    lower = np.array([-0.45 * A, 0.1 * B, 0.0])
    for end in (upper, lower):
        collecting |= _near_segment(local, pelvis, end, k.calyx_mm * 1.1)
    for papilla, origin in papillae:
        stem = upper if origin[0] > 0.15 * A else lower if origin[0] < -0.15 * A else pelvis
        towards = (papilla - origin) / max(float(np.linalg.norm(papilla - origin)), 1e-6)
        collecting |= _near_segment(local, stem, papilla - 1.5 * towards, k.calyx_mm) & ~medulla
    labels[collecting & allowed] = Tissue.COLLECTING
    canvas.labels[box.sl][sel] = labels
    canvas.comp[box.sl][sel] = 1
    canvas.side[box.sl][sel] = SIDE_VALUES[k.side]


def _pyramid_directions(
    k: KidneyParameters, rng: np.random.Generator
) -> list[tuple[FloatArray, FloatArray]]:
    """(origin inside the sinus, unit direction) of each pyramid, in kidney-local mm.

    Two polar (compound) pyramids, the others in three rows (posterior, lateral, anterior)
    spread along the sinus.
    """
    A, B = k.length / 2, k.width / 2
    out = []
    n_mid = k.n_pyramids - 2
    row_of = [(i % 3) - 1 for i in range(n_mid)]
    for row in (-1, 0, 1):
        count = row_of.count(row)
        if count == 0:
            continue
        ts = np.linspace(-0.5, 0.5, count + 2)[1:-1] if count > 1 else np.zeros(1)
        for t0 in ts:
            t = float(np.clip(t0 + 0.12 * row + rng.normal(0.0, 0.03), -0.6, 0.6))
            psi = math.radians(row * rng.uniform(45.0, 65.0) + rng.normal(0.0, 6.0))
            e = np.array([0.25 * t, -math.cos(psi), math.sin(psi)])
            out.append((np.array([t * A, 0.2 * B, 0.0]), e / np.linalg.norm(e)))
    for sign in (1.0, -1.0):
        e = np.array([sign * 1.0, -0.3, rng.normal(0.0, 0.15)])
        out.append((np.array([sign * 0.45 * A, 0.1 * B, 0.0]), e / np.linalg.norm(e)))
    return out


def _near_segment(points: FloatArray, p0: FloatArray, p1: FloatArray, radius: float) -> BoolArray:
    """Points (N, 3) within ``radius`` of segment p0-p1."""
    d = p1 - p0
    dd = float(d.dot(d)) or 1e-6
    rel = points - p0
    t = np.clip(rel @ d / dd, 0.0, 1.0)
    dist2 = np.sum((rel - t[:, None] * d[None, :]) ** 2, axis=1)
    return np.asarray(dist2 < radius**2)


def _world_to_index(grid: _Grid, box: _Box, pts: FloatArray) -> FloatArray:
    """(3, N) continuous (z, y, x) indices into a box's arrays for world points (N, 3)."""
    z0 = float(box.z[0, 0, 0])
    y0 = float(box.y[0, 0, 0])
    x0 = float(box.x[0, 0, 0])
    s = grid.spacing
    return np.stack([(pts[:, 2] - z0) / s, (pts[:, 1] - y0) / s, (pts[:, 0] - x0) / s], axis=0)


# --------------------------------------------------------------------------------------------
# Measuring kidneys
# --------------------------------------------------------------------------------------------


def kidney_info_from_mask(
    mask: NDArray[np.bool_],
    origin: ArrayLike3,
    spacing: float,
    side: str,
    axes: FloatArray | None = None,
    hilum_point: FloatArray | None = None,
) -> KidneyInfo:
    """Measure a kidney from its mask on an identity-direction isotropic grid.

    Args:
        mask: Boolean array indexed [z, y, x].
        origin: World position (x, y, z) of voxel [0, 0, 0].
        spacing: Isotropic voxel size (mm).
        side: ``"right"`` or ``"left"``.
        axes: Known axes (columns long, width, thickness); None estimates them by principal
            component analysis of the voxel positions.
        hilum_point: A world point at the hilum (e.g. the sinus centroid), used to orient the
            width axis; without it the width axis points towards the midline (x = 0) and
            anteriorly.

    Returns:
        Centroid, axes, extents along the axes and hilum direction.

    Raises:
        ValueError: If the mask is empty.

    Example:
        >>> m = np.zeros((40, 30, 30), bool); m[5:35, 8:22, 10:20] = True
        >>> round(kidney_info_from_mask(m, (0, 0, 0), 1.0, "left").length)
        30
    """
    idx = np.argwhere(mask)
    if len(idx) == 0:
        raise ValueError(f"empty {side} kidney mask")
    pts = idx[:, ::-1] * float(spacing) + np.asarray(origin, float)[None, :]
    centroid = pts.mean(axis=0)
    rel = pts - centroid
    if axes is None:
        _, vecs = np.linalg.eigh(np.cov(rel.T))
        long_axis = vecs[:, 2] * (1.0 if vecs[2, 2] >= 0 else -1.0)
        second = vecs[:, 1]
        if hilum_point is not None:
            towards = np.asarray(hilum_point, float) - centroid
        else:
            towards = np.array([-centroid[0], -abs(centroid[0]) * 0.5, 0.0])
        towards -= towards.dot(long_axis) * long_axis
        if np.linalg.norm(towards) < 1e-6:
            towards = second
        # The width axis is the in-plane principal axis, signed towards the hilum.
        width_axis = second * (1.0 if second.dot(towards) >= 0 else -1.0)
        axes = np.stack([long_axis, width_axis, np.cross(long_axis, width_axis)], axis=1)
    proj = rel @ axes
    extent = proj.max(axis=0) - proj.min(axis=0) + float(spacing)
    return KidneyInfo(
        side=side,
        centroid_world=centroid,
        axes=np.asarray(axes, float),
        length=float(extent[0]),
        width=float(extent[1]),
        thickness=float(extent[2]),
        hilum_direction=np.asarray(axes, float)[:, 1].copy(),
    )


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def _make_grid(p: AnatomyParameters, body: _Body, spacing: float) -> _Grid:
    kz = [k.centre[2] for k in p.kidneys.values()]
    z_lo = min(kz) - _SI_MARGIN_MM
    z_hi = max(kz) + _SI_MARGIN_MM
    half_w = float(body.half_width(z_lo)) * 1.04 + _BODY_MARGIN_MM
    lo = np.array([body.xc - half_w, body.yc - body.b_front * 1.04 - _BODY_MARGIN_MM, z_lo])
    hi = np.array([body.xc + half_w, body.yc + body.b_back * 1.04 + _BODY_MARGIN_MM, z_hi])
    # Voxel centres on multiples of the spacing, so world 0 is a voxel centre at every spacing.
    i_lo = np.floor(lo / spacing)
    i_hi = np.ceil(hi / spacing)
    shape = (i_hi - i_lo + 1).astype(int)
    origin = tuple(float(v) for v in i_lo * spacing)
    return _Grid(origin, float(spacing), (int(shape[2]), int(shape[1]), int(shape[0])))  # type: ignore[arg-type]


def build_anatomy(
    params: AnatomyParameters, *, spacing: float = 1.0, seed: int | None = None
) -> Anatomy:
    """Rasterise sampled parameters into an :class:`Anatomy`.

    Args:
        params: From :func:`sample_anatomy_parameters`.
        spacing: Isotropic voxel size in mm (1.0 for rendering, 2-3 for quick tests).
        seed: Recorded in the result.

    Returns:
        The anatomy; its arrays depend only on ``params`` and ``spacing``.

    Raises:
        ValueError: If ``spacing`` is not positive and finite.

    Example:
        >>> p = sample_anatomy_parameters(np.random.default_rng(0))
        >>> build_anatomy(p, spacing=3.0).labels.GetSpacing()
        (3.0, 3.0, 3.0)
    """
    if not (math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"spacing must be a positive number of mm, got {spacing!r}")
    spine = _make_spine(params)
    body = _Body(params, spine)
    grid = _make_grid(params, body, spacing)
    canvas = _Canvas(grid)
    _paint_body(canvas, body, spine)
    _paint_pelvis(canvas, body, spine)
    _paint_spine(canvas, spine, params)
    _paint_psoas(canvas, spine, params)
    _paint_ribs(canvas, body, spine, params)
    dia = _Diaphragm(params, body)
    _paint_thorax(canvas, dia, body, params)
    _paint_liver(canvas, dia, params)
    _paint_spleen_stomach(canvas, body, params)
    _paint_bowel(canvas, body, params)
    vessels = _paint_great_vessels(canvas, spine, params)
    for k in params.kidneys.values():
        _paint_perirenal(canvas, k)
    for k in params.kidneys.values():
        _paint_adrenal(canvas, k)
        _paint_renal_vessels(canvas, k, vessels, params)
    for k in params.kidneys.values():
        _paint_kidney(canvas, k)

    kidneys = {}
    for side in SIDES:
        mask = canvas.side == SIDE_VALUES[side]
        if mask.any():
            kidneys[side] = kidney_info_from_mask(
                mask, grid.origin, spacing, side, axes=params.kidneys[side].axes()
            )
    images = []
    for array in (canvas.labels, canvas.side, canvas.comp):
        image = sitk.GetImageFromArray(array)
        image.SetOrigin(grid.origin)
        image.SetSpacing((spacing,) * 3)
        images.append(image)
    metadata = {
        "parameters": params.to_dict(),
        "vertebra_z": {n: float(z) for n, z in zip(spine.names, spine.z, strict=True)},
        "world_frame": "LPS mm, identity direction; origin at the centre of the L1 vertebral body",
    }
    return Anatomy(
        labels=images[0],
        kidney_side=images[1],
        compartment=images[2],
        kidneys=kidneys,
        seed=seed,
        source="procedural",
        metadata=metadata,
    )


def generate_anatomy(
    seed: int, *, spacing: float = 1.0, rng: np.random.Generator | None = None
) -> Anatomy:
    """A procedural abdomen for ``seed`` (identical arrays for identical seed and spacing).

    Args:
        seed: Patient seed.
        spacing: Isotropic voxel size in mm.
        rng: Generator to draw the parameters from instead of ``default_rng(seed)`` (the seed
            is then only recorded).

    Returns:
        The :class:`Anatomy`.

    Example:
        >>> anatomy = generate_anatomy(7, spacing=3.0)
        >>> sorted(anatomy.kidneys)
        ['left', 'right']
    """
    generator = rng if rng is not None else np.random.default_rng(seed)
    return build_anatomy(sample_anatomy_parameters(generator), spacing=spacing, seed=seed)
