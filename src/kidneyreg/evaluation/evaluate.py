"""Evaluate predicted frame poses against a case folder: per-frame metrics and their summary.

Metrics per frame (definitions in :mod:`kidneyreg.evaluation.metrics`):

* ``hd_ctus``, ``mcd_ctus``: contour distances between the CT kidney mask resliced on the U/S
  frame by the predicted pose (nearest neighbour) and the U/S kidney mask (the paper's CT-US).
* With the ground truth (simulated cases, ``ground_truth.json``):
  ``hd_ctct``, ``mcd_ctct``: the CT kidney mask resliced by the predicted pose vs resliced by the
  true pose (the paper's CT-CT); ``tre`` / ``tre_max``: mean / largest target registration error
  over the pixels inside the U/S kidney mask; ``plane_angle_deg``; ``rotation_error_deg``;
  ``translation_error_mm`` at the U/S kidney centroid.

A metric is NaN (``null`` in JSON) on a frame where it is undefined: a contour metric when the
kidney is not in view on one of the two images, a kidney-pixel metric (``tre``, ``tre_max``,
``translation_error_mm``) when the U/S kidney mask of the frame is empty. Summaries leave those
frames out and count them.

Case folder (DESIGN.md section 2): ``ct_kidney_mask.nii.gz``, ``us.nii.gz`` (only its grid is
used), ``us_kidney_mask.nii.gz`` and, optionally, ``ground_truth.json``. ``ct.nii.gz`` is not read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray

from kidneyreg.errors import InputError
from kidneyreg.evaluation.contours import mask_points_mm
from kidneyreg.evaluation.metrics import (
    Summary,
    contour_distances,
    plane_angle_deg,
    point_errors_mm,
    rotation_error_deg,
    summarise,
)
from kidneyreg.geometry import is_rigid, resample_on_frames
from kidneyreg.io.atomic import atomic_write_text
from kidneyreg.io.image import read_mask
from kidneyreg.io.transforms import TransformSequence, read_transforms_json
from kidneyreg.io.us import read_us_mask, read_us_sequence

__all__ = [
    "CASE_FILES",
    "CTUS_METRICS",
    "GROUND_TRUTH_METRICS",
    "METRIC_UNITS",
    "EvaluationResult",
    "evaluate_case",
    "evaluate_frames",
]

#: Metrics that need only the case's masks.
CTUS_METRICS: tuple[str, ...] = ("hd_ctus", "mcd_ctus")
#: Metrics that need the true poses (``ground_truth.json``).
GROUND_TRUTH_METRICS: tuple[str, ...] = (
    "hd_ctct",
    "mcd_ctct",
    "tre",
    "tre_max",
    "plane_angle_deg",
    "rotation_error_deg",
    "translation_error_mm",
)
#: Unit of each metric, for tables.
METRIC_UNITS: dict[str, str] = {
    "hd_ctus": "mm",
    "mcd_ctus": "mm",
    "hd_ctct": "mm",
    "mcd_ctct": "mm",
    "tre": "mm",
    "tre_max": "mm",
    "plane_angle_deg": "deg",
    "rotation_error_deg": "deg",
    "translation_error_mm": "mm",
}
#: File names inside a case folder.
CASE_FILES: dict[str, str] = {
    "ct_mask": "ct_kidney_mask.nii.gz",
    "us": "us.nii.gz",
    "us_mask": "us_kidney_mask.nii.gz",
    "ground_truth": "ground_truth.json",
}
# Why a frame's value is missing, per metric family, for the table's footnotes.
_MISSING_REASON = {
    "ctus": "kidney not in view on the resliced CT or the U/S mask",
    "ctct": "kidney not in view on the CT resliced by the predicted or the true pose",
    "kidney": "U/S kidney mask empty (kidney not in view)",
}
_FAMILY = {
    "hd_ctus": "ctus",
    "mcd_ctus": "ctus",
    "hd_ctct": "ctct",
    "mcd_ctct": "ctct",
    "tre": "kidney",
    "tre_max": "kidney",
    "translation_error_mm": "kidney",
}


def _json_number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(eq=False)
class EvaluationResult:
    """Per-frame metrics of one case and their summary.

    Attributes:
        values: Metric name -> float64 ``(n_frames,)`` per-frame values (NaN where undefined), in
            the order of :data:`CTUS_METRICS` then :data:`GROUND_TRUTH_METRICS` (present only
            with the ground truth).
        has_ground_truth: Whether the true poses were available.
        notes: Human-readable remarks (e.g. "no ground truth: CT-US metrics only").

    Example:
        >>> result = EvaluationResult({"hd_ctus": np.array([1.0, 3.0])}, False)
        >>> result.to_json()["summary"]["hd_ctus"]["mean"]
        2.0
    """

    values: dict[str, NDArray[np.float64]]
    has_ground_truth: bool
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        lengths = {np.asarray(v).shape for v in self.values.values()}
        if len(lengths) > 1 or any(len(shape) != 1 for shape in lengths):
            raise ValueError(f"every metric needs one 1D value per frame, got shapes {lengths}")
        self.values = {k: np.asarray(v, dtype=np.float64) for k, v in self.values.items()}

    @property
    def metrics(self) -> list[str]:
        """Metric names, in table order."""
        return list(self.values)

    @property
    def n_frames(self) -> int:
        """Number of frames evaluated."""
        return len(next(iter(self.values.values()))) if self.values else 0

    def summary(self) -> dict[str, Summary]:
        """Summary (mean, std, median, p95, counts) of every metric over the frames.

        Example:
            >>> EvaluationResult({"tre": np.array([2.0, np.nan])}, True).summary()["tre"].n
            1
        """
        return {name: summarise(values) for name, values in self.values.items()}

    def to_json(self) -> dict[str, Any]:
        """The JSON document of ``kidneyreg evaluate --json`` as plain Python objects.

        ``{"summary": {METRIC: {"mean", "std", "median", "p95"}}, "frames": [{"index": k,
        METRIC: value, ...}, ...]}``; NaN (undefined) values are ``None`` (JSON ``null``).

        Example:
            >>> EvaluationResult({"tre": np.array([2.0])}, True).to_json()["frames"]
            [{'index': 0, 'tre': 2.0}]
        """
        summary = {
            name: {
                "mean": _json_number(stats.mean),
                "std": _json_number(stats.std),
                "median": _json_number(stats.median),
                "p95": _json_number(stats.p95),
            }
            for name, stats in self.summary().items()
        }
        frames: list[dict[str, Any]] = []
        for k in range(self.n_frames):
            entry: dict[str, Any] = {"index": k}
            entry.update({name: _json_number(float(v[k])) for name, v in self.values.items()})
            frames.append(entry)
        return {"summary": summary, "frames": frames}

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (indented JSON).

        Example:
            >>> result.write_json("out/metrics.json")  # doctest: +SKIP
            PosixPath('out/metrics.json')
        """
        text = json.dumps(self.to_json(), indent=2, allow_nan=False)
        return atomic_write_text(path, text + "\n")

    def format_table(self) -> str:
        """The summary as a plain-text table (metric, mean ± std, median, p95, frames used).

        Example:
            >>> print(EvaluationResult({"tre": np.array([1.0, 3.0])}, True).format_table())
            metric     mean ± std  median   p95  frames
            tre (mm)  2.00 ± 1.00    2.00  2.90     2/2
        """
        header = ("metric", "mean ± std", "median", "p95", "frames")
        rows: list[tuple[str, ...]] = []
        # Metrics missing on the same number of frames for the same reason share one footnote.
        missing: dict[tuple[int, str], list[str]] = {}
        for name, stats in self.summary().items():
            label = f"{name} ({METRIC_UNITS[name]})" if name in METRIC_UNITS else name
            if stats.n == 0:
                shown = ("n/a", "n/a", "n/a")
            else:
                shown = (
                    f"{stats.mean:.2f} ± {stats.std:.2f}",
                    f"{stats.median:.2f}",
                    f"{stats.p95:.2f}",
                )
            rows.append((label, *shown, f"{stats.n}/{stats.n + stats.n_missing}"))
            if stats.n_missing:
                reason = _MISSING_REASON.get(_FAMILY.get(name, ""), "undefined")
                missing.setdefault((stats.n_missing, reason), []).append(name)
        footnotes = [
            f"{', '.join(names)}: {count} frame(s) left out ({reason})"
            for (count, reason), names in missing.items()
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            ).rstrip()
            for row in [header, *rows]
        ]
        return "\n".join([*lines, *footnotes, *self.notes])


