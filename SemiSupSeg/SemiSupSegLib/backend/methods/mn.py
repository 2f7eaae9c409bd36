"""M&N: co-training a natural-image pretrained 2D model with the 3D model (method ``mn``).

Yeung et al., MLMI 2025 (arXiv:2509.15167); see docs/method.md §1. Stage 1 ("warm-up"): both
models learn from the labeled patches. Stage 2 ("co-training"): each model learns from the
other's soft pseudo-masks on unlabeled patches, regenerated for every batch by the teacher in
eval mode without gradients, plus ground truth on the labeled patches of the same batch. One
Dice + cross-entropy loss over the whole batch (one-hot targets for labeled, probabilities for
pseudo-labeled patches). Separate AdamW optimisers and schedules: linear warm-up, cosine to 0
at the end of stage 1, restart, cosine to 0 at the end; each schedule advances with the steps
of its own optimiser (:meth:`MNMethod.own_schedule`). Learning-rate guided sampling: the
share of unlabeled patches grows as the LR falls (:func:`lr_guided_unlabeled`); by default
they come on top of the labeled ones (``unlabeled_mode=add``, chosen on Left Atrium's
validation cases), in the paper they take their place (``replace``).

Settings (``--set method.NAME=VALUE``): ``MNOptions``, each with its published value. The CPU
preset trains 1500 iterations of batch 4 on 32x48x32 patches instead of ~32k of batch 5 at
160x160x64, so the stages are fractions of the run and the 3D model keeps the run's learning
rate; ``alternation=iteration`` gives the 3D model as many updates as supervised training at
the same budget.

Progress: stage "warm-up" / "co-training", a message naming who learns from whom, the batch's
``n_labeled``/``n_unlabeled``, both learning rates, and ``loss_3d``/``loss_2d``. ``predict``
deploys the 3D model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import numpy as np
import torch
from monai.networks.utils import one_hot
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.methods.base import (
    Method,
    StepResult,
    option,
    register_method,
    soft_segmentation_loss,
)
from SemiSupSegLib.backend.networks import SegmentationNetwork
from SemiSupSegLib.backend.networks2d import SLICE_AXES, create_network2d
from SemiSupSegLib.backend.settings import OneOf, Range
from SemiSupSegLib.method_catalogue import NOT_PUBLISHED

UNLABELED_MODES = ("replace", "add")
UNLABELED_MODE_HELP = (
    "replace: the unlabeled patches take the place of labeled ones in a batch of batch_size; "
    "add: they come on top of batch_size labeled patches (chosen on the validation cases of "
    "Left Atrium, docs/benchmarks.md)"
)


@dataclass(frozen=True)
class MNOptions:
    """M&N's settings: default (CPU preset), what each does, and the published value."""

    encoder: str = option(
        "mobilenetv2_100",
        "timm encoder of the 2D model (any timm name; MobileNetV2 has offline weights)",
        "SegFormer-B2 (mit_b2; its weights need a download)",
    )
    encoder_weights: str = option(
        "auto",
        "the 2D encoder's weights: auto, offline, timm, none (random) or a weights file",
        "natural-image pretrained",
    )
    encoder_out_indices: Optional[Tuple[int, ...]] = option(
        (0, 1, 2, 3),
        "encoder feature levels used (strides 2 to 16; the stride-32 level of a 48x32 slice is "
        "2x1 voxels); None: all",
        NOT_PUBLISHED,
    )
    decoder_channels: int = option(
        32, "channels of the 2D model's light decoder", NOT_PUBLISHED, Range(1)
    )
    slice_axis: str = option(
        "z",
        "axis the 2D model slices along: z (SimpleITK's through-plane axis), y or x",
        NOT_PUBLISHED,
        OneOf(tuple(SLICE_AXES)),
    )
    slice_scale: float = option(
        1.0,
        "slices are upsampled by this before the encoder",
        NOT_PUBLISHED,
        Range(0, low_open=True),
    )
    finetune: str = option(
        "all",
        "all: every layer learns, the encoder at encoder_lr_factor of the 2D rate; frozen: the "
        "decoder only",
        "LoRA on SegFormer (not offered)",
        OneOf(("all", "frozen")),
    )
    encoder_lr_factor: float = option(
        0.1,
        "the encoder's share of the 2D learning rate (finetune=all)",
        NOT_PUBLISHED,
        Range(0),
    )
    lr_2d: float = option(1e-3, "peak learning rate of the 2D model", check=Range(0, low_open=True))
    lr_3d: Optional[float] = option(
        None,
        "peak learning rate of the 3D model; None: the run's learning_rate (3e-3 on a CPU)",
        "1e-4 (for ~32k iterations: far too slow for 1500)",
        Range(0, low_open=True),
    )
    warmup_stage_fraction: float = option(
        0.125,
        "share of the run in stage 1, where both models learn from the labels only "
        "(published: 500 of 4000 epochs)",
        check=Range(0, 1, low_open=True, high_open=True),
    )
    lr_warmup_fraction: float = option(
        0.0125,
        "share of the run in the linear learning-rate warm-up (published: 50 of 4000 epochs)",
        check=Range(0, 1),
    )
    alternation: str = option(
        "iteration",
        "iteration: every co-training iteration the 2D model learns from the 3D one, then the "
        "3D from the 2D; phase: phase_length iterations for one model, then the other",
        "phase",
        OneOf(("iteration", "phase")),
    )
    phase_length: int = option(
        8,
        "iterations of a phase (alternation=phase; published: one reference epoch)",
        check=Range(1),
    )
    train_slices: int = option(
        8,
        "slices per patch the 2D student learns from, drawn at random (0: all); the 2D teacher "
        "always predicts every slice",
        "0 (all slices)",
        Range(0),
    )
    min_labeled: int = option(
        1,
        "labeled patches kept in every batch (unlabeled_mode=replace)",
        NOT_PUBLISHED,
        Range(0),
    )
    unlabeled_mode: str = option(
        "add",
        UNLABELED_MODE_HELP,
        "replace (the sampling of the paper)",
        OneOf(UNLABELED_MODES),
    )


