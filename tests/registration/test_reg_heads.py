"""Tests of the regression head's position statistics (registration/heads.py)."""

from __future__ import annotations

import torch

from kidneyreg.registration.heads import RegressionHead, _grid_moment_sums, _moment_sums


def _brute_force_summary(
    head: RegressionHead, features: torch.Tensor, axes: list[torch.Tensor]
) -> torch.Tensor:
    """The head's statistics with explicit per-voxel coordinates and loops over channels."""
    b, c = features.shape[:2]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    p = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)  # (N, 3) as (x, y, z)
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    out = []
    for i in range(b):
        f = features[i].reshape(c, -1)  # (C, N)
        contrast, pooled, attention = [], [], []
        for ch in range(c):
            d = f[ch] - f[ch].mean()
            spread = d.abs().sum() + 1e-6 * f.shape[1]
            first = [(d * p[:, a]).sum() / spread for a in range(3)]
            second = [(d * p[:, a] * p[:, q]).sum() / spread for a, q in pairs]
            contrast += first + second
        logits = head.attention.weight.reshape(head.attention_maps, c) @ f
        logits = logits + head.attention.bias[:, None]
        for k in range(head.attention_maps):
            w = torch.softmax(logits[k], dim=0)
            pooled += list(f @ w)
            centre = [(w * p[:, a]).sum() for a in range(3)]
            cov = [(w * (p[:, a] - centre[a]) * (p[:, q] - centre[q])).sum() for a, q in pairs]
            attention += centre + cov
        out.append(torch.stack(contrast + pooled + attention + list(f.mean(dim=1))))
    return torch.stack(out)


def test_summary_matches_a_brute_force_evaluation() -> None:
    torch.manual_seed(0)
    head = RegressionHead(3, 6, attention_maps=2).double()
    features = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    axes = [torch.linspace(-1, 1, n, dtype=torch.float64) for n in (4, 5, 6)]
    got = head.summary(features, axes)
    assert got.shape == (2, head.summary_size)
    torch.testing.assert_close(got, _brute_force_summary(head, features, axes))


def test_contrast_moments_follow_a_translated_blob() -> None:
    axes = [torch.linspace(-1, 1, n) for n in (12, 12, 12)]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")

    def blob(cx: float, cy: float, cz: float) -> torch.Tensor:
        r2 = (xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2
        return torch.exp(-r2 / 0.08)[None, None]

    head = RegressionHead(1, 6)
    centred = head.summary(blob(0.0, 0.0, 0.0), axes)[0, :3]
    moved = head.summary(blob(0.3, -0.2, 0.1), axes)[0, :3]
    shift = moved - centred
    assert centred.abs().max() < 1e-5
    assert shift[0] > 0 and shift[1] < 0 and shift[2] > 0
    # linear in the displacement, up to the normalisation
    ratios = shift / torch.tensor([0.3, -0.2, 0.1])
    assert ratios.max() / ratios.min() < 1.2


def test_head_output_is_bounded_and_starts_at_zero() -> None:
    head = RegressionHead(4, 12)
    axes = [torch.linspace(-1, 1, n) for n in (5, 6, 7)]
    features = torch.randn(3, 4, 5, 6, 7)
    assert head(features, axes).abs().max() == 0
    torch.nn.init.normal_(head.out.weight, std=10.0)
    out = head(features, axes)
    assert out.shape == (3, 12) and out.abs().max() <= 1 and out.abs().min() > 0


def test_summary_of_channels_last_features_matches_a_brute_force_evaluation() -> None:
    # The network hands its heads channels-last maps; the moments then read them as a free view.
    torch.manual_seed(1)
    head = RegressionHead(4, 6, attention_maps=3).double()
    features = torch.randn(2, 4, 5, 6, 3, dtype=torch.float64)
    axes = [torch.linspace(-1, 1, n, dtype=torch.float64) + 0.1 for n in (5, 6, 3)]
    channels_last = features.contiguous(memory_format=torch.channels_last_3d)
    got = head.summary(channels_last, axes)
    torch.testing.assert_close(got, _brute_force_summary(head, features, axes))


def test_grid_moment_sums_equal_the_moments_of_a_grid_of_ones() -> None:
    axes = [torch.linspace(-0.7, 1.2, n, dtype=torch.float64) for n in (4, 7, 3)]
    ones = torch.ones(1, 4, 7, 3, 1, dtype=torch.float64)
    torch.testing.assert_close(_grid_moment_sums(*axes), _moment_sums(ones, *axes)[0, 0])


def test_head_gradients_match_finite_differences() -> None:
    torch.manual_seed(2)
    head = RegressionHead(3, 6, attention_maps=2).double()
    torch.nn.init.normal_(head.out.weight)  # the zero-initialised last layer would hide the rest
    features = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    axes = [torch.linspace(-1, 1, n, dtype=torch.float64) for n in (4, 5, 3)]
    assert torch.autograd.gradcheck(lambda f: head(f, axes), (features,))
