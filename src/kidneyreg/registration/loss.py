"""The feature-image-motion (FIM) loss of the paper, Eq. (1)-(4).

``L = L_f + lambda_1 L_i + lambda_2 L_d`` with

* ``L_f`` (Eq. 2): minus the mean over the window of the soft Dice ``2 sum(x y) / (sum x + sum y)``
  between the U/S kidney feature map of frame ``k`` and the CT feature map warped by ``D_k``,
  read on its middle R-L slice (the plane ``x = 0``).
* ``L_i`` (Eq. 3): mean absolute difference between the MIND descriptors of the U/S window at its
  middle frame and of the warped, kidney-masked CT (CT image times warped CT feature map) on its
  middle slice under ``D_mid``. MIND's 3x3x3 patches at distance 1 need two slices on each side:
  the CT slab is sampled with ``h = min(2, Nw // 2)`` slices per side and the U/S window supplies
  the same ``h`` frames per side (with ``Nw < 5`` both are edge-replicated beyond that, so the two
  modalities see the same R-L extent). The mean runs over the kidney region, the soft union
  ``max(fixed map, warped map)`` of the middle frame, taken as a constant (detached) weight so the
  network cannot lower the loss by moving the region instead of aligning the images.
* ``L_d`` (Eq. 4): ``0.01 ||D - I|| / Nw + 0.99 grad_D`` with ``||D - I||`` the Frobenius norm of
  the stacked ``Nw`` matrices minus the identity and ``grad_D`` the mean Frobenius norm of the
  second differences ``D_{i+1} + D_{i-1} - 2 D_i`` (0 when ``Nw < 3``). As in the paper, the 4x4
  entries mix rotation (dimensionless, ~radians) and translation (mm): 1 mm of translation weighs
  as much as ~57 degrees of rotation here.

The CT is sampled only on the slabs the terms look at (:func:`~.transformer.sample_slab`);
``warp="full"`` warps whole volumes instead and gives the same value (the equivalence is tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kidneyreg.registration.config import RegistrationConfig
from kidneyreg.registration.mind import MIND_RADIUS, mind_descriptor
from kidneyreg.registration.transformer import sample_slab, warp_volume, window_frames

__all__ = ["FIMLossTerms", "fim_loss", "motion_loss", "pose_supervision_loss", "soft_dice"]

Warp = Literal["slab", "full"]


@dataclass(frozen=True)
class FIMLossTerms:
    """The FIM loss and each of its terms.

    Scalars are means over the batch; the per-sample and per-frame tensors are what the pipeline
    reports as per-frame confidence.

    Attributes:
        total: ``L_f + lambda_1 L_i + lambda_2 L_d``, scalar (what to call ``backward`` on).
        feature: ``L_f``, scalar.
        image: ``L_i``, scalar (0 with ``use_mind=False``).
        motion: ``L_d``, scalar.
        per_sample: Total loss of each sample, ``(B,)``.
        dice: Soft Dice of each frame, ``(B, Nw)``.
        mind_difference: Kidney-region mean absolute MIND difference of the middle frame, ``(B,)``
            (zeros with ``use_mind=False``).
        motion_identity: ``||D_k - I||_F`` of each frame, ``(B, Nw)``.
        motion_second_difference: ``||D_{k+1} + D_{k-1} - 2 D_k||_F`` for the interior frames
            ``k = 1 .. Nw - 2``, ``(B, Nw - 2)``.
    """

    total: torch.Tensor
    feature: torch.Tensor
    image: torch.Tensor
    motion: torch.Tensor
    per_sample: torch.Tensor
    dice: torch.Tensor
    mind_difference: torch.Tensor
    motion_identity: torch.Tensor
    motion_second_difference: torch.Tensor

    def scalars(self) -> dict[str, float]:
        """The four scalar terms as floats, for logs.

        Example:
            >>> t = torch.tensor(0.5)
            >>> z = torch.zeros(1, 1)
            >>> FIMLossTerms(t, t, t, t, t[None], z, t[None], z, z[:, :0]).scalars()["total"]
            0.5
        """
        return {
            "total": float(self.total.detach()),
            "feature": float(self.feature.detach()),
            "image": float(self.image.detach()),
            "motion": float(self.motion.detach()),
        }


def soft_dice(fixed: torch.Tensor, warped: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """Soft Dice ``2 sum(x y) / (sum x + sum y + eps)`` over the last two axes.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> round(float(soft_dice(x, x)), 4)
        1.0
    """
    inter = (fixed * warped).sum(dim=(-2, -1))
    total = fixed.sum(dim=(-2, -1)) + warped.sum(dim=(-2, -1))
    return 2.0 * inter / (total + epsilon)


def motion_loss(
    matrices: torch.Tensor, identity_weight: float = 0.01, smoothness_weight: float = 0.99
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L_d`` of Eq. (4) for each sample, with its per-frame parts.

    Args:
        matrices: ``(B, Nw, 4, 4)``.
        identity_weight: Weight of ``||D - I|| / Nw`` (paper 0.01).
        smoothness_weight: Weight of the mean second-difference norm (paper 0.99).

    Returns:
        ``(L_d (B,), ||D_k - I||_F (B, Nw), second-difference norms (B, Nw - 2))``.

    Example:
        >>> loss, _, _ = motion_loss(torch.eye(4).repeat(2, 5, 1, 1))
        >>> loss.tolist()
        [0.0, 0.0]
    """
    if matrices.dim() != 4 or matrices.shape[2:] != (4, 4):
        raise ValueError(f"matrices must be (B, Nw, 4, 4), got shape {tuple(matrices.shape)}")
    b, nw = matrices.shape[:2]
    offset = matrices - torch.eye(4, dtype=matrices.dtype, device=matrices.device)
    per_frame = torch.linalg.matrix_norm(offset)
    identity_term = torch.linalg.vector_norm(offset.reshape(b, -1), dim=-1) / nw
    second = matrices[:, 2:] + matrices[:, :-2] - 2.0 * matrices[:, 1:-1]
    second_norms = torch.linalg.matrix_norm(second)
    if nw >= 3:
        smooth = second_norms.mean(dim=-1)
    else:
        smooth = torch.zeros_like(identity_term)
    return identity_weight * identity_term + smoothness_weight * smooth, per_frame, second_norms


