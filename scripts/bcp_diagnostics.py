#!/usr/bin/env python3
"""Why `bcp` scores far below supervised training at the CPU plan: a loss bug, or pasted patches
the network cannot read? Losses of a trained supervised model on the same labeled patches plain,
with a cuboid of another pasted in (BCP's pre-training), and mixed with unlabeled patches
labeled by the model's own predictions (BCP's self-training), through `bcp`'s own functions.

If the masked loss were wrong, "masked, all voxels" would differ from "plain". If pasting is the
problem, the model scores far worse on pasted patches, even against its own pseudo-labels
(which match its predictions exactly before pasting). Writes a Markdown table to stdout.

    python scripts/bcp_diagnostics.py --run /work/benchmark-runs/la-supervised-L8-s0-unet-it1500-val \\
        --data /work/data/LA > docs/bcp-diagnostics.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSupSeg"))

from SemiSupSegLib.backend.checkpoint import load_checkpoint  # noqa: E402
from SemiSupSegLib.backend.config import TrainConfig  # noqa: E402
from SemiSupSegLib.backend.data import BatchSource  # noqa: E402
from SemiSupSegLib.backend.datasets import load_dataset  # noqa: E402
from SemiSupSegLib.backend.methods.base import segmentation_loss  # noqa: E402
from SemiSupSegLib.backend.methods.copy_paste import (  # noqa: E402
    MaskedSegmentationLoss,
    bidirectional_mix,
    copy_paste,
    copy_paste_loss,
    cuboid_mask,
)
from SemiSupSegLib.backend.networks import network_from_spec  # noqa: E402
from SemiSupSegLib.output_layout import CASES_FILE, CONFIG_FILE, MODEL_FILE, RUN_FOLDER  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a benchmark run (supervised)")
    parser.add_argument("--data", type=Path, required=True, help="its dataset")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--ratio", type=float, default=2 / 3, help="the cuboid's side share")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    run = args.run / RUN_FOLDER
    state = load_checkpoint(run / MODEL_FILE)
    network = network_from_spec(state["model"]["spec"])
    network.load_state_dict(state["model"]["state_dict"])
    network.eval()
    config = TrainConfig.from_dict(json.loads((run / CONFIG_FILE).read_text()))
    cases = json.loads((run / CASES_FILE).read_text())
    by_name = {c.name: c for c in load_dataset(args.data).all_cases()}
    labeled = [by_name[c["name"]] for c in cases["labeled"]]
    unlabeled = [by_name[c["name"]] for c in cases.get("unlabeled", [])][:8]
    source = BatchSource(labeled, unlabeled, config, seed=0)
    loss, masked = segmentation_loss(), MaskedSegmentationLoss(len(state["classes"]))
    n = config.batch_size
    print(f"Run `{args.run.name}`, patch {config.patch_size}, batch {n}, cuboid {args.ratio:.2f}")
    print("of each side; Dice + cross-entropy (the run's loss), mixed losses per half.\n")
    print("| batch | plain | masked, all voxels | pasted (pre-training) | mixed: labeled part |"
          " mixed: own pseudo-labels |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for index in range(args.batches):
            batch, other = source.labeled(n), source.unlabeled(n)
            image, label = batch["image"], batch["label"]
            cuboid = cuboid_mask(image.shape[2:], args.ratio, "random")
            plain = float(loss(network(image), label))
            everywhere = float(
                masked(network(image), label, torch.ones_like(label, dtype=torch.bool))
            )
            pasted_image = copy_paste(image, image.roll(-1, 0), cuboid)
            pasted_label = copy_paste(label, label.roll(-1, 0), cuboid)
            pasted = float(loss(network(pasted_image), pasted_label))
            pseudo = network(other["image"]).argmax(1, keepdim=True)
            mixed = bidirectional_mix(image, label, other["image"], pseudo, cuboid)
            _, from_labeled, from_unlabeled = copy_paste_loss(
                masked, network(mixed.images), mixed, 1.0
            )
            print(f"| {index} | {plain:.3f} | {everywhere:.3f} | {pasted:.3f} | "
                  f"{float(from_labeled) / 2:.3f} | {float(from_unlabeled) / 2:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
