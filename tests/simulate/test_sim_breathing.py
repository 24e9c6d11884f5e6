"""Breathing motion: paper statistics, waveform, rigid displacements, cycle boundaries."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kidneyreg.geometry import is_rigid, rotation_angle_deg, transform_points
from kidneyreg.simulate.breathing import BreathingMotion, BreathingParameters, RandomBreathing

CENTRE = np.array([-60.0, 40.0, 10.0])


def _motions(n: int, seed: int = 0) -> list[BreathingMotion]:
    rng = np.random.default_rng(seed)
    return [BreathingMotion(RandomBreathing().sample(rng, centre=CENTRE)) for _ in range(n)]


def test_frames_per_cycle_match_the_paper() -> None:
    # Paper: 17-22 fps and 58 +- 14 frames per respiration cycle.
    per_cycle = []
    for motion in _motions(200):
        p = motion.params
        assert 17.0 <= p.frame_rate <= 22.0
        per_cycle.extend(np.asarray(p.periods_s[:4]) * p.frame_rate)
        n = motion.frames_for_cycles(4)
        starts = motion.cycle_starts(n)
        assert len(starts) == 5 and starts[0] == 0
        per_cycle_from_frames = np.diff(starts)
        assert np.all(
            np.abs(per_cycle_from_frames - np.asarray(p.periods_s[:4]) * p.frame_rate) <= 1
        )
    mean, sd = float(np.mean(per_cycle)), float(np.std(per_cycle))
    assert 52.0 <= mean <= 64.0, mean
    assert 10.0 <= sd <= 18.0, sd


def test_periods_vary_from_cycle_to_cycle() -> None:
    cvs = [np.std(m.params.periods_s) / np.mean(m.params.periods_s) for m in _motions(50)]
    assert 0.06 < float(np.median(cvs)) < 0.2
    depths = [np.std(m.params.depths) for m in _motions(50, seed=1)]
    assert 0.04 < float(np.median(depths)) < 0.2


def test_amplitudes_and_rotation_ranges() -> None:
    for motion in _motions(60, seed=2):
        p = motion.params
        n = motion.frames_for_cycles(3)
        times = motion.frame_times(n)
        shift = motion.translations(times)
        starts = motion.cycle_starts(n)
        for k, (a, b) in enumerate(itertools.pairwise(starts)):
            si = np.ptp(shift[a:b, 2])
            ap = np.ptp(shift[a:b, 1])
            # Peak-to-peak = nominal amplitude x the cycle's depth, up to the noise and sampling.
            assert si == pytest.approx(p.si_mm * p.depths[k], abs=1.5 + 0.1 * p.si_mm)
            assert ap == pytest.approx(p.ap_mm * p.depths[k], abs=1.0 + 0.15 * p.ap_mm)
        assert 10.0 <= p.si_mm <= 20.0 and 2.0 <= p.ap_mm <= 5.0
        # Inspiration moves the kidney inferiorly (-z) and anteriorly (-y).
        peak = int(np.argmax(motion.signal(times)))
        assert shift[peak, 2] < -5.0 and shift[peak, 1] < 0.0
        angles = [rotation_angle_deg(m) for m in motion.displacements(times)]
        assert float(np.max(angles)) <= 3.0 * 1.3 + 0.5


def test_displacements_are_rigid_about_the_centre_and_zero_at_end_expiration() -> None:
    motion = _motions(1, seed=3)[0]
    times = motion.frame_times(80)
    b = motion.displacements(times)
    assert b.shape == (80, 4, 4)
    assert all(is_rigid(m) for m in b)
    # t = 0 is end-expiration, the CT's state: identity up to the small noise.
    assert np.allclose(b[0][:3, :3], np.eye(3), atol=1e-6)
    assert np.linalg.norm(b[0][:3, 3]) < 1.5
    # The centre moves by the translation only (rotation is about it).
    moved = np.stack([transform_points(m, CENTRE) for m in b])
    assert np.allclose(moved - CENTRE, motion.translations(times), atol=1e-9)


def test_waveform_rests_at_end_expiration() -> None:
    motion = _motions(1, seed=4)[0]
    p = motion.params
    t = np.linspace(0.0, p.periods_s[0], 1001)[:-1]
    s = motion.signal(t) / p.depths[0]
    assert s.min() >= 0.0 and s.max() == pytest.approx(1.0, abs=1e-3)
    # Peak at the end of inspiration, which is shorter than expiration.
    assert t[np.argmax(s)] / p.periods_s[0] == pytest.approx(p.inhale_fraction, abs=0.01)
    # Long expiratory rest: the signal stays below 10 % for a good part of the cycle.
    assert np.mean(s < 0.1) > 0.25


def test_cycle_starts_are_at_end_expiration() -> None:
    for motion in _motions(10, seed=5):
        n = motion.frames_for_cycles(2)
        starts = motion.cycle_starts(n)
        assert starts[0] == 0 and len(starts) == 3 and starts[-1] == n - 1
        signal = motion.signal(motion.frame_times(n))
        assert np.all(signal[starts] < 0.05)


def test_sampling_is_deterministic_and_serialisable() -> None:
    a = RandomBreathing().sample(np.random.default_rng(9), centre=CENTRE)
    b = RandomBreathing().sample(np.random.default_rng(9), centre=CENTRE)
    assert a == b
    assert BreathingParameters.from_dict(a.to_dict()) == a
    times = np.arange(50) / a.frame_rate
    assert np.array_equal(
        BreathingMotion(a).displacements(times), BreathingMotion(b).displacements(times)
    )


def test_times_past_the_sampled_cycles_wrap_around() -> None:
    motion = _motions(1, seed=6)[0]
    total = motion.total_period_s
    t = np.array([0.3, 1.7])
    assert np.allclose(motion.signal(t), motion.signal(t + total))


def test_bad_parameters_are_rejected() -> None:
    good = RandomBreathing().sample(np.random.default_rng(0)).to_dict()
    for key, value in [("frame_rate", 0.0), ("periods_s", []), ("inhale_fraction", 1.0)]:
        bad = dict(good, **{key: value})
        with pytest.raises(ValueError):
            BreathingParameters.from_dict(bad)
    with pytest.raises(ValueError):
        _motions(1)[0].frame_times(0)
    with pytest.raises(ValueError):
        _motions(1)[0].signal([-1.0])
