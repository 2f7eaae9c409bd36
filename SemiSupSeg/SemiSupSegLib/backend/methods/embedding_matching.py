"""Embedding matching (``em``; Xie et al., MIDL 2024; method.md §2).

The EMA teacher-student loop of ``teacher_student.py`` with:

- a Monte Carlo dropout teacher (M noisy passes); per-voxel uncertainty = mean of the passes'
  entropies; voxels under the rising threshold are *reliable* and the student learns the
  teacher's argmax there (L_UA);
- *unreliable* voxels labeled by embedding matching: reference voxels are drawn from the
  labeled patches in a thin band just inside each class's surface (for two classes: k just
  inside the object and k just outside it, since background's surface is the object's), using
  the teacher's embeddings; each unreliable voxel's student embedding is compared by cosine
  similarity with every reference, averaged per class; the argmax (detached) is its label
  (L_NN, cross-entropy of the student's prediction) and the entropy of the softmax over the
  per-class similarities is minimised (L_EN) to widen the margin between classes.

L = L_sup + w_UA L_UA + w_PS (L_NN + L_EN), both weights ramped with ramp(T, s).

``mn+em`` (method.md §3, at the end of this module) composes M&N's co-training (methods/mn.py)
with the same reference sampling, matching and regulariser.

The mean of cosine similarities to a class's references equals the dot product of the
normalised embedding with the mean of the normalised references, so each class is reduced to
one prototype vector: the memory does not grow with k or the number of repetitions l.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from SemiSupSegLib.backend.config import SHARE, TrainConfig
from SemiSupSegLib.backend.methods.base import option, register_method
from SemiSupSegLib.backend.methods.mn import (
    UNLABELED_MODE_HELP,
    UNLABELED_MODES,
    MNMethod,
    MNOptions,
    Teaching,
    labels_one_hot,
)
from SemiSupSegLib.backend.methods.teacher_student import (
    CONSISTENCY_HELP,
    DROPOUT_HELP,
    MC_PASSES_HELP,
    UNCERTAINTY_HELP,
    MonteCarloTeacherOptions,
    TeacherStudentMethod,
    TeacherStudentOptions,
    ramp,
    reliability_threshold,
)
from SemiSupSegLib.backend.settings import OneOf, Range
from SemiSupSegLib.backend.uncertainty import (
    UNCERTAINTY_KINDS,
    class_argmax,
    entropy,
    mc_softmax,
    uncertainty_from_passes,
)
from SemiSupSegLib.method_catalogue import NOT_PUBLISHED

ABSENT = -1e4  # similarity given to classes without references (never chosen, zero softmax)


def surface_band(mask: np.ndarray, band_min: int = 1, band_max: int = 3) -> np.ndarray:
    """Voxels of ``mask`` whose distance to the nearest voxel outside it is in
    [band_min, band_max] (1 = touching the surface). The patch border is not a surface.

    The distance transform runs on a box only: around the mask and around the outside, each
    widened by ``band_max`` + 1 and clipped to the patch. A band voxel and its nearest outside
    voxel both lie in that box, and no voxel outside it is in the band, so the result is the
    whole patch's, at a fraction of the cost when a class is small next to the patch.
    """
    mask = np.asarray(mask, dtype=bool)
    band = np.zeros_like(mask)
    if not mask.any() or mask.all():
        return band
    margin = max(1, int(np.ceil(band_max))) + 1
    inside, outside = _bounds(mask), _bounds(~mask)
    box = tuple(
        slice(max(0, max(a[0], b[0]) - margin), min(size, min(a[1], b[1]) + margin))
        for a, b, size in zip(inside, outside, mask.shape)
    )
    crop = mask[box]
    distance = ndimage.distance_transform_edt(crop)
    band[box] = crop & (distance >= band_min) & (distance <= band_max)
    return band


def _bounds(mask: np.ndarray) -> list:
    """Per axis, (first, last + 1) index where ``mask`` has a voxel (``mask`` not empty)."""
    bounds = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        bounds.append((int(hit[0]), int(hit[-1]) + 1))
    return bounds


def reference_voxels(
    labels: np.ndarray,
    num_classes: int,
    k: int = 16,
    repeats: int = 5,
    band: Tuple[int, int] = (1, 3),
    rng: Optional[np.random.Generator] = None,
) -> Dict[int, np.ndarray]:
    """Reference voxel indices per class from label patches (B, z, y, x): from each patch, k
    voxels of the class's surface band (fewer if the band is smaller), drawn ``repeats`` times.
    Returns {class: int array (N, 4) of (patch, z, y, x)}; classes without a band are absent."""
    rng = rng or np.random.default_rng()
    references: Dict[int, list] = {}
    for b, patch in enumerate(labels):
        for c in range(num_classes):
            where = np.argwhere(surface_band(patch == c, *band))
            if len(where) == 0:
                continue
            for _ in range(repeats):
                chosen = where[rng.choice(len(where), size=min(k, len(where)), replace=False)]
                references.setdefault(c, []).append(
                    np.concatenate([np.full((len(chosen), 1), b), chosen], axis=1)
                )
    return {c: np.concatenate(parts) for c, parts in references.items()}


@dataclass(frozen=True)
class MatchingOptions:
    """The settings of embedding matching, which ``em`` and ``mn+em`` share."""

    references_k: int = option(
        16, "reference voxels drawn per class from each labeled patch (k)", check=Range(1)
    )
    references_repeats: int = option(
        5, "draws of references_k voxels per patch (l)", check=Range(1)
    )
    band: Tuple[int, int] = option(
        (1, 3), "distance in voxels to a class's surface of its reference voxels: nearest, farthest"
    )
    temperature: float = option(
        1.0,
        "temperature of the softmax over per-class similarities in L_EN",
        check=Range(0, low_open=True),
    )


def draw_references(
    label: torch.Tensor,
    num_classes: int,
    options: MatchingOptions,
    rng: Optional[np.random.Generator],
) -> Dict[int, np.ndarray]:
    """``reference_voxels`` for a labeled batch (N, 1, z, y, x) with the method's k, l and band."""
    return reference_voxels(
        label[:, 0].cpu().numpy(),
        num_classes,
        options.references_k,
        options.references_repeats,
        options.band,
        rng,
    )


