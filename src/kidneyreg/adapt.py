"""Onsite transfer learning: fine-tune the pretrained registration network on the patient's scan.

The paper's second step (Methods, "Learning Strategy"; Appendix F): before registering a breathing
sequence, the pretrained model is refined without supervision, with the same FIM loss it was
pretrained with, on windows of the sequence itself, then every frame is registered with the
refined model. Three strategies:

* ``"one-cycle"`` (the paper's choice): every window whose middle frame lies in the first detected
  breathing cycle, 2 epochs;
* ``"one-shot"``: one window of that cycle, 5 epochs;
* ``"five-shot"``: five windows of that cycle, 5 epochs.

The shots are spread evenly over the cycle (:func:`adaptation_frames`): shot ``i`` of ``n`` is the
frame at ``(i + 0.5) / n`` of the cycle, so five shots cover its phases and one shot is its middle.
Each epoch visits the windows once in a seeded random order, one Adam step (learning rate 3e-4,
the paper's pretraining rate) per batch.

This module holds the strategy rules, the training loop (:func:`fine_tune`, fed by a callable
that builds a batch of network inputs, so it is independent of how windows are prepared) and the
adapted checkpoint (:func:`save_adapted_model`); :class:`kidneyreg.pipeline.Registrar` prepares
the windows and calls it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from kidneyreg.checkpoint import save_checkpoint
from kidneyreg.registration.loss import pose_supervision_loss
from kidneyreg.registration.network import RegistrationNet

__all__ = [
    "DEFAULT_ADAPT_LR",
    "DEFAULT_EPOCHS",
    "STRATEGIES",
    "AdaptationRecord",
    "FineTuneLog",
    "adaptation_frames",
    "check_strategy",
    "default_epochs",
    "fine_tune",
    "save_adapted_model",
]

#: Adaptation strategies (Appendix F).
STRATEGIES: tuple[str, ...] = ("one-cycle", "one-shot", "five-shot")
#: Epochs of each strategy in the paper (Table 2 of Appendix F).
DEFAULT_EPOCHS: dict[str, int] = {"one-cycle": 2, "one-shot": 5, "five-shot": 5}
#: Adam learning rate of the adaptation (the paper's registration learning rate).
DEFAULT_ADAPT_LR = 3e-4
#: Weight of the pull towards the pretrained model's own estimates during adaptation (0: the
#: paper's pure FIM loss). See :func:`fine_tune`. Chosen on the demo patient and two training
#: patients of the bundled model (not on the held-out ones): without it one-cycle adaptation
#: tilted the demo's planes from 5 to 21 degrees off; 1.0 froze the model; 0.1 kept the gains.
DEFAULT_ANCHOR_WEIGHT = 0.1
#: The anchor when both kidney maps are given masks (``register --ct-mask --us-mask``): with exact
#: maps the FIM loss can be followed all the way. On 16 held-out simulated patients (masks,
#: single pass after adaptation; README "Registration on held-out patients") the paper's pure
#: loss beat the 0.1 anchor: TRE -1.06 mm (12 of 16 patients, Wilcoxon p = 0.01), MCD CT-CT
#: -0.46 mm (15 of 16), group A 1.23 against 3.14 mm. The anchor guards against feature-map
#: errors, which masks do not have: with the feature networks' maps on the same patients the
#: pure loss fitted the outlines closer (MCD -0.19 mm) but raised the TRE (+0.43 mm, 11 of 16).
MASKS_ANCHOR_WEIGHT = 0.0
# Pose error (mm at the kidney) that weighs as much as a unit of the FIM loss in the anchor term.
_ANCHOR_SCALE_MM = 10.0
# Number of windows of the shot strategies.
_SHOTS = {"one-shot": 1, "five-shot": 5}
# Random stream of the epoch orders (independent of anything else seeded with the same seed).
_ORDER_STREAM = 0xADA97


def check_strategy(strategy: str) -> str:
    """Return ``strategy`` when it is one of :data:`STRATEGIES`.

    Raises:
        ValueError: Unknown strategy.

    Example:
        >>> check_strategy("five-shot")
        'five-shot'
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown adaptation strategy {strategy!r}; use {', '.join(STRATEGIES)}")
    return strategy


def default_epochs(strategy: str) -> int:
    """The paper's number of epochs for ``strategy`` (2 for one-cycle, 5 for the shots).

    Example:
        >>> default_epochs("one-cycle"), default_epochs("one-shot")
        (2, 5)
    """
    return DEFAULT_EPOCHS[check_strategy(strategy)]


