"""Local binary convolution (LBC), 3D: the handcrafted texture layer of ULBNet's skip connections.

After Juefei-Xu, Boddeti and Savvides, "Local Binary Convolutional Neural Networks" (CVPR 2017):
a bank of fixed, sparse, binary (+1 / -1) "anchor" filters computes local difference patterns of the
input (a learned generalisation of local binary patterns), a nonlinearity turns them into bit-like
responses, and a learnable 1 x 1 x 1 convolution combines them. Only the combination is trained;
the anchors are buffers, deterministic from a seed, saved and restored with the model's
``state_dict``.

Two choices the CVPR paper leaves open are fixed here:

* The anchor responses are divided by ``sqrt(number of nonzero taps)``. A sum of ``m`` signed
  inputs of unit scale has a standard deviation of about ``sqrt(m)``; the division keeps the
  response at the input's scale for any width and kernel, so the nonlinearity is neither saturated
  (sigmoid) nor the 1 x 1 convolution's initialisation badly scaled.
* ``residual=True`` adds the input to the output (the CVPR paper's LBC module has this identity
  path), so a skip connection never loses the encoder's features, it only gains texture ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LocalBinaryConv3d", "make_anchor_weights"]

_ACTIVATIONS = ("sigmoid", "relu")


def _kernel3(kernel_size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(kernel_size, int):
        sizes: tuple[int, ...] = (kernel_size,) * 3
    else:
        sizes = tuple(int(k) for k in kernel_size)
    if len(sizes) != 3 or any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel_size must be one or three odd positive ints, got {kernel_size!r}")
    return sizes[0], sizes[1], sizes[2]


def _nonzero_taps(taps: int, sparsity: float) -> int:
    """Nonzero weights per anchor filter of ``taps`` weights (at least one)."""
    return max(1, round(float(sparsity) * taps))


def make_anchor_weights(
    n_anchors: int,
    in_channels: int,
    kernel_size: int | Sequence[int] = 3,
    *,
    sparsity: float = 0.5,
    seed: int = 0,
) -> torch.Tensor:
    """Fixed sparse binary anchor filters: each has exactly ``round(sparsity * taps)`` nonzeros.

    Every filter draws its nonzero positions uniformly without replacement among its
    ``in_channels * kD * kH * kW`` taps and a random sign for each, from a private generator
    seeded with ``seed`` (the global torch RNG is left untouched).

    Args:
        n_anchors: Number of anchor filters.
        in_channels: Input channels of each filter.
        kernel_size: One odd size or three (D, H, W), e.g. ``(1, 3, 3)``.
        sparsity: Fraction of nonzero weights per filter, in (0, 1]; at least one is kept.
        seed: Seed of the draw.

    Returns:
        float32 tensor ``(n_anchors, in_channels, kD, kH, kW)`` of values -1, 0, +1.

    Example:
        >>> w = make_anchor_weights(4, 2, 3, sparsity=0.5, seed=1)
        >>> w.shape, int((w != 0).sum(dim=(1, 2, 3, 4))[0])
        (torch.Size([4, 2, 3, 3, 3]), 27)
    """
    if n_anchors < 1 or in_channels < 1:
        raise ValueError(f"n_anchors and in_channels must be >= 1, got {n_anchors}, {in_channels}")
    if not 0.0 < float(sparsity) <= 1.0:
        raise ValueError(
            f"sparsity (fraction of nonzero weights) must be in (0, 1], got {sparsity}"
        )
    kernel = _kernel3(kernel_size)
    taps = in_channels * math.prod(kernel)
    nonzero = _nonzero_taps(taps, sparsity)
    # Drawn on the CPU with a private generator: identical anchors on any device, any context.
    generator = torch.Generator().manual_seed(int(seed))
    weights = torch.zeros(n_anchors, taps, device="cpu")
    for row in weights:
        positions = torch.randperm(taps, generator=generator, device="cpu")[:nonzero]
        draws = torch.randint(0, 2, (nonzero,), generator=generator, device="cpu")
        row[positions] = draws.float() * 2.0 - 1.0
    return weights.reshape(n_anchors, in_channels, *kernel)


class LocalBinaryConv3d(nn.Module):
    """Fixed sparse binary convolution, nonlinearity, learnable 1 x 1 x 1 combination.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (must equal ``in_channels`` when ``residual``).
        n_anchors: Number of fixed anchor filters (intermediate channels).
        kernel_size: Anchor kernel size, one odd int or (D, H, W), e.g. ``(1, 3, 3)`` to keep a
            U/S window's time axis out of the texture pattern. Padding keeps the spatial size.
        sparsity: Fraction of nonzero anchor weights, in (0, 1].
        seed: Seed of the anchors (same seed, same anchors).
        activation: ``"sigmoid"`` or ``"relu"`` (both used by Juefei-Xu et al.).
        residual: Add the input to the output.

    Shape:
        ``(B, in_channels, D, H, W)`` -> ``(B, out_channels, D, H, W)``.

    Example:
        >>> lbc = LocalBinaryConv3d(8, 8, n_anchors=16, seed=3)
        >>> lbc(torch.zeros(1, 8, 4, 6, 6)).shape
        torch.Size([1, 8, 4, 6, 6])
        >>> "anchors" in dict(lbc.named_parameters())
        False
    """

    anchors: torch.Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_anchors: int,
        kernel_size: int | Sequence[int] = 3,
        sparsity: float = 0.5,
        seed: int = 0,
        *,
        activation: str = "sigmoid",
        residual: bool = False,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if residual and in_channels != out_channels:
            raise ValueError(
                f"a residual LBC needs in_channels == out_channels, got {in_channels}, "
                f"{out_channels}"
            )
        self.kernel_size = _kernel3(kernel_size)
        self.sparsity = float(sparsity)
        self.activation = activation
        self.residual = residual
        # A buffer, not a parameter: the optimiser never sees it, state_dict saves it.
        self.register_buffer(
            "anchors",
            make_anchor_weights(
                n_anchors, in_channels, self.kernel_size, sparsity=sparsity, seed=seed
            ),
            persistent=True,
        )
        taps = in_channels * math.prod(self.kernel_size)
        self.response_scale = 1.0 / math.sqrt(_nonzero_taps(taps, sparsity))
        self.combine = nn.Conv3d(n_anchors, out_channels, kernel_size=1)

    @property
    def padding(self) -> tuple[int, int, int]:
        """Zero padding that keeps the spatial size."""
        return (self.kernel_size[0] // 2, self.kernel_size[1] // 2, self.kernel_size[2] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``x`` of shape ``(B, C, D, H, W)``."""
        anchors = self.anchors.to(device=x.device, dtype=x.dtype)
        response = F.conv3d(x, anchors, padding=self.padding)
        response = response * self.response_scale
        if self.activation == "sigmoid":
            response = torch.sigmoid(response)
        else:
            response = F.relu(response)
        out = self.combine(response)
        return out + x if self.residual else out

    def extra_repr(self) -> str:
        n_anchors, in_channels = self.anchors.shape[:2]
        return (
            f"{in_channels}, {self.combine.out_channels}, n_anchors={n_anchors}, "
            f"kernel_size={self.kernel_size}, sparsity={self.sparsity}, "
            f"activation={self.activation}, residual={self.residual}"
        )
