"""U/S kidney maps as ``kidneyreg register`` uses them, scored on cohorts; the U/S bundling rule.

For each U/S model and each cohort (``kidneyreg simulate`` output with ground-truth U/S masks,
procedural or ``--from-ct``), every case's sequence goes through the U/S feature network as the
pipeline runs it (disjoint windows of ``Nw`` frames, ``predict_us(stride=Nw)``, threshold 0.5)
and is scored against the ground truth:

* ``raw``: Dice of the thresholded maps over the whole sequence;
* ``cleaned``: Dice after :func:`kidneyreg.pipeline.persistent_region` and
  :func:`kidneyreg.pipeline.convex_regions` (what registration reads);
* ``centroid_mm``: the median over frames of the distance between the cleaned map's kidney
  centroid and the true one (frames where either is empty are left out): the quantity the
  initial alignment is built from.

Each is a mean over the cohort's cases. With ``--tissue-gain SCALE`` every sequence is first
re-shaded as another machine or patient might show it: each tissue's brightness scaled by its own
log-normal gain (:class:`~kidneyreg.features.augment.RandomTissueGain` at that scale, always
applied; 1: log-std 0.3 per tissue and 0.25 for the whole kidney), from the case's
``us_labels.nii.gz``, ``--gain-draws`` times with fixed seeds; the scores are means over the draws
(the stress test of docs/models.md).

With ``--real COHORT`` (a cohort rendered from a real CT; repeated, several are pooled over their
cases) and two or more models, the first model is the bundled baseline and every other one is
checked against the rule U/S models are bundled by (docs/models.md): the cleaned Dice on the
real-CT cohorts gains at least ``--min-real-gain`` (0.05) and no other cohort's cleaned Dice
drops by more than ``--max-sim-loss`` (0.01).

Usage::

    .venv/bin/python benchmarks/eval_us_maps.py --model bundled --model runs/bands/bands.best.pt \\
        --cohort runs/feat/test --cohort runs/feat/test_gb --real runs/realsim2 [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from numpy.typing import NDArray

from kidneyreg.features.augment import RandomTissueGain, apply_tissue_gain
from kidneyreg.features.data import find_cases, normalize_us
from kidneyreg.features.infer import FeatureModel, load_feature_model, predict_us
from kidneyreg.features.metrics import dice
from kidneyreg.io.us import UltrasoundSequence, read_us_mask, read_us_sequence
from kidneyreg.pipeline import _frame_centroids, convex_regions, persistent_region


@dataclass(frozen=True)
class MapScores:
    """Mean scores of one model on one cohort."""

    model: str
    cohort: str
    cases: int
    raw: float
    cleaned: float
    centroid_mm: float


def median_centroid_error(
    prediction: NDArray[np.bool_], truth: NDArray[np.bool_], pixel_size: tuple[float, float]
) -> float:
    """Median over frames of the distance (mm) between the two masks' centroids.

    ``(n, rows, cols)`` masks; ``pixel_size`` is ``(sx, sy)``, columns then rows, as U/S image
    coordinates are. Frames where either mask is empty are left out (NaN if none is left).

    Example:
        >>> a = np.zeros((2, 5, 5), bool); b = np.zeros((2, 5, 5), bool)
        >>> a[:, 1, 1] = True; b[:, 1, 3] = True
        >>> median_centroid_error(a, b, (0.5, 2.0))
        1.0
    """
    # The pipeline's own per-frame centroids (u, v) in mm, as the initial alignment uses them.
    predicted, predicted_seen = _frame_centroids(prediction, pixel_size)
    true, true_seen = _frame_centroids(truth, pixel_size)
    both = predicted_seen & true_seen
    errors = np.linalg.norm(predicted[both] - true[both], axis=1)
    return float(np.median(errors)) if errors.size else float("nan")


def named_model(name: str) -> FeatureModel:
    """The U/S model a ``--model`` value names: ``bundled`` (sagittal views), ``bundled-flank``,
    or a checkpoint path."""
    if name in ("bundled", "bundled-flank"):
        view = "flank" if name == "bundled-flank" else "sagittal"
        return load_feature_model(modality="us", view=view)
    return load_feature_model(Path(name), modality="us")


def pipeline_maps(
    model: FeatureModel, sequence: UltrasoundSequence, threshold: float = 0.5
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """The U/S maps as ``register`` reads them: thresholded (disjoint windows of ``Nw`` frames),
    and cleaned (:func:`~kidneyreg.pipeline.persistent_region`, then
    :func:`~kidneyreg.pipeline.convex_regions`)."""
    binary = predict_us(model, sequence, stride=int(model.config.window)) >= threshold
    return binary, convex_regions(persistent_region(binary))


def shaded_sequences(
    sequence: UltrasoundSequence, tissues: Path | None, scale: float, draws: int
) -> list[UltrasoundSequence]:
    """``sequence`` itself (``scale`` 0), or ``draws`` copies with per-tissue gains applied."""
    if scale <= 0:
        return [sequence]
    if tissues is None:
        raise ValueError(
            f"--tissue-gain needs the tissue labels (us_labels.nii.gz) of {sequence.source}"
        )
    labels = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(tissues))).astype(np.int64))
    frames = torch.from_numpy(normalize_us(sequence.frames))[None]
    shaded = []
    for draw in range(draws):
        gains = RandomTissueGain(scale=scale, probability=1.0).sample(
            torch.Generator().manual_seed(1000 * draw + 7)
        )
        assert gains is not None  # probability 1
        image = apply_tissue_gain(frames, labels, gains)[0].numpy() * 255.0
        shaded.append(dataclasses.replace(sequence, frames=image.astype(np.float32)))
    return shaded


def score_cohort(
    model: FeatureModel,
    cohort: Path,
    *,
    threshold: float = 0.5,
    name: str = "",
    tissue_gain: float = 0.0,
    gain_draws: int = 3,
) -> MapScores:
    """Mean raw / cleaned Dice and centroid error of ``model``'s pipeline maps on ``cohort``."""
    raw, cleaned, centroid = [], [], []
    cases = find_cases(cohort, "us")
    for files in cases:
        original = read_us_sequence(files.image, min_frames=1)
        truth = np.asarray(read_us_mask(files.mask, original)) > 0
        for sequence in shaded_sequences(original, files.tissue_labels, tissue_gain, gain_draws):
            binary, kept = pipeline_maps(model, sequence, threshold)
            raw.append(dice(binary, truth))
            cleaned.append(dice(kept, truth))
            centroid.append(median_centroid_error(kept, truth, sequence.pixel_size))
    return MapScores(
        name or model.source,
        str(cohort),
        len(cases),
        float(np.mean(raw)),
        float(np.mean(cleaned)),
        float(np.nanmean(centroid)),
    )


