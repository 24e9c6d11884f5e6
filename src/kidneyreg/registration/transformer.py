"""Differentiable rigid warps of the moving CT on the registration grid (the spatial transformer).

Conventions (``docs/architecture.md``): a volume tensor is ``(B, C, D, H, W)`` with ``D = nz``
(S-I), ``H = ny`` (A-P), ``W = nx`` (R-L); voxel ``(i, j, k)`` along ``(W, H, D)`` sits at internal
mm ``((i - nx // 2) s, (j - ny // 2) s, (k - nz // 2) s)``. The network's rigid ``D_k`` (internal mm
-> CT internal mm) warps the CT as ``warped(p) = CT(D_k p)``; frame ``k`` of the window is compared
with the warped CT's middle R-L slice (``x = 0``). Samples are trilinear
(``grid_sample(align_corners=True)``: index ``n - 1`` is the last voxel centre); points outside the
CT read 0.

The loss only looks at the plane ``x = 0`` of each frame and the few slices around it that MIND
needs, so :func:`sample_slab` samples just that slab (``2 h + 1`` slices instead of ``nx``), once
per frame; :func:`warp_volume` warps everything (figures, tests). Both build their sampling points
with the same arithmetic, so a slab equals the matching slices of the full warp.

The U/S window layout helpers place frame ``k`` of an ``Nw`` window on the slice
``x = nx // 2 + (k - Nw // 2)`` (:func:`embed_window`) and read it back (:func:`window_frames`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "embed_window",
    "grid_axis_mm",
    "sample_slab",
    "warp_volume",
    "window_frames",
    "window_indices",
]


def _check_volume(volume: torch.Tensor) -> None:
    if volume.dim() != 5:
        raise ValueError(f"volume must be (B, C, D, H, W), got shape {tuple(volume.shape)}")
    if min(volume.shape[2:]) < 2:
        raise ValueError(f"every spatial size must be >= 2, got {tuple(volume.shape[2:])}")


def _check_matrices(matrices: torch.Tensor, batch: int) -> None:
    if matrices.dim() != 4 or matrices.shape[2:] != (4, 4) or matrices.shape[0] != batch:
        raise ValueError(
            f"matrices must be (B={batch}, Nw, 4, 4), got shape {tuple(matrices.shape)}"
        )


def grid_axis_mm(
    size: int,
    spacing: float,
    *,
    start: int = 0,
    stop: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Internal mm of voxel indices ``start..stop-1`` of a grid axis of ``size`` voxels.

    Example:
        >>> grid_axis_mm(4, 2.0).tolist()
        [-4.0, -2.0, 0.0, 2.0]
    """
    stop = size if stop is None else stop
    index = torch.arange(start, stop, dtype=dtype, device=device)
    return (index - float(size // 2)) * spacing


def _sampling_grid(
    matrices: torch.Tensor,
    volume_shape_dhw: tuple[int, int, int],
    spacing: float,
    x_start: int,
    x_stop: int,
) -> torch.Tensor:
    """grid_sample coordinates of ``D_k p`` for the output voxels with x index in [start, stop).

    Returns ``(B, Nw * D, H, x_stop - x_start, 3)``: frames stacked along the output depth so that
    one ``grid_sample`` call reads the shared volume without copying it per frame.
    """
    nz, ny, nx = volume_shape_dhw
    dtype, device = matrices.dtype, matrices.device
    x = grid_axis_mm(nx, spacing, start=x_start, stop=x_stop, dtype=dtype, device=device)
    y = grid_axis_mm(ny, spacing, dtype=dtype, device=device)
    z = grid_axis_mm(nz, spacing, dtype=dtype, device=device)
    rot = matrices[..., :3, :3]
    shift = matrices[..., :3, 3]
    # q = R p + t for p = (x, y, z) on a separable grid: a broadcast sum of three outer terms,
    # shaped (B, Nw, D, H, W, 3), cheaper than a matrix product over every point.
    q = (
        rot[:, :, None, None, None, :, 0] * x[:, None]
        + rot[:, :, None, None, None, :, 1] * y[:, None, None]
        + rot[:, :, None, None, None, :, 2] * z[:, None, None, None]
        + shift[:, :, None, None, None, :]
    )
    # mm -> voxel index -> [-1, 1] (align_corners=True), in grid_sample's (x=W, y=H, z=D) order.
    sizes = torch.tensor([nx, ny, nz], dtype=dtype, device=device)
    centre = torch.floor(sizes / 2)
    normalised = (q / spacing + centre) * (2.0 / (sizes - 1)) - 1.0
    b, nw = matrices.shape[:2]
    return normalised.reshape(b, nw * nz, ny, x_stop - x_start, 3)


def _warp_x_range(
    volume: torch.Tensor, matrices: torch.Tensor, spacing: float, x_start: int, x_stop: int
) -> torch.Tensor:
    _check_volume(volume)
    _check_matrices(matrices, volume.shape[0])
    b, c, nz, ny, _ = volume.shape
    nw = matrices.shape[1]
    grid = _sampling_grid(
        matrices.to(volume.dtype), (nz, ny, volume.shape[4]), spacing, x_start, x_stop
    )
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    # (B, C, Nw * D, H, w) -> (B, Nw, C, D, H, w)
    return out.reshape(b, c, nw, nz, ny, x_stop - x_start).transpose(1, 2)


def warp_volume(volume: torch.Tensor, matrices: torch.Tensor, spacing: float) -> torch.Tensor:
    """Warp the whole volume once per frame: ``out[b, k](p) = volume[b](D_k p)``.

    Args:
        volume: ``(B, C, D, H, W)`` on the registration grid (the CT and/or its feature map).
        matrices: ``(B, Nw, 4, 4)`` rigid transforms in internal mm.
        spacing: Voxel size in mm.

    Returns:
        ``(B, Nw, C, D, H, W)``.

    Example:
        >>> vol = torch.rand(1, 1, 8, 8, 8)
        >>> out = warp_volume(vol, torch.eye(4).expand(1, 2, 4, 4), 1.0)
        >>> out.shape, bool(torch.allclose(out[:, 1], vol, atol=1e-5))
        (torch.Size([1, 2, 1, 8, 8, 8]), True)
    """
    _check_volume(volume)
    return _warp_x_range(volume, matrices, spacing, 0, volume.shape[4])


def sample_slab(
    volume: torch.Tensor, matrices: torch.Tensor, spacing: float, half_width: int
) -> torch.Tensor:
    """Warp only the R-L slab ``|x index - nx // 2| <= half_width`` around each frame's plane.

    Equal to ``warp_volume(...)[..., nx // 2 - half_width : nx // 2 + half_width + 1]`` at a
    fraction of the cost: the loss needs the plane ``x = 0`` (``half_width = 0``) and, for MIND
    with 3x3x3 patches at distance 1, two slices on each side (``half_width = 2``).

    Args:
        volume: ``(B, C, D, H, W)``.
        matrices: ``(B, Nw, 4, 4)`` rigid transforms in internal mm.
        spacing: Voxel size in mm.
        half_width: Slices on each side of the plane (>= 0; the slab may extend past the grid,
            the transform decides what it reads).

    Returns:
        ``(B, Nw, C, D, H, 2 * half_width + 1)``; slice ``half_width`` is the plane ``x = 0``.

    Example:
        >>> vol = torch.rand(2, 3, 8, 10, 12)
        >>> sample_slab(vol, torch.eye(4).repeat(2, 5, 1, 1), 1.5, 2).shape
        torch.Size([2, 5, 3, 8, 10, 5])
    """
    if half_width < 0:
        raise ValueError(f"half_width must be >= 0, got {half_width}")
    _check_volume(volume)
    centre = volume.shape[4] // 2
    return _warp_x_range(volume, matrices, spacing, centre - half_width, centre + half_width + 1)


# ----------------------------------------------------------------------------------------------
# U/S window layout on the grid
# ----------------------------------------------------------------------------------------------


def window_indices(nx: int, window: int) -> list[int]:
    """x indices of the frames of an ``Nw`` window on a grid ``nx`` voxels wide.

    Example:
        >>> window_indices(32, 5)
        [14, 15, 16, 17, 18]
    """
    if window < 1 or window % 2 == 0 or window > nx:
        raise ValueError(f"window must be odd and in [1, nx={nx}], got {window}")
    return [nx // 2 + (k - window // 2) for k in range(window)]


def embed_window(window: torch.Tensor, nx: int) -> torch.Tensor:
    """Zero-pad a compact U/S window ``(B, C, D, H, Nw)`` into the grid ``(B, C, D, H, nx)``.

    This is the paper's "windowed U/S images were centred in a volume with zero padding".

    Example:
        >>> embed_window(torch.ones(1, 1, 4, 4, 3), 8)[0, 0, 0, 0].tolist()
        [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    """
    if window.dim() != 5:
        raise ValueError(f"window must be (B, C, D, H, Nw), got shape {tuple(window.shape)}")
    idx = window_indices(nx, window.shape[4])
    return F.pad(window, (idx[0], nx - idx[-1] - 1))


def window_frames(volume: torch.Tensor, window: int) -> torch.Tensor:
    """The ``window`` frame slices of a grid volume: ``(B, C, D, H, W)`` -> ``(B, C, D, H, Nw)``.

    Example:
        >>> window_frames(embed_window(torch.rand(1, 1, 4, 4, 5), 16), 5).shape
        torch.Size([1, 1, 4, 4, 5])
    """
    _check_volume(volume)
    idx = window_indices(volume.shape[4], window)
    return volume[..., idx[0] : idx[-1] + 1]
