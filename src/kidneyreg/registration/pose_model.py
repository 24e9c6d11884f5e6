"""The paper's 2-sigma Gaussian model of "initial alignment -> reference plane" offsets.

Methods, "Training Data Generation" and Appendix C: the rigid transforms that take the initial
alignment of each frame to its verified reference plane are modelled parameter by parameter with
Gaussian distributions, and training offsets are drawn within two standard deviations.

In this package's conventions (``docs/architecture.md``) the initial alignment of a target frame is
``M_init = G @ P`` (``G`` the registration grid, ``P`` the frame's U/S image mm -> internal mm map)
and the network's answer for the frame is a rigid ``D`` in internal mm with ``M = G @ D @ P``. So
the offset that takes the initial alignment to the reference pose ``M_ref`` is

    ``D_ref = G^-1 @ M_ref @ P^-1``      (:func:`initial_to_reference`),

and its 6 parameters ``(rx, ry, rz, tx, ty, tz)`` (radians, internal mm) are what
:class:`GaussianPoseModel` fits and samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kidneyreg.geometry import invert_rigid, is_rigid

__all__ = [
    "DEFAULT_MIN_STD_DEG",
    "DEFAULT_MIN_STD_MM",
    "PARAMETER_NAMES",
    "GaussianPoseModel",
    "initial_to_reference",
]

#: Names of the 6 rigid parameters, in order (angles in radians, translations in mm).
PARAMETER_NAMES = ("rx", "ry", "rz", "tx", "ty", "tz")

#: Smallest standard deviation of a rotation parameter (degrees). A small cohort (one patient,
#: one probe placement) has almost no rotation spread; without a floor every generated pair would
#: share one orientation and the network would never learn to correct another.
DEFAULT_MIN_STD_DEG = 2.0
#: Smallest standard deviation of a translation parameter (mm), for the same reason.
DEFAULT_MIN_STD_MM = 2.0

# Rejection sampling redraws values beyond the truncation; each round keeps ~95 % (2 sigma), so
# this bound is never reached in practice and only guards against a non-finite model.
_MAX_REDRAW_ROUNDS = 1000


def initial_to_reference(
    grid_matrix: ArrayLike, P_target: ArrayLike, reference: ArrayLike
) -> NDArray[np.float64]:
    """The offset ``D_ref = G^-1 @ M_ref @ P^-1`` (internal mm): initial -> reference pose.

    It is the network output that is exactly right for the frame: ``G @ D_ref @ P == M_ref``.

    Args:
        grid_matrix: ``G``, the registration grid (internal mm -> CT world mm), 4x4 rigid.
        P_target: ``P``, the frame's U/S image mm -> internal mm map, 4x4 rigid.
        reference: ``M_ref``, the reference pose (U/S image mm -> CT world mm), ``(4, 4)`` or a
            batch ``(..., 4, 4)`` (then ``P_target`` may be batched alike).

    Returns:
        ``D_ref``, float64 of the broadcast batch shape.

    Raises:
        ValueError: If a matrix is not rigid.

    Example:
        >>> from kidneyreg.geometry import euler_to_matrix
        >>> G, P = euler_to_matrix([0, 0, 0.1, 1, 2, 3]), euler_to_matrix([0.2, 0, 0, 0, 4, 5])
        >>> D = euler_to_matrix([0.05, -0.1, 0.02, 3, -2, 1])
        >>> np.allclose(initial_to_reference(G, P, G @ D @ P), D)
        True
    """
    g = np.asarray(grid_matrix, dtype=np.float64)
    p = np.asarray(P_target, dtype=np.float64)
    m = np.asarray(reference, dtype=np.float64)
    for name, matrix in (("grid_matrix", g), ("P_target", p), ("reference", m)):
        if matrix.ndim < 2 or matrix.shape[-2:] != (4, 4) or not is_rigid(matrix):
            raise ValueError(f"{name} must be rigid 4x4 matrices, got shape {matrix.shape}")
    return np.asarray(invert_rigid(g) @ m @ invert_rigid(p), dtype=np.float64)


def _six(values: Sequence[float] | NDArray[Any], name: str) -> tuple[float, ...]:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (6,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be 6 finite numbers, got {values!r}")
    return tuple(float(x) for x in array)


@dataclass(frozen=True)
class GaussianPoseModel:
    """Independent Gaussians on the 6 rigid parameters, sampled within ``truncation`` sigma.

    Attributes:
        mean: Means of ``(rx, ry, rz, tx, ty, tz)`` (radians, mm).
        std: Standard deviations (after the floor of :meth:`fit`), all >= 0.
        truncation: Samples lie within ``mean +- truncation * std`` (2: the paper's "2-sigma").
        n_samples: Number of case-frames the model was fitted to (0 for a hand-made model).
        n_cases: Number of cases they came from.

    Example:
        >>> model = GaussianPoseModel.fit(np.random.default_rng(0).normal(size=(50, 6)))
        >>> model.sample(4, np.random.default_rng(1)).shape
        (4, 6)
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    truncation: float = 2.0
    n_samples: int = 0
    n_cases: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _six(self.mean, "mean"))
        object.__setattr__(self, "std", _six(self.std, "std"))
        if any(s < 0 for s in self.std):
            raise ValueError(f"std must be >= 0, got {self.std}")
        truncation = float(self.truncation)
        if not (math.isfinite(truncation) and truncation > 0):
            raise ValueError(f"truncation must be finite and > 0, got {self.truncation!r}")
        object.__setattr__(self, "truncation", truncation)
        if int(self.n_samples) < 0 or int(self.n_cases) < 0:
            raise ValueError("n_samples and n_cases must be >= 0")
        object.__setattr__(self, "n_samples", int(self.n_samples))
        object.__setattr__(self, "n_cases", int(self.n_cases))

    @classmethod
    def fit(
        cls,
        params: ArrayLike,
        *,
        groups: Sequence[object] | None = None,
        min_std_deg: float = DEFAULT_MIN_STD_DEG,
        min_std_mm: float = DEFAULT_MIN_STD_MM,
        truncation: float = 2.0,
    ) -> GaussianPoseModel:
        """Fit mean and standard deviation per parameter to observed offsets.

        With ``groups`` (e.g. the case of each row), every group weighs the same in total, so a
        long sequence does not outweigh a short one; the standard deviation is the weighted
        population one. Each standard deviation is then raised to at least ``min_std_deg``
        (rotations) or ``min_std_mm`` (translations).

        Args:
            params: ``(N, 6)`` offsets ``(rx, ry, rz, tx, ty, tz)`` (radians, mm), N >= 1.
            groups: Optional group label per row.
            min_std_deg: Floor of the rotation standard deviations, degrees (>= 0).
            min_std_mm: Floor of the translation standard deviations, mm (>= 0).
            truncation: Sampling truncation in standard deviations.

        Raises:
            ValueError: Wrong shape, no rows, non-finite values or negative floors.

        Example:
            >>> rows = np.zeros((3, 6))
            >>> GaussianPoseModel.fit(rows, min_std_mm=1.0).std[3]
            1.0
        """
        data = np.asarray(params, dtype=np.float64)
        if data.ndim != 2 or data.shape[1] != 6 or data.shape[0] < 1:
            raise ValueError(f"params must have shape (N, 6) with N >= 1, got {data.shape}")
        if not np.all(np.isfinite(data)):
            raise ValueError("params must be finite")
        if min_std_deg < 0 or min_std_mm < 0:
            raise ValueError("min_std_deg and min_std_mm must be >= 0")
        n = data.shape[0]
        if groups is None:
            weights = np.full(n, 1.0 / n)
            n_cases = 1
        else:
            labels = list(groups)
            if len(labels) != n:
                raise ValueError(f"{len(labels)} groups for {n} rows")
            counts: dict[object, int] = {}
            for label in labels:
                counts[label] = counts.get(label, 0) + 1
            weights = np.array([1.0 / counts[label] for label in labels]) / len(counts)
            n_cases = len(counts)
        mean = weights @ data
        std = np.sqrt(np.maximum(weights @ (data - mean) ** 2, 0.0))
        floor = np.array([math.radians(min_std_deg)] * 3 + [float(min_std_mm)] * 3)
        return cls(
            tuple(mean),
            tuple(np.maximum(std, floor)),
            truncation=truncation,
            n_samples=n,
            n_cases=n_cases,
        )

    def sample(self, n: int, rng: np.random.Generator) -> NDArray[np.float64]:
        """Draw ``n`` parameter vectors, each parameter within ``mean +- truncation * std``.

        Values beyond the truncation are redrawn (a truncated Gaussian), so the result depends
        only on ``rng``'s state: the same seed gives the same samples.

        Args:
            n: Number of samples (>= 0).
            rng: The random generator (consumed).

        Returns:
            float64 ``(n, 6)``.

        Example:
            >>> model = GaussianPoseModel((0,) * 6, (0.1, 0.1, 0.1, 2, 2, 2))
            >>> a = model.sample(3, np.random.default_rng(7))
            >>> bool(np.all(a == model.sample(3, np.random.default_rng(7))))
            True
        """
        if int(n) < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        mean = np.asarray(self.mean)
        std = np.asarray(self.std)
        out = mean + std * rng.standard_normal((int(n), 6))
        for _ in range(_MAX_REDRAW_ROUNDS):
            outside = np.abs(out - mean) > self.truncation * std
            count = int(outside.sum())
            if count == 0:
                return out
            # Redraw exactly the rejected entries, in row-major order, from the same stream.
            rows, cols = np.nonzero(outside)
            out[rows, cols] = mean[cols] + std[cols] * rng.standard_normal(count)
        raise RuntimeError("truncated Gaussian sampling did not converge")

    @property
    def bounds(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """``(low, high)`` per parameter: ``mean -+ truncation * std``."""
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        return mean - self.truncation * std, mean + self.truncation * std

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (stored in checkpoints, which are loaded with ``weights_only``).

        Example:
            >>> m = GaussianPoseModel((0,) * 6, (1,) * 6)
            >>> GaussianPoseModel.from_dict(m.to_dict()) == m
            True
        """
        return {
            "parameters": list(PARAMETER_NAMES),
            "units": ["rad"] * 3 + ["mm"] * 3,
            "mean": list(self.mean),
            "std": list(self.std),
            "truncation": self.truncation,
            "n_samples": self.n_samples,
            "n_cases": self.n_cases,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GaussianPoseModel:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: Missing keys or values of the wrong shape.
        """
        try:
            return cls(
                tuple(data["mean"]),
                tuple(data["std"]),
                truncation=float(data.get("truncation", 2.0)),
                n_samples=int(data.get("n_samples", 0)),
                n_cases=int(data.get("n_cases", 0)),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a pose model dictionary ({error})") from None

    def describe(self) -> str:
        """One line per parameter: mean and std in degrees or mm (for logs and reports).

        Example:
            >>> print(GaussianPoseModel((0,) * 6, (0,) * 3 + (1,) * 3).describe().splitlines()[3])
            tx: mean 0.00 mm, std 1.00 mm
        """
        lines = []
        for i, name in enumerate(PARAMETER_NAMES):
            scale, unit = (180.0 / math.pi, "deg") if i < 3 else (1.0, "mm")
            mean, std = self.mean[i] * scale, self.std[i] * scale
            lines.append(f"{name}: mean {mean:.2f} {unit}, std {std:.2f} {unit}")
        return "\n".join(lines)
