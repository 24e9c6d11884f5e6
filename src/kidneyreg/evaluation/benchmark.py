"""The paper's tables on held-out patients with ground truth: ``kidneyreg benchmark`` (issue 7).

:func:`run_benchmark` reproduces the registration experiments of Chi et al. (2023) on a cohort of
case folders with true poses (``kidneyreg simulate`` writes them; without a cohort one is
simulated, half of it in pose-offset group A and half in group B):

1. The patients are split into ``folds`` folds (the paper's fivefold cross validation; all cases
   of a patient stay in one fold, groups A and B are spread evenly, :func:`assign_folds`).
2. For each fold, every distinct pretraining the selected tables need runs once on the other
   folds (:func:`kidneyreg.registration.train.pretrain`, which holds out a share of them for
   validation and keeps the best validation epoch): the full method and its ablations
   (Table 2), the window sizes (Appendix G) and the data-removal repeats (Appendix H). A trained
   model serves every table that uses it.
3. Each held-out case is registered with :class:`kidneyreg.pipeline.Registrar` for every method
   variant: pretrained only, or adapted on the case's first breathing cycle (one-cycle, one-shot,
   five-shot; :mod:`kidneyreg.adapt`), or adapted from a new network (no pretraining). The
   feature maps are the case's ground-truth kidney masks (``--ct-mask`` / ``--us-mask``), so the
   tables measure the registration alone, not the feature networks.
4. The poses are scored against the ground truth (:func:`kidneyreg.evaluation.evaluate_frames`)
   on the *test frames*: the frames after the adaptation cycle (the paper scores "test sequences
   from the second cycle"); every method is scored on the same frames. When a sequence is shorter
   than about 1.33 cycles (``--quick``), the adaptation cycle is cut to its first half so that
   frames remain to score.

Tables (:data:`TABLE_KEYS`): ``table2`` ablation, ``table3`` one-step vs two-step learning (with
baseline rows when baseline results are given), ``table4`` groups A and B, ``appF`` adaptation
strategies, ``appG`` window sizes, ``appH`` uncertainty (1-10 % of the training data removed at
random, repeated). Each row is mean ± std over all test frames of all held-out cases (each case is
held out exactly once), in the paper's columns HD / MCD CT-US and CT-CT, plus TRE and the
plane-normal angle. Every table also shows the initial alignment.

Outputs in ``out_dir`` (:data:`OUTPUT_FILES`): ``benchmark.md`` and ``benchmark.html``, one CSV per
table, ``frames.csv`` with every scored frame of every method, ``figures/`` (box plots per method,
error against breathing phase) and ``config.json`` (settings, seeds, fold assignment, removals,
runtime, versions). The run works in a sibling folder ``.<out>.benchmark-work`` (the simulated
cohort, checkpoints, per-case results): a run that stops can be started again with the same
settings and continues where it was; the work folder is deleted after a successful run unless
``keep_work``. ``out_dir`` itself is replaced only at the end of a successful run. Several
processes may run at once on one work folder (one per core or machine): they share the work by
pretraining and by held-out case (file locks, :mod:`kidneyreg.io.lock`), each skipping what another
is doing and waiting for it at the end of the fold.

Baseline results (``baselines``): CSV files with one row per frame and the columns ``method``
(e.g. ``VoxelMorph``), ``learning`` (``one-step`` or ``two-step``), ``case``, ``frame`` and any of
the metric columns of ``frames.csv`` (empty = undefined); optional ``test`` (1 = scored, default
1) and ``group``. Their rows join Table 3 (both learning strategies) and Table 4 (two-step).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from kidneyreg import __version__
from kidneyreg.errors import InputError
from kidneyreg.evaluation.evaluate import CTUS_METRICS, GROUND_TRUTH_METRICS, evaluate_frames
from kidneyreg.evaluation.metrics import Summary, summarise
from kidneyreg.io.atomic import atomic_write_text, replace_folder
from kidneyreg.io.lock import FileLock
from kidneyreg.profiles import PROFILES, get_profile
from kidneyreg.report import Table, write_report
from kidneyreg.results import json_ready

__all__ = [
    "FRAME_COLUMNS",
    "OUTPUT_FILES",
    "QUICK_NETWORK",
    "TABLE_KEYS",
    "TABLE_METRICS",
    "BenchmarkResult",
    "BenchmarkSettings",
    "CaseRecord",
    "MethodSpec",
    "Removal",
    "TableRow",
    "TableSpec",
    "TrainingSpec",
    "adaptation_cycle",
    "assign_folds",
    "benchmark_plan",
    "format_mean_std",
    "read_baselines",
    "removal_plan",
    "run_benchmark",
    "summarise_method",
]

#: Table keys, in report order (``--tables``).
TABLE_KEYS: tuple[str, ...] = ("table2", "table3", "table4", "appF", "appG", "appH")
#: Metrics shown in every table (paper's four columns, then TRE and the plane angle) with labels.
TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("hd_ctus", "HD CT-US (mm)"),
    ("mcd_ctus", "MCD CT-US (mm)"),
    ("hd_ctct", "HD CT-CT (mm)"),
    ("mcd_ctct", "MCD CT-CT (mm)"),
    ("tre", "TRE (mm)"),
    ("plane_angle_deg", "Plane angle (deg)"),
)
_FRAME_METRICS: tuple[str, ...] = CTUS_METRICS + GROUND_TRUTH_METRICS
#: Columns of ``frames.csv`` (one row per method, case and frame).
FRAME_COLUMNS: tuple[str, ...] = (
    "method",
    "fold",
    "case",
    "patient",
    "group",
    "frame",
    "test",
    "phase",
    *_FRAME_METRICS,
)
#: Files written into the output folder besides one ``<table key>.csv`` per table.
OUTPUT_FILES: tuple[str, ...] = ("benchmark.md", "benchmark.html", "frames.csv", "config.json")
#: Narrow network widths of ``--quick`` (RegistrationConfig overrides; same code path).
QUICK_NETWORK: dict[str, Any] = {
    "encoder_channels": (4, 8, 8),
    "decoder_channels": (8, 8, 8, 8, 4, 4),
    "decoder_slab_half_width": 2,
    "channels_last": False,
}
# The paper's window sizes of Appendix G.
_WINDOWS = (1, 3, 5)
# Appendix H removes this share of the training data, drawn uniformly per repeat.
_REMOVAL_RANGE = (0.01, 0.10)
# Independent random streams derived from the benchmark seed.
_FOLD_STREAM, _REMOVAL_STREAM, _REMOVAL_CASES_STREAM = 0xF01D, 0x2E30, 0x2E31
# Below this share of test frames the adaptation cycle is cut to the first half of the sequence.
_MIN_TEST_SHARE = 0.25
_WORK_SUFFIX = ".benchmark-work"
# Held (shared) inside the work folder by every process using it, for its whole run.
_USE_LOCK = ".in-use.lock"
# One unit of a fold's work (a pretraining or a held-out case) that processes share.
_Item = TypeVar("_Item")
_CASE_FILES = (
    "ct.nii.gz",
    "ct_kidney_mask.nii.gz",
    "us.nii.gz",
    "us_kidney_mask.nii.gz",
    "ground_truth.json",
)
_PAPER_NOTES: dict[str, str] = {
    "table2": "Paper (Table 2, HD/MCD CT-US; CT-CT, mm): ours 3.80±0.87/0.94±0.18; "
    "3.97±1.37/1.15±0.57. Without one-cycle transfer learning 6.71±1.06/2.03±0.29; "
    "11.59±1.57/4.09±0.65.",
    "table3": "Paper (Table 3, ours, HD/MCD CT-US; CT-CT, mm): one-step 6.71±1.06/2.03±0.29; "
    "11.59±1.57/4.09±0.65. Two-step 3.80±0.87/0.94±0.18; 3.97±1.37/1.15±0.57.",
    "table4": "Paper (Table 4, ours, HD/MCD CT-US; CT-CT, mm): group A 3.85±0.32/0.82±0.04; "
    "3.58±1.37/1.02±0.59. Group B 3.75±0.83/1.10±0.20; 4.36±1.46/1.28±0.53. Group A offsets "
    "10.37±2.24 deg, 3.69±0.95 mm; group B 24.72±2.28 deg, 5.04±1.20 mm.",
    "appF": "Paper (Appendix F, average, MCD CT-US; CT-CT, mm): pretrained 2.03; 4.09, one-shot "
    "1.44; 2.49, five-shot 1.04; 1.47, one-cycle 0.94; 1.15.",
    "appG": "Paper (Appendix G, MCD CT-US; CT-CT, mm): window 1 0.95; 0.97, window 3 0.98; 0.99, "
    "window 5 0.94; 1.15.",
    "appH": "Paper (Appendix H, std over 10 repeats, HD/MCD CT-US; CT-CT, mm): 1.62/0.22; "
    "2.97/1.01.",
}


# ----------------------------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------------------------


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """``"mean ± std"`` with ``digits`` decimals; ``"n/a"`` when the mean is undefined.

    Example:
        >>> format_mean_std(3.9712, 1.3749)
        '3.97 ± 1.37'
        >>> format_mean_std(float("nan"), 0.0)
        'n/a'
    """
    if not math.isfinite(mean):
        return "n/a"
    spread = f"{std:.{digits}f}" if math.isfinite(std) else "n/a"
    return f"{mean:.{digits}f} ± {spread}"


def assign_folds(
    patients: Sequence[str],
    folds: int,
    seed: int,
    strata: Sequence[str] | None = None,
) -> list[int]:
    """The fold (0-based) of every case; all cases of a patient share one fold.

    Patients are shuffled with ``seed``, then ordered by stratum (the group of the patient's first
    case, e.g. ``"A"`` / ``"B"``; the shuffled order is kept inside a stratum) and dealt to the
    folds in turn, so fold sizes differ by at most one patient and every stratum is spread
    evenly over the folds.

    Args:
        patients: Patient key of each case.
        folds: Number of folds (>= 2, at most the number of patients).
        seed: Seed of the shuffle.
        strata: Stratum of each case (same length as ``patients``), or None.

    Returns:
        Fold index of each case, in the order of ``patients``.

    Raises:
        InputError: Fewer than 2 folds or more folds than patients.

    Example:
        >>> folds = assign_folds(["p1", "p1", "p2", "p3", "p4"], 2, seed=0)
        >>> folds[0] == folds[1], sorted(set(folds))
        (True, [0, 1])
    """
    keys = [str(p) for p in patients]
    if strata is not None and len(strata) != len(keys):
        raise ValueError(f"strata has {len(strata)} entries for {len(keys)} cases")
    unique = sorted(set(keys))
    if int(folds) < 2:
        raise InputError("--folds", f"must be at least 2, got {folds}")
    if int(folds) > len(unique):
        raise InputError(
            "--folds",
            f"{folds} folds need at least {folds} patients, the cohort has {len(unique)}",
        )
    stratum: dict[str, str] = {}
    if strata is not None:
        for key, value in zip(keys, strata, strict=True):
            stratum.setdefault(key, str(value))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _FOLD_STREAM]))
    shuffled = [unique[i] for i in rng.permutation(len(unique))]
    shuffled.sort(key=lambda key: stratum.get(key, ""))  # stable: shuffle kept per stratum
    fold_of = {key: i % int(folds) for i, key in enumerate(shuffled)}
    return [fold_of[key] for key in keys]


def adaptation_cycle(
    cycle_frames: Sequence[int] | NDArray[np.int64], n_frames: int
) -> NDArray[np.int64]:
    """Frames to adapt on: the first breathing cycle, cut when too few frames would remain.

    The frames after the returned ones are the test frames. When fewer than a quarter of the
    sequence would remain after the cycle (sequences shorter than about 1.33 cycles), the cycle is
    cut to the first half of the sequence.

    Example:
        >>> adaptation_cycle(range(0, 60), 121).tolist() == list(range(60))
        True
        >>> adaptation_cycle(range(0, 12), 12).tolist()
        [0, 1, 2, 3, 4, 5]
    """
    frames = np.asarray(list(cycle_frames), dtype=np.int64)
    if frames.size == 0 or n_frames < 2:
        raise ValueError("an adaptation cycle needs frames and a sequence of at least 2 frames")
    if n_frames - (int(frames.max()) + 1) < _MIN_TEST_SHARE * n_frames:
        half = n_frames // 2
        frames = frames[frames < half]
        if frames.size == 0:
            frames = np.arange(half, dtype=np.int64)
    return frames


@dataclass(frozen=True)
class Removal:
    """The training data one Appendix H repeat leaves out.

    Attributes:
        repeat: Repeat number (1-based).
        fraction: Share of the training data removed (1-10 %).
        removed_cases: Training cases removed (``round(fraction * n_cases)`` of them, chosen at
            random; none when that rounds to 0).
        pairs: Generated pairs kept per epoch: ``pairs - max(1, round(fraction * pairs))``.
    """

    repeat: int
    fraction: float
    removed_cases: tuple[str, ...]
    pairs: int


def removal_plan(seed: int, repeat: int, fold: int, case_ids: Sequence[str], pairs: int) -> Removal:
    """What repeat ``repeat`` of Appendix H removes from fold ``fold``'s training data.

    The fraction is drawn uniformly in [1 %, 10 %] once per repeat (the same for every fold); the
    removed cases are drawn per fold. The kept pairs are the first ones of the same seeded pair
    stream: pairs are independent draws, so dropping the last ones is the same in distribution as
    dropping random ones, and the model's initial weights stay the same, so the repeats differ only
    by the data removed.

    Example:
        >>> plan = removal_plan(0, 1, 0, ["a", "b", "c"], 100)
        >>> 0.01 <= plan.fraction <= 0.10, 90 <= plan.pairs <= 99
        (True, True)
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _REMOVAL_STREAM, int(repeat)]))
    fraction = float(rng.uniform(*_REMOVAL_RANGE))
    ids = sorted(str(c) for c in case_ids)
    n_remove = min(round(fraction * len(ids)), max(len(ids) - 1, 0))
    picker = np.random.default_rng(
        np.random.SeedSequence([int(seed), _REMOVAL_CASES_STREAM, int(repeat), int(fold)])
    )
    removed = tuple(sorted(ids[i] for i in picker.choice(len(ids), n_remove, replace=False)))
    kept = max(1, int(pairs) - max(1, round(fraction * int(pairs))))
    return Removal(int(repeat), fraction, removed, kept)


