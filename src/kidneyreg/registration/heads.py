"""Small rigid-regression heads and the paper's hierarchical combination of their outputs.

The paper regresses 6 Nw parameters at each decoder level with dense layers on flattened feature
maps (282 M parameters in all). A rigid pose needs *where* things are, which global average
pooling throws away (it is blind to translation), so each head summarises its ``C``-channel map
with position statistics, in grid coordinates scaled to about [-1, 1]:

* contrast moments of every channel: with ``d = F_c - mean(F_c)``, the first and second moments
  ``sum d p / sum |d|`` and ``sum d p p^T / sum |d|`` (3 + 6 numbers). They follow the features'
  bright structures (the kidney in the feature maps) from the first step, with nothing to learn:
  a translated kidney moves them linearly;
* ``K`` learned spatial attention maps (soft-argmax): ``a_k = softmax over voxels`` of a 1x1x1
  convolution; the features pooled under ``a_k`` and the centroid and covariance of ``a_k``
  (``C + 9`` numbers each), which training can focus on what matters;
* the global average of every channel.

A two-layer perceptron with a tanh output maps that vector (``K (C + 9) + 10 C`` numbers) to the
``6 Nw`` parameters. Its last layer starts at zero, so a new network outputs the identity. A head
costs 10-17 k parameters; its statistics cost a few passes over the map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["RegressionHead", "combine_levels"]


def _moment_sums(
    values: torch.Tensor,
    z: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    *,
    channels_first: bool = False,
) -> torch.Tensor:
    """Sums of ``values`` times 1, x, y, z, xx, yy, zz, xy, xz, yz over the grid.

    Args:
        values: ``(B, D, H, W, M)``, or ``(B, M, D, H, W)`` with ``channels_first``.
        z, y, x: Positions along D, H, W.
        channels_first: The layout of ``values``.

    Returns:
        ``(B, M, 10)``.
    """
    # Separable grid: one matrix product contracts the large (z, y) plane with the six
    # polynomials 1, y, z, yy, zz, zy, leaving (B, 6, W, M); x (the short R-L extent of the slab
    # levels) is summed afterwards. ``values`` is a free view as (B, D H, W M) when the features
    # are channels-last, so this reads the map once, with no copy and no (N, 3) coordinates.
    zz, yy = z[:, None], y[None, :]
    ones = torch.ones_like(zz * yy)
    planes = torch.stack([ones, ones * yy, zz * ones, ones * yy * yy, zz * zz * ones, zz * yy])
    planes = planes.reshape(6, -1)
    if channels_first:
        b, m, nz, ny, nx = values.shape
        by_x = torch.matmul(planes, values.reshape(b, m, nz * ny, nx)).permute(0, 2, 3, 1)
    else:
        b, nz, ny, nx, m = values.shape
        by_x = torch.matmul(planes, values.reshape(b, nz * ny, nx * m)).reshape(b, 6, nx, m)
    p1, py, pz, pyy, pzz, pzy = by_x.unbind(dim=1)  # (B, W, M) each
    xs = x[None, :, None]
    return torch.stack(
        [
            p1.sum(dim=1),
            (p1 * xs).sum(dim=1),
            py.sum(dim=1),
            pz.sum(dim=1),
            (p1 * xs * xs).sum(dim=1),
            pyy.sum(dim=1),
            pzz.sum(dim=1),
            (py * xs).sum(dim=1),
            (pz * xs).sum(dim=1),
            pzy.sum(dim=1),
        ],
        dim=-1,
    )


def _grid_moment_sums(z: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`_moment_sums` of a grid of ones, ``(10,)``, from the axes' own sums."""
    n = [torch.tensor(float(a.numel()), dtype=a.dtype, device=a.device) for a in (x, y, z)]
    s1 = [a.sum() for a in (x, y, z)]
    s2 = [(a * a).sum() for a in (x, y, z)]
    nx, ny, nz = n
    return torch.stack(
        [
            nx * ny * nz,
            s1[0] * ny * nz,
            s1[1] * nx * nz,
            s1[2] * nx * ny,
            s2[0] * ny * nz,
            s2[1] * nx * nz,
            s2[2] * nx * ny,
            s1[0] * s1[1] * nz,
            s1[0] * s1[2] * ny,
            s1[1] * s1[2] * nx,
        ]
    )