def adaptation_frames(strategy: str, cycle_frames: ArrayLike) -> NDArray[np.int64]:
    """Window centres a strategy adapts on, out of the first breathing cycle's frames.

    ``"one-cycle"`` takes every frame; ``"one-shot"`` / ``"five-shot"`` take 1 / 5 frames spread
    evenly: shot ``i`` of ``n`` is the frame at fraction ``(i + 0.5) / n`` of the cycle (fewer
    when the cycle is shorter than ``n`` frames).

    Args:
        strategy: One of :data:`STRATEGIES`.
        cycle_frames: Increasing frame indices of the first cycle (at least one).

    Returns:
        Increasing, distinct frame indices (int64).

    Example:
        >>> adaptation_frames("five-shot", np.arange(10, 60)).tolist()
        [15, 25, 35, 45, 55]
        >>> adaptation_frames("one-shot", np.arange(10, 60)).tolist()
        [35]
    """
    frames = np.asarray(cycle_frames, dtype=np.int64)
    if frames.ndim != 1 or frames.size == 0:
        raise ValueError("cycle_frames must be a non-empty 1D list of frame indices")
    if check_strategy(strategy) == "one-cycle":
        return frames.copy()
    shots = _SHOTS[strategy]
    positions = np.floor((np.arange(shots) + 0.5) / shots * frames.size).astype(np.int64)
    return np.unique(frames[np.clip(positions, 0, frames.size - 1)])


@dataclass
class FineTuneLog:
    """What :func:`fine_tune` did.

    Attributes:
        steps: Optimizer steps taken.
        loss_history: FIM loss of every step (before its update), in order.
        epoch_losses: Mean step loss of each epoch.
        seconds: Wall-clock time of the loop.
    """

    steps: int
    loss_history: list[float]
    epoch_losses: list[float]
    seconds: float


def fine_tune(
    net: RegistrationNet,
    batch_inputs: Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]],
    n_windows: int,
    *,
    epochs: int,
    lr: float = DEFAULT_ADAPT_LR,
    batch_size: int = 1,
    seed: int = 0,
    anchor_weight: float = DEFAULT_ANCHOR_WEIGHT,
    progress: Callable[[int, int, float], None] | None = None,
) -> FineTuneLog:
    """Unsupervised fine-tuning of ``net`` with its FIM loss on ``n_windows`` windows.

    With ``anchor_weight`` > 0 (not in the paper) the loss also holds the network near its own
    estimates from before the adaptation: ``anchor_weight`` times the mean displacement (mm, over
    a kidney-sized box, :func:`~kidneyreg.registration.loss.pose_supervision_loss`) between the
    current and the initial estimate of each window, divided by 10 mm. The FIM loss can be
    lowered by planes that outline the kidney well but are tilted away from the truth; the anchor
    keeps the adaptation to corrections the image evidence clearly asks for.

    Every epoch visits the windows once in a random order (a pure function of ``seed`` and the
    epoch), ``ceil(n_windows / batch_size)`` Adam steps per epoch. The network is left in
    evaluation mode.

    Args:
        net: The network, updated in place.
        batch_inputs: Returns ``(fixed, moving)`` tensors on the network's device for a list of
            window numbers (0 .. n_windows - 1), as :meth:`RegistrationNet.forward` takes them.
        n_windows: Number of windows.
        epochs: Passes over the windows (>= 1).
        lr: Adam learning rate.
        batch_size: Windows per step.
        seed: Seed of the window order.
        anchor_weight: Weight of the pull towards the initial estimates (0: none).
        progress: Called after every step with ``(step, total_steps, loss)``.

    Returns:
        The steps and losses (:class:`FineTuneLog`).

    Raises:
        ValueError: Non-positive ``n_windows``, ``epochs``, ``batch_size`` or ``lr``.

    Example:
        >>> log = fine_tune(net, inputs_of, 58, epochs=2)  # doctest: +SKIP
        >>> log.steps  # doctest: +SKIP
        116
    """
    if int(n_windows) < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if not (math.isfinite(anchor_weight) and anchor_weight >= 0):
        raise ValueError(f"anchor_weight must be >= 0, got {anchor_weight}")
    started = time.perf_counter()
    anchors: list[torch.Tensor] = []
    if anchor_weight > 0:
        net.eval()
        with torch.no_grad():
            for first in range(0, int(n_windows), int(batch_size)):
                indices = list(range(first, min(int(n_windows), first + int(batch_size))))
                anchors.extend(net(*batch_inputs(indices)).matrices.detach())
    per_epoch = math.ceil(int(n_windows) / int(batch_size))
    total = per_epoch * int(epochs)
    optimizer = torch.optim.Adam(net.parameters(), lr=float(lr))
    history: list[float] = []
    epoch_losses: list[float] = []
    net.train()
    try:
        for epoch in range(1, int(epochs) + 1):
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), _ORDER_STREAM, epoch]))
            order = rng.permutation(int(n_windows))
            losses = []
            for first in range(0, int(n_windows), int(batch_size)):
                picked = [int(i) for i in order[first : first + batch_size]]
                fixed, moving = batch_inputs(picked)
                output = net(fixed, moving)
                loss = net.loss(output, fixed, moving).total
                if anchors:
                    target = torch.stack([anchors[i] for i in picked])
                    drift = pose_supervision_loss(output.matrices, target).mean()
                    loss = loss + float(anchor_weight) * drift / _ANCHOR_SCALE_MM
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                losses.append(value)
                history.append(value)
                if progress is not None:
                    progress(len(history), total, value)
            epoch_losses.append(float(np.mean(losses)))
    finally:
        net.eval()
    return FineTuneLog(len(history), history, epoch_losses, time.perf_counter() - started)


