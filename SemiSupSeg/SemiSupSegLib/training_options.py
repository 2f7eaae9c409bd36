"""Training choices offered in the panel and their translation into job settings.

Plain Python. The names here are the backend's setting names (see its ``TrainConfig``).
"""

import json
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from SemiSupSegLib.method_catalogue import (
    DEFAULT_METHOD,
    ENCODER_OPTION,
    method_info,
    method_names,
    methods,
)
from SemiSupSegLib.protocol import DEFAULT_BUDGET, DEVICES, TIME_BUDGETS

NETWORKS_3D = ("unet", "segresnet", "swinunetr")
DEFAULT_NETWORK_3D = "unet"
# The backend's setting that names the timm encoder of a method's 2D model, and the encoder
# the panel proposes: the default of the methods that have one.
ENCODER_SETTING = f"method.{ENCODER_OPTION}"
DEFAULT_ENCODER_2D = next(m.option(ENCODER_OPTION).default for m in methods() if m.needs_2d_encoder)

# Time-budget presets: the protocol's budgets (the backend picks their iterations for the
# device it trains on), or a custom number of iterations.
CUSTOM_PRESET = "custom"
PRESET_NAMES = tuple(TIME_BUDGETS) + (CUSTOM_PRESET,)
DEFAULT_PRESET = DEFAULT_BUDGET
# Which of a budget's iterations a device runs: "time" on a CPU or Apple MPS (time-limited),
# "memory" on a CUDA GPU (memory-limited); keys of each ``TIME_BUDGETS`` entry.
TIME_LIMITED, MEMORY_LIMITED = "time", "memory"
DEFAULT_ITERATIONS = TIME_BUDGETS[DEFAULT_PRESET][TIME_LIMITED]
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
    """The panel's training choices.

    ``preset`` names a time budget (sent as the job's ``budget``: the backend runs its
    iterations for the device it trains on) or is ``custom`` (``iterations`` is sent).
    ``budgetLimit`` is what limits the device the panel detected (``budgetLimitOf``): it picks
    the budget's iterations the panel shows and a retraining round's share is taken of.
    ``retraining`` marks a warm-started retraining round (``forRetraining``).
    """

    method: str = DEFAULT_METHOD
    network: str = DEFAULT_NETWORK_3D
    encoder: str = DEFAULT_ENCODER_2D
    preset: str = DEFAULT_PRESET
    iterations: int = DEFAULT_ITERATIONS
    device: str = "auto"
    modality: str = "MR"
    extraSettings: Dict[str, Any] = field(default_factory=dict)
    retrainShare: float = RETRAIN_SHARE
    warmStart: bool = True
    budgetLimit: str = TIME_LIMITED
    retraining: bool = False

    def validate(self) -> "TrainingOptions":
        if self.method not in method_names():
            raise OptionsError(f"method {self.method!r} is not one of {list(method_names())}")
        if self.device not in DEVICES:
            raise OptionsError(f"device {self.device!r} is not one of {list(DEVICES)}")
        if self.preset not in PRESET_NAMES:
            raise OptionsError(f"preset {self.preset!r} is not one of {list(PRESET_NAMES)}")
        if self.budgetLimit not in (TIME_LIMITED, MEMORY_LIMITED):
            raise OptionsError(
                f"budget limit {self.budgetLimit!r} is not {TIME_LIMITED!r} or {MEMORY_LIMITED!r}"
            )
        if not self.network.strip():
            raise OptionsError("the 3D network name is empty")
        if needsEncoder(self.method) and not self.encoder.strip():
            raise OptionsError(f"method {self.method} needs a 2D encoder name")
        if self.totalIterations() < 1:
            raise OptionsError("iterations must be at least 1")
        if not 0.0 < self.retrainShare <= 1.0:
            raise OptionsError(
                f"the retraining share of iterations must be in (0, 1], got {self.retrainShare}"
            )
        return self

    def forRetraining(self) -> "TrainingOptions":
        """The options of a retraining round: warm-started, ``retrainShare`` of the budget's
        iterations on the detected device (at least one), sent explicitly; from scratch
        (``warmStart`` off), the full budget. Nothing else changes."""
        if not self.warmStart:
            return self
        return replace(self, retraining=True)

    @property
    def budget(self) -> str:
        """The job's ``budget``: the named preset, else the protocol's default (explicit
        iterations win over it)."""
        return self.preset if self.preset in TIME_BUDGETS else DEFAULT_BUDGET

    def totalIterations(self) -> int:
        """The iterations this round runs: a named budget's on the detected device (what the
        panel shows), the custom number, or a retraining round's share of either."""
        if self.preset in TIME_BUDGETS:
            iterations = TIME_BUDGETS[self.preset][self.budgetLimit]
        else:
            iterations = int(self.iterations)
        if self.retraining:
            return max(1, int(round(iterations * self.retrainShare)))
        return iterations

    def settings(self) -> Dict[str, Any]:
        """The job's ``settings``: iterations (custom budget or a retraining round; a named
        budget is the job's ``budget``), network, encoder (2D methods), then extras."""
        settings: Dict[str, Any] = {}
        if self.preset == CUSTOM_PRESET or self.retraining:
            settings["iterations"] = self.totalIterations()
        settings["network"] = self.network.strip()
        if needsEncoder(self.method):
            settings[ENCODER_SETTING] = self.encoder.strip()
        settings.update(self.extraSettings)
        return settings


def needsEncoder(method: str) -> bool:
    """Whether ``method`` co-trains a 2D model, whose encoder the panel names."""
    info = method_info(method)
    return info is not None and info.needs_2d_encoder


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


def describeBudgets() -> str:
    """The time budgets' iterations on each kind of device, for the preset's tool tip."""
    names = "/".join(TIME_BUDGETS)
    time = " / ".join(str(b[TIME_LIMITED]) for b in TIME_BUDGETS.values())
    memory = " / ".join(str(b[MEMORY_LIMITED]) for b in TIME_BUDGETS.values())
    return (
        f"{names}: {time} iterations on a CPU or Apple GPU, {memory} on a CUDA GPU (the "
        f"backend plans the rest from the data); {CUSTOM_PRESET}: set the number."
    )


def budgetLimitOf(probe: Optional[Dict[str, Any]], device: str) -> str:
    """What will limit training, from the dependency probe and the device choice: memory on a
    CUDA GPU the probe found (device auto or cuda), else time (CPU, Apple MPS, not probed)."""
    if device in ("auto", "cuda") and _cudaDevices(probe):
        return MEMORY_LIMITED
    return TIME_LIMITED


def _cudaDevices(probe: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    torch = (probe or {}).get("torch") or {}
    return list(torch.get("cuda_devices") or []) if torch.get("installed") else []


def describeGpu(probe: Optional[Dict[str, Any]]) -> Tuple[str, bool]:
    """A short text for the detected accelerator and whether a GPU is usable, from a probe."""
    if not probe:
        return "not checked yet", False
    torch = probe.get("torch") or {}
    if not torch.get("installed"):
        return "unknown (torch is not installed in this Python)", False
    devices = _cudaDevices(probe)
    if devices:
        names = ", ".join(f"{d.get('name')} ({d.get('memory_gb', 0):.0f} GB)" for d in devices)
        return f"CUDA: {names}", True
    if torch.get("mps"):
        return "Apple GPU (MPS)", True
    return "no GPU found: training runs on the CPU (slow)", False
