"""Case scores for the review order: which unlabeled case a clinician should correct first.

Every score is higher for a case to review sooner; ``predict`` writes them all into
``scores.csv`` (``output_layout.CASE_SCORES``) and copies the one the product ships
(``output_layout.REVIEW_SCORE``) into its ``score`` column. ``scripts/review_order_benchmark.py``
measures which of them picks the cases whose correction helps the model most.

- ``boundary_uncertainty`` (shipped): the mean voxel uncertainty in a band around the predicted
  boundary, where errors concentrate, on the input's grid.
- ``disagreement``: the mean total-variation distance ``0.5 * sum_c |p_c - q_c|`` (0..1)
  between the deployed model's class probabilities ``p`` and those ``q`` of the method's
  other trained model (M&N's 2D model), inside the bounding box of both models' predicted
  foreground (grown by ``REGION_MARGIN`` voxels). Co-training teaches each model from the
  other's masks, so where they still disagree neither can teach: query by committee (Seung
  et al., COLT 1992) with the committee the method already trained. Soft, so that a near miss
  counts less than a confident contradiction; the box rather than the volume, so that the
  field of view (how much background a scan holds) does not dilute it, and the union, so that
  a structure one model misses entirely still counts.
- ``mutual_information`` (BALD; Houlsby et al. 2011, Gal et al., ICML 2017): the mean mutual
  information between the prediction and the weights, from Monte Carlo dropout passes, inside
  the predicted foreground's box. It is the part of the uncertainty the model could lose by
  learning (the entropy of one pass, which the shipped score uses, also holds the ambiguity
  of the image itself). Only for a model with dropout and more than one pass.
- ``expected_changed_share``: the voxels a correction is expected to change, as a share of the
  predicted structure: ``sum_v (1 - pbar_v[y_v]) / max(1, |foreground|)``, where ``y_v`` is
  the predicted label and ``pbar_v`` the (mean over passes) class probabilities: under the
  model's own probabilities each voxel's label is wrong with probability ``1 - pbar_v[y_v]``.
  It asks how much of the mask would move, not only where the model hesitates.

The last three are computed on the working grid (where the networks see the image), the
first on the input's grid (as the uncertainty map the user sees).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from SemiSupSegLib.output_layout import REVIEW_SCORE

#: Voxels on either side of the predicted boundary in ``boundary_score``'s band.
BOUNDARY_WIDTH = 2
#: Voxels by which the foreground's bounding box grows for the region scores.
REGION_MARGIN = 2

Region = Tuple[slice, ...]


@dataclass(frozen=True)
class CaseScores:
    """The scores of one case (``output_layout.CASE_SCORES``); None: the model cannot give it."""

    boundary_uncertainty: float
    disagreement: Optional[float] = None
    mutual_information: Optional[float] = None
    expected_changed_share: Optional[float] = None

    def as_dict(self) -> Dict[str, Optional[float]]:
        return asdict(self)

    @property
    def review(self) -> float:
        """The review score: ``REVIEW_SCORE``, or the boundary uncertainty where the model
        cannot give that one."""
        value = getattr(self, REVIEW_SCORE)
        return self.boundary_uncertainty if value is None else float(value)


def boundary_score(
    label: np.ndarray, uncertainty: np.ndarray, width: int = BOUNDARY_WIDTH
) -> float:
    """Mean uncertainty within ``width`` voxels of the predicted boundary (whole volume if empty)."""
    foreground = label > 0
    if not foreground.any():
        return float(uncertainty.mean())
    band = ndimage.binary_dilation(foreground, iterations=width) & ~ndimage.binary_erosion(
        foreground, iterations=width
    )
    return float(uncertainty[band].mean())


def foreground_region(labels: Sequence[np.ndarray], margin: int = REGION_MARGIN) -> Region:
    """The bounding box of the foreground of any of ``labels`` (same shape), grown by
    ``margin`` voxels and clipped to the volume; the whole volume where all are empty."""
    foreground = np.zeros(labels[0].shape, bool)
    for label in labels:
        foreground |= label > 0
    if not foreground.any():
        return tuple(slice(0, size) for size in foreground.shape)
    region = []
    for axis, size in enumerate(foreground.shape):
        other = tuple(a for a in range(foreground.ndim) if a != axis)
        present = np.flatnonzero(foreground.any(axis=other))
        region.append(slice(max(0, present[0] - margin), min(size, present[-1] + 1 + margin)))
    return tuple(region)


def disagreement(probabilities: np.ndarray, other: np.ndarray, region: Region) -> float:
    """Mean total-variation distance between two class-probability maps (C, z, y, x) inside
    ``region``: 0 where they agree, 1 where they put their mass on different classes."""
    inside = (slice(None),) + tuple(region)
    distance = 0.5 * np.abs(probabilities[inside] - other[inside]).sum(0)
    return float(distance.mean())


def expected_changed_share(probabilities: np.ndarray, label: np.ndarray) -> float:
    """The expected number of voxels whose label a correction changes, under the model's own
    class probabilities (C, z, y, x), per voxel of the predicted foreground ``label > 0``."""
    chosen = np.take_along_axis(probabilities, label[None].astype(np.int64), 0)[0]
    expected = float((1.0 - chosen).clip(0.0, 1.0).sum())
    return expected / max(1, int((label > 0).sum()))


def working_grid_scores(
    probabilities: np.ndarray,
    mutual_information: Optional[np.ndarray] = None,
    other: Optional[np.ndarray] = None,
) -> Dict[str, Optional[float]]:
    """The scores computed on the working grid from the deployed model's (mean) class
    probabilities (C, z, y, x), the mutual-information map of its Monte Carlo passes (None:
    no dropout or one pass) and the other model's class probabilities (None: no other model)."""
    label = probabilities.argmax(0)
    region = foreground_region([label])
    scores: Dict[str, Optional[float]] = {
        "expected_changed_share": expected_changed_share(probabilities, label),
        "mutual_information": None,
        "disagreement": None,
    }
    if mutual_information is not None:
        scores["mutual_information"] = float(mutual_information[region].mean())
    if other is not None:
        both = foreground_region([label, other.argmax(0)])
        scores["disagreement"] = disagreement(probabilities, other, both)
    return scores
