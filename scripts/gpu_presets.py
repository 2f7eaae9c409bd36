#!/usr/bin/env python3
"""GPU presets (patch size and batch by GPU memory), estimated on a machine without a GPU.

Training memory is the weights with their gradients and AdamW state (4 copies) plus the
activations the forward pass keeps for backward. The second is measured here, on CPU, by
summing the bytes of every tensor autograd saves during one training forward of the 3D
network (``torch.autograd.graph.saved_tensors_hooks``) at two patch sizes; it grows linearly
with the voxels of the batch, which the two sizes check. Mixed precision (on by default on
CUDA) keeps most of them in float16: the fp16 column assumes half, an approximation.
Methods multiply the student's activations: a teacher forward without gradients keeps none,
so ``em``/``mean-teacher`` need about the student's batch (labeled + unlabeled patches); ``mn``
adds the 2D model (small at these sizes). The presets leave a quarter of the memory free for
the CUDA context, cuDNN workspaces and fragmentation. Not measured on a GPU: a first run
should watch ``nvidia-smi``.

    python scripts/gpu_presets.py            # writes docs/gpu-presets.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSupSeg"))

from SemiSupSegLib.backend.memory import saved_bytes  # noqa: E402
from SemiSupSegLib.backend.networks import create_network  # noqa: E402

GPU_GIB = (8, 12, 16, 24, 48, 80)
PATCHES = (
    (64, 64, 64),
    (96, 96, 64),
    (96, 96, 96),
    (128, 128, 96),
    (128, 128, 128),
    (160, 160, 128),
)
PROBES = ((64, 64, 64), (96, 96, 64))
REPORT = ROOT / "docs" / "gpu-presets.md"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--networks", nargs="+", default=["unet", "segresnet"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# GPU presets",
        "",
        "Estimated, not measured on a GPU (none here): see `scripts/gpu_presets.py` for how.",
        "Activation bytes per voxel of the batch come from the tensors autograd saves in one",
        "training forward on CPU (float32); fp16 assumes mixed precision halves them.",
        "",
        "| network | parameters | weights + AdamW (MiB) | activations, bytes/voxel fp32 | "
        "bytes/voxel ratio of the two probe sizes (1 = linear) |",
        "|---|---|---|---|---|",
    ]
    presets = []
    for name in args.networks:
        network = create_network(name, num_classes=3, dropout=0.0).train()
        params = sum(p.numel() for p in network.parameters())
        per_voxel = []
        for size in PROBES:
            voxels = size[0] * size[1] * size[2]
            per_voxel.append(saved_bytes(network, size) / voxels)
        check = per_voxel[1] / per_voxel[0]
        state_mib = params * 4 * 4 / 2**20
        lines.append(
            f"| {name} | {params / 1e6:.1f} M | {state_mib:.0f} | {per_voxel[1]:.0f} | "
            f"{check:.2f} |"
        )
        presets.append((name, per_voxel[1], state_mib))

    lines += [
        "",
        "Memory for a training step by patch (x, y, z), mixed precision: GiB for batch 2, the",
        "smallest common GPU that holds it with a quarter of its memory to spare, and the largest",
        "batch on that GPU. A teacher-student method's student sees labeled and unlabeled",
        "patches together: give it half that batch. Set them with `--set patch_size=X,Y,Z",
        "--set batch_size=N`.",
        "",
        "| network | patch | GiB at batch 2 | smallest GPU | batch there |",
        "|---|---|---|---|---|",
    ]
    for name, per_voxel, state_mib in presets:
        for patch in PATCHES:
            voxels = patch[0] * patch[1] * patch[2]
            sample = voxels * per_voxel / 2
            need = (2 * sample + state_mib * 2**20) / 2**30
            fits = [g for g in GPU_GIB if 0.75 * g >= need]
            gpu = f"{fits[0]} GiB" if fits else "none listed"
            batch = int((0.75 * fits[0] * 2**30 - state_mib * 2**20) // sample) if fits else 0
            lines.append(
                f"| {name} | {'x'.join(map(str, patch))} | {need:.1f} | {gpu} | {batch or '-'} |"
            )
    lines += ["", "Reproduce: `python scripts/gpu_presets.py`", ""]
    REPORT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
