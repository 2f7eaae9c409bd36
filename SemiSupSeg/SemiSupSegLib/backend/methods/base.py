"""The interface every training method implements, the registry of methods by name, and the
pieces they share.

A method is one file: a ``Method`` subclass decorated with ``register_method``, and its options,
a frozen dataclass whose fields are ``option``-s (default = the CPU preset's value, what it does,
the published value, its limits). The built-in methods are also written down, for the Slicer
side, in ``SemiSupSegLib/method_catalogue.py``, which a test checks this registry against; a
method registered anywhere else (a plugin) is added to that catalogue by ``register_method``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
from monai.losses import DiceCELoss
from monai.optimizers import WarmupCosineSchedule
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from SemiSupSegLib import method_catalogue
from SemiSupSegLib.backend import distributed
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.networks import SegmentationNetwork, create_network
from SemiSupSegLib.backend.settings import CHECK, Check, settings_from
from SemiSupSegLib.method_catalogue import AS_PUBLISHED, MethodInfo, OptionInfo

_REGISTRY: Dict[str, Type[Method]] = {}


def option(
    default: Any, help: str, published: str = AS_PUBLISHED, check: Optional[Check] = None
) -> Any:
    """A field of a method's options dataclass.

    Args:
        default: the value on the CPU preset, what a run uses unless told otherwise.
        help: what the option does (the catalogue's and ``semisupseg methods``' text).
        published: the value of the method's paper or reference code: ``AS_PUBLISHED`` when it
            is the default, ``NOT_PUBLISHED`` when none is recorded.
        check: the limits of its values (``settings.Range``, ``settings.OneOf``), if any.
    """
    return field(default=default, metadata={"help": help, "published": published, CHECK: check})


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""


def register_method(
    name: str,
    options: type = NoOptions,
    uses_unlabeled: bool = False,
    needs_2d_encoder: bool = False,
) -> Callable[[Type[Method]], Type[Method]]:
    """Class decorator: make a method available to ``create_method`` as ``name``.

    Args:
        name: the ``--method`` / job ``method`` name.
        options: the frozen dataclass of its ``method.*`` settings, every field an ``option``.
        uses_unlabeled: it learns from unlabeled images too (it gets unlabeled patches; a run
            without unlabeled images is refused).
        needs_2d_encoder: it co-trains a 2D model whose timm encoder its option ``encoder``
            names (the panel's 2D encoder field sets it).

    Raises:
        TypeError: ``options`` is not a frozen dataclass of documented ``option`` fields with
            defaults, a method with a 2D model has no ``encoder`` option, or ``name`` is taken
            by another class.
    """

    def wrap(cls: Type[Method]) -> Type[Method]:
        _check_options(name, options, needs_2d_encoder)
        taken = _REGISTRY.get(name)
        if taken is not None and _qualified(taken) != _qualified(cls):
            raise TypeError(f"method {name!r} is already registered by {_qualified(taken)}")
        cls.name = name
        cls.options_class = options
        cls.uses_unlabeled = uses_unlabeled
        cls.needs_2d_encoder = needs_2d_encoder
        _REGISTRY[name] = cls
        if not method_catalogue.is_built_in(name):
            method_catalogue.add(describe_method(cls))
        return cls

    return wrap


def describe_method(cls: Type[Method]) -> MethodInfo:
    """The catalogue's entry for the registered class ``cls``; its description is the first
    line of the class's docstring."""
    options = tuple(
        OptionInfo(f.name, f.default, f.metadata["help"], f.metadata["published"])
        for f in dataclasses.fields(cls.options_class)
    )
    description = (cls.__doc__ or cls.name).strip().splitlines()[0]
    return MethodInfo(cls.name, description, cls.uses_unlabeled, cls.needs_2d_encoder, options)


def _check_options(name: str, options: type, needs_2d_encoder: bool) -> None:
    if not dataclasses.is_dataclass(options) or not options.__dataclass_params__.frozen:
        raise TypeError(f"method {name!r}: options must be a frozen dataclass, not {options!r}")
    for f in dataclasses.fields(options):
        if f.default is dataclasses.MISSING or "help" not in f.metadata:
            raise TypeError(
                f"method {name!r}: option {f.name!r} must be declared with option(default, help)"
            )
    names = {f.name for f in dataclasses.fields(options)}
    if needs_2d_encoder and method_catalogue.ENCODER_OPTION not in names:
        raise TypeError(
            f"method {name!r} has a 2D model but no {method_catalogue.ENCODER_OPTION!r} option"
        )


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def list_methods() -> list:
    return sorted(_REGISTRY)


def method_class(name: str) -> Type[Method]:
    """The registered class of method ``name`` (its capabilities, without building it)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return _REGISTRY[name]


def method_options(config: TrainConfig) -> Any:
    """The options of ``config.method``: its ``method_options`` over the defaults, typed and
    checked. Raises ConfigError naming an unknown method, an unknown option or a bad value."""
    return _options(method_class(config.method), config)


def _options(cls: Type[Method], config: TrainConfig) -> Any:
    owner = f"method {cls.name!r}"
    return settings_from(cls.options_class, config.method_options, "method.", owner)


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


def advance_schedule(schedule: LRScheduler, steps: int) -> None:
    """Step ``schedule`` (freshly built) until it has taken ``steps`` steps, setting its
    optimiser's learning rate as the schedule would have then."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "step() before optimizer.step()": nothing trains here
        for _ in range(steps - schedule.last_epoch):
            schedule.step()


class Method:
    """A training method. The shared loop asks it, per iteration, how many labeled and
    unlabeled patches it wants, hands it those, and checkpoints its ``state_dict``."""

    # Set by ``register_method``.
    name = "base"
    options_class: type = NoOptions
    uses_unlabeled = False
    needs_2d_encoder = False

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device) -> None:
        self.config = config
        self.options = _options(type(self), config)
        self.num_classes = num_classes
        self.device = device
        self.use_amp = bool(config.mixed_precision and device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self._synced: Dict[int, nn.Module] = {}

    @classmethod
    def peak_patches_per_step(cls, options: Any) -> float:
        """The most patches, per ``batch_size``, whose activations one training step keeps for
        backward: what a plan for a GPU's memory must fit. A labeled batch, and for a method
        that learns from unlabeled images as many unlabeled patches on top."""
        return 2.0 if cls.uses_unlabeled else 1.0

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

    def load_state_dict(self, state: Dict[str, Any], new_budget: bool = False) -> None:
        """Restore a checkpoint's parts. ``new_budget``: the run continues with another
        iteration budget than it started with, so its learning-rate schedules are not restored
        (theirs end at the old budget): those built for the new budget are advanced by as many
        steps as the stored ones had taken."""
        for name, part in self.stateful().items():
            if new_budget and isinstance(part, LRScheduler):
                advance_schedule(part, int(state[name]["last_epoch"]))
            else:
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
