"""Monte Carlo dropout uncertainty on cases with a known answer."""

from __future__ import annotations

import math

import numpy as np
import torch

from SemiSupSegLib.backend.inference import Predictor
from SemiSupSegLib.backend.networks import create_network
from SemiSupSegLib.backend.preprocessing import PreparedVolume
from SemiSupSegLib.backend.uncertainty import (
    batched_passes,
    entropy,
    mc_softmax,
    uncertainty_from_passes,
)

PATCH = (16, 16, 16)


def _input(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(seed))


def test_network_without_dropout_has_zero_mc_uncertainty():
    torch.manual_seed(0)
    network = create_network(
        "unet", 3, feature_channels=8, dropout=0.0, channels=(4, 8, 16), strides=(2, 2)
    )
    passes = mc_softmax(network, _input(), passes=4)
    assert passes.shape == (4, 2, 3, *PATCH)
    assert torch.allclose(passes, passes[:1].expand_as(passes), atol=1e-6)
    information = uncertainty_from_passes(passes, "mutual-information")
    assert float(information.abs().max()) < 1e-5
    assert torch.allclose(
        uncertainty_from_passes(passes, "mean-entropy"),
        uncertainty_from_passes(passes, "entropy-of-mean"),
        atol=1e-5,
    )


def test_dropout_gives_positive_mutual_information_within_bounds():
    torch.manual_seed(0)
    network = create_network(
        "unet", 3, feature_channels=8, dropout=0.3, channels=(4, 8, 16), strides=(2, 2)
    )
    network.eval()
    passes = mc_softmax(network, _input(), passes=4)
    assert not any(m.training for m in network.modules())  # mode restored
    information = uncertainty_from_passes(passes, "mutual-information")
    assert float(information.mean()) > 1e-4
    mean_entropy = uncertainty_from_passes(passes, "mean-entropy")
    of_mean = uncertainty_from_passes(passes, "entropy-of-mean")
    assert bool((of_mean >= mean_entropy - 1e-5).all())  # Jensen
    assert float(of_mean.max()) <= math.log(3) + 1e-5


def test_batched_passes_draw_independent_noise_per_copy_and_chunk():
    x = torch.zeros(3, 1, 2, 2, 2)
    out = batched_passes(lambda t: t * 1.0, x, passes=5, noise_std=1.0, chunk=2)
    assert out.shape == (5, 3, 1, 2, 2, 2)
    flat = out.reshape(5, -1)
    assert len({tuple(row.tolist()) for row in flat}) == 5


def test_predictor_mc_map_is_softmax_entropy_without_dropout():
    """Without dropout, M batched passes give the single-pass probabilities and entropy."""
    torch.manual_seed(0)
    network = create_network(
        "unet", 3, feature_channels=8, dropout=0.0, channels=(4, 8, 16), strides=(2, 2)
    )
    predictor = Predictor(
        network, {0: "bg", 1: "a", 2: "b"}, {"patch_size": PATCH}, torch.device("cpu")
    )
    image = np.random.default_rng(0).normal(size=(1, 20, 18, 17)).astype(np.float32)
    volume = PreparedVolume("case", image, None, None, None)
    probs1, unc1 = predictor.probabilities(volume, mc_samples=1)
    probs3, unc3 = predictor.probabilities(volume, mc_samples=3)
    assert probs1.shape == (3, 20, 18, 17) and unc1.shape == (20, 18, 17)
    np.testing.assert_allclose(probs1, probs3, atol=1e-5)
    np.testing.assert_allclose(unc1, unc3, atol=1e-5)
    np.testing.assert_allclose(unc1, entropy(torch.as_tensor(probs1), dim=0).numpy(), atol=1e-6)


def test_entropy_of_a_saturated_softmax_has_a_finite_gradient():
    logits = torch.tensor([[0.0, 200.0, -200.0]], requires_grad=True)
    entropy(torch.softmax(logits, dim=1)).sum().backward()
    assert torch.isfinite(logits.grad).all()