@dataclass
class AdaptationRecord:
    """How the registration model was adapted to a sequence.

    Attributes:
        strategy: ``"one-cycle"``, ``"one-shot"`` or ``"five-shot"``.
        epochs: Passes over the windows.
        steps: Optimizer steps taken (``epochs * ceil(len(frames) / batch_size)``).
        frames: Middle frames of the windows adapted on.
        cycle: ``(start, stop)`` of the breathing cycle they were taken from (``stop``
            exclusive), or None when the caller chose the frames.
        lr: Adam learning rate.
        batch_size: Windows per step.
        seconds: Wall-clock time, window preparation included (the onsite cost).
        loss_history: FIM loss of every step.
        epoch_losses: Mean loss of each epoch.
        anchor_weight: Weight of the pull towards the pretrained estimates (0: the paper's).
        search_scores: With the plane search (``Registrar.adapt`` with sinus maps): the kidney
            + sinus overlap after the search on the estimates of the weights before and after
            the adaptation, on the same frames; None without it.
        undone: The weights before the adaptation, with their own plane correction, overlapped
            better, so they were kept (the adaptation undone).

    Example:
        >>> record = AdaptationRecord("one-shot", 5, 5, (30,), (0, 58), 3e-4, 1, 4.2)
        >>> record.frame_range
        (30, 31)
    """

    strategy: str
    epochs: int
    steps: int
    frames: tuple[int, ...]
    cycle: tuple[int, int] | None
    lr: float
    batch_size: int
    seconds: float
    loss_history: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    anchor_weight: float = 0.0
    search_scores: tuple[float, float] | None = None
    undone: bool = False

    @property
    def frame_range(self) -> tuple[int, int]:
        """``(first, last + 1)`` of the adapted window centres."""
        return min(self.frames), max(self.frames) + 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready description (for ``transforms.json`` and checkpoints).

        Example:
            >>> AdaptationRecord("one-shot", 5, 5, (30,), None, 3e-4, 1, 4.2).to_dict()["frames"]
            [30]
        """
        return {
            "strategy": self.strategy,
            "epochs": int(self.epochs),
            "steps": int(self.steps),
            "frames": [int(f) for f in self.frames],
            "cycle": None if self.cycle is None else [int(v) for v in self.cycle],
            "lr": float(self.lr),
            "batch_size": int(self.batch_size),
            "seconds": float(self.seconds),
            "anchor_weight": float(self.anchor_weight),
            "search_scores": (
                None if self.search_scores is None else [float(v) for v in self.search_scores]
            ),
            "undone": bool(self.undone),
            "loss_history": [float(v) for v in self.loss_history],
            "epoch_losses": [float(v) for v in self.epoch_losses],
        }


def save_adapted_model(
    path: str | Path,
    net: RegistrationNet,
    *,
    profile: str,
    record: AdaptationRecord,
    base_model: str,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write an adapted network as a ``registration-net`` checkpoint, atomically.

    The payload has the keys a pretraining checkpoint has for loading (``model``, ``config``,
    ``profile``, ``training``) plus ``adaptation`` (the record) and ``base_model``; it has no
    ``best`` weights, so loading it gives exactly the adapted weights.

    Args:
        path: Destination ``.pt`` file.
        net: The adapted network.
        profile: Name of its resolution profile.
        record: The adaptation that produced it.
        base_model: Where the pretrained model came from.
        training: The pretraining settings of the base checkpoint, kept for reference.

    Returns:
        ``path`` as a Path.

    Example:
        >>> save_adapted_model("adapted.pt", net, profile="cpu", record=rec,
        ...                    base_model="model.pt")  # doctest: +SKIP
        PosixPath('adapted.pt')
    """
    from kidneyreg.registration.train import CHECKPOINT_KIND

    payload: dict[str, Any] = {
        "model": {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()},
        "config": net.config.to_dict(),
        "profile": str(profile),
        "training": dict(training or {}),
        "adaptation": record.to_dict(),
        "base_model": str(base_model),
    }
    return save_checkpoint(path, payload, kind=CHECKPOINT_KIND)
