"""The 3D-2D hierarchical rigid registration network (paper: "Registration Network", Fig. 1).

The fixed U/S window volume (frames on the middle R-L slices of the grid, zeros elsewhere) and the
moving CT volume are concatenated on channels (their kidney feature maps, plus the images with
``use_images``) and pass a VoxelMorph-style U-Net: three stride-2 convolutions (8, 16, 16
channels) down to 1/8 resolution, then a decoder (16, 16, 16, 16, 8, 8) that upsamples
trilinearly by 2 and concatenates the skip at each level::

    level 0: conv 16 at 1/8                    -> head 0 (translation weight 2)
    level 1: up, + enc 1/4, conv 16 at 1/4     -> head 1 (weight 1)
    level 2: up, + enc 1/2, conv 16 at 1/2     -> head 2 (weight 0.5)
    level 3: up, + input, conv 16, 8, 8 at 1/1 -> head 3 (weight 0.25)

Each head (:class:`~.heads.RegressionHead`) outputs ``6 Nw`` numbers in (-1, 1): rotations are
scaled by ``max_rotation``, translations by ``max_translation / sum(weights)``; the final rotation
is the mean over levels and the final translation the weighted sum (:func:`~.heads.combine_levels`).

Speed (``benchmarks/bench_registration.py``, ``cpu`` profile, one thread): the full-resolution
decoder level costs ~85 % of a forward pass (1.5 s for the whole network), yet the U/S content
lives only on the ``Nw`` middle R-L slices and the loss reads only the plane ``x = 0`` (+-2 slices
for MIND). With ``decoder_slab_half_width = h`` (default 2) the finest two decoder levels are
computed only on the slab ``|x - nx // 2| <= h`` (and the coarse voxels upsampling blends into it
at 1/2 resolution), while the 1/8 and 1/4 levels keep the whole volume and carry the global
context into the slab through the upsampling path: 0.11 s per window (14x less), 0.24 s with
h = 4 (forward + backward with the loss: 0.48 s instead of 3.3 s).
Channel widths, levels, heads and the hierarchical combination are the paper's; only the spatial
extent of the two finest levels shrinks, so their heads pool over the slab instead of the whole
volume (``decoder_slab_half_width=None`` restores the paper's whole-volume decoder exactly). The
upsampled coarse features inside the slab are exactly those of the whole-volume computation (the
coarse voxels they blend are cropped first); the convolutions see zero padding at the slab's R-L
faces, as they do at the volume's faces.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kidneyreg.geometry import euler_to_matrix_torch
from kidneyreg.registration.config import RegistrationConfig
from kidneyreg.registration.heads import RegressionHead, combine_levels
from kidneyreg.registration.loss import FIMLossTerms, Warp, fim_loss

__all__ = [
    "RegistrationNet",
    "RegistrationOutput",
    "parameter_counts",
    "upsample_x_range",
    "widen_inputs",
    "widen_to_images",
]

# Downsampling factor of each decoder level, coarsest first.
_LEVEL_FACTORS = (8, 4, 2, 1)


@dataclass(frozen=True)
class RegistrationOutput:
    """What the network predicts for a batch of windows.

    Attributes:
        level_params: One ``(B, Nw, 6)`` tensor per active head, coarsest first: rotations in
            radians and translations in mm *before* the level's translation weight.
        params: Final ``(B, Nw, 6)`` rigid parameters ``(rx, ry, rz, tx, ty, tz)`` of each frame.
        matrices: Final ``(B, Nw, 4, 4)`` transforms ``D_k`` (internal mm -> CT internal mm).
    """

    level_params: tuple[torch.Tensor, ...]
    params: torch.Tensor
    matrices: torch.Tensor

    @property
    def middle_matrices(self) -> torch.Tensor:
        """``(B, 4, 4)`` transforms of the window's middle frame (the registration target)."""
        return self.matrices[:, self.matrices.shape[1] // 2]


def upsample_x_range(
    coarse: torch.Tensor, coarse_start: int, start: int, stop: int
) -> torch.Tensor:
    """Trilinear x2 upsampling of ``coarse``, returned only for fine x indices [start, stop).

    ``coarse`` holds the coarse x indices ``[coarse_start, coarse_start + W)``; the result equals
    ``F.interpolate(full_coarse, scale_factor=2, mode="trilinear")[..., start:stop]`` as long as
    ``coarse`` covers ``[(start - 1) // 2, stop // 2 + 1)`` (fine voxel ``i`` blends coarse voxels
    ``floor(i / 2 - 1 / 4)`` and the next) or that range passes the volume's faces, where
    interpolation repeats the edge voxel either way.

    Example:
        >>> c = torch.rand(1, 2, 4, 4, 8)
        >>> full = F.interpolate(c, scale_factor=2, mode="trilinear")
        >>> torch.allclose(upsample_x_range(c[..., 2:7], 2, 6, 11), full[..., 6:11])
        True
    """
    coarse_stop = coarse_start + coarse.shape[4]
    first = max((start - 1) // 2, coarse_start)
    last = min(stop // 2 + 1, coarse_stop)
    if 2 * first > start or 2 * last < stop:
        raise ValueError(
            f"coarse x range [{coarse_start}, {coarse_stop}) cannot give fine [{start}, {stop})"
        )
    crop = coarse[..., first - coarse_start : last - coarse_start]
    # PyTorch's CPU trilinear kernel vectorises over channels only in channels-last layout:
    # 5-7x faster there than on the row-major crops the decoder hands it (same values to float
    # rounding), and the concatenation with the channels-last skip that follows stays so.
    crop = crop.contiguous(memory_format=torch.channels_last_3d)
    fine = F.interpolate(crop, scale_factor=2, mode="trilinear", align_corners=False)
    return fine[..., start - 2 * first : stop - 2 * first]


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
    )


class RegistrationNet(nn.Module):
    """Hierarchical rigid regression network: (fixed window, moving CT) -> per-frame ``D_k``.

    Args:
        config: Architecture, ranges and ablation switches; see
            :class:`~kidneyreg.registration.config.RegistrationConfig`.

    Example:
        >>> config = RegistrationConfig.from_profile("tiny", window=3)
        >>> net = RegistrationNet(config)
        >>> vol = torch.rand(1, 1, 72, 56, 32)
        >>> out = net(vol, vol)
        >>> out.matrices.shape, bool(torch.allclose(out.matrices, torch.eye(4)))
        (torch.Size([1, 3, 4, 4]), True)
    """

    def __init__(self, config: RegistrationConfig) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder_channels
        dec = config.decoder_channels
        in_ch = config.input_channels
        self.encoder = nn.ModuleList(
            [_conv(in_ch, enc[0], 2), _conv(enc[0], enc[1], 2), _conv(enc[1], enc[2], 2)]
        )
        outputs = 6 * config.window
        heads_at: list[tuple[int, int]] = []  # (level, channels)
        if config.use_decoder:
            self.decoder = nn.ModuleList(
                [
                    _conv(enc[2], dec[0]),
                    _conv(dec[0] + enc[1], dec[1]),
                    _conv(dec[1] + enc[0], dec[2]),
                    _conv(dec[2] + in_ch, dec[3]),
                ]
            )
            self.extra = nn.ModuleList([_conv(a, b) for a, b in itertools.pairwise(dec[3:])])
            level_channels = (dec[0], dec[1], dec[2], dec[-1])
            levels = range(4) if config.hierarchical else (3,)
            heads_at = [(level, level_channels[level]) for level in levels]
        else:
            self.decoder = nn.ModuleList()
            self.extra = nn.ModuleList()
            heads_at = [(0, enc[2])]  # the bottleneck is at 1/8, like level 0
        self.head_levels = tuple(level for level, _ in heads_at)
        self.heads = nn.ModuleList(
            [
                RegressionHead(ch, outputs, config.head_attention_maps, config.head_hidden)
                for _, ch in heads_at
            ]
        )
        self.x_ranges = self._x_ranges()
        nx, ny, nz = config.volume_shape
        for level, factor in enumerate(_LEVEL_FACTORS):
            lo, hi = self.x_ranges[level]
            self.register_buffer(f"axis_z{level}", self._axis(nz, factor, 0, nz // factor), False)
            self.register_buffer(f"axis_y{level}", self._axis(ny, factor, 0, ny // factor), False)
            self.register_buffer(f"axis_x{level}", self._axis(nx, factor, lo, hi), False)

    @staticmethod
    def _axis(size: int, factor: int, start: int, stop: int) -> torch.Tensor:
        # Level voxel j sits over full-resolution voxel factor * j (stride-2 convolutions with
        # padding 1); positions are internal mm over half the field of view: about [-1, 1].
        index = torch.arange(start, stop, dtype=torch.float32) * factor
        return (index - size // 2) / (size / 2)

    def _x_ranges(self) -> list[tuple[int, int]]:
        """x index range [start, stop) computed at each decoder level, coarsest first."""
        nx = self.config.volume_shape[0]
        ranges = [(0, nx // f) for f in _LEVEL_FACTORS]
        half = self.config.decoder_slab_half_width
        if half is None or not self.config.use_decoder:
            return ranges
        centre = nx // 2
        lo, hi = max(0, centre - half), min(nx, centre + half + 1)
        ranges[3] = (lo, hi)
        if self.config.decoder_slab_levels == 2:
            # Just what the x2 upsampling of level 2 needs to fill [lo, hi) exactly.
            ranges[2] = (max(0, (lo - 1) // 2), min(nx // 2, hi // 2 + 1))
        return ranges

    def _axes(self, level: int) -> list[torch.Tensor]:
        return [getattr(self, f"axis_{a}{level}") for a in ("z", "y", "x")]

    def num_parameters(self) -> int:
        """Number of trainable parameters.

        Example:
            >>> RegistrationNet(RegistrationConfig.from_profile("tiny")).num_parameters() > 0
            True
        """
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _inputs(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        shape = tuple(reversed(self.config.volume_shape))
        channels = list(self.config.volume_channels)
        need = max(channels) + 1
        for name, volume in (("fixed", fixed), ("moving", moving)):
            if volume.dim() != 5 or tuple(volume.shape[2:]) != shape:
                raise ValueError(
                    f"{name} must be (B, C, {shape[0]}, {shape[1]}, {shape[2]}), "
                    f"got shape {tuple(volume.shape)}"
                )
            if volume.shape[1] < need:
                raise ValueError(
                    f"{name} needs {need} channel(s) (kidney map, image, other structures' "
                    f"maps), got {volume.shape[1]}"
                )
        if fixed.shape[0] != moving.shape[0]:
            raise ValueError("fixed and moving must have the same batch size")
        if channels == list(range(len(channels))):
            x = torch.cat([fixed[:, :need], moving[:, :need]], dim=1)
        else:
            x = torch.cat([fixed[:, channels], moving[:, channels]], dim=1)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def features(self, fixed: torch.Tensor, moving: torch.Tensor) -> list[torch.Tensor]:
        """The feature map each active head reads, coarsest first.

        Args:
            fixed: ``(B, C, D, H, W)`` U/S window on the grid: channel 0 the feature map,
                channel 1 the image (used with ``use_images``).
            moving: ``(B, C, D, H, W)`` CT on the grid, same channels.
        """
        x = self._inputs(fixed, moving)
        e1 = self.encoder[0](x)
        e2 = self.encoder[1](e1)
        e3 = self.encoder[2](e2)
        if not self.config.use_decoder:
            return [e3]
        ranges = self.x_ranges
        maps = [self.decoder[0](e3)]
        skips = (e2, e1, x)
        for level in (1, 2, 3):
            lo, hi = ranges[level]
            coarse = maps[-1]
            up = upsample_x_range(coarse, ranges[level - 1][0], lo, hi)
            d = self.decoder[level](torch.cat([up, skips[level - 1][..., lo:hi]], dim=1))
            maps.append(d)
        for conv in self.extra:
            maps[3] = conv(maps[3])
        return [maps[level] for level in self.head_levels]

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> RegistrationOutput:
        """Predict the per-frame rigid transforms of a batch of windows.

        Args:
            fixed: ``(B, C, D, H, W)`` U/S window embedded in the grid
                (:func:`~.transformer.embed_window`): channel 0 the kidney feature map, channel 1
                the image (read only with ``use_images``).
            moving: ``(B, C, D, H, W)`` CT on the grid, same channels.

        Returns:
            Per-level and final parameters and the final ``(B, Nw, 4, 4)`` matrices.
        """
        cfg = self.config
        nw = cfg.window
        scale = torch.tensor(
            [cfg.max_rotation_rad] * 3 + [cfg.level_translation_scale_mm] * 3,
            dtype=fixed.dtype,
            device=fixed.device,
        )
        level_params = []
        for head, level, feats in zip(
            self.heads, self.head_levels, self.features(fixed, moving), strict=True
        ):
            raw = head(feats, self._axes(level)).reshape(-1, nw, 6)
            level_params.append(raw * scale)
        params = combine_levels(level_params, cfg.level_translation_weights)
        return RegistrationOutput(
            level_params=tuple(level_params),
            params=params,
            matrices=euler_to_matrix_torch(params),
        )

    def loss(
        self,
        output: RegistrationOutput,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        *,
        warp: Warp = "slab",
    ) -> FIMLossTerms:
        """The FIM loss of ``output`` (:func:`~kidneyreg.registration.loss.fim_loss`).

        ``fixed`` and ``moving`` are the tensors given to :meth:`forward`; the loss needs their
        image channel (channel 1) unless ``use_mind`` is off.

        Example:
            >>> config = RegistrationConfig.from_profile("tiny", window=3)
            >>> net = RegistrationNet(config)
            >>> vol = torch.rand(1, 2, 72, 56, 32)
            >>> net.loss(net(vol, vol), vol, vol).total.shape
            torch.Size([])
        """
        return fim_loss(output.matrices, fixed, moving, self.config, warp=warp)


def parameter_counts(net: RegistrationNet) -> dict[str, int]:
    """Trainable parameters of the encoder, decoder and heads (for reports).

    Example:
        >>> counts = parameter_counts(RegistrationNet(RegistrationConfig.from_profile("tiny")))
        >>> counts["total"] == sum(v for k, v in counts.items() if k != "total")
        True
    """
    parts: dict[str, Sequence[nn.Module]] = {
        "encoder": [net.encoder],
        "decoder": [net.decoder, net.extra],
        "heads": [net.heads],
    }
    counts = {
        name: sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
        for name, modules in parts.items()
    }
    counts["total"] = net.num_parameters()
    return counts


def widen_to_images(
    state: dict[str, torch.Tensor], config: RegistrationConfig
) -> dict[str, torch.Tensor]:
    """Weights of a feature-map-only network, rearranged for ``config`` with ``use_images``.

    :func:`widen_inputs` from the same configuration without images.

    Example:
        >>> base = RegistrationConfig.from_profile("tiny", window=3)
        >>> wide = base.with_changes(use_images=True)
        >>> state = widen_to_images(RegistrationNet(base).state_dict(), wide)
        >>> state["encoder.0.0.weight"].shape[1]
        4
    """
    if not config.use_images:
        raise ValueError("widen_to_images needs a configuration with use_images=True")
    return widen_inputs(state, config.with_changes(use_images=False), config)


def widen_inputs(
    state: dict[str, torch.Tensor], source: RegistrationConfig, target: RegistrationConfig
) -> dict[str, torch.Tensor]:
    """Weights of a network for ``source``, rearranged for ``target``'s wider input.

    The input is ``[fixed inputs, moving inputs]`` with each side's channels named by
    :attr:`~.config.RegistrationConfig.input_names` (kidney map, image, other structures' maps);
    it reaches the first encoder convolution and, as a skip, the finest decoder convolution.
    Kernels of channels ``source`` had keep their weights; those of new channels (images,
    another structure's map) start at zero, so the widened network computes exactly what the
    original did and fine-tuning (``pretrain --from``) learns how much the new inputs add.

    Args:
        state: ``state_dict`` of a network built for ``source``.
        source: Its configuration.
        target: The configuration to widen to: the same but for ``use_images`` and
            ``structures``, whose inputs must include every input of ``source``.

    Returns:
        A ``state_dict`` for ``RegistrationNet(target)``.

    Example:
        >>> base = RegistrationConfig.from_profile("tiny", window=3)
        >>> wide = base.with_changes(structures=("kidney", "sinus"))
        >>> state = widen_inputs(RegistrationNet(base).state_dict(), base, wide)
        >>> state["encoder.0.0.weight"].shape[1]
        4
    """
    reduced = target.with_changes(use_images=source.use_images, structures=source.structures)
    if reduced != source:
        raise ValueError("widen_inputs can only add images or structures to a configuration")
    missing = set(source.input_names) - set(target.input_names)
    if missing:
        raise ValueError(f"the target configuration drops input(s) {', '.join(sorted(missing))}")
    old_names, new_names = source.input_names, target.input_names
    widened = dict(state)
    # (parameter, index of its first input-channel kernel) of the two convolutions that read the
    # input (RegistrationNet._inputs): the first encoder conv, and the finest decoder conv, whose
    # input is [upsampled level 2 (decoder_channels[2]), network input].
    first_conv = ("encoder.0.0.weight", 0)
    decoder_skip = ("decoder.3.0.weight", target.decoder_channels[2])
    for name, offset in (first_conv, decoder_skip):
        if name not in state:  # the "without decoder layers" ablation has no decoder
            continue
        weight = state[name]
        if weight.shape[1] != offset + 2 * len(old_names):
            raise ValueError(
                f"{name} does not read a {2 * len(old_names)}-channel input "
                f"(shape {tuple(weight.shape)})"
            )
        new = torch.zeros(
            weight.shape[0],
            offset + 2 * len(new_names),
            *weight.shape[2:],
            dtype=weight.dtype,
            device=weight.device,
        )
        new[:, :offset] = weight[:, :offset]
        for side in range(2):  # fixed, moving
            for i, input_name in enumerate(old_names):
                j = new_names.index(input_name)
                new[:, offset + side * len(new_names) + j] = weight[
                    :, offset + side * len(old_names) + i
                ]
        widened[name] = new
    return widened