WARM_UP = "warm-up"
CO_TRAINING = "co-training"


@dataclass
class Teaching:
    """What a teacher gives its student for the unlabeled patches of a batch.

    ``target``: the pseudo-mask (N, C, ...), probabilities or one-hot. ``regulariser``, when
    set, is a loss the 3D student adds on its own embeddings of those patches: called with
    the embeddings of its whole batch (B, F, ...), the N unlabeled patches last, it returns
    the loss and its weight. ``info``: progress facts, averaged over the teachings of a step.
    """

    target: torch.Tensor
    regulariser: Optional[Callable[[torch.Tensor], Tuple[torch.Tensor, float]]] = None
    info: Dict[str, float] = field(default_factory=dict)


class PseudoLabelRefiner(Protocol):
    """Makes a teacher's pseudo-mask for M&N's loop in place of the plain soft mask
    (``mn+em``: embedding matching on the voxels the teacher is unsure of)."""

    def teach(
        self,
        method: MNMethod,
        teacher: str,
        images: torch.Tensor,
        labeled: Dict[str, torch.Tensor],
        iteration: int,
    ) -> Teaching:
        """The ``teacher`` ("2d" or "3d") model's teaching for the unlabeled ``images``, with
        the labeled patches of the same batch at hand."""
        ...


