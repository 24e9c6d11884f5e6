"""Evaluation of registrations: contour distances, pose errors and case evaluation (issue 7).

* :mod:`kidneyreg.evaluation.contours`: kidney contours of 2D masks and their points in mm.
* :mod:`kidneyreg.evaluation.metrics`: Hausdorff and mean contour distance, TRE, plane and
  rotation angles, translation error, summaries.
* :mod:`kidneyreg.evaluation.evaluate`: metrics of predicted poses on a case folder
  (``kidneyreg evaluate``).

Example:
    >>> from kidneyreg.evaluation import evaluate_case
    >>> evaluate_case("cohort/case_000", "out/transforms.json").summary()  # doctest: +SKIP
"""

from kidneyreg.evaluation.contours import contour_mask, contour_points_mm, mask_points_mm
from kidneyreg.evaluation.evaluate import (
    CTUS_METRICS,
    GROUND_TRUTH_METRICS,
    EvaluationResult,
    evaluate_case,
    evaluate_frames,
)
from kidneyreg.evaluation.metrics import (
    ContourDistances,
    Summary,
    contour_distances,
    hausdorff_distance,
    mean_contour_distance,
    plane_angle_deg,
    point_errors_mm,
    rotation_error_deg,
    summarise,
    translation_error_mm,
)

__all__ = [
    "CTUS_METRICS",
    "GROUND_TRUTH_METRICS",
    "ContourDistances",
    "EvaluationResult",
    "Summary",
    "contour_distances",
    "contour_mask",
    "contour_points_mm",
    "evaluate_case",
    "evaluate_frames",
    "hausdorff_distance",
    "mask_points_mm",
    "mean_contour_distance",
    "plane_angle_deg",
    "point_errors_mm",
    "rotation_error_deg",
    "summarise",
    "translation_error_mm",
]
