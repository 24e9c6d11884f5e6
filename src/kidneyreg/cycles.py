"""Breathing-cycle detection from the U/S sequence alone.

The paper's one-cycle transfer learning adapts the pretrained model on the windows of the first
respiration cycle of the sequence, so the pipeline needs that cycle's boundaries without any
external respiratory trace. Two steps:

1. :func:`breathing_signal` turns the sequence into a 1D breathing surrogate. With kidney masks
   (or soft feature maps) it is the kidney centroid track projected on its main direction of
   motion (PCA of the (u, v) track in mm); without them, the first principal component of the
   blurred, downsampled frames, scaled and signed by how that component moves the image content
   (its projection on the mean image's gradients). Either way the sign is fixed by geometry: the
   signal increases when the kidney moves towards -u (towards -v when the motion is mostly along
   depth). In the default sagittal pose (u superior, v posterior) that is inspiration, which moves
   the kidney inferiorly and anteriorly, so the signal is low at end-expiration like the
   simulator's breathing signal.
2. :func:`detect_cycles` finds the period (autocorrelation), the end-inspiration extrema
   (``scipy.signal.find_peaks`` with a distance tied to the period) and the end-expiration
   instants between them, the cycle boundaries.

Cycle boundary. A cycle starts at end-expiration, as in :mod:`kidneyreg.simulate.breathing`:
frame ``ceil(t)`` for an end-expiration instant ``t`` (in frames), i.e. the first frame acquired
at or after it. End-expiration is a long, flat rest, so its instant cannot be read off the
minimum of a noisy trace (a few % of noise moves the minimum by many frames). It is located from
the two well-defined edges around it instead. Each edge (expiration before the rest, inspiration
after it) is cut at 20, 30, ..., 80 % of its own height (rest level to its end-inspiration
peak); the crossing times obey ``U(c) = B + alpha g(c)`` and ``D(c) = B - beta g(c)``, with
``alpha`` and ``beta`` the two edges' durations and ``g`` one shape for the whole sequence (the
median of ``U - D`` over the rests that have both edges), and ``B`` is their least-squares
solution. For the usual breathing models, where inspiration and expiration trace the same curve
at different speeds (Lujan's ``cos^2n`` with an asymmetric phase, the simulator's model), this is
exactly the end-expiration instant whatever the speeds, periods and depths; for other shapes it
is a consistent point near the start of the inspiratory rise. A rest at either end of the
sequence has a single edge, whose extrapolation amplifies noise: its duration is tied to the
median of that kind of edge (20 % spread, the usual cycle-to-cycle variation).

Which extremum is end-expiration. Breathing rests longer at end-expiration than at
end-inspiration, so the signal spends more time near its end-expiration side: with ``"auto"``
the side holding more than half of the samples (measured over whole periods against the middle
of the 5-95 % range) is end-expiration. Limits: nearly sinusoidal breathing (no rest) or a rest
at end-inspiration makes the rule unreliable or wrong; when the fraction is within 3 % of one
half the geometric sign of :func:`breathing_signal` decides (end-expiration at the minima).
Callers that know better pass ``end_expiration="min"`` or ``"max"``.

Without a frame rate the periods are converted assuming 20 fps (the middle of the paper's
17-22 fps); the result records it (``frame_rate_assumed``). When no breathing can be detected (a
flat or noise-only signal, less than 1.5 periods of data, no consistent period, irregular or
shallow cycles) :func:`detect_cycles` warns with :class:`BreathingNotDetectedWarning` and returns
fixed-length cycles instead (58 frames, the paper's mean, or 3 s of frames when the frame rate is
known).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.ndimage import gaussian_filter, gaussian_filter1d, median_filter
from scipy.signal import detrend, find_peaks

__all__ = [
    "DEFAULT_FRAME_RATE",
    "FALLBACK_CYCLE_S",
    "PAPER_FRAMES_PER_CYCLE",
    "BreathingNotDetectedWarning",
    "CycleDetection",
    "breathing_signal",
    "detect_cycles",
    "first_cycle_frames",
]

#: Frame rate assumed when none is given (fps), the middle of the paper's 17-22 fps.
DEFAULT_FRAME_RATE = 20.0
#: The paper's mean number of U/S frames per respiration cycle (fallback without a frame rate).
PAPER_FRAMES_PER_CYCLE = 58
#: Fallback cycle duration (s) when the frame rate is known (the paper's ~58 frames at ~20 fps).
FALLBACK_CYCLE_S = 3.0

EndExpiration = Literal["auto", "min", "max"]

# Edge levels (fractions of each edge's height) used to locate end-expiration; the steep middle
# of an edge is where the crossings are least sensitive to noise.
_EDGE_LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
# Relative spread of an edge's speed from cycle to cycle (prior of single-edge fits), and the
# smallest crossing-time noise (frames) assumed for them.
_SPEED_SPREAD = 0.2
_MIN_CROSSING_NOISE = 0.3
# Gaussian smoothing of the signal before the crossings: period / 40 (at least one frame), a
# compromise between noise and the blurring of the fast inspiration edge.
_SMOOTH_DIV = 40.0
# Block size (mm) of the image-based surrogate: averages speckle away, keeps a kidney edge.
_IMAGE_BLOCK_MM = 2.0
_MAX_IMAGE_BLOCKS = 4096
# A mask smaller than this fraction of the median mask area is treated as missing.
_MIN_MASK_AREA_FRACTION = 0.25
# Detection thresholds (see detect_cycles).
_MIN_AUTOCORRELATION = 0.4
_MIN_CONTRAST = 1.0
_MIN_SNR = 5.0
_MAX_PERIOD_CV = 0.35
_SIDE_MARGIN = 0.03
# The autocorrelation peak may lie this fraction below min_period_s (cycle-to-cycle jitter).
_PERIOD_SLACK = 0.8


class BreathingNotDetectedWarning(UserWarning):
    """No breathing cycle could be found; fixed-length cycles are used instead."""


@dataclass(frozen=True)
class CycleDetection:
    """Breathing cycles of a U/S sequence.

    Attributes:
        boundaries: Frame indices where a cycle starts (end-expiration), increasing, all in
            ``[0, n_frames)``. Consecutive boundaries delimit one full cycle; frames before the
            first one belong to a cycle that started before the sequence.
        period_frames: Median cycle length in frames.
        confidence: 0 to 1: the autocorrelation at the period times a regularity factor
            ``1 - cv / 0.5`` (cv: coefficient of variation of the cycle lengths); 0 when not
            detected.
        detected: False when the boundaries are the fixed-length fallback.
        n_frames: Length of the analysed signal.
        frame_rate: Frame rate used to convert periods (fps).
        frame_rate_assumed: True when no frame rate was given and 20 fps was assumed.
        end_expiration: Which extremum of the signal is end-expiration (``"min"`` or ``"max"``).
        end_expiration_source: ``"caller"``, ``"asymmetry"``, ``"default"`` (ambiguous
            asymmetry, the geometric sign of :func:`breathing_signal` was trusted) or ``"none"``
            (not detected).
        end_inspirations: Frame indices of the end-inspiration extrema.
        reason: Why breathing was not detected (empty when detected).

    Example:
        >>> t = np.arange(300) / 20.0
        >>> detection = detect_cycles(np.sin(np.pi * t / 3.0) ** 4, frame_rate=20.0)
        >>> detection.detected, detection.boundaries[:3]
        (True, (0, 60, 120))
    """

    boundaries: tuple[int, ...]
    period_frames: float
    confidence: float
    detected: bool
    n_frames: int
    frame_rate: float
    frame_rate_assumed: bool
    end_expiration: Literal["min", "max"] = "min"
    end_expiration_source: str = "default"
    end_inspirations: tuple[int, ...] = ()
    reason: str = ""

    @property
    def period_s(self) -> float:
        """Median cycle length in seconds (at :attr:`frame_rate`)."""
        return self.period_frames / self.frame_rate

    def first_cycle(self) -> tuple[int, int]:
        """``(start, stop)`` of the first full cycle (``stop`` exclusive).

        It runs from the first boundary to the second; with a single boundary it runs one median
        period from it, clipped to the sequence. See :func:`first_cycle_frames` for the frames
        used for adaptation (it also handles sequences that start mid-cycle).

        Example:
            >>> CycleDetection((5, 60, 118), 56.5, 0.9, True, 200, 20.0, False).first_cycle()
            (5, 60)
        """
        start = self.boundaries[0] if self.boundaries else 0
        if len(self.boundaries) >= 2:
            return start, self.boundaries[1]
        return start, min(self.n_frames, start + max(1, round(self.period_frames)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable description (for ``transforms.json`` extras)."""
        return {
            "detected": self.detected,
            "boundaries": [int(b) for b in self.boundaries],
            "period_frames": float(self.period_frames),
            "period_s": float(self.period_s),
            "confidence": float(self.confidence),
            "n_frames": int(self.n_frames),
            "frame_rate": float(self.frame_rate),
            "frame_rate_assumed": self.frame_rate_assumed,
            "end_expiration": self.end_expiration,
            "end_expiration_source": self.end_expiration_source,
            "end_inspirations": [int(p) for p in self.end_inspirations],
            "reason": self.reason,
        }


