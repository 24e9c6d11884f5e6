"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "totalsegmentator-example"


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """The real abdominal CT with kidney labels in ../shared/data; skips when absent."""
    if not (SHARED_DATA / "ct.nii.gz").exists():
        pytest.skip("../shared/data/totalsegmentator-example is not available")
    return SHARED_DATA