class RegressionHead(nn.Module):
    """Position statistics -> MLP -> tanh: ``(B, C, D, H, W)`` -> ``(B, outputs)`` in (-1, 1).

    Args:
        in_channels: Channels of the feature map.
        outputs: Number of outputs (``6 Nw``).
        attention_maps: Number of learned spatial attention maps ``K``.
        hidden: Width of the hidden layer.

    Example:
        >>> head = RegressionHead(8, 30)
        >>> axes = [torch.linspace(-1, 1, n) for n in (6, 5, 4)]
        >>> head(torch.rand(2, 8, 6, 5, 4), axes).abs().max().item()  # starts at the identity
        0.0
    """

    def __init__(
        self, in_channels: int, outputs: int, attention_maps: int = 4, hidden: int = 64
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.attention_maps = attention_maps
        self.attention = nn.Conv3d(in_channels, attention_maps, kernel_size=1)
        self.summary_size = attention_maps * (in_channels + 9) + 10 * in_channels
        self.hidden = nn.Linear(self.summary_size, hidden)
        self.act = nn.LeakyReLU(0.2)
        self.out = nn.Linear(hidden, outputs)
        # Zero last layer: tanh(0) = 0 -> every parameter 0 -> identity transforms at the start.
        # Its weight still receives gradients, so the rest of the network does from step 2 on.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def summary(self, features: torch.Tensor, axes: Sequence[torch.Tensor]) -> torch.Tensor:
        """The statistics vector ``(B, K (C + 9) + 10 C)`` fed to the perceptron.

        Args:
            features: ``(B, C, D, H, W)``.
            axes: Position of each voxel along D, H and W (three 1D tensors of those lengths),
                e.g. internal mm divided by half the field of view.
        """
        b, c, nz, ny, nx = features.shape
        z, y, x = (a.to(features.dtype) for a in axes)
        if (z.numel(), y.numel(), x.numel()) != (nz, ny, nx):
            raise ValueError("axes must match the spatial sizes of features")
        k = self.attention_maps
        n = nz * ny * nx
        # Voxels x channels; a free view when the network runs channels-last.
        grid = features.permute(0, 2, 3, 4, 1)
        flat = grid.reshape(b, n, c)
        mean = flat.mean(dim=1)  # (B, C)

        # Contrast moments of every channel.
        sums = _moment_sums(grid, z, y, x)  # (B, C, 10)
        grid_sums = _grid_moment_sums(z, y, x)  # (10,)
        spread = (flat - mean[:, None]).abs_().sum(dim=1) + 1e-6 * n  # (B, C)
        contrast = (sums[..., 1:] - mean[..., None] * grid_sums[1:]) / spread[..., None]

        # Learned attention maps (soft-argmax).
        conv_weight = self.attention.weight.reshape(k, c)
        # Maps first, (B, K, N): the softmax then runs along contiguous memory (several times
        # faster than along N with a stride of K).
        logits = torch.matmul(conv_weight, flat.transpose(1, 2))
        if self.attention.bias is not None:
            logits = logits + self.attention.bias[:, None]
        weights = torch.softmax(logits, dim=2)  # each map sums to 1 over voxels
        pooled = weights @ flat  # (B, K, C)
        w_sums = _moment_sums(
            weights.reshape(b, k, nz, ny, nx), z, y, x, channels_first=True
        )  # (B, K, 10)
        mx, my, mz = w_sums[..., 1], w_sums[..., 2], w_sums[..., 3]
        attention = torch.stack(
            [
                mx,
                my,
                mz,
                w_sums[..., 4] - mx * mx,
                w_sums[..., 5] - my * my,
                w_sums[..., 6] - mz * mz,
                w_sums[..., 7] - mx * my,
                w_sums[..., 8] - mx * mz,
                w_sums[..., 9] - my * mz,
            ],
            dim=-1,
        )  # (B, K, 9): centroid and covariance
        return torch.cat(
            [
                contrast.reshape(b, -1),
                pooled.reshape(b, -1),
                attention.reshape(b, -1),
                mean,
            ],
            dim=1,
        )

    def forward(self, features: torch.Tensor, axes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Outputs in (-1, 1), ``(B, outputs)``."""
        return torch.tanh(self.out(self.act(self.hidden(self.summary(features, axes)))))


def combine_levels(
    level_params: Sequence[torch.Tensor], translation_weights: Sequence[float]
) -> torch.Tensor:
    """The paper's hierarchical combination of per-level rigid parameters.

    Rotation = mean of the levels' rotations; translation = sum of the levels' translations times
    ``translation_weights`` (coarsest level first; the paper's {2, 1, 0.5, 0.25}).

    Args:
        level_params: One ``(..., 6)`` tensor per level, ``(rx, ry, rz, tx, ty, tz)``.
        translation_weights: One weight per level.

    Returns:
        ``(..., 6)``.

    Example:
        >>> a = torch.tensor([0.2, 0.0, 0.0, 1.0, 0.0, 0.0])
        >>> b = torch.tensor([0.4, 0.0, 0.0, 0.0, 2.0, 0.0])
        >>> combine_levels([a, b], [2.0, 1.0]).tolist()
        [0.30000001192092896, 0.0, 0.0, 2.0, 2.0, 0.0]
    """
    if len(level_params) != len(translation_weights) or not level_params:
        raise ValueError(
            f"need one translation weight per level, got {len(level_params)} levels and "
            f"{len(translation_weights)} weights"
        )
    stacked = torch.stack(list(level_params), dim=0)
    weights = torch.tensor(translation_weights, dtype=stacked.dtype, device=stacked.device)
    rotation = stacked[..., :3].mean(dim=0)
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    translation = (stacked[..., 3:] * weights.reshape(shape)).sum(dim=0)
    return torch.cat([rotation, translation], dim=-1)
