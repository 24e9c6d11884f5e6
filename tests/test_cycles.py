"""Tests of kidneyreg.cycles on synthetic breathing sequences with known cycle boundaries.

The sequences are built here: a Lujan-type breathing waveform (``sin(pi w) ** (2 n)`` with an
asymmetric phase warp, so the rest is at end-expiration and inspiration is faster than
expiration) with cycle-to-cycle variation of period and depth and smooth irregularity, driving a
textured bright ellipse (the kidney) in B-mode-like frames with fresh speckle in every frame.
A cycle starts at end-expiration: the first frame acquired at or after the instant where the
waveform is 0, as in ``kidneyreg.simulate.breathing``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kidneyreg.cycles import (
    BreathingNotDetectedWarning,
    CycleDetection,
    breathing_signal,
    detect_cycles,
    first_cycle_frames,
)

PIXEL_MM = 0.5
ROWS, COLS = 96, 128  # 48 x 64 mm
TOLERANCE = 3  # frames, the requirement


@dataclass
class Breathing:
    """A breathing waveform sampled at the frames, with its true cycle starts."""

    signal: np.ndarray  # 0 at end-expiration, about 1 at end-inspiration
    starts: np.ndarray  # end-expiration instants in frames (may lie outside the sequence)
    period_frames: float
    frame_rate: float

    @property
    def boundaries(self) -> list[int]:
        """True boundaries: first frame at or after each end-expiration inside the sequence."""
        n = len(self.signal)
        return [math.ceil(s - 1e-9) for s in self.starts if 0 <= s <= n - 1]


def make_breathing(
    n: int,
    frame_rate: float,
    seed: int,
    *,
    start_phase: float = 0.0,
    noise: float = 0.01,
) -> Breathing:
    """Breathing with ~58 frames per cycle, 12 % period and 10 % depth variation."""
    rng = np.random.default_rng(seed)
    mean_frames = float(np.clip(rng.normal(58.0, 8.0), 42.0, 76.0))
    periods = mean_frames * np.clip(1.0 + 0.12 * rng.standard_normal(64), 0.75, 1.3)
    depths = np.clip(1.0 + 0.1 * rng.standard_normal(64), 0.75, 1.25)
    exponent = float(rng.choice([1.5, 2.0, 3.0]))
    inhale = float(rng.uniform(0.33, 0.45))
    starts = np.concatenate([[0.0], np.cumsum(periods)]) - start_phase * periods[0]
    frames = np.arange(n, dtype=np.float64)
    index = np.searchsorted(starts, frames, side="right") - 1
    phase = (frames - starts[index]) / periods[index]
    warped = np.where(
        phase < inhale, 0.5 * phase / inhale, 0.5 + 0.5 * (phase - inhale) / (1.0 - inhale)
    )
    signal = depths[index] * np.sin(np.pi * warped) ** (2.0 * exponent)
    # Smooth irregularity (knots every 0.25 s) and a little frame-to-frame jitter.
    knots = rng.standard_normal(int(n / frame_rate / 0.25) + 3)
    signal += noise * np.interp(frames / frame_rate / 0.25, np.arange(len(knots)), knots)
    signal += 0.5 * noise * rng.standard_normal(n)
    return Breathing(signal, starts, mean_frames, frame_rate)


def render_frames(
    breathing_signal_values: np.ndarray, seed: int, *, moving: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames and kidney masks of a textured ellipse moved by the breathing signal.

    Inspiration moves the kidney towards -u (inferior in the default pose) by 12-18 mm and
    towards -v by 2-4 mm. Speckle is fresh in every frame (Rayleigh, multiplicative).
    """
    rng = np.random.default_rng(seed + 1000)
    n = len(breathing_signal_values)
    si, ap = rng.uniform(12.0, 18.0), rng.uniform(2.0, 4.0)
    u = np.arange(COLS) * PIXEL_MM
    v = np.arange(ROWS) * PIXEL_MM
    uu, vv = np.meshgrid(u, v)
    waves = rng.uniform(0.15, 0.6, (4, 2)) * rng.choice([-1.0, 1.0], (4, 2))
    offsets = rng.uniform(0.0, 2 * np.pi, 4)
    background = 55.0 + 15.0 * np.sin(0.21 * uu + 0.13 * vv) + 30.0 * np.exp(-((vv - 5.0) ** 2))
    frames = np.empty((n, ROWS, COLS), dtype=np.uint8)
    masks = np.empty((n, ROWS, COLS), dtype=np.uint8)
    for k in range(n):
        s = breathing_signal_values[k] if moving else 0.0
        cu, cv = 40.0 - si * s, 26.0 - ap * s
        du, dv = uu - cu, vv - cv
        radius = np.sqrt((du / 17.0) ** 2 + (dv / 10.0) ** 2)
        inside = 1.0 / (1.0 + np.exp((radius - 1.0) * 12.0))
        texture = sum(np.sin(waves[i, 0] * du + waves[i, 1] * dv + offsets[i]) for i in range(4))
        kidney = 150.0 + 25.0 * texture / 4.0 - 60.0 * (radius < 0.45)
        image = background * (1.0 - inside) + kidney * inside
        speckle = rng.rayleigh(1.0 / math.sqrt(math.pi / 2.0), image.shape)
        frames[k] = np.clip(image * speckle, 0, 255).astype(np.uint8)
        masks[k] = radius < 1.0
    return frames, masks


