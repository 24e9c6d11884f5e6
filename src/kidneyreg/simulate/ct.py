"""CT rendering of a label map: Hounsfield units per contrast phase, texture, partial volume, noise.

The renderer mimics how a scanner forms the image of the simulated body:

1. Each tissue gets its phase's mean attenuation from :mod:`kidneyreg.simulate.tissues`, varied
   per case: one contrast-enhancement factor shared by all enhancing tissues (bolus timing and
   cardiac output differ between patients) and a few percent of independent jitter per tissue.
   Bone is split into a dense cortical shell and cancellous marrow.
2. Smooth low-frequency texture (correlation length of a few mm, amplitude per tissue) stands
   for the tissues' own inhomogeneity (vessels in the liver, marrow trabeculae, bowel content).
3. Partial volume: the attenuation map on the fine label grid is averaged over each output
   voxel (a box of the output spacing), blurred by the scanner's point spread function (a
   Gaussian whose FWHM is one output voxel along each axis) and sampled at the output voxel
   centres. The output is anisotropic like a clinical CT (default 0.8 x 0.8 x 2.0 mm).
4. Quantum noise: Gaussian, slightly correlated in-plane (reconstruction kernel), 10-20 HU.

The output is a float32 image in LPS with identity direction, covering exactly the physical extent
of the label grid, so it is aligned with the labels and every mask derived from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage

from kidneyreg.simulate.anatomy import Anatomy
from kidneyreg.simulate.tissues import PHASES, TISSUES, Tissue

__all__ = [
    "DEFAULT_OUTPUT_SPACING",
    "ct_output_grid",
    "hu_lookup",
    "render_ct",
    "sample_tissue_hu",
]

#: A typical clinical abdominal CT: 0.8 mm in plane, 2 mm slices.
DEFAULT_OUTPUT_SPACING = (0.8, 0.8, 2.0)

# Bone: the table gives the bone-average attenuation; the cortex is about twice that, the
# cancellous marrow a little under half of it.
_CORTICAL_FACTOR = 1.9
_MARROW_FACTOR = 0.45
_CORTICAL_SHELL_MM = 1.5
# Tissue texture correlation length (Gaussian sigma, mm).
_TEXTURE_SIGMA_MM = 1.6
_HU_RANGE = (-1024.0, 3071.0)


def sample_tissue_hu(
    phase: str,
    rng: np.random.Generator,
    *,
    variation: float = 0.03,
    contrast_variation: float = 0.12,
) -> dict[Tissue, float]:
    """Per-case mean HU of every tissue for one contrast phase.

    Args:
        phase: One of :data:`~kidneyreg.simulate.tissues.PHASES`.
        rng: Random generator.
        variation: Relative standard deviation of each tissue's own jitter (relative to
            max(|HU|, 60); gas and lung: to 300 HU).
        contrast_variation: Half range of the shared enhancement factor (uniform in
            ``1 +- contrast_variation``) applied to each tissue's enhancement over plain CT.

    Returns:
        Tissue -> mean HU.

    Raises:
        ValueError: If ``phase`` is unknown or a variation is negative.

    Example:
        >>> hu = sample_tissue_hu("corticomedullary", np.random.default_rng(0))
        >>> hu[Tissue.CORTEX] > hu[Tissue.MEDULLA] + 50
        True
    """
    _check_phase(phase)
    if variation < 0 or contrast_variation < 0:
        raise ValueError("HU variations must be non-negative")
    enhancement = 1.0 + rng.uniform(-contrast_variation, contrast_variation)
    out: dict[Tissue, float] = {}
    for tissue in Tissue:
        props = TISSUES[tissue]
        plain = props.hu["plain"]
        mean = plain + enhancement * (props.hu[phase] - plain)
        # Relative jitter, with a floor for tissues near 0 HU; gas and lung vary in absolute
        # terms (density, inspiration) rather than relative ones.
        scale = 300.0 if tissue in (Tissue.AIR, Tissue.GAS, Tissue.LUNG) else max(abs(mean), 60.0)
        jitter = rng.normal(0.0, variation * scale) if variation > 0 else 0.0
        out[tissue] = float(mean + jitter)
    return out


def hu_lookup(hu: dict[Tissue, float]) -> NDArray[np.float32]:
    """A lookup table indexed by label value (256 entries; unknown labels get soft tissue).

    Example:
        >>> lut = hu_lookup({t: 0.0 for t in Tissue}); lut.shape
        (256,)
    """
    lut = np.full(256, hu.get(Tissue.SOFT_TISSUE, 40.0), np.float32)
    for tissue, value in hu.items():
        lut[int(tissue)] = value
    return lut


def ct_output_grid(labels: sitk.Image, output_spacing: Sequence[float] | None) -> sitk.Image:
    """An empty float32 image with the output spacing covering the label grid's extent.

    Args:
        labels: The label image (identity direction).
        output_spacing: (x, y, z) spacing in mm; None keeps the label grid.

    Returns:
        Reference image (values zero) centred on the same physical box.

    Raises:
        ValueError: If a spacing is not positive.

    Example:
        >>> ref = ct_output_grid(anatomy.labels, (0.8, 0.8, 2.0))  # doctest: +SKIP
    """
    if output_spacing is None:
        ref = sitk.Image(labels.GetSize(), sitk.sitkFloat32)
        ref.CopyInformation(labels)
        return ref
    spacing = np.asarray([float(v) for v in output_spacing])
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"output_spacing must be three positive numbers, got {output_spacing!r}")
    in_spacing = np.asarray(labels.GetSpacing())
    size_in = np.asarray(labels.GetSize())
    extent = size_in * in_spacing
    lo = np.asarray(labels.GetOrigin()) - in_spacing / 2
    size = np.maximum(1, np.floor(extent / spacing + 1e-6)).astype(int)
    origin = lo + (extent - size * spacing) / 2 + spacing / 2
    ref = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    ref.SetSpacing(spacing.tolist())
    ref.SetOrigin(origin.tolist())
    return ref


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown contrast phase {phase!r}; expected one of {', '.join(PHASES)}")


def _smooth_unit_noise(
    shape: tuple[int, ...], sigma_vox: Sequence[float], rng: np.random.Generator
) -> NDArray[np.float32]:
    """Gaussian white noise blurred by ``sigma_vox`` and rescaled to unit standard deviation."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if any(s > 0 for s in sigma_vox):
        noise = ndimage.gaussian_filter(noise, sigma=list(sigma_vox), mode="wrap", truncate=3.0)
        std = float(noise.std())
        noise /= std if std > 0 else 1.0
    return noise