def pose_supervision_loss(
    matrices: torch.Tensor, targets: torch.Tensor, radius_mm: float = 20.0
) -> torch.Tensor:
    """Mean displacement (mm) between predicted and correct transforms over a kidney-sized box.

    Not in the paper. Generated training pairs know their correct ``D`` by construction, so
    pretraining may also pull the prediction towards it: the error is the mean distance between
    the images of the 8 corners of a cube of half-size ``radius_mm`` around the grid origin (the
    kidney centroid) under the predicted and the correct transform, which weighs rotation and
    translation in the same unit (mm at the kidney) instead of mixing radians and millimetres.
    The onsite adaptation never uses it (there is no ground truth there).

    Args:
        matrices: Predicted ``(B, Nw, 4, 4)``.
        targets: Correct ``(B, Nw, 4, 4)``.
        radius_mm: Half-size of the cube.

    Returns:
        ``(B,)`` mean corner displacement in mm of each sample (mean over the window).

    Example:
        >>> eye = torch.eye(4).repeat(1, 3, 1, 1)
        >>> shifted = eye.clone(); shifted[..., 0, 3] = 2.0
        >>> pose_supervision_loss(shifted, eye).tolist()
        [2.0]
    """
    if matrices.dim() != 4 or matrices.shape[2:] != (4, 4):
        raise ValueError(f"matrices must be (B, Nw, 4, 4), got shape {tuple(matrices.shape)}")
    if targets.shape != matrices.shape:
        raise ValueError(
            f"targets must match matrices {tuple(matrices.shape)}, got {tuple(targets.shape)}"
        )
    if not radius_mm > 0:
        raise ValueError(f"radius_mm must be positive, got {radius_mm}")
    signs = torch.tensor(
        [[i, j, k] for i in (-1.0, 1.0) for j in (-1.0, 1.0) for k in (-1.0, 1.0)],
        dtype=matrices.dtype,
        device=matrices.device,
    )
    corners = torch.cat([signs * float(radius_mm), torch.ones_like(signs[:, :1])], dim=1)  # (8, 4)
    difference = (matrices - targets.to(matrices.dtype))[..., :3, :] @ corners.T  # (B, Nw, 3, 8)
    # sqrt with a floor keeps the gradient finite at a perfect prediction.
    distance = torch.sqrt((difference**2).sum(dim=-2) + 1e-8)
    return distance.mean(dim=(1, 2))


def _check_inputs(
    matrices: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, config: RegistrationConfig
) -> None:
    shape = tuple(reversed(config.volume_shape))
    need = max(2 if config.use_mind else 1, max(config.feature_volume_channels) + 1)
    for name, volume in (("fixed", fixed), ("moving", moving)):
        if volume.dim() != 5 or tuple(volume.shape[2:]) != shape:
            raise ValueError(
                f"{name} must be (B, C, {shape[0]}, {shape[1]}, {shape[2]}) (D, H, W of the "
                f"config's grid), got shape {tuple(volume.shape)}"
            )
        if volume.shape[1] < need:
            raise ValueError(
                f"{name} needs {need} channel(s) (kidney map, image, other structures' maps), "
                f"got {volume.shape[1]}"
            )
    if fixed.shape[0] != moving.shape[0]:
        raise ValueError("fixed and moving must have the same batch size")
    expected = (fixed.shape[0], config.window, 4, 4)
    if tuple(matrices.shape) != expected:
        raise ValueError(f"matrices must have shape {expected}, got {tuple(matrices.shape)}")


