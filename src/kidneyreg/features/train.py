"""Training of the feature networks: negative soft Dice, Adam, patches, resumable checkpoints.

The paper's recipe (Methods, "Feature Network"; Experiments): negative Dice loss, Adam with a
learning rate of 1e-4, CT patches of 160 x 160 x 80 (profile-scaled, :mod:`.config`), U/S windows
of 256 x 192 x 5, validation on patients held out of training. Here in addition: kidney-biased
patch sampling (2/3 of the patches contain kidney by default), augmentation
(:mod:`.augment`), a checkpoint after every epoch written atomically with everything needed to
resume bit-for-bit (model, optimiser, epoch, random generator states, configuration, split,
history), the best model by validation Dice in a second file, a progress bar and a CSV log.

Files written for ``--out model.pt``:

* ``model.pt``: the latest checkpoint (``kind="feature-net"``), resumable with ``resume=True``;
* ``model.best.pt``: the weights with the best validation Dice (the last epoch's when there is no
  validation set), loadable by :func:`kidneyreg.features.infer.load_feature_model`;
* ``model.log.csv``: one row per epoch.

Batch size: the paper used 1 (GPU memory). On CPU the default is 2: PyTorch only uses its fast
(oneDNN) 3D convolution for batch size 1 when a layer's ``C * D * H`` exceeds 20480, so most
layers of a small patch fall back to a slow kernel, and two patches per step cost less than two
steps of one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kidneyreg.checkpoint import load_checkpoint, save_checkpoint
from kidneyreg.errors import InputError
from kidneyreg.features.augment import (
    Augmentation,
    RandomAcousticBands,
    RandomTissueContrast,
    RandomTissueGain,
    default_augmentation,
)
from kidneyreg.features.config import FeatureNetConfig, feature_config
from kidneyreg.features.data import (
    CaseData,
    PatchSampler,
    find_cases,
    load_cases,
    split_by_patient,
)
from kidneyreg.features.infer import resolve_device
from kidneyreg.features.metrics import segmentation_scores
from kidneyreg.features.ulbnet import (
    CHECKPOINT_KIND,
    MAX_INFERENCE_SCALE,
    ULBNet,
    inference_scale_of,
    model_payload,
    network_from_payload,
)
from kidneyreg.io.atomic import atomic_write_text

__all__ = [
    "TrainResult",
    "TrainSettings",
    "default_train_settings",
    "export_model",
    "random_patch_size",
    "segmentation_loss",
    "soft_dice_loss",
    "train_feature_net",
    "train_from_folder",
    "training_paths",
]

_LOG_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_dice",
    "val_sensitivity",
    "val_precision",
    "learning_rate",
    "seconds",
)


@dataclass(frozen=True)
class TrainSettings:
    """Training hyper-parameters (saved in the checkpoint).

    Attributes:
        epochs: Total number of epochs (a resumed run continues up to it).
        steps_per_epoch: Optimiser steps per epoch.
        batch_size: Patches per step.
        learning_rate: Adam learning rate (paper: 1e-4).
        kidney_fraction: Share of training patches that contain kidney.
        val_fraction: Share of patients held out for validation.
        val_patches: Number of (fixed) validation patches evaluated after each epoch.
        seed: Seed of the split, the patches, the augmentation and the dropout.
        augment: Whether to augment the training patches.
        tissue_contrast: Also vary each simulated tissue's brightness independently: CT HU
            offsets (:class:`~kidneyreg.features.augment.RandomTissueContrast`, needs
            ``labels.nii.gz``), U/S gains (:class:`~kidneyreg.features.augment.RandomTissueGain`,
            needs ``us_labels.nii.gz``). Off by default; on the CT it did not bring the bundled
            model closer to the real CT (docs/models.md).
        patch_scale: Largest factor on the patch size along each downsampled axis: every step
            draws its patch size, per axis, uniformly between the configured size and this
            factor times it (multiples of the network's downsampling, at most what every
            training case holds). 1 trains on the configured patches only, as the paper. With
            larger factors the network sees the kidney with varied amounts of context and
            varied distances to the patch faces, so its output does not hinge on the inference
            window (docs/models.md).
        acoustic_bands: U/S only: also darken or brighten random bands along the beam, as
            acoustic shadows and posterior enhancement do
            (:class:`~kidneyreg.features.augment.RandomAcousticBands`). Off by default.
        cross_entropy_weight: Weight of a binary cross-entropy term added to the paper's
            negative Dice loss (:func:`segmentation_loss`). 0 (default) is the paper's loss.
            Soft Dice alone rewards marking a pixel whose chance of being kidney is above about
            half the batch's Dice (below 0.5), so uncertain outlines come out too large;
            cross-entropy is minimised by the pixel's own probability, so 0.5 stays its decision
            threshold.
    """

    epochs: int = 30
    steps_per_epoch: int = 200
    batch_size: int = 2
    learning_rate: float = 1e-4
    kidney_fraction: float = 2.0 / 3.0
    val_fraction: float = 0.2
    val_patches: int = 32
    seed: int = 0
    augment: bool = True
    tissue_contrast: bool = False
    patch_scale: float = 1.0
    acoustic_bands: bool = False
    cross_entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1.0 <= self.patch_scale <= MAX_INFERENCE_SCALE:
            raise ValueError(
                f"patch_scale must be in [1, {MAX_INFERENCE_SCALE:g}], got {self.patch_scale}"
            )
        if self.val_patches < 0:
            raise ValueError(f"val_patches must be >= 0, got {self.val_patches}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.cross_entropy_weight >= 0:
            raise ValueError(f"cross_entropy_weight must be >= 0, got {self.cross_entropy_weight}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary for the checkpoint."""
        return dataclasses.asdict(self)


