"""ULBNet: a 5-level residual U-Net with a local binary convolution in every skip connection.

The paper's feature network (Methods, "Feature Network"; Appendix A): residual blocks instead of
plain convolutions, an LBC layer (:class:`~kidneyreg.features.lbc.LocalBinaryConv3d`) on each skip
connection, dropout 0.2, widths 16, 32, 64, 128, 256 in the encoder and 256, 128, 64, 32, 16 in the
decoder, and a convolution with a sigmoid giving the kidney probability map, of the input's size.

Layout (widths ``c0..c4``, strides ``s``: 2 for CT, (1, 2, 2) for U/S windows)::

    x -> E0 (c0, /2) -> E1 (c1, /4) -> E2 (c2, /8) -> E3 (c3, /16) -> bottom (c4, /16)
    bottom + LBC(E3) -> up -> c3 at /8 -> + LBC(E2) -> up -> c2 at /4 -> + LBC(E1) -> up -> c1 at /2
    -> + LBC(E0) -> up -> c0 at full size -> 1 x 1 x 1 conv -> sigmoid

Each encoder block is a MONAI ``ResidualUnit`` whose first convolution is strided, so the network
downsamples at once and never runs a stack of convolutions at full resolution (which costs about
10x more, ``../shared/MEASUREMENTS.md``); each decoder block concatenates the LBC-filtered skip
with the deeper features, upsamples with a transposed convolution and refines with a residual
unit, except the last one, which only upsamples before the output convolution. With U/S strides
the time (frame) axis is never downsampled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from kidneyreg.errors import InputError
from kidneyreg.features.config import FeatureNetConfig
from kidneyreg.features.lbc import LocalBinaryConv3d

__all__ = [
    "CHECKPOINT_KIND",
    "MAX_INFERENCE_SCALE",
    "ULBNet",
    "ct_feature_net",
    "inference_scale_of",
    "inference_window",
    "model_payload",
    "network_from_payload",
    "us_feature_net",
]

#: ``kind`` of every feature-net checkpoint (training, best, exported and bundled).
CHECKPOINT_KIND = "feature-net"
#: Largest inference window, as a factor on the training patch (and largest training patch scale).
MAX_INFERENCE_SCALE = 4.0


def _up(
    in_channels: int,
    out_channels: int,
    stride: tuple[int, int, int],
    dropout: float,
) -> Convolution:
    return Convolution(
        3,
        in_channels,
        out_channels,
        strides=stride,
        kernel_size=3,
        dropout=dropout,
        is_transposed=True,
    )


class ULBNet(nn.Module):
    """The feature network; build it with :func:`ct_feature_net` or :func:`us_feature_net`.

    Args:
        config: Architecture (widths, strides, dropout, LBC settings) and input grid.

    Shape:
        ``(B, 1, D, H, W)`` -> ``(B, 1, D, H, W)`` kidney probabilities in [0, 1]. ``D, H, W`` must
        be divisible by 16 along downsampled axes (all three for CT, ``H, W`` for U/S, whose ``D``
        is the window's frame count, any size).

    Example:
        >>> from kidneyreg.features.config import feature_config
        >>> net = ULBNet(feature_config("ct", "tiny"))
        >>> net(torch.zeros(1, 1, 16, 48, 48)).shape
        torch.Size([1, 1, 16, 48, 48])
    """

    def __init__(self, config: FeatureNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths
        strides = config.strides
        dropout = config.dropout
        levels = len(widths) - 1  # four downsamplings for the paper's five widths
        self.encoders = nn.ModuleList()
        in_channels = 1
        for level in range(levels):
            self.encoders.append(
                ResidualUnit(
                    3,
                    in_channels,
                    widths[level],
                    strides=strides[level],
                    subunits=config.num_res_units,
                    dropout=dropout,
                )
            )
            in_channels = widths[level]
        self.bottom = ResidualUnit(
            3, widths[-2], widths[-1], strides=1, subunits=config.num_res_units, dropout=dropout
        )
        self.skips = nn.ModuleList(
            LocalBinaryConv3d(
                widths[level],
                widths[level],
                n_anchors=max(1, round(config.lbc_anchor_factor * widths[level])),
                kernel_size=config.lbc_kernel,
                sparsity=config.lbc_sparsity,
                # One seed per level: different levels get different anchors, reproducibly.
                seed=config.seed * 1009 + level,
                activation=config.lbc_activation,
                residual=True,
            )
            for level in range(levels)
        )
        # Decoder, deepest first: level L takes cat(LBC(E_L), deeper) at E_L's resolution and
        # returns widths[L] channels at the resolution above.
        self.ups = nn.ModuleList()
        self.refines = nn.ModuleList()
        deeper = widths[-1]
        for level in reversed(range(levels)):
            self.ups.append(_up(widths[level] + deeper, widths[level], strides[level], dropout))
            if level > 0:
                self.refines.append(
                    ResidualUnit(3, widths[level], widths[level], subunits=1, dropout=dropout)
                )
            else:
                self.refines.append(nn.Identity())
            deeper = widths[level]
        self.output = nn.Conv3d(widths[0], 1, kernel_size=1)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output layer before the sigmoid."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"ULBNet needs input (B, 1, D, H, W), got {tuple(x.shape)}")
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        x = self.bottom(x)
        for step, (up, refine) in enumerate(zip(self.ups, self.refines, strict=True)):
            level = len(skips) - 1 - step
            x = torch.cat([self.skips[level](skips[level]), x], dim=1)
            x = refine(up(x))
        return self.output(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Kidney probability map of ``x`` (same spatial size)."""
        return torch.sigmoid(self.forward_logits(x))


def ct_feature_net(config: FeatureNetConfig) -> ULBNet:
    """ULBNet for CT patches (strides 2 on every axis).

    Example:
        >>> from kidneyreg.features.config import feature_config
        >>> ct_feature_net(feature_config("ct", "tiny")).config.strides[0]
        (2, 2, 2)
    """
    if config.modality != "ct":
        raise ValueError(f"ct_feature_net needs a CT configuration, got {config.modality!r}")
    return ULBNet(config)


def us_feature_net(config: FeatureNetConfig) -> ULBNet:
    """ULBNet for U/S windows ``(B, 1, Nw, rows, cols)``; the frame axis is never downsampled.

    Example:
        >>> from kidneyreg.features.config import feature_config
        >>> net = us_feature_net(feature_config("us", "tiny"))
        >>> net(torch.zeros(1, 1, 5, 48, 64)).shape
        torch.Size([1, 1, 5, 48, 64])
    """
    if config.modality != "us":
        raise ValueError(f"us_feature_net needs a U/S configuration, got {config.modality!r}")
    return ULBNet(config)


def model_payload(
    net: ULBNet, *, half: bool = False, inference_scale: float = 1.0
) -> dict[str, Any]:
    """The checkpoint payload of a network: its configuration (a plain dict), its weights and
    the size of its inference window.

    Args:
        net: The network.
        half: Store floating-point tensors as float16 (half the file size; the LBC anchors,
            +-1 and 0, are exact in float16; :func:`network_from_payload` converts back).
        inference_scale: Sliding-window inference uses windows of this factor times the
            configured patch size per axis (:func:`inference_window`): the largest patch the
            network was trained on (``TrainSettings.patch_scale``).

    Example:
        >>> from kidneyreg.features.config import feature_config
        >>> sorted(model_payload(ULBNet(feature_config("ct", "tiny"))))
        ['config', 'inference_scale', 'model']
    """
    state = {
        key: (value.detach().cpu().half() if half and value.is_floating_point() else value)
        for key, value in net.state_dict().items()
    }
    return {
        "config": net.config.to_dict(),
        "model": state,
        "inference_scale": _checked_scale(inference_scale),
    }


def _checked_scale(scale: Any) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"inference_scale must be a number, got {scale!r}") from None
    if not 1.0 <= value <= MAX_INFERENCE_SCALE:
        raise ValueError(f"inference_scale must be in [1, {MAX_INFERENCE_SCALE:g}], got {scale}")
    return value


