"""Free-breathing kidney motion: a random sampler of parameters and a deterministic model.

The CT is a static breath-hold at end-expiration. During the U/S sequence the kidney (and the
visceral compartment around it) moves rigidly relative to the body wall and the probe:
superior-inferior 10-20 mm peak-to-peak, anterior-posterior 2-5 mm, rotation up to about 3 degrees
mostly about the left-right axis, in a quasi-periodic cycle whose period and depth vary from cycle
to cycle. The paper's sequences were acquired at 17-22 frames per second with 58 +- 14 frames per
respiration cycle.

The design follows TorchIO's split: :class:`RandomBreathing` samples a
:class:`BreathingParameters` (all randomness lives there), and :class:`BreathingMotion` applies
the parameters deterministically to any set of time points.

Waveform. Each cycle starts at end-expiration (phase 0) and uses the Lujan-type shape
``s = sin(pi * w(phase)) ** (2 n)``: the high even power makes the curve flat near end-expiration,
giving the long expiratory rest of real breathing, and ``w`` warps the phase so that inspiration
(phase 0 to ``inhale_fraction``) is shorter than expiration. The signal is 0 at end-expiration
(the CT's state) and ``depth`` (about 1) at end-inspiration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kidneyreg.geometry import euler_to_matrix

__all__ = [
    "PAPER_FRAMES_PER_CYCLE",
    "PAPER_FRAME_RATE_RANGE",
    "BreathingMotion",
    "BreathingParameters",
    "RandomBreathing",
]

#: Frame rates of the paper's U/S sequences (frames per second).
PAPER_FRAME_RATE_RANGE = (17.0, 22.0)
#: Frames per respiration cycle in the paper's sequences (mean, standard deviation).
PAPER_FRAMES_PER_CYCLE = (58.0, 14.0)

# Knot spacing (s) of the smooth noise added to the displacement: breathing irregularity that is
# slower than a frame and faster than a cycle.
_NOISE_KNOT_S = 0.25


@dataclass(frozen=True)
class BreathingParameters:
    """Everything that defines one breathing sequence (deterministic once sampled).

    Attributes:
        frame_rate: U/S frames per second.
        periods_s: Duration of each respiration cycle in seconds; times past the last cycle repeat
            the list.
        depths: Relative depth of each cycle (1 = the nominal amplitudes below).
        si_mm: Superior-inferior peak-to-peak excursion at depth 1 (mm, inspiration moves the
            kidney inferiorly, i.e. towards -z in LPS).
        ap_mm: Anterior-posterior excursion at depth 1 (mm, inspiration moves it anteriorly, -y).
        lr_mm: Signed left-right excursion at depth 1 (mm, +x = left).
        rotation_deg: Euler angles (rx, ry, rz) in degrees reached at depth 1, about the centre.
        ap_lag: Phase lag of the A-P component behind the S-I component (fraction of a cycle).
        exponent: ``n`` of the ``sin ** (2 n)`` waveform.
        inhale_fraction: Fraction of the cycle from end-expiration to end-inspiration.
        noise_mm: Standard deviation of the smooth displacement noise (mm, S-I; A-P and L-R
            get a third of it).
        noise_seed: Seed of that noise (a pure function of time once fixed).
        centre: Centre of the rotation in CT world LPS mm (the kidney centroid).
    """

    frame_rate: float
    periods_s: tuple[float, ...]
    depths: tuple[float, ...]
    si_mm: float
    ap_mm: float
    lr_mm: float
    rotation_deg: tuple[float, float, float]
    ap_lag: float
    exponent: float
    inhale_fraction: float
    noise_mm: float
    noise_seed: int
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if self.frame_rate <= 0:
            raise ValueError(f"frame_rate must be positive, got {self.frame_rate}")
        if not self.periods_s or len(self.periods_s) != len(self.depths):
            raise ValueError("periods_s and depths must be non-empty and of equal length")
        if min(self.periods_s) <= 0:
            raise ValueError("every period must be positive")
        if not 0.05 < self.inhale_fraction < 0.95:
            raise ValueError(
                f"inhale_fraction must lie in (0.05, 0.95), got {self.inhale_fraction}"
            )
        if self.exponent < 0.5:
            raise ValueError(f"exponent must be >= 0.5, got {self.exponent}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dictionary of the parameters."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = [float(v) for v in value]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BreathingParameters:
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        for key in ("periods_s", "depths", "rotation_deg", "centre"):
            values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


@dataclass
class BreathingMotion:
    """Deterministic rigid kidney motion in CT world space for given breathing parameters.

    Args:
        params: The sampled parameters.

    Example:
        >>> motion = BreathingMotion(RandomBreathing().sample(np.random.default_rng(0)))
        >>> times = motion.frame_times(100)
        >>> motion.displacements(times).shape
        (100, 4, 4)
    """

    params: BreathingParameters
    _starts: NDArray[np.float64] = field(init=False, repr=False)
    _noise: NDArray[np.float64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        periods = np.asarray(self.params.periods_s, dtype=np.float64)
        self._starts = np.concatenate([[0.0], np.cumsum(periods)])
        # Noise knots for one full pass over the cycle list; times past it wrap around, so the
        # noise stays a pure function of time.
        n_knots = math.ceil(self._starts[-1] / _NOISE_KNOT_S) + 4
        rng = np.random.default_rng(self.params.noise_seed)
        self._noise = rng.standard_normal((n_knots, 3))

    # ------------------------------------------------------------------------------------------
    # time and phase
    # ------------------------------------------------------------------------------------------

    @property
    def total_period_s(self) -> float:
        """Duration of one pass over the sampled cycles (s)."""
        return float(self._starts[-1])

    def frame_times(self, n_frames: int) -> NDArray[np.float64]:
        """Acquisition times (s) of ``n_frames`` frames starting at t = 0 (end-expiration)."""
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        return np.arange(n_frames, dtype=np.float64) / self.params.frame_rate

    def _cycle_and_phase(self, times: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        t = np.asarray(times, dtype=np.float64)
        if np.any(t < 0):
            raise ValueError("breathing times must be >= 0")
        total = self._starts[-1]
        n_cycles = len(self.params.periods_s)
        wraps = np.floor(t / total)
        local = t - wraps * total
        index = np.clip(np.searchsorted(self._starts, local, side="right") - 1, 0, n_cycles - 1)
        phase = (local - self._starts[index]) / np.asarray(self.params.periods_s)[index]
        return index.astype(np.int64), np.clip(phase, 0.0, 1.0)

    def _waveform(self, phase: NDArray[np.float64]) -> NDArray[np.float64]:
        # Piecewise-linear phase warp: [0, a] -> [0, 0.5] (inspiration), [a, 1] -> [0.5, 1].
        a = self.params.inhale_fraction
        warped = np.where(phase < a, 0.5 * phase / a, 0.5 + 0.5 * (phase - a) / (1.0 - a))
        return np.sin(np.pi * warped) ** (2.0 * self.params.exponent)

    def signal(self, times: ArrayLike, *, lag: float = 0.0) -> NDArray[np.float64]:
        """Breathing signal: 0 at end-expiration, the cycle's depth at end-inspiration.

        Args:
            times: Times in seconds (>= 0).
            lag: Phase lag in fractions of a cycle (the signal of ``lag`` cycles earlier).
        """
        t = np.asarray(times, dtype=np.float64)
        if lag:
            index, _ = self._cycle_and_phase(t)
            shift = lag * np.asarray(self.params.periods_s)[index]
            t = np.maximum(t - shift, 0.0)
        index, phase = self._cycle_and_phase(t)
        return np.asarray(self.params.depths)[index] * self._waveform(phase)

    def _smooth_noise(self, times: NDArray[np.float64]) -> NDArray[np.float64]:
        # Cubic (Catmull-Rom) interpolation of the knots: smooth, deterministic in t.
        local = np.mod(times, self._starts[-1]) / _NOISE_KNOT_S + 1.0
        i = np.floor(local).astype(np.int64)
        f = (local - i)[:, None]
        n = len(self._noise)
        p0, p1, p2, p3 = (self._noise[np.clip(i + k, 0, n - 1)] for k in (-1, 0, 1, 2))
        value = 0.5 * (
            2 * p1
            + (-p0 + p2) * f
            + (2 * p0 - 5 * p1 + 4 * p2 - p3) * f**2
            + (-p0 + 3 * p1 - 3 * p2 + p3) * f**3
        )
        return value * self.params.noise_mm * np.array([1.0 / 3.0, 1.0 / 3.0, 1.0])

    # ------------------------------------------------------------------------------------------
    # motion
    # ------------------------------------------------------------------------------------------

    def translations(self, times: ArrayLike) -> NDArray[np.float64]:
        """Kidney translation (x, y, z) in LPS mm at each time, shape (n, 3)."""
        t = np.atleast_1d(np.asarray(times, dtype=np.float64))
        p = self.params
        s = self.signal(t)
        s_ap = self.signal(t, lag=p.ap_lag)
        shift = np.stack([p.lr_mm * s, -p.ap_mm * s_ap, -p.si_mm * s], axis=1)
        return shift + self._smooth_noise(t)

    def displacements(self, times: ArrayLike) -> NDArray[np.float64]:
        """Rigid kidney displacements ``B(t)`` in CT world, shape (n, 4, 4).

        ``B(t)`` maps a point of the kidney in the CT (end-expiration) to its position at time
        ``t``: a rotation about :attr:`BreathingParameters.centre` followed by a translation. The
        true pose of frame ``k`` is ``inverse(B_k) @ M_probe``.
        """
        t = np.atleast_1d(np.asarray(times, dtype=np.float64))
        p = self.params
        s = self.signal(t)
        angles = np.deg2rad(np.asarray(p.rotation_deg))[None, :] * s[:, None]
        shift = self.translations(t)
        centre = np.asarray(p.centre, dtype=np.float64)
        params6 = np.concatenate([angles, np.zeros_like(shift)], axis=1)
        matrices = np.asarray(euler_to_matrix(params6), dtype=np.float64).reshape(-1, 4, 4)
        rotation = matrices[:, :3, :3]
        # x -> R (x - c) + c + shift
        matrices[:, :3, 3] = centre - rotation @ centre + shift
        return matrices

    def cycle_starts(self, n_frames: int) -> list[int]:
        """Frame indices at which a respiration cycle starts (end-expiration), in order.

        A cycle starting at time ``t`` starts at the first frame acquired at or after ``t``.
        """
        duration = (n_frames - 1) / self.params.frame_rate
        starts: list[int] = []
        offset = 0.0
        while offset <= duration + 1e-9:
            for start in self._starts[:-1]:
                t = offset + start
                if t > duration + 1e-9:
                    break
                index = math.ceil(t * self.params.frame_rate - 1e-9)
                if index < n_frames and (not starts or index > starts[-1]):
                    starts.append(index)
            offset += self._starts[-1]
        return starts

    def frames_for_cycles(self, n_cycles: int) -> int:
        """Number of frames covering ``n_cycles`` full cycles plus the first frame of the next."""
        if n_cycles < 1:
            raise ValueError(f"n_cycles must be >= 1, got {n_cycles}")
        periods = self.params.periods_s
        total = sum(periods[i % len(periods)] for i in range(n_cycles))
        return math.ceil(total * self.params.frame_rate - 1e-9) + 1


@dataclass(frozen=True)
class RandomBreathing:
    """Sampler of :class:`BreathingParameters` matching the paper's sequences.

    The mean frames per cycle is drawn around the paper's 58 and divided by a frame rate drawn in
    17-22 fps, which gives mean periods of about 2-5 s (3 s on average); cycle-to-cycle variation
    of period (``period_cv``) and depth (``depth_cv``) comes on top. Together they reproduce the
    paper's 58 +- 14 frames per cycle.

    Attributes:
        frame_rate_range: Frame rate range (uniform), fps.
        frames_per_cycle: Mean and spread of the per-sequence mean frames per cycle.
        period_range_s: Clip range of the per-sequence mean period (s).
        period_cv: Cycle-to-cycle coefficient of variation of the period.
        depth_cv: Cycle-to-cycle coefficient of variation of the depth.
        si_range_mm: S-I peak-to-peak range (uniform), mm.
        ap_range_mm: A-P peak-to-peak range, mm (drawn correlated with S-I).
        lr_max_mm: Largest L-R excursion, mm.
        rx_range_deg: Range of the main rotation, about the L-R axis (degrees, random sign).
        minor_rotation_sd_deg: Standard deviation of the rotations about the other axes.
        n_cycles: Number of distinct cycles sampled before the pattern repeats.

    Example:
        >>> params = RandomBreathing().sample(np.random.default_rng(1), centre=(0.0, 0.0, 0.0))
        >>> 17.0 <= params.frame_rate <= 22.0
        True
    """

    frame_rate_range: tuple[float, float] = PAPER_FRAME_RATE_RANGE
    frames_per_cycle: tuple[float, float] = (58.0, 12.0)
    period_range_s: tuple[float, float] = (2.2, 5.0)
    period_cv: float = 0.12
    depth_cv: float = 0.10
    si_range_mm: tuple[float, float] = (10.0, 20.0)
    ap_range_mm: tuple[float, float] = (2.0, 5.0)
    lr_max_mm: float = 1.5
    rx_range_deg: tuple[float, float] = (1.0, 3.0)
    minor_rotation_sd_deg: float = 0.4
    n_cycles: int = 16

    def sample(
        self, rng: np.random.Generator, *, centre: ArrayLike = (0.0, 0.0, 0.0)
    ) -> BreathingParameters:
        """Draw one set of breathing parameters.

        Args:
            rng: Random generator (the only source of randomness).
            centre: Kidney centroid in CT world LPS mm (centre of the rotation).
        """
        frame_rate = float(rng.uniform(*self.frame_rate_range))
        mean_fpc = float(rng.normal(*self.frames_per_cycle))
        mean_period = float(np.clip(mean_fpc / frame_rate, *self.period_range_s))
        periods = mean_period * np.clip(
            1.0 + self.period_cv * rng.standard_normal(self.n_cycles), 0.7, 1.4
        )
        depths = np.clip(1.0 + self.depth_cv * rng.standard_normal(self.n_cycles), 0.7, 1.3)
        u = float(rng.uniform())
        si = self.si_range_mm[0] + u * (self.si_range_mm[1] - self.si_range_mm[0])
        # A-P correlated with S-I: same quantile plus some independent spread.
        u_ap = float(np.clip(0.7 * u + 0.3 * rng.uniform(), 0.0, 1.0))
        ap = self.ap_range_mm[0] + u_ap * (self.ap_range_mm[1] - self.ap_range_mm[0])
        lr = float(rng.uniform(-self.lr_max_mm, self.lr_max_mm))
        rx = float(rng.uniform(*self.rx_range_deg)) * float(rng.choice([-1.0, 1.0]))
        ry, rz = (
            float(np.clip(rng.normal(0.0, self.minor_rotation_sd_deg), -1.0, 1.0)) for _ in range(2)
        )
        centre_t = tuple(float(c) for c in np.asarray(centre, dtype=np.float64).reshape(3))
        return BreathingParameters(
            frame_rate=frame_rate,
            periods_s=tuple(float(p) for p in periods),
            depths=tuple(float(d) for d in depths),
            si_mm=float(si),
            ap_mm=float(ap),
            lr_mm=lr,
            rotation_deg=(rx, ry, rz),
            ap_lag=float(rng.uniform(0.02, 0.08)),
            exponent=float(rng.choice([2.0, 3.0])),
            inhale_fraction=float(rng.uniform(0.35, 0.45)),
            noise_mm=float(rng.uniform(0.1, 0.3)),
            noise_seed=int(rng.integers(0, 2**31 - 1)),
            centre=centre_t,  # type: ignore[arg-type]
        )