def assert_boundaries_match(detected: tuple[int, ...], truth: Breathing) -> None:
    """Every detected boundary is near a true one and every true one is found."""
    n = len(truth.signal)
    all_true = np.asarray([math.ceil(s - 1e-9) for s in truth.starts], dtype=np.float64)
    found = np.asarray(detected, dtype=np.float64)
    assert len(found) >= 2
    for b in found:
        assert np.min(np.abs(all_true - b)) <= TOLERANCE, (detected, truth.boundaries)
    for b in truth.boundaries:
        # A cycle that starts on the last frames has no inspiration edge to see.
        if b < n - TOLERANCE:
            assert np.min(np.abs(found - b)) <= TOLERANCE, (detected, truth.boundaries)


# ----------------------------------------------------------------------------------------------
# detection on 1D waveforms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_rate", [17.0, 20.0, 22.0])
@pytest.mark.parametrize("seed", range(6))
def test_detect_cycles_matches_true_boundaries(seed: int, frame_rate: float) -> None:
    truth = make_breathing(260, frame_rate, seed, start_phase=0.0 if seed % 2 else 0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BreathingNotDetectedWarning)
        detection = detect_cycles(truth.signal, frame_rate=frame_rate)
    assert detection.detected
    assert detection.end_expiration == "min"
    assert not detection.frame_rate_assumed
    assert_boundaries_match(detection.boundaries, truth)
    assert abs(detection.period_frames - truth.period_frames) < 0.25 * truth.period_frames
    assert 0.3 < detection.confidence <= 1.0
    # One end-inspiration between consecutive boundaries.
    for a, b in zip(detection.boundaries[:-1], detection.boundaries[1:], strict=True):
        assert sum(a < p < b for p in detection.end_inspirations) == 1


def test_inverted_signal_detected_by_asymmetry_or_given_side() -> None:
    truth = make_breathing(260, 20.0, 3)
    flipped = detect_cycles(-truth.signal, frame_rate=20.0)
    assert flipped.end_expiration == "max"
    assert flipped.end_expiration_source == "asymmetry"
    assert_boundaries_match(flipped.boundaries, truth)
    given = detect_cycles(-truth.signal, frame_rate=20.0, end_expiration="max")
    assert given.end_expiration_source == "caller"
    assert given.boundaries == flipped.boundaries


def test_symmetric_waveform_uses_default_side_and_caller_can_override() -> None:
    # A pure sinusoid has no rest: the asymmetry rule abstains and the geometric default
    # (end-expiration at the minima) is used; the caller may say otherwise.
    t = np.arange(300) / 20.0
    wave = np.cos(2 * np.pi * t / 3.0)
    detection = detect_cycles(wave, frame_rate=20.0)
    assert detection.end_expiration_source == "default"
    assert detection.end_expiration == "min"
    # Minima of cos(2 pi t / 3) at t = 1.5 s + 3 k: frames 30, 90, 150...
    assert all(min(abs(b - m) for m in (30, 90, 150, 210, 270)) <= 1 for b in detection.boundaries)
    maxima = detect_cycles(wave, frame_rate=20.0, end_expiration="max")
    assert all(min(abs(b - m) for m in (0, 60, 120, 180, 240)) <= 1 for b in maxima.boundaries)


