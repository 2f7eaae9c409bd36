"""A training plan made from the data and the device: spacing, patch, batch, network depth,
intensity normalisation and iterations.

The rules follow nnU-Net's experiment planning (Isensee et al., Nature Methods 2021), with
one rule for every device: the largest patch shaped like the median resampled volume (never
larger) whose training step fits the device's budget. On a GPU the budget is memory, estimated
from the network itself (``memory``); on a CPU (and Apple MPS) it is time, as voxels per
iteration. On such a time-limited device a patch that sees only a small part of each volume
learns little context, so the plan trades resolution for context there: it coarsens the
spacing until the patch spans ``MIN_PATCH_COVERAGE`` of the median volume along each axis
(results are resampled back to each input's grid). Every planned value can be overridden.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.fingerprint import Fingerprint
from SemiSupSegLib.backend.memory import MemoryModel
from SemiSupSegLib.protocol import DEFAULT_BUDGET, TIME_BUDGETS

#: Voxels a CPU trains on per iteration: 4 patches of 32x48x32 trains in about a second per
#: iteration on one or two cores.
CPU_VOXELS_PER_ITERATION = 4 * 32 * 48 * 32
CPU_BATCH = 4
#: GPU batch: at least nnU-Net's 2; more only while the batch is under 5% of the data's voxels.
MIN_GPU_BATCH = 2
MAX_BATCH_SHARE = 0.05
#: Share of the device's memory the plan may use (the rest: CUDA context, cuDNN, fragments).
MEMORY_SHARE = 0.75
#: Time-limited devices: the patch should span this share of the median volume per axis.
MIN_PATCH_COVERAGE = 0.55
MAX_COARSENING = 4.0
#: nnU-Net's rule for anisotropic data: beyond this ratio the coarse axis keeps a coarse spacing.
ANISOTROPY_RATIO = 3.0
#: Down-sample each axis while the bottleneck keeps at least this many voxels.
MIN_BOTTLENECK = 4
MAX_POOLS = 5
BASE_CHANNELS = 16
MAX_CHANNELS = 320
MIN_PATCH = 8


@dataclass(frozen=True)
class DeviceBudget:
    """What limits a training step on a device: memory (GPU) or time (CPU, MPS)."""

    kind: str
    memory_bytes: Optional[int] = None
    voxels_per_iteration: Optional[int] = None

    @property
    def time_limited(self) -> bool:
        return self.voxels_per_iteration is not None


def device_budget(device: torch.device) -> DeviceBudget:
    """The budget of ``device``: CUDA's memory, else the CPU's voxels per iteration."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return DeviceBudget("cuda", memory_bytes=int(total))
    if device.type == "mps":
        return DeviceBudget("mps", voxels_per_iteration=4 * CPU_VOXELS_PER_ITERATION)
    return DeviceBudget("cpu", voxels_per_iteration=CPU_VOXELS_PER_ITERATION)


@dataclass
class Plan:
    """Planned settings (``TrainConfig`` names), why each was chosen, and what the user set."""

    values: Dict[str, Any]
    reasons: Dict[str, str]
    device: str
    budget: str
    estimated_memory_gib: float
    fingerprint: Dict[str, Any] = field(default_factory=dict)
    overrides: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def rows(self) -> List[Tuple[str, str, str]]:
        """(setting, value, source) per planned or overridden setting, for display."""
        rows = []
        for name, value in self.values.items():
            if name in self.overrides:
                rows.append((name, _show(self.overrides[name]), "set by you"))
            else:
                rows.append((name, _show(value), self.reasons.get(name, "planned")))
        return rows

    def table(self) -> str:
        """The plan as a short text table, printed before training starts."""
        rows = self.rows()
        width = max(len(r[0]) for r in rows)
        shown = max(len(r[1]) for r in rows)
        lines = [
            f"plan for {self.device} ({self.budget} budget, about "
            f"{self.estimated_memory_gib:.1f} GiB per training step):"
        ]
        lines += [f"  {n:<{width}}  {v:<{shown}}  {s}" for n, v, s in rows]
        return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return "x".join(f"{v:g}" for v in value)
    if isinstance(value, dict) and "strides" in value:
        return f"{len(value['strides'])} down-samplings, channels {value['channels'][-1]} deep"
    return str(value)


