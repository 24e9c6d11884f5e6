"""``kidneyreg demo``: the main job on the embedded default, from a synthetic patient to a report.

:func:`run_demo` does what a new user's first run should show, with nothing to download:

1. simulates one patient with a fixed seed (:func:`kidneyreg.simulate.case.simulate_case_data`)
   and writes its case folder, so ``register`` and ``evaluate`` can be re-run on it;
2. registers the U/S sequence to the CT exactly as ``kidneyreg register`` does, from the written
   files, with the feature networks (no ground-truth masks: a real run has none) and one-cycle
   adaptation (:class:`kidneyreg.pipeline.Registrar`): first with the pretrained model, then
   adapted on the first breathing cycle;
3. evaluates the initial alignment, the pretrained and the adapted model against the ground truth
   (:func:`kidneyreg.evaluation.evaluate_case`: HD and MCD CT-US and CT-CT, TRE, plane angle) on
   the frames after the adaptation cycle, as the paper does;
4. writes the report (:func:`kidneyreg.report.write_report`) with the paper's Figure 2 and
   Figure 5 style views, the per-frame errors against breathing and the summary table.

Output folder::

    <out>/report.html, report.md     the report (figures linked relatively: the folder can move)
    <out>/demo.json                  settings, models, per-method summaries, timing
    <out>/figures/*.png              the report's figures
    <out>/case/                      the simulated patient (DESIGN.md case folder)
    <out>/registration/              what ``kidneyreg register`` writes (transforms.json...)
    <out>/evaluation/<method>.json   per-frame metrics of each method (``evaluate --json``)

Everything is written into a temporary sibling folder first; only a complete run replaces
``<out>``, as a whole. A non-empty ``<out>`` that is not an earlier demo output (no
``demo.json``) is refused, so a mistyped ``--out`` never deletes a user's folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from kidneyreg import __version__
from kidneyreg.adapt import AdaptationRecord
from kidneyreg.cycles import CycleDetection, first_cycle_frames
from kidneyreg.errors import InputError
from kidneyreg.evaluation.evaluate import CASE_FILES, EvaluationResult, evaluate_case
from kidneyreg.evaluation.metrics import summarise
from kidneyreg.features.infer import FeatureModel, bundled_model_path, load_feature_model
from kidneyreg.io.atomic import atomic_write_text, replace_folder
from kidneyreg.io.image import read_ct
from kidneyreg.io.transforms import TransformSequence, read_transforms_json
from kidneyreg.io.us import read_us_sequence
from kidneyreg.pipeline import Registrar, load_registration_model
from kidneyreg.report import Table, write_report
from kidneyreg.results import (
    OUTPUT_FILES,
    RegistrationResult,
    json_ready,
    write_registration_outputs,
)
from kidneyreg.simulate.case import SimulatedCase, simulate_case_data, write_case
from kidneyreg.simulate.probe import APPROACHES
from kidneyreg.visualize import figure_error_vs_breathing, figure_planes_coronal, figure_stacks

__all__ = [
    "DEFAULT_OUT",
    "DEFAULT_SEED",
    "MARKER_FILE",
    "METHODS",
    "SUMMARY_METRICS",
    "DemoResult",
    "DemoSettings",
    "run_demo",
]

#: Output folder when none is given.
DEFAULT_OUT = Path("demo_output")
#: Seed of the demo patient (a right kidney, group A probe offset of about 11 degrees), fixed so
#: that every run shows the same patient.
DEFAULT_SEED = 7
#: The file that marks a folder as a demo output (and may therefore be replaced by a re-run).
MARKER_FILE = "demo.json"
#: Methods compared, in table order.
METHODS: tuple[str, ...] = ("initial", "pretrained", "adapted")
#: Summary rows: metric key of :mod:`kidneyreg.evaluation` -> label.
SUMMARY_METRICS: dict[str, str] = {
    "hd_ctus": "HD CT-US (mm)",
    "mcd_ctus": "MCD CT-US (mm)",
    "hd_ctct": "HD CT-CT (mm)",
    "mcd_ctct": "MCD CT-CT (mm)",
    "tre": "TRE (mm)",
    "plane_angle_deg": "plane angle (deg)",
}
_METHOD_LABELS = {
    "initial": "initial alignment",
    "pretrained": "pretrained model",
    "adapted": "one-cycle adapted",
}
_PROFILES = ("paper", "cpu", "tiny")
_FIGURES = "figures"
_MARKER_KIND = "kidneyreg-demo"


# ----------------------------------------------------------------------------------------------
# Settings and result
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSettings:
    """Options of one demo run (those of ``kidneyreg demo``).

    Attributes:
        out: Output folder.
        seed: Seed of the simulated patient.
        profile: Resolution profile (``cpu`` by default; ``tiny`` for tests).
        frames: Number of U/S frames; None: the simulator's default (two breathing cycles).
        model: Registration checkpoint; None: the bundled model of ``profile``.
        ct_features: CT feature-network checkpoint; None: the bundled one.
        us_features: U/S feature-network checkpoint; None: the bundled one for the view.
        approach: Probe approach of the simulated patient: ``"sagittal"`` (the paper's), or
            ``"flank"`` (registered from the case's ``init.json`` with ``--init``, and its U/S
            maps made by the bundled flank-view network).
        adapt: Adapt on the first breathing cycle (False: ``--no-adapt``).
        video: Write the overlay video of the registration.
        device: ``auto``, ``cpu`` or ``cuda``.

    Example:
        >>> DemoSettings(seed=3, profile="tiny", adapt=False).command()
        'kidneyreg demo --out demo_output --seed 3 --profile tiny --no-adapt'
    """

    out: Path = DEFAULT_OUT
    seed: int = DEFAULT_SEED
    profile: str = "cpu"
    frames: int | None = None
    model: Path | None = None
    ct_features: Path | None = None
    us_features: Path | None = None
    approach: str = "sagittal"
    adapt: bool = True
    video: bool = True
    device: str = "auto"

    def command(self) -> str:
        """The command line that runs these settings (shown in the report)."""
        parts = ["kidneyreg", "demo", "--out", str(self.out), "--seed", str(self.seed)]
        parts += ["--profile", self.profile]
        if self.frames is not None:
            parts += ["--frames", str(self.frames)]
        if self.approach != "sagittal":
            parts += ["--approach", self.approach]
        for option, path in (
            ("--model", self.model),
            ("--ct-features", self.ct_features),
            ("--us-features", self.us_features),
        ):
            if path is not None:
                parts += [option, str(path)]
        if not self.adapt:
            parts.append("--no-adapt")
        if not self.video:
            parts.append("--no-video")
        if self.device != "auto":
            parts += ["--device", self.device]
        return shlex.join(parts)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this run evaluates (no ``adapted`` with ``--no-adapt``)."""
        return METHODS if self.adapt else METHODS[:2]


@dataclass(eq=False)
class DemoResult:
    """What a demo run wrote and measured.

    Attributes:
        out: The output folder.
        report_md: ``report.md``.
        report_html: ``report.html``.
        summary: The summary table (metrics x methods, mean ± std on the evaluated frames).
        evaluations: Method -> per-frame metrics on every frame.
        evaluated_frames: ``[start, stop)`` of the frames the summary covers.
        timings: Stage -> seconds (and ``ms_per_frame``).
        figures: Caption -> figure path.
    """

    out: Path
    report_md: Path
    report_html: Path
    summary: Table
    evaluations: dict[str, EvaluationResult]
    evaluated_frames: tuple[int, int]
    timings: dict[str, float]
    figures: dict[str, Path] = field(default_factory=dict)

    def summary_text(self) -> str:
        """The summary table as printed by ``kidneyreg demo`` (markdown, readable as text)."""
        return self.summary.to_markdown()


# ----------------------------------------------------------------------------------------------
# Checks and models
# ----------------------------------------------------------------------------------------------


def _is_demo_output(folder: Path) -> bool:
    """Whether ``folder`` holds the marker file of an earlier demo run."""
    try:
        document = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(document, dict) and document.get("kind") == _MARKER_KIND


def _check_settings(settings: DemoSettings) -> Path:
    """Validate the options before any work; return the absolute output folder."""
    if settings.profile not in _PROFILES:
        raise InputError("--profile", f"must be paper, cpu or tiny, got {settings.profile!r}")
    if settings.seed < 0:
        raise InputError("--seed", f"must be >= 0, got {settings.seed}")
    if settings.frames is not None and settings.frames < 1:
        raise InputError("--frames", f"must be at least 1, got {settings.frames}")
    if settings.approach not in APPROACHES:
        raise InputError(
            "--approach", f"must be one of {', '.join(APPROACHES)}, got {settings.approach!r}"
        )
    for option, path in (
        ("--model", settings.model),
        ("--ct-features", settings.ct_features),
        ("--us-features", settings.us_features),
    ):
        if path is not None and not Path(path).is_file():
            raise InputError(path, f"{option} file not found")
    out = Path(settings.out).expanduser().absolute()
    if out.is_symlink():
        raise InputError(settings.out, "is a symbolic link; give the folder itself as --out")
    if out.exists():
        if not out.is_dir():
            raise InputError(settings.out, "output path exists and is not a folder")
        if any(out.iterdir()) and not _is_demo_output(out):
            raise InputError(
                settings.out,
                f"is a non-empty folder that is not a demo output (no {MARKER_FILE}); the demo "
                "replaces its output folder as a whole, so choose a new or empty --out",
            )
    cwd = Path.cwd().absolute()
    if out == cwd or out in cwd.parents:
        raise InputError(settings.out, "is the current folder or contains it; choose another --out")
    return out


def _feature_model(
    path: Path | None, modality: str, profile: str, device: str, view: str = "sagittal"
) -> FeatureModel:
    option = f"--{modality}-features"
    if path is None and not bundled_model_path(modality, profile, view=view).is_file():
        which = "" if view == "sagittal" else f" {view}-view"
        raise InputError(
            option,
            f"no bundled{which} {modality.upper()} feature model for profile {profile!r}: train "
            f"one with `kidneyreg train-features --modality {modality} --data DIR --out "
            f"{modality}.pt --profile {profile}` and pass it with {option}",
        )
    return load_feature_model(path, modality=modality, profile=profile, device=device, view=view)


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def _evaluated_frames(cycles: CycleDetection | None, n_frames: int) -> tuple[int, int]:
    """``[start, n)``: the frames after the first breathing cycle (all when nothing is left)."""
    if cycles is None:
        return 0, n_frames
    stop = int(first_cycle_frames(cycles, n_frames)[-1]) + 1
    return (stop, n_frames) if stop < n_frames else (0, n_frames)


def _summaries(
    evaluation: EvaluationResult, frames: tuple[int, int]
) -> dict[str, dict[str, float | int | None]]:
    out: dict[str, dict[str, float | int | None]] = {}
    for name, values in evaluation.values.items():
        stats = summarise(values[frames[0] : frames[1]])
        out[name] = {
            "mean": _finite_or_none(stats.mean),
            "std": _finite_or_none(stats.std),
            "median": _finite_or_none(stats.median),
            "p95": _finite_or_none(stats.p95),
            "n": stats.n,
            "n_missing": stats.n_missing,
        }
    return out


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _summary_table(
    summaries: dict[str, dict[str, dict[str, float | int | None]]],
    frames: tuple[int, int],
    n_frames: int,
) -> Table:
    methods = list(summaries)
    final = methods[-1]
    columns = ["metric", *(_METHOD_LABELS[m] for m in methods), f"{final} vs initial"]
    rows: list[list[Any]] = []
    for key, label in SUMMARY_METRICS.items():
        cells: list[Any] = [label]
        for method in methods:
            stats = summaries[method][key]
            mean, std = stats["mean"], stats["std"]
            cells.append(None if mean is None else f"{mean:.2f} ± {std or 0.0:.2f}")
        first, last = summaries["initial"][key]["mean"], summaries[final][key]["mean"]
        change = None
        if first is not None and last is not None and first > 0:
            change = f"{100.0 * (last - first) / first:+.0f} %"
        cells.append(change)
        rows.append(cells)
    span = (
        f"frames {frames[0]}-{frames[1] - 1} of {n_frames} (after the adaptation cycle)"
        if frames[0] > 0
        else f"all {n_frames} frames"
    )
    missing = sorted(
        {
            f"{SUMMARY_METRICS[key]}: {stats['n_missing']} frame(s) without the kidney in view"
            for method in methods
            for key, stats in summaries[method].items()
            if key in SUMMARY_METRICS and stats["n_missing"]
        }
    )
    notes = [
        f"Mean ± standard deviation over {span}. HD / MCD: Hausdorff and mean contour distance "
        "of the CT kidney resliced by the pose against the U/S kidney (CT-US) or against the CT "
        "kidney resliced by the true pose (CT-CT); TRE: mean target registration error over the "
        "kidney pixels; plane angle: between the estimated and the true image planes.",
        *missing,
    ]
    return Table(columns, rows, caption="Registration error against the ground truth", notes=notes)


# ----------------------------------------------------------------------------------------------
# Figures and report
# ----------------------------------------------------------------------------------------------


def _figures(
    folder: Path,
    *,
    case: SimulatedCase,
    registration: Path,
    poses: dict[str, NDArray[np.float64]],
    evaluations: dict[str, EvaluationResult],
    cycle_starts: list[int],
    adaptation_frames: tuple[int, int] | None,
    frames: tuple[int, int],
) -> dict[str, Path]:
    """Draw the report's figures into ``folder/figures``; caption -> path."""
    target = folder / _FIGURES
    target.mkdir(exist_ok=True)
    final = list(poses)[-1]
    pixel = (float(case.pixel_size), float(case.pixel_size))
    # The kidney's true breathing displacement (mm) is the signal the errors are drawn against.
    signal = np.linalg.norm(np.asarray(case.breathing["translations_mm"], dtype=np.float64), axis=1)
    # Show end-inspiration of the evaluated frames: the largest breathing displacement.
    shown = frames[0] + int(np.argmax(signal[frames[0] : frames[1]]))
    figures: dict[str, Path] = {}

    planes = sitk.GetArrayFromImage(sitk.ReadImage(str(registration / OUTPUT_FILES["ct_planes"])))
    kidney_planes = sitk.GetArrayFromImage(
        sitk.ReadImage(str(registration / OUTPUT_FILES["ct_kidney_mask_planes"]))
    )
    caption = (
        f"Frames stacked over time (paper Figure 2): CT resliced by the {_METHOD_LABELS[final]} "
        f"result (top) and U/S (bottom); frame {shown} (end-inspiration) in the middle. Cyan: "
        "true U/S kidney; orange: CT kidney (feature network) resliced by the result. Breathing "
        "shows as waves in "
        "the axial and coronal views; where the registration follows it, the contours move "
        "together."
    )
    figures[caption] = figure_stacks(
        planes,
        case.frames,
        pixel,
        target / "stacks.png",
        frame_index=shown,
        masks={"U/S kidney (truth)": case.us_kidney_mask, f"CT kidney ({final})": kidney_planes},
        mask_colours={"U/S kidney (truth)": "#00dcff", f"CT kidney ({final})": "#ff8c00"},
        frame_rate=case.frame_rate,
    )

    footprint = np.asarray(case.us_labels != 0).any(axis=0)
    caption = (
        f"U/S plane of frame {shown} in coronal and axial CT slices through the kidney (paper "
        "Figure 5): initial alignment (blue), true pose (green) and the registration result "
        "(red)."
    )
    figures[caption] = figure_planes_coronal(
        case.ct,
        case.ct_kidney_mask,
        {
            "initial": poses["initial"][shown],
            "reference": case.matrices[shown],
            "result": poses[final][shown],
        },
        case.frames.shape[1:],
        pixel,
        target / "planes_coronal.png",
        footprint=footprint if footprint.any() else None,
    )

    for key, name, file in (
        ("tre", "TRE", "tre_vs_breathing.png"),
        ("mcd_ctct", "MCD CT-CT", "mcd_vs_breathing.png"),
    ):
        caption = (
            f"Per-frame {name} of each method against the kidney's simulated breathing "
            "displacement (grey, mm); dashed: breathing cycles detected on the U/S; shaded: the "
            "adaptation cycle."
        )
        figures[caption] = figure_error_vs_breathing(
            {_METHOD_LABELS[m]: e.values[key] for m, e in evaluations.items()},
            signal,
            cycle_starts,
            target / file,
            frame_rate=case.frame_rate,
            adaptation_frames=adaptation_frames,
            ylabel=f"{name} (mm)",
            signal_label="kidney displacement (mm)",
            title=f"{name} per frame over the breathing cycles",
        )
    montage = registration / OUTPUT_FILES["montage"]
    figures[
        "Overlays written by the registration: CT kidney resliced by the result (orange) and the "
        "U/S kidney found by the feature network (cyan) on sampled frames."
    ] = montage
    preview = folder / "case" / "preview.png"
    figures["The simulated patient: CT planes with the U/S plane, and U/S frames."] = preview
    return figures


def _run_table(
    settings: DemoSettings,
    case: SimulatedCase,
    models: dict[str, str],
    result: RegistrationResult,
    device: str,
) -> Table:
    info = case.info
    offset = info.get("offset", {})
    rows: list[list[Any]] = [
        ["seed", settings.seed],
        ["profile", f"{settings.profile} ({info.get('pixel_size_mm', 0):.2f} mm U/S pixels)"],
        [
            "patient",
            f"{info.get('kidney')} kidney, {settings.approach} view, group "
            f"{info.get('group')} probe offset "
            f"({offset.get('rotation_norm_deg', float('nan')):.1f} deg, "
            f"{offset.get('translation_norm_mm', float('nan')):.1f} mm)",
        ],
        [
            "U/S sequence",
            f"{len(case.frames)} frames of {case.frames.shape[1]} x {case.frames.shape[2]} at "
            f"{case.frame_rate:.1f} fps",
        ],
        ["breathing cycles detected at frames", ", ".join(map(str, result.cycle_starts)) or "-"],
        ["adaptation", result.adaptation],
        ["registration model", models["registration"]],
        ["CT feature model", models["ct"]],
        ["U/S feature model", models["us"]],
        ["device", device],
    ]
    return Table(["setting", "value"], rows, caption="Run")


def _timing_table(timings: dict[str, float], n_frames: int) -> Table:
    labels = {
        "simulate_s": "simulate the patient and write the case",
        "ct_preparation_s": "CT preparation (feature network, grid)",
        "us_preparation_s": "U/S preparation (feature network, breathing cycles)",
        "pretrained_registration_s": "registration with the pretrained model",
        "adaptation_s": "one-cycle adaptation",
        "registration_s": f"registration of the {n_frames} frames",
        "outputs_s": "registration outputs (transforms, planes, overlays, video)",
        "evaluation_s": "evaluation",
        "report_s": "figures and report",
        "total_s": "total",
    }
    rows: list[list[Any]] = [
        [label, f"{timings[key]:.1f} s"] for key, label in labels.items() if key in timings
    ]
    rows.append(["per frame, U/S preparation included", f"{timings['ms_per_frame']:.0f} ms"])
    rows.append(
        ["per frame, registration network only", f"{timings['network_ms_per_frame']:.0f} ms"]
    )
    return Table(["stage", "time"], rows, caption="Timing (wall clock, this run)")


def _sections(
    settings: DemoSettings,
    window: int,
    record: AdaptationRecord | None,
    frames: tuple[int, int],
    warnings: list[str],
) -> list[tuple[str, str]]:
    case = shlex.quote(str(Path(settings.out) / "case"))
    models = "".join(
        f" {option} {shlex.quote(str(path))}"
        for option, path in (
            ("--model", settings.model),
            ("--ct-features", settings.ct_features),
            ("--us-features", settings.us_features),
        )
        if path is not None
    )
    flank = settings.approach == "flank"
    scanned = " from the flank" if flank else ""
    start = (
        " from the coarse flank pose `case/init.json` (`--init`)"
        if flank
        else " from the default sagittal view"
    )
    lines = [
        f"1. Simulated one patient (seed {settings.seed}, profile `{settings.profile}`) scanned"
        f"{scanned} and wrote its case folder `case/`: CT, kidney masks, U/S sequence and the "
        "true pose of every frame.",
        "2. Registered the U/S sequence to the CT from those files, as `kidneyreg register` does: "
        "kidney feature maps from the feature networks (no ground-truth masks), initial alignment "
        f"by kidney centroids{start}, then the registration network on windows of "
        f"{window} consecutive frames (each frame's pose from the window it is the middle of).",
    ]
    if record is not None:
        lines.append(
            f"3. Adapted the pretrained model on the first breathing cycle (frames "
            f"{record.frame_range[0]}-{record.frame_range[1] - 1}: {len(record.frames)} windows, "
            f"{record.epochs} epochs, {record.steps} steps, {record.seconds:.1f} s) with the "
            "unsupervised loss, then registered every frame again."
        )
    else:
        lines.append("3. No adaptation (`--no-adapt`): the pretrained model's result is kept.")
    lines.append(
        "4. Evaluated the initial alignment and each model against the ground truth on frames "
        f"{frames[0]}-{frames[1] - 1}."
    )
    text = "\n".join(lines)
    rerun = (
        "Register and evaluate the simulated case yourself:\n\n```bash\n"
        f"kidneyreg register --ct {case}/ct.nii.gz --us {case}/us.nii.gz{models}"
        f"{f' --init {case}/init.json' if flank else ''} --out my_registration\n"
        f"kidneyreg evaluate --case {case} --pred my_registration/transforms.json\n```\n\n"
        "Files: `registration/transforms.json` (one 4x4 pose per frame, U/S image mm to CT "
        "world mm), `registration/ct_planes.nii.gz` (the CT resliced on every frame), "
        "`registration/overlays/`, `evaluation/<method>.json` (per-frame metrics), "
        "`demo.json` (this run's numbers)."
    )
    sections = [("What the demo did", text), ("Your turn", rerun)]
    if warnings:
        sections.append(("Warnings", "\n".join(f"- {w}" for w in warnings)))
    return sections


# ----------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------


def _publish(staging: Path, final: Path) -> None:
    """Make ``staging`` the folder ``final`` (an earlier demo output is replaced as a whole)."""
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp makes a private folder; the output gets the usual permissions.
    os.chmod(staging, 0o777 & ~umask)
    replace_folder(staging, final)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run_demo(
    settings: DemoSettings = DemoSettings(),
    *,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring) and write its output folder.

    Args:
        settings: The options.
        log: Called with one-line progress messages.
        progress: Called with ``(stage, done, total)`` during adaptation (``"adapt"``, steps) and
            registration (``"register pretrained"`` / ``"register adapted"``, frames).

    Returns:
        Paths, summary table, evaluations and timings.

    Raises:
        InputError: Bad options, an ``out`` that is a file or a non-demo folder, a missing or
            bad model; the output folder is then left as it was.

    Example:
        >>> result = run_demo(DemoSettings(out=Path("demo_output")))  # doctest: +SKIP
        >>> print(result.summary_text())  # doctest: +SKIP
    """
    say = log or (lambda _message: None)
    started = time.perf_counter()
    final_dir = _check_settings(settings)

    # Models first: a missing or bad model is reported before minutes of work.
    reg_model = load_registration_model(settings.model, profile=settings.profile)
    ct_model = _feature_model(settings.ct_features, "ct", settings.profile, settings.device)
    # The view register would choose from the case's init.json (Registrar.us_view).
    us_model = _feature_model(
        settings.us_features, "us", settings.profile, settings.device, view=settings.approach
    )
    window = int(reg_model.profile.window)
    if settings.frames is not None and settings.frames < window:
        raise InputError(
            "--frames",
            f"must be at least the registration window of {window}, got {settings.frames}",
        )
    models = {"registration": reg_model.source, "ct": ct_model.source, "us": us_model.source}

    try:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent)
        )
    except OSError as error:
        raise InputError(settings.out, f"cannot write there ({error.strerror})") from None
    timings: dict[str, float] = {}
    try:
        mark = time.perf_counter()
        say(f"simulating the patient (seed {settings.seed}, profile {settings.profile})")
        case = simulate_case_data(
            settings.seed,
            frames=settings.frames,
            profile=settings.profile,
            approach=settings.approach,
        )
        case_dir = write_case(case, staging / "case")
        timings["simulate_s"] = time.perf_counter() - mark

        # From here on exactly what `kidneyreg register` does with the written files.
        ct_path, us_path = case_dir / "ct.nii.gz", case_dir / CASE_FILES["us"]
        ct_image = read_ct(ct_path)
        sequence = read_us_sequence(us_path, min_frames=window)
        # A flank scan starts from its coarse pose (`register --init case/init.json`); a
        # sagittal one from the default sagittal pose.
        init = None
        if settings.approach != "sagittal":
            init = read_transforms_json(case_dir / "init.json")
            init = init.broadcast_to(sequence.n_frames)
        registrar = Registrar(
            ct_image,
            reg_model,
            ct_features=ct_model,
            us_features=us_model,
            device=settings.device,
            kidney=str(case.info["kidney"]),
            init=init,
            ct_source=str(ct_path),
            log=say,
        )
        timings["ct_preparation_s"] = registrar.ct_seconds
        prepared = registrar.prepare(sequence)
        timings["us_preparation_s"] = prepared.seconds

        def reporter(stage: str) -> Callable[[int, int], None] | None:
            if progress is None:
                return None
            return lambda done, total: progress(stage, done, total)

        say(f"registering {sequence.n_frames} frames with the pretrained model")
        pretrained = registrar.register(prepared, progress=reporter("register pretrained"))
        timings["pretrained_registration_s"] = pretrained.timing["registration_s"]
        result, record = pretrained, None
        if settings.adapt:

            def adapt_progress(step: int, total: int, _loss: float) -> None:
                if progress is not None:
                    progress("adapt", step, total)

            record = registrar.adapt(prepared, progress=adapt_progress)
            timings["adaptation_s"] = record.seconds
            say(f"registering {sequence.n_frames} frames with the adapted model")
            result = registrar.register(prepared, progress=reporter("register adapted"))
        timings["registration_s"] = result.timing["registration_s"]
        timings["ms_per_frame"] = result.timing["ms_per_frame"]
        timings["network_ms_per_frame"] = result.timing["network_ms_per_frame"]

        mark = time.perf_counter()
        say("writing the registration outputs")
        registration = staging / "registration"
        write_registration_outputs(
            registration,
            result,
            ct_image,
            sequence,
            ct_kidney_mask=registrar.ct_kidney_mask,
            us_masks=prepared.kidney_masks(),
            video=settings.video,
        )
        timings["outputs_s"] = time.perf_counter() - mark

        mark = time.perf_counter()
        say("evaluating against the ground truth")
        initial = result.initial_matrices
        if initial is None:
            raise ValueError("the registration result has no initial alignment")
        poses = {"initial": initial, "pretrained": pretrained.matrices}
        if settings.adapt:
            poses["adapted"] = result.matrices
        n = sequence.n_frames
        evaluations: dict[str, EvaluationResult] = {}
        for method, matrices in poses.items():
            pred: TransformSequence | Path = TransformSequence(
                matrices, list(range(n)), source=f"{method} poses"
            )
            if method == settings.methods[-1]:
                pred = registration / OUTPUT_FILES["transforms"]  # as `kidneyreg evaluate` reads
            evaluations[method] = evaluate_case(case_dir, pred)
            evaluations[method].write_json(staging / "evaluation" / f"{method}.json")
        frames = _evaluated_frames(prepared.cycles, n)
        summaries = {m: _summaries(e, frames) for m, e in evaluations.items()}
        table = _summary_table(summaries, frames, n)
        timings["evaluation_s"] = time.perf_counter() - mark

        mark = time.perf_counter()
        say("drawing the figures and writing the report")
        adaptation_frames = None if record is None else record.frame_range
        figures = _figures(
            staging,
            case=case,
            registration=registration,
            poses=poses,
            evaluations=evaluations,
            cycle_starts=list(result.cycle_starts),
            adaptation_frames=adaptation_frames,
            frames=frames,
        )
        timings["report_s"] = time.perf_counter() - mark
        timings["total_s"] = time.perf_counter() - started
        warnings = list(dict.fromkeys(result.warnings))
        device = str(registrar.device)
        document = {
            "kind": _MARKER_KIND,
            "kidneyreg_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": settings.command(),
            "seed": settings.seed,
            "profile": settings.profile,
            "device": device,
            "models": models,
            "case": {
                key: case.info.get(key)
                for key in ("seed", "group", "kidney", "n_frames", "frame_rate", "pixel_size_mm")
            },
            "approach": settings.approach,
            "cycle_starts": list(result.cycle_starts),
            "adaptation": None if record is None else record.to_dict(),
            "evaluated_frames": list(frames),
            "summary": summaries,
            "timing": timings,
            "warnings": warnings,
        }
        atomic_write_text(staging / MARKER_FILE, json.dumps(json_ready(document), indent=2) + "\n")
        md, html = write_report(
            staging,
            title=f"kidneyreg demo: synthetic patient {settings.seed}",
            command=settings.command(),
            summary_table=table,
            tables=[_timing_table(timings, n), _run_table(settings, case, models, result, device)],
            sections=_sections(settings, window, record, frames, warnings),
            figures=list(figures.items()),
        )
        _publish(staging, final_dir)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
    published = {
        caption: final_dir / path.relative_to(staging) for caption, path in figures.items()
    }
    return DemoResult(
        out=final_dir,
        report_md=final_dir / md.name,
        report_html=final_dir / html.name,
        summary=table,
        evaluations=evaluations,
        evaluated_frames=frames,
        timings=timings,
        figures=published,
    )
