"""Faster forms of method computations give the answers of the direct ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from SemiSupSegLib.backend.methods.embedding_matching import class_prototypes, surface_band
from SemiSupSegLib.backend.uncertainty import class_argmax


def _direct_band(mask: np.ndarray, low: int, high: int) -> np.ndarray:
    if not mask.any() or mask.all():
        return np.zeros_like(mask)
    distance = ndimage.distance_transform_edt(mask)
    return mask & (distance >= low) & (distance <= high)


@pytest.mark.parametrize("band", [(1, 3), (1, 1), (2, 5)])
def test_surface_band_on_a_box_equals_the_whole_patch_transform(band):
    rng = np.random.default_rng(0)
    shape = (20, 24, 18)
    masks = [np.zeros(shape, bool), np.ones(shape, bool)]
    for _ in range(30):  # blobs of every size, some touching the patch border
        seeds = np.zeros(shape)
        seeds[tuple(rng.integers(0, s) for s in shape)] = 1
        radius = rng.uniform(1, 12)
        masks.append(ndimage.distance_transform_edt(seeds == 0) <= radius)
    masks += [~m for m in masks[2:12]]
    masks.append(rng.random(shape) < 0.3)
    labels = np.zeros(shape, np.uint8)
    labels[2:9, 3:15, 4:10], labels[9:14, 3:15, 4:10] = 1, 2
    masks += [labels == c for c in range(3)]
    for mask in masks:
        np.testing.assert_array_equal(surface_band(mask, *band), _direct_band(mask, *band))


def test_prototypes_from_the_reference_vectors_equal_those_of_the_normalised_map():
    torch.manual_seed(0)
    embeddings = torch.randn(2, 16, 12, 14, 10)
    rng = np.random.default_rng(0)
    references = {
        0: np.stack([rng.integers(0, n, 80) for n in (2, 12, 14, 10)], axis=1),
        2: np.array([[1, 5, 6, 4], [0, 1, 2, 3]]),
    }
    prototypes, present = class_prototypes(embeddings, references, 3)
    normalised = F.normalize(embeddings, dim=1)
    for c, idx in references.items():
        expected = normalised[idx[:, 0], :, idx[:, 1], idx[:, 2], idx[:, 3]].mean(0)
        torch.testing.assert_close(prototypes[c], expected, rtol=1e-6, atol=1e-7)
    assert present.tolist() == [True, False, True] and not prototypes[1].any()


def test_class_argmax_is_argmax_with_first_index_on_ties():
    scores = torch.randint(0, 3, (2, 4, 5, 6, 7)).float()  # many ties
    assert torch.equal(class_argmax(scores), scores.argmax(1))
    assert torch.equal(class_argmax(scores, 0), scores.argmax(0))
