"""ULBNet and its per-profile configuration: shapes, the kept time axis, the paper's layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kidneyreg.features.config import FeatureNetConfig, feature_config
from kidneyreg.features.lbc import LocalBinaryConv3d
from kidneyreg.features.ulbnet import (
    ULBNet,
    ct_feature_net,
    model_payload,
    network_from_payload,
    us_feature_net,
)
from kidneyreg.profiles import PROFILES


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("modality", ["ct", "us"])
def test_every_profile_gives_a_valid_configuration(profile: str, modality: str) -> None:
    cfg = feature_config(modality, profile)
    assert cfg.spacing == PROFILES[profile].spacing
    downsampled = cfg.patch_size if modality == "ct" else cfg.patch_size[1:]
    assert all(n % 16 == 0 for n in downsampled)
    if modality == "us":
        assert cfg.window == PROFILES[profile].window == 5
        assert all(s[0] == 1 for s in cfg.strides)
    else:
        assert all(s == (2, 2, 2) for s in cfg.strides)
    # Same field of view as the paper (0.8 mm) to within one 16-voxel block.
    paper = feature_config(modality, "paper")
    for n, n_paper in zip(downsampled, paper.patch_size[-len(downsampled) :], strict=True):
        assert abs(n * cfg.spacing - n_paper * 0.8) <= 8 * cfg.spacing + 1e-6
    assert FeatureNetConfig.from_dict(cfg.to_dict()) == cfg


def test_paper_configuration_matches_the_paper() -> None:
    ct, us = feature_config("ct", "paper"), feature_config("us", "paper")
    assert ct.patch_size == (80, 160, 160)  # 160 x 160 x 80 (x, y, z)
    assert us.patch_size == (5, 192, 256)  # 256 x 192 x 5
    assert ct.widths == (16, 32, 64, 128, 256) and ct.dropout == 0.2
    tiny = feature_config("ct", "tiny")
    assert tiny.patch_size == (16, 48, 48) and tiny.widths == (4, 8, 16, 32, 64)


@pytest.mark.parametrize("profile", ["cpu", "paper"])
@pytest.mark.parametrize("modality", ["ct", "us"])
def test_output_shape_of_big_profiles_on_meta_tensors(profile: str, modality: str) -> None:
    cfg = feature_config(modality, profile)
    net = ULBNet(cfg).to("meta")
    out = net(torch.empty(1, 1, *cfg.patch_size, device="meta"))
    assert out.shape == (1, 1, *cfg.patch_size)


def test_tiny_ct_net_runs_and_outputs_probabilities() -> None:
    torch.manual_seed(0)
    cfg = feature_config("ct", "tiny")
    net = ct_feature_net(cfg).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *cfg.patch_size))
    assert out.shape == (2, 1, *cfg.patch_size)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # Fully convolutional: any size divisible by 16 works.
    with torch.no_grad():
        assert net(torch.rand(1, 1, 32, 32, 64)).shape == (1, 1, 32, 32, 64)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_us_net_never_downsamples_the_time_axis(window: int) -> None:
    cfg = feature_config("us", "tiny", window=window)
    net = us_feature_net(cfg).eval()
    depths: list[int] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: depths.append(int(out.shape[2])))
        for module in [*net.encoders, net.bottom, *net.skips, *net.ups]
    ]
    with torch.no_grad():
        out = net(torch.rand(1, 1, window, 48, 64))
    for hook in hooks:
        hook.remove()
    assert out.shape == (1, 1, window, 48, 64)
    assert depths and all(d == window for d in depths)


def test_layout_has_an_lbc_in_every_skip_and_the_paper_widths() -> None:
    net = ULBNet(feature_config("ct", "paper"))
    assert len(net.skips) == 4 and all(isinstance(s, LocalBinaryConv3d) for s in net.skips)
    assert [s.combine.out_channels for s in net.skips] == [16, 32, 64, 128]
    decoder = [up.conv.out_channels for up in net.ups]  # type: ignore[union-attr]
    assert decoder == [128, 64, 32, 16]
    assert net.bottom.conv[-1].conv.out_channels == 256  # type: ignore[index,union-attr]
    dropouts = [m.p for m in net.modules() if isinstance(m, nn.Dropout | nn.Dropout3d)]
    assert dropouts and all(p == 0.2 for p in dropouts)
    # Anchors differ between levels (one seed per level).
    first, second = net.skips[0].anchors, net.skips[1].anchors
    assert first.shape != second.shape or not torch.equal(first, second)


def test_payload_round_trip_in_half_precision() -> None:
    torch.manual_seed(0)
    net = ULBNet(feature_config("us", "tiny")).eval()
    payload = model_payload(net, half=True)
    assert payload["model"]["skips.0.anchors"].dtype == torch.float16
    restored = network_from_payload(payload, "memory").eval()
    for key, value in net.state_dict().items():
        if key.endswith("anchors"):
            assert torch.equal(restored.state_dict()[key], value)
    x = torch.rand(1, 1, 5, 48, 64)
    with torch.no_grad():
        assert torch.allclose(restored(x), net(x), atol=2e-2)


def test_factories_and_config_reject_wrong_input() -> None:
    with pytest.raises(ValueError, match="CT configuration"):
        ct_feature_net(feature_config("us", "tiny"))
    with pytest.raises(ValueError, match="U/S configuration"):
        us_feature_net(feature_config("ct", "tiny"))
    with pytest.raises(ValueError, match="divisible"):
        FeatureNetConfig("ct", "tiny", 3.2, (20, 48, 48))
    with pytest.raises(ValueError, match="unknown"):
        FeatureNetConfig.from_dict({**feature_config("ct", "tiny").to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="input"):
        ULBNet(feature_config("ct", "tiny"))(torch.zeros(1, 2, 16, 48, 48))
    assert feature_config("us", "tiny").with_window(9).patch_size == (9, 48, 64)
