"""The feature network's tables: the paper's Table 1 and the Appendix E window-size study.

* :func:`feature_table` (Table 1): Dice, sensitivity and the paper's "specificity" (precision,
  see :mod:`kidneyreg.features.metrics`) of the CT and U/S models on held-out case folders. Every
  case is segmented exactly as ``kidneyreg segment`` does it, on its own grid, and compared with
  its ground truth there (CT: every kidney of the case, see
  :func:`kidneyreg.features.data.read_ct_target`; U/S: the kidney mask of every frame). The
  numbers are means over cases (each case's voxels pooled).
* :func:`window_study` (Appendix E): one U/S network trained per window size (1, 3, 5, 7, 9 in
  the paper) with otherwise identical settings, evaluated the same way.

Held-out means: cases of patients the model never saw. Simulate the test cohort with another seed
than the training cohort (``benchmarks/bench_features.py`` does). :func:`format_table` prints a
Markdown table with the paper's values beside ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from kidneyreg.features.data import CaseFiles, find_cases, read_ct_target
from kidneyreg.features.infer import FeatureModel, load_feature_model, predict_ct, predict_us
from kidneyreg.features.metrics import SegmentationScores, segmentation_scores
from kidneyreg.features.train import TrainSettings, default_train_settings, train_from_folder
from kidneyreg.io.image import read_ct
from kidneyreg.io.us import read_us_mask, read_us_sequence

__all__ = [
    "PAPER_TABLE_1",
    "PAPER_WINDOW_STUDY",
    "CaseScore",
    "TableRow",
    "evaluate_model",
    "feature_table",
    "format_table",
    "summarize",
    "window_study",
]

#: The paper's Table 1: (Dice, sensitivity, "specificity").
PAPER_TABLE_1 = {"CT": (0.9688, 0.9711, 0.9667), "U/S": (0.9639, 0.9736, 0.9560)}
#: The paper's Appendix E table, by window size.
PAPER_WINDOW_STUDY = {
    1: (0.9391, 0.9492, 0.9455),
    3: (0.9543, 0.9714, 0.9407),
    5: (0.9639, 0.9736, 0.9560),
    7: (0.9604, 0.9675, 0.9561),
    9: (0.9590, 0.9656, 0.9544),
}


@dataclass(frozen=True)
class CaseScore:
    """The scores of one case."""

    case: str
    scores: SegmentationScores


@dataclass(frozen=True)
class TableRow:
    """One row of a table: means (and Dice standard deviation) over cases.

    Attributes:
        label: Row label ("CT", "U/S", a window size...).
        n_cases: Number of cases.
        dice: Mean Dice.
        dice_std: Standard deviation of Dice over cases.
        sensitivity: Mean sensitivity (cases without ground truth skipped).
        precision: Mean precision, the paper's "specificity" (cases without prediction skipped).
        paper: The paper's (Dice, sensitivity, specificity) for this row, when it has one.
    """

    label: str
    n_cases: int
    dice: float
    dice_std: float
    sensitivity: float
    precision: float
    paper: tuple[float, float, float] | None = None


def _case_scores_ct(model: FeatureModel, files: CaseFiles, threshold: float) -> SegmentationScores:
    ct = read_ct(files.image)
    # GetArrayFromImage (a copy): a view of a temporary image would dangle.
    truth = sitk.GetArrayFromImage(read_ct_target(files, ct))
    probs = sitk.GetArrayFromImage(predict_ct(model, ct))
    return segmentation_scores(probs >= threshold, truth)


def _case_scores_us(model: FeatureModel, files: CaseFiles, threshold: float) -> SegmentationScores:
    sequence = read_us_sequence(files.image, min_frames=1)
    truth = read_us_mask(files.mask, sequence)
    return segmentation_scores(predict_us(model, sequence) >= threshold, truth)


def evaluate_model(
    model: FeatureModel,
    cases: Sequence[CaseFiles],
    *,
    threshold: float = 0.5,
    progress: Callable[[int, CaseScore], None] | None = None,
) -> list[CaseScore]:
    """Score a model on case folders (CT or U/S, after the model's modality).

    Args:
        model: A loaded feature model.
        cases: Cases from :func:`kidneyreg.features.data.find_cases` of the same modality.
        threshold: Probability at or above which a voxel is kidney.
        progress: Called with ``(index, score)`` after each case.

    Returns:
        One score per case.
    """
    scorer = _case_scores_ct if model.modality == "ct" else _case_scores_us
    results = []
    for index, files in enumerate(cases):
        score = CaseScore(files.name, scorer(model, files, threshold))
        results.append(score)
        if progress is not None:
            progress(index, score)
    return results


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(
    label: str, scores: Sequence[CaseScore], paper: tuple[float, float, float] | None = None
) -> TableRow:
    """Means over cases of one model's scores.

    Example:
        >>> s = [CaseScore("a", segmentation_scores([1, 0], [1, 0]))]
        >>> summarize("CT", s).dice
        1.0
    """
    dices = [s.scores.dice for s in scores]
    return TableRow(
        label,
        len(scores),
        _nanmean(dices),
        float(np.std(dices)) if dices else float("nan"),
        _nanmean([s.scores.sensitivity for s in scores]),
        _nanmean([s.scores.precision for s in scores]),
        paper,
    )


def format_table(rows: Sequence[TableRow], *, first_column: str = "") -> str:
    """Markdown table of rows, with the paper's values beside ours where known.

    Example:
        >>> row = TableRow("CT", 3, 0.95, 0.01, 0.96, 0.94, PAPER_TABLE_1["CT"])
        >>> print(format_table([row]).splitlines()[2])
        | CT | 3 | 0.9500 ± 0.0100 | 0.9600 | 0.9400 | 0.9688 / 0.9711 / 0.9667 |
    """
    lines = [
        f"| {first_column} | cases | DICE | Sensitivity | Specificity (precision) | "
        "paper DICE / Sens. / Spec. |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        paper = " / ".join(f"{v:.4f}" for v in row.paper) if row.paper else "-"
        lines.append(
            f"| {row.label} | {row.n_cases} | {row.dice:.4f} ± {row.dice_std:.4f} | "
            f"{row.sensitivity:.4f} | {row.precision:.4f} | {paper} |"
        )
    return "\n".join(lines)


def _case_logger(
    log: Callable[[str], None] | None, label: str, total: int
) -> Callable[[int, CaseScore], None] | None:
    if log is None:
        return None
    sink = log

    def report(index: int, score: CaseScore) -> None:
        sink(f"{label} {index + 1}/{total} {score.case}: Dice {score.scores.dice:.4f}")

    return report


def feature_table(
    test_dir: str | Path,
    *,
    ct_model: str | Path | None = None,
    us_model: str | Path | None = None,
    profile: str = "cpu",
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> list[TableRow]:
    """Table 1 on the held-out cases of ``test_dir`` (bundled models when none is given).

    Returns:
        Rows "CT" and "U/S".

    Example:
        >>> print(format_table(feature_table("test_cohort")))  # doctest: +SKIP
    """
    rows = []
    for modality, label, path in (("ct", "CT", ct_model), ("us", "U/S", us_model)):
        model = load_feature_model(path, modality=modality, profile=profile, device=device)
        cases = find_cases(test_dir, modality)
        scores = evaluate_model(model, cases, progress=_case_logger(log, label, len(cases)))
        rows.append(summarize(label, scores, PAPER_TABLE_1[label]))
    return rows


def window_study(
    train_dir: str | Path,
    test_dir: str | Path,
    out_dir: str | Path,
    *,
    windows: Sequence[int] = (1, 3, 5, 7, 9),
    profile: str = "cpu",
    settings: TrainSettings | None = None,
    device: str | torch.device = "cpu",
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[TableRow]:
    """Appendix E: train a U/S network per window size and score each on the test cases.

    Args:
        train_dir: Training cohort.
        test_dir: Held-out cohort.
        out_dir: Where the checkpoints go (``us_w<N>.pt``...); with ``resume`` an interrupted
            study continues where it stopped.
        windows: Window sizes (frames).
        profile: Resolution profile.
        settings: Training settings (default: the profile's).
        device: Torch device.
        resume: Continue existing checkpoints in ``out_dir``.
        progress: Progress bars while training.
        log: Receives progress lines.

    Returns:
        One row per window size.
    """
    settings = settings or default_train_settings(profile)
    cases = find_cases(test_dir, "us")
    rows = []
    for window in windows:
        result = train_from_folder(
            "us",
            train_dir,
            Path(out_dir) / f"us_w{window}.pt",
            profile=profile,
            window=window,
            settings=settings,
            resume=resume,
            device=device,
            progress=progress,
            log=log,
        )
        model = load_feature_model(result.best, modality="us", device=device)
        scores = evaluate_model(model, cases, progress=_case_logger(log, f"w{window}", len(cases)))
        row = summarize(str(window), scores, PAPER_WINDOW_STUDY.get(window))
        if log is not None:
            log(f"window {window}: Dice {row.dice:.4f} on {row.n_cases} held-out case(s)")
        rows.append(row)
    return rows
