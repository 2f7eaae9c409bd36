"""Training settings: one dataclass, every number a named setting with a CPU-friendly default."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.protocol import shorten

#: The largest patch side, in voxels: beyond it a batch no longer fits in any memory.
MAX_PATCH_SIZE = 512


@dataclass
class TrainConfig:
    """Settings shared by every method; method-specific ones live in ``method_options``.

    Defaults are the CPU preset: they train the hippocampus demo in minutes on two cores.
    """

    method: str = "supervised"
    network: str = "unet"
    network_options: Dict[str, Any] = field(default_factory=dict)
    feature_channels: int = 16
    dropout: float = 0.0
    iterations: int = 1500
    batch_size: int = 4
    patch_size: Tuple[int, int, int] = (32, 48, 32)
    foreground_ratio: float = 0.67
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.02
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True  # CUDA only: float16 autocast with a gradient scaler
    channels_last: bool = True  # CUDA only: channels-last (3D) memory layout for convolutions
    compile: bool = False  # torch.compile the 3D network(s) in place (checkpoints unchanged)
    modality: str = "MR"
    ct_window: Tuple[float, float] = (-1000.0, 1000.0)
    # CT, planned: clip to the foreground's (0.5, 99.5) percentiles, z-score with its mean, std
    ct_foreground_stats: Optional[Tuple[float, float, float, float]] = None
    target_spacing: Optional[Tuple[float, float, float]] = None
    augment: bool = True
    flip_axes: Tuple[int, ...] = ()
    # Augmentation ranges (nnU-Net-like, milder): rotation up to +-this many radians (0.26, 15
    # degrees) and scaling up to +-this share about each axis, together in 25% of patches;
    # Gaussian noise of this std (15%), intensity scaling by 1 +- and shifting by +- these
    # (20% each), and gamma (contrast) drawn from this range (15%).
    augment_rotation: float = 0.26
    augment_scaling: float = 0.15
    augment_noise_std: float = 0.1
    augment_intensity_scale: float = 0.15
    augment_intensity_shift: float = 0.1
    augment_gamma: Tuple[float, float] = (0.7, 1.5)
    gradient_clip: float = 12.0  # largest norm of a model's gradient, for stability
    # Prediction (recorded in the model file): share of overlap between neighbouring windows,
    # and windows that go through the network per forward pass.
    sliding_window_overlap: float = 0.5
    sliding_window_batch: int = 4
    cache_volumes: int = 64
    num_workers: int = 0
    prefetch: int = 8
    checkpoint_every: int = 250
    log_every: int = 10
    new_case_share: float = 0.5  # warm start: labeled patches from cases new to the model
    warm_start_shrink: float = 1.0  # warm start: weight of the previous model against a fresh init
    weight_average: float = (
        0.0  # EMA decay of the deployed weights; the model file keeps the average
    )
    method_options: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> TrainConfig:
        """Build a config from names and values, rejecting unknown names with a clear error."""
        config = cls()
        for key, value in values.items():
            config = config.with_setting(key, value)
        return config

    def with_setting(self, key: str, value: Any) -> TrainConfig:
        """A copy with one setting changed; ``method.x`` and ``network.x`` set nested options."""
        if "." in key:
            group, name = key.split(".", 1)
            target = {"method": "method_options", "network": "network_options"}.get(group)
            if target is None:
                raise ConfigError(
                    f"setting {shorten(repr(key))}: unknown group {shorten(repr(group))} "
                    "(use method.* or network.*)"
                )
            options = dict(getattr(self, target))
            options[name] = value
            return dataclasses.replace(self, **{target: options})
        fields = {f.name: f for f in dataclasses.fields(self)}
        if key not in fields:
            raise ConfigError(
                f"unknown setting {shorten(repr(key))}; known settings: {sorted(fields)}"
            )
        current = getattr(self, key)
        try:
            value = _coerce(value, current)
        except (TypeError, ValueError, OverflowError) as err:
            raise ConfigError(
                f"setting {key!r}: {shorten(repr(value))} is not valid ({shorten(str(err))})"
            ) from None
        return dataclasses.replace(self, **{key: value})

    def validate(self) -> TrainConfig:
        """Raise ConfigError for values that cannot work; return self for chaining."""
        for name in ("learning_rate", "weight_decay"):  # the range checks below let NaN pass
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be at least 1, got {self.iterations}")
        for name in ("log_every", "feature_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("seed", "checkpoint_every", "cache_volumes", "num_workers", "prefetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.seed >= 2**32 // 1000:  # seeds up to 1000 * seed + iteration must fit 32 bits
            raise ConfigError(f"seed must be below {2**32 // 1000}, got {self.seed}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be 0 or more, got {self.weight_decay}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if (
            len(self.patch_size) != 3
            or min(self.patch_size) < 8
            or max(self.patch_size) > MAX_PATCH_SIZE
            or any(not float(v).is_integer() for v in self.patch_size)
        ):
            raise ConfigError(
                f"patch_size must be three whole sizes from 8 to {MAX_PATCH_SIZE}, "
                f"got {shorten(str(self.patch_size))}"
            )
        if not 0.0 <= self.foreground_ratio <= 1.0:
            raise ConfigError(f"foreground_ratio must be in [0, 1], got {self.foreground_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.new_case_share < 1.0:
            raise ConfigError(f"new_case_share must be in [0, 1), got {self.new_case_share}")
        if not 0.0 < self.warm_start_shrink <= 1.0:
            raise ConfigError(f"warm_start_shrink must be in (0, 1], got {self.warm_start_shrink}")
        if not 0.0 <= self.weight_average < 1.0:
            raise ConfigError(
                f"weight_average must be in [0, 1) (0: off, e.g. 0.99), got {self.weight_average}"
            )
        for name in (
            "augment_rotation",
            "augment_scaling",
            "augment_noise_std",
            "augment_intensity_scale",
            "augment_intensity_shift",
        ):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        gamma = self.augment_gamma
        if len(gamma) != 2 or not 0.0 < gamma[0] <= gamma[1] < math.inf:
            raise ConfigError(
                f"augment_gamma must be two values low, high with 0 < low <= high, "
                f"got {shorten(str(gamma))}"
            )
        if not 0.0 < self.gradient_clip < math.inf:
            raise ConfigError(f"gradient_clip must be a positive number, got {self.gradient_clip}")
        if not 0.0 <= self.sliding_window_overlap < 1.0:
            raise ConfigError(
                f"sliding_window_overlap must be in [0, 1), got {self.sliding_window_overlap}"
            )
        if self.sliding_window_batch < 1:
            raise ConfigError(
                f"sliding_window_batch must be at least 1, got {self.sliding_window_batch}"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if (
            len(self.ct_window) != 2
            or not -math.inf < self.ct_window[0] < self.ct_window[1] < math.inf
        ):
            raise ConfigError(
                f"ct_window must be two finite values low, high; got {shorten(str(self.ct_window))}"
            )
        if not set(self.flip_axes) <= {0, 1, 2}:
            raise ConfigError(
                f"flip_axes must be among 0, 1, 2 (x, y, z), got {shorten(str(self.flip_axes))}"
            )
        if self.modality not in ("MR", "CT", "other"):
            raise ConfigError(
                f"modality must be MR, CT or other, got {shorten(repr(self.modality))}"
            )
        stats = self.ct_foreground_stats
        if stats is not None and (len(stats) != 4 or stats[0] >= stats[1] or stats[3] <= 0):
            raise ConfigError(
                "ct_foreground_stats must be low, high, mean, std with low < high and std > 0, "
                f"got {shorten(str(stats))}"
            )
        if self.target_spacing is not None and (
            len(self.target_spacing) != 3 or not all(0 < v < math.inf for v in self.target_spacing)
        ):
            raise ConfigError(
                f"target_spacing must be three positive finite sizes in mm, "
                f"got {shorten(str(self.target_spacing))}"
            )
        return self


def parse_setting(text: str) -> Tuple[str, Any]:
    """Parse ``name=value`` from the command line; the value is JSON when it parses as JSON."""
    if "=" not in text:
        raise ConfigError(f"--set expects name=value, got {shorten(repr(text))}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _coerce(value: Any, current: Any) -> Any:
    """Convert ``value`` to the type of the current setting (JSON gives lists for tuples)."""
    if isinstance(value, bool) and not isinstance(current, bool):
        raise ValueError("expected a number, not true or false")
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        return bool(value)
    if isinstance(current, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected a whole number")
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple) or current is None:
        if value is None:
            return None
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v]
        if isinstance(value, (list, tuple)):
            return tuple(float(v) if float(v) != int(float(v)) else int(float(v)) for v in value)
        raise ValueError("expected a list of numbers")
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise ValueError("expected an object")
        return dict(value)
    return str(value)
