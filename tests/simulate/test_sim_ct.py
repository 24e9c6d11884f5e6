"""Tests of the CT renderer (kidneyreg.simulate.ct)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from kidneyreg.simulate.anatomy import Anatomy, generate_anatomy
from kidneyreg.simulate.ct import ct_output_grid, hu_lookup, render_ct, sample_tissue_hu
from kidneyreg.simulate.tissues import PHASES, TISSUES, Tissue


@pytest.fixture(scope="module")
def anatomy() -> Anatomy:
    return generate_anatomy(1, spacing=2.0)


def _interior_means(anatomy: Anatomy, ct: sitk.Image) -> dict[Tissue, tuple[float, float]]:
    """Mean and std of the CT (on the label grid) well inside each tissue."""
    labels = sitk.GetArrayFromImage(anatomy.labels)
    values = sitk.GetArrayFromImage(ct)
    out = {}
    for tissue in Tissue:
        interior = ndimage.binary_erosion(labels == tissue, iterations=1)
        if interior.sum() > 30:
            sample = values[interior]
            out[tissue] = (float(sample.mean()), float(sample.std()))
    return out


def test_hu_per_tissue_in_corticomedullary_phase(anatomy: Anatomy) -> None:
    ct = render_ct(anatomy, seed=3, output_spacing=None, noise_hu=12.0)
    stats = _interior_means(anatomy, ct)
    for tissue, (mean, std) in stats.items():
        expected = TISSUES[tissue].hu["corticomedullary"]
        if tissue == Tissue.BONE:
            assert 150.0 < mean < 900.0
            continue
        # Per-case variation (a few %, enhancement +-12 %) and residual partial volume.
        tolerance = max(35.0, 0.2 * abs(expected))
        assert abs(mean - expected) < tolerance, (tissue.name, mean, expected)
        assert std < 60.0 or tissue in (Tissue.LUNG, Tissue.GAS, Tissue.AIR), tissue.name
    assert stats[Tissue.CORTEX][0] > stats[Tissue.MEDULLA][0] + 60.0
    assert stats[Tissue.ARTERY][0] > stats[Tissue.LIVER][0]
    assert stats[Tissue.FAT][0] < -60.0
    assert stats[Tissue.AIR][0] < -950.0


def test_phases_change_the_kidney_contrast(anatomy: Anatomy) -> None:
    nephro = _interior_means(
        anatomy, render_ct(anatomy, phase="nephrographic", seed=3, output_spacing=None)
    )
    plain = _interior_means(anatomy, render_ct(anatomy, phase="plain", seed=3, output_spacing=None))
    assert abs(nephro[Tissue.CORTEX][0] - nephro[Tissue.MEDULLA][0]) < 30.0
    soft = [
        Tissue.CORTEX,
        Tissue.MEDULLA,
        Tissue.LIVER,
        Tissue.SPLEEN,
        Tissue.MUSCLE,
        Tissue.ARTERY,
    ]
    means = [plain[t][0] for t in soft]
    assert max(means) - min(means) < 45.0
    with pytest.raises(ValueError, match="phase"):
        render_ct(anatomy, phase="arterial", seed=0)


def test_noise_level_and_texture(anatomy: Anatomy) -> None:
    flat = render_ct(anatomy, seed=1, output_spacing=None, texture=False, noise_hu=15.0)
    textured = render_ct(anatomy, seed=1, output_spacing=None, texture=True, noise_hu=0.0)
    labels = sitk.GetArrayFromImage(anatomy.labels)
    liver = ndimage.binary_erosion(labels == Tissue.LIVER, iterations=2)
    noise_std = float(sitk.GetArrayFromImage(flat)[liver].std())
    assert 12.0 < noise_std < 18.0
    texture_std = float(sitk.GetArrayFromImage(textured)[liver].std())
    assert (
        0.4 * TISSUES[Tissue.LIVER].hu_texture
        < texture_std
        < 2.0 * TISSUES[Tissue.LIVER].hu_texture
    )
    # Noise is slightly correlated in plane: neighbours along x correlate positively.
    values = sitk.GetArrayFromImage(render_ct(anatomy, seed=1, output_spacing=None, texture=False))
    patch = values[liver] - values[liver].mean()
    shifted = np.roll(values, 1, axis=2)[liver] - values[liver].mean()
    corr = float((patch * shifted).mean() / patch.var())
    assert 0.1 < corr < 0.8


def test_same_seed_same_image_other_seed_differs(anatomy: Anatomy) -> None:
    a = sitk.GetArrayFromImage(render_ct(anatomy, seed=7, output_spacing=(3.0, 3.0, 4.0)))
    b = sitk.GetArrayFromImage(render_ct(anatomy, seed=7, output_spacing=(3.0, 3.0, 4.0)))
    c = sitk.GetArrayFromImage(render_ct(anatomy, seed=8, output_spacing=(3.0, 3.0, 4.0)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_anisotropic_output_is_aligned_with_the_labels() -> None:
    anatomy = generate_anatomy(2, spacing=3.0)
    ct = render_ct(anatomy, seed=0, output_spacing=(2.0, 2.0, 5.0))
    assert ct.GetPixelID() == sitk.sitkFloat32
    assert ct.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert ct.GetSpacing() == (2.0, 2.0, 5.0)
    # Same physical box (to within one output voxel).
    for image in (anatomy.labels, ct):
        lo = np.asarray(image.GetOrigin()) - np.asarray(image.GetSpacing()) / 2
        hi = lo + np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
        if image is anatomy.labels:
            box = (lo, hi)
        else:
            np.testing.assert_allclose(lo, box[0], atol=5.0)
            np.testing.assert_allclose(hi, box[1], atol=5.0)
    # Physical points: the kidney centroid is parenchyma, world (0, 0, 0) is vertebral bone,
    # a corner is air.
    for point, low, high in (
        (anatomy.kidneys["left"].centroid_world, -150.0, 400.0),
        (np.zeros(3), 150.0, 2000.0),
    ):
        index = ct.TransformPhysicalPointToIndex([float(v) for v in point])
        assert low < ct[index] < high
    assert ct[0, 0, 0] < -900.0
    # Partial volume: without noise and texture, edges still take intermediate values.
    clean = render_ct(anatomy, seed=0, output_spacing=(2.0, 2.0, 5.0), noise_hu=0.0, texture=False)
    values = sitk.GetArrayFromImage(clean)
    assert np.unique(np.round(values)).size > 20 * len(Tissue)


def test_output_grid_and_lookup_helpers(anatomy: Anatomy) -> None:
    ref = ct_output_grid(anatomy.labels, (0.8, 0.8, 2.0))
    extent = np.asarray(anatomy.labels.GetSize()) * anatomy.spacing
    np.testing.assert_allclose(np.asarray(ref.GetSize()) * ref.GetSpacing(), extent, atol=2.0)
    with pytest.raises(ValueError, match="output_spacing"):
        ct_output_grid(anatomy.labels, (0.8, -1.0, 2.0))
    same = ct_output_grid(anatomy.labels, None)
    assert same.GetSize() == anatomy.labels.GetSize()
    lut = hu_lookup({Tissue.FAT: -95.0, Tissue.SOFT_TISSUE: 50.0})
    assert lut[int(Tissue.FAT)] == -95.0 and lut[200] == 50.0


def test_hu_sampler_varies_between_cases_by_a_few_percent() -> None:
    samples = [sample_tissue_hu("corticomedullary", np.random.default_rng(s)) for s in range(200)]
    cortex = np.array([s[Tissue.CORTEX] for s in samples])
    fat = np.array([s[Tissue.FAT] for s in samples])
    assert 0.02 < cortex.std() / cortex.mean() < 0.12
    assert 1.0 < fat.std() < 8.0
    for phase in PHASES:
        hu = sample_tissue_hu(
            phase, np.random.default_rng(0), variation=0.0, contrast_variation=0.0
        )
        assert hu[Tissue.LIVER] == TISSUES[Tissue.LIVER].hu[phase]
    with pytest.raises(ValueError, match="non-negative"):
        sample_tissue_hu("plain", np.random.default_rng(0), variation=-0.1)