def _texture(
    labels_img: sitk.Image, rng: np.random.Generator, sigma_mm: float
) -> NDArray[np.float32]:
    """Unit-variance smooth noise on the label grid, generated coarse and interpolated."""
    spacing = float(labels_img.GetSpacing()[0])
    # Generate at about the texture's own scale, then interpolate: the same field at a fraction
    # of the cost of filtering a full-resolution volume.
    coarse = max(spacing, sigma_mm)
    size = np.asarray(labels_img.GetSize()) * spacing / coarse + 3
    shape = tuple(math.ceil(float(v)) for v in size[::-1])
    field = _smooth_unit_noise(shape, (sigma_mm / coarse,) * 3, rng)
    image = sitk.GetImageFromArray(field)
    image.SetSpacing((coarse,) * 3)
    image.SetOrigin((np.asarray(labels_img.GetOrigin()) - coarse).tolist())
    ref = sitk.Image(labels_img.GetSize(), sitk.sitkFloat32)
    ref.CopyInformation(labels_img)
    out = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _bone_structure(labels: NDArray[np.uint8], spacing: float) -> NDArray[np.bool_]:
    """True on the cortical shell of bones (bone voxels within ~1.5 mm of non-bone)."""
    bone = labels == int(Tissue.BONE)
    radius = max(1, round(_CORTICAL_SHELL_MM / spacing))
    image = sitk.GetImageFromArray(bone.astype(np.uint8))
    inner = sitk.GetArrayFromImage(sitk.BinaryErode(image, [radius] * 3, sitk.sitkBall, 0, 1))
    return bone & (inner == 0)


