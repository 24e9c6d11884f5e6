"""Tests of the shared foundation: one-line input errors, atomic writes, profiles."""

from __future__ import annotations

from pathlib import Path

import pytest

from kidneyreg.errors import InputError
from kidneyreg.io.atomic import atomic_path, atomic_write_text
from kidneyreg.profiles import PROFILES, get_profile


def test_input_error_is_one_line_naming_the_file() -> None:
    error = InputError(Path("/data/ct.nii.gz"), "contains NaN\nvoxels")
    assert str(error) == "/data/ct.nii.gz: contains NaN voxels"
    assert isinstance(error, ValueError)
    assert str(InputError(None, "no input")) == "no input"


def test_atomic_write_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.nii.gz"
    atomic_write_text(target, "first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.nii.gz"]


def test_atomic_write_rejects_empty_output(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("keep")
    with pytest.raises(OSError, match="no data"), atomic_path(target):
        pass
    assert target.read_text() == "keep"


def test_profiles_share_the_paper_field_of_view() -> None:
    paper = get_profile("paper")
    assert paper.volume_shape == (128, 224, 288)
    assert paper.spacing == pytest.approx(0.8)
    for profile in PROFILES.values():
        assert profile.field_of_view_mm == pytest.approx(paper.field_of_view_mm)
        assert profile.us_shape == profile.volume_shape[1:]
        assert all(n % 8 == 0 for n in profile.volume_shape)
    assert get_profile(paper) is paper
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("huge")


def test_atomic_write_gives_default_permissions(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        written = atomic_write_text(tmp_path / "out.json", "{}")
    finally:
        os.umask(mask)
    assert written.stat().st_mode & 0o777 == 0o644
