"""Data-parallel pretraining: two CPU processes (gloo) end with identical replicas."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from test_pairs_cohort import make_cohort

from kidneyreg.checkpoint import load_checkpoint
from kidneyreg.registration.config import RegistrationConfig
from kidneyreg.registration.network import RegistrationNet
from kidneyreg.registration.train import CHECKPOINT_KIND, pretrain

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, port: int, cohort: str, out: str, dumps: str) -> None:
    """One torchrun-like process: environment as torchrun sets it, then pretrain."""
    import os

    torch.set_num_threads(1)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
            "LOCAL_WORLD_SIZE": str(WORLD_SIZE),
        }
    )
    result = pretrain(
        cohort,
        out,
        profile="tiny",
        epochs=1,
        pairs=4,
        batch_size=1,
        seed=2,
        device="cpu",
        val_fraction=0.34,
        val_per_case=2,
        num_workers=0,
        config_overrides={"decoder_slab_half_width": 2},
        progress=False,
        lr=1e-3,
    )
    payload: dict[str, Any] = {
        "state": result.model.state_dict(),
        "identical": result.replicas_identical,
        "history": result.history,
    }
    torch.save(payload, Path(dumps) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_cpu_processes_keep_identical_replicas(tmp_path: Path) -> None:
    cohort = make_cohort(tmp_path / "cohort", n_cases=3, seed=6)
    out = tmp_path / "model.pt"
    mp.spawn(
        _rank_main,
        args=(_free_port(), str(cohort), str(out), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert all(r["identical"] for r in ranks)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key

    # Both ranks agree on the (gathered) validation metrics and the averaged loss.
    def without_time(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert without_time(ranks[0]["history"]) == without_time(ranks[1]["history"])
    # Rank 0 wrote the checkpoint: its weights, and they moved away from the initial ones.
    saved = load_checkpoint(out, kind=CHECKPOINT_KIND)
    assert saved["training"]["world_size"] == WORLD_SIZE
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, saved["model"][key]), key
    torch.manual_seed(2)
    initial = RegistrationNet(RegistrationConfig.from_dict(saved["config"])).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in saved["model"].items())