def target_spacing(fingerprint: Fingerprint) -> Tuple[float, float, float]:
    """The median spacing; on strongly anisotropic data the coarse axis takes the 10th
    percentile of its spacings instead (nnU-Net), so thin-slice cases are not thrown away."""
    median = np.array(fingerprint.median_spacing)
    coarse = int(np.argmax(median))
    if median[coarse] > ANISOTROPY_RATIO * np.min(median):
        median[coarse] = fingerprint.spacing_percentile(10)[coarse]
    return tuple(float(v) for v in median)


def pools_per_axis(patch: Sequence[int]) -> Tuple[int, int, int]:
    """Down-samplings per axis that keep the bottleneck at least ``MIN_BOTTLENECK`` voxels."""
    return tuple(
        min(MAX_POOLS, max(0, int(math.floor(math.log2(max(s, 1) / MIN_BOTTLENECK)))))
        for s in patch
    )


def unet_options(patch: Sequence[int]) -> Dict[str, Any]:
    """MONAI UNet channels and per-level (z, y, x) strides for a patch given in (x, y, z)."""
    pools = pools_per_axis(patch)
    levels = max(pools)
    strides = [[2 if level < pools[axis] else 1 for axis in (2, 1, 0)] for level in range(levels)]
    channels = [min(MAX_CHANNELS, BASE_CHANNELS * 2**level) for level in range(levels + 1)]
    return {"channels": channels, "strides": strides}


def fit_patch(shape: Sequence[float], voxels: float, divisors_of: Any) -> Tuple[int, int, int]:
    """The largest patch shaped like ``shape`` with about ``voxels`` voxels, never larger
    than ``shape`` along any axis, each axis the nearest multiple of what the network needs
    (which can add a few percent; ``shrink_patch`` removes them where memory is the limit)."""
    shape = np.maximum(np.array(shape, dtype=float), MIN_PATCH)
    scale = min(1.0, (voxels / float(np.prod(shape))) ** (1 / 3))
    raw = shape * scale
    for _ in range(3):  # axes clipped at the volume's size leave room for the others
        room = voxels / float(np.prod(raw))
        grow = [i for i in range(3) if raw[i] < shape[i] - 1e-6]
        if room <= 1.0001 or not grow:
            break
        factor = room ** (1 / len(grow))
        for i in grow:
            raw[i] = min(shape[i], raw[i] * factor)
    patch = []
    divisors = divisors_of(raw)
    for size, divisor, limit in zip(raw, divisors, shape):
        rounded = max(divisor, int(round(size / divisor)) * divisor)
        while rounded > max(limit, divisor):
            rounded -= divisor
        patch.append(max(MIN_PATCH, rounded))
    return tuple(patch)


def shrink_patch(patch: Sequence[int], voxels: float, divisors_of: Any) -> Tuple[int, int, int]:
    """``patch`` cut down, a network multiple of its longest axis at a time, to at most
    ``voxels`` voxels: ``fit_patch`` rounds each axis to the nearest multiple, which can add
    a few percent, too many where memory is the limit."""
    patch = list(patch)
    divisors = divisors_of(patch)
    while float(np.prod(patch)) > voxels:
        axes = [i for i in range(3) if patch[i] - divisors[i] >= max(MIN_PATCH, divisors[i])]
        if not axes:
            break
        longest = max(axes, key=lambda i: patch[i])
        patch[longest] -= divisors[longest]
    return tuple(patch)


