"""3D segmentation networks created by name, as timm creates models from a registry.

Every network is a MONAI backbone that ends in ``feature_channels`` channels (the embedding),
followed by a 1x1x1 classifier. The split lets embedding matching read the features before
the last convolution for any backbone, and keeps the methods model-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple, Union

import torch
from torch import nn

from SemiSupSegLib.backend.errors import ConfigError


@dataclass(frozen=True)
class NetworkEntry:
    """A registered backbone builder and the size its input must be divisible by."""

    build: Callable[..., nn.Module]
    divisor: int
    description: str


_REGISTRY: Dict[str, NetworkEntry] = {}


def register_network(name: str, divisor: int, description: str) -> Callable:
    """Decorator: register ``build(in_channels, out_channels, dropout, **options)`` by name."""

    def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = NetworkEntry(build, divisor, description)
        return build

    return wrap


def list_networks() -> List[str]:
    return sorted(_REGISTRY)


def network_divisors(name: str, options: Dict[str, Any]) -> Tuple[int, int, int]:
    """What each patch axis (x, y, z) must be a multiple of: the product of the strides along
    it when the options give per-axis ``strides`` (as a plan does for ``unet``), else the
    network's fixed divisor."""
    strides = options.get("strides")
    if not strides:
        return (_entry(name).divisor,) * 3
    product = [1, 1, 1]
    for stride in strides:
        per_axis = [stride] * 3 if isinstance(stride, int) else list(stride)
        for axis, value in enumerate(reversed(per_axis)):  # strides are (z, y, x)
            product[axis] *= int(value)
    return tuple(product)


def _entry(name: str) -> NetworkEntry:
    key = name.lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown 3D network {name!r}; available: {', '.join(list_networks())}")
    return _REGISTRY[key]


@register_network("unet", divisor=16, description="MONAI residual UNet, 5 levels, InstanceNorm")
def _unet(in_channels: int, out_channels: int, dropout: float, **options: Any) -> nn.Module:
    from monai.networks.nets import UNet

    settings = {
        "channels": (16, 32, 64, 128, 256),
        "strides": (2, 2, 2, 2),
        "num_res_units": 2,
        "norm": "instance",
    }
    settings.update(options)
    return UNet(3, in_channels, out_channels, dropout=dropout, **settings)


@register_network(
    "segresnet", divisor=8, description="MONAI SegResNet (residual encoder, GroupNorm)"
)
def _segresnet(in_channels: int, out_channels: int, dropout: float, **options: Any) -> nn.Module:
    from monai.networks.nets import SegResNet

    settings = {"init_filters": 16}
    settings.update(options)
    return SegResNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        dropout_prob=dropout or None,
        **settings,
    )


@register_network("swinunetr", divisor=32, description="MONAI SwinUNETR (Swin transformer encoder)")
def _swinunetr(in_channels: int, out_channels: int, dropout: float, **options: Any) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    settings = {"feature_size": 24}
    settings.update(options)
    return SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        drop_rate=dropout,
        spatial_dims=3,
        **settings,
    )


class SegmentationNetwork(nn.Module):
    """Backbone -> embedding (normalised, activated) -> 1x1x1 classifier.

    ``forward`` returns logits; ``forward_with_features`` (or ``forward(x, features=True)``, the
    form a DistributedDataParallel wrapper passes through) also returns the embedding that
    embedding matching compares. The name and options are kept so a checkpoint can rebuild it.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int = 1,
        feature_channels: int = 16,
        dropout: float = 0.0,
        **options: Any,
    ) -> None:
        super().__init__()
        entry = _entry(name)
        self.spec = {
            "name": name.lower(),
            "num_classes": num_classes,
            "in_channels": in_channels,
            "feature_channels": feature_channels,
            "dropout": dropout,
            "options": dict(options),
        }
        self.divisor = entry.divisor
        try:
            self.backbone = entry.build(in_channels, feature_channels, dropout, **options)
        except TypeError as err:
            raise ConfigError(f"network {name!r}: bad option ({err})") from None
        self.embedding_norm = nn.InstanceNorm3d(feature_channels, affine=True)
        self.embedding_activation = nn.LeakyReLU(0.01, inplace=True)
        self.classifier = nn.Conv3d(feature_channels, num_classes, kernel_size=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_activation(self.embedding_norm(self.backbone(x)))

    def forward_with_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(x)
        return self.classifier(features), features

    def forward(
        self, x: torch.Tensor, features: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Logits, or (logits, embedding) with ``features=True``."""
        if features:
            return self.forward_with_features(x)
        return self.classifier(self.embed(x))


def create_network(
    name: str,
    num_classes: int,
    in_channels: int = 1,
    feature_channels: int = 16,
    dropout: float = 0.0,
    **options: Any,
) -> SegmentationNetwork:
    """Create a registered 3D network by name (``list_networks()`` shows the names)."""
    return SegmentationNetwork(name, num_classes, in_channels, feature_channels, dropout, **options)


def network_from_spec(spec: Dict[str, Any]) -> SegmentationNetwork:
    """Rebuild a network from the ``spec`` a checkpoint stored."""
    return create_network(
        spec["name"],
        spec["num_classes"],
        spec.get("in_channels", 1),
        spec.get("feature_channels", 16),
        spec.get("dropout", 0.0),
        **spec.get("options", {}),
    )
