"""Monte Carlo dropout uncertainty, shared by training (the teacher's reliability filter) and
prediction (the map a user reviews).

M stochastic passes of one network (dropout on, optional Gaussian input noise) are run as one
batch of M copies rather than a loop, since dropout draws an independent mask per batch item.
From the stacked softmax outputs (M, B, C, ...) three per-voxel measures in nats follow:

- mean of entropies (``"mean-entropy"``, embedding matching's choice): the average uncertainty
  of a single pass; high where the class is ambiguous (e.g. blurry boundaries) *or* the model
  is unsure, in 0 .. ln C;
- entropy of the mean (``"entropy-of-mean"``, UA-MT's choice): the entropy of the averaged
  prediction, also 0 .. ln C and never below the mean of entropies;
- their difference, the mutual information: the part due to disagreement between passes (the
  model's own uncertainty); zero for a network without dropout.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

UNCERTAINTY_KINDS = ("mean-entropy", "entropy-of-mean", "mutual-information")


def enable_mc_dropout(network: nn.Module) -> int:
    """Put dropout layers in training mode (everything else stays in eval); return how many."""
    count = 0
    for module in network.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.train()
            count += 1
    return count


def entropy(probabilities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entropy in nats along the class axis.

    Not ``torch.special.entr``: its gradient at a probability of 0 (a saturated softmax) is
    infinite and turns L_EN's gradient into NaN, and below the 1e-8 floor its values differ
    (training would no longer be bit-identical)."""
    return -(probabilities * torch.log(probabilities.clamp_min(1e-8))).sum(dim)


def class_argmax(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Index of the largest value along ``dim``, the first one on ties, as ``argmax``; through
    ``max``, which is about ten times faster on CPU along any but the last dimension."""
    return scores.max(dim).indices


def batched_passes(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    passes: int,
    noise_std: float = 0.0,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """Run ``forward`` on ``passes`` copies of ``x`` (B, ...) in batches of at most ``chunk``
    copies, each with fresh Gaussian input noise; return the outputs stacked (passes, B, ...)."""
    chunk = max(1, min(passes, chunk or passes))
    outputs = []
    done = 0
    while done < passes:
        n = min(chunk, passes - done)
        copies = x.repeat(n, *([1] * (x.dim() - 1)))
        if noise_std > 0:
            copies = copies + torch.randn_like(copies) * noise_std
        out = forward(copies)
        outputs.append(out.reshape(n, x.shape[0], *out.shape[1:]))
        done += n
    return torch.cat(outputs, 0)


def mc_softmax(
    network: nn.Module,
    x: torch.Tensor,
    passes: int,
    noise_std: float = 0.0,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """Softmax of ``passes`` Monte Carlo dropout passes, (passes, B, C, ...), without gradients.

    The network is left in eval mode with its dropout layers active during the passes, and
    restored to the mode it had.
    """
    was_training = network.training
    network.eval()
    enable_mc_dropout(network)
    try:
        with torch.no_grad():
            logits = batched_passes(network, x, passes, noise_std, chunk)
    finally:
        network.train(was_training)
    return torch.softmax(logits.float(), dim=2)


def uncertainty_from_passes(stack: torch.Tensor, kind: str = "mean-entropy") -> torch.Tensor:
    """Per-voxel uncertainty from stacked softmax passes (M, B, C, ...) -> (B, ...)."""
    if kind == "mean-entropy":
        return entropy(stack, dim=2).mean(0)
    if kind == "entropy-of-mean":
        return entropy(stack.mean(0), dim=1)
    if kind == "mutual-information":
        return (entropy(stack.mean(0), dim=1) - entropy(stack, dim=2).mean(0)).clamp_min(0.0)
    raise ValueError(f"unknown uncertainty {kind!r}; use one of {UNCERTAINTY_KINDS}")


def has_dropout(network: nn.Module) -> bool:
    """Whether ``network`` has a dropout layer that drops anything (p > 0): without one, Monte
    Carlo passes are all the same and their mutual information is zero by construction."""
    return any(
        isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
        for module in network.modules()
    )
