#!/usr/bin/env python3
"""Does the uncertainty map point at the errors? Measured on a benchmark run's test cases.

For a run folder of ``scripts/benchmark.py`` (``benchmark-runs/<key>``), predict the test cases
listed in its ``test.txt`` with M Monte Carlo dropout passes (and with M = 1, the softmax
entropy, for comparison); then, over all voxels of all test cases, compare the uncertainty of
wrongly and correctly labeled voxels: the mean of each group and the AUROC of uncertainty as a
detector of errors (0.5 = no better than chance). Both over the whole volume and over the
region near the structures (truth or prediction dilated by 3 voxels), where nearly all errors
are and where background is not trivially certain. The case score's rank correlation with
the case's mean foreground Dice says whether scores.csv orders review sensibly.

    python scripts/uncertainty_auroc.py benchmark-runs/em-L8-s0-unet-it300 --mc-samples 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSupSeg"))

from SemiSupSegLib.backend.inference import Predictor  # noqa: E402
from SemiSupSegLib.output_layout import RUN_FOLDER  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "msd-hippocampus"


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for finding ``positive`` (Mann-Whitney U)."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def dice(pred: np.ndarray, truth: np.ndarray, value: int) -> float:
    p, t = pred == value, truth == value
    total = p.sum() + t.sum()
    return float(2 * (p & t).sum() / total) if total else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="benchmark run folder (with run/ and test.txt)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--mc-samples", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="JSON file for the results (default: <run>/uncertainty.json)")
    args = parser.parse_args()

    work = Path(args.run)
    names = [n for n in (work / "test.txt").read_text().split() if n]
    predictor = Predictor.from_run(work / RUN_FOLDER, device=args.device)
    print(f"model dropout: {predictor.network.spec.get('dropout')}", flush=True)
    results = {}
    for samples in sorted({1, args.mc_samples}):
        pooled = {"all": ([], []), "near": ([], [])}
        case_scores, case_dice = [], []
        for name in names:
            image = sitk.ReadImage(str(Path(args.data) / "imagesTr" / f"{name}.nii.gz"))
            truth = sitk.GetArrayFromImage(
                sitk.ReadImage(str(Path(args.data) / "labelsTr" / f"{name}.nii.gz"))
            )
            prediction = predictor.predict(name, image, samples)
            label = sitk.GetArrayFromImage(prediction.label)
            uncertainty = sitk.GetArrayFromImage(prediction.uncertainty)
            wrong = label != truth
            near = ndimage.binary_dilation((truth > 0) | (label > 0), iterations=3)
            for region, mask in (("all", np.ones_like(near)), ("near", near)):
                pooled[region][0].append(uncertainty[mask])
                pooled[region][1].append(wrong[mask])
            case_scores.append(prediction.score)
            case_dice.append(np.mean([dice(label, truth, v) for v in (1, 2)]))
        entry = {}
        for region, (values, errors) in pooled.items():
            u, e = np.concatenate(values), np.concatenate(errors)
            entry[region] = {
                "voxels": int(u.size),
                "error_share": float(e.mean()),
                "mean_uncertainty_wrong": float(u[e].mean()),
                "mean_uncertainty_correct": float(u[~e].mean()),
                "auroc": auroc(u, e),
            }
        rho = stats.spearmanr(case_scores, case_dice)
        entry["case_score_vs_dice_spearman"] = float(rho.statistic)
        entry["mean_foreground_dice"] = float(np.mean(case_dice))
        results[f"mc_samples={samples}"] = entry
        print(f"mc_samples={samples}: {json.dumps(entry, indent=1)}", flush=True)
    out = Path(args.out) if args.out else work / "uncertainty.json"
    out.write_text(json.dumps({"run": str(work), "cases": len(names), **results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
