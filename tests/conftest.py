"""Shared test fixtures: the only ``conftest.py`` of the suite.

One conftest on purpose: with ``--doctest-modules`` pytest imports every conftest as a module
named ``conftest``, and two of them clash when several test folders are collected at once.
Helpers that tests import by name live in modules with unique names (``feature_cases``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kidneyreg.checkpoint import save_checkpoint
from kidneyreg.errors import InputError
from kidneyreg.features.config import feature_config
from kidneyreg.features.ulbnet import CHECKPOINT_KIND, ULBNet, model_payload

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "totalsegmentator-example"
FEATURE_TESTS = Path(__file__).resolve().parent / "features"
ONE_THREAD_TESTS = (FEATURE_TESTS, Path(__file__).resolve().parent / "registration")

InputErrorCheck = Callable[[Callable[[], object], "str | Path", str], InputError]


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """The real abdominal CT with kidney labels in ../shared/data; skips when absent."""
    if not (SHARED_DATA / "ct.nii.gz").exists():
        pytest.skip("../shared/data/totalsegmentator-example is not available")
    return SHARED_DATA


@pytest.fixture
def expect_input_error() -> InputErrorCheck:
    """Run a call, assert it raises a one-line InputError naming the file and matching a regex."""

    def check(call: Callable[[], object], name: str | Path, pattern: str) -> InputError:
        with pytest.raises(InputError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "\r" not in message, message
        assert Path(name).name in message, message
        assert re.search(pattern, message), message
        return info.value

    return check


@pytest.fixture(autouse=True)
def _one_torch_thread_in_network_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """One thread for the feature- and registration-network tests: their tiny networks gain
    nothing from more, and on a shared 2-core machine a second thread waits on a busy core."""
    if not set(ONE_THREAD_TESTS) & set(Path(str(request.node.path)).resolve().parents):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Callable[[str], Path]:
    """Factory: a randomly initialised ``tiny`` feature-model checkpoint of a modality."""

    def make(modality: str) -> Path:
        torch.manual_seed(0)
        net = ULBNet(feature_config(modality, "tiny"))
        path = tmp_path / f"tiny_{modality}.pt"
        return save_checkpoint(path, model_payload(net), kind=CHECKPOINT_KIND)

    return make