def class_prototypes(
    embeddings: torch.Tensor, references: Dict[int, np.ndarray], num_classes: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean of the L2-normalised reference embeddings per class, (C, F), and which classes
    have references, (C,) bool. ``embeddings`` is (B, F, z, y, x).

    Only the reference voxels' vectors are normalised, not the whole map; they are laid out
    as the map is, (1, F, voxels), so that the norms are summed in the same order as over
    the map.
    """
    prototypes = embeddings.new_zeros(num_classes, embeddings.shape[1], dtype=torch.float32)
    present = torch.zeros(num_classes, dtype=torch.bool, device=embeddings.device)
    for c, idx in references.items():
        index = torch.as_tensor(idx, device=embeddings.device)
        vectors = embeddings[index[:, 0], :, index[:, 1], index[:, 2], index[:, 3]].float()
        columns = F.normalize(vectors.t().contiguous()[None], dim=1)[0]
        prototypes[c] = columns.t().contiguous().mean(0)
        present[c] = True
    return prototypes, present


def match_similarities(
    embeddings: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Per-class mean cosine similarity (B, C, ...) of every voxel's embedding (B, F, ...)
    with the class's references; classes without references get ``ABSENT``."""
    normalised = F.normalize(embeddings.float(), dim=1)
    similarity = torch.einsum("bf...,cf->bc...", normalised, prototypes)
    shape = [1, -1] + [1] * (similarity.dim() - 2)
    return torch.where(present.view(shape), similarity, torch.full_like(similarity, ABSENT))


def matching_entropy(similarity: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-voxel entropy of the softmax over per-class similarities (L_EN before reduction)."""
    return entropy(torch.softmax(similarity / temperature, dim=1), dim=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the voxels of ``mask`` (0 when it is empty)."""
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


MATCHING_REDUCTIONS = ("all", "unreliable")


def matching_mean(values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """A per-voxel matching loss reduced over the unreliable voxels ``mask``.

    ``"unreliable"`` averages over those voxels only (the published form): however few they
    are, their labels carry the loss's full weight. ``"all"`` sums over them and divides by
    every unlabeled voxel, so the loss weighs as much as the share of voxels it labels, as
    each voxel of the consistency loss does.
    """
    if reduction == "unreliable":
        return masked_mean(values, mask)
    return (values * mask.float()).sum() / max(1, mask.numel())


def limit_share(unsure: torch.Tensor, score: torch.Tensor, share: Optional[float]) -> torch.Tensor:
    """``unsure`` limited to the ``share`` of voxels with the highest ``score`` (None: as is).

    A guard against a feedback loop: wrong matched labels raise uncertainty, which sends
    more voxels to matching.
    """
    if share is None or share >= 1.0:
        return unsure
    limit = int(float(share) * unsure.numel())
    if int(unsure.sum()) <= limit:
        return unsure
    if limit <= 0:
        return torch.zeros_like(unsure)
    scores = torch.where(unsure, score.float(), torch.full_like(score, -1.0, dtype=torch.float))
    cut = torch.topk(scores.flatten(), limit, sorted=True).values[-1]
    return unsure & (scores >= cut)


class EmbeddingMatcher:
    """Embedding matching, the part ``em`` and ``mn+em`` share: class prototypes from
    reference voxels in the surface bands of a batch's labeled patches, each voxel's similarity
    to them, its matched class and the entropy regulariser (L_EN).

    The references are drawn from a stream of their own (``seed + 7``).
    """

    def __init__(self, num_classes: int, options: MatchingOptions, seed: int) -> None:
        self.num_classes = num_classes
        self.options = options
        self.rng = np.random.default_rng(seed + 7)

    def prototypes(
        self, reference_features: torch.Tensor, label: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prototypes (C, F) and which classes have references (C,), from the embeddings
        (B, F, ...) of the labeled patches whose labels are ``label`` (B, 1, ...)."""
        references = draw_references(label, self.num_classes, self.options, self.rng)
        return class_prototypes(reference_features, references, self.num_classes)

    def entropy(self, similarity: torch.Tensor) -> torch.Tensor:
        """Per-voxel L_EN of similarities (B, C, ...)."""
        return matching_entropy(similarity, self.options.temperature)


@dataclass(frozen=True)
class EMOptions(MatchingOptions, TeacherStudentOptions):
    """em's settings: the teacher-student loop's with em's published values (but the CPU
    preset's 2 Monte Carlo passes, 5 published), and the matching's."""

    dropout: Optional[float] = option(0.15, DROPOUT_HELP, check=SHARE)
    mc_passes: int = option(2, MC_PASSES_HELP, "5", Range(1))
    uncertainty: str = option("mean-entropy", UNCERTAINTY_HELP, check=OneOf(UNCERTAINTY_KINDS))
    consistency: str = option("ce", CONSISTENCY_HELP, check=OneOf(("mse", "ce")))
    consistency_weight: float = option(
        0.25,
        "final value of the ramped weight of the loss on reliable voxels (w_UA)",
        check=Range(0),
    )
    matching_weight: float = option(
        0.125,
        "final value of the ramped weight of L_NN + L_EN on unreliable voxels (w_PS)",
        check=Range(0),
    )
    entropy_regulariser: bool = option(
        True, "add L_EN, the entropy of the softmax over per-class similarities"
    )
    matching_reduction: str = option(
        "all",
        "all: the matching losses summed over the unreliable voxels, divided by every "
        "unlabeled voxel; unreliable: their mean over the unreliable voxels",
        "unreliable",
        OneOf(MATCHING_REDUCTIONS),
    )


@register_method("em", options=EMOptions, uses_unlabeled=True)
class EmbeddingMatchingMethod(TeacherStudentMethod):
    """Embedding matching: the shared teacher-student loop plus matching on unreliable voxels."""

    options: EMOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.matcher = EmbeddingMatcher(self.num_classes, self.options, self.config.seed)

    def weights(self, iteration: int) -> Dict[str, float]:
        w = super().weights(iteration)
        w["matching"] = ramp(iteration, self.ramp_total, self.options.matching_weight)
        return w

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
        o = self.options
        unreliable = ~reliable
        image_l = labeled["image"].to(self.device, non_blocking=True)
        self.teacher.eval()
        with torch.no_grad(), self.autocast():
            _, teacher_features = self.teacher.forward_with_features(image_l)
        prototypes, present = self.matcher.prototypes(teacher_features, label)
        info = {"unreliable_share": float(unreliable.float().mean())}
        if int(present.sum()) < 2 or not bool(unreliable.any()):
            return {}, info
        similarity = match_similarities(student_features_u, prototypes, present)
        matched = class_argmax(similarity).detach()
        reduction = o.matching_reduction
        per_voxel = F.cross_entropy(logits_u, matched, reduction="none")
        losses = {
            "matching": (matching_mean(per_voxel, unreliable, reduction), weights["matching"])
        }
        if o.entropy_regulariser:
            en = self.matcher.entropy(similarity)
            losses["entropy"] = (matching_mean(en, unreliable, reduction), weights["matching"])
        info["matching_classes"] = int(present.sum())
        return losses, info


@dataclass(frozen=True)
class MNEMOptions(MatchingOptions, MonteCarloTeacherOptions, MNOptions):
    """mn+em's settings: M&N's, the Monte Carlo teacher's, the matching's, and which voxels
    are matched."""

    dropout: float = option(
        0.15,
        "dropout of the 3D network (the 2D model has none: its passes differ by noise)",
        NOT_PUBLISHED,
        SHARE,
    )
    mc_passes: int = option(2, MC_PASSES_HELP, "5", Range(1))
    uncertainty: str = option("mean-entropy", UNCERTAINTY_HELP, check=OneOf(UNCERTAINTY_KINDS))
    disagreement: bool = option(
        False,
        "voxels where the 2D and 3D models' argmax differ are unsure too (on the benchmark it "
        "fed a loop that collapsed training)",
        "true (the method's description)",
    )
    max_unreliable_share: Optional[float] = option(
        0.05,
        "at most this share of a batch's voxels, the most uncertain, is matched; None: no limit",
        "None",
        Range(0, 1),
    )
    entropy_weight: float = option(
        0.125, "final value of the ramped weight of L_EN on the 3D student", check=Range(0)
    )
    unlabeled_mode: str = option(
        "replace",
        UNLABELED_MODE_HELP + "; mn+em was not measured with add",
        check=OneOf(UNLABELED_MODES),
    )


@register_method("mn+em", options=MNEMOptions, uses_unlabeled=True, needs_2d_encoder=True)
class MNEmbeddingMatchingMethod(MNMethod):
    """M&N co-training (methods/mn.py, unchanged schedule and losses) where, when a model learns
    from the other's pseudo-mask, the voxels the teacher is unsure of are labeled by embedding
    matching instead (method.md §3).

    Unsure: the teacher's Monte Carlo uncertainty (3D: dropout and input noise; 2D: input noise)
    over the rising threshold; with ``disagreement`` also where the 2D and 3D argmax differ
    (off by default: on the benchmark it fed a loop in which wrong matched labels made the
    models disagree more, until training collapsed); at most ``max_unreliable_share`` of the
    voxels, the most uncertain. Matching runs in the 3D network's
    embedding space (the 2D model has no embedding head): references from the labeled patches
    of the batch, queries from the unlabeled ones; the matched label replaces the soft
    pseudo-mask there (one-hot). When the 3D model is the student, L_EN on those voxels is
    added with a ramped weight. M&N's options are taken as mn takes them (``MNEMOptions``).
    """

    options: MNEMOptions

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device) -> None:
        super().__init__(config, num_classes, device)
        self.refiner = MatchingRefiner(self.options, num_classes, config)

    def dropout_3d(self) -> Optional[float]:
        return self.options.dropout


class MatchingRefiner:
    """M&N's pseudo-mask with embedding matching on the voxels its teacher is unsure of
    (``mn+em``; see MNEmbeddingMatchingMethod): a ``PseudoLabelRefiner`` of methods/mn.py.

    The teacher's Monte Carlo passes give the mean probabilities and the uncertainty; the
    voxels over the rising threshold (at most ``max_unreliable_share``, the most uncertain)
    take the class their 3D embedding matches, one-hot. The teaching's regulariser is L_EN on
    the 3D student's embeddings of those voxels, against the same prototypes.
    """

    def __init__(self, options: MNEMOptions, num_classes: int, config: TrainConfig) -> None:
        self.options = options
        self.num_classes = num_classes
        self.matcher = EmbeddingMatcher(num_classes, options, config.seed)
        self.ramp_total = max(1.0, options.ramp_fraction * config.iterations)

    def teach(
        self,
        method: MNMethod,
        teacher: str,
        images: torch.Tensor,
        labeled: Dict[str, torch.Tensor],
        iteration: int,
    ) -> Teaching:
        o = self.options
        net3d, net2d = method.net3d, method.net2d
        network = net3d if teacher == "3d" else net2d
        with method.autocast():
            passes = mc_softmax(network, images, o.mc_passes, o.teacher_noise)
        probs = passes.mean(0)
        threshold = reliability_threshold(
            iteration, self.ramp_total, self.num_classes, o.threshold_scale
        )
        uncertainty = uncertainty_from_passes(passes, o.uncertainty)
        unreliable = uncertainty >= threshold
        image_l = labeled["image"].to(method.device, non_blocking=True)
        net3d.eval()
        net2d.eval()
        with torch.no_grad(), method.autocast():
            _, reference_features = net3d.forward_with_features(image_l)
            logits_3d, query_features = net3d.forward_with_features(images)
            if o.disagreement:
                other = net2d(images) if teacher == "3d" else logits_3d
                disagree = class_argmax(other) != class_argmax(probs)
                unreliable |= disagree
                uncertainty = uncertainty + disagree.float()  # matched first when over the limit
        unreliable = limit_share(unreliable, uncertainty, o.max_unreliable_share)
        prototypes, present = self.matcher.prototypes(reference_features, labeled["label"])
        share = float(unreliable.float().mean())
        info = {"unreliable_share": share, "reliable_share": 1.0 - share}
        if int(present.sum()) < 2:
            return Teaching(probs, info=info)
        matched = class_argmax(match_similarities(query_features, prototypes, present))
        onehot = labels_one_hot(matched[:, None], self.num_classes).to(probs.dtype)
        target = torch.where(unreliable[:, None], onehot, probs)
        if not o.entropy_weight:
            return Teaching(target, info=info)
        weight = ramp(iteration, self.ramp_total, o.entropy_weight)

        def regulariser(features: torch.Tensor) -> Tuple[torch.Tensor, float]:
            """L_EN on the unlabeled patches' matched voxels (the batch's last ones)."""
            similarity = match_similarities(features[-unreliable.shape[0] :], prototypes, present)
            return masked_mean(self.matcher.entropy(similarity), unreliable), weight

        return Teaching(target, regulariser, info)
