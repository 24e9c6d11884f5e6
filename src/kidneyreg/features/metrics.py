"""Segmentation metrics of the feature network, with the paper's definitions.

The paper (Experiments, "Evaluation on Feature Network") evaluates with ``Y`` the ground truth and
``Y*`` the prediction::

    Dice = 2 |Y ∩ Y*| / (|Y| + |Y*|)
    Sensitivity = |Y ∩ Y*| / |Y|
    "Specificity" = |Y ∩ Y*| / |Y*|

The third ratio is what is usually called *precision* (positive predictive value): the share of
the predicted kidney that is kidney. (The usual specificity, true negatives over negatives, would
be close to 1 for any kidney mask and say little.) It is named :func:`precision` here and reported
under the paper's name "specificity" in the paper's tables, with this note.

Empty cases: when a ratio's denominator is empty the ratio is undefined and returned as NaN, except
Dice of two empty masks, which is 1 (perfect agreement that there is no kidney). Averages over
cases should skip NaN (``numpy.nanmean``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

__all__ = [
    "SegmentationScores",
    "dice",
    "overlap_counts",
    "paper_specificity",
    "precision",
    "segmentation_scores",
    "sensitivity",
]


def _binary(values: ArrayLike | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return np.asarray(values.detach().cpu().numpy() != 0)
    return np.asarray(values) != 0


def overlap_counts(
    prediction: ArrayLike | torch.Tensor, truth: ArrayLike | torch.Tensor
) -> tuple[int, int, int]:
    """``(|Y ∩ Y*|, |Y*|, |Y|)``: overlap, predicted and true voxel counts (nonzero = inside).

    Raises:
        ValueError: If the shapes differ.

    Example:
        >>> overlap_counts([1, 1, 0, 0], [1, 0, 1, 0])
        (1, 2, 2)
    """
    pred = _binary(prediction)
    true = _binary(truth)
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {true.shape} shapes differ")
    return (
        int(np.count_nonzero(pred & true)),
        int(np.count_nonzero(pred)),
        int(np.count_nonzero(true)),
    )


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator) / float(denominator) if denominator else float("nan")


def dice(prediction: ArrayLike | torch.Tensor, truth: ArrayLike | torch.Tensor) -> float:
    """Dice ``2 |Y ∩ Y*| / (|Y| + |Y*|)``; 1 when both are empty.

    Example:
        >>> dice([1, 1, 0, 0], [1, 0, 1, 0])
        0.5
    """
    inter, n_pred, n_true = overlap_counts(prediction, truth)
    return 1.0 if n_pred + n_true == 0 else 2.0 * inter / (n_pred + n_true)


def sensitivity(prediction: ArrayLike | torch.Tensor, truth: ArrayLike | torch.Tensor) -> float:
    """Sensitivity (recall) ``|Y ∩ Y*| / |Y|``; NaN when the ground truth is empty.

    Example:
        >>> sensitivity([1, 1, 1, 0], [1, 0, 0, 0])
        1.0
    """
    inter, _, n_true = overlap_counts(prediction, truth)
    return _ratio(inter, n_true)


def precision(prediction: ArrayLike | torch.Tensor, truth: ArrayLike | torch.Tensor) -> float:
    """Precision ``|Y ∩ Y*| / |Y*|``, the paper's "specificity"; NaN when the prediction is empty.

    Example:
        >>> precision([1, 1, 1, 0], [1, 0, 0, 0])
        0.3333333333333333
    """
    inter, n_pred, _ = overlap_counts(prediction, truth)
    return _ratio(inter, n_pred)


#: The paper's name for :func:`precision` (see the module docstring).
paper_specificity = precision


@dataclass(frozen=True)
class SegmentationScores:
    """Dice, sensitivity and precision (the paper's "specificity") of one comparison.

    Attributes:
        dice: Dice coefficient.
        sensitivity: ``|Y ∩ Y*| / |Y|``.
        precision: ``|Y ∩ Y*| / |Y*|`` (paper: "specificity").
        n_truth: Ground-truth voxel count.
        n_prediction: Predicted voxel count.
    """

    dice: float
    sensitivity: float
    precision: float
    n_truth: int = 0
    n_prediction: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain dictionary (for JSON / CSV)."""
        return {
            "dice": self.dice,
            "sensitivity": self.sensitivity,
            "precision": self.precision,
            "n_truth": self.n_truth,
            "n_prediction": self.n_prediction,
        }


def segmentation_scores(
    prediction: ArrayLike | torch.Tensor, truth: ArrayLike | torch.Tensor
) -> SegmentationScores:
    """All three metrics at once (one pass over the arrays).

    Example:
        >>> s = segmentation_scores([1, 1, 0, 0], [1, 0, 1, 0])
        >>> s.dice, s.sensitivity, s.precision
        (0.5, 0.5, 0.5)
    """
    inter, n_pred, n_true = overlap_counts(prediction, truth)
    score = 1.0 if n_pred + n_true == 0 else 2.0 * inter / (n_pred + n_true)
    return SegmentationScores(score, _ratio(inter, n_true), _ratio(inter, n_pred), n_true, n_pred)