def fim_loss(
    matrices: torch.Tensor,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    config: RegistrationConfig,
    *,
    warp: Warp = "slab",
) -> FIMLossTerms:
    """The FIM loss of per-frame transforms ``D`` for a batch of windows.

    Args:
        matrices: ``(B, Nw, 4, 4)`` rigid ``D_k`` in internal mm (``warped(p) = CT(D_k p)``).
        fixed: ``(B, C, D, H, W)`` U/S window embedded in the grid
            (:func:`~.transformer.embed_window`): channel 0 the kidney feature map, channel 1 the
            image (needed when ``config.use_mind``), then the maps of ``config.structures``
            after the kidney.
        moving: ``(B, C, D, H, W)`` CT on the grid, the same channels.
        config: Window size, spacing, weights and the ``use_mind`` switch.
        warp: ``"slab"`` samples only the slabs the loss reads; ``"full"`` warps whole volumes
            (same value, slower; for checks).

    Returns:
        The total and every term, see :class:`FIMLossTerms`.

    Example:
        >>> config = RegistrationConfig.from_profile("tiny", window=3)
        >>> vol = torch.rand(1, 2, 72, 56, 32)
        >>> terms = fim_loss(torch.eye(4).repeat(1, 3, 1, 1), vol, vol, config)
        >>> terms.dice.shape
        torch.Size([1, 3])
    """
    _check_inputs(matrices, fixed, moving, config)
    if warp not in ("slab", "full"):
        raise ValueError(f"warp must be 'slab' or 'full', got {warp!r}")
    nw = config.window
    mid = nw // 2
    centre = fixed.shape[4] // 2
    half = min(MIND_RADIUS, nw // 2)
    channels = 2 if config.use_mind else 1
    matrices = matrices.to(moving.dtype)

    structures = list(config.feature_volume_channels)
    if structures == [0]:  # the paper's kidney map alone: a view, not a copy
        moving_maps, fixed_maps = moving[:, :1], fixed[:, :1]
    else:
        moving_maps, fixed_maps = moving[:, structures], fixed[:, structures]

    if warp == "slab":
        planes = sample_slab(moving_maps, matrices, config.spacing, 0)[..., 0]
        mid_slab = sample_slab(
            moving[:, :channels], matrices[:, mid : mid + 1], config.spacing, half
        )[:, 0]
    else:
        planes = warp_volume(moving_maps, matrices, config.spacing)[..., centre]
        warped = warp_volume(moving[:, :channels], matrices, config.spacing)
        mid_slab = warped[:, mid, ..., centre - half : centre + half + 1]

    # Feature loss (Eq. 2): fixed frame k against the warped map's plane x = 0 under D_k, Dice
    # averaged over the structures.
    fixed_frames = window_frames(fixed_maps, nw).permute(0, 4, 1, 2, 3)  # (B, Nw, S, D, H)
    dice = soft_dice(fixed_frames, planes, config.dice_epsilon).mean(dim=2)
    feature_per_sample = -dice.mean(dim=1)

    # Image loss (Eq. 3) on the middle frame.
    if config.use_mind:
        us_slab = fixed[:, 1:2, ..., centre - half : centre + half + 1]
        ct_masked = mid_slab[:, 1:2] * mid_slab[:, 0:1]
        us_mind = mind_descriptor(us_slab, config.mind_epsilon, x_index=half)[..., 0]
        ct_mind = mind_descriptor(ct_masked, config.mind_epsilon, x_index=half)[..., 0]
        region = torch.maximum(fixed_frames[:, mid, 0], mid_slab[:, 0, ..., half]).detach()
        weighted = (region[:, None] * (us_mind - ct_mind).abs()).sum(dim=(1, 2, 3))
        mind_difference = weighted / (6.0 * region.sum(dim=(1, 2)) + config.dice_epsilon)
    else:
        mind_difference = torch.zeros_like(feature_per_sample)

    # Motion loss (Eq. 4).
    motion_per_sample, identity_norms, second_norms = motion_loss(
        matrices, config.motion_identity_weight, config.motion_smoothness_weight
    )

    per_sample = (
        feature_per_sample
        + config.lambda_image * mind_difference
        + config.lambda_motion * motion_per_sample
    )
    return FIMLossTerms(
        total=per_sample.mean(),
        feature=feature_per_sample.mean(),
        image=mind_difference.mean(),
        motion=motion_per_sample.mean(),
        per_sample=per_sample,
        dice=dice,
        mind_difference=mind_difference,
        motion_identity=identity_norms,
        motion_second_difference=second_norms,
    )