# ----------------------------------------------------------------------------------------------
# The plan: trainings, methods, tables
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSpec:
    """One pretraining (run once per fold).

    Attributes:
        name: Key (``full``, ``no-mind``, ``window-1``, ``removal-2``...).
        use_mind: False = without the MIND loss.
        use_decoder: False = without decoder layers.
        hierarchical: False = last level's head only.
        window: Nw, or None for the profile's.
        repeat: Appendix H repeat number (0 = all the training data).
    """

    name: str
    use_mind: bool = True
    use_decoder: bool = True
    hierarchical: bool = True
    window: int | None = None
    repeat: int = 0


@dataclass(frozen=True)
class MethodSpec:
    """One way of registering a held-out case.

    Attributes:
        key: Key in ``frames.csv`` (``initial``, ``pretrained``, ``one-cycle``...).
        label: Short label for figures.
        training: Name of the :class:`TrainingSpec` whose model is used; None = a new network
            (no pretraining).
        adaptation: Adaptation strategy (``one-cycle``, ``one-shot``, ``five-shot``) or None.
        initial: Score the initial alignment instead of the network's output.
    """

    key: str
    label: str
    training: str | None
    adaptation: str | None = None
    initial: bool = False


@dataclass(frozen=True)
class TableRow:
    """A row of a table: a label, the method it summarises and an optional group filter."""

    label: str
    method: str
    group: str | None = None


@dataclass(frozen=True)
class TableSpec:
    """A table: key (file name), caption and rows."""

    key: str
    caption: str
    rows: tuple[TableRow, ...]


def _epochs_text(strategy: str, adapt_epochs: int | None) -> str:
    from kidneyreg.adapt import default_epochs

    n = default_epochs(strategy) if adapt_epochs is None else int(adapt_epochs)
    return f"{n} epoch{'s' if n != 1 else ''}"