def test_unknown_frame_rate_assumes_20_fps() -> None:
    truth = make_breathing(260, 18.0, 4)
    detection = detect_cycles(truth.signal)
    assert detection.frame_rate_assumed
    assert detection.frame_rate == 20.0
    assert_boundaries_match(detection.boundaries, truth)
    assert detection.period_s == pytest.approx(detection.period_frames / 20.0)


def test_missing_samples_and_linear_drift_are_tolerated() -> None:
    truth = make_breathing(260, 20.0, 5)
    signal = truth.signal + np.linspace(0.0, 0.6, 260)  # probe drift
    signal[[40, 41, 120, 200]] = np.nan
    detection = detect_cycles(signal, frame_rate=20.0)
    assert detection.detected
    assert_boundaries_match(detection.boundaries, truth)


# ----------------------------------------------------------------------------------------------
# surrogates from image sequences
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "frame_rate"), [(0, 17.5), (1, 20.0), (2, 21.5)])
def test_mask_and_image_surrogates_find_true_cycles(seed: int, frame_rate: float) -> None:
    truth = make_breathing(200, frame_rate, seed, start_phase=0.0 if seed != 1 else 0.7)
    frames, masks = render_frames(truth.signal, seed)
    for use_masks in (True, False):
        signal = breathing_signal(
            frames, masks=masks if use_masks else None, pixel_size=(PIXEL_MM, PIXEL_MM)
        )
        assert signal.shape == (200,)
        # Geometric sign: the kidney moving towards -u (inspiration) raises the signal.
        assert np.corrcoef(signal, truth.signal)[0, 1] > 0.95
        detection = detect_cycles(signal, frame_rate=frame_rate)
        assert detection.detected, use_masks
        assert_boundaries_match(detection.boundaries, truth)


def test_mask_surrogate_is_in_mm_and_survives_missing_masks() -> None:
    truth = make_breathing(200, 20.0, 7)
    frames, masks = render_frames(truth.signal, 7)
    full = breathing_signal(frames, masks=masks, pixel_size=(PIXEL_MM, PIXEL_MM))
    damaged = masks.copy()
    damaged[::9] = 0  # segmentation failures
    damaged[50, :, :] = 0
    damaged[50, 20:24, 20:24] = 1  # a tiny spurious blob far from the kidney
    patched = breathing_signal(frames, masks=damaged, pixel_size=(PIXEL_MM, PIXEL_MM))
    # Peak-to-peak in mm: the 12-18 mm S-I excursion (depth 0.75-1.25).
    assert 8.0 < np.ptp(full) < 25.0
    assert np.max(np.abs(patched - full)) < 0.1 * np.ptp(full)
    assert_boundaries_match(detect_cycles(patched, frame_rate=20.0).boundaries, truth)
    # Soft feature maps work like masks.
    soft = breathing_signal(frames, masks=masks * 0.8, pixel_size=(PIXEL_MM, PIXEL_MM))
    np.testing.assert_allclose(soft, full, atol=1e-9)


def test_too_few_masks_falls_back_to_images_with_a_warning() -> None:
    truth = make_breathing(120, 20.0, 8)
    frames, masks = render_frames(truth.signal, 8)
    masks[10:] = 0
    with pytest.warns(UserWarning, match="image-based"):
        signal = breathing_signal(frames, masks=masks, pixel_size=(PIXEL_MM, PIXEL_MM))
    assert np.corrcoef(signal, truth.signal)[0, 1] > 0.9


def test_blank_frames_are_interpolated() -> None:
    truth = make_breathing(200, 20.0, 9)
    frames, _ = render_frames(truth.signal, 9)
    frames[[30, 31, 100]] = 0
    signal = breathing_signal(frames, pixel_size=(PIXEL_MM, PIXEL_MM))
    assert np.all(np.isfinite(signal))
    assert_boundaries_match(detect_cycles(signal, frame_rate=20.0).boundaries, truth)


