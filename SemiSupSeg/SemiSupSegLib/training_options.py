"""Training choices offered in the panel and their translation into job settings.

Plain Python. The names here are the backend's setting names (see its ``TrainConfig``).
"""

import json
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from SemiSupSegLib.protocol import DEVICES, METHODS

# The best-scoring method on the benchmark (docs/benchmarks.md): M&N co-training beats
# supervised training at 8 and 16 labeled cases at the same budget; em and mn+em do not. The
# panel and the Logic read this constant.
DEFAULT_METHOD = "mn"
METHODS_WITH_2D_ENCODER = ("mn", "mn+em")

NETWORKS_3D = ("unet", "segresnet", "swinunetr")
DEFAULT_NETWORK_3D = "unet"
ENCODERS_2D = ("mobilenetv2_100", "resnet18", "resnet50", "convnext_tiny", "mit_b2")
DEFAULT_ENCODER_2D = "mobilenetv2_100"
# The backend's setting that names the timm encoder of the 2D model (method option).
ENCODER_SETTING = "method.encoder"

# Time-budget presets: training iterations (the CPU preset of the backend uses 1500).
PRESETS = {"quick": 300, "standard": 1500, "thorough": 5000}
CUSTOM_PRESET = "custom"
PRESET_NAMES = tuple(PRESETS) + (CUSTOM_PRESET,)
DEFAULT_PRESET = "standard"
# A fast retraining round (Retrain, warm start) starts from the last round's model and runs
# this share of the chosen budget: on the benchmark, 4 corrected cases added to 8, it reaches
# the Dice of training from scratch with mn, mn+em and em, and comes within 0.003 with
# supervised training (docs/benchmarks.md, "Retraining after corrections"). warmStart=False
# trains from scratch: the full budget, no starting model.
RETRAIN_SHARE = 0.2
DEVICE_NAMES = tuple(DEVICES)


class OptionsError(ValueError):
    """A training choice that cannot be turned into a job; the message names it."""


@dataclass
class TrainingOptions:
    method: str = DEFAULT_METHOD
    network: str = DEFAULT_NETWORK_3D
    encoder: str = DEFAULT_ENCODER_2D
    preset: str = DEFAULT_PRESET
    iterations: int = PRESETS[DEFAULT_PRESET]
    device: str = "auto"
    modality: str = "MR"
    extraSettings: Dict[str, Any] = field(default_factory=dict)
    retrainShare: float = RETRAIN_SHARE
    warmStart: bool = True

    def validate(self) -> "TrainingOptions":
        if self.method not in METHODS:
            raise OptionsError(f"method {self.method!r} is not one of {list(METHODS)}")
        if self.device not in DEVICES:
            raise OptionsError(f"device {self.device!r} is not one of {list(DEVICES)}")
        if self.preset not in PRESET_NAMES:
            raise OptionsError(f"preset {self.preset!r} is not one of {list(PRESET_NAMES)}")
        if not self.network.strip():
            raise OptionsError("the 3D network name is empty")
        if self.method in METHODS_WITH_2D_ENCODER and not self.encoder.strip():
            raise OptionsError(f"method {self.method} needs a 2D encoder name")
        if self.totalIterations() < 1:
            raise OptionsError("iterations must be at least 1")
        if not 0.0 < self.retrainShare <= 1.0:
            raise OptionsError(
                f"the retraining share of iterations must be in (0, 1], got {self.retrainShare}"
            )
        return self

    def forRetraining(self) -> "TrainingOptions":
        """The options of a retraining round: warm-started, ``retrainShare`` of the iterations
        (at least one); from scratch (``warmStart`` off), the full budget. Nothing else
        changes."""
        if not self.warmStart:
            return self
        iterations = max(1, int(round(self.totalIterations() * self.retrainShare)))
        return replace(self, preset=CUSTOM_PRESET, iterations=iterations)

    def totalIterations(self) -> int:
        if self.preset in PRESETS:
            return PRESETS[self.preset]
        return int(self.iterations)

    def settings(self) -> Dict[str, Any]:
        """The job's ``settings``: iterations, network, encoder (2D methods), then extras."""
        settings: Dict[str, Any] = {
            "iterations": self.totalIterations(),
            "network": self.network.strip(),
        }
        if self.method in METHODS_WITH_2D_ENCODER:
            settings[ENCODER_SETTING] = self.encoder.strip()
        settings.update(self.extraSettings)
        return settings


def parseExtraSettings(text: str) -> Dict[str, Any]:
    """Parse ``name=value`` pairs separated by commas, semicolons or new lines.

    Values are JSON where they parse as JSON (numbers, true/false, lists), otherwise text:
    ``batch_size=2, checkpoint_every=0, patch_size=[32,32,32]``.
    """
    settings: Dict[str, Any] = {}
    for item in _splitTopLevel(text or ""):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise OptionsError(f"extra setting {item!r}: expected name=value")
        key, raw = item.split("=", 1)
        key, raw = key.strip(), raw.strip()
        if not key:
            raise OptionsError(f"extra setting {item!r}: the name is empty")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        settings[key] = value
    return settings


def _splitTopLevel(text: str) -> List[str]:
    """Split at , ; and new lines that are not inside [] or {}."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        if char in ",;\n" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def describeGpu(probe: Optional[Dict[str, Any]]) -> Tuple[str, bool]:
    """A short text for the detected accelerator and whether a GPU is usable, from a probe."""
    if not probe:
        return "not checked yet", False
    torch = probe.get("torch") or {}
    if not torch.get("installed"):
        return "unknown (torch is not installed in this Python)", False
    devices = torch.get("cuda_devices") or []
    if devices:
        names = ", ".join(f"{d.get('name')} ({d.get('memory_gb', 0):.0f} GB)" for d in devices)
        return f"CUDA: {names}", True
    if torch.get("mps"):
        return "Apple GPU (MPS)", True
    return "no GPU found: training runs on the CPU (slow)", False
