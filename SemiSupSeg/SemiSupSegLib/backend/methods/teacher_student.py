"""The EMA teacher-student loop shared by embedding matching (``em``) and the classic baselines.

One loop, three methods (method.md §2):

- ``em`` (methods/embedding_matching.py): Monte Carlo dropout teacher, reliable voxels learn the
  teacher's argmax, unreliable voxels are labeled by embedding matching.
- ``ua-mt``: *em without matching*: the uncertainty filter (entropy of the mean, as UA-MT) on a
  mean-squared softmax consistency; unreliable voxels are simply ignored.
- ``mean-teacher``: *em without matching and without the uncertainty filter*: mean-squared
  softmax consistency with the EMA teacher on every unlabeled voxel.

Every number is a method option (``--set method.NAME=VALUE``): ``TeacherStudentOptions``, and
the variants' other defaults in ``MeanTeacherOptions`` and ``UAMTOptions``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from SemiSupSegLib.backend.config import SHARE, TrainConfig
from SemiSupSegLib.backend.methods.base import (
    Method,
    StepResult,
    option,
    register_method,
    segmentation_loss,
)
from SemiSupSegLib.backend.networks import SegmentationNetwork
from SemiSupSegLib.backend.settings import OneOf, Range
from SemiSupSegLib.backend.uncertainty import (
    UNCERTAINTY_KINDS,
    class_argmax,
    mc_softmax,
    uncertainty_from_passes,
)
from SemiSupSegLib.method_catalogue import NOT_PUBLISHED


def ramp(step: float, total: float, scale: float = 1.0) -> float:
    """Gaussian ramp-up ``scale * exp(-5 (1 - t/T)^2)``, t clipped to [0, T] (Laine & Aila)."""
    if total <= 0:
        return scale
    t = min(max(step / total, 0.0), 1.0)
    return scale * math.exp(-5.0 * (1.0 - t) ** 2)


def reliability_threshold(
    step: float, total: float, num_classes: int, scale: Optional[float] = None
) -> float:
    """The rising uncertainty threshold ``(0.75 + 0.25 ramp(t)) ln C`` (UA-MT, em).

    ``scale`` replaces ln C when given: with several classes a boundary voxel is torn between
    two of them, so its entropy stays under ln 2 and a ln C threshold never rejects it.
    """
    top = math.log(num_classes) if scale is None else float(scale)
    return (0.75 + 0.25 * ramp(step, total)) * top


def ema_decay(step: int, decay: float) -> float:
    """UA-MT's warm-up of the EMA decay: ``min(1 - 1/(step + 1), decay)``."""
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def update_ema(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """teacher <- alpha * teacher + (1 - alpha) * student (parameters); buffers copied.

    Not timm's ``ModelEmaV3`` nor torch's ``AveragedModel``: both interpolate with ``lerp``,
    which rounds differently from this multiply-add (trained weights would change in their
    last bits), ModelEmaV3 averages the buffers (UA-MT copies them) and AveragedModel would
    put the teacher's weights under ``module.`` in the checkpoints and model files."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


DROPOUT_HELP = "dropout of the 3D network; None: the run's dropout"
MC_PASSES_HELP = "the teacher's Monte Carlo passes over the unlabeled patches"
UNCERTAINTY_HELP = "the teacher's uncertainty: mean-entropy, entropy-of-mean or mutual-information"
FILTER_HELP = "learn the consistency only on voxels whose uncertainty is under the rising threshold"
CONSISTENCY_HELP = (
    "mse: of the softmax to the teacher's (MT, UA-MT); ce: to the teacher's argmax (em)"
)


@dataclass(frozen=True)
class MonteCarloTeacherOptions:
    """A teacher whose Monte Carlo passes tell which voxels it is sure of, under a threshold
    that rises with the ramps: settings this loop and ``mn+em`` share."""

    mc_passes: int = option(1, MC_PASSES_HELP, check=Range(1))
    teacher_noise: float = option(
        0.01, "std of the Gaussian noise added to the teacher's input", NOT_PUBLISHED, Range(0)
    )
    uncertainty: str = option("entropy-of-mean", UNCERTAINTY_HELP, check=OneOf(UNCERTAINTY_KINDS))
    threshold_scale: Optional[float] = option(
        None,
        "final value of the uncertainty threshold; None: ln C (C classes)",
        check=Range(0, low_open=True),
    )
    ramp_fraction: float = option(
        1.0,
        "share of the run after which the ramped weights and threshold reach their final values",
        NOT_PUBLISHED,
        Range(0),
    )


@dataclass(frozen=True)
class TeacherStudentOptions(MonteCarloTeacherOptions):
    """The teacher-student loop's settings: default (CPU preset), what each does, and the
    published value (Mean Teacher's and UA-MT's, unless a variant says otherwise)."""

    dropout: Optional[float] = option(None, DROPOUT_HELP, NOT_PUBLISHED, SHARE)
    ema_decay: float = option(
        0.99, "decay of the teacher's exponential moving average", check=Range(0, 1)
    )
    mc_chunk: int = option(
        0, "at most this many passes per batched forward (0: all at once)", NOT_PUBLISHED, Range(0)
    )
    student_noise: float = option(
        0.02, "std of the Gaussian noise added to the student's input", NOT_PUBLISHED, Range(0)
    )
    uncertainty_filter: bool = option(True, FILTER_HELP)
    consistency: str = option("mse", CONSISTENCY_HELP, check=OneOf(("mse", "ce")))
    consistency_weight: float = option(
        0.1, "final value of the ramped consistency weight", check=Range(0)
    )
    unlabeled_batch: Optional[int] = option(
        None,
        "unlabeled patches per batch, on top of batch_size labeled ones; None: half of "
        "batch_size; 0: batch_size in all, half of them unlabeled",
        "0",
        Range(0),
    )
    deploy: str = option(
        "teacher",
        "the network predict uses: teacher or student",
        NOT_PUBLISHED,
        OneOf(("teacher", "student")),
    )


class StudentWithEmaTeacher(Method):
    """A method that trains a ``student`` by one ``optimizer`` and ``schedule`` beside an EMA
    ``teacher``: which of the two predict uses (``options.deploy``), a warm start of both from
    a previous round's network, and the parts a checkpoint holds."""

    student: SegmentationNetwork
    teacher: SegmentationNetwork

    def deploy_network(self) -> SegmentationNetwork:
        return self.teacher if self.options.deploy == "teacher" else self.student

    def warm_start(
        self,
        network_state: Dict[str, torch.Tensor],
        previous_state: Optional[Dict[str, Any]] = None,
    ) -> List[str]:
        self.student.load_state_dict(network_state)
        self.teacher.load_state_dict(network_state)
        return []

    def stateful(self) -> Dict[str, Any]:
        return {
            "student": self.student,
            "teacher": self.teacher,
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "scaler": self.scaler,
        }


class TeacherStudentMethod(StudentWithEmaTeacher):
    """Student trained by gradient, teacher = EMA of the student; subclasses choose the
    unlabeled losses through their options and the ``unreliable_loss`` hook."""

    options: TeacherStudentOptions

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device) -> None:
        super().__init__(config, num_classes, device)
        o = self.options
        self.student = self.build_network(dropout=o.dropout)
        self.teacher = copy.deepcopy(self.student)
        if config.compile:
            self.teacher.compile()  # a copy of a compiled module is not compiled
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.optimizer, self.schedule = self.build_optimizer(self.student)
        self.loss = segmentation_loss()
        self.ramp_total = max(1.0, o.ramp_fraction * config.iterations)

    # --- the loop's questions
    @classmethod
    def peak_patches_per_step(cls, options: TeacherStudentOptions) -> float:
        """Half a batch of unlabeled patches on top by default, none on top in the published
        split; a fixed ``unlabeled_batch`` is counted as up to a second batch."""
        extra = options.unlabeled_batch
        return 1.5 if extra is None else 2.0 if extra > 0 else 1.0

    def batch_composition(self, iteration: int) -> Tuple[int, int]:
        """``batch_size`` labeled patches plus ``unlabeled_batch`` unlabeled ones (default
        None: half of ``batch_size``), so the student gets as much supervision per iteration as
        supervised training at the same budget. ``unlabeled_batch=0`` is the published split
        instead (UA-MT's code: ``batch_size`` in all, half labeled, half unlabeled); on the
        benchmark it halves the labeled patches a fixed budget sees."""
        b = self.config.batch_size
        extra = self.options.unlabeled_batch
        if extra is None:
            return b, max(1, b // 2)
        if extra > 0:
            return b, extra
        return max(1, (b + 1) // 2), max(1, b // 2)

    def weights(self, iteration: int) -> Dict[str, float]:
        """The ramped loss weights at ``iteration``."""
        return {"consistency": ramp(iteration, self.ramp_total, self.options.consistency_weight)}

    # --- one step
    def train_step(
        self,
        labeled: Dict[str, torch.Tensor],
        unlabeled: Optional[Dict[str, torch.Tensor]],
        iteration: int,
    ) -> StepResult:
        o = self.options
        self.student.train()
        image_l = labeled["image"].to(self.device, non_blocking=True)
        label = labeled["label"].to(self.device, non_blocking=True)
        image_u = unlabeled["image"].to(self.device, non_blocking=True)
        n_l = image_l.shape[0]

        # Teacher: M stochastic passes over the unlabeled patches, batched.
        with self.autocast():
            passes = mc_softmax(
                self.teacher, image_u, o.mc_passes, o.teacher_noise, o.mc_chunk or None
            )
        teacher_probs = passes.mean(0)
        threshold = reliability_threshold(
            iteration, self.ramp_total, self.num_classes, o.threshold_scale
        )
        if o.uncertainty_filter:
            uncertainty = uncertainty_from_passes(passes, o.uncertainty)
            reliable = uncertainty < threshold
        else:
            reliable = torch.ones_like(teacher_probs[:, 0], dtype=torch.bool)

        # Student: labeled and unlabeled patches in one forward, with input noise.
        both = torch.cat([image_l, image_u])
        if o.student_noise > 0:
            both = both + torch.randn_like(both) * o.student_noise
        weights = self.weights(iteration)
        with self.autocast():
            logits, features = self.synced(self.student)(both, features=True)
            supervised = self.loss(logits[:n_l], label)
        logits_u = logits[n_l:].float()
        consistency = self.consistency_loss(logits_u, teacher_probs, reliable)
        losses = {"supervised": supervised, "consistency": consistency}
        total = supervised + weights["consistency"] * consistency
        extra, info = self.unreliable_loss(
            labeled, label, features[n_l:], logits_u, reliable, iteration, weights
        )
        for key, (value, weight) in extra.items():
            losses[key] = value
            total = total + weight * value
        self.optimise(total, self.optimizer, self.schedule)
        update_ema(self.teacher, self.student, ema_decay(iteration + 1, o.ema_decay))

        report = {"loss": float(total.detach())}
        report.update({k: float(v.detach()) for k, v in losses.items()})
        info = {
            "reliable_share": float(reliable.float().mean()),
            "threshold": threshold,
            **{f"w_{k}": v for k, v in weights.items()},
            "lr": self.schedule.get_last_lr()[0],
            **info,
        }
        return StepResult(report, info)

    def consistency_loss(
        self, logits_u: torch.Tensor, teacher_probs: torch.Tensor, reliable: torch.Tensor
    ) -> torch.Tensor:
        """Student vs teacher on the reliable unlabeled voxels: MSE of softmax (MT, UA-MT),
        or cross-entropy to the teacher's argmax (em's L_UA)."""
        mask = reliable.float()
        count = mask.sum().clamp_min(1.0)
        if self.options.consistency == "ce":
            per_voxel = F.cross_entropy(logits_u, class_argmax(teacher_probs), reduction="none")
        else:
            per_voxel = ((torch.softmax(logits_u, 1) - teacher_probs) ** 2).mean(1)
        return (per_voxel * mask).sum() / count

    def unreliable_loss(
        self,
        labeled: Dict[str, torch.Tensor],
        label: torch.Tensor,
        student_features_u: torch.Tensor,
        logits_u: torch.Tensor,
        reliable: torch.Tensor,
        iteration: int,
        weights: Dict[str, float],
    ) -> Tuple[Dict[str, Tuple[torch.Tensor, float]], Dict[str, Any]]:
        """Losses on the unreliable voxels, {name: (loss, weight)}, plus progress facts.
        None here: mean-teacher and ua-mt ignore the voxels the filter rejects."""
        return {}, {}


@dataclass(frozen=True)
class MeanTeacherOptions(TeacherStudentOptions):
    """Mean Teacher's settings: the loop's, without the uncertainty filter."""

    uncertainty_filter: bool = option(False, FILTER_HELP)


@register_method("mean-teacher", options=MeanTeacherOptions, uses_unlabeled=True)
class MeanTeacherMethod(TeacherStudentMethod):
    """Mean Teacher (Tarvainen & Valpola 2017): em without the uncertainty filter and without
    matching; MSE of softmax against one noisy EMA-teacher pass on every unlabeled voxel."""


@dataclass(frozen=True)
class UAMTOptions(TeacherStudentOptions):
    """UA-MT's settings: the loop's, with a Monte Carlo dropout teacher. Published M is 8; the
    CPU default is 2 (each pass is a teacher forward of the batch)."""

    dropout: Optional[float] = option(0.15, DROPOUT_HELP, NOT_PUBLISHED, SHARE)
    mc_passes: int = option(2, MC_PASSES_HELP, "8", Range(1))


@register_method("ua-mt", options=UAMTOptions, uses_unlabeled=True)
class UncertaintyAwareMeanTeacherMethod(TeacherStudentMethod):
    """UA-MT (Yu et al. 2019): em without matching; MC dropout teacher, entropy of the mean,
    MSE consistency on the voxels under the rising threshold only."""