def test_breathing_signal_rejects_bad_input() -> None:
    frames = np.zeros((10, 8, 8))
    with pytest.raises(ValueError, match="frames must be"):
        breathing_signal(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="masks must have"):
        breathing_signal(frames, masks=np.zeros((10, 8, 9)))
    with pytest.raises(ValueError, match="pixel_size"):
        breathing_signal(frames, pixel_size=(0.5, 0.0))


# ----------------------------------------------------------------------------------------------
# fallback
# ----------------------------------------------------------------------------------------------


def test_flat_sequence_falls_back_with_warning() -> None:
    frames = np.full((150, 32, 32), 80, dtype=np.uint8)
    signal = breathing_signal(frames, pixel_size=(PIXEL_MM, PIXEL_MM))
    with pytest.warns(BreathingNotDetectedWarning, match="fixed cycles of 58 frames") as record:
        detection = detect_cycles(signal)
    assert len(record) == 1
    assert "\n" not in str(record[0].message)
    assert Path(record[0].filename).name == Path(__file__).name  # points at the caller
    assert not detection.detected
    assert detection.boundaries == (0, 58, 116)
    assert detection.confidence == 0.0
    assert detection.first_cycle() == (0, 58)
    assert detection.reason


def test_noise_only_sequence_falls_back() -> None:
    # The kidney does not move: only fresh speckle changes between frames.
    frames, masks = render_frames(np.zeros(200), 11, moving=False)
    for use_masks in (False, True):
        signal = breathing_signal(
            frames, masks=masks if use_masks else None, pixel_size=(PIXEL_MM, PIXEL_MM)
        )
        with pytest.warns(BreathingNotDetectedWarning):
            detection = detect_cycles(signal, frame_rate=20.0)
        assert not detection.detected
        assert detection.boundaries == (0, 60, 120, 180)  # 3 s at 20 fps


@pytest.mark.parametrize("seed", range(10))
def test_white_noise_signal_falls_back(seed: int) -> None:
    rng = np.random.default_rng(seed)
    with pytest.warns(BreathingNotDetectedWarning):
        detection = detect_cycles(rng.standard_normal(int(rng.integers(100, 500))))
    assert not detection.detected


def test_short_sequences_fall_back() -> None:
    truth = make_breathing(400, 20.0, 12)
    period = int(truth.period_frames)
    with pytest.warns(BreathingNotDetectedWarning):
        short = detect_cycles(truth.signal[: int(1.2 * period)], frame_rate=20.0)
    assert not short.detected
    with pytest.warns(BreathingNotDetectedWarning, match="shortest period"):
        tiny = detect_cycles(truth.signal[:30], frame_rate=20.0, expected_frames=25)
    assert tiny.boundaries == (0, 25)


def test_detect_cycles_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="non-empty 1D"):
        detect_cycles(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="frame_rate"):
        detect_cycles(np.zeros(100), frame_rate=0.0)
    with pytest.raises(ValueError, match="min_period_s"):
        detect_cycles(np.zeros(100), min_period_s=5.0, max_period_s=3.0)
    with pytest.raises(ValueError, match="expected_frames"):
        detect_cycles(np.zeros(100), expected_frames=0)
    with pytest.raises(ValueError, match="end_expiration"):
        detect_cycles(np.zeros(100), end_expiration="up")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# first cycle
# ----------------------------------------------------------------------------------------------


def test_first_cycle_when_the_sequence_starts_at_end_expiration() -> None:
    truth = make_breathing(260, 20.0, 13)
    detection = detect_cycles(truth.signal, frame_rate=20.0)
    start, stop = detection.first_cycle()
    assert start == detection.boundaries[0] <= TOLERANCE
    assert abs(stop - truth.boundaries[1]) <= TOLERANCE
    frames = first_cycle_frames(detection, 260)
    np.testing.assert_array_equal(frames, np.arange(start, stop))


