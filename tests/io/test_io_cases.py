"""Case folders: the patient a case belongs to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kidneyreg.errors import InputError
from kidneyreg.io.cases import patient_id


def _case(root: Path, name: str, info: object | None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if info is not None:
        (folder / "case.json").write_text(json.dumps(info))
    return folder


def test_patient_id_rules(tmp_path: Path) -> None:
    assert patient_id(_case(tmp_path, "a", {"patient": "P7", "anatomy_seed": 1})) == "P7"
    assert patient_id(_case(tmp_path, "b", {"anatomy_seed": 3})) == "procedural-3"
    assert patient_id(
        _case(tmp_path, "c", {"anatomy_seed": 3, "anatomy_source": "procedural"})
    ) == ("procedural-3")
    assert patient_id(_case(tmp_path, "d", {"anatomy_seed": 9, "anatomy_source": "ct.nii.gz"})) == (
        "ct-ct.nii.gz"
    )
    assert patient_id(_case(tmp_path, "e", None)) == "e"
    assert patient_id(_case(tmp_path, "f", None), "cohort/f") == "cohort/f"
    assert patient_id(_case(tmp_path, "g", ["not", "a", "dict"])) == "g"


def test_unreadable_case_json_is_an_input_error(tmp_path: Path) -> None:
    folder = _case(tmp_path, "bad", None)
    (folder / "case.json").write_text("{not json")
    with pytest.raises(InputError, match=r"case\.json"):
        patient_id(folder)