def benchmark_plan(
    tables: Sequence[str],
    *,
    window: int = 5,
    repeats: int = 10,
    adapt_epochs: int | None = None,
    seed: int = 0,
) -> tuple[list[TrainingSpec], list[MethodSpec], list[TableSpec]]:
    """The trainings, methods and tables the selected tables need (each training listed once).

    Args:
        tables: Table keys (:data:`TABLE_KEYS`).
        window: The profile's window size (the full method's).
        repeats: Appendix H repeats.
        adapt_epochs: Adaptation epochs of every strategy; None = the paper's (2 one-cycle,
            5 shots). Only used in labels here.
        seed: The benchmark seed (labels of the Appendix H repeats give their removed share).

    Raises:
        InputError: Unknown table key or fewer than 2 repeats with ``appH``.

    Example:
        >>> trainings, methods, specs = benchmark_plan(["table2"])
        >>> [t.name for t in trainings]
        ['full', 'no-mind', 'no-decoder', 'no-hierarchical']
    """
    unknown = [t for t in tables if t not in TABLE_KEYS]
    if unknown or not tables:
        raise InputError(
            "--tables",
            f"unknown table(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(TABLE_KEYS)}",
        )
    if "appH" in tables and int(repeats) < 2:
        raise InputError("--repeats", f"Appendix H needs at least 2 repeats, got {repeats}")
    cycle = _epochs_text("one-cycle", adapt_epochs)
    shot = _epochs_text("one-shot", adapt_epochs)
    trainings: dict[str, TrainingSpec] = {"full": TrainingSpec("full")}
    methods: dict[str, MethodSpec] = {
        "initial": MethodSpec("initial", "initial", "full", initial=True),
        "one-cycle": MethodSpec("one-cycle", "ours (one-cycle)", "full", "one-cycle"),
    }
    specs: list[TableSpec] = []
    initial_row = TableRow("Initial alignment (kidney centroids, no registration)", "initial")

    def add(method: MethodSpec, training: TrainingSpec | None = None) -> str:
        if training is not None:
            trainings.setdefault(training.name, training)
        methods.setdefault(method.key, method)
        return method.key

    pretrained = MethodSpec("pretrained", "pretrained", "full")
    for key in [t for t in TABLE_KEYS if t in tables]:
        if key == "table2":
            ablations = [
                ("no-mind", "without MIND", "Without MIND loss", {"use_mind": False}),
                ("no-decoder", "without decoder", "Without decoder layers", {"use_decoder": False}),
                (
                    "no-hierarchical",
                    "without hierarchical",
                    "Without hierarchical transformation regression",
                    {"hierarchical": False},
                ),
            ]
            rows = [
                TableRow(f"Ours (pretrained + one-cycle transfer learning, {cycle})", "one-cycle")
            ]
            for name, short, label, flags in ablations:
                rows.append(
                    TableRow(
                        label,
                        add(
                            MethodSpec(name, short, name, "one-cycle"), TrainingSpec(name, **flags)
                        ),
                    )
                )
            rows.append(
                TableRow("Without one-cycle transfer learning (pretrained only)", add(pretrained))
            )
            rows.append(initial_row)
            specs.append(
                TableSpec(
                    "table2",
                    "Table 2: ablation study, components removed one at a time",
                    tuple(rows),
                )
            )
        elif key == "table3":
            rows = [
                TableRow("Ours, one-step learning (pretrained only)", add(pretrained)),
                TableRow(
                    f"Ours, two-step learning (+ one-cycle transfer learning, {cycle})", "one-cycle"
                ),
                initial_row,
            ]
            specs.append(TableSpec("table3", "Table 3: one-step vs two-step learning", tuple(rows)))
        elif key == "table4":
            rows = []
            for group in ("A", "B"):
                rows.append(TableRow(f"Ours (two-step), group {group}", "one-cycle", group))
            for group in ("A", "B"):
                rows.append(TableRow(f"Initial alignment, group {group}", "initial", group))
            specs.append(
                TableSpec(
                    "table4",
                    "Table 4: small (group A) and large (group B) initial offsets",
                    tuple(rows),
                )
            )
        elif key == "appF":
            rows = [
                TableRow("Pretrained model (no adaptation)", add(pretrained)),
                TableRow(
                    f"One-shot ({shot})",
                    add(MethodSpec("one-shot", "one-shot", "full", "one-shot")),
                ),
                TableRow(
                    f"Five-shot ({shot})",
                    add(MethodSpec("five-shot", "five-shot", "full", "five-shot")),
                ),
                TableRow(f"One-cycle ({cycle})", "one-cycle"),
                TableRow(
                    f"One-cycle from scratch (new network, no pretraining, {cycle})",
                    add(MethodSpec("scratch", "from scratch", None, "one-cycle")),
                ),
                initial_row,
            ]
            specs.append(TableSpec("appF", "Appendix F: transfer learning strategies", tuple(rows)))
        elif key == "appG":
            rows = []
            for nw in _WINDOWS:
                if nw == int(window):
                    rows.append(TableRow(f"Window {nw} (one-cycle)", "one-cycle"))
                    continue
                name = f"window-{nw}"
                method = MethodSpec(name, f"window {nw}", name, "one-cycle")
                rows.append(
                    TableRow(f"Window {nw} (one-cycle)", add(method, TrainingSpec(name, window=nw)))
                )
            rows.append(initial_row)
            specs.append(
                TableSpec(
                    "appG",
                    "Appendix G: U/S frames per window (motion regularisation)",
                    tuple(rows),
                )
            )
        elif key == "appH":
            rows = [TableRow("Ours (all training data)", "one-cycle")]
            for r in range(1, int(repeats) + 1):
                name = f"removal-{r}"
                method = MethodSpec(name, f"repeat {r}", name, "one-cycle")
                share = removal_plan(seed, r, 0, (), 1).fraction
                label = f"Repeat {r} ({100 * share:.1f} % of the training data removed)"
                rows.append(TableRow(label, add(method, TrainingSpec(name, repeat=r))))
            specs.append(
                TableSpec(
                    "appH",
                    "Appendix H: uncertainty, 1-10 % of the training data removed at random",
                    tuple(rows),
                )
            )
    return list(trainings.values()), list(methods.values()), specs


# ----------------------------------------------------------------------------------------------
# Settings and result
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkSettings:
    """Every setting of a benchmark run (written to ``config.json``; a run resumes only with equal
    settings).

    Attributes:
        profile: Resolution profile.
        folds: Number of cross-validation folds.
        cases: Cases simulated when no cohort is given (half group A, half group B).
        frames: Frames per simulated case (None: two breathing cycles plus one frame).
        epochs: Pretraining epochs.
        pairs: Generated pairs per epoch.
        batch_size: Pretraining windows per step.
        lr: Pretraining learning rate.
        supervision: Pose supervision weight of pretraining (0 = the paper's unsupervised loss).
        val_fraction: Share of the training patients held out for validation in each pretraining.
        val_per_case: Validation windows per validation case.
        repeats: Appendix H repeats.
        adapt_epochs: Adaptation epochs of every strategy (None: 2 one-cycle, 5 shots).
        seed: Seed of the cohort, folds, pretraining, adaptation and removals.
        tables: Selected tables.
        quick: Whether this is the ``--quick`` setting.
        network: RegistrationConfig overrides (the ``--quick`` narrow network).
    """

    profile: str
    folds: int
    cases: int
    frames: int | None
    epochs: int
    pairs: int
    batch_size: int
    lr: float
    supervision: float
    val_fraction: float
    val_per_case: int
    repeats: int
    adapt_epochs: int | None
    seed: int
    tables: tuple[str, ...]
    quick: bool
    network: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        values = asdict(self)
        values["tables"] = list(self.tables)
        values["network"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.network.items()
        }
        return values


@dataclass(eq=False)
class BenchmarkResult:
    """What :func:`run_benchmark` returns.

    Attributes:
        out_dir: The output folder.
        tables: Table key -> the report table.
        frames: Every scored frame (one dict per row of ``frames.csv``).
        config: The contents of ``config.json``.
        markdown: ``benchmark.md``.
        html: ``benchmark.html``.
    """

    out_dir: Path
    tables: dict[str, Table]
    frames: list[dict[str, Any]]
    config: dict[str, Any]
    markdown: Path
    html: Path

    @property
    def headline(self) -> Table:
        """Table 2 when computed, else the first table."""
        return self.tables.get("table2", next(iter(self.tables.values())))


@dataclass(frozen=True)
class CaseRecord:
    """A case folder of the cohort.

    Attributes:
        case_id: Folder name.
        folder: The folder.
        patient: Patient key (cases of one patient share a fold).
        group: Pose-offset group from ``case.json`` (``A``, ``B`` or ``""``).
        info: ``case.json`` contents (empty when absent).
    """

    case_id: str
    folder: Path
    patient: str
    group: str
    info: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Summaries and tables
# ----------------------------------------------------------------------------------------------


def summarise_method(
    frames: Iterable[Mapping[str, Any]], method: str, group: str | None = None
) -> tuple[dict[str, Summary], int]:
    """Summaries of every table metric over the test frames of ``method`` (optionally one group).

    Returns:
        ``({metric: Summary}, number of cases)``.

    Example:
        >>> rows = [{"method": "m", "test": 1, "case": "c", "group": "A", "tre": 1.0},
        ...         {"method": "m", "test": 1, "case": "c", "group": "A", "tre": 3.0}]
        >>> summary, n_cases = summarise_method(rows, "m")
        >>> summary["tre"].mean, summary["tre"].std, n_cases
        (2.0, 1.0, 1)
    """
    picked = [
        row
        for row in frames
        if row["method"] == method
        and int(row.get("test", 1)) == 1
        and (group is None or row.get("group") == group)
    ]
    summary = {
        name: summarise(
            np.array([_number(row.get(name)) for row in picked], dtype=np.float64).reshape(-1)
        )
        for name, _ in TABLE_METRICS
    }
    return summary, len({row["case"] for row in picked})


