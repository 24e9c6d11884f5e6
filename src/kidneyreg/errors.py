"""Errors raised on bad user input.

Every problem a user can cause (a missing file, a wrong dimensionality, NaN voxels, an empty mask,
a truncated checkpoint...) raises :class:`InputError`. Its message is one line that names the file
and the problem; the command line prints exactly that line and exits non-zero, without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A problem with user-supplied input, reported as one line naming the file.

    Args:
        source: The file or folder at fault (or a short description of the input when there is
            no file, e.g. ``"--us-spacing"``).
        problem: What is wrong, in a few words.

    Example:
        >>> str(InputError("ct.nii.gz", "contains NaN voxels"))
        'ct.nii.gz: contains NaN voxels'
    """

    def __init__(self, source: str | Path | None, problem: str) -> None:
        self.source = None if source is None else str(source)
        self.problem = " ".join(str(problem).split())
        message = self.problem if self.source is None else f"{self.source}: {self.problem}"
        super().__init__(message)
