"""Bidirectional Copy-Paste (method ``bcp``): a cuboid of one patch pasted into another, between
labeled and unlabeled patches in both directions, learned from a Mean Teacher's hard labels.

Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical Image Segmentation", CVPR 2023
(arXiv:2305.00673; code github.com/DeepMed-Lab-ECNU/BCP). Reported on Left Atrium with 8 labeled
cases: 89.62 Dice % against 79.99 for the V-Net trained on the labels alone.

Stage 1, "pre-training": supervised Dice + cross-entropy on labeled patches, each with a cuboid
of another labeled patch pasted in, the labels mixed the same way. Stage 2, "self-training": an
EMA teacher starts from the stage-1 network. Each iteration the labeled patches and as many
unlabeled ones are split into halves a and b and mixed with one cuboid: labeled a outside with
unlabeled a inside, unlabeled b outside with labeled b inside. Their labels are the ground truth
and the teacher's hard pseudo-labels (argmax of its eval-mode prediction; by default only the
largest connected component of each class, per patch) mixed the same way. One student forward
over both mixed halves; for each half, Dice + cross-entropy over the voxels from the labeled
patch plus ``unlabeled_weight`` times the same over the voxels from the unlabeled patch; then
the teacher takes an EMA step towards the student.

Published settings (paper and code, LA): cuboid 2/3 of each patch side at a random place, one
cuboid per iteration for all mixed patches; unlabeled-voxel weight 0.5; EMA decay 0.99 on the
parameters, constant; pseudo-labels the teacher's thresholded softmax (argmax) with the largest
connected component kept; 2000 pre-training then 15000 self-training iterations; batch 8 = 4
labeled + 4 unlabeled patches of 112x112x80; SGD at 0.01 (momentum 0.9, weight decay 1e-4),
constant in pre-training, a fresh optimiser at 0.01 for self-training with the rate x0.1 every
2500 iterations; the student is evaluated. The reference code keeps the best of the evaluations
run every 200 iterations on the test cases, and removes all but the largest component of the
final predictions; ``predict`` here does neither.

What differs here, so that budgets match the other methods (options in ``CopyPasteOptions``):
the run's network, AdamW and warm-up + cosine schedule, restarted at the stage switch
(``restart_lr``); the stage switch at a share of the run (``pretrain_fraction``); batch_size
labeled + batch_size unlabeled patches (the published 4 + 4 when batch_size is 4); in
pre-training every labeled patch gets a cuboid of the next one (the reference code pastes the
first half of the batch into the second, half as many mixed patches); the Dice of the run's
loss (one over the batch, background included); the teacher predicts in eval mode (the
reference code's VNet teacher runs in train mode, with dropout).

Why pre-training takes 0.3 of the run on the CPU preset: the published 2000 of 17000 iterations
is 0.12 of the count but 2000 of about 4500 iterations at the full rate (self-training's falls
tenfold every 2500), and the teacher's first pseudo-labels are only as good as the pre-trained
network: on Left Atrium (1500 iterations, 8 labels) a 3D network trained on labels alone scored
0.53 to 0.60 Dice on validation after about 190 iterations and 0.69 to 0.77 after 400 to 500
(docs/la-mn-diagnostics.md). Progress reports ``pseudo_foreground`` (the pseudo-labels'
foreground share) and ``component_kept`` (the share of the teacher's foreground the component
filter keeps).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from monai.networks.utils import one_hot
from monai.transforms import KeepLargestConnectedComponent
from monai.utils import convert_to_tensor
from torch.optim.lr_scheduler import LambdaLR

from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.methods.base import (
    StepResult,
    option,
    register_method,
    segmentation_loss,
)
from SemiSupSegLib.backend.methods.mn import TwoCycleSchedule
from SemiSupSegLib.backend.methods.teacher_student import StudentWithEmaTeacher, update_ema
from SemiSupSegLib.backend.settings import OneOf, Range
from SemiSupSegLib.backend.uncertainty import class_argmax

PRE_TRAINING = "pre-training"
SELF_TRAINING = "self-training"
CUBOID_POSITIONS = ("random", "centre")


@dataclass(frozen=True)
class CopyPasteOptions:
    """BCP's settings: default (CPU preset), what each does, and the published value."""

    pretrain_fraction: float = option(
        0.3,
        "share of the run in stage 1, supervised on labeled patches pasted into each other "
        "(the teacher of stage 2 starts from its network)",
        "0.118 (2000 of 17000 iterations)",
        Range(0, 1, low_open=True, high_open=True),
    )
    cuboid_ratio: float = option(
        2 / 3,
        "side of the pasted cuboid as a share of each patch side",
        check=Range(0, 1, low_open=True, high_open=True),
    )
    cuboid_position: str = option(
        "random",
        "where the cuboid sits: random (anywhere in the patch, redrawn every iteration) or centre",
        check=OneOf(CUBOID_POSITIONS),
    )
    unlabeled_weight: float = option(
        0.5, "weight of the loss on the voxels that come from unlabeled patches", check=Range(0)
    )
    ema_decay: float = option(
        0.99, "decay of the teacher's exponential moving average", check=Range(0, 1)
    )
    largest_component: bool = option(
        True,
        "keep only the largest connected component of each class in the teacher's "
        "pseudo-labels, per patch",
    )
    restart_lr: bool = option(
        True,
        "the learning rate anneals to 0 at the end of stage 1 and restarts for stage 2; false: "
        "one warm-up and cosine over the run",
        "true (SGD at 0.01, constant in stage 1; a fresh one at 0.01 in stage 2, x0.1 every "
        "2500 iterations)",
    )
    deploy: str = option(
        "student",
        "the network predict uses: student or teacher",
        check=OneOf(("student", "teacher")),
    )