def _number(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    return float(value)


def _table_columns() -> list[str]:
    return ["Method", *(label for _, label in TABLE_METRICS), "Frames", "Cases"]


def _csv_columns() -> list[str]:
    columns = ["row", "method", "group", "n_cases"]
    for name, _ in TABLE_METRICS:
        columns += [f"{name}_{stat}" for stat in ("mean", "std", "median", "p95", "n")]
    return columns


def _build_table(
    spec: TableSpec, frames: Sequence[Mapping[str, Any]], notes: Sequence[str]
) -> tuple[Table, list[dict[str, Any]]]:
    """The report table and the CSV rows of one table spec."""
    rows: list[list[Any]] = []
    csv_rows: list[dict[str, Any]] = []
    means: list[dict[str, float]] = []
    for row in spec.rows:
        summary, n_cases = summarise_method(frames, row.method, row.group)
        n_frames = max((s.n for s in summary.values()), default=0)
        rows.append(
            [
                row.label,
                *(format_mean_std(summary[m].mean, summary[m].std) for m, _ in TABLE_METRICS),
                n_frames,
                n_cases,
            ]
        )
        entry: dict[str, Any] = {
            "row": row.label,
            "method": row.method,
            "group": row.group or "",
            "n_cases": n_cases,
        }
        for name, _ in TABLE_METRICS:
            s = summary[name]
            entry.update(
                {
                    f"{name}_mean": s.mean,
                    f"{name}_std": s.std,
                    f"{name}_median": s.median,
                    f"{name}_p95": s.p95,
                    f"{name}_n": s.n,
                }
            )
        csv_rows.append(entry)
        if row.method.startswith("removal-"):
            means.append({name: summary[name].mean for name, _ in TABLE_METRICS})
    table_notes = list(notes)
    if spec.key == "appH" and means:
        # Standard deviation of the repeats' means (sample std, n - 1), as the paper's Table 5.
        spread = {
            name: float(np.std([m[name] for m in means], ddof=1)) if len(means) > 1 else math.nan
            for name, _ in TABLE_METRICS
        }
        centre = {name: float(np.mean([m[name] for m in means])) for name, _ in TABLE_METRICS}
        label = f"Standard deviation over the {len(means)} repeats (of their means)"
        rows.append(
            [
                label,
                *(
                    f"{spread[m]:.2f}" if math.isfinite(spread[m]) else "n/a"
                    for m, _ in TABLE_METRICS
                ),
                None,
                None,
            ]
        )
        entry = {"row": label, "method": "std-over-repeats", "group": "", "n_cases": None}
        for name, _ in TABLE_METRICS:
            entry.update(
                {
                    f"{name}_mean": centre[name],
                    f"{name}_std": spread[name],
                    f"{name}_median": math.nan,
                    f"{name}_p95": math.nan,
                    f"{name}_n": len(means),
                }
            )
        csv_rows.append(entry)
        table_notes.append(
            "Repeat rows: mean ± std over the test frames of the repeat; last row: sample "
            "standard deviation of the repeats' means (the paper's Table 5)."
        )
    return Table(_table_columns(), rows, caption=spec.caption, notes=table_notes), csv_rows


def _csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for name in columns:
            value = row.get(name)
            if value is None:
                cells.append("")
            elif isinstance(value, float):
                cells.append("" if not math.isfinite(value) else f"{value:.6g}")
            else:
                cells.append(str(value))
        writer.writerow(cells)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------

_BASELINE_REQUIRED = ("method", "learning", "case", "frame")
_LEARNING = ("one-step", "two-step")


def read_baselines(
    paths: Sequence[str | Path], groups: Mapping[str, str] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-frame baseline results as ``frames.csv`` rows (method ``baseline:<name>:<learning>``).

    Args:
        paths: CSV files (see the module docstring for the columns).
        groups: Case -> group, for rows without a ``group`` column.

    Returns:
        ``(rows, baseline names in first-seen order)``.

    Raises:
        InputError: Unreadable file, missing columns, unknown ``learning`` or non-numeric values.

    Example:
        >>> rows, names = read_baselines(["voxelmorph.csv"])  # doctest: +SKIP
        >>> names  # doctest: +SKIP
        ['VoxelMorph']
    """
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    for path in paths:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(
                file, f"cannot read baseline results ({error.__class__.__name__})"
            ) from None
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
        missing = [c for c in _BASELINE_REQUIRED if c not in header]
        if missing:
            raise InputError(file, f"baseline results lack the column(s) {', '.join(missing)}")
        metrics = [m for m in _FRAME_METRICS if m in header]
        if not metrics:
            raise InputError(file, "baseline results have no metric column (e.g. mcd_ctus, tre)")
        for line, record in enumerate(reader, start=2):
            learning = (record.get("learning") or "").strip()
            if learning not in _LEARNING:
                raise InputError(file, f"line {line}: learning must be one-step or two-step")
            name = (record.get("method") or "").strip()
            if not name:
                raise InputError(file, f"line {line}: empty method name")
            if name not in names:
                names.append(name)
            case = str(record["case"]).strip()
            try:
                row: dict[str, Any] = {
                    "method": f"baseline:{name}:{learning}",
                    "fold": "",
                    "case": case,
                    "patient": "",
                    "group": (record.get("group") or (groups or {}).get(case, "")).strip(),
                    "frame": int(record["frame"]),
                    "test": int(record.get("test") or 1),
                    "phase": math.nan,
                }
                for metric in metrics:
                    row[metric] = _number(record.get(metric))
            except ValueError:
                raise InputError(
                    file, f"line {line}: a frame, test or metric is not a number"
                ) from None
            rows.append(row)
    return rows, names


def _with_baselines(specs: list[TableSpec], names: Sequence[str]) -> list[TableSpec]:
    """Table 3 gets one-step and two-step rows per baseline, Table 4 two-step rows per group."""
    out: list[TableSpec] = []
    for spec in specs:
        rows = list(spec.rows)
        if spec.key == "table3":
            extra = [
                TableRow(f"{name}, {learning} learning", f"baseline:{name}:{learning}")
                for name in names
                for learning in _LEARNING
            ]
            rows = rows[:2] + extra + rows[2:]
        elif spec.key == "table4":
            extra = [
                TableRow(f"{name} (two-step), group {group}", f"baseline:{name}:two-step", group)
                for name in names
                for group in ("A", "B")
            ]
            rows = rows[:2] + extra + rows[2:]
        out.append(replace(spec, rows=tuple(rows)))
    return out


# ----------------------------------------------------------------------------------------------
# Cohort
# ----------------------------------------------------------------------------------------------


def _read_case_info(folder: Path) -> dict[str, Any]:
    path = folder / "case.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(path, "is not a readable JSON file") from None
    return info if isinstance(info, dict) else {}


def _cohort_cases(cohort: Path) -> list[CaseRecord]:
    from kidneyreg.io.cases import patient_id
    from kidneyreg.registration.pairs import find_cases

    records = []
    for folder in find_cases(cohort):
        for name in _CASE_FILES:
            if not (folder / name).is_file():
                raise InputError(
                    folder / name,
                    "missing in the case folder (the benchmark needs the ground truth)",
                )
        info = _read_case_info(folder)
        group = str(info.get("group", "")) if info.get("group") in ("A", "B") else ""
        records.append(CaseRecord(folder.name, folder, patient_id(folder), group, info))
    names = [r.case_id for r in records]
    if len(set(names)) != len(names):
        raise InputError(cohort, "holds two case folders of the same name")
    return records


def _simulate(
    folder: Path, settings: BenchmarkSettings, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Simulate the cohort (half group A, half group B); cases already written are kept."""
    from kidneyreg.simulate.case import case_seed, simulate_case

    width = max(3, len(str(settings.cases - 1)))
    entries = []
    for i in range(settings.cases):
        seed = case_seed(settings.seed, i)
        group = "A" if i % 2 == 0 else "B"
        case = folder / f"case_{i:0{width}d}"
        entries.append({"case": case.name, "seed": seed, "group": group})
        if (case / "case.json").is_file():
            continue  # write_case is atomic: an existing folder is complete
        log(f"simulating case {i + 1}/{settings.cases} (group {group}, seed {seed})")
        simulate_case(
            case, seed, frames=settings.frames, group=group, profile=settings.profile, preview=False
        )
    return entries


def _training_folder(folder: Path, cases: Sequence[CaseRecord]) -> Path:
    """A cohort folder holding links to ``cases`` (a copy where links are not possible)."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {c.case_id for c in cases}
    for entry in folder.iterdir():
        if entry.name not in wanted:
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
            else:
                shutil.rmtree(entry)
    for case in cases:
        link = folder / case.case_id
        if link.exists() or link.is_symlink():
            continue
        try:
            link.symlink_to(case.folder.resolve(), target_is_directory=True)
        except FileExistsError:
            continue  # another process sharing the work folder made it meanwhile
        except OSError:
            shutil.copytree(case.folder, link, dirs_exist_ok=True)
    return folder


# ----------------------------------------------------------------------------------------------
# Registration of one held-out case
# ----------------------------------------------------------------------------------------------


def _true_phase(
    folder: Path, n_frames: int, truth_extras: Mapping[str, Any]
) -> NDArray[np.float64]:
    """Breathing phase in [0, 1) of every frame (0 = end-expiration), NaN when unknown.

    Simulated cases: exact, from ``breathing.json`` (frame times and the repeating list of cycle
    periods, cycles starting at t = 0 as in :mod:`kidneyreg.simulate.breathing`). Otherwise from
    the ``cycle_starts`` of ``ground_truth.json`` when present.
    """
    from kidneyreg.visualize import breathing_phase

    path = folder / "breathing.json"
    if path.is_file():
        try:
            breathing = json.loads(path.read_text(encoding="utf-8"))
            times = np.asarray(breathing["times_s"], dtype=np.float64)
            periods = np.asarray(breathing["parameters"]["periods_s"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError):
            times = periods = np.zeros(0)
        if times.shape == (n_frames,) and periods.size and periods.min() > 0:
            starts = np.concatenate([[0.0], np.cumsum(periods)])
            local = np.mod(times, starts[-1])
            cycle = np.clip(np.searchsorted(starts, local, side="right") - 1, 0, periods.size - 1)
            return np.asarray((local - starts[cycle]) / periods[cycle], dtype=np.float64)
    starts_k = truth_extras.get("cycle_starts")
    if isinstance(starts_k, list) and all(isinstance(s, int) for s in starts_k):
        return breathing_phase(n_frames, starts_k)
    return np.full(n_frames, np.nan)


def _register_case(
    case: CaseRecord,
    fold: int,
    models: Mapping[str, Any],
    methods: Sequence[MethodSpec],
    settings: BenchmarkSettings,
    device: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every method on one held-out case: per-frame rows and a description of the run."""
    import torch

    from kidneyreg.adapt import adaptation_frames
    from kidneyreg.cycles import first_cycle_frames
    from kidneyreg.io.image import read_ct, read_mask
    from kidneyreg.io.transforms import read_transforms_json
    from kidneyreg.io.us import read_us_mask, read_us_sequence
    from kidneyreg.pipeline import Registrar
    from kidneyreg.registration.network import RegistrationNet

    started = time.perf_counter()
    folder = case.folder
    ct = read_ct(folder / "ct.nii.gz")
    ct_mask = read_mask(folder / "ct_kidney_mask.nii.gz", ct, kind="CT kidney mask")
    sequence = read_us_sequence(folder / "us.nii.gz")
    rate = case.info.get("frame_rate")
    if isinstance(rate, int | float) and math.isfinite(rate) and rate > 0:
        # The NIfTI sequence does not store the frame rate; cycle detection needs it.
        sequence = replace(sequence, frame_rate=float(rate))
    us_masks = read_us_mask(folder / "us_kidney_mask.nii.gz", sequence)
    n = sequence.n_frames
    truth_path = folder / "ground_truth.json"
    truth = read_transforms_json(truth_path, expected_frames=n)
    try:
        extras = json.loads(truth_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        extras = {}
    phase = _true_phase(folder, n, extras if isinstance(extras, dict) else {})

    registrars: dict[str | None, Any] = {}
    prepared: dict[str | None, Any] = {}
    cycle: NDArray[np.int64] | None = None
    messages: list[str] = []
    adaptation_s: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for method in methods:
        key = method.training
        if key not in registrars:
            if key is None:
                torch.manual_seed(int(settings.seed))
                model: Any = RegistrationNet(models["full"].config)
            else:
                model = models[key]
            registrars[key] = Registrar(
                ct, model, ct_mask=ct_mask, device=device, ct_source=str(folder / "ct.nii.gz")
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                prepared[key] = registrars[key].prepare(sequence, us_masks)
            for w in caught:
                text = " ".join(str(w.message).split())
                if text not in messages:
                    messages.append(text)
            if cycle is None:
                detection = prepared[key].cycles
                cycle = adaptation_cycle(first_cycle_frames(detection, n), n)
        registrar, ready = registrars[key], prepared[key]
        assert cycle is not None
        registrar.reset()
        if method.initial:
            matrices = registrar.initial_alignment(ready)
        else:
            if method.adaptation is not None:
                centres = adaptation_frames(method.adaptation, cycle)
                record = registrar.adapt(
                    ready,
                    frames_idx=centres.tolist(),
                    strategy=method.adaptation,
                    epochs=settings.adapt_epochs,
                    seed=int(settings.seed),
                )
                adaptation_s[method.key] = record.seconds
            matrices = registrar.register(ready).matrices
        values = evaluate_frames(
            ct_mask, us_masks, sequence.pixel_size, matrices, truth.matrices
        ).values
        first_test = int(cycle.max()) + 1
        for k in range(n):
            row: dict[str, Any] = {
                "method": method.key,
                "fold": fold,
                "case": case.case_id,
                "patient": case.patient,
                "group": case.group,
                "frame": k,
                "test": int(k >= first_test),
                "phase": float(phase[k]),
            }
            row.update({name: float(values[name][k]) for name in _FRAME_METRICS})
            rows.append(row)
    assert cycle is not None
    description = {
        "case": case.case_id,
        "fold": fold,
        "n_frames": n,
        "adaptation_frames": [int(cycle.min()), int(cycle.max()) + 1],
        "test_frames": [int(cycle.max()) + 1, n],
        "adaptation_seconds": adaptation_s,
        "seconds": time.perf_counter() - started,
        "warnings": messages,
    }
    return rows, description


# ----------------------------------------------------------------------------------------------
# Figures and report
# ----------------------------------------------------------------------------------------------


def _figures(
    folder: Path,
    frames: Sequence[Mapping[str, Any]],
    methods: Sequence[MethodSpec],
) -> list[tuple[str, Path]]:
    from kidneyreg.visualize import figure_boxplots, figure_error_vs_phase

    folder.mkdir(parents=True, exist_ok=True)
    tested = [row for row in frames if int(row["test"]) == 1]
    by_method: dict[str, list[Mapping[str, Any]]] = {m.key: [] for m in methods}
    for row in tested:
        if row["method"] in by_method:
            by_method[row["method"]].append(row)
    labels = {m.key: m.label for m in methods}
    # Reference methods first, then the rest in plan order.
    first = [k for k in ("initial", "pretrained", "one-cycle") if k in by_method]
    by_method = {k: by_method[k] for k in first + [k for k in by_method if k not in first]}
    out: list[tuple[str, Path]] = []
    for metric, name in (("tre", "TRE"), ("mcd_ctct", "MCD CT-CT"), ("mcd_ctus", "MCD CT-US")):
        values = {
            labels[key]: np.array([_number(r.get(metric)) for r in rows], dtype=np.float64)
            for key, rows in by_method.items()
        }
        path = figure_boxplots(values, name, folder / f"box_{metric}.png")
        out.append((f"{name} of every method on the test frames of the held-out cases.", path))
    shown = [key for key in ("initial", "pretrained", "one-cycle") if by_method.get(key)]
    if shown:
        errors = {labels[k]: [_number(r.get("tre")) for r in by_method[k]] for k in shown}
        phases = {labels[k]: [_number(r.get("phase")) for r in by_method[k]] for k in shown}
        path = figure_error_vs_phase(errors, phases, folder / "phase_tre.png", metric_name="TRE")
        out.append(("TRE against the breathing phase (0 = end-expiration), test frames.", path))
    return out


def _group_offsets(cases: Sequence[CaseRecord]) -> str:
    parts = []
    for group in ("A", "B"):
        rot = [
            float(c.info["offset"]["rotation_norm_deg"])
            for c in cases
            if c.group == group
            and isinstance(c.info.get("offset"), dict)
            and "rotation_norm_deg" in c.info["offset"]
        ]
        trans = [
            float(c.info["offset"]["translation_norm_mm"])
            for c in cases
            if c.group == group
            and isinstance(c.info.get("offset"), dict)
            and "translation_norm_mm" in c.info["offset"]
        ]
        if rot and trans:
            parts.append(
                f"group {group} ({len(rot)} cases): offsets {np.mean(rot):.2f}±{np.std(rot):.2f} "
                f"deg, {np.mean(trans):.2f}±{np.std(trans):.2f} mm"
            )
    return "This cohort: " + "; ".join(parts) + "." if parts else ""


def _setup_text(
    settings: BenchmarkSettings,
    cases: Sequence[CaseRecord],
    fold_of: Sequence[int],
    trainings: Sequence[TrainingSpec],
    cohort_text: str,
    case_runs: Sequence[Mapping[str, Any]],
) -> str:
    adapt = (
        "the paper's epochs (2 one-cycle, 5 one-shot and five-shot)"
        if settings.adapt_epochs is None
        else f"{settings.adapt_epochs} epoch(s) for every strategy"
    )
    test = [r["test_frames"][1] - r["test_frames"][0] for r in case_runs]
    lines = [
        f"- Cohort: {cohort_text}; {len(cases)} cases, {len(set(c.patient for c in cases))} "
        f"patients, {settings.folds}-fold cross validation by patient (groups spread evenly).",
        f"- Profile `{settings.profile}`"
        + (
            " (`--quick`: narrow network, tiny cohort; structure check only)"
            if settings.quick
            else ""
        )
        + f"; pretraining {settings.epochs} epoch(s) of {settings.pairs} generated pairs, batch "
        f"{settings.batch_size}, Adam {settings.lr:g}, pose supervision {settings.supervision:g}, "
        + (
            f"{settings.val_fraction:.0%} of the training patients for validation (best epoch "
            "kept)."
            if settings.val_fraction > 0
            else "no validation split (last epoch kept)."
        ),
        f"- {len(trainings)} distinct pretraining(s) per fold: "
        + ", ".join(t.name for t in trainings)
        + ".",
        f"- Adaptation on the held-out case's first breathing cycle with {adapt}, Adam 3e-4.",
        "- Feature maps are the cases' **ground-truth kidney masks** (as `--ct-mask` / "
        "`--us-mask`): these tables measure the registration alone, not the feature networks.",
        "- On simulated cases the U/S kidney mask is the CT kidney mask resliced by the true "
        "pose (inside the fan), so CT-US and CT-CT distances coincide except where the fan cuts "
        "the kidney.",
        "- Scores: frames after the adaptation cycle of each held-out case "
        f"({sum(test)} test frames in all); mean ± std over all test frames of all held-out "
        "cases (each case is held out once). TRE: mean error over the U/S kidney pixels; plane "
        "angle: angle between the estimated and true plane normals.",
        f"- Seed {settings.seed} (cohort, folds, weights, pairs, adaptation order, removals); "
        "`config.json` has every setting, the fold of each case and the runtime.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _settings(
    *,
    profile: str | None,
    folds: int | None,
    cases: int | None,
    frames: int | None,
    epochs: int | None,
    pairs: int | None,
    batch_size: int,
    lr: float,
    supervision: float,
    val_fraction: float | None,
    repeats: int | None,
    adapt_epochs: int | None,
    seed: int,
    tables: Sequence[str] | None,
    quick: bool,
) -> BenchmarkSettings:
    if quick:
        defaults: dict[str, Any] = {
            "profile": "tiny",
            "folds": 2,
            "cases": 4,
            "frames": 10,
            "epochs": 1,
            "pairs": 4,
            "val_fraction": 0.0,
            "repeats": 2,
            "adapt_epochs": 1,
            "network": dict(QUICK_NETWORK),
            "val_per_case": 2,
        }
    else:
        defaults = {
            "profile": "cpu",
            "folds": 5,
            "cases": 20,
            "frames": None,
            "epochs": 2,
            "pairs": 1000,
            "val_fraction": 0.2,
            "repeats": 3,
            "adapt_epochs": None,
            "network": {},
            "val_per_case": 8,
        }
    chosen_profile = profile if profile is not None else str(defaults["profile"])
    if chosen_profile not in PROFILES:
        raise InputError(
            "--profile", f"must be one of {', '.join(PROFILES)}, got {chosen_profile!r}"
        )
    values = {
        "folds": folds if folds is not None else defaults["folds"],
        "cases": cases if cases is not None else defaults["cases"],
        "epochs": epochs if epochs is not None else defaults["epochs"],
        "pairs": pairs if pairs is not None else defaults["pairs"],
        "repeats": repeats if repeats is not None else defaults["repeats"],
    }
    for name, value in values.items():
        if int(value) < 1:
            raise InputError(f"--{name}", f"must be at least 1, got {value}")
    if frames is not None and int(frames) < 2 * get_profile(chosen_profile).window:
        raise InputError(
            "--frames", f"must be at least {2 * get_profile(chosen_profile).window} (two windows)"
        )
    if adapt_epochs is not None and int(adapt_epochs) < 1:
        raise InputError("--adapt-epochs", f"must be at least 1, got {adapt_epochs}")
    if int(batch_size) < 1:
        raise InputError("--batch-size", f"must be at least 1, got {batch_size}")
    fraction = float(defaults["val_fraction"] if val_fraction is None else val_fraction)
    if not 0.0 <= fraction < 1.0:
        raise InputError("--val-fraction", f"must be in [0, 1), got {fraction}")
    selected = tuple(TABLE_KEYS if tables is None else [t.strip() for t in tables if t.strip()])
    return BenchmarkSettings(
        profile=chosen_profile,
        folds=int(values["folds"]),
        cases=int(values["cases"]),
        frames=frames if frames is not None else defaults["frames"],
        epochs=int(values["epochs"]),
        pairs=int(values["pairs"]),
        batch_size=int(batch_size),
        lr=float(lr),
        supervision=float(supervision),
        val_fraction=fraction,
        val_per_case=int(defaults["val_per_case"]),
        repeats=int(values["repeats"]),
        adapt_epochs=adapt_epochs if adapt_epochs is not None else defaults["adapt_epochs"],
        seed=int(seed),
        tables=selected,
        quick=bool(quick),
        network=dict(defaults["network"]),
    )


def _read_json(path: Path) -> Any:
    """A work-folder JSON file; a damaged one is a one-line error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(
            path, f"unreadable benchmark work file ({error}); delete it to redo it"
        ) from error


def _work_folder(out: Path, fingerprint: dict[str, Any], say: Callable[[str], None]) -> Path:
    """The work folder beside ``out``; emptied when it belongs to a run with other settings.

    Call with the setup lock held (:func:`_setup_lock`). A folder with other settings that
    another process still uses (it holds the folder's use lock) is refused, not emptied.
    """
    work = out.parent / f".{out.name}{_WORK_SUFFIX}"
    marker = work / "settings.json"
    text = json.dumps(fingerprint, indent=2, sort_keys=True) + "\n"
    if work.exists():
        try:
            same = marker.read_text(encoding="utf-8") == text
        except OSError:
            same = False
        if not same:
            sole = FileLock(work / _USE_LOCK)
            if not sole.acquire(blocking=False):
                raise InputError(
                    work,
                    "belongs to a benchmark run with other settings that is still running; "
                    "stop it, or choose another --out",
                )
            try:
                say(f"emptying {work}: it holds a run with other settings")
                shutil.rmtree(work)
            finally:
                sole.release()
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, text)
    return work


def _setup_lock(out: Path) -> FileLock:
    """The lock that serialises work-folder set-up (checking, emptying, simulating the cohort).

    It lives beside the work folder (a hidden ``.lock`` file, deleted with the folder), not inside
    it, because set-up may empty the work folder.
    """
    return FileLock(out.parent / f".{out.name}{_WORK_SUFFIX}.lock")


def _remove_work_folder(work: Path, setup: FileLock, say: Callable[[str], None]) -> None:
    """Delete the work folder (and its set-up lock) after a finished run, unless another process
    still uses it."""
    _acquire(setup, "another benchmark process to finish setting up the work folder", say)
    sole = FileLock(work / _USE_LOCK)
    if not sole.acquire(blocking=False):
        say(f"kept {work}: another benchmark process is still using it")
        setup.release()
        return
    try:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        sole.release()
        setup.release(remove=not work.exists())


def _acquire(lock: FileLock, what: str, say: Callable[[str], None]) -> None:
    """Take ``lock``, saying what is waited for when another process holds it."""
    if not lock.acquire(blocking=False):
        say(f"waiting for {what}")
        lock.acquire()


def _pretrain_one(
    spec: TrainingSpec,
    fold: int,
    train_cases: Sequence[CaseRecord],
    fold_dir: Path,
    settings: BenchmarkSettings,
    device: str,
    progress: bool,
    say: Callable[[str], None],
) -> tuple[Any, dict[str, Any]]:
    """Pretrain (or resume, or reuse) one training of one fold: the loaded model and a record."""
    from kidneyreg.pipeline import load_registration_model
    from kidneyreg.registration.train import pretrain

    kept = list(train_cases)
    removal = None
    n_pairs = settings.pairs
    if spec.repeat:
        ids = [c.case_id for c in train_cases]
        removal = removal_plan(settings.seed, spec.repeat, fold, ids, settings.pairs)
        kept = [c for c in train_cases if c.case_id not in removal.removed_cases]
        n_pairs = removal.pairs
    # Trainings on the same cases share one folder of links to them.
    name = "train" if removal is None or not removal.removed_cases else f"train_{spec.name}"
    cohort = _training_folder(fold_dir / name, kept)
    checkpoint = fold_dir / f"{spec.name}.pt"
    started = time.perf_counter()
    result = pretrain(
        cohort,
        checkpoint,
        profile=settings.profile,
        epochs=settings.epochs,
        pairs=n_pairs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed,
        device=device,
        val_fraction=settings.val_fraction,
        resume=True,  # a finished checkpoint of an earlier, stopped run is reused
        features="masks",
        supervision=settings.supervision,
        window=spec.window,
        use_mind=spec.use_mind,
        use_decoder=spec.use_decoder,
        hierarchical=spec.hierarchical,
        config_overrides=dict(settings.network),
        val_per_case=settings.val_per_case,
        progress=progress,
        log=say if progress else None,
    )
    # The checkpoint gives the best validation epoch's weights (the last without validation).
    model = load_registration_model(checkpoint, device="cpu")
    record = {
        "fold": fold,
        "training": spec.name,
        "train_cases": result.train_cases,
        "val_cases": result.val_cases,
        "pairs": n_pairs,
        "removal": None if removal is None else asdict(removal),
        "parameters": model.net.num_parameters(),
        "seconds_this_run": time.perf_counter() - started,
        "seconds_epochs": float(sum(row.get("seconds", 0.0) for row in result.history)),
        "final_val_mcd_mm": result.history[-1].get("val_mcd_mm", math.nan),
    }
    return model, record


def _claimed_in_turn(
    items: Sequence[_Item],
    lock_path: Callable[[_Item], Path],
    work: Callable[[_Item], None],
    waiting_text: Callable[[_Item], str],
    say: Callable[[str], None],
) -> None:
    """Call ``work`` on every item, each under its own lock, so that processes share the items.

    A first pass takes the items no other process holds; a second waits for the rest, whose work
    then finds what the other process wrote (``work`` reuses finished files).
    """
    left: list[_Item] = []
    for item in items:
        lock = FileLock(lock_path(item))
        if not lock.acquire(blocking=False):
            left.append(item)
            continue
        try:
            work(item)
        finally:
            lock.release()
    for item in left:
        lock = FileLock(lock_path(item))
        _acquire(lock, waiting_text(item), say)
        try:
            work(item)
        finally:
            lock.release()


def _run_fold(
    fold: int,
    cases_list: Sequence[CaseRecord],
    fold_of: Sequence[int],
    fold_dir: Path,
    trainings: Sequence[TrainingSpec],
    methods: Sequence[MethodSpec],
    settings: BenchmarkSettings,
    device: str,
    progress: bool,
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Pretrain one fold and register its held-out cases, reusing what the work folder holds.

    Processes that share the work folder share the fold too: each pretraining and each held-out
    case is done by the first process that takes its lock; the others go on to the next one and
    at the end wait for, then reuse, what they skipped.

    Returns:
        The fold's per-frame rows, per-case descriptions and training records (in plan order).
    """
    from kidneyreg.pipeline import load_registration_model

    train_cases = [c for c, f in zip(cases_list, fold_of, strict=True) if f != fold]
    test_cases = [c for c, f in zip(cases_list, fold_of, strict=True) if f == fold]
    caches = {c.case_id: fold_dir / "results" / f"{c.case_id}.json" for c in test_cases}
    records = {t.name: fold_dir / "trainings" / f"{t.name}.json" for t in trainings}
    runs: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    if all(p.is_file() for p in (*caches.values(), *records.values())):
        # Every held-out case of this fold is scored: its results and training records are all
        # that is needed (a fold's folder can be carried to another machine or session without
        # its checkpoints).
        runs = {name: _read_json(path) for name, path in records.items()}
    else:
        number = {t.name: n for n, t in enumerate(trainings, start=1)}

        def pretrain_one(spec: TrainingSpec) -> None:
            checkpoint = fold_dir / f"{spec.name}.pt"
            if records[spec.name].is_file() and checkpoint.is_file():
                # Finished, here or by another process: reuse it as it is.
                runs[spec.name] = _read_json(records[spec.name])
                models[spec.name] = load_registration_model(checkpoint, device="cpu")
                return
            say(
                f"fold {fold + 1}/{settings.folds}: pretraining {spec.name} ({number[spec.name]}/"
                f"{len(trainings)})"
            )
            models[spec.name], runs[spec.name] = _pretrain_one(
                spec, fold, train_cases, fold_dir, settings, device, progress, say
            )
            atomic_write_text(records[spec.name], json.dumps(json_ready(runs[spec.name])) + "\n")

        _claimed_in_turn(
            trainings,
            lambda spec: fold_dir / f".{spec.name}.lock",
            pretrain_one,
            lambda spec: (
                f"pretraining {spec.name} of fold {fold}, which another benchmark "
                "process is running"
            ),
            say,
        )
    stored: dict[str, dict[str, Any]] = {}

    def register_one(case: CaseRecord) -> None:
        cache = caches[case.case_id]
        if not cache.is_file():
            say(
                f"fold {fold + 1}/{settings.folds}: registering {case.case_id} "
                f"({len(methods)} methods)"
            )
            rows, description = _register_case(case, fold, models, methods, settings, device)
            atomic_write_text(cache, json.dumps({"rows": rows, "description": description}) + "\n")
        stored[case.case_id] = _read_json(cache)

    _claimed_in_turn(
        test_cases,
        lambda case: fold_dir / f".{case.case_id}.lock",
        register_one,
        lambda case: (
            f"{case.case_id} of fold {fold}, which another benchmark process is registering"
        ),
        say,
    )
    frames_rows = [row for c in test_cases for row in stored[c.case_id]["rows"]]
    case_runs = [stored[c.case_id]["description"] for c in test_cases]
    return frames_rows, case_runs, [runs[t.name] for t in trainings]


def run_benchmark(
    cohort_dir: str | Path | None,
    out_dir: str | Path,
    *,
    quick: bool = False,
    profile: str | None = None,
    folds: int | None = None,
    cases: int | None = None,
    frames: int | None = None,
    epochs: int | None = None,
    pairs: int | None = None,
    batch_size: int = 2,
    lr: float = 3e-4,
    supervision: float = 1.0,
    val_fraction: float | None = None,
    repeats: int | None = None,
    adapt_epochs: int | None = None,
    tables: Sequence[str] | None = None,
    seed: int = 0,
    device: str = "auto",
    baselines: Sequence[str | Path] = (),
    keep_work: bool = False,
    only_folds: Sequence[int] | None = None,
    command: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> BenchmarkResult | None:
    """Run the benchmark (see the module docstring) and write its report into ``out_dir``.

    Defaults depend on ``quick``: the full setting is profile ``cpu``, 5 folds, 20 simulated cases,
    two breathing cycles per case, 2 epochs of 1000 pairs, 3 Appendix H repeats and the paper's
    adaptation epochs; ``quick`` is profile ``tiny`` with a narrow network, 2 folds, 4 cases of 10
    frames, 1 epoch of 4 pairs, no validation split, 2 repeats and 1 adaptation epoch (a structure
    check for CI, not a measurement).

    Args:
        cohort_dir: Folder of case folders with ``ground_truth.json``; None simulates a cohort.
        out_dir: Output folder (replaced at the end of a successful run).
        quick: The tiny CI setting.
        profile: Resolution profile (``paper``, ``cpu``, ``tiny``).
        folds: Cross-validation folds.
        cases: Cases to simulate (without ``cohort_dir``).
        frames: Frames per simulated case (None: two breathing cycles plus one).
        epochs: Pretraining epochs.
        pairs: Generated pairs per epoch.
        batch_size: Pretraining windows per step.
        lr: Pretraining learning rate.
        supervision: Pretraining pose supervision weight (0: the paper's unsupervised loss).
        val_fraction: Share of training patients used for validation in each pretraining.
        repeats: Appendix H repeats (the paper: 10).
        adapt_epochs: Adaptation epochs of every strategy (None: the paper's 2 and 5).
        tables: Table keys (None: all of :data:`TABLE_KEYS`).
        seed: Seed of everything random.
        device: ``auto``, ``cpu``, ``cuda``...
        baselines: Baseline per-frame result CSVs (module docstring).
        keep_work: Keep the work folder (cohort, checkpoints) after a successful run.
        only_folds: Run only these folds (0-based) into the work folder and write no report, so
            that several processes (one per core or machine sharing the folder) can share the
            folds; a later run without it reuses their checkpoints and results and writes the
            report. None runs every fold.
        command: Command line shown in the report; None builds a description.
        progress: Show pretraining progress bars.
        log: Called with one-line progress messages.

    Returns:
        The tables, per-frame rows and configuration (:class:`BenchmarkResult`); None with
        ``only_folds`` (nothing is assembled).

    Raises:
        InputError: Bad settings, an unreadable cohort or baseline file, a fold out of range.

    Example:
        >>> result = run_benchmark(None, "bench", quick=True)  # doctest: +SKIP
        >>> print(result.headline.to_markdown())  # doctest: +SKIP
    """
    started = time.perf_counter()
    say = log or (lambda _message: None)
    settings = _settings(
        profile=profile,
        folds=folds,
        cases=cases,
        frames=frames,
        epochs=epochs,
        pairs=pairs,
        batch_size=batch_size,
        lr=lr,
        supervision=supervision,
        val_fraction=val_fraction,
        repeats=repeats,
        adapt_epochs=adapt_epochs,
        seed=seed,
        tables=tables,
        quick=quick,
    )
    window = get_profile(settings.profile).window
    trainings, methods, specs = benchmark_plan(
        settings.tables,
        window=window,
        repeats=settings.repeats,
        adapt_epochs=settings.adapt_epochs,
        seed=settings.seed,
    )
    selected = _selected_folds(only_folds, settings.folds)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    cohort = None if cohort_dir is None else Path(cohort_dir).resolve()
    if cohort is not None and cohort.is_relative_to(out.resolve()):
        raise InputError(cohort, "lies inside --out, which the benchmark replaces")
    fingerprint = {
        "settings": settings.to_dict(),
        "cohort": None if cohort is None else str(cohort),
        "kidneyreg": __version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # Processes sharing the work folder set it up one at a time (one simulates the cohort, the
    # others wait and reuse it), and each holds its use lock until it ends, so that none empties
    # or deletes the folder under another.
    setup = _setup_lock(out)
    _acquire(setup, "another benchmark process to finish setting up the work folder", say)
    try:
        work = _work_folder(out, fingerprint, say)
        in_use = FileLock(work / _USE_LOCK, shared=True)
        in_use.acquire()
        simulated: list[dict[str, Any]] = []
        if cohort is None:
            cohort = work / "cohort"
            try:
                simulated = _simulate(cohort, settings, say)
            except BaseException:
                in_use.release()
                raise
    finally:
        setup.release()
    try:
        cohort_text = (
            f"`{cohort}`"
            if not simulated
            else f"simulated at profile `{settings.profile}` (seed {settings.seed}, half group A, "
            "half group B)"
        )
        cases_list = _cohort_cases(cohort)
        fold_of = assign_folds(
            [c.patient for c in cases_list],
            settings.folds,
            settings.seed,
            strata=[c.group for c in cases_list],
        )
        baseline_rows, baseline_names = read_baselines(
            baselines, {c.case_id: c.group for c in cases_list}
        )
        specs = _with_baselines(specs, baseline_names)

        frames_rows: list[dict[str, Any]] = []
        case_runs: list[dict[str, Any]] = []
        training_runs: list[dict[str, Any]] = []
        for fold in selected:
            fold_dir = work / f"fold_{fold}"
            fold_dir.mkdir(exist_ok=True)
            rows, descriptions, records = _run_fold(
                fold,
                cases_list,
                fold_of,
                fold_dir,
                trainings,
                methods,
                settings,
                device,
                progress,
                say,
            )
            frames_rows.extend(rows)
            case_runs.extend(descriptions)
            training_runs.extend(records)
    finally:
        in_use.release()
    if only_folds is not None:
        say(
            f"fold(s) {', '.join(str(f) for f in selected)} done in {work}; run again without "
            "--only-fold to write the report"
        )
        return None

    all_rows = frames_rows + baseline_rows
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    # mkdtemp makes a private folder; the output folder gets the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)
    try:
        built: dict[str, Table] = {}
        for table_spec in specs:
            key = table_spec.key
            notes = [_PAPER_NOTES[key]] if key in _PAPER_NOTES else []
            if key == "table4":
                offsets = _group_offsets(cases_list)
                if offsets:
                    notes.append(offsets)
            table, csv_rows = _build_table(table_spec, all_rows, notes)
            built[key] = table
            atomic_write_text(stage / f"{key}.csv", _csv_text(_csv_columns(), csv_rows))
        atomic_write_text(stage / "frames.csv", _csv_text(FRAME_COLUMNS, all_rows))
        figures = _figures(stage / "figures", frames_rows, methods)
        runtime = time.perf_counter() - started
        config = {
            "command": command or _default_command(cohort_dir, out, settings, device, baselines),
            "settings": settings.to_dict(),
            "cohort": cohort_text,
            "simulated_cases": simulated,
            "cases": [
                {"case": c.case_id, "patient": c.patient, "group": c.group, "fold": f}
                for c, f in zip(cases_list, fold_of, strict=True)
            ],
            "seeds": {
                "benchmark": settings.seed,
                "cohort": settings.seed if simulated else None,
                "folds": settings.seed,
                "pretraining": settings.seed,
                "adaptation": settings.seed,
                "removals": settings.seed,
                "from_scratch_weights": settings.seed,
            },
            "trainings": [asdict(t) for t in trainings],
            "methods": [asdict(m) for m in methods],
            "training_runs": training_runs,
            "case_runs": case_runs,
            "baselines": [str(p) for p in baselines],
            "device": device,
            "runtime_s": runtime,
            "versions": {
                "kidneyreg": __version__,
                "python": platform.python_version(),
                "torch": _torch_version(),
                "platform": f"{platform.system()} {platform.machine()}",
            },
        }
        atomic_write_text(stage / "config.json", json.dumps(json_ready(config), indent=2) + "\n")
        ordered = [built[key] for key in TABLE_KEYS if key in built]
        headline = built.get("table2", ordered[0])
        sections = [
            (
                "Setup",
                _setup_text(settings, cases_list, fold_of, trainings, cohort_text, case_runs),
            ),
            (
                "Runtime",
                f"This command: {runtime:.0f} s on device `{device}`. The work behind the "
                "tables, as recorded when each part ran (parts may come from earlier, resumed "
                "or parallel runs): "
                f"{sum(float(r['seconds_epochs']) for r in training_runs):.0f} s of pretraining "
                f"epochs and {sum(float(r['seconds']) for r in case_runs):.0f} s registering "
                "held-out cases. Per-training and per-case times are in `config.json`.",
            ),
        ]
        notes = [w for r in case_runs for w in r.get("warnings", [])]
        if notes:
            unique = sorted(set(notes))
            sections.append(("Warnings", "\n".join(f"- {w}" for w in unique[:20])))
        md, html = write_report(
            stage,
            title="kidneyreg benchmark: the paper's tables on held-out patients",
            command=command or _default_command(cohort_dir, out, settings, device, baselines),
            summary_table=headline,
            tables=[t for t in ordered if t is not headline],
            sections=sections,
            figures=[(caption, path) for caption, path in figures],
            name="benchmark",
        )
        replace_folder(stage, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(stage)
    if not keep_work:
        _remove_work_folder(work, setup, say)
    return BenchmarkResult(
        out_dir=out,
        tables=built,
        frames=all_rows,
        config=config,
        markdown=out / md.name,
        html=out / html.name,
    )


def _selected_folds(only_folds: Sequence[int] | None, folds: int) -> list[int]:
    """The folds a run works on, in order: all of them, or the valid, distinct ``only_folds``."""
    if only_folds is None:
        return list(range(folds))
    chosen = sorted({int(f) for f in only_folds})
    bad = [f for f in chosen if not 0 <= f < folds]
    if not chosen or bad:
        raise InputError(
            "--only-fold",
            f"folds are numbered 0..{folds - 1}, got {', '.join(map(str, bad)) or 'none'}",
        )
    return chosen


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _default_command(
    cohort: str | Path | None,
    out: Path,
    settings: BenchmarkSettings,
    device: str,
    baselines: Sequence[str | Path],
) -> str:
    """The ``kidneyreg benchmark`` command line that reproduces these settings."""
    parts = ["kidneyreg benchmark"]
    if cohort is not None:
        parts.append(f"--cohort {cohort}")
    parts.append(f"--out {out}")
    if settings.quick:
        parts.append("--quick")
    parts += [f"--profile {settings.profile}", f"--folds {settings.folds}"]
    if cohort is None:
        parts.append(f"--cases {settings.cases}")
        if settings.frames is not None:
            parts.append(f"--frames {settings.frames}")
    parts += [
        f"--epochs {settings.epochs}",
        f"--pairs {settings.pairs}",
        f"--batch-size {settings.batch_size}",
        f"--supervision {settings.supervision:g}",
        f"--repeats {settings.repeats}",
    ]
    if settings.adapt_epochs is not None:
        parts.append(f"--adapt-epochs {settings.adapt_epochs}")
    parts += [f"--tables {','.join(settings.tables)}", f"--seed {settings.seed}"]
    parts.append(f"--device {device}")
    parts += [f"--baselines {b}" for b in baselines]
    return " ".join(parts)
