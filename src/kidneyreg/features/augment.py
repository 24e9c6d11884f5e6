"""Training augmentation of feature-net patches: random parameters, deterministic application.

Each augmentation is a *random* class that only samples parameters from a ``torch.Generator``
(:class:`RandomIntensity`, :class:`RandomCurve`, :class:`RandomBlur`, :class:`RandomSpatial`,
:class:`RandomTissueContrast`, :class:`RandomTissueGain`, :class:`RandomAcousticBands`) and a
*deterministic* function that applies given parameters (:func:`apply_intensity`,
:func:`apply_curve`, :func:`apply_blur`, :func:`apply_spatial`, :func:`apply_tissue_contrast`,
:func:`apply_tissue_gain`, :func:`apply_acoustic_bands`). Training stays
reproducible and resumable (the generator's state is checkpointed), and every transform can be
tested alone.

Patches are torch tensors ``(C, D, H, W)`` with intensities normalised to about [0, 1] (CT through
the fixed HU window, U/S from uint8) and a 0/1 mask of the same spatial size. For U/S windows
``D`` is the frame axis: spatial transforms then act in each frame's plane only (rotation about the
frame axis, in-plane scaling), so frames never mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kidneyreg.preprocess import CT_WINDOW_HU
from kidneyreg.simulate.tissues import Tissue

__all__ = [
    "TISSUE_LOG_GAIN_STD",
    "TISSUE_OFFSET_STD_HU",
    "AcousticBand",
    "Augmentation",
    "IntensityParams",
    "RandomAcousticBands",
    "RandomBlur",
    "RandomCurve",
    "RandomIntensity",
    "RandomSpatial",
    "RandomTissueContrast",
    "RandomTissueGain",
    "SpatialParams",
    "apply_acoustic_bands",
    "apply_blur",
    "apply_curve",
    "apply_intensity",
    "apply_spatial",
    "apply_tissue_contrast",
    "apply_tissue_gain",
    "default_augmentation",
]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator).item())


def _check_range(values: tuple[float, float], name: str) -> None:
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {values!r}")


# ----------------------------------------------------------------------------------------------
# Intensity
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntensityParams:
    """Parameters of :func:`apply_intensity`.

    Attributes:
        gamma: Exponent applied to the intensities clipped to [0, 1] (1 = unchanged).
        scale: Contrast factor after the gamma.
        shift: Brightness offset after the scaling.
        noise_std: Standard deviation of additive Gaussian noise (0 = none).
        noise_seed: Seed of the noise field, so that the same parameters give the same output.
    """

    gamma: float = 1.0
    scale: float = 1.0
    shift: float = 0.0
    noise_std: float = 0.0
    noise_seed: int = 0


def apply_intensity(image: torch.Tensor, params: IntensityParams) -> torch.Tensor:
    """``(clip(image, 0, 1) ** gamma) * scale + shift + noise``, deterministic given ``params``.

    Args:
        image: Tensor of any shape, intensities nominally in [0, 1].
        params: The parameters.

    Returns:
        A new float tensor of the same shape.

    Example:
        >>> apply_intensity(torch.tensor([0.25, 1.0]), IntensityParams(gamma=2.0, shift=0.1))
        tensor([0.1625, 1.1000])
    """
    if params.gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {params.gamma}")
    out = image.float().clamp(0.0, 1.0) ** params.gamma
    out = out * params.scale + params.shift
    if params.noise_std > 0:
        generator = torch.Generator().manual_seed(int(params.noise_seed))
        noise = torch.randn(out.shape, generator=generator) * params.noise_std
        out = out + noise.to(out.device)
    return out


@dataclass(frozen=True)
class RandomIntensity:
    """Sampler of :class:`IntensityParams`: gamma, contrast, brightness and noise.

    The gamma is drawn log-uniformly (brightening and darkening equally likely), the other
    parameters uniformly; noise is added with probability ``noise_probability``.

    Example:
        >>> p = RandomIntensity().sample(torch.Generator().manual_seed(0))
        >>> 0.7 <= p.gamma <= 1.5
        True
    """

    gamma_range: tuple[float, float] = (0.7, 1.5)
    scale_range: tuple[float, float] = (0.9, 1.1)
    shift_range: tuple[float, float] = (-0.1, 0.1)
    noise_std_range: tuple[float, float] = (0.0, 0.05)
    noise_probability: float = 0.5

    def __post_init__(self) -> None:
        for name in ("gamma_range", "scale_range", "shift_range", "noise_std_range"):
            _check_range(getattr(self, name), name)
        if self.gamma_range[0] <= 0:
            raise ValueError("gamma_range must be positive")

    def sample(self, generator: torch.Generator) -> IntensityParams:
        """Draw one set of parameters (consumes a fixed number of draws)."""
        log_gamma = _uniform(generator, *map(math.log, self.gamma_range))
        scale = _uniform(generator, *self.scale_range)
        shift = _uniform(generator, *self.shift_range)
        noisy = _uniform(generator, 0.0, 1.0) < self.noise_probability
        std = _uniform(generator, *self.noise_std_range)
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator).item())
        return IntensityParams(math.exp(log_gamma), scale, shift, std if noisy else 0.0, seed)


# ----------------------------------------------------------------------------------------------
# Intensity curve
# ----------------------------------------------------------------------------------------------


def apply_curve(image: torch.Tensor, knots: tuple[float, ...]) -> torch.Tensor:
    """Remap intensities (clipped to [0, 1]) through a piecewise-linear curve.

    ``knots[i]`` is the output at input ``i / (len(knots) - 1)``. A random, not necessarily
    monotonic curve changes the *relative* contrast of tissues (kidney against muscle, liver,
    bowel), which a global gamma or scaling cannot: a network trained on simulated scans must then
    rely on shape and context rather than on the simulator's exact tissue intensities.

    Example:
        >>> apply_curve(torch.tensor([0.0, 0.25, 1.0]), (0.0, 1.0, 0.0))
        tensor([0.0000, 0.5000, 0.0000])
    """
    if len(knots) < 2:
        raise ValueError(f"a curve needs at least two knots, got {len(knots)}")
    values = torch.tensor(knots, dtype=torch.float32, device=image.device)
    scaled = image.float().clamp(0.0, 1.0) * (len(knots) - 1)
    index = scaled.floor().clamp(max=len(knots) - 2).long()
    fraction = scaled - index
    return values[index] * (1.0 - fraction) + values[index + 1] * fraction


@dataclass(frozen=True)
class RandomCurve:
    """Sampler of :func:`apply_curve` knots: the identity plus a uniform jitter, or None.

    Args:
        n_knots: Knots of the curve, the end points included.
        jitter: Largest change of a knot (normalised intensity; 0.25 is 150 HU for CT).
        probability: Chance of remapping at all.

    Example:
        >>> knots = RandomCurve(probability=1.0).sample(torch.Generator().manual_seed(0))
        >>> len(knots)
        6
    """

    n_knots: int = 6
    jitter: float = 0.25
    probability: float = 0.5

    def __post_init__(self) -> None:
        if self.n_knots < 2 or self.jitter < 0:
            raise ValueError("n_knots must be >= 2 and jitter >= 0")

    def sample(self, generator: torch.Generator) -> tuple[float, ...] | None:
        """Draw knots, or None for "leave the intensities" (consumes a fixed number of draws)."""
        apply = _uniform(generator, 0.0, 1.0) < self.probability
        knots = tuple(
            min(
                1.0, max(0.0, i / (self.n_knots - 1) + _uniform(generator, -1.0, 1.0) * self.jitter)
            )
            for i in range(self.n_knots)
        )
        return knots if apply else None


# ----------------------------------------------------------------------------------------------
# Blur
# ----------------------------------------------------------------------------------------------


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def apply_blur(image: torch.Tensor, sigma: float, *, in_plane: bool = False) -> torch.Tensor:
    """Gaussian blur of ``sigma`` voxels along W, H and (unless ``in_plane``) D.

    It mimics scans coarser or smoother than the training data (a 3 mm CT resampled to 1.6 mm,
    a U/S machine with more smoothing). Borders are replicated, so the mean level is kept.

    Args:
        image: ``(C, D, H, W)``.
        sigma: Standard deviation in voxels; 0 returns the image unchanged.
        in_plane: Leave the D axis (U/S frames) unblurred.

    Example:
        >>> flat = torch.full((1, 3, 5, 5), 0.3)
        >>> torch.allclose(apply_blur(flat, 1.0), flat)
        True
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (C, D, H, W), got {tuple(image.shape)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return image.float()
    kernel = _gaussian_kernel(sigma).to(image.device)
    radius = kernel.numel() // 2
    out = image.float().unsqueeze(1)  # (C, 1, D, H, W): channels blurred independently
    axes = (3, 4) if in_plane else (2, 3, 4)
    for axis in axes:
        shape = [1, 1, 1, 1, 1]
        shape[axis] = kernel.numel()
        padding = [0, 0, 0, 0, 0, 0]
        padding[2 * (4 - axis)] = padding[2 * (4 - axis) + 1] = radius
        padded = F.pad(out, padding, mode="replicate")
        out = F.conv3d(padded, kernel.reshape(shape))
    return out.squeeze(1)


@dataclass(frozen=True)
class RandomBlur:
    """Sampler of a blur ``sigma`` (voxels) for :func:`apply_blur`, 0 meaning "no blur".

    Example:
        >>> 0.0 <= RandomBlur().sample(torch.Generator().manual_seed(0)) <= 1.5
        True
    """

    sigma_range: tuple[float, float] = (0.5, 1.5)
    probability: float = 0.3

    def __post_init__(self) -> None:
        _check_range(self.sigma_range, "sigma_range")
        if self.sigma_range[0] < 0:
            raise ValueError("sigma_range must be non-negative")

    def sample(self, generator: torch.Generator) -> float:
        """Draw a sigma (consumes a fixed number of draws)."""
        apply = _uniform(generator, 0.0, 1.0) < self.probability
        sigma = _uniform(generator, *self.sigma_range)
        return sigma if apply else 0.0


# ----------------------------------------------------------------------------------------------
# Tissue contrast
# ----------------------------------------------------------------------------------------------

#: Standard deviation (HU) of each tissue's own random offset in :class:`RandomTissueContrast`.
#: Air, gas, lung and bone are left alone: they sit outside the normalisation window's useful range.
TISSUE_OFFSET_STD_HU: dict[Tissue, float] = {
    Tissue.FAT: 15.0,
    Tissue.MUSCLE: 15.0,
    Tissue.LIVER: 15.0,
    Tissue.SPLEEN: 15.0,
    Tissue.BOWEL: 15.0,
    Tissue.CORTEX: 10.0,
    Tissue.MEDULLA: 10.0,
    Tissue.SINUS_FAT: 15.0,
    Tissue.COLLECTING: 8.0,
    Tissue.ARTERY: 15.0,
    Tissue.VEIN: 15.0,
    Tissue.SOFT_TISSUE: 15.0,
    Tissue.FLUID: 8.0,
}
#: Tissues that share the kidney parenchyma's common offset (enhancement, hydration, scanner).
_PARENCHYMA = (Tissue.CORTEX, Tissue.MEDULLA)
_N_LABELS = 256


def _check_tissue_map(
    image: torch.Tensor, tissues: torch.Tensor, table: torch.Tensor, name: str
) -> None:
    """Raise ValueError unless ``image`` is (C, D, H, W), ``tissues`` (D, H, W) and ``table`` has
    one entry per label value."""
    if image.ndim != 4 or tuple(tissues.shape) != tuple(image.shape[1:]):
        raise ValueError(
            f"image must be (C, D, H, W) and tissues (D, H, W) of the same size, got "
            f"{tuple(image.shape)} and {tuple(tissues.shape)}"
        )
    if table.shape != (_N_LABELS,):
        raise ValueError(f"{name} must have {_N_LABELS} entries, got {tuple(table.shape)}")


def apply_tissue_contrast(
    image: torch.Tensor,
    tissues: torch.Tensor,
    offsets_hu: torch.Tensor,
    *,
    edge_sigma: float = 0.75,
) -> torch.Tensor:
    """Shift each tissue's CT intensity by its own offset, blending smoothly across boundaries.

    The offset map (``offsets_hu[tissues]``) is blurred by ``edge_sigma`` voxels before it is
    added, so a shifted tissue keeps the partial-volume edges of the rendered scan instead of
    getting the label map's staircase.

    Args:
        image: ``(C, D, H, W)`` CT normalised by :func:`kidneyreg.preprocess.normalize_ct`.
        tissues: ``(D, H, W)`` integer tissue labels on the same grid.
        offsets_hu: ``(256,)`` offset in HU of every label value.
        edge_sigma: Blur of the offset map in voxels (0: none).

    Returns:
        A new float tensor of the image's shape.

    Example:
        >>> image = torch.full((1, 1, 2, 2), 0.5)
        >>> offsets = torch.zeros(256); offsets[2] = 60.0  # muscle +60 HU
        >>> apply_tissue_contrast(image, torch.tensor([[[1, 2], [1, 2]]]), offsets, edge_sigma=0)
        tensor([[[[0.5000, 0.6000],
                  [0.5000, 0.6000]]]])
    """
    _check_tissue_map(image, tissues, offsets_hu, "offsets_hu")
    width = CT_WINDOW_HU[1] - CT_WINDOW_HU[0]
    shift = (offsets_hu.to(image.device).float() / width)[tissues.long()].unsqueeze(0)
    if edge_sigma > 0:
        shift = apply_blur(shift, edge_sigma)
    return image.float() + shift


@dataclass(frozen=True)
class RandomTissueContrast:
    """Sampler of per-tissue CT offsets (HU) for :func:`apply_tissue_contrast`.

    Simulated training scans give every tissue its textbook attenuation; real scans differ by
    scanner, tube voltage, contrast timing and patient (a non-contrast kidney is anywhere from
    about 20 to 40 HU, and partial volume on thick slices darkens it further). Shifting each
    tissue independently, with a common offset for the renal parenchyma on top of its own,
    stops the network from relying on exact HU differences between the kidney and its
    neighbours and makes it read the organ's shape and internal structure instead (the same
    idea as SynthSeg's label-driven intensity randomisation, Billot et al. 2023, kept close to
    realistic values here).

    Example:
        >>> offsets = RandomTissueContrast().sample(torch.Generator().manual_seed(0))
        >>> offsets is None or offsets.shape == (256,)
        True
    """

    scale: float = 1.0
    parenchyma_std_hu: float = 25.0
    probability: float = 0.8

    def __post_init__(self) -> None:
        if self.scale < 0 or self.parenchyma_std_hu < 0:
            raise ValueError("scale and parenchyma_std_hu must be non-negative")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")

    def sample(self, generator: torch.Generator) -> torch.Tensor | None:
        """Offsets in HU for every label value, or None (no change); fixed number of draws."""
        return _per_tissue_values(
            generator,
            self.probability,
            {t: self.scale * std for t, std in TISSUE_OFFSET_STD_HU.items()},
            _PARENCHYMA,
            self.scale * self.parenchyma_std_hu,
        )


def _per_tissue_values(
    generator: torch.Generator,
    probability: float,
    stds: dict[Tissue, float],
    group: tuple[Tissue, ...],
    group_std: float,
) -> torch.Tensor | None:
    """Gaussian values per label (0 for labels not in ``stds``), ``group`` sharing one more draw
    of ``group_std`` on top; None with ``1 - probability``. Always the same number of draws."""
    apply = _uniform(generator, 0.0, 1.0) < probability
    draws = torch.randn(len(stds) + 1, generator=generator)
    if not apply:
        return None
    values = torch.zeros(_N_LABELS)
    for draw, (tissue, std) in zip(draws[1:], stds.items(), strict=True):
        values[int(tissue)] = std * float(draw)
    for tissue in group:
        values[int(tissue)] += group_std * float(draws[0])
    return values


#: Standard deviation of each tissue's own log gain in :class:`RandomTissueGain` (U/S). Air, gas,
#: lung and bone are left alone: their look is reflection and shadow, not tissue backscatter.
TISSUE_LOG_GAIN_STD: dict[Tissue, float] = {
    tissue: 0.3
    for tissue in (
        Tissue.FAT,
        Tissue.MUSCLE,
        Tissue.LIVER,
        Tissue.SPLEEN,
        Tissue.BOWEL,
        Tissue.CORTEX,
        Tissue.MEDULLA,
        Tissue.SINUS_FAT,
        Tissue.COLLECTING,
        Tissue.ARTERY,
        Tissue.VEIN,
        Tissue.SOFT_TISSUE,
        Tissue.FLUID,
    )
}
_KIDNEY = (Tissue.CORTEX, Tissue.MEDULLA, Tissue.SINUS_FAT, Tissue.COLLECTING)


def apply_tissue_gain(
    image: torch.Tensor,
    tissues: torch.Tensor,
    gains: torch.Tensor,
    *,
    edge_sigma: float = 0.75,
) -> torch.Tensor:
    """Scale each tissue's U/S brightness by its own gain, blending smoothly across boundaries.

    The gain map (``gains[tissues]``) is blurred by ``edge_sigma`` pixels in each frame's plane
    (never across frames) before it multiplies the image, so speckle is kept, dark pixels (an
    acoustic shadow, outside the fan) stay dark, and tissue edges stay soft. The result is
    clipped to [0, 1], the range of normalised U/S.

    Args:
        image: ``(C, D, H, W)`` U/S window normalised by :func:`kidneyreg.preprocess.normalize_us`
            (``D`` the frames).
        tissues: ``(D, H, W)`` integer tissue labels on the same grid.
        gains: ``(256,)`` gain of every label value (1: unchanged).
        edge_sigma: Blur of the gain map in pixels (0: none).

    Returns:
        A new float tensor of the image's shape.

    Example:
        >>> image = torch.full((1, 1, 2, 2), 0.4)
        >>> gains = torch.ones(256); gains[9] = 1.5  # renal cortex 50 % brighter
        >>> apply_tissue_gain(image, torch.tensor([[[4, 9], [4, 9]]]), gains, edge_sigma=0)
        tensor([[[[0.4000, 0.6000],
                  [0.4000, 0.6000]]]])
    """
    _check_tissue_map(image, tissues, gains, "gains")
    if bool((gains < 0).any()):
        raise ValueError("gains must be non-negative")
    gain = gains.to(image.device).float()[tissues.long()].unsqueeze(0)
    if edge_sigma > 0:
        gain = apply_blur(gain, edge_sigma, in_plane=True)
    return (image.float() * gain).clamp(0.0, 1.0)


@dataclass(frozen=True)
class RandomTissueGain:
    """Sampler of per-tissue U/S gains for :func:`apply_tissue_gain`.

    The simulator gives every tissue one echogenicity relative to liver; real patients and
    machines differ (a bright fatty liver, an echogenic diseased cortex, a large bright renal
    sinus, another gain curve). A log-normal gain per tissue, with a common factor for the whole
    kidney on top, stops the U/S network from relying on the simulator's brightness order of
    the kidney and its neighbours, so it reads the organ's outline and layout (the U/S
    counterpart of :class:`RandomTissueContrast`).

    Example:
        >>> gains = RandomTissueGain().sample(torch.Generator().manual_seed(0))
        >>> gains is None or (gains.shape == (256,) and bool((gains > 0).all()))
        True
    """

    scale: float = 1.0
    kidney_log_std: float = 0.25
    probability: float = 0.8

    def __post_init__(self) -> None:
        if self.scale < 0 or self.kidney_log_std < 0:
            raise ValueError("scale and kidney_log_std must be non-negative")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")

    def sample(self, generator: torch.Generator) -> torch.Tensor | None:
        """Gains for every label value, or None (no change); fixed number of draws."""
        log_gains = _per_tissue_values(
            generator,
            self.probability,
            {t: self.scale * std for t, std in TISSUE_LOG_GAIN_STD.items()},
            _KIDNEY,
            self.scale * self.kidney_log_std,
        )
        return None if log_gains is None else torch.exp(log_gains)


# ----------------------------------------------------------------------------------------------
# Acoustic bands (U/S): shadowing and enhancement along the beam
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcousticBand:
    """One band of :func:`apply_acoustic_bands`; positions are fractions of the patch.

    Attributes:
        centre: Lateral position of the band's axis at ``start`` (0 = first column, 1 = last).
        half_width: Half the band's width.
        start: Depth where the band begins (0 = top row, nearest the probe).
        log_gain: Natural log of the gain inside the band (< 0 shadow, > 0 enhancement).
        tilt: Lateral drift of the axis per unit of depth (the beam is not vertical in a patch
            away from the fan's centre line), e.g. ``tan(10 deg)``.
        softness: Width of the band's edges (lateral and at its start).
    """

    centre: float
    half_width: float
    start: float
    log_gain: float
    tilt: float = 0.0
    softness: float = 0.05


def apply_acoustic_bands(image: torch.Tensor, bands: tuple[AcousticBand, ...]) -> torch.Tensor:
    """Multiply a U/S window by bands of gain that run from a depth down to the patch's bottom.

    Behind strongly attenuating structures (ribs, gas, stones) the beam leaves an acoustic
    shadow; behind fluid (gallbladder, cysts, a full bladder) it leaves posterior enhancement.
    Both are columns of changed brightness along the beam, below the structure, on real B-mode
    of every machine, and they cross the kidney as often as not. Every frame of the window gets
    the same bands. The result is clipped to [0, 1], the range of normalised U/S.

    Args:
        image: ``(C, D, H, W)`` U/S window (``D`` the frames, ``H`` the depth, ``W`` lateral).
        bands: The bands (none: the image is returned as a float copy).

    Returns:
        A new float tensor of the image's shape.

    Example:
        >>> image = torch.full((1, 1, 4, 4), 0.5)
        >>> band = AcousticBand(centre=0.0, half_width=0.2, start=0.5, log_gain=-0.7, softness=1e-3)
        >>> apply_acoustic_bands(image, (band,))[0, 0].round(decimals=2)
        tensor([[0.5000, 0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000, 0.5000],
                [0.2500, 0.5000, 0.5000, 0.5000],
                [0.2500, 0.5000, 0.5000, 0.5000]])
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {tuple(image.shape)}")
    out = image.float()
    if not bands:
        return out.clone()
    rows, cols = image.shape[-2:]
    depth = torch.linspace(0.0, 1.0, rows, device=image.device)[:, None]
    lateral = torch.linspace(0.0, 1.0, cols, device=image.device)[None, :]
    log_gain = torch.zeros(rows, cols, device=image.device)
    for band in bands:
        if band.half_width <= 0 or band.softness <= 0:
            raise ValueError(f"half_width and softness must be positive, got {band}")
        axis = band.centre + band.tilt * (depth - band.start)
        across = torch.sigmoid((band.half_width - (lateral - axis).abs()) / band.softness)
        below = torch.sigmoid((depth - band.start) / band.softness)
        log_gain = log_gain + band.log_gain * across * below
    return (out * torch.exp(log_gain)).clamp(0.0, 1.0)


@dataclass(frozen=True)
class RandomAcousticBands:
    """Sampler of shadow and enhancement bands for :func:`apply_acoustic_bands`.

    With ``probability`` a window gets 1 to ``max_bands`` bands, each a shadow or an enhancement
    (gain drawn log-uniformly in ``gain_range``), of random width, start depth and tilt, so the
    U/S network learns to find the kidney where a band darkens or brightens part of it (the
    real-CT B-mode's kidney under the gallbladder's enhancement, docs/models.md).

    Example:
        >>> bands = RandomAcousticBands(probability=1.0).sample(torch.Generator().manual_seed(0))
        >>> 1 <= len(bands) <= 2 and all(0.25 <= math.exp(b.log_gain) <= 2.5 for b in bands)
        True
    """

    probability: float = 0.5
    max_bands: int = 2
    gain_range: tuple[float, float] = (0.25, 2.5)
    half_width_range: tuple[float, float] = (0.05, 0.25)
    max_tilt_deg: float = 15.0

    def __post_init__(self) -> None:
        _check_range(self.gain_range, "gain_range")
        _check_range(self.half_width_range, "half_width_range")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if self.max_bands < 1 or self.gain_range[0] <= 0 or self.half_width_range[0] <= 0:
            raise ValueError("max_bands, gain_range and half_width_range must be positive")

    def sample(self, generator: torch.Generator) -> tuple[AcousticBand, ...]:
        """Draw the bands (none with ``1 - probability``); a fixed number of draws."""
        apply = _uniform(generator, 0.0, 1.0) < self.probability
        count = 1 + int(_uniform(generator, 0.0, 1.0) * self.max_bands * (1 - 1e-9))
        bands = []
        for _ in range(self.max_bands):
            centre = _uniform(generator, 0.0, 1.0)
            half_width = _uniform(generator, *self.half_width_range)
            start = _uniform(generator, 0.0, 0.7)
            log_gain = _uniform(generator, *map(math.log, self.gain_range))
            tilt = math.tan(math.radians(_uniform(generator, -1.0, 1.0) * self.max_tilt_deg))
            bands.append(AcousticBand(centre, half_width, start, log_gain, tilt))
        return tuple(bands[:count]) if apply else ()


# ----------------------------------------------------------------------------------------------
# Spatial
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpatialParams:
    """Parameters of :func:`apply_spatial`: a rotation and an isotropic scaling about the centre.

    Attributes:
        angles_deg: Rotation angles about the D, H and W axes (degrees), applied in that order.
        scale: Zoom factor (> 1 enlarges the content).
        in_plane: Keep the D axis untouched (U/S windows: D is time); then only the rotation
            about D is used and the scaling acts on H and W.
    """

    angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0
    in_plane: bool = False


def _rotation(axis: int, angle_rad: float) -> torch.Tensor:
    """3x3 rotation about one of the (x=W, y=H, z=D) axes (index into that xyz order)."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    i, j = [k for k in range(3) if k != axis]
    matrix = torch.eye(3, dtype=torch.float64)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def spatial_theta(params: SpatialParams, shape: tuple[int, int, int]) -> torch.Tensor:
    """The ``affine_grid`` matrix ``(3, 4)`` of ``params`` for a ``(D, H, W)`` patch.

    The rotation is built in voxel units (so a non-cubic patch is rotated, not sheared) and
    converted to the normalised coordinates of ``affine_grid`` (``align_corners=False``).
    """
    if params.scale <= 0:
        raise ValueError(f"scale must be > 0, got {params.scale}")
    d, h, w = shape
    half = torch.tensor([w / 2.0, h / 2.0, d / 2.0], dtype=torch.float64)  # x, y, z order
    angle_d, angle_h, angle_w = (math.radians(a) for a in params.angles_deg)
    # affine_grid's coordinate order is (x=W, y=H, z=D): rotation about D is about z (index 2).
    if params.in_plane:
        rotation = _rotation(2, angle_d)
        zoom = torch.diag(torch.tensor([params.scale, params.scale, 1.0], dtype=torch.float64))
    else:
        rotation = _rotation(0, angle_w) @ _rotation(1, angle_h) @ _rotation(2, angle_d)
        zoom = torch.eye(3, dtype=torch.float64) * params.scale
    # Output voxel p_out samples the input at R^-1 zoom^-1 p_out (in voxel units about the centre).
    voxel_map = rotation.T @ torch.linalg.inv(zoom)
    normalised = torch.diag(1.0 / half) @ voxel_map @ torch.diag(half)
    theta = torch.zeros(3, 4, dtype=torch.float64)
    theta[:, :3] = normalised
    return theta.float()


def apply_spatial(
    image: torch.Tensor, mask: torch.Tensor, params: SpatialParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate and scale a patch and its mask about the patch centre (same output size).

    The image is interpolated linearly with border replication; the mask is interpolated
    linearly and thresholded at 0.5 (smoother than nearest neighbour), staying 0/1.

    Args:
        image: ``(C, D, H, W)`` float.
        mask: ``(1, D, H, W)`` 0/1.
        params: The transform.

    Returns:
        ``(image, mask)`` transformed, float32.

    Example:
        >>> img, msk = torch.rand(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
        >>> out, _ = apply_spatial(img, msk, SpatialParams())
        >>> torch.allclose(out, img, atol=1e-5)
        True
    """
    if image.ndim != 4 or mask.ndim != 4 or image.shape[1:] != mask.shape[1:]:
        raise ValueError(
            f"image (C, D, H, W) and mask (1, D, H, W) must match, got {tuple(image.shape)} "
            f"and {tuple(mask.shape)}"
        )
    shape = (int(image.shape[1]), int(image.shape[2]), int(image.shape[3]))
    theta = spatial_theta(params, shape).to(image.device)
    both = torch.cat([image.float(), mask.float()], dim=0).unsqueeze(0)
    grid = F.affine_grid(theta.unsqueeze(0), list(both.shape), align_corners=False)
    warped = F.grid_sample(
        both, grid, mode="bilinear", padding_mode="border", align_corners=False
    ).squeeze(0)
    channels = image.shape[0]
    return warped[:channels], (warped[channels:] >= 0.5).float()


@dataclass(frozen=True)
class RandomSpatial:
    """Sampler of :class:`SpatialParams`: small rotations and scalings.

    Args:
        max_angle_deg: Rotation angles drawn uniformly in ``[-max, max]`` about each axis (only
            about D when ``in_plane``).
        scale_range: Zoom drawn log-uniformly in this range.
        in_plane: For U/S windows (see :class:`SpatialParams`).
        probability: Chance of transforming at all (else the identity, which is cheaper).

    Example:
        >>> sampler = RandomSpatial(in_plane=True, probability=1.0)
        >>> p = sampler.sample(torch.Generator().manual_seed(1))
        >>> p.in_plane, p.angles_deg[1:]
        (True, (0.0, 0.0))
    """

    max_angle_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    in_plane: bool = False
    probability: float = 0.5

    def __post_init__(self) -> None:
        _check_range(self.scale_range, "scale_range")
        if self.scale_range[0] <= 0 or self.max_angle_deg < 0:
            raise ValueError("scale_range must be positive and max_angle_deg non-negative")

    def sample(self, generator: torch.Generator) -> SpatialParams | None:
        """Draw parameters, or None for "leave the patch as it is" (consumes fixed draws)."""
        apply = _uniform(generator, 0.0, 1.0) < self.probability
        angles = [_uniform(generator, -self.max_angle_deg, self.max_angle_deg) for _ in range(3)]
        scale = math.exp(_uniform(generator, *map(math.log, self.scale_range)))
        if not apply:
            return None
        if self.in_plane:
            angles[1] = angles[2] = 0.0
        return SpatialParams((angles[0], angles[1], angles[2]), scale, self.in_plane)


@dataclass(frozen=True)
class Augmentation:
    """Spatial, blur, intensity-curve, acoustic-band, then intensity augmentation of one patch.

    ``in_plane`` (U/S windows) keeps spatial transforms and blur inside each frame; ``bands``
    (U/S, opt-in) adds shadows and enhancement along the beam.

    Example:
        >>> aug = default_augmentation("us")
        >>> img, msk = aug(torch.rand(1, 5, 16, 16), torch.zeros(1, 5, 16, 16), torch.Generator())
        >>> img.shape
        torch.Size([1, 5, 16, 16])
    """

    spatial: RandomSpatial | None = None
    intensity: RandomIntensity | None = None
    blur: RandomBlur | None = None
    curve: RandomCurve | None = None
    in_plane: bool = False
    bands: RandomAcousticBands | None = None

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``image`` ``(C, D, H, W)`` and ``mask`` ``(1, D, H, W)``."""
        if self.spatial is not None:
            params = self.spatial.sample(generator)
            if params is not None:
                image, mask = apply_spatial(image, mask, params)
        if self.blur is not None:
            image = apply_blur(image, self.blur.sample(generator), in_plane=self.in_plane)
        if self.curve is not None:
            knots = self.curve.sample(generator)
            if knots is not None:
                image = apply_curve(image, knots)
        if self.bands is not None:
            bands = self.bands.sample(generator)
            if bands:
                image = apply_acoustic_bands(image, bands)
        if self.intensity is not None:
            image = apply_intensity(image, self.intensity.sample(generator))
        return image, mask


def default_augmentation(modality: str) -> Augmentation:
    """The training augmentation of a modality (U/S: in the frame plane, no intensity curve).

    Example:
        >>> default_augmentation("ct").spatial.in_plane
        False
    """
    if modality not in ("ct", "us"):
        raise ValueError(f"modality must be 'ct' or 'us', got {modality!r}")
    in_plane = modality == "us"
    return Augmentation(
        RandomSpatial(in_plane=in_plane),
        RandomIntensity(),
        RandomBlur(),
        # CT only: tissue HU are what differs most between simulated and real scans; B-mode
        # brightness is already relative (gain, depth compensation) and covered by the gamma.
        None if in_plane else RandomCurve(),
        in_plane=in_plane,
    )
