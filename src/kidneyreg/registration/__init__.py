"""Hierarchical rigid 3D-2D registration: network, slab spatial transformer, MIND and FIM loss.

Typical use (a training loop)::

    config = RegistrationConfig.from_profile("cpu")
    net = RegistrationNet(config)
    output = net(fixed, moving)          # fixed/moving: (B, C, D, H, W), channel 0 feature map
    terms = net.loss(output, fixed, moving)
    terms.total.backward()

``output.matrices[:, k]`` is ``D_k`` (internal mm -> CT internal mm) of window frame ``k``;
``terms.dice`` is the per-frame Dice the pipeline reports as confidence.
"""

from kidneyreg.registration.config import RegistrationConfig
from kidneyreg.registration.heads import RegressionHead, combine_levels
from kidneyreg.registration.loss import (
    FIMLossTerms,
    fim_loss,
    motion_loss,
    pose_supervision_loss,
    soft_dice,
)
from kidneyreg.registration.mind import MIND_OFFSETS, mind_descriptor
from kidneyreg.registration.network import (
    RegistrationNet,
    RegistrationOutput,
    parameter_counts,
    upsample_x_range,
)
from kidneyreg.registration.transformer import (
    embed_window,
    grid_axis_mm,
    sample_slab,
    warp_volume,
    window_frames,
    window_indices,
)

__all__ = [
    "MIND_OFFSETS",
    "FIMLossTerms",
    "RegistrationConfig",
    "RegistrationNet",
    "RegistrationOutput",
    "RegressionHead",
    "combine_levels",
    "embed_window",
    "fim_loss",
    "grid_axis_mm",
    "mind_descriptor",
    "motion_loss",
    "parameter_counts",
    "pose_supervision_loss",
    "sample_slab",
    "soft_dice",
    "upsample_x_range",
    "warp_volume",
    "window_frames",
    "window_indices",
]