def inference_window(config: FeatureNetConfig, scale: float = 1.0) -> tuple[int, int, int]:
    """Sliding-window size for a network trained on patches up to ``scale`` times its patch.

    Every downsampled axis (all three for CT, the frame axes for U/S: the window length stays)
    is scaled and rounded down to a multiple of the network's total downsampling, never below
    the configured patch.

    Example:
        >>> from kidneyreg.features.config import feature_config
        >>> inference_window(feature_config("ct", "cpu"), 2.0)
        (96, 160, 160)
        >>> inference_window(feature_config("us", "cpu"), 1.0)
        (5, 96, 128)
    """
    multiple = config.size_multiple
    axes = (1, 2) if config.modality == "us" else (0, 1, 2)
    size = list(config.patch_size)
    for axis in axes:
        size[axis] = max(size[axis], int(size[axis] * float(scale)) // multiple * multiple)
    return (size[0], size[1], size[2])


def inference_scale_of(payload: dict[str, Any], source: str | Path) -> float:
    """The ``inference_scale`` of a :func:`model_payload` (1 for checkpoints that predate it).

    Raises:
        InputError: A value that is not a number in [1, 4] (named after ``source``).
    """
    try:
        return _checked_scale(payload.get("inference_scale", 1.0))
    except (TypeError, ValueError) as error:
        raise InputError(source, f"feature-net checkpoint: {error}") from None


def network_from_payload(payload: dict[str, Any], source: str | Path) -> ULBNet:
    """Rebuild the network of a :func:`model_payload` (weights as float32).

    Raises:
        InputError: A configuration or weights that do not make a ULBNet (named after
            ``source``).
    """
    try:
        config = FeatureNetConfig.from_dict(payload["config"])
        net = ULBNet(config)
        state = {
            key: value.float() if value.is_floating_point() else value
            for key, value in payload["model"].items()
        }
        net.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        text = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise InputError(
            source, f"feature-net checkpoint does not fit its network ({text})"
        ) from None
    return net