def _masks(us_masks: ArrayLike) -> NDArray[np.bool_]:
    array = np.asarray(us_masks)
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(f"us_masks must have shape (n_frames, rows, cols), got {array.shape}")
    return array != 0


def _poses(matrices: ArrayLike, n_frames: int, name: str) -> NDArray[np.float64]:
    array = np.asarray(matrices, dtype=np.float64)
    if array.shape != (n_frames, 4, 4):
        raise ValueError(f"{name} must have shape ({n_frames}, 4, 4), got {array.shape}")
    if not is_rigid(array):
        raise ValueError(f"{name} must be rigid 4x4 matrices")
    return array


def evaluate_frames(
    ct_mask: sitk.Image,
    us_masks: ArrayLike,
    pixel_size: Sequence[float],
    predicted: ArrayLike,
    true: ArrayLike | None = None,
) -> EvaluationResult:
    """Metrics of predicted frame poses from in-memory data (what :func:`evaluate_case` reads).

    Args:
        ct_mask: The CT kidney mask (3D, any geometry; nonzero = kidney), in CT world space.
        us_masks: ``(n_frames, rows, cols)`` U/S kidney masks.
        pixel_size: ``(sx, sy)`` mm of the U/S frames.
        predicted: ``(n_frames, 4, 4)`` predicted poses (U/S image mm -> CT world mm).
        true: ``(n_frames, 4, 4)`` true poses, or None (CT-US metrics only).

    Returns:
        The per-frame metrics.

    Raises:
        ValueError: Shapes that do not match or matrices that are not rigid.

    Example:
        >>> result = evaluate_frames(ct_mask, us_masks, (0.5, 0.5), pred, true)  # doctest: +SKIP
        >>> result.summary()["tre"].mean  # doctest: +SKIP
        1.7
    """
    if not isinstance(ct_mask, sitk.Image):
        raise TypeError(f"ct_mask must be a SimpleITK image, got {type(ct_mask).__name__}")
    masks = _masks(us_masks)
    n_frames, rows, cols = masks.shape
    size = (float(pixel_size[0]), float(pixel_size[1]))
    estimated = _poses(predicted, n_frames, "predicted")
    reference = None if true is None else _poses(true, n_frames, "true")
    # Binarise first so that label maps and 0/255 masks reslice to 0/1 with nearest neighbour.
    binary = sitk.Cast(ct_mask != 0, sitk.sitkUInt8)
    ct_on_est = resample_on_frames(binary, estimated, (rows, cols), size, interpolator="nearest")

    values: dict[str, NDArray[np.float64]] = {
        name: np.full(n_frames, np.nan) for name in CTUS_METRICS
    }
    for k in range(n_frames):
        values["hd_ctus"][k], values["mcd_ctus"][k] = contour_distances(
            ct_on_est[k], masks[k], size
        )
    notes: list[str] = []
    if reference is None:
        notes.append("no ground truth: CT-US metrics only (CT-CT, TRE and pose errors need it)")
        return EvaluationResult(values, False, notes)

    values.update({name: np.full(n_frames, np.nan) for name in GROUND_TRUTH_METRICS})
    ct_on_true = resample_on_frames(binary, reference, (rows, cols), size, interpolator="nearest")
    values["plane_angle_deg"][:] = plane_angle_deg(estimated, reference)
    values["rotation_error_deg"][:] = rotation_error_deg(estimated, reference)
    for k in range(n_frames):
        values["hd_ctct"][k], values["mcd_ctct"][k] = contour_distances(
            ct_on_est[k], ct_on_true[k], size
        )
        kidney = mask_points_mm(masks[k], size)
        if len(kidney) == 0:
            continue
        errors = point_errors_mm(estimated[k], reference[k], kidney)
        values["tre"][k] = errors.mean()
        values["tre_max"][k] = errors.max()
        # The error at the centroid is the norm of the mean error vector (poses are affine).
        centre = kidney.mean(axis=0)
        values["translation_error_mm"][k] = point_errors_mm(
            estimated[k], reference[k], centre[None]
        )[0]
    return EvaluationResult(values, True, notes)


