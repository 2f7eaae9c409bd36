"""The interface every training method implements, and the pieces they share."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
from monai.losses import DiceCELoss
from monai.optimizers import WarmupCosineSchedule
from torch import nn

from SemiSupSegLib.backend import distributed
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.networks import SegmentationNetwork, create_network

_REGISTRY: Dict[str, Type[Method]] = {}


def register_method(name: str) -> Callable[[Type[Method]], Type[Method]]:
    """Class decorator: make a method available to ``create_method(name, ...)``."""

    def wrap(cls: Type[Method]) -> Type[Method]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_methods() -> list:
    return sorted(_REGISTRY)


def method_class(name: str) -> Type[Method]:
    """The registered class of method ``name`` (its capabilities, without building it)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return _REGISTRY[name]


def create_method(config: TrainConfig, num_classes: int, device: torch.device) -> Method:
    """Instantiate the method ``config.method`` names."""
    cls = method_class(config.method)
    return cls(config, num_classes, device)


@dataclass
class StepResult:
    """What one training step reports: named losses (floats) and other facts for progress.

    Numeric ``info`` values go to the progress event's ``metrics`` (e.g. the labeled and
    unlabeled counts of the batch, the share of reliable voxels); ``info["message"]`` (text)
    becomes its message (e.g. which model is learning).
    """

    losses: Dict[str, float]
    info: Dict[str, Any] = field(default_factory=dict)


def _same_layout(state: Any, reference: Dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds the same tensors, by name and shape, as ``reference``."""
    return (
        isinstance(state, dict)
        and state.keys() == reference.keys()
        and all(getattr(state[k], "shape", None) == v.shape for k, v in reference.items())
    )


class Method:
    """A training method. The shared loop asks it, per iteration, how many labeled and
    unlabeled patches it wants, hands it those, and checkpoints its ``state_dict``."""

    name = "base"
    uses_unlabeled = False

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device) -> None:
        self.config = config
        self.num_classes = num_classes
        self.device = device
        self.use_amp = bool(config.mixed_precision and device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self._synced: Dict[int, nn.Module] = {}

    # --- what the loop calls
    def batch_composition(self, iteration: int) -> Tuple[int, int]:
        """(labeled, unlabeled) patches wanted at ``iteration``."""
        return self.config.batch_size, 0

    def stage(self, iteration: int) -> str:
        return "training"

    def train_step(
        self,
        labeled: Dict[str, torch.Tensor],
        unlabeled: Optional[Dict[str, torch.Tensor]],
        iteration: int,
    ) -> StepResult:
        raise NotImplementedError

    def deploy_network(self) -> SegmentationNetwork:
        """The 3D network that ``predict`` uses."""
        raise NotImplementedError

    def stateful(self) -> Dict[str, Any]:
        """What a checkpoint holds, by name: networks, optimisers, schedules, the AMP scaler
        (anything with ``state_dict``/``load_state_dict``)."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {name: part.state_dict() for name, part in self.stateful().items()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, part in self.stateful().items():
            part.load_state_dict(state[name])

    def companions(self) -> Dict[str, nn.Module]:
        """Trained networks besides the deployed one that a warm start should also resume
        (by their ``stateful`` name), e.g. the 2D partner of a co-training method."""
        return {}

    def warm_start(
        self,
        network_state: Dict[str, torch.Tensor],
        previous_state: Optional[Dict[str, Any]] = None,
    ) -> List[str]:
        """Start from a previous round's deployed weights (retraining after corrections), and
        the ``companions`` from ``previous_state`` (that round's ``state_dict``) where it has
        them. Returns the companions it did not have, which keep their fresh start."""
        self.deploy_network().load_state_dict(network_state)
        missing = []
        for name, network in self.companions().items():
            state = (previous_state or {}).get(name)
            if _same_layout(state, network.state_dict()):
                network.load_state_dict(state)
            else:  # absent, or another architecture (e.g. another 2D encoder)
                missing.append(name)
        return missing

    def distribute(self) -> None:
        """Prepare data-parallel training under torchrun: every network in ``stateful`` with
        trainable parameters gets a DistributedDataParallel wrapper (EMA teachers, whose
        parameters are frozen, do not). The plain modules stay what checkpoints, teachers and
        ``deploy_network`` use; training forwards go through ``synced``. No-op in one process.
        Call after loading weights: the wrappers start every rank from rank 0's."""
        self._synced = {}
        for part in self.stateful().values():
            if isinstance(part, nn.Module) and any(p.requires_grad for p in part.parameters()):
                # A SegmentationNetwork uses every parameter in every forward; other models
                # may not (timm feature encoders run stages whose output they do not return).
                unused = not isinstance(part, SegmentationNetwork)
                self._synced[id(part)] = distributed.replicate(part, self.device, unused)

    def share_buffers(self) -> None:
        """Every rank takes rank 0's buffers (BatchNorm statistics) of every network, so all
        replicas end identical; no-op in one process."""
        distributed.share_buffers(p for p in self.stateful().values() if isinstance(p, nn.Module))

    def synced(self, network: nn.Module) -> nn.Module:
        """What a training forward of ``network`` calls: its DistributedDataParallel wrapper
        under torchrun (the backward that follows averages gradients across ranks), else
        ``network`` itself. Forwards without gradients (teachers) may use ``network``."""
        return self._synced.get(id(network), network)

    # --- shared helpers
    def build_network(self, dropout: Optional[float] = None) -> SegmentationNetwork:
        c = self.config
        network = create_network(
            c.network,
            self.num_classes,
            feature_channels=c.feature_channels,
            dropout=c.dropout if dropout is None else dropout,
            **c.network_options,
        )
        network = network.to(self.device)
        if c.channels_last and self.device.type == "cuda":
            network = network.to(memory_format=torch.channels_last_3d)
        if c.compile:
            network.compile()  # in place: parameter names, and so checkpoints, stay the same
        return network

    def build_optimizer(
        self, module: nn.Module, learning_rate: Optional[float] = None, total: Optional[int] = None
    ) -> Tuple[torch.optim.Optimizer, WarmupCosineSchedule]:
        """AdamW with a linear warm-up and one cosine cycle down to zero."""
        c = self.config
        optimizer = torch.optim.AdamW(
            module.parameters(), lr=learning_rate or c.learning_rate, weight_decay=c.weight_decay
        )
        total = total or c.iterations
        schedule = WarmupCosineSchedule(
            optimizer, warmup_steps=max(1, int(c.warmup_fraction * total)), t_total=total
        )
        return optimizer, schedule

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.use_amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def optimise(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule: Any = None
    ) -> None:
        """Backward, (scaled) step, schedule step; gradients are clipped to ``gradient_clip``."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.config.gradient_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        if schedule is not None:
            schedule.step()


def segmentation_loss() -> DiceCELoss:
    """Dice + cross-entropy; integer labels (N,1,...) or soft targets (N,C,...) alike."""
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=True)


def soft_segmentation_loss() -> DiceCELoss:
    """Dice + cross-entropy against soft pseudo-masks (probabilities, N,C,...)."""
    return DiceCELoss(softmax=True, batch=True)