def lr_guided_unlabeled(batch_size: int, lr: float, lr0: float, min_labeled: int = 1) -> int:
    """Unlabeled patches in a batch of ``batch_size`` when the LR is ``lr`` of peak ``lr0``.

    floor(B * arccos(2 lr / lr0 - 1) / pi): 0 at the peak, B when the LR reaches 0 (the share
    follows the progress through one cosine cycle), capped so ``min_labeled`` remain.
    """
    ratio = min(max(lr / lr0, 0.0), 1.0) if lr0 > 0 else 0.0
    share = math.acos(min(max(2.0 * ratio - 1.0, -1.0), 1.0)) / math.pi
    count = int(math.floor(batch_size * share + 1e-9))
    return max(0, min(count, batch_size - max(0, min_labeled)))


class TwoCycleSchedule:
    """LR factor per iteration: linear warm-up, cosine to 0 at ``stage1``, restart, cosine to 0
    at ``total``. A callable object so LambdaLR checkpoints its settings."""

    def __init__(self, total: int, stage1: int, warmup: int) -> None:
        self.total = int(total)
        self.stage1 = int(stage1)
        self.warmup = int(warmup)

    def __call__(self, iteration: int) -> float:
        if iteration < self.stage1:
            if iteration < self.warmup:
                return (iteration + 1) / self.warmup
            span = max(1, self.stage1 - self.warmup)
            return 0.5 * (1.0 + math.cos(math.pi * (iteration - self.warmup) / span))
        span = max(1, self.total - self.stage1)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (iteration - self.stage1) / span)))


