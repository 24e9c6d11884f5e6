"""Local binary convolution: fixed, sparse, binary anchors that survive save/load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kidneyreg.checkpoint import load_checkpoint, save_checkpoint
from kidneyreg.features.lbc import LocalBinaryConv3d, make_anchor_weights


def test_anchors_are_binary_with_the_requested_sparsity() -> None:
    for sparsity in (0.1, 0.5, 0.9):
        weights = make_anchor_weights(6, 4, 3, sparsity=sparsity, seed=2)
        assert weights.shape == (6, 4, 3, 3, 3)
        assert set(weights.unique().tolist()) <= {-1.0, 0.0, 1.0}
        taps = 4 * 27
        per_filter = torch.count_nonzero(weights.reshape(6, -1), dim=1)
        assert per_filter.tolist() == [round(sparsity * taps)] * 6
        # Both signs occur: the filters are differences, not sums.
        assert (weights == 1).any() and (weights == -1).any()


def test_anchors_are_deterministic_from_the_seed() -> None:
    a = make_anchor_weights(5, 3, (1, 3, 3), seed=7)
    b = make_anchor_weights(5, 3, (1, 3, 3), seed=7)
    c = make_anchor_weights(5, 3, (1, 3, 3), seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (5, 3, 1, 3, 3)


def test_anchors_are_buffers_not_parameters_and_stay_fixed() -> None:
    torch.manual_seed(0)
    layer = LocalBinaryConv3d(4, 4, n_anchors=8, sparsity=0.5, seed=1, residual=True)
    names = [name for name, _ in layer.named_parameters()]
    assert "anchors" not in names and all(n.startswith("combine.") for n in names)
    assert "anchors" in layer.state_dict()
    before = layer.anchors.clone()
    combine_before = layer.combine.weight.detach().clone()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    x = torch.randn(2, 4, 5, 6, 6, requires_grad=True)
    layer(x).pow(2).mean().backward()
    optimizer.step()
    assert torch.equal(layer.anchors, before)
    assert not torch.equal(layer.combine.weight, combine_before)  # the 1x1 part learns
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients pass through the anchors


def test_anchors_survive_a_checkpoint_round_trip(tmp_path: Path) -> None:
    layer = LocalBinaryConv3d(3, 5, n_anchors=6, seed=11)
    path = save_checkpoint(tmp_path / "lbc.pt", {"model": layer.state_dict()}, kind="test")
    other = LocalBinaryConv3d(3, 5, n_anchors=6, seed=12)  # different anchors before loading
    assert not torch.equal(other.anchors, layer.anchors)
    other.load_state_dict(load_checkpoint(path, kind="test")["model"])
    assert torch.equal(other.anchors, layer.anchors)
    x = torch.randn(1, 3, 4, 5, 6)
    assert torch.equal(other(x), layer(x))


def test_forward_shapes_activation_and_residual() -> None:
    x = torch.randn(2, 3, 4, 7, 9)
    assert LocalBinaryConv3d(3, 6, n_anchors=4)(x).shape == (2, 6, 4, 7, 9)
    flat = LocalBinaryConv3d(3, 3, n_anchors=4, kernel_size=(1, 3, 3), activation="relu")
    assert flat(x).shape == x.shape
    residual = LocalBinaryConv3d(3, 3, n_anchors=4, residual=True)
    torch.nn.init.zeros_(residual.combine.weight)
    torch.nn.init.zeros_(residual.combine.bias)
    assert torch.equal(residual(x), x)  # a zero combination leaves the identity path


def test_response_scale_keeps_unit_inputs_in_range() -> None:
    layer = LocalBinaryConv3d(16, 16, n_anchors=16, sparsity=0.5, seed=0)
    x = torch.randn(1, 16, 8, 8, 8)
    import torch.nn.functional as F

    response = F.conv3d(x, layer.anchors, padding=1) * layer.response_scale
    assert layer.response_scale == pytest.approx(1.0 / math.sqrt(round(0.5 * 16 * 27)))
    assert 0.5 < float(response[..., 1:-1, 1:-1, 1:-1].std()) < 2.0


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="sparsity"):
        make_anchor_weights(2, 2, sparsity=0.0)
    with pytest.raises(ValueError, match="kernel_size"):
        make_anchor_weights(2, 2, kernel_size=2)
    with pytest.raises(ValueError, match="activation"):
        LocalBinaryConv3d(2, 2, 2, activation="tanh")
    with pytest.raises(ValueError, match="residual"):
        LocalBinaryConv3d(2, 3, 2, residual=True)
