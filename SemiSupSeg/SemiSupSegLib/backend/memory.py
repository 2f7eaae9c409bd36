"""Training memory of a 3D network, estimated from the network itself on any device.

Training memory is the weights with their gradients and AdamW's two moments (four float32
copies) plus the activations the forward pass keeps for backward. The second is measured by
summing the bytes of every tensor autograd saves during one training forward of a small probe
batch (``torch.autograd.graph.saved_tensors_hooks``, on the CPU, no GPU needed); it grows
linearly with the voxels of the batch. Mixed precision (on by default on CUDA) keeps most of
them in float16, which this approximates as half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: Weights, gradients and AdamW's two moments, in float32.
STATE_COPIES = 4


@dataclass(frozen=True)
class MemoryModel:
    """Bytes per voxel of the batch, and the fixed bytes of the network's training state."""

    activation_bytes_per_voxel: float
    state_bytes: int

    def training_bytes(self, patch_voxels: int, patches: float, mixed_precision: bool) -> float:
        """Estimated peak bytes of one training step on ``patches`` patches of a size."""
        per_voxel = self.activation_bytes_per_voxel / (2 if mixed_precision else 1)
        return self.state_bytes + per_voxel * patch_voxels * patches


def saved_bytes(network: torch.nn.Module, size_zyx: Sequence[int]) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward of a (1, C, *size) batch."""
    total = 0
    seen = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        return tensor

    in_channels = network.spec["in_channels"] if hasattr(network, "spec") else 1
    x = torch.randn(1, in_channels, *size_zyx)
    network.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(x).sum()
    return total


def measure(network: torch.nn.Module, probe_zyx: Sequence[int]) -> MemoryModel:
    """The memory model of ``network`` from one probe forward of size ``probe_zyx``."""
    voxels = int(probe_zyx[0]) * int(probe_zyx[1]) * int(probe_zyx[2])
    with torch.random.fork_rng():
        per_voxel = saved_bytes(network, probe_zyx) / voxels
    parameters = sum(p.numel() * p.element_size() for p in network.parameters())
    return MemoryModel(per_voxel, STATE_COPIES * parameters)