def _prediction(pred: TransformSequence | str | Path, n_frames: int) -> TransformSequence:
    """The prediction, read and checked against the case's frame count."""
    if isinstance(pred, TransformSequence):
        if pred.n_frames != n_frames:
            raise InputError(
                pred.source, f"has {pred.n_frames} frames, the U/S sequence has {n_frames}"
            )
        for k, matrix in enumerate(pred.matrices):
            if not is_rigid(matrix):
                raise InputError(pred.source, f"frame {k} matrix is not a rigid 4x4 transform")
        return pred
    if isinstance(pred, (str, Path)):
        return read_transforms_json(pred, expected_frames=n_frames)
    raise TypeError(f"pred must be a TransformSequence or a path, got {type(pred).__name__}")


def evaluate_case(
    case_dir: str | Path,
    pred: TransformSequence | str | Path,
    *,
    reference: TransformSequence | str | Path | None = None,
) -> EvaluationResult:
    """Evaluate predicted frame poses against a case folder of DESIGN.md section 2.

    Args:
        case_dir: The case folder (``ct_kidney_mask.nii.gz``, ``us.nii.gz``,
            ``us_kidney_mask.nii.gz``, optionally ``ground_truth.json``).
        pred: The predicted poses: a transforms file (``transforms.json``) or a
            :class:`~kidneyreg.io.transforms.TransformSequence`, one pose per U/S frame.
        reference: The true poses; None reads ``ground_truth.json`` of the case when present
            (otherwise only CT-US metrics are computed and the result says so).

    Returns:
        The per-frame metrics and their summary.

    Raises:
        InputError: A missing or unreadable case file, masks that do not match the U/S grid, or
            a prediction (or reference) with the wrong frame count, schema or non-rigid matrices,
            each as one line naming the file.

    Example:
        >>> result = evaluate_case("cohort/case_000", "out/transforms.json")  # doctest: +SKIP
        >>> print(result.format_table())  # doctest: +SKIP
    """
    folder = Path(case_dir)
    if not folder.is_dir():
        raise InputError(folder, "case folder does not exist")
    us_path = folder / CASE_FILES["us"]
    sequence = read_us_sequence(us_path)
    n_frames = sequence.n_frames
    predicted = _prediction(pred, n_frames)
    truth: TransformSequence | None
    if reference is None:
        gt_path = folder / CASE_FILES["ground_truth"]
        truth = (
            read_transforms_json(gt_path, expected_frames=n_frames) if gt_path.exists() else None
        )
    else:
        truth = _prediction(reference, n_frames)
    us_masks = read_us_mask(folder / CASE_FILES["us_mask"], sequence)
    pixel_size = sequence.pixel_size
    del sequence  # only its grid is needed; free the B-mode frames before reslicing
    ct_mask = read_mask(folder / CASE_FILES["ct_mask"], kind="CT kidney mask")
    result = evaluate_frames(
        ct_mask,
        us_masks,
        pixel_size,
        predicted.matrices,
        None if truth is None else truth.matrices,
    )
    if truth is None:
        result.notes[:] = [
            f"no {CASE_FILES['ground_truth']} in {folder}: CT-US metrics only "
            "(CT-CT, TRE and pose errors need the ground truth)"
        ]
    return result
