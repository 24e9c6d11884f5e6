"""The ``kidneyreg`` command line (see DESIGN.md section 3).

Every command validates its input and reports a problem as one line naming the file
(:class:`kidneyreg.errors.InputError`), exiting with status 2 and without a traceback.
Heavy modules are imported inside the commands so that ``kidneyreg --help`` stays fast.
"""

from __future__ import annotations

import sys

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