def make_plan(
    fingerprint: Fingerprint,
    budget: DeviceBudget,
    network: str = "unet",
    patches_per_step: float = 2.0,
    time_budget: str = DEFAULT_BUDGET,
    memory: Optional[MemoryModel] = None,
    min_coverage: float = MIN_PATCH_COVERAGE,
    spacing: Optional[Sequence[float]] = None,
) -> Plan:
    """Plan spacing, patch, batch, network depth, normalisation and iterations.

    Args:
        fingerprint: the dataset's fingerprint.
        budget: what limits the device (``device_budget``).
        network: the 3D network's registered name; only ``unet``'s depth is planned.
        patches_per_step: the most patches per batch size a training step of the method keeps
            activations of (``Method.peak_patches_per_step``: 2 where unlabeled patches come on
            top of a labeled batch).
        time_budget: quick, standard or thorough.
        memory: the network's memory model (``memory.measure``); needed on memory-limited
            devices, the table's estimate otherwise.
        min_coverage: time-limited devices coarsen the spacing until the patch spans this share
            of the median volume per axis.
        spacing: a spacing the user chose; the patch and network are planned for it.

    Raises:
        ConfigError: an unknown time budget.
    """
    from SemiSupSegLib.backend.networks import network_divisors

    if time_budget not in TIME_BUDGETS:
        raise ConfigError(f"unknown budget {time_budget!r}; use {', '.join(TIME_BUDGETS)}")
    reasons: Dict[str, str] = {}
    chosen = spacing is not None
    spacing = np.array(spacing if chosen else target_spacing(fingerprint), dtype=float)
    reasons["target_spacing"] = "median spacing of the cases"
    median_mm = np.array(fingerprint.median_size_mm)

    def divisors_of(patch: Sequence[float]) -> Tuple[int, int, int]:
        planned = unet_options([int(round(s)) for s in patch]) if network == "unet" else {}
        return network_divisors(network, planned)

    if budget.time_limited:
        batch = CPU_BATCH
        patch_voxels = budget.voxels_per_iteration / batch
        shape = median_mm / spacing
        coverage = min(1.0, (patch_voxels / float(np.prod(np.maximum(shape, 1)))) ** (1 / 3))
        if coverage < min_coverage and not chosen:
            factor = min(MAX_COARSENING, min_coverage / coverage)
            spacing = spacing * factor
            reasons["target_spacing"] = (
                f"median spacing x {factor:.2f}: on {budget.kind} a patch at the median spacing "
                f"spans {coverage:.0%} of a volume per axis (target {min_coverage:.0%}); "
                "results are resampled back"
            )
        shape = median_mm / spacing
        patch = fit_patch(shape, patch_voxels, divisors_of)
        reasons["batch_size"] = f"{budget.kind}: fixed, time per iteration is the limit"
        reasons["patch_size"] = (
            f"shaped like the median volume ({'x'.join(f'{s:.0f}' for s in shape)}), "
            f"{patch_voxels * batch / 1e3:.0f}k voxels per iteration"
        )
    else:
        if memory is None:
            raise ConfigError("planning for a GPU needs the network's memory model")
        shape = median_mm / spacing
        usable = MEMORY_SHARE * budget.memory_bytes - memory.state_bytes
        per_patch_voxel = memory.training_bytes(1, patches_per_step, True) - memory.state_bytes
        batch = MIN_GPU_BATCH
        voxels = usable / (per_patch_voxel * batch)
        patch = shrink_patch(fit_patch(shape, voxels, divisors_of), voxels, divisors_of)
        dataset_voxels = float(np.prod(shape)) * len(fingerprint.sizes)
        while (
            per_patch_voxel * float(np.prod(patch)) * (batch + 1) <= usable
            and float(np.prod(patch)) * (batch + 1) <= MAX_BATCH_SHARE * dataset_voxels
        ):
            batch += 1
        reasons["batch_size"] = (
            f"at least {MIN_GPU_BATCH}, more while memory and 5% of the data's voxels allow"
        )
        reasons["patch_size"] = (
            f"largest patch shaped like the median volume "
            f"({'x'.join(f'{s:.0f}' for s in shape)}) in {MEMORY_SHARE:.0%} of the GPU's memory"
        )
    values: Dict[str, Any] = {
        "target_spacing": [round(float(s), 4) for s in spacing],
        "patch_size": list(patch),
        "batch_size": int(batch),
    }
    if network == "unet":
        values["network_options"] = unet_options(patch)
        reasons["network_options"] = (
            f"down-sample each axis while the bottleneck keeps {MIN_BOTTLENECK}+ voxels"
        )
    values.update(_normalisation(fingerprint, reasons))
    values["iterations"] = TIME_BUDGETS[time_budget]["time" if budget.time_limited else "memory"]
    reasons["iterations"] = f"{time_budget} budget on {budget.kind}"
    estimate = 0.0
    if memory is not None:
        patches = batch * patches_per_step
        mixed = not budget.time_limited
        estimate = memory.training_bytes(int(np.prod(patch)), patches, mixed) / 2**30
    return Plan(
        values=values,
        reasons=reasons,
        device=budget.kind,
        budget=time_budget,
        estimated_memory_gib=estimate,
        fingerprint=fingerprint.to_dict(),
    )


