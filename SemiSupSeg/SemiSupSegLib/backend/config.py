"""Training settings: one dataclass, every number a named setting with a CPU-friendly default.

Values are read and checked by ``settings.py``, the rules every method's options follow too: a
field's limits are declared beside it (``checked``), the rest (sizes, pairs) in ``validate``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.settings import (
    OneOf,
    Range,
    check_fields,
    checked,
    setting_value,
    type_hints,
    unknown_setting,
)
from SemiSupSegLib.method_catalogue import DEFAULT_METHOD
from SemiSupSegLib.protocol import MODALITIES, shorten

#: The largest patch side, in voxels: beyond it a batch no longer fits in any memory.
MAX_PATCH_SIZE = 512

AT_LEAST_1 = Range(1)
NOT_NEGATIVE = Range(0)
SHARE = Range(0, 1, high_open=True)  # [0, 1)


@dataclass
class TrainConfig:
    """Settings shared by every method; method-specific ones live in ``method_options``.

    Defaults are the CPU preset: they train the hippocampus demo in minutes on two cores.
    """

    method: str = DEFAULT_METHOD
    network: str = "unet"
    network_options: Dict[str, Any] = field(default_factory=dict)
    feature_channels: int = checked(16, AT_LEAST_1)
    dropout: float = checked(0.0, SHARE)
    iterations: int = checked(1500, AT_LEAST_1)
    batch_size: int = checked(4, AT_LEAST_1)
    patch_size: Tuple[int, int, int] = (32, 48, 32)
    foreground_ratio: float = checked(0.67, Range(0, 1))
    learning_rate: float = checked(3e-3, Range(0, low_open=True))
    weight_decay: float = checked(1e-4, NOT_NEGATIVE)
    warmup_fraction: float = checked(0.02, SHARE)
    # Seeds up to 1000 * seed + iteration must fit 32 bits.
    seed: int = checked(0, Range(0, 2**32 // 1000, high_open=True))
    device: str = "auto"
    mixed_precision: bool = True  # CUDA only: float16 autocast with a gradient scaler
    channels_last: bool = True  # CUDA only: channels-last (3D) memory layout for convolutions
    compile: bool = False  # torch.compile the 3D network(s) in place (checkpoints unchanged)
    modality: str = checked("MR", OneOf(MODALITIES))
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
    augment_rotation: float = checked(0.26, NOT_NEGATIVE)
    augment_scaling: float = checked(0.15, NOT_NEGATIVE)
    augment_noise_std: float = checked(0.1, NOT_NEGATIVE)
    augment_intensity_scale: float = checked(0.15, NOT_NEGATIVE)
    augment_intensity_shift: float = checked(0.1, NOT_NEGATIVE)
    augment_gamma: Tuple[float, float] = (0.7, 1.5)
    # Largest norm of a model's gradient, for stability.
    gradient_clip: float = checked(12.0, Range(0, low_open=True))
    # Prediction (recorded in the model file): share of overlap between neighbouring windows,
    # and windows that go through the network per forward pass.
    sliding_window_overlap: float = checked(0.5, SHARE)
    sliding_window_batch: int = checked(4, AT_LEAST_1)
    cache_volumes: int = checked(64, NOT_NEGATIVE)
    num_workers: int = checked(0, NOT_NEGATIVE)
    prefetch: int = checked(8, NOT_NEGATIVE)
    checkpoint_every: int = checked(250, NOT_NEGATIVE)
    log_every: int = checked(10, AT_LEAST_1)
    # Warm start: share of the labeled patches from cases new to the model, and the weight of
    # the previous model against a fresh initialisation.
    new_case_share: float = checked(0.5, SHARE)
    warm_start_shrink: float = checked(1.0, Range(0, 1, low_open=True))
    # EMA decay of the deployed weights; the model file keeps the average.
    weight_average: float = checked(0.0, Range(0, 1, high_open=True, note="0: off, e.g. 0.99"))
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
        hints = type_hints(TrainConfig)
        if key not in hints:
            raise ConfigError(unknown_setting(key, list(hints)))
        return dataclasses.replace(self, **{key: setting_value(key, value, hints[key])})

    def validate(self) -> TrainConfig:
        """Raise ConfigError for values that cannot work, the method's options included;
        return self for chaining."""
        check_fields(self)
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
        gamma = self.augment_gamma
        if len(gamma) != 2 or not 0.0 < gamma[0] <= gamma[1] < math.inf:
            raise ConfigError(
                f"augment_gamma must be two values low, high with 0 < low <= high, "
                f"got {shorten(str(gamma))}"
            )
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
        # Imported here: the methods build on this module.
        from SemiSupSegLib.backend.methods import method_options

        method_options(self)
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
