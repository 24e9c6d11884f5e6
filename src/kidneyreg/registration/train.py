"""Pretraining of the registration network on generated pairs (Methods, "Learning Strategy").

:func:`pretrain` is ``kidneyreg pretrain``:

1. Read the cohort's case folders and split them by patient into training and validation
   (deterministic by seed).
2. Fit the 2-sigma pose model to the *training* cases' initial -> reference offsets
   (:func:`~kidneyreg.registration.pairs.fit_pose_model`).
3. Train :class:`~kidneyreg.registration.network.RegistrationNet` with the FIM loss on
   ``pairs`` generated pairs per epoch (:class:`~kidneyreg.registration.pairs.TrainingPairs`, the
   same Nt pairs every epoch in a new order, as the paper's fixed generated set), Adam at 3e-4.
   Beyond the paper, ``supervision`` > 0 adds the pose error of each generated pair, whose
   correct transform is known by construction
   (:func:`~kidneyreg.registration.loss.pose_supervision_loss`, mm at the kidney, divided by
   :data:`SUPERVISION_SCALE_MM`): the FIM loss alone is nearly flat around the initial alignment
   (a kidney's cross-section changes little under 10-degree out-of-plane rotations), so the
   paper's purely unsupervised pretraining learns slowly. ``supervision=0`` is the paper's.
   The onsite adaptation stays unsupervised.
4. After every epoch, validate on the validation cases' windows at their *real* initial alignment
   (no generated offset): FIM loss, CT-CT mean contour distance and TRE of the middle frame's
   predicted plane against the reference (:func:`kidneyreg.evaluation.evaluate.evaluate_frames`).
   Row 0 of the history is the initial alignment itself (identity output).
5. Write the checkpoint atomically (model, optimizer, epoch, RNG state, pose model, network
   configuration, profile, history, and the weights of the best validation epoch) and the CSV log
   ``<out>.csv``.

Resuming (``resume=True``) continues from the checkpoint's last completed epoch. Every random
choice is a pure function of the seed, the epoch and the pair index (pair contents, epoch order)
or is restored from the checkpoint (torch's generator, Adam's moments), so a run killed at any
point and resumed ends with the same weights as an uninterrupted run.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains a replica wrapped in
``DistributedDataParallel`` on its shard of each epoch's pair order
(:mod:`~kidneyreg.registration.distributed`); only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray
from torch.utils.data import DataLoader

from kidneyreg.checkpoint import load_checkpoint, save_checkpoint
from kidneyreg.errors import InputError
from kidneyreg.evaluation.evaluate import evaluate_frames
from kidneyreg.geometry import (
    euler_to_matrix,
    euler_to_matrix_torch,
    invert_rigid,
    rotation_angles_deg,
)
from kidneyreg.io.atomic import atomic_write_text
from kidneyreg.profiles import Profile, get_profile
from kidneyreg.registration.config import RegistrationConfig
from kidneyreg.registration.distributed import (
    DistributedContext,
    all_reduce_mean,
    replicas_identical,
    resolve_device,
    setup_distributed,
    shard_indices,
    teardown_distributed,
)
from kidneyreg.registration.loss import fim_loss, pose_supervision_loss
from kidneyreg.registration.network import RegistrationNet, widen_inputs
from kidneyreg.registration.pairs import (
    CohortCase,
    FeatureModels,
    FeatureSource,
    TrainingPairs,
    ValidationWindows,
    find_cases,
    fit_pose_model,
    load_case,
    split_cases,
)
from kidneyreg.registration.pose_model import GaussianPoseModel

__all__ = [
    "CHECKPOINT_KIND",
    "LOG_COLUMNS",
    "PretrainResult",
    "epoch_order",
    "log_path",
    "pose_errors",
    "pretrain",
    "write_log",
]

#: Checkpoint kind of a registration network (:func:`kidneyreg.checkpoint.load_checkpoint`).
CHECKPOINT_KIND = "registration-net"
#: Columns of the CSV log, one row per epoch (row 0: the initial alignment).
LOG_COLUMNS = (
    "epoch",
    "loss",
    "loss_feature",
    "loss_image",
    "loss_motion",
    "loss_supervision_mm",
    "train_rotation_error_deg",
    "train_translation_error_mm",
    "val_loss",
    "val_dice",
    "val_mcd_mm",
    "val_tre_mm",
    "val_rotation_error_deg",
    "seconds",
)
# Random stream of the epoch order (independent of the pair stream).
_ORDER_STREAM = 0x0DE4


def epoch_order(seed: int, epoch: int, n_pairs: int) -> NDArray[np.int64]:
    """The order in which epoch ``epoch`` (1-based) visits the ``n_pairs`` pair indices.

    Example:
        >>> sorted(epoch_order(0, 1, 5).tolist())
        [0, 1, 2, 3, 4]
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _ORDER_STREAM, int(epoch)]))
    return rng.permutation(int(n_pairs)).astype(np.int64)


