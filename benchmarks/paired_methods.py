"""Paired comparisons of ``kidneyreg benchmark`` methods over the same held-out patients.

The benchmark's tables pool every test frame of every held-out patient (mean ± std over frames),
which says how large an error is but not whether one method beats another: patients differ far
more than methods do. Every method registers the same patients, so this script compares methods
patient by patient: for each pair ``A vs B`` and each metric, the per-patient difference of the
means over that patient's test frames (``A - B``; negative: A has the smaller error), its mean ±
std over patients, how many patients A wins, and the two-sided Wilcoxon signed-rank p-value
(``scipy.stats.wilcoxon``, exact for small samples).

It reads the ``fold_*/results/*.json`` files of a benchmark work folder (``--keep-work``) or of
the folds carried under ``docs/results/cpu-folds``.

Usage::

    .venv/bin/python benchmarks/paired_methods.py docs/results/cpu-folds [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

METRICS = (("tre", "TRE"), ("mcd_ctct", "MCD CT-CT"), ("plane_angle_deg", "plane angle"))

# (A, B, what the paper claims or the question asked) in the order the tables have them.
DEFAULT_PAIRS = (
    ("one-cycle", "pretrained", "one-cycle transfer learning beats the pretrained model"),
    ("one-cycle", "no-hierarchical", "hierarchical regression beats the last level alone"),
    ("one-cycle", "no-mind", "the MIND loss helps"),
    ("one-cycle", "no-decoder", "the decoder layers help"),
    ("one-cycle", "window-1", "windows of 5 frames beat single frames"),
    ("one-cycle", "window-3", "windows of 5 frames beat windows of 3"),
    ("one-cycle", "one-shot", "one-cycle beats one-shot adaptation"),
    ("one-cycle", "five-shot", "one-cycle beats five-shot adaptation"),
    ("one-cycle", "scratch", "pretraining helps the adapted model"),
    ("pretrained", "initial", "the pretrained model beats the initial alignment"),
    ("one-cycle", "initial", "the method beats the initial alignment"),
)


@dataclass(frozen=True)
class Paired:
    """One comparison of two methods on one metric over the patients both registered."""

    a: str
    b: str
    metric: str
    patients: int
    mean_difference: float
    std_difference: float
    a_wins: int
    p_value: float


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """Every frame row of every ``fold_*/results/*.json`` under ``folder``."""
    files = sorted(Path(folder).glob("fold_*/results/*.json"))
    if not files:
        raise ValueError(f"{folder}: no fold_*/results/*.json files (a benchmark work folder?)")
    rows: list[dict[str, Any]] = []
    for path in files:
        rows += json.loads(path.read_text())["rows"]
    return rows


def patient_means(
    rows: Iterable[Mapping[str, Any]], metric: str, group: str | None = None
) -> dict[str, dict[str, float]]:
    """``{method: {case: mean of metric over its test frames}}`` (optionally one group only)."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        if int(row.get("test", 1)) != 1 or (group is not None and row.get("group") != group):
            continue
        value = row.get(metric)
        if value is not None and np.isfinite(float(value)):
            values[row["method"], row["case"]].append(float(value))
    means: dict[str, dict[str, float]] = defaultdict(dict)
    for (method, case), found in values.items():
        means[method][case] = float(np.mean(found))
    return dict(means)


def compare(means: Mapping[str, Mapping[str, float]], a: str, b: str, metric: str) -> Paired:
    """``a`` against ``b`` over the patients both have.

    Example:
        >>> means = {"x": {"p1": 1.0, "p2": 2.0, "p3": 1.5}, "y": {"p1": 2.0, "p2": 2.5, "p3": 3.5}}
        >>> r = compare(means, "x", "y", "tre")
        >>> r.patients, r.mean_difference, r.a_wins, round(r.p_value, 3)
        (3, -1.1666666666666667, 3, 0.25)
    """
    if a not in means or b not in means:
        missing = [m for m in (a, b) if m not in means]
        raise ValueError(f"no test frames of method(s) {', '.join(missing)}")
    cases = sorted(set(means[a]) & set(means[b]))
    diff = np.array([means[a][c] - means[b][c] for c in cases], dtype=np.float64)
    if diff.size == 0:
        raise ValueError(f"{a} and {b} share no patient")
    p = float(stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    return Paired(
        a,
        b,
        metric,
        int(diff.size),
        float(diff.mean()),
        float(diff.std(ddof=1)) if diff.size > 1 else 0.0,
        int(np.sum(diff < 0)),
        p,
    )


def paired_table(
    rows: Sequence[Mapping[str, Any]],
    pairs: Sequence[tuple[str, str, str]] = DEFAULT_PAIRS,
    group: str | None = None,
) -> str:
    """A Markdown table of every pair that both methods of exist in ``rows``, every metric."""
    by_metric = {metric: patient_means(rows, metric, group) for metric, _ in METRICS}
    lines = [
        "| A vs B | question | metric | patients | A - B (mean ± std, mm or deg) "
        "| A better in | Wilcoxon p |",
        "| --- | --- | --- | ---: | --- | ---: | ---: |",
    ]
    for a, b, question in pairs:
        for metric, label in METRICS:
            means = by_metric[metric]
            if a not in means or b not in means:
                continue
            r = compare(means, a, b, metric)
            first = metric == METRICS[0][0]
            lines.append(
                f"| {a + ' vs ' + b if first else ''} | {question if first else ''} | {label} | "
                f"{r.patients} | "
                f"{r.mean_difference:+.2f} ± {r.std_difference:.2f} | "
                f"{r.a_wins} of {r.patients} | {r.p_value:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    """Print (and optionally write) the paired tables, all patients then each group."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="Work folder with fold_*/results/*.json.")
    parser.add_argument("--markdown", type=Path, default=None, help="Also write the tables here.")
    args = parser.parse_args()
    rows = read_rows(args.folder)
    groups = sorted({str(r.get("group")) for r in rows if r.get("group") is not None})
    cases = len({r["case"] for r in rows})
    parts = [
        f"Per-patient paired comparisons over {cases} held-out patients "
        f"(`benchmarks/paired_methods.py {args.folder}`): A - B of each patient's mean over its "
        "test frames; negative = A has the smaller error. The p-values are not corrected for "
        "the number of comparisons (every row is one).\n",
        "### All patients\n",
        paired_table(rows),
    ]
    for group in groups:
        parts += [f"\n### Group {group}\n", paired_table(rows, group=group)]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