def default_train_settings(profile: str = "cpu", **overrides: Any) -> TrainSettings:
    """Default settings of a profile, with ``overrides`` (``None`` values are ignored).

    ``paper``: batch 1 (as the paper), 100 epochs of 500 steps; ``cpu``: batch 2, 30 x 200;
    ``tiny``: a few steps (tests).

    Example:
        >>> default_train_settings("tiny", epochs=3).epochs
        3
    """
    presets: dict[str, dict[str, Any]] = {
        "paper": {"epochs": 100, "steps_per_epoch": 500, "batch_size": 1, "val_patches": 64},
        "cpu": {"epochs": 30, "steps_per_epoch": 200, "batch_size": 2, "val_patches": 32},
        "tiny": {"epochs": 2, "steps_per_epoch": 4, "batch_size": 2, "val_patches": 4},
    }
    values = dict(presets.get(profile, presets["cpu"]))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings(**values)


def soft_dice_loss(
    probabilities: torch.Tensor, target: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """The paper's negative Dice loss, as ``1 - soft Dice`` (same gradient, 0 = perfect).

    Soft Dice ``(2 sum(p g) + s) / (sum(p) + sum(g) + s)`` with the sums over every voxel of the
    batch (with the paper's batch size of 1, per patch). Pooling the batch matters for patches
    without kidney: alone, their Dice is ~0 for any prediction that is not almost exactly empty,
    with a vanishing gradient; pooled with kidney patches, their false positives enter the
    denominator and are penalised like any other. The smoothing ``s`` keeps an all-empty batch
    defined (Dice 1 for an empty prediction).

    Example:
        >>> p = torch.tensor([[[1.0, 0.0]]]); g = torch.tensor([[[1.0, 0.0]]])
        >>> float(soft_dice_loss(p, g))
        0.0
    """
    if probabilities.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(probabilities.shape)} and target {tuple(target.shape)} differ"
        )
    p = probabilities.reshape(-1)
    g = target.reshape(-1).to(p.dtype)
    dice = (2.0 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth)
    return 1.0 - dice


