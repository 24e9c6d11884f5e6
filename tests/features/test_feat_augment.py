"""Augmentation: reproducible sampling, deterministic application, frames never mixed."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kidneyreg.features.augment import (
    AcousticBand,
    IntensityParams,
    RandomAcousticBands,
    RandomBlur,
    RandomCurve,
    RandomIntensity,
    RandomSpatial,
    RandomTissueContrast,
    RandomTissueGain,
    SpatialParams,
    apply_acoustic_bands,
    apply_blur,
    apply_curve,
    apply_intensity,
    apply_spatial,
    apply_tissue_contrast,
    apply_tissue_gain,
    default_augmentation,
)
from kidneyreg.simulate.tissues import Tissue


def test_intensity_is_deterministic_given_its_parameters() -> None:
    image = torch.linspace(0, 1, 60).reshape(1, 3, 4, 5)
    params = IntensityParams(gamma=1.3, scale=1.05, shift=-0.02, noise_std=0.03, noise_seed=4)
    assert torch.equal(apply_intensity(image, params), apply_intensity(image, params))
    clean = apply_intensity(image, IntensityParams(gamma=2.0, scale=0.5, shift=0.1))
    assert torch.allclose(clean, image**2 * 0.5 + 0.1)
    noisy = apply_intensity(image, params) - apply_intensity(
        image, IntensityParams(gamma=1.3, scale=1.05, shift=-0.02)
    )
    assert 0.01 < float(noisy.std()) < 0.06


def test_random_samplers_are_reproducible_from_the_generator() -> None:
    sampler = RandomIntensity()
    a = [sampler.sample(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1]
    generator = torch.Generator().manual_seed(5)
    assert sampler.sample(generator) != sampler.sample(generator)  # the stream advances
    for p in (sampler.sample(torch.Generator().manual_seed(s)) for s in range(20)):
        assert 0.7 <= p.gamma <= 1.5 and 0.9 <= p.scale <= 1.1 and -0.1 <= p.shift <= 0.1
    spatial = RandomSpatial(probability=1.0)
    for s in range(20):
        q = spatial.sample(torch.Generator().manual_seed(s))
        assert q is not None and max(abs(a) for a in q.angles_deg) <= 10.0
        assert 0.9 <= q.scale <= 1.1


def test_identity_and_quarter_turn_in_plane() -> None:
    image = torch.rand(1, 3, 8, 8)
    mask = (torch.rand(1, 3, 8, 8) > 0.5).float()
    out, out_mask = apply_spatial(image, mask, SpatialParams())
    assert torch.allclose(out, image, atol=1e-5) and torch.equal(out_mask, mask)
    turned, turned_mask = apply_spatial(image, mask, SpatialParams((90.0, 0.0, 0.0), in_plane=True))
    # A quarter turn in the (H, W) plane of a square patch is an exact pixel permutation.
    candidates = [torch.rot90(image, k, dims=(2, 3)) for k in (1, 3)]
    assert any(torch.allclose(turned, c, atol=1e-4) for c in candidates)
    assert set(turned_mask.unique().tolist()) <= {0.0, 1.0}


def test_in_plane_transforms_never_mix_frames() -> None:
    # Each frame constant: any in-plane transform keeps each frame constant (border padding).
    values = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7])
    image = values.reshape(1, 5, 1, 1).expand(1, 5, 12, 16).clone()
    mask = torch.zeros(1, 5, 12, 16)
    for seed in range(5):
        params = RandomSpatial(in_plane=True, probability=1.0).sample(
            torch.Generator().manual_seed(seed)
        )
        assert params is not None and params.in_plane
        out, _ = apply_spatial(image, mask, params)
        assert torch.allclose(out, image, atol=1e-5)


def test_blur_spreads_an_impulse_only_where_asked() -> None:
    impulse = torch.zeros(1, 5, 15, 15)
    impulse[0, 2, 7, 7] = 1.0
    flat = apply_blur(impulse, 1.0, in_plane=True)
    assert float(flat[0, 2].sum()) == pytest.approx(1.0, abs=1e-5)  # stays in its frame
    assert float(flat[0, [0, 1, 3, 4]].abs().sum()) == 0.0
    assert float(flat[0, 2, 7, 8]) > 0 and float(flat[0, 2, 7, 7]) < 0.5
    full = apply_blur(impulse, 1.0)
    assert float(full[0, 1, 7, 7]) > 0  # 3D blur crosses slices
    assert torch.equal(apply_blur(impulse, 0.0), impulse)
    sigmas = [
        RandomBlur(probability=0.5).sample(torch.Generator().manual_seed(s)) for s in range(30)
    ]
    assert any(s == 0.0 for s in sigmas) and any(0.5 <= s <= 1.5 for s in sigmas)


def test_default_augmentation_keeps_shapes_and_binary_masks() -> None:
    for modality, shape in (("ct", (1, 8, 16, 16)), ("us", (1, 5, 16, 24))):
        aug = default_augmentation(modality)
        mask = torch.zeros(shape)
        mask[:, 2:5, 4:10, 4:10] = 1.0
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        image = torch.rand(shape)
        a = aug(image, mask, g1)
        b = aug(image, mask, g2)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[0].shape == shape and a[1].shape == shape
        assert set(a[1].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="modality"):
        default_augmentation("mri")
    assert default_augmentation("ct").curve is not None
    assert default_augmentation("us").curve is None


def test_intensity_curve_changes_relative_contrast() -> None:
    image = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    identity = (0.0, 0.25, 0.5, 0.75, 1.0)
    assert torch.allclose(apply_curve(image, identity), image)
    swapped = apply_curve(image, (0.0, 0.25, 0.8, 0.3, 1.0))
    assert float(swapped[2]) > float(swapped[3])  # 0.5 now brighter than 0.75
    for seed in range(10):
        knots = RandomCurve(probability=1.0).sample(torch.Generator().manual_seed(seed))
        assert knots is not None and all(0.0 <= k <= 1.0 for k in knots)
        assert max(abs(k - i / 5) for i, k in enumerate(knots)) <= 0.25 + 1e-9
    assert RandomCurve(probability=0.0).sample(torch.Generator()) is None


def test_tissue_contrast_shifts_each_tissue_by_its_offset() -> None:
    tissues = torch.zeros(4, 6, 6, dtype=torch.uint8)
    tissues[:, :, :3] = int(Tissue.MUSCLE)
    tissues[:, :, 3:] = int(Tissue.CORTEX)
    image = torch.full((1, 4, 6, 6), 0.4)
    offsets = torch.zeros(256)
    offsets[int(Tissue.MUSCLE)] = -30.0
    offsets[int(Tissue.CORTEX)] = 60.0
    sharp = apply_tissue_contrast(image, tissues, offsets, edge_sigma=0)
    assert torch.allclose(sharp[0, :, :, :3], torch.tensor(0.4 - 30 / 600))
    assert torch.allclose(sharp[0, :, :, 3:], torch.tensor(0.4 + 60 / 600))
    # Blurred offsets: the same far from the boundary, a ramp across it (monotonic).
    smooth = apply_tissue_contrast(image, tissues, offsets, edge_sigma=0.75)
    row = smooth[0, 2, 3]
    assert torch.allclose(row[0], sharp[0, 2, 3, 0], atol=1e-4)
    assert torch.all(row[1:] >= row[:-1] - 1e-6) and row[2] > row[0] and row[3] < row[5]
    with pytest.raises(ValueError, match="same size"):
        apply_tissue_contrast(image, tissues[:2], offsets)
    with pytest.raises(ValueError, match="256"):
        apply_tissue_contrast(image, tissues, torch.zeros(10))


def test_random_tissue_contrast_is_reproducible_and_spares_air_and_bone() -> None:
    sampler = RandomTissueContrast(probability=1.0)
    a = sampler.sample(torch.Generator().manual_seed(1))
    b = sampler.sample(torch.Generator().manual_seed(1))
    assert a is not None and b is not None and torch.equal(a, b)
    for tissue in (Tissue.AIR, Tissue.BONE, Tissue.GAS, Tissue.LUNG):
        assert a[int(tissue)] == 0.0
    draws = torch.stack(
        [sampler.sample(torch.Generator().manual_seed(seed)) for seed in range(300)]  # type: ignore[misc]
    )
    # Cortex and medulla share the parenchyma offset: strongly correlated, wider than muscle.
    cortex, medulla = draws[:, int(Tissue.CORTEX)], draws[:, int(Tissue.MEDULLA)]
    assert float(torch.corrcoef(torch.stack([cortex, medulla]))[0, 1]) > 0.7
    assert float(cortex.std()) > float(draws[:, int(Tissue.MUSCLE)].std())
    never = RandomTissueContrast(probability=0.0)
    assert never.sample(torch.Generator().manual_seed(1)) is None
    with pytest.raises(ValueError):
        RandomTissueContrast(probability=1.5)


def test_tissue_gain_scales_each_tissue_keeps_shadows_dark_and_never_mixes_frames() -> None:
    tissues = torch.zeros(3, 6, 6, dtype=torch.uint8)
    tissues[:, :, :3] = int(Tissue.LIVER)
    tissues[:, :, 3:] = int(Tissue.CORTEX)
    image = torch.full((1, 3, 6, 6), 0.4)
    image[0, :, 5, :] = 0.0  # an acoustic shadow across both tissues
    gains = torch.ones(256)
    gains[int(Tissue.LIVER)] = 0.5
    gains[int(Tissue.CORTEX)] = 3.0
    sharp = apply_tissue_gain(image, tissues, gains, edge_sigma=0)
    assert torch.allclose(sharp[0, :, :5, :3], torch.tensor(0.2))
    assert torch.allclose(sharp[0, :, :5, 3:], torch.tensor(1.0))  # 1.2 clipped to the range
    assert torch.equal(sharp[0, :, 5], torch.zeros(3, 6))
    # Blurred gains ramp across the boundary within a frame, never across frames.
    tissues[1] = int(Tissue.LIVER)
    smooth = apply_tissue_gain(image, tissues, gains, edge_sigma=0.75)
    assert torch.allclose(smooth[0, 1, :5], torch.tensor(0.2))
    row = smooth[0, 0, 2]
    assert torch.all(row[1:] >= row[:-1] - 1e-6) and 0.2 < float(row[2]) < float(row[4])
    with pytest.raises(ValueError, match="same size"):
        apply_tissue_gain(image, tissues[:2], gains)
    with pytest.raises(ValueError, match="non-negative"):
        apply_tissue_gain(image, tissues, -gains)


def test_random_tissue_gain_is_reproducible_and_moves_the_kidney_as_one() -> None:
    sampler = RandomTissueGain(probability=1.0)
    a = sampler.sample(torch.Generator().manual_seed(1))
    b = sampler.sample(torch.Generator().manual_seed(1))
    assert a is not None and b is not None and torch.equal(a, b)
    for tissue in (Tissue.AIR, Tissue.BONE, Tissue.GAS, Tissue.LUNG):
        assert a[int(tissue)] == 1.0
    draws = torch.stack(
        [sampler.sample(torch.Generator().manual_seed(seed)) for seed in range(300)]  # type: ignore[misc]
    ).log()
    # The kidney's compartments share a common gain: correlated, and wider than the liver's.
    cortex, sinus = draws[:, int(Tissue.CORTEX)], draws[:, int(Tissue.SINUS_FAT)]
    assert float(torch.corrcoef(torch.stack([cortex, sinus]))[0, 1]) > 0.25
    assert float(cortex.std()) > float(draws[:, int(Tissue.LIVER)].std())
    assert RandomTissueGain(probability=0.0).sample(torch.Generator().manual_seed(1)) is None
    with pytest.raises(ValueError):
        RandomTissueGain(kidney_log_std=-1.0)


def test_acoustic_band_changes_the_column_below_its_start_in_every_frame() -> None:
    image = torch.full((1, 3, 21, 11), 0.4)
    image[:, 1] = 0.2  # frames differ; each gets the same band
    shadow = AcousticBand(centre=0.5, half_width=0.2, start=0.5, log_gain=-0.5, softness=1e-3)
    out = apply_acoustic_bands(image, (shadow,))
    gain = out / image
    assert torch.allclose(gain[..., :10, :], torch.ones(1))  # above the start: unchanged
    # Columns 0.4-0.6 lie inside, 0.3 and 0.7 on the edges (half the log gain).
    assert torch.allclose(gain[..., 11:, 4:7], torch.full((1,), 0.6065), atol=1e-4)
    assert torch.allclose(gain[..., 11:, 3], torch.full((1,), 0.7788), atol=1e-4)
    assert torch.allclose(gain[..., :, :3], torch.ones(1)) and torch.allclose(
        gain[..., :, 8:], torch.ones(1)
    )  # beside the band: unchanged
    assert torch.equal(gain[:, 0], gain[:, 1])
    # Enhancement of a bright image saturates at 1, the top of normalised U/S.
    enhancement = AcousticBand(0.5, 0.5, 0.0, 1.0)
    bright = apply_acoustic_bands(torch.full((1, 1, 5, 5), 0.9), (enhancement,))
    assert float(bright.max()) == 1.0
    assert torch.equal(apply_acoustic_bands(image, ()), image)


def test_acoustic_band_tilt_follows_the_beam() -> None:
    image = torch.full((1, 1, 41, 41), 0.5)
    band = AcousticBand(centre=0.3, half_width=0.05, start=0.0, log_gain=-1.0, tilt=0.4)
    out = apply_acoustic_bands(image, (band,))[0, 0]
    darkest = out.argmin(dim=1).float() / 40  # the band's axis in each row
    assert abs(float(darkest[0]) - 0.3) < 0.03 and abs(float(darkest[-1]) - 0.7) < 0.03


def test_acoustic_band_errors() -> None:
    with pytest.raises(ValueError, match=r"\(C, D, H, W\)"):
        apply_acoustic_bands(torch.zeros(4, 4), (AcousticBand(0.5, 0.1, 0.0, 0.5),))
    with pytest.raises(ValueError, match="half_width and softness must be positive"):
        apply_acoustic_bands(torch.zeros(1, 1, 4, 4), (AcousticBand(0.5, 0.0, 0.0, 0.5),))
    with pytest.raises(ValueError, match="probability"):
        RandomAcousticBands(probability=1.5)


def test_random_acoustic_bands_are_reproducible_and_use_fixed_draws() -> None:
    sampler = RandomAcousticBands(probability=1.0, max_bands=3)
    first = sampler.sample(torch.Generator().manual_seed(3))
    assert first == sampler.sample(torch.Generator().manual_seed(3))
    assert 1 <= len(first) <= 3
    for band in first:
        assert 0.25 <= math.exp(band.log_gain) <= 2.5 and 0.05 <= band.half_width <= 0.25
    # Applied or not, a sample consumes the same draws, so later samplers are unaffected.
    on, off = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert RandomAcousticBands(probability=0.0).sample(off) == ()
    RandomAcousticBands(probability=1.0).sample(on)
    assert torch.equal(on.get_state(), off.get_state())
    counts = {len(sampler.sample(torch.Generator().manual_seed(s))) for s in range(40)}
    assert counts == {1, 2, 3}


def test_augmentation_with_bands_keeps_the_mask() -> None:
    augmentation = dataclasses.replace(
        default_augmentation("us"), bands=RandomAcousticBands(probability=1.0)
    )
    image, mask = torch.rand(1, 5, 24, 24), (torch.rand(1, 5, 24, 24) > 0.5).float()
    plain = default_augmentation("us")(image, mask, torch.Generator().manual_seed(0))
    banded = augmentation(image, mask, torch.Generator().manual_seed(0))
    assert torch.equal(plain[1], banded[1])  # bands change the image only
    assert not torch.equal(plain[0], banded[0])
