"""B-mode rendering of a curvilinear probe's frames from a tissue label map.

The renderer follows the physics a sonographer reads in an image, in the beam (polar) domain of
the probe (angle x depth), then scan-converts to the Cartesian frame:

1. Tissue on each frame. The body wall is fixed to the skin and the probe, the visceral
   compartment slides under it with breathing: the label map is sampled with the probe pose for the
   body wall and with the breathing-displaced pose ``M_k`` for the viscera (both through
   :func:`kidneyreg.geometry.resample_on_frames`, nearest neighbour), then looked up along the
   beams.
2. Scatterers attached to tissue. A complex random field is defined in the tissue's own
   coordinates (the probe's frame at end-expiration), so speckle moves with the kidney and
   decorrelates only with out-of-plane motion (its correlation length across the plane is the
   elevational beam width). A smooth random texture modulates it. Each tissue scales it by its
   echogenicity (:mod:`kidneyreg.simulate.tissues`).
3. Specular reflections where the acoustic impedance jumps, scaled by the reflection coefficient
   and by how perpendicular the boundary is to the beam (the beam is radial from the apex).
4. Along each beam (cumulative sums over depth): two-way transmission through every interface
   (near zero behind bone, gas, lung and the air at the skin: acoustic shadows), two-way
   attenuation from each tissue's coefficient, a reverberation tail behind gas; time-gain
   compensation that makes up for most, not all, of the typical attenuation, so fluid, which
   attenuates little, leaves posterior enhancement.
5. A depth-dependent point spread function (short axially, widening laterally away from the
   focus) on the complex echo, thermal noise, the envelope (Rayleigh statistics in diffuse
   tissue), scan conversion, log compression over a 50-60 dB dynamic range to 8 bits; 0 outside
   the fan.

Everything is vectorised numpy over a chunk of frames; the only Python loops are over frames for
SimpleITK resampling and scatterer lookup.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from kidneyreg.geometry import invert_rigid, resample_on_frames
from kidneyreg.simulate.probe import ProbeGeometry
from kidneyreg.simulate.tissues import KIDNEY_TISSUES, TISSUES, Tissue

__all__ = ["AcousticParameters", "RandomAcoustics", "UltrasoundRenderer"]

_N_LABELS = 32  # label values are < 32; the compartment is packed above them (see _pack)
_GAS_LIKE = (int(Tissue.GAS), int(Tissue.LUNG))
# Depth (mm) below the array within which surface gas is pressed out by the probe.
_COUPLING_MM = 10.0
# Echogenicity of fat in the visceral compartment, relative to liver (sonographically,
# perirenal and mesenteric fat are brighter than liver, renal sinus fat brighter still).
_VISCERAL_FAT_ECHO = 1.5
# Smoothing (mm) of the impedance map before its gradient gives the boundaries' orientation.
_NORMAL_SMOOTH_MM = 1.5
# Decay length (mm) of the ring-down behind gas.
_RINGDOWN_MM = 5.0
# Fraction of the specular strength reflected whatever the boundary's angle (rough interfaces).
_DIFFUSE_FLOOR = 0.15
# Specular strength: amplitude of a perpendicular boundary with reflection coefficient 1,
# relative to the mean diffuse amplitude of liver. A soft-tissue/fat boundary (R ~ 0.09) then
# is about as bright as liver speckle but continuous, bone and gas saturate.
_SPECULAR_GAIN = 14.0


@dataclass(frozen=True)
class AcousticParameters:
    """Per-case acoustic settings (all randomness of the renderer is fixed here).

    Attributes:
        echogenicity: Backscatter amplitude per label value (liver ~ 1).
        attenuation: Attenuation per label value, dB / (cm MHz).
        impedance: Acoustic impedance per label value, MRayl.
        dynamic_range_db: Displayed dynamic range of the log compression.
        grey_level: Grey (0-1) of the median diffuse tissue echo.
        tgc_fraction: Fraction of the typical attenuation the time-gain compensation restores.
        tgc_ripple_db: Slider gains (dB) at equally spaced depths, interpolated smoothly.
        noise_db: Thermal noise level at the deepest depth after time-gain compensation, relative
            to the diffuse echo of liver (dB).
        axial_psf_mm: Axial Gaussian width (sigma) of the point spread function.
        lateral_psf_mm: Lateral sigma at the focus.
        lateral_growth: Lateral sigma growth per mm away from the focus.
        smoothing_mm: Width (sigma) of the scanner's speckle reduction: incoherent averaging of
            the echo intensity, as spatial compounding and speckle-reduction filters do.
        elevation_mm: Correlation length of the scatterers across the image plane.
        texture_db: Standard deviation of the smooth echogenicity texture (dB).
        texture_mm: Correlation length of that texture.
        seed: Seed of the scatterer field and the noise.
    """

    echogenicity: tuple[float, ...]
    attenuation: tuple[float, ...]
    impedance: tuple[float, ...]
    dynamic_range_db: float
    grey_level: float
    tgc_fraction: float
    tgc_ripple_db: tuple[float, ...]
    noise_db: float
    axial_psf_mm: float
    lateral_psf_mm: float
    lateral_growth: float
    smoothing_mm: float
    elevation_mm: float
    texture_db: float
    texture_mm: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dictionary."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = [float(v) for v in value]
        return data


@dataclass(frozen=True)
class RandomAcoustics:
    """Sampler of :class:`AcousticParameters`: tissue values from the shared table, varied a little.

    The echogenicity varies by about 5 % per tissue and case (small enough to keep the order
    sinus fat > liver ~ spleen >= cortex > medulla > fluid), attenuation by about 10 %.

    Example:
        >>> params = RandomAcoustics().sample(np.random.default_rng(0))
        >>> 50.0 <= params.dynamic_range_db <= 60.0
        True
    """

    echo_sd: float = 0.05
    attenuation_sd: float = 0.10
    dynamic_range_db: tuple[float, float] = (50.0, 60.0)

    def sample(self, rng: np.random.Generator) -> AcousticParameters:
        """Draw one set of acoustic parameters."""
        echo = np.zeros(_N_LABELS)
        atten = np.zeros(_N_LABELS)
        imped = np.full(_N_LABELS, TISSUES[Tissue.SOFT_TISSUE].impedance)
        echo[:] = TISSUES[Tissue.SOFT_TISSUE].echogenicity
        atten[:] = TISSUES[Tissue.SOFT_TISSUE].attenuation
        for tissue, props in TISSUES.items():
            echo[int(tissue)] = props.echogenicity * math.exp(
                float(np.clip(rng.normal(0.0, self.echo_sd), -2 * self.echo_sd, 2 * self.echo_sd))
            )
            atten[int(tissue)] = props.attenuation * math.exp(
                float(np.clip(rng.normal(0.0, self.attenuation_sd), -0.25, 0.25))
            )
            imped[int(tissue)] = props.impedance
        return AcousticParameters(
            echogenicity=tuple(float(v) for v in echo),
            attenuation=tuple(float(v) for v in atten),
            impedance=tuple(float(v) for v in imped),
            dynamic_range_db=float(rng.uniform(*self.dynamic_range_db)),
            grey_level=float(rng.uniform(0.38, 0.46)),
            tgc_fraction=float(rng.uniform(0.9, 0.98)),
            tgc_ripple_db=tuple(float(v) for v in rng.normal(0.0, 1.5, 6)),
            noise_db=float(rng.uniform(-30.0, -20.0)),
            axial_psf_mm=float(rng.uniform(0.35, 0.5)),
            lateral_psf_mm=float(rng.uniform(0.6, 0.9)),
            lateral_growth=float(rng.uniform(0.005, 0.01)),
            smoothing_mm=float(rng.uniform(0.7, 1.0)),
            elevation_mm=float(rng.uniform(1.5, 3.0)),
            texture_db=float(rng.uniform(1.0, 2.0)),
            texture_mm=float(rng.uniform(4.0, 8.0)),
            seed=int(rng.integers(0, 2**31 - 1)),
        )


def _pack(labels: sitk.Image, compartment: sitk.Image | None) -> sitk.Image:
    """Labels and compartment in one uint8 volume (label + 32 * compartment): one resampling."""
    if compartment is None:
        # Without a compartment map everything moves with the kidney.
        return sitk.Cast(labels, sitk.sitkUInt8) + _N_LABELS
    array = sitk.GetArrayViewFromImage(labels).astype(np.uint8)
    comp = sitk.GetArrayViewFromImage(compartment)
    if comp.shape != array.shape:
        raise ValueError("labels and compartment must share one grid")
    packed = sitk.GetImageFromArray(array + (comp > 0).astype(np.uint8) * _N_LABELS)
    packed.CopyInformation(labels)
    return packed


class UltrasoundRenderer:
    """Render B-mode frames of one probe placement on one label map.

    Args:
        labels: Tissue label map (uint8, :class:`~kidneyreg.simulate.tissues.Tissue` values) in
            CT world.
        geometry: The probe (field of view, frequency, focus, pixel size).
        probe_matrix: ``M_probe``, the frame pose at end-expiration (U/S image mm -> world mm);
            the body wall is always sampled with it.
        params: Acoustic parameters of the case.
        compartment: Same grid as ``labels``; 1 = viscera (move with breathing), 0 = body wall
            (fixed to the probe). ``None``: everything moves.

    Example:
        >>> renderer = UltrasoundRenderer(labels, geometry, m_probe, params)  # doctest: +SKIP
        >>> frames = renderer.render(matrices)  # (n, rows, cols) uint8  # doctest: +SKIP
    """

    def __init__(
        self,
        labels: sitk.Image,
        geometry: ProbeGeometry,
        probe_matrix: ArrayLike,
        params: AcousticParameters,
        *,
        compartment: sitk.Image | None = None,
    ) -> None:
        self.geometry = geometry
        self.params = params
        self.probe_matrix = np.asarray(probe_matrix, dtype=np.float64)
        self._inv_probe = invert_rigid(self.probe_matrix)
        self._packed = _pack(labels, compartment)
        self.frame_shape = geometry.frame_shape
        self.pixel_size = (geometry.pixel_size, geometry.pixel_size)
        self._echo = np.asarray(params.echogenicity, dtype=np.float32)
        self._atten = np.asarray(params.attenuation, dtype=np.float32)
        self._imped = np.asarray(params.impedance, dtype=np.float32)
        self._visceral_fat_echo = _VISCERAL_FAT_ECHO * float(
            self._echo[int(Tissue.SINUS_FAT)] / TISSUES[Tissue.SINUS_FAT].echogenicity
        )
        self._setup_polar()
        self._setup_scatterers()
        static = resample_on_frames(
            self._packed,
            self.probe_matrix[None],
            self.frame_shape,
            self.pixel_size,
            interpolator="nearest",
            default_value=0,
        )[0]
        self._static_labels = (static % _N_LABELS).astype(np.uint8)
        self._static_compartment = static >= _N_LABELS
        self._static_polar_moving = self._static_compartment.reshape(-1)[self._polar_index]
        self._static_scatter = self._scatter_at(np.eye(4), np.ones(self._n_polar, dtype=bool))
        self._tgc = np.ones(self._n_r, dtype=np.float32)
        self._reference = 1.0
        self._calibrate()

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------

    def _setup_polar(self) -> None:
        geo = self.geometry
        px = geo.pixel_size
        # Radial sampling at half a pixel, beams spaced by at most one pixel at the bottom.
        self._dr = px / 2.0
        self._n_r = math.ceil(geo.depth_mm / self._dr)
        outer = geo.radius_mm + geo.depth_mm
        self._n_beams = math.ceil(2.0 * geo.half_angle * outer / px) + 1
        self._theta = np.linspace(-geo.half_angle, geo.half_angle, self._n_beams)
        self._dtheta = float(self._theta[1] - self._theta[0])
        self._r = geo.radius_mm + (np.arange(self._n_r) + 0.5) * self._dr
        u_c, v_a = geo.apex
        theta, r = np.meshgrid(self._theta, self._r, indexing="ij")
        self._polar_u = (u_c + r * np.sin(theta)).ravel()
        self._polar_v = (v_a + r * np.cos(theta)).ravel()
        rows, cols = self.frame_shape
        row = np.clip(np.rint(self._polar_v / px), 0, rows - 1).astype(np.int64)
        col = np.clip(np.rint(self._polar_u / px), 0, cols - 1).astype(np.int64)
        self._polar_index = row * cols + col
        mid = geo.radius_mm + 0.5 * geo.depth_mm
        self._smooth_beams = _NORMAL_SMOOTH_MM / (mid * self._dtheta)
        self._n_polar = self._n_beams * self._n_r
        # Scan conversion: fractional polar indices of every fan pixel, bilinear weights.
        self._fan = geo.fan_mask().astype(bool)
        v, u = np.nonzero(self._fan)
        pt, pr = geo.polar_of(u * px, v * px)
        bi = np.clip((pt + geo.half_angle) / self._dtheta, 0, self._n_beams - 1.0)
        rj = np.clip((pr - geo.radius_mm) / self._dr - 0.5, 0, self._n_r - 1.0)
        b0 = np.minimum(np.floor(bi).astype(np.int64), self._n_beams - 2)
        r0 = np.minimum(np.floor(rj).astype(np.int64), self._n_r - 2)
        fb = (bi - b0).astype(np.float32)
        fr = (rj - r0).astype(np.float32)
        self._sc_index = np.stack(
            [
                b0 * self._n_r + r0,
                b0 * self._n_r + r0 + 1,
                (b0 + 1) * self._n_r + r0,
                (b0 + 1) * self._n_r + r0 + 1,
            ]
        )
        self._sc_weight = np.stack(
            [(1 - fb) * (1 - fr), (1 - fb) * fr, fb * (1 - fr), fb * fr]
        ).astype(np.float32)
        self._fan_flat = np.nonzero(self._fan.ravel())[0]

    def _setup_scatterers(self) -> None:
        """Complex scatterer field on a lattice in the probe's end-expiration frame (u, v, w)."""
        p = self.params
        geo = self.geometry
        rng = np.random.default_rng([p.seed, 1])
        rows, cols = self.frame_shape
        margin = 30.0  # mm of room for the breathing motion in the plane
        self._lat_h = np.array([geo.pixel_size, geo.pixel_size / 2.0, p.elevation_mm])
        self._lat_origin = np.array([-margin, -margin, 0.0])
        extent = np.array([cols * geo.pixel_size + 2 * margin, rows * geo.pixel_size + 2 * margin])
        nu, nv = (np.ceil(extent / self._lat_h[:2]).astype(int) + 1).tolist()
        nw = 12  # periodic across the plane: only differences of a few mm matter
        shape = (nu, nv, nw)
        real = rng.standard_normal(shape, dtype=np.float32)
        imag = rng.standard_normal(shape, dtype=np.float32)
        # Smooth multiplicative texture (dB), correlation length texture_mm in the plane.
        coarse_h = p.texture_mm
        coarse_shape = (
            math.ceil(nu * self._lat_h[0] / coarse_h) + 2,
            math.ceil(nv * self._lat_h[1] / coarse_h) + 2,
            3,
        )
        coarse = rng.standard_normal(coarse_shape).astype(np.float32)
        zoom = [shape[i] / coarse_shape[i] for i in range(3)]
        texture = ndimage.zoom(coarse, zoom, order=1, mode="grid-wrap", grid_mode=True)
        texture = texture[:nu, :nv, :nw]
        texture /= max(float(texture.std()), 1e-6)
        gain = (10.0 ** (p.texture_db * texture / 20.0)).astype(np.float32)
        # Normalise to unit mean power so that echogenicity is an amplitude relative to liver.
        self._scat_re = real * gain / math.sqrt(2.0)
        self._scat_im = imag * gain / math.sqrt(2.0)

    def _scatter_at(
        self, tissue_matrix: NDArray[np.float64], select: NDArray[np.bool_]
    ) -> NDArray[np.complex64]:
        """Scatterer amplitudes at the polar samples ``select`` seen through ``tissue_matrix``.

        ``tissue_matrix`` maps U/S image mm of the frame to the tissue's end-expiration frame
        coordinates (identity for the body wall).
        """
        u = self._polar_u[select]
        v = self._polar_v[select]
        m = tissue_matrix
        coords = np.stack(
            [
                m[0, 0] * u + m[0, 1] * v + m[0, 3],
                m[1, 0] * u + m[1, 1] * v + m[1, 3],
                m[2, 0] * u + m[2, 1] * v + m[2, 3],
            ]
        )
        index = (coords - self._lat_origin[:, None]) / self._lat_h[:, None]
        re = ndimage.map_coordinates(self._scat_re, index, order=1, mode="grid-wrap")
        im = ndimage.map_coordinates(self._scat_im, index, order=1, mode="grid-wrap")
        out = np.zeros(select.size, dtype=np.complex64)
        out[select] = re + 1j * im
        return out

    def _calibrate(self) -> None:
        """Fix the TGC curve and the display reference on the end-expiration frame."""
        labels = self._composite(self.probe_matrix[None])
        polar = self._couple(
            labels.reshape(1, -1)[:, self._polar_index].reshape(1, self._n_beams, self._n_r)
        )
        # The sonographer sets the TGC for tissue, not for the shadows behind bone or gas.
        soft = np.isin(polar[0], [int(Tissue.BONE), *_GAS_LIKE, int(Tissue.AIR)])
        atten = np.where(soft, self._atten[int(Tissue.SOFT_TISSUE)], self._atten[polar[0]])
        one_way = np.cumsum(atten, axis=1) * self.geometry.frequency_mhz * self._dr / 10.0
        # Set for the kidney, as a sonographer would: the beams that cross it (all if none does).
        kidney = np.isin(polar[0], [int(t) for t in KIDNEY_TISSUES]).any(axis=1)
        typical = np.median(one_way[kidney] if kidney.sum() >= 3 else one_way, axis=0)
        typical = ndimage.gaussian_filter1d(typical, sigma=max(1.0, 5.0 / self._dr))
        knots = np.asarray(self.params.tgc_ripple_db)
        ripple = np.interp(np.linspace(0, 1, self._n_r), np.linspace(0, 1, len(knots)), knots)
        ripple = ndimage.gaussian_filter1d(ripple, sigma=max(1.0, 10.0 / self._dr))
        tgc_db = 2.0 * self.params.tgc_fraction * typical + ripple
        self._tgc = (10.0 ** (tgc_db / 20.0)).astype(np.float32)
        # Display reference: the median envelope of echogenic, unshadowed tissue -> grey_level.
        envelope, weights = self._beam_envelope(
            self.probe_matrix[None], labels, [0], calibrate=True
        )
        good = weights[0] > 0
        median = float(np.median(envelope[0][good])) if good.any() else 1.0
        self._reference = median * 10.0 ** (
            self.params.dynamic_range_db * (1.0 - self.params.grey_level) / 20.0
        )

    # ------------------------------------------------------------------------------------------
    # rendering
    # ------------------------------------------------------------------------------------------

    def _composite(self, matrices: NDArray[np.float64]) -> NDArray[np.uint8]:
        """Tissue labels on each frame: body wall from the probe pose, viscera from ``M_k``."""
        moving = resample_on_frames(
            self._packed,
            matrices,
            self.frame_shape,
            self.pixel_size,
            interpolator="nearest",
            default_value=0,
        )
        moving_labels = moving % _N_LABELS
        # A visceral point whose displaced source lies in the body wall is a gap opened by the
        # sliding: the retroperitoneal fat fills it.
        visceral = np.where(moving >= _N_LABELS, moving_labels, np.uint8(Tissue.FAT))
        out = np.where(self._static_compartment[None], visceral, self._static_labels[None])
        return out.astype(np.uint8)

    def tissue_frames(self, matrices: ArrayLike) -> NDArray[np.uint8]:
        """The tissue labels each frame shows (n, rows, cols), 0 outside the fan."""
        mats = np.asarray(matrices, dtype=np.float64).reshape(-1, 4, 4)
        return (self._composite(mats) * self._fan[None]).astype(np.uint8)

    def _beam_envelope(
        self,
        matrices: NDArray[np.float64],
        labels: NDArray[np.uint8],
        frame_indices: list[int],
        *,
        calibrate: bool = False,
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Envelope in the beam domain (n, beams, depths) and the weights of echogenic samples."""
        n = len(matrices)
        nb, nr = self._n_beams, self._n_r
        geo = self.geometry
        polar = self._couple(labels.reshape(n, -1)[:, self._polar_index].reshape(n, nb, nr))
        z = self._imped[polar]
        echo = self._echo[polar]
        # Fat inside the visceral compartment (perirenal, retroperitoneal, mesenteric) is laced
        # with fibrous septa and vessels and is echogenic, unlike subcutaneous fat.
        visceral_fat = (polar == int(Tissue.FAT)) & self._static_polar_moving.reshape(1, nb, nr)
        echo = np.where(visceral_fat, np.float32(self._visceral_fat_echo), echo)

        # Scatterers: viscera read the field through the breathing motion, the wall does not.
        moving = self._static_polar_moving
        flat_scatter = np.empty((n, self._n_polar), dtype=np.complex64)
        for k in range(n):
            tissue = self._inv_probe @ matrices[k]
            flat_scatter[k] = self._static_scatter
            if moving.any():
                flat_scatter[k, moving] = self._scatter_at(tissue, moving)[moving]
        scatter = flat_scatter.reshape(n, nb, nr)

        # Reflection coefficient at the boundary entering each sample (0 at the first sample).
        refl = np.zeros_like(z)
        refl[:, :, 1:] = (z[:, :, 1:] - z[:, :, :-1]) / np.maximum(z[:, :, 1:] + z[:, :, :-1], 1e-6)
        # Boundary orientation from the smoothed impedance: cos of the angle to the beam.
        # Smooth over ~1.5 mm so that the staircase of a voxelised boundary reads as a surface.
        zs = ndimage.gaussian_filter(z, sigma=(0, self._smooth_beams, _NORMAL_SMOOTH_MM / self._dr))
        g_beam = np.gradient(zs, axis=1) / (self._r[None, None, :] * self._dtheta)
        g_depth = np.gradient(zs, axis=2) / self._dr
        cos = np.abs(g_depth) / np.sqrt(g_depth**2 + g_beam**2 + 1e-12)
        # The axial blur spreads a one-sample reflection over the pulse length: compensate so
        # that _SPECULAR_GAIN is the reflector's strength after the point spread function.
        axial = max(self.params.axial_psf_mm / self._dr, 0.5)
        gain = _SPECULAR_GAIN * math.sqrt(2.0 * math.pi) * axial
        # Strong reflectors (bone, gas) saturate the display anyway; compressing their amplitude
        # keeps them thin lines instead of blooming blobs.
        strength = np.abs(refl) / (1.0 + 3.0 * np.abs(refl))
        specular = gain * strength * (_DIFFUSE_FLOOR + (1 - _DIFFUSE_FLOOR) * cos**6)

        # Two-way transmission through every interface before the sample, and attenuation.
        transmission = np.cumprod(1.0 - refl**2, axis=2)
        transmission[:, :, 1:] = transmission[:, :, :-1].copy()
        transmission[:, :, 0] = 1.0
        one_way_db = np.cumsum(self._atten[polar], axis=2) * geo.frequency_mhz * self._dr / 10.0
        loss = transmission * 10.0 ** (-one_way_db / 10.0)  # two-way amplitude

        # Real interfaces are rough: the specular echo breaks up along the boundary.
        # Lateral correlation of a few beams: a rough boundary, not a dotted one.
        roughness = 0.2 + ndimage.gaussian_filter(np.abs(scatter), sigma=(0, 3.0, 1.0))
        roughness = np.where(np.abs(refl) > 0.3, np.float32(1.0), roughness)
        signal = loss * (echo * scatter + specular * roughness)
        signal = signal + self._reverberation(polar, loss, scatter)
        # Thermal noise, deterministic per frame; added before the point spread function so that
        # the receive filter shapes it like the echo (same loss of power as diffuse speckle).
        noise_amp = 10.0 ** (self.params.noise_db / 20.0) / float(self._tgc[-1])
        for k, index in enumerate(frame_indices):
            rng = np.random.default_rng([self.params.seed, 2, int(index)])
            noise = rng.standard_normal((2, nb, nr), dtype=np.float32)
            signal[k] += noise_amp * (noise[0] + 1j * noise[1]) / math.sqrt(2.0)
        signal = self._psf(signal.astype(np.complex64))
        envelope = self._speckle_reduction(signal) * self._tgc[None, None, :]
        weights = np.zeros(1, dtype=np.float32)
        if calibrate:
            shadowing = np.isin(polar, [int(Tissue.BONE), *_GAS_LIKE, int(Tissue.AIR)])
            compensated = loss * self._tgc[None, None, :]
            weights = ((echo > 0.4) & (compensated > 0.1) & ~shadowing & (specular < 1.0)).astype(
                np.float32
            )
        return envelope, weights

    def _couple(self, polar: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Press the probe into the skin: air between the array and the body takes the first
        tissue of the beam.

        A convex array is wider than the flat contact patch of a rigid model body; a sonographer
        presses it in, with gel, until the whole aperture couples. Without this the fan's edges
        would start in air and shadow whole beams. Gas within the first millimetres (skin folds,
        label noise at the surface) is pressed out the same way.
        """
        near = (self._r - self.geometry.radius_mm <= _COUPLING_MM)[None, None, :]
        polar = np.where(near & np.isin(polar, _GAS_LIKE), np.uint8(Tissue.AIR), polar)
        air = polar == int(Tissue.AIR)
        leading = np.cumprod(air, axis=2).astype(bool)
        if not leading.any():
            return polar
        first = np.argmin(leading, axis=2)  # first non-air sample (0 if the beam is all air)
        first_label = np.take_along_axis(polar, first[:, :, None], axis=2)
        first_label = np.where(np.isin(first_label, _GAS_LIKE), np.uint8(Tissue.FAT), first_label)
        return np.where(leading, first_label, polar).astype(np.uint8)

    def _reverberation(
        self, polar: NDArray[np.uint8], loss: NDArray[Any], scatter: NDArray[np.complex64]
    ) -> NDArray[np.complex64]:
        """Ring-down behind the first gas or lung interface of each beam (a "dirty" shadow).

        Sound trapped between the gas surface and the tissue above it returns late: a short,
        streaky, quickly fading tail behind the bright interface; behind lung, faint coherent
        repeats of the pleural line at multiples of its distance from the array (A-lines).
        """
        gas = np.isin(polar, _GAS_LIKE)
        has = np.asarray(gas.any(axis=2))
        if not has.any():
            return np.zeros(polar.shape, dtype=np.complex64)
        first = np.argmax(gas, axis=2)
        depth = np.arange(polar.shape[2])[None, None, :]
        behind = (depth - first[:, :, None]) * self._dr
        level = np.take_along_axis(loss, np.maximum(first - 1, 0)[:, :, None], axis=2)
        tail = 1.5 * level * np.exp(-np.maximum(behind, 0.0) / _RINGDOWN_MM)
        after = (behind > 0) & has[:, :, None]
        out = np.where(after, tail * scatter, 0.0)
        # A-lines: behind lung, coherent repeats of the pleural line at multiples of its depth.
        lung = np.take_along_axis(polar, first[:, :, None], axis=2) == int(Tissue.LUNG)
        gap = np.maximum(first[:, :, None] * self._dr, 5.0)
        phase = np.mod(behind, gap) / gap
        near = np.minimum(phase, 1.0 - phase)
        repeats = 0.4 * level * np.exp(-behind / (2.0 * gap)) * np.exp(-((near / 0.02) ** 2))
        out = out + np.where(after & lung & (behind > 0.5 * gap), repeats, 0.0)
        return out.astype(np.complex64)

    def _psf(self, signal: NDArray[np.complex64]) -> NDArray[np.complex64]:
        """Axial then depth-dependent lateral Gaussian blur of the complex echo."""
        p = self.params
        axial = max(p.axial_psf_mm / self._dr, 0.5)
        re = ndimage.gaussian_filter1d(signal.real, axial, axis=2, mode="nearest")
        im = ndimage.gaussian_filter1d(signal.imag, axial, axis=2, mode="nearest")
        depth = self._r - self.geometry.radius_mm
        width_mm = p.lateral_psf_mm + p.lateral_growth * np.abs(depth - self.geometry.focus_mm)
        width = np.maximum(width_mm / (self._r * self._dtheta), 0.5)  # in beams, per depth
        # Blend three fixed widths instead of a per-depth kernel.
        bands = np.quantile(width, [0.0, 0.5, 1.0])
        out_re = np.zeros_like(re)
        out_im = np.zeros_like(im)
        for i, sigma in enumerate(bands):
            left = bands[i - 1] if i > 0 else None
            right = bands[i + 1] if i < len(bands) - 1 else None
            w = np.zeros_like(width)
            if left is not None:
                span = max(sigma - left, 1e-9)
                w = np.where((width >= left) & (width <= sigma), (width - left) / span, w)
            else:
                w = np.where(width <= sigma, 1.0, w)
            if right is not None:
                span = max(right - sigma, 1e-9)
                w = np.where((width > sigma) & (width <= right), (right - width) / span, w)
            else:
                w = np.where(width > sigma, 1.0, w)
            if not w.any():
                continue
            w32 = w.astype(np.float32)[None, None, :]
            out_re += w32 * ndimage.gaussian_filter1d(re, sigma, axis=1, mode="constant")
            out_im += w32 * ndimage.gaussian_filter1d(im, sigma, axis=1, mode="constant")
        return (out_re + 1j * out_im).astype(np.complex64)

    def _speckle_reduction(self, signal: NDArray[np.complex64]) -> NDArray[np.float32]:
        """Envelope after incoherent averaging of the intensity over ``smoothing_mm``."""
        intensity = (signal.real**2 + signal.imag**2).astype(np.float32)
        sigma_r = self.params.smoothing_mm / self._dr
        mean_r = float(self.geometry.radius_mm + 0.5 * self.geometry.depth_mm)
        sigma_b = self.params.smoothing_mm / (mean_r * self._dtheta)
        smooth = ndimage.gaussian_filter(intensity, sigma=(0.0, sigma_b, sigma_r), mode="nearest")
        return np.sqrt(np.maximum(smooth, 0.0)).astype(np.float32)

    def _scan_convert(self, envelope: NDArray[np.float32]) -> NDArray[np.uint8]:
        n = envelope.shape[0]
        rows, cols = self.frame_shape
        flat = envelope.reshape(n, -1)
        values = np.zeros((n, self._fan_flat.size), dtype=np.float32)
        for corner in range(4):
            values += self._sc_weight[corner][None] * flat[:, self._sc_index[corner]]
        p = self.params
        db = 20.0 * np.log10(np.maximum(values, 1e-12) / self._reference)
        grey = np.clip((db + p.dynamic_range_db) / p.dynamic_range_db, 0.0, 1.0)
        out = np.zeros((n, rows * cols), dtype=np.uint8)
        out[:, self._fan_flat] = np.rint(grey * 255.0).astype(np.uint8)
        return out.reshape(n, rows, cols)

    def render(
        self, matrices: ArrayLike, *, first_index: int = 0, chunk: int = 8
    ) -> NDArray[np.uint8]:
        """Render B-mode frames.

        Args:
            matrices: True frame poses ``M_k`` (n, 4, 4): where each pixel's visceral tissue
                lies in the CT (``inverse(B_k) @ M_probe``).
            first_index: Sequence index of the first matrix (seeds the per-frame noise, so a
                frame renders the same whatever chunk it is rendered in).
            chunk: Frames processed together.

        Returns:
            uint8 frames (n, rows, cols), 0 outside the fan.
        """
        mats = np.asarray(matrices, dtype=np.float64).reshape(-1, 4, 4)
        rows, cols = self.frame_shape
        out = np.zeros((len(mats), rows, cols), dtype=np.uint8)
        for start in range(0, len(mats), chunk):
            block = mats[start : start + chunk]
            labels = self._composite(block)
            indices = list(range(first_index + start, first_index + start + len(block)))
            envelope, _ = self._beam_envelope(block, labels, indices)
            out[start : start + len(block)] = self._scan_convert(envelope)
        return out