def segmentation_loss(
    probabilities: torch.Tensor, target: torch.Tensor, cross_entropy_weight: float = 0.0
) -> torch.Tensor:
    """:func:`soft_dice_loss` plus ``cross_entropy_weight`` times the mean binary cross-entropy.

    Probabilities are clamped to ``[1e-6, 1 - 1e-6]`` for the cross-entropy (the networks end in
    a sigmoid, so saturated outputs would otherwise give infinite terms).

    Example:
        >>> p = torch.tensor([[[0.9, 0.2]]]); g = torch.tensor([[[1.0, 0.0]]])
        >>> round(float(segmentation_loss(p, g)), 4), round(float(segmentation_loss(p, g, 1.0)), 4)
        (0.0968, 0.261)
    """
    loss = soft_dice_loss(probabilities, target)
    if cross_entropy_weight > 0:
        clamped = probabilities.clamp(1e-6, 1.0 - 1e-6)
        loss = loss + cross_entropy_weight * F.binary_cross_entropy(
            clamped, target.to(clamped.dtype)
        )
    return loss


def training_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """``(checkpoint, best, log)`` paths of a training run writing ``out``.

    Example:
        >>> [p.name for p in training_paths("runs/ct.pt")]
        ['ct.pt', 'ct.best.pt', 'ct.log.csv']
    """
    path = Path(out)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path, path.with_name(f"{stem}.best.pt"), path.with_name(f"{stem}.log.csv")