# ----------------------------------------------------------------------------------------------
# breathing surrogate
# ----------------------------------------------------------------------------------------------


def _check_pixel_size(pixel_size: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(p) for p in pixel_size)
    if len(values) != 2 or not all(math.isfinite(p) and p > 0 for p in values):
        raise ValueError(f"pixel_size must be two positive numbers (sx, sy), got {pixel_size!r}")
    return values[0], values[1]


def _fill_missing(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Linear interpolation over NaN rows along axis 0 (ends hold the nearest valid value)."""
    out = np.array(values, dtype=np.float64)
    flat = out.reshape(len(out), -1)
    valid = np.all(np.isfinite(flat), axis=1)
    if valid.all() or not valid.any():
        return out
    index = np.arange(len(out))
    for column in range(flat.shape[1]):
        flat[:, column] = np.interp(index, index[valid], flat[valid, column])
    return out


def _motion_sign(direction: NDArray[np.float64]) -> float:
    """+1 or -1 so that a signal along ``sign * direction`` rises when moving towards -u (-v).

    The dominant component of the (du, dv) direction decides: towards -u when the motion is
    mostly lateral, towards -v when it is mostly along depth.
    """
    du, dv = float(direction[0]), float(direction[1])
    dominant = du if abs(du) >= abs(dv) else dv
    return -1.0 if dominant > 0 else 1.0


def _mask_track(masks: NDArray[Any], pixel_size: tuple[float, float]) -> NDArray[np.float64]:
    """Weighted kidney centroid (u, v) in mm per frame, NaN where the mask is missing."""
    n, rows, cols = masks.shape
    track = np.full((n, 2), np.nan)
    areas = np.zeros(n)
    u_axis = np.arange(cols, dtype=np.float64) * pixel_size[0]
    v_axis = np.arange(rows, dtype=np.float64) * pixel_size[1]
    for k in range(n):
        weight = np.clip(np.nan_to_num(np.asarray(masks[k], dtype=np.float64)), 0.0, None)
        area = float(weight.sum())
        areas[k] = area
        if area > 0:
            track[k, 0] = float(weight.sum(axis=0) @ u_axis) / area
            track[k, 1] = float(weight.sum(axis=1) @ v_axis) / area
    present = areas > 0
    if present.any():
        # A mask much smaller than usual (the kidney leaving the view, a failed segmentation)
        # has a biased centroid: treat it as missing and interpolate.
        small = areas < _MIN_MASK_AREA_FRACTION * float(np.median(areas[present]))
        track[small] = np.nan
    return track


def _project_track(track: NDArray[np.float64]) -> NDArray[np.float64]:
    """Project a (n, 2) track on its principal direction, signed by :func:`_motion_sign`."""
    centred = track - track.mean(axis=0)
    covariance = centred.T @ centred
    if not np.any(covariance):
        return np.zeros(len(track))
    _, vectors = np.linalg.eigh(covariance)
    direction = vectors[:, -1] * _motion_sign(vectors[:, -1])
    return np.asarray(centred @ direction, dtype=np.float64)


def _block_mean(frames: NDArray[Any], fr: int, fc: int) -> NDArray[np.float64]:
    n, rows, cols = frames.shape
    r, c = rows // fr, cols // fc
    out = np.empty((n, r, c), dtype=np.float64)
    chunk = 64  # bounds memory for long, large sequences
    for start in range(0, n, chunk):
        block = np.asarray(frames[start : start + chunk, : r * fr, : c * fc], dtype=np.float64)
        out[start : start + chunk] = block.reshape(len(block), r, fr, c, fc).mean(axis=(2, 4))
    return out


def _image_signal(frames: NDArray[Any], pixel_size: tuple[float, float]) -> NDArray[np.float64]:
    """Image-based surrogate: first principal component of blurred, block-averaged frames."""
    n = frames.shape[0]
    sx, sy = pixel_size
    rows, cols = frames.shape[1:]
    fc = max(1, round(_IMAGE_BLOCK_MM / sx))
    fr = max(1, round(_IMAGE_BLOCK_MM / sy))
    # Larger blocks for large frames (or pixel units): bounds memory and the PCA's cost.
    excess = math.sqrt(rows * cols / (fr * fc) / _MAX_IMAGE_BLOCKS)
    if excess > 1:
        fc, fr = math.ceil(fc * excess), math.ceil(fr * excess)
    fc, fr = min(fc, cols), min(fr, rows)
    small = _block_mean(frames, fr, fc)
    # Blur by one block: speckle averages out; a kidney edge spreads over a few blocks so that
    # a displacement changes many blocks gradually (a near-linear response).
    small = gaussian_filter(small, sigma=(0.0, 1.0, 1.0), mode="nearest")
    flat = small.reshape(n, -1)
    # Blank (dropped) frames are missing: interpolated after the projection.
    valid = flat.std(axis=1) > 0
    if valid.sum() < 2:
        return np.zeros(n)
    # Per-frame mean removed: global gain flicker is not breathing.
    data = flat - flat.mean(axis=1, keepdims=True)
    mean_image = data[valid].mean(axis=0)
    centred = data[valid] - mean_image
    if centred.shape[0] <= centred.shape[1]:
        gram = centred @ centred.T
        values, vectors = np.linalg.eigh(gram)
        if values[-1] <= 0:
            return np.zeros(n)
        loading = centred.T @ vectors[:, -1]
    else:
        values, vectors = np.linalg.eigh(centred.T @ centred)
        if values[-1] <= 0:
            return np.zeros(n)
        loading = vectors[:, -1]
    loading /= np.linalg.norm(loading)
    scores = np.full(n, np.nan)
    scores[valid] = centred @ loading
    signal = scores
    grid = small.shape[1:]
    if min(grid) >= 2:
        # Direction of motion per unit score: to first order a displacement d changes the image
        # by -d . grad(mean image), so solve [grad_u grad_v] c = -loading (least squares). The
        # score is rescaled to about mm along c and signed like the mask-based surrogate.
        grad_v, grad_u = np.gradient(mean_image.reshape(grid), fr * sy, fc * sx)
        design = np.stack([grad_u.ravel(), grad_v.ravel()], axis=1)
        motion, *_ = np.linalg.lstsq(design, -loading, rcond=None)
        norm = float(np.linalg.norm(motion))
        if math.isfinite(norm) and norm > 0:
            signal = scores * norm * _motion_sign(motion)
    return _fill_missing(signal)


def breathing_signal(
    frames: ArrayLike,
    *,
    masks: ArrayLike | None = None,
    pixel_size: Sequence[float] = (1.0, 1.0),
) -> NDArray[np.float64]:
    """A 1D breathing surrogate of a U/S sequence (about mm along the kidney's main motion).

    With ``masks`` (binary kidney masks or soft feature maps, same shape as ``frames``) it is the
    kidney's weighted centroid, interpolated over frames where the mask is empty or less than a
    quarter of its median area, median-filtered over 3 frames against single-frame segmentation
    outliers, and projected on the track's principal direction. Without masks (or when fewer
    than half of the frames have one, with a warning) it is the first principal component of
    the frames block-averaged to about 2 mm and blurred by one block, which averages speckle
    away; blank frames are interpolated. The sign is geometric: the signal increases when the
    kidney moves towards -u, or towards -v when the motion is mostly along depth (inspiration in
    the default sagittal pose). The image-based surrogate is the less precise one: its first
    component may mix motions of slightly different timing (S-I and a lagging A-P motion), which
    can move the detected boundaries by a few frames; prefer masks or feature maps.

    Args:
        frames: U/S sequence ``(n, rows, cols)``.
        masks: Optional kidney masks or feature maps ``(n, rows, cols)``, values >= 0.
        pixel_size: ``(sx, sy)`` pixel size in mm (columns, rows); the default gives pixels.

    Returns:
        The signal, shape ``(n,)``, float64, centred on its mean.

    Raises:
        ValueError: Wrong dimensionality, mismatched mask shape or a bad pixel size.

    Example:
        >>> frames = np.zeros((40, 32, 32), dtype=np.uint8)
        >>> masks = np.zeros_like(frames)
        >>> for k in range(40):
        ...     masks[k, 10:20, 8 + k % 10 : 18 + k % 10] = 1
        >>> signal = breathing_signal(frames, masks=masks, pixel_size=(0.5, 0.5))
        >>> bool(signal[0] > signal[9])  # moving towards +u lowers the signal
        True
    """
    sizes = _check_pixel_size(pixel_size)
    images = np.asarray(frames)
    if images.ndim != 3 or images.shape[0] < 1:
        raise ValueError(f"frames must be (n, rows, cols) with n >= 1, got shape {images.shape}")
    if masks is not None:
        weights = np.asarray(masks)
        if weights.shape != images.shape:
            raise ValueError(
                f"masks must have the frames' shape {images.shape}, got {weights.shape}"
            )
        track = _mask_track(weights, sizes)
        usable = int(np.all(np.isfinite(track), axis=1).sum())
        if usable >= max(2, math.ceil(0.5 * len(track))):
            track = median_filter(_fill_missing(track), size=(3, 1), mode="nearest")
            return _project_track(track)
        warnings.warn(
            f"only {usable} of {len(track)} frames have a usable kidney mask; "
            "using the image-based breathing surrogate",
            UserWarning,
            stacklevel=2,
        )
    if images.shape[0] < 2:
        return np.zeros(images.shape[0])
    return _image_signal(images, sizes)


# ----------------------------------------------------------------------------------------------
# cycle detection
# ----------------------------------------------------------------------------------------------


def _noise_sigma(x: NDArray[np.float64]) -> float:
    """Robust white-noise level from second differences (blind to the smooth breathing)."""
    if len(x) < 3:
        return 0.0
    second = np.diff(x, n=2)
    return float(np.median(np.abs(second - np.median(second))) / 0.6745 / math.sqrt(6.0))


def _autocorrelation(x: NDArray[np.float64], lags: NDArray[np.int64]) -> NDArray[np.float64]:
    """Pearson correlation of the signal with itself shifted by each lag."""
    out = np.zeros(len(lags))
    for i, lag in enumerate(lags):
        a, b = x[:-lag], x[lag:]
        sa, sb = a.std(), b.std()
        if sa > 0 and sb > 0:
            out[i] = float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))
    return out


def _dominant_period(
    x: NDArray[np.float64], min_lag: int, max_lag: int
) -> tuple[float, float] | None:
    """(period in frames, autocorrelation there) from the first strong autocorrelation peak."""
    lowest = max(2, math.floor(_PERIOD_SLACK * min_lag))
    lags = np.arange(lowest - 1, max_lag + 2)
    lags = lags[lags < len(x) - 2]
    if len(lags) < 3:
        return None
    acf = _autocorrelation(x, lags)
    peaks, _ = find_peaks(acf)
    peaks = peaks[(lags[peaks] >= lowest) & (lags[peaks] <= max_lag)]
    if len(peaks) == 0:
        return None
    best = float(acf[peaks].max())
    if best <= 0:
        return None
    # The first peak not much weaker than the best one: with cycle-to-cycle jitter the peak at
    # twice the period can be the strongest, and the period itself is what we want.
    chosen = int(peaks[np.nonzero(acf[peaks] >= 0.5 * best)[0][0]])
    left, mid, right = acf[chosen - 1], acf[chosen], acf[chosen + 1]
    curvature = left - 2 * mid + right
    shift = 0.5 * (left - right) / curvature if curvature < 0 else 0.0
    return float(lags[chosen] + np.clip(shift, -0.5, 0.5)), float(mid)


def _rise_crossing(y: NDArray[np.float64], start: int, peak: int, level: float) -> float | None:
    """Last upward crossing of ``level`` in ``y[start:peak + 1]`` (fractional frame)."""
    below = np.nonzero(y[start : peak + 1] < level)[0]
    if len(below) == 0:
        return None
    i = int(below[-1]) + start
    if i >= peak:
        return None
    return i + (level - y[i]) / (y[i + 1] - y[i])


def _fall_crossing(y: NDArray[np.float64], peak: int, stop: int, level: float) -> float | None:
    """First downward crossing of ``level`` in ``y[peak:stop + 1]`` (fractional frame)."""
    below = np.nonzero(y[peak : stop + 1] < level)[0]
    if len(below) == 0:
        return None
    j = int(below[0]) + peak
    if j <= peak:
        return None
    return j - 1 + (y[j - 1] - level) / (y[j - 1] - y[j])


@dataclass
class _Trough:
    """One end-expiration between (possibly missing) end-inspiration peaks.

    ``rise`` and ``fall`` hold the crossing times of the inspiration edge after it and of the
    expiration edge before it at :data:`_EDGE_LEVELS` (None when not measurable).
    """

    level: float
    rise: NDArray[np.float64] | None = None
    fall: NDArray[np.float64] | None = None


def _edge_crossings(
    y: NDArray[np.float64], low: float, peak: int, bound: int, rising: bool
) -> NDArray[np.float64] | None:
    height = float(y[peak]) - low
    if height <= 0:
        return None
    times = []
    for fraction in _EDGE_LEVELS:
        level = low + fraction * height
        found = (
            _rise_crossing(y, bound, peak, level)
            if rising
            else _fall_crossing(y, peak, bound, level)
        )
        if found is None:
            return None
        times.append(found)
    return np.asarray(times, dtype=np.float64)


def _end_level(y: NDArray[np.float64], segment: slice, peak: int, reference: float) -> float:
    """Rest level of a trough at either end of the sequence, which has only one edge.

    When the sequence starts (ends) at rest, the local minimum is that rest's level; when it
    starts mid-inspiration (ends mid-expiration) the local minimum is part of the edge, and the
    nearest complete trough's level is the better guess.
    """
    local = float(y[segment].min())
    if local <= reference + 0.1 * (float(y[peak]) - reference):
        return local
    return reference


def _inner_troughs(y: NDArray[np.float64], peaks: NDArray[np.int64]) -> list[int]:
    """Index of the lowest sample between each pair of consecutive peaks."""
    return [int(a) + int(np.argmin(y[a : b + 1])) for a, b in itertools.pairwise(peaks.tolist())]


def _rest_baseline(y: NDArray[np.float64], peaks: NDArray[np.int64]) -> NDArray[np.float64]:
    """Slow drift as the line through the end-expiration levels (a constant with one or none).

    End-expiration is the most reproducible breathing position, so drift shows there first; a
    line fitted to the whole signal would instead be tilted by a partial cycle at either end.
    """
    inner = _inner_troughs(y, peaks)
    n = len(y)
    if len(inner) >= 2:
        slope, intercept = np.polyfit(inner, y[inner], 1)
        return np.asarray(intercept + slope * np.arange(n), dtype=np.float64)
    level = float(y[inner[0]]) if inner else float(y.min())
    return np.full(n, level)


def _troughs(y: NDArray[np.float64], peaks: NDArray[np.int64]) -> list[_Trough]:
    """Troughs before, between and after the end-inspiration peaks, with their edge crossings.

    ``y`` has its rest baseline removed, so the end-expiration level is about 0 everywhere.
    """
    n = len(y)
    first, last = int(peaks[0]), int(peaks[-1])
    troughs: list[_Trough] = []
    level = _end_level(y, slice(0, first + 1), first, 0.0)
    troughs.append(_Trough(level, rise=_edge_crossings(y, level, first, 0, True)))
    for j, index in enumerate(_inner_troughs(y, peaks)):
        level = float(y[index])
        troughs.append(
            _Trough(
                level,
                rise=_edge_crossings(y, level, int(peaks[j + 1]), index, True),
                fall=_edge_crossings(y, level, int(peaks[j]), index, False),
            )
        )
    level = _end_level(y, slice(last, n), last, 0.0)
    troughs.append(_Trough(level, fall=_edge_crossings(y, level, last, n - 1, False)))
    return troughs


def _edge_shape(troughs: list[_Trough]) -> NDArray[np.float64]:
    """Common edge shape g: time from end-expiration to each level, per unit edge speed.

    Across a trough with both edges ``U - D = (alpha + beta) g``, so g (up to scale) is the
    median over those troughs of ``U - D`` normalised by its mean; without any, Lujan's
    ``sin(pi w) ** 5`` model.
    """
    shapes = []
    for trough in troughs:
        if trough.rise is None or trough.fall is None:
            continue
        gap = trough.rise - trough.fall
        if np.all(gap > 0) and np.all(np.diff(gap) > 0):
            shapes.append(gap / gap.mean())
    if shapes:
        return np.asarray(np.median(np.stack(shapes), axis=0), dtype=np.float64)
    default = np.arcsin(np.asarray(_EDGE_LEVELS) ** (1.0 / 5.0)) / np.pi
    return np.asarray(default / default.mean(), dtype=np.float64)


def _fit_trough(
    rise: NDArray[np.float64], fall: NDArray[np.float64], shape: NDArray[np.float64]
) -> tuple[float, float, float, float] | None:
    """Least squares of ``U = B + alpha g`` and ``D = B - beta g`` over a trough with both edges.

    Returns ``(B, alpha, beta, rms residual)``, or None for edges of the wrong shape.
    """
    m = len(shape)
    design = np.zeros((2 * m, 3))
    design[:, 0] = 1.0
    design[:m, 1] = shape
    design[m:, 2] = -shape
    times = np.concatenate([rise, fall])
    solution, *_ = np.linalg.lstsq(design, times, rcond=None)
    if np.any(solution[1:] <= 0):
        return None  # a noise wiggle, not a pair of breathing edges
    residual = times - design @ solution
    return (
        float(solution[0]),
        float(solution[1]),
        float(solution[2]),
        float(np.sqrt(np.mean(residual**2))),
    )


def _fit_edge(
    times: NDArray[np.float64],
    shape: NDArray[np.float64],
    sign: float,
    prior: float | None,
    sigma: float,
) -> float | None:
    """End-expiration from one edge, ``t = B + sign * speed * g``.

    Extrapolating one short edge to its rest amplifies the noise of its slope, so the speed is
    pulled towards the median speed of the same kind of edge elsewhere in the sequence (a
    Gaussian prior of 20 % spread, the usual cycle-to-cycle variation), weighed against the
    crossing noise ``sigma`` seen on the troughs with both edges.
    """
    rows = [[1.0, sign * g] for g in shape]
    targets = list(times)
    weights = [1.0 / sigma] * len(shape)
    if prior is not None:
        rows.append([0.0, 1.0])
        targets.append(prior)
        weights.append(1.0 / (_SPEED_SPREAD * prior))
    w = np.asarray(weights)
    solution, *_ = np.linalg.lstsq(
        np.asarray(rows) * w[:, None], np.asarray(targets) * w, rcond=None
    )
    if solution[1] <= 0:
        return None
    return float(solution[0])


def _end_expiration_instants(
    troughs: list[_Trough], shape: NDArray[np.float64]
) -> list[float | None]:
    """End-expiration instant (fractional frame) of every trough, None where not measurable."""
    fits = [
        _fit_trough(t.rise, t.fall, shape) if t.rise is not None and t.fall is not None else None
        for t in troughs
    ]
    complete = [f for f in fits if f is not None]
    rise_prior = float(np.median([f[1] for f in complete])) if complete else None
    fall_prior = float(np.median([f[2] for f in complete])) if complete else None
    sigma = max(_MIN_CROSSING_NOISE, float(np.median([f[3] for f in complete])) if complete else 0)
    instants: list[float | None] = []
    for trough, fit in zip(troughs, fits, strict=True):
        if fit is not None:
            instants.append(fit[0])
        elif trough.rise is not None and trough.fall is None:
            instants.append(_fit_edge(trough.rise, shape, 1.0, rise_prior, sigma))
        elif trough.fall is not None and trough.rise is None:
            instants.append(_fit_edge(trough.fall, shape, -1.0, fall_prior, sigma))
        else:
            instants.append(None)
    return instants


def _end_expiration_side(
    ys: NDArray[np.float64], period: float
) -> tuple[Literal["min", "max"], str]:
    whole = int(math.floor(len(ys) / period) * period) if len(ys) >= period else len(ys)
    part = ys[: max(whole, 2)]
    lo, hi = np.percentile(part, [5.0, 95.0])
    below = float(np.mean(part < 0.5 * (lo + hi)))
    if below > 0.5 + _SIDE_MARGIN:
        return "min", "asymmetry"
    if below < 0.5 - _SIDE_MARGIN:
        return "max", "asymmetry"
    return "min", "default"


def _fallback(
    n: int,
    cycle_frames: int,
    frame_rate: float,
    assumed: bool,
    reason: str,
) -> CycleDetection:
    warnings.warn(
        f"no breathing detected in the U/S sequence ({reason}); "
        f"using fixed cycles of {cycle_frames} frames",
        BreathingNotDetectedWarning,
        stacklevel=4,  # _fallback <- fail <- detect_cycles <- its caller
    )
    return CycleDetection(
        boundaries=tuple(range(0, n, cycle_frames)),
        period_frames=float(cycle_frames),
        confidence=0.0,
        detected=False,
        n_frames=n,
        frame_rate=frame_rate,
        frame_rate_assumed=assumed,
        end_expiration_source="none",
        reason=reason,
    )


def detect_cycles(
    signal: ArrayLike,
    *,
    frame_rate: float | None = None,
    min_period_s: float = 2.0,
    max_period_s: float = 8.0,
    expected_frames: int | None = None,
    end_expiration: EndExpiration = "auto",
) -> CycleDetection:
    """Breathing cycles (boundaries at end-expiration) of a breathing surrogate.

    Steps: NaNs interpolated; linear detrend; period from the first strong peak of the
    autocorrelation between ``min_period_s`` (20 % slack for cycle-to-cycle jitter) and
    ``max_period_s``; Gaussian smoothing over a 40th of the period; end-expiration side from
    the waveform asymmetry unless given (module docstring); end-inspiration peaks with
    ``find_peaks`` (distance half a period, prominence a quarter of the 5-95 % range); drift
    removed as the line through the end-expiration levels; each end-expiration instant from the
    edge crossings around it (module docstring), the boundary being the first frame at or after
    it. An instant up to ``min(3, 0.1 period)`` frames before frame 0 counts as frame 0.

    Breathing is "not detected" when the signal is mostly NaN or flat; shorter than 1.5 shortest
    periods or 1.5 found periods; without an autocorrelation peak of at least 0.4 that exceeds
    the autocorrelation half a period later by at least 1 (a cycle is anti-correlated with its
    own opposite phase; smooth noise and drift rarely are); with cycles shallower than 5 times
    the noise (estimated from second differences); with cycle lengths varying by more than 35 %
    (coefficient of variation); or without one full cycle. Then a
    :class:`BreathingNotDetectedWarning` says so in one line and the boundaries are every
    ``expected_frames`` frames from 0. Limits: slow random drift spanning only two or three
    pseudo-cycles can still pass for breathing.

    Args:
        signal: Breathing surrogate ``(n,)`` (e.g. from :func:`breathing_signal`).
        frame_rate: Frames per second; None assumes 20 fps (recorded in the result).
        min_period_s: Shortest plausible mean breathing period (s).
        max_period_s: Longest plausible mean breathing period (s).
        expected_frames: Cycle length of the fallback in frames; default 58 (the paper's mean)
            or ``round(3 s * frame_rate)`` when the frame rate is given.
        end_expiration: ``"auto"`` (asymmetry rule), ``"min"`` or ``"max"``: which extremum of
            the signal is end-expiration.

    Returns:
        The detection.

    Raises:
        ValueError: Empty or non-1D signal, non-positive frame rate, bad period range, bad
            ``expected_frames`` or ``end_expiration``.

    Example:
        >>> t = np.arange(400) / 20.0  # 20 s at 20 fps, a 3.5 s breathing period
        >>> detection = detect_cycles(np.sin(np.pi * t / 3.5) ** 4, frame_rate=20.0)
        >>> detection.detected, detection.boundaries[:3], detection.period_frames
        (True, (0, 70, 140), 70.0)
    """
    x = np.asarray(signal, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"signal must be a non-empty 1D array, got shape {x.shape}")
    if frame_rate is not None and not (math.isfinite(frame_rate) and frame_rate > 0):
        raise ValueError(f"frame_rate must be positive, got {frame_rate}")
    if not (0 < min_period_s < max_period_s and math.isfinite(max_period_s)):
        raise ValueError(
            f"need 0 < min_period_s < max_period_s, got {min_period_s} and {max_period_s}"
        )
    if expected_frames is not None and expected_frames < 1:
        raise ValueError(f"expected_frames must be >= 1, got {expected_frames}")
    if end_expiration not in ("auto", "min", "max"):
        raise ValueError(f"end_expiration must be 'auto', 'min' or 'max', got {end_expiration!r}")

    n = len(x)
    assumed = frame_rate is None
    fps = DEFAULT_FRAME_RATE if frame_rate is None else float(frame_rate)
    if expected_frames is not None:
        fixed = int(expected_frames)
    elif frame_rate is None:
        fixed = PAPER_FRAMES_PER_CYCLE
    else:
        fixed = max(1, round(FALLBACK_CYCLE_S * fps))

    def fail(reason: str) -> CycleDetection:
        return _fallback(n, fixed, fps, assumed, reason)

    finite = np.isfinite(x)
    if finite.sum() < max(2, 0.5 * n):
        return fail("the breathing signal is mostly missing")
    x = _fill_missing(x)

    min_lag = max(2, math.floor(min_period_s * fps))
    max_lag = math.ceil(max_period_s * fps)
    if n < 1.5 * min_lag:
        return fail(f"{n} frames is less than 1.5 times the shortest period of {min_period_s:g} s")

    detrended = detrend(x, type="linear")
    lo, hi = np.percentile(detrended, [5.0, 95.0])
    spread = float(hi - lo)
    if not spread > 1e-9 * max(1.0, float(np.abs(detrended).max())):
        return fail("the breathing signal is flat")
    noise = _noise_sigma(detrended)

    # Period from a lightly smoothed copy: enough to tame frame-to-frame noise, far below a cycle.
    rough = gaussian_filter1d(detrended, sigma=max(1.0, min_lag / 20.0), mode="nearest")
    found = _dominant_period(rough, min_lag, min(max_lag, n - max(8, min_lag // 2)))
    if found is None or found[1] < _MIN_AUTOCORRELATION:
        return fail("no consistent breathing period")
    period, correlation = found
    # A cycle is anti-correlated with itself half a period later; smooth noise or a slow drift
    # that happens to correlate at some lag rarely is (see _MIN_CONTRAST).
    half = _autocorrelation(rough, np.asarray([max(1, round(0.5 * period))]))[0]
    if correlation - half < _MIN_CONTRAST:
        return fail("no consistent breathing period")
    if n < 1.5 * period:
        return fail(f"{n} frames is less than 1.5 breathing periods of {period:.0f} frames")

    sigma = max(1.0, period / _SMOOTH_DIV)
    smooth_detrended = gaussian_filter1d(detrended, sigma=sigma, mode="nearest")
    if end_expiration == "auto":
        side, source = _end_expiration_side(smooth_detrended, period)
    else:
        side, source = end_expiration, "caller"
    # Oriented so that end-expiration is at the minima, end-inspiration at the maxima.
    sign = 1.0 if side == "min" else -1.0
    peaks, _ = find_peaks(
        sign * smooth_detrended, distance=max(1, int(0.5 * period)), prominence=0.25 * spread
    )
    if len(peaks) == 0:
        return fail("no end-inspiration found")
    # Edges are measured on the signal without the linear detrend (which a partial cycle tilts),
    # minus the drift of the end-expiration level.
    y = sign * gaussian_filter1d(x - x.mean(), sigma=sigma, mode="nearest")
    y = y - _rest_baseline(y, peaks)
    reach = max(1, round(0.1 * period))
    peaks = np.asarray(
        [max(0, p - reach) + int(np.argmax(y[max(0, p - reach) : p + reach + 1])) for p in peaks],
        dtype=np.int64,
    )
    troughs = _troughs(y, peaks)
    depths = [float(y[p]) - t.level for p, t in zip(peaks, troughs[1:], strict=True)]
    if np.median(depths) < _MIN_SNR * noise:
        return fail("breathing too shallow compared with the noise")

    shape = _edge_shape(troughs)
    instants = _end_expiration_instants(troughs, shape)
    tolerance = min(3.0, 0.1 * period)
    boundaries: list[int] = []
    for instant in instants:
        if instant is None or instant < -tolerance:
            continue
        index = max(0, math.ceil(instant - 1e-6))
        if index < n and (not boundaries or index > boundaries[-1]):
            boundaries.append(index)
    if len(boundaries) < 2:
        return fail("less than one full breathing cycle found")
    lengths = np.diff(boundaries).astype(np.float64)
    cv = float(lengths.std() / lengths.mean()) if len(lengths) >= 2 else 0.0
    if cv > _MAX_PERIOD_CV:
        return fail(f"irregular cycles (cycle length varies by {100 * cv:.0f} %)")
    confidence = float(np.clip(correlation, 0.0, 1.0) * max(0.0, 1.0 - cv / 0.5))
    return CycleDetection(
        boundaries=tuple(boundaries),
        period_frames=float(np.median(lengths)),
        confidence=confidence,
        detected=True,
        n_frames=n,
        frame_rate=fps,
        frame_rate_assumed=assumed,
        end_expiration=side,
        end_expiration_source=source,
        end_inspirations=tuple(int(p) for p in peaks),
    )


def first_cycle_frames(detection: CycleDetection, n_frames: int) -> NDArray[np.int64]:
    """Frame indices of the first breathing cycle, used for one-cycle adaptation.

    Policy: when the sequence starts at (or within half a period before) a boundary, the frames
    from the first boundary to the second (the first full cycle, as in the paper). When more
    than half a period precedes the first boundary, skipping it would waste more than half a
    cycle of frames, so the frames are instead the first median period from frame 0: they still
    cover every breathing phase once, just not boundary to boundary. Without a second boundary
    the range is one median period from its start. The range is clipped to ``n_frames``.

    Args:
        detection: Result of :func:`detect_cycles`.
        n_frames: Number of frames available.

    Returns:
        Increasing frame indices (int64).

    Raises:
        ValueError: If ``n_frames`` < 1.

    Example:
        >>> detection = CycleDetection((4, 60, 118), 57.0, 0.9, True, 200, 20.0, False)
        >>> frames = first_cycle_frames(detection, 200)
        >>> int(frames[0]), int(frames[-1])
        (4, 59)
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    period = max(1, round(detection.period_frames))
    boundaries = [b for b in detection.boundaries if b < n_frames]
    if not boundaries or boundaries[0] > 0.5 * period:
        start, stop = 0, period
    elif len(boundaries) >= 2:
        start, stop = boundaries[0], boundaries[1]
    else:
        start, stop = boundaries[0], boundaries[0] + period
    return np.arange(start, min(stop, n_frames), dtype=np.int64)
