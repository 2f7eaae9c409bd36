#!/usr/bin/env python3
"""Are embedding-matching labels better than the teacher's own where the teacher is unsure?

Embedding matching (``em``, method.md §2) relabels the voxels whose Monte Carlo uncertainty is
over the threshold by comparing their embeddings with reference voxels of labeled patches. It
can only help if those labels are more often right than the teacher's argmax on the same
voxels. This script measures both on test cases whose truth is known: for a benchmark run
folder (``benchmark-runs/<key>`` with run/, labeled.txt, test.txt), it takes a patch-sized
centre crop of each test case (the input size the network was trained on), runs M noisy
dropout passes, and, per uncertainty threshold, reports the share of voxels over it, their
foreground share, and the accuracy of the teacher's argmax and of matching with the published
mean reduction (class prototypes), with the nearest reference (max) and with the mean of the 5
nearest. References are drawn as training draws them, from two labeled cases per test case.

    python scripts/matching_accuracy.py benchmark-runs/em-L8-s0-unet-it1500
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSupSeg"))

from SemiSupSegLib.backend.inference import Predictor  # noqa: E402
from SemiSupSegLib.backend.methods.embedding_matching import (  # noqa: E402
    class_prototypes,
    match_similarities,
    reference_voxels,
)
from SemiSupSegLib.backend.preprocessing import xyz_to_zyx  # noqa: E402
from SemiSupSegLib.backend.uncertainty import mc_softmax, uncertainty_from_passes  # noqa: E402
from SemiSupSegLib.output_layout import RUN_FOLDER  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "msd-hippocampus"
REDUCTIONS = ("teacher", "mean", "max", "top5")


def centre_crop(predictor: Predictor, data: Path, case: str) -> tuple:
    """The case's prepared image (1, 1, z, y, x) and truth, cropped (edge-padded if smaller)
    to the training patch size around the centre."""
    image = sitk.ReadImage(str(data / "imagesTr" / f"{case}.nii.gz"))
    x = torch.as_tensor(predictor.prepare(case, image).image[None]).float()
    y = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{case}.nii.gz")))
    size = xyz_to_zyx(predictor.preprocessing["patch_size"])
    pad = [max(0, s - a) for a, s in zip(x.shape[2:], size)]
    if any(pad):
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        y = np.pad(y, [(0, p) for p in pad])
    start = [(a - s) // 2 for a, s in zip(x.shape[2:], size)]
    region = tuple(slice(b, b + s) for b, s in zip(start, size))
    return x[(slice(None), slice(None)) + region], y[region]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="benchmark run folder (run/, labeled.txt, test.txt)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--cases", type=int, default=10, help="test cases used")
    parser.add_argument("--mc-samples", type=int, default=5)
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.52, 0.69, 0.82])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run, data = Path(args.run), Path(args.data)
    predictor = Predictor.from_run(run / RUN_FOLDER, device="cpu")
    network = predictor.network.eval()
    num_classes = int(network.spec["num_classes"])
    rng = np.random.default_rng(args.seed)

    labeled = []
    with torch.no_grad():
        for case in (run / "labeled.txt").read_text().split():
            x, y = centre_crop(predictor, data, case)
            labeled.append((F.normalize(network.forward_with_features(x)[1], dim=1), y))

    groups = {
        t: {"voxels": 0, "foreground": 0, **dict.fromkeys(REDUCTIONS, 0)} for t in args.thresholds
    }
    total = 0
    for case in (run / "test.txt").read_text().split()[: args.cases]:
        x, y = centre_crop(predictor, data, case)
        with torch.no_grad():
            passes = mc_softmax(network, x, args.mc_samples, 0.01)
            features = F.normalize(network.forward_with_features(x)[1], dim=1)
        uncertainty = uncertainty_from_passes(passes, "mean-entropy")[0].numpy()
        labels = {"teacher": passes.mean(0)[0].argmax(0).numpy()}
        chosen = rng.choice(len(labeled), size=2, replace=False)
        vectors = {c: [] for c in range(num_classes)}
        prototype_sum = torch.zeros(num_classes, features.shape[1])
        count = torch.zeros(num_classes)
        for i in chosen:
            reference_features, truth = labeled[i]
            references = reference_voxels(truth[None], num_classes, 16, 5, (1, 3), rng)
            prototypes, present = class_prototypes(reference_features, references, num_classes)
            prototype_sum += prototypes
            count += present.float()
            for c, index in references.items():
                vectors[c].append(reference_features[0][:, index[:, 1], index[:, 2], index[:, 3]].T)
        prototypes = prototype_sum / count.clamp_min(1)[:, None]
        labels["mean"] = match_similarities(features, prototypes, count > 0)[0].argmax(0).numpy()
        queries = features[0].reshape(features.shape[1], -1).T
        nearest, top5 = [], []
        for c in range(num_classes):
            similarity = queries @ torch.cat(vectors[c]).T
            nearest.append(similarity.max(1).values)
            top5.append(similarity.topk(5, dim=1).values.mean(1))
        labels["max"] = torch.stack(nearest, 1).argmax(1).reshape(y.shape).numpy()
        labels["top5"] = torch.stack(top5, 1).argmax(1).reshape(y.shape).numpy()
        total += y.size
        for threshold, group in groups.items():
            unsure = uncertainty >= threshold
            group["voxels"] += int(unsure.sum())
            group["foreground"] += int((y[unsure] > 0).sum())
            for name in REDUCTIONS:
                group[name] += int((labels[name][unsure] == y[unsure]).sum())

    rows = []
    print("threshold  unsure share  foreground share  accuracy: " + "  ".join(REDUCTIONS))
    for threshold, g in groups.items():
        n = max(1, g["voxels"])
        row = {
            "threshold": threshold,
            "unsure_share": g["voxels"] / total,
            "foreground_share": g["foreground"] / n,
            **{f"accuracy_{name}": g[name] / n for name in REDUCTIONS},
        }
        rows.append(row)
        print(
            f"{threshold:9.2f}  {row['unsure_share']:12.4f}  {row['foreground_share']:16.3f}  "
            + "  ".join(f"{row[f'accuracy_{name}']:.3f}" for name in REDUCTIONS)
        )
    (run / "matching_accuracy.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