def bundling_verdict(
    scores: list[MapScores],
    baseline: str,
    candidate: str,
    real: str | Sequence[str],
    *,
    min_real_gain: float = 0.05,
    max_sim_loss: float = 0.01,
) -> tuple[bool, str]:
    """Whether ``candidate`` may replace ``baseline`` (cleaned Dice), and why, in one line.

    ``real`` names one real-CT cohort or several; several are pooled (mean over their cases), as
    one rendering alone is a noisy judge (docs/models.md).
    """
    by = {(s.model, s.cohort): s for s in scores}
    cohorts = list(dict.fromkeys(s.cohort for s in scores))
    reals = [real] if isinstance(real, str) else list(real)
    for cohort in reals:
        if cohort not in cohorts:
            raise ValueError(f"no scores on the real-CT cohort {cohort}")

    def pooled(model: str) -> float:
        rows = [by[model, c] for c in reals]
        return sum(r.cleaned * r.cases for r in rows) / sum(r.cases for r in rows)

    gain = pooled(candidate) - pooled(baseline)
    losses = {
        c: by[baseline, c].cleaned - by[candidate, c].cleaned for c in cohorts if c not in reals
    }
    worst = max(losses.values(), default=0.0)
    ok = gain >= min_real_gain and worst <= max_sim_loss
    return ok, (
        f"{candidate}: real-CT cleaned Dice {gain:+.3f} (needs >= +{min_real_gain}), "
        f"largest simulated loss {worst:.3f} (allowed {max_sim_loss}): "
        + ("qualifies" if ok else "does not qualify")
    )


def main() -> None:
    """Score every model on every cohort, print a table and the bundling verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="U/S checkpoint, 'bundled' or 'bundled-flank' (the flank-view model) (repeat).",
    )
    parser.add_argument("--cohort", type=Path, action="append", default=[], help="Repeatable.")
    parser.add_argument(
        "--real",
        type=Path,
        action="append",
        default=[],
        help="Cohort rendered from a real CT (repeatable: pooled over their cases).",
    )
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument(
        "--tissue-gain",
        type=float,
        default=0.0,
        help="re-shade each sequence with per-tissue gains of this scale first (0: as rendered)",
    )
    parser.add_argument("--gain-draws", type=int, default=3)
    parser.add_argument("--min-real-gain", type=float, default=0.05)
    parser.add_argument("--max-sim-loss", type=float, default=0.01)
    parser.add_argument("--json", type=Path, default=None, help="Also write the scores here.")
    args = parser.parse_args()
    names = args.model or ["bundled"]
    cohorts = list(args.cohort) + list(args.real)
    if not cohorts:
        parser.error("give at least one --cohort or --real")
    scores = []
    for name in names:
        model = named_model(name)
        for cohort in cohorts:
            scores.append(
                score_cohort(
                    model,
                    cohort,
                    threshold=args.threshold,
                    name=name,
                    tissue_gain=args.tissue_gain,
                    gain_draws=args.gain_draws,
                )
            )
            s = scores[-1]
            print(f"{name} on {cohort}: raw {s.raw:.3f} cleaned {s.cleaned:.3f}", flush=True)
    print("\n| model | cohort | cases | Dice raw | Dice cleaned | centroid error (mm) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in scores:
        print(
            f"| {s.model} | {s.cohort} | {s.cases} | {s.raw:.3f} | {s.cleaned:.3f} "
            f"| {s.centroid_mm:.1f} |"
        )
    verdicts = []
    if args.real and len(names) > 1:
        print()
        for candidate in names[1:]:
            ok, line = bundling_verdict(
                scores,
                names[0],
                candidate,
                [str(cohort) for cohort in args.real],
                min_real_gain=args.min_real_gain,
                max_sim_loss=args.max_sim_loss,
            )
            verdicts.append({"model": candidate, "qualifies": ok, "reason": line})
            print(line)
    if args.json is not None:
        payload = {"scores": [asdict(s) for s in scores], "verdicts": verdicts}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