@dataclass(eq=False)
class PretrainResult:
    """What :func:`pretrain` returns (on every rank).

    Attributes:
        model: The trained network (last epoch), on the training device, in eval mode.
        config: Its configuration.
        pose_model: The pose model the pairs were drawn from.
        history: One dict per row of the CSV log (row 0: the initial alignment).
        checkpoint: The checkpoint file.
        train_cases: Case ids used for training.
        val_cases: Case ids used for validation.
        replicas_identical: Whether every DDP replica ended with identical weights (True alone).
        notes: The run's messages (split, pose model, per-epoch summaries).
    """

    model: RegistrationNet
    config: RegistrationConfig
    pose_model: GaussianPoseModel
    history: list[dict[str, float]]
    checkpoint: Path
    train_cases: list[str]
    val_cases: list[str]
    replicas_identical: bool = True
    notes: list[str] = field(default_factory=list)


def _worker_init(_: int) -> None:
    # Each DataLoader worker generates whole pairs; one thread each avoids oversubscription.
    torch.set_num_threads(1)


def _loader(
    dataset: torch.utils.data.Dataset[dict[str, Any]],
    indices: Sequence[int],
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> DataLoader[dict[str, Any]]:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=[int(i) for i in indices],
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=device.type == "cuda",
    )


def _inputs(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return (
        batch["fixed"].to(device, non_blocking=non_blocking),
        batch["moving"].to(device, non_blocking=non_blocking),
    )


def pose_errors(
    predicted: torch.Tensor, target_params: torch.Tensor
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Rotation (deg) and translation (mm, at the grid origin) errors of predicted transforms.

    Args:
        predicted: ``(B, 4, 4)`` predicted ``D``.
        target_params: ``(B, 6)`` correct parameters.

    Returns:
        Two float64 ``(B,)`` arrays.

    Example:
        >>> rot, trans = pose_errors(torch.eye(4)[None], torch.tensor([[0, 0, 0, 3.0, 4, 0]]))
        >>> float(rot[0]), float(trans[0])
        (0.0, 5.0)
    """
    pred = predicted.detach().to(torch.float64).cpu().numpy()
    true = euler_to_matrix(target_params.detach().to(torch.float64).cpu().numpy())
    rotation = rotation_angles_deg(invert_rigid(true) @ pred)
    translation = np.linalg.norm(pred[:, :3, 3] - true[:, :3, 3], axis=-1)
    return np.asarray(rotation, dtype=np.float64), np.asarray(translation, dtype=np.float64)


_VAL_NAMES = ("val_loss", "val_dice", "val_mcd_mm", "val_tre_mm", "val_rotation_error_deg")


#: Pose error (mm) that weighs as much as a unit of the FIM loss in supervised pretraining.
SUPERVISION_SCALE_MM = 10.0


def _validate(
    model: RegistrationNet,
    windows: ValidationWindows | None,
    context: DistributedContext,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    *,
    identity: bool = False,
) -> dict[str, float]:
    """Mean validation metrics over all windows (each rank does its share, then they gather).

    ``identity=True`` scores the initial alignment itself (every ``D_k`` the identity).
    """
    if windows is None or len(windows) == 0:
        return {name: math.nan for name in _VAL_NAMES}
    config = model.config
    mid = config.window // 2
    rows: list[list[float]] = []
    was_training = model.training
    model.eval()
    mine = range(context.rank, len(windows), context.world_size)
    with torch.no_grad():
        for batch in _loader(windows, mine, batch_size, num_workers, device):
            fixed, moving = _inputs(batch, device)
            if identity:
                eye = torch.eye(4, dtype=fixed.dtype, device=device)
                matrices = eye.expand(fixed.shape[0], config.window, 4, 4).contiguous()
            else:
                matrices = model(fixed, moving).matrices
            terms = fim_loss(matrices, fixed, moving, config)
            rotation, _ = pose_errors(matrices[:, mid], batch["target"][:, mid])
            middle = matrices[:, mid].to(torch.float64).cpu().numpy()
            for b in range(fixed.shape[0]):
                case = windows.cases[int(batch["case"][b])]
                k = int(batch["k"][b])
                # The predicted pose of the middle frame: M = G @ D @ P (architecture.md).
                offset = case.from_network(middle[b])
                predicted = case.initial_grid(k).matrix @ offset @ case.window_P(k)[mid]
                metrics = evaluate_frames(
                    case.ct_mask,
                    case.us_mask[k][None],
                    case.pixel_size,
                    predicted[None],
                    case.references[k][None],
                ).values
                rows.append(
                    [
                        float(terms.per_sample[b]),
                        float(terms.dice[b].mean()),
                        float(metrics["mcd_ctct"][0]),
                        float(metrics["tre"][0]),
                        float(rotation[b]),
                    ]
                )
    model.train(was_training)
    if context.distributed:
        gathered: list[Any] = [None] * context.world_size
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    table = np.array(rows, dtype=np.float64).reshape(-1, len(_VAL_NAMES))
    out: dict[str, float] = {}
    for i, name in enumerate(_VAL_NAMES):
        finite = table[:, i][np.isfinite(table[:, i])]
        out[name] = float(finite.mean()) if finite.size else math.nan
    return out


def _format(name: str, value: float) -> str:
    if not math.isfinite(value):
        return ""
    return str(int(value)) if name == "epoch" else f"{value:.6g}"


def write_log(path: str | Path, history: Sequence[dict[str, float]]) -> Path:
    """Write the history as CSV (:data:`LOG_COLUMNS`; empty cells for undefined values).

    Example:
        >>> write_log("model.csv", [{"epoch": 0, "val_mcd_mm": 4.2}])  # doctest: +SKIP
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LOG_COLUMNS)
    for row in history:
        writer.writerow([_format(name, float(row.get(name, math.nan))) for name in LOG_COLUMNS])
    return atomic_write_text(path, buffer.getvalue())


def log_path(checkpoint: str | Path) -> Path:
    """The CSV log written beside a checkpoint: ``model.pt`` -> ``model.csv``.

    Example:
        >>> log_path("out/model.pt").name
        'model.csv'
    """
    return Path(checkpoint).with_suffix(".csv")


def _settings(
    profile: Profile,
    config: RegistrationConfig,
    pose_model: GaussianPoseModel,
    *,
    n_pairs: int,
    batch_size: int,
    lr: float,
    seed: int,
    features: str,
    supervision: float,
    train_cases: list[str],
    val_cases: list[str],
    world_size: int,
) -> dict[str, Any]:
    return {
        "profile": profile.name,
        "window": int(profile.window),
        "config": config.to_dict(),
        "pose_model": pose_model.to_dict(),
        "n_pairs": n_pairs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "features": features,
        "supervision": supervision,
        "train_cases": list(train_cases),
        "val_cases": list(val_cases),
        "world_size": world_size,
    }


# Settings that must match to resume: they decide the pairs, their order and the model.
_RESUME_KEYS = (
    "profile",
    "window",
    "config",
    "n_pairs",
    "batch_size",
    "lr",
    "seed",
    "features",
    "supervision",
    "train_cases",
    "val_cases",
)


# Defaults of settings older checkpoints do not record.
_RESUME_DEFAULTS: dict[str, Any] = {"supervision": 0.0}


def _check_resume(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    for key in _RESUME_KEYS:
        if saved.get(key, _RESUME_DEFAULTS.get(key)) != current.get(key):
            raise InputError(
                path,
                f"was trained with a different {key} ({saved.get(key)!r} vs {current.get(key)!r} "
                "now): resume with the same settings, or start afresh without --resume",
            )


def _initial_state(path: Path, config: RegistrationConfig) -> dict[str, Any]:
    """The weights of a registration checkpoint made for ``config`` (``--from``).

    A model may start an otherwise identical run that adds inputs: images, or another
    structure's feature map (:func:`widen_inputs`).
    """
    payload = load_checkpoint(path, kind=CHECKPOINT_KIND)
    if "model" not in payload or "config" not in payload:
        raise InputError(path, "is not a registration model checkpoint (no weights or config)")
    if payload["config"] == config.to_dict():
        return dict(payload["model"])
    try:
        source = RegistrationConfig.from_dict(dict(payload["config"]))
        return widen_inputs(dict(payload["model"]), source, config)
    except (ValueError, TypeError):
        pass
    raise InputError(
        path,
        "was made for another network configuration (profile, window or ablation switches): "
        "its weights cannot start this run",
    )


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _default_workers(device: torch.device, world_size: int) -> int:
    # A pair costs ~0.07 s at the cpu profile against ~2 s per CPU train step: workers only pay
    # off when a GPU makes the step fast.
    if device.type != "cuda":
        return 0
    return max(1, min(4, (os.cpu_count() or 1) // max(1, world_size)))


def pretrain(
    cohort_dir: str | Path,
    out: str | Path,
    *,
    profile: str | Profile = "cpu",
    epochs: int = 10,
    pairs: int = 1000,
    batch_size: int = 2,
    lr: float = 3e-4,
    seed: int = 0,
    device: str = "auto",
    val_fraction: float = 0.2,
    resume: bool = False,
    num_workers: int | None = None,
    features: FeatureSource = "masks",
    feature_models: FeatureModels | None = None,
    supervision: float = 1.0,
    initial_weights: str | Path | None = None,
    window: int | None = None,
    use_mind: bool = True,
    use_decoder: bool = True,
    hierarchical: bool = True,
    config_overrides: dict[str, Any] | None = None,
    val_per_case: int = 8,
    min_std_deg: float | None = None,
    min_std_mm: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PretrainResult:
    """Pretrain the registration network on pairs generated from a cohort (see the module doc).

    Args:
        cohort_dir: Folder of case folders (or one case folder).
        out: Checkpoint file, rewritten atomically after every epoch; the CSV log goes beside it
            (:func:`log_path`).
        profile: Resolution profile.
        epochs: Total number of epochs (a resumed run continues up to it).
        pairs: Generated pairs per epoch (Nt; the paper uses about 12,000).
        batch_size: Windows per optimizer step (per process under ``torchrun``).
        lr: Adam learning rate (paper 3e-4).
        seed: Seed of the split, the model's initial weights, the pairs and their order.
        device: ``"auto"`` (GPU when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        val_fraction: Fraction of patients held out for validation.
        resume: Continue from ``out`` when it exists (same settings required).
        num_workers: DataLoader worker processes; None: 0 on CPU, up to 4 with a GPU.
        features: Feature maps from the ground-truth ``"masks"`` or the feature ``"network"``.
        feature_models: Feature networks for ``"network"`` (None: the profile's bundled ones).
        supervision: Weight of the known pose of each generated pair (module docstring); 0 is
            the paper's unsupervised pretraining.
        initial_weights: A registration checkpoint (e.g. the bundled model) whose weights start
            the run instead of random ones: fine-tuning on another cohort (other patients,
            another probe approach). Its network configuration must be this run's.
        window: Nw (1, 3 or 5); None: the profile's.
        use_mind: False = the "without MIND loss" ablation.
        use_decoder: False = the "without decoder layers" ablation.
        hierarchical: False = the "without hierarchical regression" ablation.
        config_overrides: Other :class:`RegistrationConfig` fields.
        val_per_case: Validation windows per validation case.
        min_std_deg: Pose model rotation std floor (degrees); None: its default.
        min_std_mm: Pose model translation std floor (mm); None: its default.
        progress: Show tqdm progress bars (rank 0 only).
        log: Called with one-line messages (rank 0 only).

    Returns:
        The trained model and its history (:class:`PretrainResult`), on every rank.

    Raises:
        InputError: Bad option values, an unreadable cohort or a checkpoint that cannot be
            resumed with these settings.

    Example:
        >>> result = pretrain("cohort", "model.pt", profile="tiny", epochs=2)  # doctest: +SKIP
        >>> result.history[-1]["val_mcd_mm"]  # doctest: +SKIP
        2.1
    """
    from tqdm import tqdm

    for name, value in (("--epochs", epochs), ("--pairs", pairs), ("--batch-size", batch_size)):
        if int(value) < 1:
            raise InputError(name, f"must be at least 1, got {value}")
    if not (math.isfinite(lr) and lr > 0):
        raise InputError("--lr", f"must be a positive number, got {lr}")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError("--val-fraction", f"must be in [0, 1), got {val_fraction}")
    if features not in ("masks", "network"):
        raise InputError("--features", f"must be masks or network, got {features!r}")
    if not (math.isfinite(supervision) and supervision >= 0):
        raise InputError("--supervision", f"must be a number >= 0, got {supervision}")
    prof = get_profile(profile)
    if window is not None:
        prof = replace(prof, window=int(window))
    overrides: dict[str, Any] = dict(config_overrides or {})
    overrides.update(use_mind=use_mind, use_decoder=use_decoder, hierarchical=hierarchical)
    try:
        config = RegistrationConfig.from_profile(prof, **overrides)
    except ValueError as error:
        raise InputError("--window" if window is not None else "config", str(error)) from None
    try:
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0") or 0))
    except ValueError as error:
        raise InputError("--device", str(error)) from None
    checkpoint = Path(out)
    context = setup_distributed(dev)
    notes: list[str] = []
    finished = False

    def say(message: str) -> None:
        notes.append(message)
        if log is not None and context.is_main:
            log(message)

    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        workers = _default_workers(dev, context.world_size) if num_workers is None else num_workers
        show = progress and context.is_main
        if features == "network" and feature_models is None:
            from kidneyreg.features.infer import load_feature_model

            feature_models = FeatureModels(
                load_feature_model(modality="ct", profile=prof.name, device=dev),
                load_feature_model(modality="us", profile=prof.name, device=dev),
            )
        folders = find_cases(cohort_dir)
        cases: list[CohortCase] = [
            load_case(
                folder,
                prof,
                features=features,
                feature_models=feature_models,
                structures=config.structures,
            )
            for folder in tqdm(folders, desc="loading cases", unit="case", disable=not show)
        ]
        train_idx, val_idx = split_cases([c.patient for c in cases], val_fraction, seed)
        train_cases = [cases[i] for i in train_idx]
        val_cases = [cases[i] for i in val_idx]
        say(
            f"{len(train_cases)} training case(s), {len(val_cases)} validation case(s); "
            f"device {dev}, {context.world_size} process(es)"
        )
        if not val_cases:
            say("no validation case (one patient or --val-fraction 0): validation skipped")

        state: dict[str, Any] | None = None
        if resume and checkpoint.exists():
            state = load_checkpoint(checkpoint, kind=CHECKPOINT_KIND)
        elif resume:
            say(f"{checkpoint} does not exist yet: starting afresh")
        elif checkpoint.exists():
            say(f"{checkpoint} exists and will be replaced (use --resume to continue it)")
        if state is not None:
            pose_model = GaussianPoseModel.from_dict(state["training"]["pose_model"])
        else:
            pose_model = fit_pose_model(train_cases, min_std_deg=min_std_deg, min_std_mm=min_std_mm)
        settings = _settings(
            prof,
            config,
            pose_model,
            n_pairs=int(pairs),
            batch_size=int(batch_size),
            lr=float(lr),
            seed=int(seed),
            features=features,
            supervision=float(supervision),
            train_cases=[c.case_id for c in train_cases],
            val_cases=[c.case_id for c in val_cases],
            world_size=context.world_size,
        )
        settings["initial_weights"] = None if initial_weights is None else str(initial_weights)
        if state is not None:
            _check_resume(state["training"], settings, checkpoint)
            if state["training"].get("world_size") != context.world_size:
                say(
                    "resuming with another number of processes: the pair shards differ from "
                    "the original run from here on"
                )
        say("pose model (2 sigma):\n" + pose_model.describe())

        torch.manual_seed(int(seed))
        model = RegistrationNet(config).to(dev)
        if state is None and initial_weights is not None:
            model.load_state_dict(_initial_state(Path(initial_weights), config))
            say(f"weights from {initial_weights}")
        optimizer = torch.optim.Adam(model.parameters(), lr=float(lr))
        history: list[dict[str, float]] = []
        best: dict[str, Any] | None = None
        start = 1
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history = [dict(row) for row in state["history"]]
            best = state.get("best")
            start = int(state["epoch"]) + 1
            _set_rng_state(state["rng"])
            say(f"resumed from {checkpoint} after epoch {start - 1}")
        trainer: torch.nn.Module = model
        if context.distributed:
            from torch.nn.parallel import DistributedDataParallel

            trainer = DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None
            )

        dataset = TrainingPairs(train_cases, pose_model, n_pairs=int(pairs), seed=int(seed))
        windows = ValidationWindows(val_cases, per_case=val_per_case) if val_cases else None

        def save(epoch: int) -> None:
            if not context.is_main:
                return
            payload = {
                "model": _cpu_state(model),
                "config": config.to_dict(),
                "profile": prof.name,
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "rng": _rng_state(),
                "history": history,
                "best": best,
                "training": settings,
            }
            save_checkpoint(checkpoint, payload, kind=CHECKPOINT_KIND)
            write_log(log_path(checkpoint), history)

        if not history:
            started = time.perf_counter()
            baseline = _validate(
                model, windows, context, dev, int(batch_size), workers, identity=True
            )
            history.append({"epoch": 0, **baseline, "seconds": time.perf_counter() - started})
            say(_summary(history[-1]))
        for epoch in range(start, int(epochs) + 1):
            started = time.perf_counter()
            order = shard_indices(
                epoch_order(int(seed), epoch, int(pairs)), context.rank, context.world_size
            )
            loader = _loader(dataset, order.tolist(), int(batch_size), workers, dev)
            totals = dict.fromkeys(
                ("loss", "loss_feature", "loss_image", "loss_motion", "loss_supervision_mm"), 0.0
            )
            totals.update(train_rotation_error_deg=0.0, train_translation_error_mm=0.0)
            seen = 0
            trainer.train()
            bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="step", disable=not show)
            for batch in bar:
                fixed, moving = _inputs(batch, dev)
                output = trainer(fixed, moving)
                terms = fim_loss(output.matrices, fixed, moving, config)
                total = terms.total
                supervised = torch.zeros((), device=dev)
                if supervision > 0:
                    truth = euler_to_matrix_torch(batch["target"].to(dev, torch.float32))
                    supervised = pose_supervision_loss(output.matrices, truth).mean()
                    total = total + float(supervision) * supervised / SUPERVISION_SCALE_MM
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                n = fixed.shape[0]
                seen += n
                scalars = terms.scalars()
                for key, term in (
                    ("loss", "total"),
                    ("loss_feature", "feature"),
                    ("loss_image", "image"),
                    ("loss_motion", "motion"),
                ):
                    totals[key] += scalars[term] * n
                totals["loss_supervision_mm"] += float(supervised.detach()) * n
                mid = config.window // 2
                rotation, shift = pose_errors(output.matrices[:, mid], batch["target"][:, mid])
                totals["train_rotation_error_deg"] += float(rotation.sum())
                totals["train_translation_error_mm"] += float(shift.sum())
                bar.set_postfix(loss=f"{float(total.detach()):.4f}")
            means = all_reduce_mean({k: v / max(seen, 1) for k, v in totals.items()}, context)
            val = _validate(model, windows, context, dev, int(batch_size), workers)
            row: dict[str, float] = {"epoch": epoch, **means, **val}
            row["seconds"] = time.perf_counter() - started
            history.append(row)
            score = val["val_mcd_mm"]
            if best is None or (
                math.isfinite(score)
                and (not math.isfinite(best["val_mcd_mm"]) or score < best["val_mcd_mm"])
            ):
                best = {"epoch": epoch, "val_mcd_mm": score, "model": _cpu_state(model)}
            save(epoch)
            say(_summary(row))
        if state is not None and start > int(epochs):
            say(f"{checkpoint} already holds {start - 1} epoch(s): nothing to train")
        identical = replicas_identical(model, context)
        if not identical:
            say("warning: the data-parallel replicas ended with different weights")
        model.eval()
        finished = True
        return PretrainResult(
            model=model,
            config=config,
            pose_model=pose_model,
            history=history,
            checkpoint=checkpoint,
            train_cases=[c.case_id for c in train_cases],
            val_cases=[c.case_id for c in val_cases],
            replicas_identical=identical,
            notes=notes,
        )
    finally:
        teardown_distributed(context, barrier=finished)


def export_model(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a compact copy of a pretraining run: the best validation epoch's weights (else the
    last epoch's), the network configuration, the profile and the training settings, without the
    optimizer state and history. This is how ``kidneyreg/models/registration_cpu.pt`` is made.

    Raises:
        InputError: An unreadable or foreign checkpoint.

    Example:
        >>> export_model("runs/reg.pt", "models/registration_cpu.pt")  # doctest: +SKIP
    """
    payload = load_checkpoint(checkpoint, kind=CHECKPOINT_KIND)
    missing = [key for key in ("model", "config", "profile") if key not in payload]
    if missing:
        raise InputError(checkpoint, f"registration checkpoint lacks {', '.join(missing)}")
    best = payload.get("best")
    weights = payload["model"]
    epoch = payload.get("epoch")
    if isinstance(best, dict) and isinstance(best.get("model"), dict):
        score = best.get("val_mcd_mm")
        if isinstance(score, int | float) and math.isfinite(score):
            weights, epoch = best["model"], best.get("epoch")
    training = dict(payload.get("training") or {})
    training["exported_epoch"] = epoch
    compact = {
        "model": weights,
        "config": payload["config"],
        "profile": payload["profile"],
        "training": training,
        "history": payload.get("history", []),
    }
    return save_checkpoint(out, compact, kind=CHECKPOINT_KIND)


def _summary(row: dict[str, float]) -> str:
    """One log line per epoch."""
    parts = [f"epoch {int(row['epoch'])}"]
    if math.isfinite(row.get("loss", math.nan)):
        parts.append(f"loss {row['loss']:.4f}")
    for key, label in (("val_mcd_mm", "val MCD"), ("val_tre_mm", "val TRE")):
        if math.isfinite(row.get(key, math.nan)):
            parts.append(f"{label} {row[key]:.2f} mm")
    if int(row["epoch"]) == 0:
        parts.append("(initial alignment)")
    parts.append(f"{row.get('seconds', 0.0):.1f} s")
    return ", ".join(parts)
