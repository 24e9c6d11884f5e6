"""Data-parallel training under ``torchrun``: process group, devices, sharding, replica checks.

``torchrun --nproc_per_node=N kidneyreg pretrain ...`` (or ``--nnodes`` for several machines)
starts N processes with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`setup_distributed`
reads them and joins the process group (``nccl`` on GPUs, ``gloo`` on CPUs). Every rank holds a
full model replica (PyTorch ``DistributedDataParallel`` averages gradients), and
:func:`shard_indices` gives each rank its share of an epoch's pair indices, like
``DistributedSampler`` but from an explicit permutation so that a run is reproducible.

Measured on 2 CPU cores (``../shared/MEASUREMENTS.md``): two 1-thread ranks give about 20 % more
throughput than one 2-thread process, and without a ``barrier`` before
``destroy_process_group`` some runs crashed at exit, hence :func:`teardown_distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray
from torch import nn

__all__ = [
    "DistributedContext",
    "all_reduce_mean",
    "replicas_identical",
    "resolve_device",
    "setup_distributed",
    "shard_indices",
    "teardown_distributed",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: Global rank (0 when not distributed).
        world_size: Number of processes (1 when not distributed).
        local_rank: Rank on this machine (selects the GPU).
        initialized_here: Whether :func:`setup_distributed` created the process group (and so
            :func:`teardown_distributed` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints, logs and progress (rank 0)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> the local GPU when there is one, else the CPU; other names pass through.

    With several processes on one machine, ``"auto"`` and ``"cuda"`` pick GPU ``local_rank``.

    Raises:
        ValueError: ``"cuda"`` asked for without a GPU, or an unknown device name.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    name = device.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no GPU is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def setup_distributed(device: torch.device) -> DistributedContext:
    """Join the process group when ``torchrun`` (or the caller) set ``WORLD_SIZE`` > 1.

    Uses the ``env://`` rendezvous (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``),
    ``nccl`` for CUDA devices and ``gloo`` otherwise. Without those variables (a plain run) it
    returns a single-process context and touches nothing.

    Example:
        >>> setup_distributed(torch.device("cpu")).world_size  # outside torchrun
        1
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size <= 1:
        return DistributedContext()
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        initialized_here = True
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here)


def teardown_distributed(context: DistributedContext, *, barrier: bool = True) -> None:
    """Leave the process group created by :func:`setup_distributed`.

    Args:
        context: The context :func:`setup_distributed` returned.
        barrier: Wait for every rank first (a clean exit). After an error on this rank, pass
            False: the other ranks may never reach the barrier.
    """
    if context.initialized_here and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def shard_indices(order: NDArray[np.int64], rank: int, world_size: int) -> NDArray[np.int64]:
    """This rank's share of an epoch's pair order: ``order[rank::world_size]``, all equal length.

    The order is first padded by repeating its beginning so that every rank gets the same number
    of items (and so the same number of optimizer steps, which data parallelism needs).

    Example:
        >>> shard_indices(np.arange(5), 1, 2)
        array([1, 3, 0])
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    items = np.asarray(order, dtype=np.int64)
    if items.ndim != 1 or items.size == 0:
        raise ValueError("order must be a non-empty 1D array")
    per_rank = -(-items.size // world_size)
    padded = np.resize(items, per_rank * world_size)
    return padded[rank::world_size]


def all_reduce_mean(values: dict[str, float], context: DistributedContext) -> dict[str, float]:
    """Average scalar values over ranks (unchanged when not distributed).

    Example:
        >>> all_reduce_mean({"loss": 1.5}, DistributedContext())
        {'loss': 1.5}
    """
    if not context.distributed or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor = tensor.cpu() / context.world_size
    return {k: float(v) for k, v in zip(keys, tensor.tolist(), strict=True)}


def replicas_identical(module: nn.Module, context: DistributedContext) -> bool:
    """Whether every rank's parameters and buffers equal rank 0's exactly (True alone).

    Rank 0's flattened state is broadcast and compared element by element on every rank; the
    answer is then agreed on by all ranks, so every rank returns the same value.

    Example:
        >>> replicas_identical(nn.Linear(2, 2), DistributedContext())
        True
    """
    if not context.distributed:
        return True
    tensors = [t.detach().reshape(-1).to(torch.float64) for t in module.state_dict().values()]
    flat = torch.cat(tensors) if tensors else torch.zeros(0, dtype=torch.float64)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    mismatch = torch.tensor([0.0 if torch.equal(flat, reference) else 1.0], device=flat.device)
    dist.all_reduce(mismatch, op=dist.ReduceOp.SUM)
    return bool(mismatch.item() == 0.0)