def test_first_cycle_frames_skips_a_short_partial_cycle() -> None:
    # Starts late in expiration: the partial cycle is short, the first full cycle is used.
    truth = make_breathing(260, 20.0, 14, start_phase=0.8)
    detection = detect_cycles(truth.signal, frame_rate=20.0)
    first = truth.boundaries[0]
    assert 0 < first < 0.5 * truth.period_frames
    frames = first_cycle_frames(detection, 260)
    assert abs(int(frames[0]) - first) <= TOLERANCE
    assert abs(int(frames[-1]) + 1 - truth.boundaries[1]) <= TOLERANCE


def test_first_cycle_frames_starts_at_zero_when_skipping_would_waste_half_a_cycle() -> None:
    # Starts mid-inspiration: more than half a cycle precedes the first boundary.
    truth = make_breathing(260, 20.0, 15, start_phase=0.3)
    detection = detect_cycles(truth.signal, frame_rate=20.0)
    assert detection.boundaries[0] > 0.5 * detection.period_frames
    frames = first_cycle_frames(detection, 260)
    np.testing.assert_array_equal(frames, np.arange(round(detection.period_frames)))


def test_first_cycle_frames_policy_on_given_detections() -> None:
    def make(boundaries: tuple[int, ...], period: float = 50.0) -> CycleDetection:
        return CycleDetection(boundaries, period, 0.9, True, 300, 20.0, False)

    np.testing.assert_array_equal(first_cycle_frames(make((20, 70, 121)), 300), np.arange(20, 70))
    np.testing.assert_array_equal(first_cycle_frames(make((30, 80, 131)), 300), np.arange(0, 50))
    np.testing.assert_array_equal(first_cycle_frames(make((10,)), 300), np.arange(10, 60))
    np.testing.assert_array_equal(first_cycle_frames(make((0, 50)), 30), np.arange(0, 30))
    assert make((10,)).first_cycle() == (10, 60)
    with pytest.raises(ValueError, match="n_frames"):
        first_cycle_frames(make((0, 50)), 0)


def test_detection_to_dict_is_json_ready() -> None:
    truth = make_breathing(200, 20.0, 16)
    data = detect_cycles(truth.signal, frame_rate=20.0).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["detected"] is True
    assert data["boundaries"][0] <= TOLERANCE


# ----------------------------------------------------------------------------------------------
# a case from the simulator
# ----------------------------------------------------------------------------------------------


def test_simulated_case_cycles(tmp_path: Path) -> None:
    case_module = pytest.importorskip("kidneyreg.simulate.case")
    simulate_case = getattr(case_module, "simulate_case", None)
    if simulate_case is None:
        pytest.skip("kidneyreg.simulate.case.simulate_case is not available")
    sitk = pytest.importorskip("SimpleITK")
    folder = simulate_case(tmp_path / "case", 3, frames=200, profile="tiny", preview=False)
    breathing_file = Path(folder) / "breathing.json"
    if not breathing_file.exists():
        pytest.skip("the simulated case has no breathing.json")
    record = json.loads(breathing_file.read_text())
    us = sitk.ReadImage(str(Path(folder) / "us.nii.gz"))
    frames = sitk.GetArrayFromImage(us)
    masks = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(folder) / "us_kidney_mask.nii.gz")))
    pixel = (us.GetSpacing()[0], us.GetSpacing()[1])
    truth = np.asarray(record["cycle_starts"], dtype=np.float64)
    n = len(frames)
    signal = breathing_signal(frames, masks=masks, pixel_size=pixel)
    assert np.corrcoef(signal, record["signal"])[0, 1] > 0.95
    detection = detect_cycles(signal, frame_rate=record["frame_rate"])
    assert detection.detected
    found = np.asarray(detection.boundaries, dtype=np.float64)
    for b in found:
        assert np.min(np.abs(truth - b)) <= TOLERANCE
    for b in truth[truth < n - TOLERANCE]:
        assert np.min(np.abs(found - b)) <= TOLERANCE
    # Without masks the image-based surrogate still follows the breathing (its boundaries are
    # less precise on the simulator's coarse tiny-profile images, so only detection is checked).
    image_signal = breathing_signal(frames, pixel_size=pixel)
    assert np.corrcoef(image_signal, record["signal"])[0, 1] > 0.9
    assert detect_cycles(image_signal, frame_rate=record["frame_rate"]).detected
