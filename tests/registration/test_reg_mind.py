"""MIND against a direct, loop-based evaluation of its definition (registration/mind.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from kidneyreg.registration.mind import MIND_OFFSETS, MIND_RADIUS, mind_descriptor


def _mind_by_definition(image: np.ndarray, eps: float) -> np.ndarray:
    """MIND of one (D, H, W) volume, straight from Heinrich et al. 2012, edge-replicated reads."""
    nz, ny, nx = image.shape

    def read(z: int, y: int, x: int) -> float:
        return float(image[min(max(z, 0), nz - 1), min(max(y, 0), ny - 1), min(max(x, 0), nx - 1)])

    out = np.zeros((6, nz, ny, nx))
    patch = list(itertools.product((-1, 0, 1), repeat=3))
    for z, y, x in itertools.product(range(nz), range(ny), range(nx)):
        dist = []
        for dx, dy, dz in MIND_OFFSETS:
            d = 0.0
            for pz, py, px in patch:
                a = read(z + pz, y + py, x + px)
                b = read(z + pz + dz, y + py + dy, x + px + dx)
                d += (a - b) ** 2
            dist.append(d)
        variance = sum(dist) / 6.0
        values = [math.exp(-d / (variance + eps)) for d in dist]
        top = max(values)
        for j, v in enumerate(values):
            out[j, z, y, x] = v / top
    return out


def test_mind_matches_the_definition_on_random_volumes() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 2, 4, 5, 6, generator=gen, dtype=torch.float64)
    image[1, 1] = torch.where(image[1, 1] > 0.5, 1.0, 0.0)  # a binary one with flat patches
    got = mind_descriptor(image, epsilon=1e-6)
    assert got.shape == (2, 12, 4, 5, 6)
    for b, c in itertools.product(range(2), range(2)):
        expected = _mind_by_definition(image[b, c].numpy(), 1e-6)
        np.testing.assert_allclose(
            got[b, 6 * c : 6 * c + 6].numpy(), expected, rtol=1e-9, atol=1e-12
        )


def test_mind_is_one_on_flat_images_and_max_is_one() -> None:
    assert torch.all(mind_descriptor(torch.full((1, 1, 4, 4, 4), 3.0)) == 1.0)
    values = mind_descriptor(torch.rand(1, 1, 6, 6, 6))
    torch.testing.assert_close(values.amax(dim=1), torch.ones(1, 6, 6, 6))
    assert values.min() >= 0


def test_mind_is_invariant_to_intensity_scale_and_offset() -> None:
    image = torch.rand(1, 1, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(mind_descriptor(image, 1e-12), mind_descriptor(3 * image + 7, 1e-12))


def test_middle_slice_of_a_five_slice_slab_equals_the_whole_volume() -> None:
    image = torch.rand(1, 1, 6, 7, 12)
    centre = 6
    slab = image[..., centre - MIND_RADIUS : centre + MIND_RADIUS + 1]
    torch.testing.assert_close(
        mind_descriptor(slab)[..., MIND_RADIUS], mind_descriptor(image)[..., centre]
    )


def test_single_slice_evaluation_equals_that_slice_of_the_whole() -> None:
    image = torch.rand(2, 1, 5, 6, 7, dtype=torch.float64)
    whole = mind_descriptor(image)
    for x in (0, 3, 6):
        torch.testing.assert_close(mind_descriptor(image, x_index=x), whole[..., x : x + 1])
    with pytest.raises(ValueError, match="outside"):
        mind_descriptor(image, x_index=7)


def test_mind_is_differentiable_and_rejects_bad_input() -> None:
    image = torch.rand(1, 1, 4, 4, 4, requires_grad=True)
    mind_descriptor(image).sum().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()
    with pytest.raises(ValueError, match="epsilon"):
        mind_descriptor(torch.rand(1, 1, 4, 4, 4), epsilon=0.0)
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        mind_descriptor(torch.rand(4, 4, 4))
