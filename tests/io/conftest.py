"""Fixtures shared by the I/O tests."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from kidneyreg.errors import InputError

InputErrorCheck = Callable[[Callable[[], object], "str | Path", str], InputError]


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
