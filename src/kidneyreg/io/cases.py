"""Case folders: which patient a case belongs to.

Training splits (feature networks, registration pretraining, the benchmark's folds) keep all
cases of one patient on the same side, so every part of the package must agree on who the
patient of a case folder is.
"""

from __future__ import annotations

import json
from pathlib import Path

from kidneyreg.errors import InputError

__all__ = ["CASE_INFO_FILE", "patient_id"]

#: The simulator's (or a user's) description of a case folder.
CASE_INFO_FILE = "case.json"


def patient_id(folder: str | Path, default: str | None = None) -> str:
    """The patient of a case folder, from its ``case.json`` when it says.

    In order: an explicit ``"patient"`` entry (a user's own data); a procedural anatomy's seed
    (``procedural-SEED``: cases simulated from one seed share one body); a real CT's source
    (``ct-SOURCE``: every case simulated from one scan is one patient, whatever its seed);
    otherwise ``default``, or the folder's name.

    Raises:
        InputError: A ``case.json`` that is not readable JSON.

    Example:
        >>> patient_id("runs/cohort/case_000")  # doctest: +SKIP
        'procedural-1234'
    """
    folder = Path(folder)
    info_path = folder / CASE_INFO_FILE
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(info_path, "is not a readable JSON file") from None
        if isinstance(info, dict):
            if "patient" in info:
                return str(info["patient"])
            source = info.get("anatomy_source", "procedural")
            if source == "procedural" and "anatomy_seed" in info:
                return f"procedural-{info['anatomy_seed']}"
            if source != "procedural":
                return f"ct-{source}"
    return folder.name if default is None else default