@register_method("mn", options=MNOptions, uses_unlabeled=True, needs_2d_encoder=True)
class MNMethod(Method):
    """A slice-wise pretrained 2D model and the 3D network teach each other (see module doc)."""

    options: MNOptions

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device) -> None:
        super().__init__(config, num_classes, device)
        o = self.options
        if config.batch_size < 2:
            # Also with unlabeled_mode=add: floor(1 * share) stays 0 until the LR reaches 0.
            raise ConfigError("mn needs batch_size >= 2 (one labeled and one unlabeled patch)")
        total = config.iterations
        self.stage1 = max(1, int(round(o.warmup_stage_fraction * total)))
        if self.stage1 >= total:
            raise ConfigError(
                f"method.warmup_stage_fraction={o.warmup_stage_fraction} leaves no co-training "
                f"iterations out of {total}"
            )
        self.warmup = min(max(1, int(round(o.lr_warmup_fraction * total))), self.stage1)
        # The run's progress through the two cycles, which guides the batches' composition.
        self.factor = TwoCycleSchedule(total, self.stage1, self.warmup)

        self.net3d = self.build_network(dropout=self.dropout_3d())
        self.net2d = create_network2d(
            o.encoder,
            num_classes,
            weights=o.encoder_weights,
            axis=o.slice_axis,
            decoder_channels=o.decoder_channels,
            out_indices=o.encoder_out_indices,
            slice_scale=o.slice_scale,
        ).to(device)

        lr3 = o.lr_3d or config.learning_rate
        lr2 = o.lr_2d
        self.opt3d = torch.optim.AdamW(
            self.net3d.parameters(), lr=lr3, weight_decay=config.weight_decay
        )
        segmenter = self.net2d.network
        groups: List[Dict[str, Any]] = [{"params": segmenter.decoder_parameters(), "lr": lr2}]
        if o.finetune == "all":
            groups.append(
                {"params": segmenter.encoder_parameters(), "lr": lr2 * o.encoder_lr_factor}
            )
        else:
            for parameter in segmenter.encoder_parameters():
                parameter.requires_grad_(False)
        self.opt2d = torch.optim.AdamW(groups, lr=lr2, weight_decay=config.weight_decay)
        self.sched3d = LambdaLR(self.opt3d, self.own_schedule("3d"))
        self.sched2d = LambdaLR(self.opt2d, self.own_schedule("2d"))
        self.loss = soft_segmentation_loss()
        self.last_losses: Dict[str, float] = {}
        #: Makes the pseudo-masks instead of ``teach`` when set (a subclass sets it).
        self.refiner: Optional[PseudoLabelRefiner] = None

    def dropout_3d(self) -> Optional[float]:
        """The 3D network's dropout: None, the run's ``dropout``."""
        return None

    # --- schedule of the run
    def own_schedule(self, model: str) -> TwoCycleSchedule:
        """The two cycles of ``model``'s learning rate over the steps of its own optimiser.

        Its schedule advances only when it learns: with ``alternation=phase`` each model learns
        in about half the co-training iterations, and its second cycle spans those steps, so
        that its rate still reaches 0 at its last step. With ``iteration`` both models learn
        every iteration, and the schedule is the run's (``self.factor``).
        """
        total = self.config.iterations
        steps = self.stage1 + sum(
            model in (student for student, _ in self.roles(i)) for i in range(self.stage1, total)
        )
        return TwoCycleSchedule(max(steps, self.stage1 + 1), self.stage1, self.warmup)

    def stage(self, iteration: int) -> str:
        return WARM_UP if iteration < self.stage1 else CO_TRAINING

    def roles(self, iteration: int) -> List[Tuple[str, str]]:
        """(student, teacher) pairs at ``iteration``, in order: teacher "labels", "2d" or "3d"."""
        if iteration < self.stage1:
            return [("3d", "labels"), ("2d", "labels")]
        if self.options.alternation == "iteration":
            return [("2d", "3d"), ("3d", "2d")]
        phase = (iteration - self.stage1) // self.options.phase_length
        return [("2d", "3d")] if phase % 2 == 0 else [("3d", "2d")]

    @classmethod
    def peak_patches_per_step(cls, options: MNOptions) -> float:
        """With ``add`` up to a second batch of unlabeled patches comes on top of the labeled
        one late in training; with ``replace`` they take labeled patches' places."""
        return 2.0 if options.unlabeled_mode == "add" else 1.0

    def batch_composition(self, iteration: int) -> Tuple[int, int]:
        batch = self.config.batch_size
        if iteration < self.stage1:
            return batch, 0
        if self.options.unlabeled_mode == "add":
            return batch, lr_guided_unlabeled(batch, self.factor(iteration), 1.0, 0)
        unlabeled = lr_guided_unlabeled(
            batch, self.factor(iteration), 1.0, self.options.min_labeled
        )
        return batch - unlabeled, unlabeled

    # --- one step
    def train_step(
        self,
        labeled: Dict[str, torch.Tensor],
        unlabeled: Optional[Dict[str, torch.Tensor]],
        iteration: int,
    ) -> StepResult:
        image_l = labeled["image"].to(self.device, non_blocking=True)
        label = labeled["label"].to(self.device, non_blocking=True)
        onehot = labels_one_hot(label, self.num_classes)
        image_u = None
        if unlabeled is not None and unlabeled.get("image") is not None:
            image_u = unlabeled["image"].to(self.device, non_blocking=True)
        n_unlabeled = 0 if image_u is None else int(image_u.shape[0])
        roles = self.roles(iteration)
        facts: Dict[str, List[float]] = {}
        for student, teacher in roles:
            images, target, regulariser = image_l, onehot, None
            if image_u is not None and teacher != "labels":
                teaching = (
                    self.refiner.teach(self, teacher, image_u, labeled, iteration)
                    if self.refiner is not None
                    else Teaching(self.teach(teacher, image_u))
                )
                images = torch.cat([image_l, image_u])
                target = torch.cat([onehot, teaching.target])
                regulariser = teaching.regulariser
                for key, value in teaching.info.items():
                    facts.setdefault(key, []).append(value)
            self.last_losses[f"loss_{student}"] = self.learn(student, images, target, regulariser)
            (self.sched3d if student == "3d" else self.sched2d).step()
        return StepResult(
            dict(self.last_losses),
            {
                "message": _describe(roles, int(image_l.shape[0]), n_unlabeled),
                "n_labeled": int(image_l.shape[0]),
                "n_unlabeled": n_unlabeled,
                "lr_3d": self.opt3d.param_groups[0]["lr"],
                "lr_2d": self.opt2d.param_groups[0]["lr"],
                **{key: float(np.mean(values)) for key, values in facts.items()},
            },
        )

    def teach(self, teacher: str, images: torch.Tensor) -> torch.Tensor:
        """The teacher's soft pseudo-mask: eval mode, no gradients, regenerated every batch."""
        network = self.net3d if teacher == "3d" else self.net2d
        network.eval()
        with torch.no_grad(), self.autocast():
            return torch.softmax(network(images).float(), dim=1)

    def learn(
        self,
        student: str,
        images: torch.Tensor,
        target: torch.Tensor,
        regulariser: Optional[Callable[[torch.Tensor], Tuple[torch.Tensor, float]]] = None,
    ) -> float:
        """One optimiser step of ``student`` on ``images`` against ``target``; the 3D student
        adds ``regulariser`` on its embeddings of the batch (the unlabeled patches last)."""
        if student == "3d":
            network, optimizer = self.net3d, self.opt3d
        else:
            network, optimizer = self.net2d, self.opt2d
            images, target = self._slice_subset(images, target)
            regulariser = None  # defined on the 3D model's embedding space
        network.train()
        if regulariser is None:
            with self.autocast():
                loss = self.loss(self.synced(network)(images), target)
            self.optimise(loss, optimizer)
            return float(loss.detach())
        with self.autocast():
            logits, features = self.synced(network)(images, features=True)
            loss = self.loss(logits, target)
        value, weight = regulariser(features)
        self.optimise(loss + weight * value, optimizer)
        self.last_losses["entropy_3d"] = float(value.detach())
        return float(loss.detach())

    def _slice_subset(
        self, images: torch.Tensor, target: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """A random subset of ``train_slices`` slices along the slice axis (all when 0)."""
        count = self.options.train_slices
        dim = SLICE_AXES[self.options.slice_axis]
        depth = images.shape[dim]
        if count <= 0 or count >= depth:
            return images, target
        index = torch.randperm(depth)[:count].sort().values.to(images.device)
        return images.index_select(dim, index), target.index_select(dim, index)

    # --- deployment and checkpoints
    def deploy_network(self) -> SegmentationNetwork:
        return self.net3d

    def companions(self) -> Dict[str, nn.Module]:
        # Without its trained 2D partner a retraining round would co-train the 3D model with
        # pseudo-masks from a 2D model that has seen a few dozen labeled batches.
        return {"net2d": self.net2d}

    def stateful(self) -> Dict[str, Any]:
        return {
            "net3d": self.net3d,
            "net2d": self.net2d,
            "opt3d": self.opt3d,
            "opt2d": self.opt2d,
            "sched3d": self.sched3d,
            "sched2d": self.sched2d,
            "scaler": self.scaler,
        }

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "last_losses": dict(self.last_losses)}

    def load_state_dict(self, state: Dict[str, Any], new_budget: bool = False) -> None:
        super().load_state_dict(state, new_budget)
        self.last_losses = dict(state.get("last_losses", {}))


def labels_one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, 1, D, H, W) class indices -> (N, C, D, H, W) float one-hot, channels-last in memory
    (the layout the losses have always summed over: another changes the sums' order, and so
    the trained weights in their last bits)."""
    encoded = one_hot(label.long(), num_classes, dtype=torch.float32, dim=1)
    return encoded.contiguous(memory_format=torch.channels_last_3d)


def _describe(roles: List[Tuple[str, str]], n_labeled: int, n_unlabeled: int) -> str:
    batch = f"{n_labeled} labeled + {n_unlabeled} unlabeled"
    if roles[0][1] == "labels":
        return f"warm-up: 3D and 2D models learn from labels ({batch})"
    parts = [f"{s.upper()} learns from {t.upper()} pseudo-masks" for s, t in roles]
    return "co-training: " + ", then ".join(parts) + f" ({batch})"