def export_model(
    checkpoint: str | Path,
    out: str | Path,
    *,
    half: bool = True,
    inference_scale: float | None = None,
) -> Path:
    """Write a compact copy (configuration + weights, float16 by default) of a feature model.

    This is how the bundled models in ``kidneyreg/models`` are made from a training run's
    ``.best.pt``.

    Args:
        checkpoint: A feature-net checkpoint.
        out: The copy.
        half: Store the weights as float16.
        inference_scale: Inference window factor to store (see
            :func:`~kidneyreg.features.ulbnet.model_payload`); None keeps the checkpoint's.

    Example:
        >>> export_model("runs/ct.best.pt", "models/features_ct_cpu.pt")  # doctest: +SKIP
    """
    payload = load_checkpoint(checkpoint, kind=CHECKPOINT_KIND)
    net = network_from_payload(payload, checkpoint)
    scale = inference_scale_of(payload, checkpoint) if inference_scale is None else inference_scale
    return save_checkpoint(
        out, model_payload(net, half=half, inference_scale=scale), kind=CHECKPOINT_KIND
    )


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        checkpoint: The latest (resumable) checkpoint.
        best: The best model's checkpoint.
        log: The CSV log.
        history: One dictionary per epoch (the CSV rows).
        net: The trained network (last epoch's weights).
    """

    checkpoint: Path
    best: Path
    log: Path
    history: list[dict[str, float]]
    net: ULBNet


def _write_log(path: Path, history: Sequence[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        values: dict[str, Any] = {key: row.get(key, "") for key in _LOG_COLUMNS}
        values["epoch"] = int(row["epoch"])
        writer.writerow(values)
    atomic_write_text(path, buffer.getvalue())


def random_patch_size(
    config: FeatureNetConfig,
    scale: float,
    largest: Sequence[int],
    generator: torch.Generator | None,
) -> tuple[int, int, int]:
    """A training patch size between the configured one and ``scale`` times it, per axis.

    Each downsampled axis (all three for CT, the frame axes for U/S) draws a factor uniformly in
    ``[1, scale]`` (``generator`` None: takes ``scale``); the size is rounded down to a multiple
    of the network's total downsampling and capped at ``largest`` (rounded down the same way),
    never below the configured size.

    Example:
        >>> cfg = feature_config("ct", "tiny")
        >>> size = random_patch_size(cfg, 2.0, (200, 200, 200), torch.Generator().manual_seed(0))
        >>> all(p <= n <= 2 * p and n % 16 == 0 for n, p in zip(size, cfg.patch_size))
        True
    """
    multiple = config.size_multiple
    base = config.patch_size
    axes = (1, 2) if config.modality == "us" else (0, 1, 2)
    size = list(base)
    for axis in axes:
        # No generator: the largest size (the validation patches' size).
        draw = 1.0 if generator is None else float(torch.rand((), generator=generator).item())
        factor = 1.0 + (float(scale) - 1.0) * draw
        cap = max(base[axis], int(largest[axis]) // multiple * multiple)
        size[axis] = min(max(base[axis], int(base[axis] * factor) // multiple * multiple), cap)
    return (size[0], size[1], size[2])


def _batch(
    sampler: PatchSampler,
    augmentation: Augmentation | None,
    size: int,
    generator: torch.Generator,
    patch_size: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for _ in range(size):
        image, mask = sampler.sample(generator, patch_size)
        if augmentation is not None:
            image, mask = augmentation(image, mask, generator)
        images.append(image)
        masks.append(mask)
    return torch.stack(images), torch.stack(masks)


def _validate(
    net: ULBNet,
    patches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> dict[str, float]:
    """Mean soft-Dice loss and pooled hard Dice / sensitivity / precision on fixed patches."""
    if not patches:
        nan = float("nan")
        return {"val_loss": nan, "val_dice": nan, "val_sensitivity": nan, "val_precision": nan}
    net.eval()
    losses = []
    predictions, targets = [], []
    with torch.no_grad():
        for image, mask in patches:
            prob = net(image.unsqueeze(0).to(device)).cpu()
            losses.append(float(soft_dice_loss(prob, mask.unsqueeze(0))))
            predictions.append(prob[0] >= 0.5)
            targets.append(mask >= 0.5)
    scores = segmentation_scores(
        torch.cat([p.flatten() for p in predictions]), torch.cat([t.flatten() for t in targets])
    )
    net.train()
    return {
        "val_loss": sum(losses) / len(losses),
        "val_dice": scores.dice,
        "val_sensitivity": scores.sensitivity,
        "val_precision": scores.precision,
    }


def train_feature_net(
    config: FeatureNetConfig,
    train_cases: Sequence[CaseData],
    val_cases: Sequence[CaseData],
    settings: TrainSettings,
    out: str | Path,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    split: dict[str, list[str]] | None = None,
    log: Callable[[str], None] | None = None,
    initial_weights: str | Path | None = None,
) -> TrainResult:
    """Train a feature network on preprocessed cases, checkpointing after every epoch.

    Args:
        config: Network configuration (modality, patch size, widths...).
        train_cases: Training cases (:class:`~kidneyreg.features.data.CaseData`).
        val_cases: Validation cases (may be empty: then the last epoch counts as the best).
        settings: Hyper-parameters.
        out: Checkpoint path; see :func:`training_paths` for the files written beside it.
        resume: Continue from ``out`` when it exists (configuration and split are taken from
            it; ``settings.epochs`` may extend the run and ``settings.learning_rate`` replaces the
            saved one, e.g. for a fine-tuning stage). Without a file, training starts afresh.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...
        progress: Show a progress bar per epoch.
        split: Case names of the two sets, stored in the checkpoint.
        log: Called with one line per epoch (e.g. ``print``); None is silent.
        initial_weights: A feature-net checkpoint (e.g. the bundled model) whose weights start a
            new run instead of random ones (fine-tuning). Its configuration must be ``config``.
            Ignored when a run is resumed.

    Returns:
        The files written, the history and the network.

    Raises:
        InputError: A resumed checkpoint that is not a feature-net checkpoint or belongs to
            another configuration.

    Example:
        >>> result = train_feature_net(cfg, train, val, settings, "ct.pt")  # doctest: +SKIP
    """
    from tqdm import tqdm

    checkpoint_path, best_path, log_path = training_paths(out)
    dev = resolve_device(device)
    payload: dict[str, Any] | None = None
    if resume and checkpoint_path.exists():
        payload = load_checkpoint(checkpoint_path, kind=CHECKPOINT_KIND)
        if "optimizer" not in payload:
            raise InputError(checkpoint_path, "holds model weights only, it cannot be resumed")
        saved = FeatureNetConfig.from_dict(payload["config"])
        if saved != config:
            raise InputError(
                checkpoint_path,
                f"was trained with another configuration ({saved.modality}, {saved.profile}, "
                f"patch {saved.patch_size}): resume with the same modality and profile",
            )
    # Initial weights and dropout draw from the global generator: seed it first.
    torch.manual_seed(settings.seed)
    net = ULBNet(config).to(dev)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(settings.seed)
    history: list[dict[str, float]] = []
    best_dice = -math.inf
    start_epoch = 0
    if payload is None and initial_weights is not None:
        start = network_from_payload(
            load_checkpoint(initial_weights, kind=CHECKPOINT_KIND), initial_weights
        )
        # A kidney model may start a sinus model: same network, another target.
        if dataclasses.replace(start.config, structure=config.structure) != config:
            raise InputError(
                initial_weights,
                f"is a {start.config.modality} model of profile {start.config.profile} with patch "
                f"{start.config.patch_size}: fine-tune it with the same modality and profile",
            )
        net.load_state_dict(start.state_dict())
    if payload is not None:
        net.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        # The settings' learning rate wins (e.g. a fine-tuning stage at a lower rate).
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate
        generator.set_state(payload["rng"]["sampler"])
        torch.set_rng_state(payload["rng"]["torch"])
        if dev.type == "cuda" and "cuda" in payload["rng"]:
            torch.cuda.set_rng_state(payload["rng"]["cuda"], dev)
        history = [dict(row) for row in payload["history"]]
        best_dice = float(payload["best_val_dice"])
        start_epoch = int(payload["epoch"])
        split = payload.get("split", split)
    tissue_contrast: RandomTissueContrast | RandomTissueGain | None = None
    if settings.augment and settings.tissue_contrast:
        tissue_contrast = RandomTissueContrast() if config.modality == "ct" else RandomTissueGain()
    sampler = PatchSampler(train_cases, config, settings.kidney_fraction, tissue_contrast)
    # Fixed validation patches: the same every epoch and in a resumed run. They have the size
    # of the inference window (within what the validation cases hold), so the best epoch is
    # the best at the size the network will be run at.
    val_generator = torch.Generator().manual_seed(settings.seed + 1)
    val_patches: list[tuple[torch.Tensor, torch.Tensor]] = []
    if val_cases:
        val_sampler = PatchSampler(val_cases, config, settings.kidney_fraction)
        val_size = None
        if settings.patch_scale > 1.0:  # the inference window (inference_window), capped
            val_size = random_patch_size(
                config, settings.patch_scale, val_sampler.largest_patch, None
            )
        val_patches = [
            val_sampler.sample(val_generator, val_size) for _ in range(settings.val_patches)
        ]
    augmentation = default_augmentation(config.modality) if settings.augment else None
    if settings.acoustic_bands:
        if config.modality != "us":
            raise ValueError("acoustic_bands is a U/S augmentation; the modality is ct")
        if augmentation is not None:
            augmentation = dataclasses.replace(augmentation, bands=RandomAcousticBands())

    def best_payload() -> dict[str, Any]:
        return model_payload(net, inference_scale=settings.patch_scale)

    net.train()
    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        total = 0.0
        bar = tqdm(
            range(settings.steps_per_epoch),
            desc=f"{config.modality} epoch {epoch + 1}/{settings.epochs}",
            disable=not progress,
            leave=False,
        )
        for step in bar:
            # Drawn only when asked for, so fixed-patch runs keep their random sequence.
            patch = (
                random_patch_size(config, settings.patch_scale, sampler.largest_patch, generator)
                if settings.patch_scale > 1.0
                else None
            )
            images, masks = _batch(sampler, augmentation, settings.batch_size, generator, patch)
            loss = segmentation_loss(
                net(images.to(dev)), masks.to(dev), settings.cross_entropy_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            bar.set_postfix(loss=f"{total / (step + 1):.4f}")
        bar.close()
        row: dict[str, float] = {"epoch": float(epoch + 1)}
        row["train_loss"] = total / settings.steps_per_epoch
        row.update(_validate(net, val_patches, dev))
        row["learning_rate"] = settings.learning_rate
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        improved = not val_patches or row["val_dice"] > best_dice
        if improved:
            best_dice = row["val_dice"] if val_patches else best_dice
            save_checkpoint(best_path, best_payload(), kind=CHECKPOINT_KIND)
        rng = {"sampler": generator.get_state(), "torch": torch.get_rng_state()}
        if dev.type == "cuda":  # dropout on the GPU draws from the device's generator
            rng["cuda"] = torch.cuda.get_rng_state(dev)
        save_checkpoint(
            checkpoint_path,
            {
                **best_payload(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "rng": rng,
                "settings": settings.to_dict(),
                "split": split or {},
                "history": history,
                "best_val_dice": best_dice,
            },
            kind=CHECKPOINT_KIND,
        )
        _write_log(log_path, history)
        if log is not None:
            log(
                f"epoch {epoch + 1}/{settings.epochs}: train loss {row['train_loss']:.4f}, "
                f"val loss {row['val_loss']:.4f}, val Dice {row['val_dice']:.4f} "
                f"({row['seconds']:.0f} s)" + (" *" if improved and val_patches else "")
            )
    if not best_path.exists():
        save_checkpoint(best_path, best_payload(), kind=CHECKPOINT_KIND)
    if not log_path.exists():
        _write_log(log_path, history)
    return TrainResult(checkpoint_path, best_path, log_path, history, net)


def train_from_folder(
    modality: str,
    data_dir: str | Path,
    out: str | Path,
    *,
    profile: str = "cpu",
    window: int | None = None,
    settings: TrainSettings | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    initial_weights: str | Path | None = None,
    structure: str = "kidney",
) -> TrainResult:
    """Find, split, preprocess and train on the cases of a folder (``kidneyreg train-features``).

    Args:
        modality: ``"ct"`` or ``"us"``.
        data_dir: Simulated cohort or KiTS19 folder (see :mod:`kidneyreg.features.data`).
        out: Checkpoint path.
        profile: Resolution profile.
        window: U/S frames per window (default: the profile's).
        settings: Hyper-parameters (default: :func:`default_train_settings` of the profile).
        resume: Continue from ``out``.
        device: Torch device.
        progress: Progress bars.
        log: Receives one line per step of the run (loading, split, epochs).
        initial_weights: Checkpoint to fine-tune from (see :func:`train_feature_net`).
        structure: What to segment, ``"kidney"`` or ``"sinus"`` (simulated cases only).

    Returns:
        See :func:`train_feature_net`.

    Example:
        >>> train_from_folder("ct", "cohort", "runs/ct.pt", profile="cpu")  # doctest: +SKIP
    """
    from tqdm import tqdm

    say = log or (lambda _line: None)
    settings = settings or default_train_settings(profile)
    config = feature_config(modality, profile, window=window, structure=structure)
    cases = find_cases(data_dir, modality)
    train_files, val_files = split_by_patient(cases, settings.val_fraction, settings.seed)
    checkpoint_path = training_paths(out)[0]
    if resume and not checkpoint_path.exists():
        say(f"no checkpoint at {checkpoint_path} yet: starting a new run")
    if resume and checkpoint_path.exists():
        # The split of the original run wins (the folder may have grown since).
        saved = load_checkpoint(checkpoint_path, kind=CHECKPOINT_KIND).get("split") or {}
        if saved.get("train"):
            by_name = {c.name: c for c in cases}
            missing = [n for n in saved["train"] + saved.get("val", []) if n not in by_name]
            if missing:
                raise InputError(
                    data_dir, f"case {missing[0]} of the resumed run is missing from the folder"
                )
            train_files = [by_name[n] for n in saved["train"]]
            val_files = [by_name[n] for n in saved.get("val", [])]
    say(
        f"{len(cases)} {modality.upper()} case(s): {len(train_files)} training, "
        f"{len(val_files)} validation (split by patient)"
    )
    with tqdm(
        total=len(train_files) + len(val_files), desc="load", unit="case", disable=not progress
    ) as bar:
        train_data = load_cases(train_files, config, lambda _i, _c: bar.update(1))
        val_data = load_cases(val_files, config, lambda _i, _c: bar.update(1))
    split = {"train": [c.name for c in train_files], "val": [c.name for c in val_files]}
    return train_feature_net(
        config,
        train_data,
        val_data,
        settings,
        out,
        resume=resume,
        device=device,
        progress=progress,
        split=split,
        log=log,
        initial_weights=initial_weights,
    )
