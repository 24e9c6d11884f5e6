"""MIND, the modality independent neighbourhood descriptor (Heinrich et al., MedIA 2012), as pure
functions.

For a voxel ``x`` and each of the six neighbour offsets ``r`` (+-1 voxel along x, y, z):

* ``D(x, r) = sum over the 3x3x3 patch p of (I(x + p) - I(x + r + p))^2``
* ``V(x) = mean over the six r of D(x, r)`` (the local variance estimate)
* ``MIND(x, r) = exp(-D(x, r) / (V(x) + eps)) / max over r of exp(-D(x, r) / (V(x) + eps))``

so the largest of the six values is 1; ``eps`` keeps flat regions (``V = 0``) finite (there every
value is 1). Voxels near the border read the image with edge replication, so the result has the
input's size. Evaluating the middle slice of a slab needs two slices on each side
(patch radius 1 + offset 1): with them the middle slice is exactly what the whole volume gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MIND_OFFSETS", "MIND_RADIUS", "mind_descriptor"]

#: The six-neighbourhood offsets ``(dx, dy, dz)`` in voxels, in the order of the output channels;
#: x runs along W (R-L), y along H (A-P), z along D (S-I).
MIND_OFFSETS: tuple[tuple[int, int, int], ...] = (
    (1, 0, 0),
    (-1, 0, 0),
    (0, 1, 0),
    (0, -1, 0),
    (0, 0, 1),
    (0, 0, -1),
)
#: Voxels on each side a MIND value depends on (patch radius 1 + offset 1).
MIND_RADIUS = 2


def _box_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over 3x3x3 neighbourhoods, valid part only (each spatial size shrinks by 2).

    Separable: three 3-tap sums (6 additions per voxel instead of 26).
    """
    for dim in (2, 3, 4):
        n = values.shape[dim]
        values = (
            values.narrow(dim, 0, n - 2)
            + values.narrow(dim, 1, n - 2)
            + values.narrow(dim, 2, n - 2)
        )
    return values


def mind_descriptor(
    image: torch.Tensor, epsilon: float = 1e-6, x_index: int | None = None
) -> torch.Tensor:
    """MIND with the six-neighbourhood and 3x3x3 patches, for every voxel.

    Args:
        image: ``(B, C, D, H, W)``; each channel is described separately.
        epsilon: Added to ``V(x)``; must be > 0.
        x_index: Describe only the voxels of this W (R-L) slice (what the loss needs); the
            result is that slice of the whole-volume descriptor, at a fraction of the cost.

    Returns:
        ``(B, 6 * C, D, H, W)`` (``W = 1`` with ``x_index``) in ``[0, 1]``: channel ``6 c + j``
        is offset ``MIND_OFFSETS[j]`` of input channel ``c``.

    Example:
        >>> mind_descriptor(torch.rand(1, 1, 6, 7, 8)).shape
        torch.Size([1, 6, 6, 7, 8])
        >>> float(mind_descriptor(torch.ones(1, 1, 4, 4, 4)).min())  # flat: every value is 1
        1.0
    """
    if image.dim() != 5:
        raise ValueError(f"image must be (B, C, D, H, W), got shape {tuple(image.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    b, c, nz, ny, nx = image.shape
    x0, x1 = (0, nx) if x_index is None else (x_index, x_index + 1)
    if not 0 <= x0 < x1 <= nx:
        raise ValueError(f"x_index {x_index} is outside the image (W = {nx})")
    flat = image.reshape(b * c, 1, nz, ny, nx)
    r = MIND_RADIUS
    padded = F.pad(flat, (r, r, r, r, r, r), mode="replicate")
    distances = []
    for dx, dy, dz in MIND_OFFSETS:
        # Squared differences on the output grid extended by the patch radius (1) on each side
        # (padded index = index + 2), then the 3x3x3 box sum gives D(x, r) on the output grid.
        here = padded[:, :, 1 : nz + 3, 1 : ny + 3, x0 + 1 : x1 + 3]
        there = padded[:, :, 1 + dz : nz + 3 + dz, 1 + dy : ny + 3 + dy, x0 + 1 + dx : x1 + 3 + dx]
        distances.append(_box_sum((here - there) ** 2))
    dist = torch.cat(distances, dim=1)  # (B*C, 6, D, H, x1 - x0)
    variance = dist.mean(dim=1, keepdim=True)
    # Dividing by the max over r is subtracting the min of D inside the exponent: same values,
    # and the largest is exactly 1 without overflow or 0/0.
    nearest = dist.min(dim=1, keepdim=True).values
    mind = torch.exp((nearest - dist) / (variance + epsilon))
    return mind.reshape(b, 6 * c, nz, ny, x1 - x0)
