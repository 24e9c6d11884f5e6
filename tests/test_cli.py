"""The command line: --help, --version and one-line errors."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from kidneyreg import __version__
from kidneyreg.cli import app

runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_entry_point_runs() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "kidneyreg.cli", "--help"],
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert completed.returncode == 0
    assert "kidneyreg" in completed.stdout
