"""Checkpoints: atomic saving, weights_only loading, clear errors on bad or foreign files."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import pytest
import torch

from kidneyreg.checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from kidneyreg.errors import InputError


def _payload() -> dict[str, object]:
    return {
        "model": collections.OrderedDict(weight=torch.arange(6.0).reshape(2, 3)),
        "config": {"profile": "tiny", "sizes": [1, 2, 3], "flag": True, "none": None},
        "epoch": 3,
        "loss": 0.25,
        "rng": torch.get_rng_state(),
        "optimizer": {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"lr": 1e-4}]},
    }


def test_round_trip_and_no_temporary_files(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "sub" / "model.pt", _payload(), kind="feature-net")
    assert path == tmp_path / "sub" / "model.pt"
    assert os.listdir(tmp_path / "sub") == ["model.pt"]
    loaded = load_checkpoint(path, kind="feature-net")
    assert torch.equal(loaded["model"]["weight"], torch.arange(6.0).reshape(2, 3))
    assert loaded["config"] == _payload()["config"]
    assert loaded["epoch"] == 3 and loaded["loss"] == 0.25
    assert torch.equal(loaded["rng"], _payload()["rng"])  # type: ignore[arg-type]


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "model.pt", {"epoch": 1}, kind="k")
    with pytest.raises(TypeError, match=r"loaded safely"):
        save_checkpoint(path, {"epoch": 2, "bad": object()}, kind="k")
    assert load_checkpoint(path, kind="k")["epoch"] == 1
    assert os.listdir(tmp_path) == ["model.pt"]


def test_unsafe_payload_values_are_refused_at_saving(tmp_path: Path) -> None:
    import numpy as np

    with pytest.raises(TypeError, match=r"payload\['a'\]"):
        save_checkpoint(tmp_path / "x.pt", {"a": np.zeros(2)}, kind="k")
    with pytest.raises(ValueError, match="kind"):
        save_checkpoint(tmp_path / "x.pt", {}, kind="")


def _error(path: Path, kind: str = "feature-net") -> str:
    with pytest.raises(InputError) as info:
        load_checkpoint(path, kind=kind)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_truncated_and_non_torch_files(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "model.pt", _payload(), kind="feature-net")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("some notes")
    assert "not a kidneyreg checkpoint" in _error(text) or "cannot be read" in _error(text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "cannot be read" in _error(empty)
    assert "does not exist" in _error(tmp_path / "missing.pt")
    assert "folder" in _error(tmp_path)


def test_foreign_other_kind_and_newer_checkpoints(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    assert "not a kidneyreg checkpoint" in _error(foreign)
    other = save_checkpoint(tmp_path / "reg.pt", {"a": 1}, kind="registration-net")
    assert "'registration-net'" in _error(other)
    newer = tmp_path / "newer.pt"
    torch.save(
        {
            "format": "kidneyreg-checkpoint",
            "version": CHECKPOINT_VERSION + 1,
            "kind": "feature-net",
            "payload": {},
        },
        newer,
    )
    assert "version" in _error(newer)


class _Exploit:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_code_in_a_checkpoint_is_never_executed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "kidneyreg-checkpoint", "payload": _Exploit()}, evil)
    assert "safe" in _error(evil)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(_Exploit()))
    _error(plain)
    assert not (tmp_path / "pwned").exists()
