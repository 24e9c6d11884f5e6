"""The ``kidneyreg`` command line (see DESIGN.md section 3).

Every command validates its input and reports a problem as one line naming the file
(:class:`kidneyreg.errors.InputError`), exiting with status 2 and without a traceback.
Heavy modules are imported inside the commands so that ``kidneyreg --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kidneyreg import __version__
from kidneyreg.errors import InputError

app = typer.Typer(
    name="kidneyreg",
    help="Deep 3D CT to 2D ultrasound kidney registration during free breathing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"kidneyreg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """Deep 3D CT to 2D ultrasound kidney registration during free breathing."""


@app.command()
def simulate(
    out: Annotated[
        Path, typer.Option("--out", help="Cohort folder (case_000, case_001... inside).")
    ],
    cases: Annotated[int, typer.Option("--cases", help="Number of cases.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Cohort seed (same seed, same cases).")] = 0,
    frames: Annotated[
        int | None,
        typer.Option("--frames", help="Frames per case (default: two breathing cycles)."),
    ] = None,
    group: Annotated[str, typer.Option("--group", help="Pose-offset group: A, B or mixed.")] = (
        "mixed"
    ),
    profile: Annotated[
        str, typer.Option("--profile", help="Resolution profile: paper, cpu or tiny.")
    ] = "cpu",
    phase: Annotated[
        str,
        typer.Option("--phase", help="CT phase: corticomedullary, nephrographic or plain."),
    ] = "corticomedullary",
    from_ct: Annotated[
        Path | None,
        typer.Option(
            "--from-ct", help="Real CT (file or case folder) instead of a procedural one."
        ),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="Kidney label map of --from-ct.")
    ] = None,
    kidney: Annotated[
        str | None,
        typer.Option(
            "--kidney", help="Kidney to scan: right or left (default right; mixed: by seed)."
        ),
    ] = None,
    preview: Annotated[
        bool, typer.Option("--preview/--no-preview", help="Draw preview.png in each case.")
    ] = True,
) -> None:
    """Simulate a cohort of synthetic patients with exact ground truth (DESIGN.md case folders)."""
    from tqdm import tqdm

    from kidneyreg.simulate.case import check_options, simulate_cohort

    if cases < 1:
        raise InputError("--cases", f"must be at least 1, got {cases}")
    check_options(
        frames=frames,
        group=group,
        profile=profile,
        phase=phase,
        from_ct=from_ct,
        labels=labels,
        kidney=kidney,
    )
    with tqdm(total=cases, desc="simulate", unit="case") as bar:
        folders = simulate_cohort(
            out,
            cases,
            seed,
            frames=frames,
            group=group,
            profile=profile,
            phase=phase,
            from_ct=from_ct,
            labels=labels,
            kidney=kidney,
            preview=preview,
            progress=lambda _i, _folder: bar.update(1),
        )
    typer.echo(f"wrote {len(folders)} case(s) to {out}")


@app.command()
def evaluate(
    case: Annotated[
        Path, typer.Option("--case", help="Case folder (us_kidney_mask, ct_kidney_mask...).")
    ],
    pred: Annotated[
        Path, typer.Option("--pred", help="Predicted poses (transforms.json), one per frame.")
    ],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the summary and frames as JSON.")
    ] = None,
) -> None:
    """HD / MCD (CT-US, CT-CT), TRE and angle errors of predicted poses on one case."""
    from kidneyreg.evaluation.evaluate import evaluate_case

    result = evaluate_case(case, pred)
    typer.echo(f"{case}: {result.n_frames} frame(s), prediction {pred}")
    typer.echo(result.format_table())
    if json_out is not None:
        result.write_json(json_out)
        typer.echo(f"wrote {json_out}")


def main() -> None:
    """Entry point: run the app, turning input errors into one line and exit status 2."""
    try:
        app()
    except InputError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
