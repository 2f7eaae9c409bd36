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

The mean of cosine similarities to a class's references equals the dot product of the
normalised embedding with the mean of the normalised references, so each class is reduced to
one prototype vector: the memory does not grow with k or the number of repetitions l.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from SemiSupSegLib.backend.methods.base import register_method
from SemiSupSegLib.backend.methods.teacher_student import TeacherStudentMethod, ramp
from SemiSupSegLib.backend.uncertainty import entropy

ABSENT = -1e4  # similarity given to classes without references (never chosen, zero softmax)


def surface_band(mask: np.ndarray, band_min: int = 1, band_max: int = 3) -> np.ndarray:
    """Voxels of ``mask`` whose distance to the nearest voxel outside it is in
    [band_min, band_max] (1 = touching the surface). The patch border is not a surface."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or mask.all():
        return np.zeros_like(mask)
    distance = ndimage.distance_transform_edt(mask)
    return mask & (distance >= band_min) & (distance <= band_max)


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


def class_prototypes(
    embeddings: torch.Tensor, references: Dict[int, np.ndarray], num_classes: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean of the L2-normalised reference embeddings per class, (C, F), and which classes
    have references, (C,) bool. ``embeddings`` is (B, F, z, y, x)."""
    normalised = F.normalize(embeddings.float(), dim=1)
    prototypes = normalised.new_zeros(num_classes, embeddings.shape[1])
    present = torch.zeros(num_classes, dtype=torch.bool, device=embeddings.device)
    for c, idx in references.items():
        index = torch.as_tensor(idx, device=embeddings.device)
        vectors = normalised[index[:, 0], :, index[:, 1], index[:, 2], index[:, 3]]
        prototypes[c] = vectors.mean(0)
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
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


@register_method("em")
class EmbeddingMatchingMethod(TeacherStudentMethod):
    """Embedding matching: the shared teacher-student loop plus matching on unreliable voxels.

    Defaults are the published ones except ``mc_passes``: 5 published, 2 on the CPU preset
    (each pass is one more teacher forward of the unlabeled batch).
    """

    DEFAULTS = {
        **TeacherStudentMethod.DEFAULTS,
        "dropout": 0.15,
        "mc_passes": 2,
        "uncertainty": "mean-entropy",
        "consistency": "ce",
        "consistency_weight": 0.25,  # w_UA
        "matching_weight": 0.125,  # w_PS, on L_NN + L_EN
        "entropy_regulariser": True,
        "references_k": 16,
        "references_repeats": 5,
        "band": [1, 3],  # voxels, distance to the class surface
        "temperature": 1.0,  # of the softmax over per-class similarities in L_EN
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = np.random.default_rng(self.config.seed + 7)

    def weights(self, iteration: int) -> Dict[str, float]:
        w = super().weights(iteration)
        w["matching"] = ramp(iteration, self.ramp_total, self.options["matching_weight"])
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
        references = reference_voxels(
            label[:, 0].cpu().numpy(),
            self.num_classes,
            int(o["references_k"]),
            int(o["references_repeats"]),
            tuple(int(v) for v in o["band"]),
            self.rng,
        )
        image_l = labeled["image"].to(self.device, non_blocking=True)
        self.teacher.eval()
        with torch.no_grad(), self.autocast():
            _, teacher_features = self.teacher.forward_with_features(image_l)
        prototypes, present = class_prototypes(teacher_features, references, self.num_classes)
        info = {"unreliable_share": float(unreliable.float().mean())}
        if int(present.sum()) < 2 or not bool(unreliable.any()):
            return {}, info
        similarity = match_similarities(student_features_u, prototypes, present)
        matched = similarity.argmax(1).detach()
        nn_loss = masked_mean(F.cross_entropy(logits_u, matched, reduction="none"), unreliable)
        losses = {"matching": (nn_loss, weights["matching"])}
        if o["entropy_regulariser"]:
            en = matching_entropy(similarity, float(o["temperature"]))
            losses["entropy"] = (masked_mean(en, unreliable), weights["matching"])
        info["matching_classes"] = int(present.sum())
        return losses, info