def cuboid_mask(
    size: Sequence[int], ratio: float, position: str = "random", device: Any = None
) -> torch.Tensor:
    """A boolean (1, 1, *size) mask, true inside a cuboid of ``floor(ratio * side)`` voxels per
    axis: centred, or at a place drawn uniformly (torch's global generator) so that it fits."""
    sides = [int(ratio * s) for s in size]
    if position == "centre":
        starts = [(s - side) // 2 for s, side in zip(size, sides)]
    else:
        starts = [int(torch.randint(0, s - side + 1, ())) for s, side in zip(size, sides)]
    mask = torch.zeros(1, 1, *size, dtype=torch.bool, device=device)
    mask[(..., *(slice(b, b + side) for b, side in zip(starts, sides)))] = True
    return mask


def copy_paste(outside: torch.Tensor, inside: torch.Tensor, cuboid: torch.Tensor) -> torch.Tensor:
    """``inside`` within the cuboid, ``outside`` elsewhere (images or labels, (N, C, ...))."""
    return torch.where(cuboid, inside, outside)


@dataclass
class MixedBatch:
    """The student's input of a self-training step and what it learns.

    ``images``/``labels``: the ``split`` patches with labeled outside and unlabeled inside the
    cuboid, then those with unlabeled outside and labeled inside. ``from_labeled``: true where a
    voxel comes from a labeled patch (its label is the ground truth, not a pseudo-label).
    """

    images: torch.Tensor
    labels: torch.Tensor
    from_labeled: torch.Tensor
    split: int


def bidirectional_mix(
    image_l: torch.Tensor,
    label_l: torch.Tensor,
    image_u: torch.Tensor,
    pseudo_u: torch.Tensor,
    cuboid: torch.Tensor,
) -> MixedBatch:
    """Pair labeled patch i with unlabeled patch i; the first half of the pairs (the larger when
    odd) paste the unlabeled cuboid into the labeled patch, the rest the labeled cuboid into the
    unlabeled patch. Images (N, C, ...) and labels (N, 1, ...), N equal for both kinds."""
    if image_l.shape[0] != image_u.shape[0]:
        raise ValueError(
            f"bidirectional copy-paste pairs labeled and unlabeled patches: got "
            f"{image_l.shape[0]} labeled and {image_u.shape[0]} unlabeled"
        )
    h = (image_l.shape[0] + 1) // 2
    images = torch.cat(
        [copy_paste(image_l[:h], image_u[:h], cuboid), copy_paste(image_u[h:], image_l[h:], cuboid)]
    )
    labels = torch.cat(
        [
            copy_paste(label_l[:h], pseudo_u[:h], cuboid),
            copy_paste(pseudo_u[h:], label_l[h:], cuboid),
        ]
    )
    outside = ~cuboid.expand(h, *cuboid.shape[1:])
    inside = cuboid.expand(image_l.shape[0] - h, *cuboid.shape[1:])
    return MixedBatch(images, labels, torch.cat([outside, inside]), h)


class MaskedSegmentationLoss:
    """Dice + cross-entropy over the voxels of a mask: the run's loss (``segmentation_loss``:
    softmax, background included, one Dice over the batch) restricted to a region, each term
    averaged over that region's voxels. Over a cuboid it equals that loss on the cuboid cut out."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        # Fed a one-hot target: masking a class index would turn the masked-out voxels into
        # background, which the Dice of the background class would then count.
        self.dice = MaskedDiceLoss(softmax=True, batch=True)

    def __call__(
        self, logits: torch.Tensor, label: torch.Tensor, region: torch.Tensor
    ) -> torch.Tensor:
        """``logits`` (N, C, ...), ``label`` (N, 1, ...) class indices, ``region`` a boolean
        (N, 1, ...) mask; 0 when the region is empty."""
        weight = region.expand(label.shape).float()
        dice = self.dice(logits, one_hot(label, self.num_classes, dim=1), weight)
        per_voxel = F.cross_entropy(logits, label[:, 0], reduction="none")
        cross_entropy = (per_voxel * weight[:, 0]).sum() / weight.sum().clamp_min(1.0)
        return dice + cross_entropy


def copy_paste_loss(
    loss: MaskedSegmentationLoss,
    logits: torch.Tensor,
    mixed: MixedBatch,
    unlabeled_weight: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of the two mixed halves: for each, the masked loss over its voxels from labeled
    patches plus ``unlabeled_weight`` times that over its voxels from unlabeled ones. Returns
    (total, the labeled parts' sum, the unlabeled parts' sum)."""
    labeled = logits.new_zeros(())
    unlabeled = logits.new_zeros(())
    for part in (slice(0, mixed.split), slice(mixed.split, None)):
        region = mixed.from_labeled[part]
        if region.shape[0] == 0:
            continue
        labeled = labeled + loss(logits[part], mixed.labels[part], region)
        unlabeled = unlabeled + loss(logits[part], mixed.labels[part], ~region)
    return labeled + unlabeled_weight * unlabeled, labeled, unlabeled


def largest_components(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each patch of ``labels`` (N, 1, ...) with only the largest connected component (full
    connectivity) of each foreground class; the other voxels of that class become background."""
    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, num_classes)))
    kept = [convert_to_tensor(keep(patch.clone()), track_meta=False) for patch in labels]
    return torch.stack(kept).to(labels)


@register_method("bcp", options=CopyPasteOptions, uses_unlabeled=True)
class CopyPasteMethod(StudentWithEmaTeacher):
    """BCP (Bai et al. 2023): labeled and unlabeled patches pasted into each other both ways,
    learned from an EMA teacher's pseudo-labels (see module doc)."""

    options: CopyPasteOptions

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device) -> None:
        super().__init__(config, num_classes, device)
        o = self.options
        if config.batch_size < 2:
            raise ConfigError(
                "bcp needs batch_size >= 2 (self-training pastes in both directions, one half "
                "of the batch each)"
            )
        total = config.iterations
        self.stage1 = max(1, int(round(o.pretrain_fraction * total)))
        if self.stage1 >= total:
            raise ConfigError(
                f"method.pretrain_fraction={o.pretrain_fraction} leaves no self-training "
                f"iterations out of {total}"
            )
        self.student = self.build_network()
        self.teacher = copy.deepcopy(self.student)
        if config.compile:
            self.teacher.compile()  # a copy of a compiled module is not compiled
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if o.restart_lr:
            self.optimizer = torch.optim.AdamW(
                self.student.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
            )
            warmup = min(max(1, int(config.warmup_fraction * total)), self.stage1)
            self.schedule = LambdaLR(self.optimizer, TwoCycleSchedule(total, self.stage1, warmup))
        else:
            self.optimizer, self.schedule = self.build_optimizer(self.student)
        self.loss = segmentation_loss()
        self.masked_loss = MaskedSegmentationLoss(num_classes)
        #: Whether the teacher has started from the student (at the first self-training step).
        self.teacher_started = False

    # --- the loop's questions
    def stage(self, iteration: int) -> str:
        return PRE_TRAINING if iteration < self.stage1 else SELF_TRAINING

    def batch_composition(self, iteration: int) -> Tuple[int, int]:
        """``batch_size`` labeled patches; in self-training as many unlabeled ones besides
        (each pasted with one labeled patch: the published 4 + 4 when batch_size is 4)."""
        b = self.config.batch_size
        return (b, 0) if iteration < self.stage1 else (b, b)

    # --- one step
    def train_step(
        self,
        labeled: Dict[str, torch.Tensor],
        unlabeled: Optional[Dict[str, torch.Tensor]],
        iteration: int,
    ) -> StepResult:
        image_l = labeled["image"].to(self.device, non_blocking=True)
        label_l = labeled["label"].to(self.device, non_blocking=True)
        cuboid = self.draw_cuboid(image_l.shape[2:])
        self.student.train()
        if iteration < self.stage1:
            result = self.pretrain_step(image_l, label_l, cuboid)
        else:
            image_u = unlabeled["image"].to(self.device, non_blocking=True)
            result = self.self_train_step(image_l, label_l, image_u, cuboid)
        result.info["lr"] = self.optimizer.param_groups[0]["lr"]
        return result

    def draw_cuboid(self, size: Sequence[int]) -> torch.Tensor:
        o = self.options
        return cuboid_mask(size, o.cuboid_ratio, o.cuboid_position, self.device)

    def pretrain_step(
        self, image: torch.Tensor, label: torch.Tensor, cuboid: torch.Tensor
    ) -> StepResult:
        """Every labeled patch with the cuboid of the next one pasted in; the run's loss."""
        images = copy_paste(image, image.roll(-1, 0), cuboid)
        labels = copy_paste(label, label.roll(-1, 0), cuboid)
        with self.autocast():
            loss = self.loss(self.synced(self.student)(images), labels)
        self.optimise(loss, self.optimizer, self.schedule)
        n = int(image.shape[0])
        return StepResult(
            {"loss": float(loss.detach())},
            {
                "message": f"pre-training: labeled patches pasted into each other ({n} labeled)",
                "n_labeled": n,
                "n_unlabeled": 0,
            },
        )

    def self_train_step(
        self,
        image_l: torch.Tensor,
        label_l: torch.Tensor,
        image_u: torch.Tensor,
        cuboid: torch.Tensor,
    ) -> StepResult:
        o = self.options
        if not self.teacher_started:
            self.teacher.load_state_dict(self.student.state_dict())
            self.teacher_started = True
        pseudo, facts = self.pseudo_labels(image_u)
        mixed = bidirectional_mix(image_l, label_l, image_u, pseudo, cuboid)
        with self.autocast():
            logits = self.synced(self.student)(mixed.images)
        total, labeled, unlabeled = copy_paste_loss(
            self.masked_loss, logits.float(), mixed, o.unlabeled_weight
        )
        self.optimise(total, self.optimizer, self.schedule)
        update_ema(self.teacher, self.student, o.ema_decay)
        n_l, n_u = int(image_l.shape[0]), int(image_u.shape[0])
        return StepResult(
            {
                "loss": float(total.detach()),
                "labeled": float(labeled.detach()),
                "unlabeled": float(unlabeled.detach()),
            },
            {
                "message": (
                    f"self-training: labeled and unlabeled patches pasted into each other "
                    f"({n_l} labeled + {n_u} unlabeled)"
                ),
                "n_labeled": n_l,
                "n_unlabeled": n_u,
                **facts,
            },
        )

    def pseudo_labels(self, images: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The teacher's hard labels (N, 1, ...) for unlabeled ``images``: argmax in eval mode,
        without gradients, then (``largest_component``) the largest component of each class.
        Facts: the foreground share of the labels, and the share of the teacher's foreground
        voxels the component filter kept."""
        self.teacher.eval()
        with torch.no_grad(), self.autocast():
            logits = self.teacher(images)
        labels = class_argmax(logits.float()).unsqueeze(1)
        foreground = int((labels > 0).sum())
        if self.options.largest_component:
            labels = largest_components(labels, self.num_classes)
        kept = int((labels > 0).sum())
        facts = {"pseudo_foreground": kept / labels.numel()}
        if foreground:
            facts["component_kept"] = kept / foreground
        return labels, facts

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "teacher_started": self.teacher_started}

    def load_state_dict(self, state: Dict[str, Any], new_budget: bool = False) -> None:
        super().load_state_dict(state, new_budget)
        self.teacher_started = bool(state["teacher_started"])