def render_ct(
    anatomy: Anatomy,
    *,
    phase: str = "corticomedullary",
    seed: int,
    output_spacing: Sequence[float] | None = DEFAULT_OUTPUT_SPACING,
    noise_hu: float = 14.0,
    hu_variation: float = 0.03,
    contrast_variation: float = 0.12,
    texture: bool = True,
    rng: np.random.Generator | None = None,
) -> sitk.Image:
    """Render a CT of an anatomy in Hounsfield units.

    Args:
        anatomy: The label map to image.
        phase: Contrast phase: ``"corticomedullary"`` (default; cortex much brighter than
            medulla), ``"nephrographic"`` (medulla about as bright as cortex) or ``"plain"``.
        seed: Seed of the per-case HU variation, texture and noise.
        output_spacing: (x, y, z) voxel size of the CT in mm; None keeps the label grid.
        noise_hu: Standard deviation of the quantum noise (HU); 0 disables it.
        hu_variation: Relative per-tissue HU jitter between cases.
        contrast_variation: Half range of the per-case enhancement factor.
        texture: Add the tissues' smooth texture.
        rng: Generator to use instead of one seeded from ``seed``.

    Returns:
        float32 image in HU, LPS, identity direction, covering the label grid's physical extent.

    Raises:
        ValueError: On an unknown phase or a negative noise level.

    Example:
        >>> from kidneyreg.simulate.anatomy import generate_anatomy
        >>> anatomy = generate_anatomy(0, spacing=3.0)
        >>> ct = render_ct(anatomy, seed=0, output_spacing=(3.0, 3.0, 3.0))
        >>> ct.GetPixelID() == sitk.sitkFloat32
        True
    """
    _check_phase(phase)
    if not noise_hu >= 0:
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu!r}")
    gen = rng if rng is not None else np.random.default_rng([int(seed), 0xC7])
    labels_img = anatomy.labels
    spacing = float(labels_img.GetSpacing()[0])
    labels = sitk.GetArrayViewFromImage(labels_img)
    hu_table = sample_tissue_hu(
        phase, gen, variation=hu_variation, contrast_variation=contrast_variation
    )
    hu = hu_lookup(hu_table)[labels]
    # Bone: dense cortical shell around cancellous marrow.
    bone_mean = hu_table[Tissue.BONE]
    shell = _bone_structure(labels, spacing)
    bone = labels == int(Tissue.BONE)
    hu[bone] = bone_mean * _MARROW_FACTOR
    hu[shell] = bone_mean * _CORTICAL_FACTOR
    if texture:
        amp = np.zeros(256, np.float32)
        for tissue, props in TISSUES.items():
            amp[int(tissue)] = props.hu_texture
        hu += amp[labels] * _texture(labels_img, gen, _TEXTURE_SIGMA_MM)
    image = sitk.GetImageFromArray(hu)
    image.CopyInformation(labels_img)
    ref = ct_output_grid(labels_img, output_spacing)
    out_spacing = np.asarray(ref.GetSpacing())
    image = _partial_volume(image, out_spacing)
    ct = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(ct)
    if noise_hu > 0:
        # Slightly correlated in plane (reconstruction kernel), independent between slices.
        array += np.float32(noise_hu) * _smooth_unit_noise(array.shape, (0.0, 0.6, 0.6), gen)
    np.clip(array, *_HU_RANGE, out=array)
    result = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    result.CopyInformation(ref)
    return result


def _partial_volume(image: sitk.Image, out_spacing: NDArray[np.float64]) -> sitk.Image:
    """Average over output voxels (box) and blur with the scanner PSF (FWHM = one voxel)."""
    spacing = float(image.GetSpacing()[0])
    array = sitk.GetArrayFromImage(image)
    # Box average where the output voxel spans several label voxels (array axes are z, y, x).
    for axis, out in zip((2, 1, 0), out_spacing, strict=True):
        width = round(float(out) / spacing)
        if width >= 2:
            ndimage.uniform_filter1d(array, width, axis=axis, output=array, mode="nearest")
    sigma = out_spacing / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    # Blur far below a label voxel does nothing on that grid: skip it.
    sigma_vox = [float(s / spacing) if s > 0.25 * spacing else 0.0 for s in sigma[::-1]]
    if any(s > 0 for s in sigma_vox):
        array = ndimage.gaussian_filter(array, sigma=sigma_vox, mode="nearest", truncate=3.0)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out
