#!/usr/bin/env python3
"""Dice of benchmark runs by an evaluator that shares no code with SemiSupSeg.

``semisupseg evaluate`` (MONAI's metrics) is what the benchmark reports; this script recomputes
per-class Dice of the written label maps with SimpleITK's ``LabelOverlapMeasuresImageFilter``
against the dataset's truth files, after checking that each prediction has the truth's
geometry (size, spacing, origin, direction). The first run named is the reference of a paired
comparison: per run, mean Dice per class, the mean change per case against the reference, how
many cases improve, and a two-sided sign test.

    python scripts/independent_check.py supervised-L8-s0-unet-it1500 em-L8-s0-unet-it1500
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "msd-hippocampus"
CLASSES = {1: "Anterior", 2: "Posterior"}


def geometry(image: sitk.Image) -> tuple:
    return (
        image.GetSize(),
        np.round(image.GetSpacing(), 5).tolist(),
        np.round(image.GetOrigin(), 4).tolist(),
        np.round(image.GetDirection(), 5).tolist(),
    )


def run_dice(run: Path, truth_dir: Path) -> Dict[str, Dict[int, float]]:
    """{case: {class: Dice}} for every prediction of ``run`` listed in its test.txt."""
    cases = (run / "test.txt").read_text().split()
    result = {}
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    for case in cases:
        name = Path(case).name.replace(".nii.gz", "")
        prediction = sitk.ReadImage(str(run / "predictions" / f"{name}.nii.gz"), sitk.sitkUInt8)
        truth = sitk.ReadImage(str(truth_dir / f"{name}.nii.gz"), sitk.sitkUInt8)
        if geometry(prediction) != geometry(truth):
            raise SystemExit(f"{run.name}/{name}: the prediction's geometry differs from the truth")
        overlap.Execute(truth, prediction)
        result[name] = {c: overlap.GetDiceCoefficient(c) for c in CLASSES}
    return result


def sign_test(better: int, worse: int) -> float:
    """Two-sided exact sign test p-value (ties dropped)."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="benchmark run keys; the first is the reference")
    parser.add_argument("--work", default=str(ROOT / "benchmark-runs"))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    args = parser.parse_args()
    truth_dir = Path(args.data) / "labelsTr"
    dice = {key: run_dice(Path(args.work) / key, truth_dir) for key in args.runs}
    reference = dice[args.runs[0]]
    print(f"| run | {' | '.join(CLASSES.values())} | mean change | cases better | sign test p |")
    print("|---|" + "---|" * (len(CLASSES) + 3))
    for key in args.runs:
        scores = dice[key]
        if set(scores) != set(reference):
            sys.exit(f"{key}: not the same test cases as {args.runs[0]}")
        per_class = [np.mean([s[c] for s in scores.values()]) for c in CLASSES]
        change: List[float] = [
            np.mean([scores[n][c] for c in CLASSES]) - np.mean([reference[n][c] for c in CLASSES])
            for n in reference
        ]
        better = sum(d > 0 for d in change)
        worse = sum(d < 0 for d in change)
        cells = " | ".join(f"{v:.4f}" for v in per_class)
        if key == args.runs[0]:
            print(f"| {key} | {cells} | reference | | |")
        else:
            p = sign_test(better, worse)
            print(
                f"| {key} | {cells} | {np.mean(change):+.4f} | {better}/{len(change)} | {p:.2g} |"
            )


if __name__ == "__main__":
    main()