def _normalisation(fingerprint: Fingerprint, reasons: Dict[str, str]) -> Dict[str, Any]:
    """CT: clip to the foreground's 0.5-99.5 percentiles, z-score with its mean and std; MR and
    other: z-score each volume."""
    stats = fingerprint.foreground_intensity
    if fingerprint.modality == "CT" and stats:
        reasons["ct_foreground_stats"] = "CT: clip to the foreground's 0.5-99.5%, then z-score"
        return {
            "ct_foreground_stats": [
                round(stats["percentile_00_5"], 3),
                round(stats["percentile_99_5"], 3),
                round(stats["mean"], 3),
                round(max(stats["std"], 1e-6), 3),
            ]
        }
    return {}


#: The settings a plan chooses; any of them given explicitly wins and is shown as such.
PLANNED_SETTINGS = (
    "target_spacing",
    "patch_size",
    "batch_size",
    "network_options",
    "iterations",
    "ct_foreground_stats",
)


def plan_training(
    dataset: Any,
    base: Dict[str, Any],
    explicit: Dict[str, Any],
    events: Any,
    time_budget: str = DEFAULT_BUDGET,
) -> Tuple[Any, Plan]:
    """Fingerprint ``dataset``, plan for the device, and build the training settings.

    Args:
        dataset: the ``Dataset`` to train on.
        base: settings that are not the user's choice (method, device, the data's modality).
        explicit: settings the user gave (command-line options, ``--set``, a job's settings);
            they override planned values, and the plan lists them as overrides.
        events: the ``EventSink`` that gets the ``plan`` event and the table.
        time_budget: quick, standard or thorough.

    Returns:
        The validated ``TrainConfig`` and the ``Plan``.

    Raises:
        ConfigError, DataError: bad settings, or a file whose header cannot be read.
    """
    from SemiSupSegLib.backend.config import TrainConfig
    from SemiSupSegLib.backend.device import select_device
    from SemiSupSegLib.backend.fingerprint import fingerprint_dataset
    from SemiSupSegLib.backend.memory import measure
    from SemiSupSegLib.backend.methods import method_class, method_options
    from SemiSupSegLib.backend.networks import create_network, network_divisors

    requested = TrainConfig.from_dict({**base, **explicit})
    budget = device_budget(select_device(requested.device))
    fingerprint = fingerprint_dataset(dataset, seed=requested.seed)
    num_classes = max(dataset.classes) + 1 if dataset.classes else 2
    network = create_network(requested.network, num_classes, dropout=requested.dropout)
    probe = tuple(2 * d for d in network_divisors(requested.network, {}))
    plan = make_plan(
        fingerprint,
        budget,
        network=requested.network,
        patches_per_step=method_class(requested.method).peak_patches_per_step(
            method_options(requested)
        ),
        time_budget=time_budget,
        memory=measure(network, probe),
        spacing=requested.target_spacing,
    )
    plan.overrides = {
        name: TrainConfig.from_dict({name: explicit[name]}).to_dict()[name]
        for name in PLANNED_SETTINGS
        if name in explicit
    }
    config = TrainConfig.from_dict({**base, **plan.values, **explicit}).validate()
    events.emit("plan", stage="planning", message=plan.table(), plan=plan.to_dict())
    return config, plan
