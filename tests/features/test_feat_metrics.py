"""Dice, sensitivity and the paper's "specificity" (precision) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kidneyreg.features.metrics import (
    dice,
    overlap_counts,
    paper_specificity,
    precision,
    segmentation_scores,
    sensitivity,
)


def test_hand_computed_values() -> None:
    # Truth Y: 4 voxels; prediction Y*: 5 voxels; overlap 3.
    truth = np.zeros((3, 4), dtype=np.uint8)
    truth[0, :4] = 1
    pred = np.zeros((3, 4), dtype=bool)
    pred[0, 1:4] = True
    pred[1, 0:2] = True
    assert overlap_counts(pred, truth) == (3, 5, 4)
    assert dice(pred, truth) == pytest.approx(2 * 3 / (4 + 5))
    assert sensitivity(pred, truth) == pytest.approx(3 / 4)
    assert precision(pred, truth) == pytest.approx(3 / 5)
    assert paper_specificity is precision
    scores = segmentation_scores(pred, truth)
    assert (scores.dice, scores.sensitivity, scores.precision) == pytest.approx(
        (6 / 9, 3 / 4, 3 / 5)
    )
    assert (scores.n_truth, scores.n_prediction) == (4, 5)


def test_sensitivity_and_precision_are_not_swapped() -> None:
    # Over-segmentation: everything found (sensitivity 1), half of the prediction wrong.
    truth = np.array([1, 1, 0, 0])
    pred = np.array([1, 1, 1, 1])
    assert sensitivity(pred, truth) == 1.0
    assert precision(pred, truth) == 0.5


def test_torch_tensors_and_nonzero_values_count_as_inside() -> None:
    truth = torch.tensor([[0.0, 2.0], [5.0, 0.0]])
    pred = torch.tensor([[True, True], [False, False]])
    assert dice(pred, truth) == pytest.approx(0.5)


def test_empty_cases() -> None:
    empty = np.zeros(5)
    some = np.array([0, 1, 1, 0, 0])
    assert dice(empty, empty) == 1.0
    both = segmentation_scores(empty, empty)
    assert math.isnan(both.sensitivity) and math.isnan(both.precision)
    assert dice(empty, some) == 0.0 and sensitivity(empty, some) == 0.0
    assert math.isnan(precision(empty, some))
    assert dice(some, empty) == 0.0 and precision(some, empty) == 0.0
    assert math.isnan(sensitivity(some, empty))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros(3), np.zeros(4))
