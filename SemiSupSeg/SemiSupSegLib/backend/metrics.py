"""Segmentation evaluation with MONAI's metrics: per case and class, and over a folder of cases.

Metrics, per foreground class value, from MONAI (``compute_dice``, ``compute_iou``,
``compute_hausdorff_distance(percentile=95)``,
``compute_average_surface_distance(symmetric=True)``):

- ``dice``, ``iou``: overlap, 0..1.
- ``hd95``: 95th percentile of the symmetric surface distance, in mm.
- ``asd``: symmetric average surface distance, in mm.

Arrays are label maps in SimpleITK array order (z, y, x); spacing is given in SimpleITK order
(x, y, z) and reversed here before it reaches MONAI, so anisotropic voxels are measured right.

Conventions for empty masks (a class absent from the prediction and/or the truth), chosen so
that every number is finite and an absent structure is never rewarded with 0 mm:

- both empty: dice 1, iou 1, hd95 0 mm, asd 0 mm (nothing to find, nothing found).
- one empty, the other not (a missed structure or a false detection): dice 0, iou 0, and hd95
  and asd take a penalty equal to the image's physical diagonal in mm,
  ``sqrt(sum((size * spacing) ** 2))``, the largest distance possible inside the image.
  The flag ``penalty`` is then true (in ``metrics.csv``: ``empty_prediction`` or
  ``empty_truth``; otherwise ``none``).

No output value is ever NaN or infinite.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)

from SemiSupSegLib.backend.atomic_files import write_text_atomic
from SemiSupSegLib.backend.datasets import files_by_case, label_maps
from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.backend.prediction_manifest import check_complete
from SemiSupSegLib.backend.validation import validate_label
from SemiSupSegLib.backend.volumes import geometry_mismatch
from SemiSupSegLib.output_layout import (
    METRICS_FILE,
    SUMMARY_FILE,
    MetricsRow,
    read_table,
    table_text,
)
from SemiSupSegLib.protocol import IMAGE_SUFFIXES

PENALTY_CONVENTION = (
    "Both prediction and truth empty for a class: dice 1, iou 1, hd95 0 mm, asd 0 mm. "
    "Exactly one of them empty: dice 0, iou 0, and hd95 and asd are set to the image's physical "
    "diagonal in mm, sqrt(sum((size*spacing)^2)), with penalty flagged "
    "(empty_prediction or empty_truth)."
)

#: ``case_metrics``'s keys and their columns in ``metrics.csv`` (``MetricsRow``), which are also
#: the keys of the statistics in ``summary.json``.
_COLUMNS = {"dice": "dice", "iou": "iou", "hd95": "hd95_mm", "asd": "asd_mm"}


# ---------------------------------------------------------------- one case


def case_metrics(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    class_values: Sequence[int],
) -> dict[int, dict[str, float]]:
    """Dice, IoU, HD95 (mm) and ASD (mm) per class value of two label maps of one case.

    ``prediction`` and ``truth`` are integer label maps in SimpleITK array order (z, y, x);
    ``spacing`` is in SimpleITK order (x, y, z). Each class gets ``dice``, ``iou``, ``hd95``,
    ``asd`` and the flags ``penalty``, ``prediction_empty``, ``truth_empty`` (bools); see the
    module docstring for the empty-mask conventions.
    """
    prediction = np.asarray(prediction)
    truth = np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from truth shape {truth.shape}"
        )
    if len(spacing) != prediction.ndim:
        raise ValueError(
            f"spacing {tuple(spacing)} has {len(spacing)} values for a {prediction.ndim}-D array"
        )
    spacing_xyz = [float(s) for s in spacing]
    if not all(math.isfinite(s) and s > 0 for s in spacing_xyz):
        raise ValueError(f"spacing {tuple(spacing_xyz)} must be positive and finite")
    # SimpleITK gives spacing as (x, y, z); the array axes are (z, y, x).
    spacing_array_order = tuple(reversed(spacing_xyz))
    diagonal = float(
        math.sqrt(sum((n * s) ** 2 for n, s in zip(prediction.shape, spacing_array_order)))
    )

    results: dict[int, dict[str, float]] = {}
    for value in class_values:
        value = int(value)
        # One class at a time, as (1, 1, z, y, x) one-hot tensors: MONAI converts inputs to
        # float, so stacking all classes would cost C float volumes of memory at once.
        pred_mask = torch.from_numpy(np.ascontiguousarray(prediction == value))[None, None]
        true_mask = torch.from_numpy(np.ascontiguousarray(truth == value))[None, None]
        pred_empty = not bool(pred_mask.any())
        true_empty = not bool(true_mask.any())
        if pred_empty and true_empty:
            results[value] = _result(1.0, 1.0, 0.0, 0.0, False, True, True)
        elif pred_empty or true_empty:
            results[value] = _result(0.0, 0.0, diagonal, diagonal, True, pred_empty, true_empty)
        else:
            results[value] = _both_present(pred_mask, true_mask, spacing_array_order, diagonal)
    return results


def _result(
    dice: float,
    iou: float,
    hd95: float,
    asd: float,
    penalty: bool,
    prediction_empty: bool,
    truth_empty: bool,
) -> dict[str, float]:
    return {
        "dice": dice,
        "iou": iou,
        "hd95": hd95,
        "asd": asd,
        "penalty": penalty,
        "prediction_empty": prediction_empty,
        "truth_empty": truth_empty,
    }


def _both_present(
    pred: torch.Tensor, truth: torch.Tensor, spacing: Tuple[float, ...], diagonal: float
) -> dict[str, float]:
    """MONAI's metrics for one class present in both masks (so all of them are defined)."""
    with warnings.catch_warnings():
        # MONAI 1.5+ calls one of its own deprecated arguments internally; not our concern.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        dice = float(compute_dice(pred, truth, include_background=True, ignore_empty=False))
        iou = float(compute_iou(pred, truth, include_background=True, ignore_empty=False))
        hd95 = float(
            compute_hausdorff_distance(
                pred, truth, include_background=True, percentile=95, spacing=spacing
            )
        )
        asd = float(
            compute_average_surface_distance(
                pred, truth, include_background=True, symmetric=True, spacing=spacing
            )
        )
    # Both masks are non-empty, so these are finite; guard anyway so NaN can never leak out.
    values = [v if math.isfinite(v) else fallback for v, fallback in ((dice, 0.0), (iou, 0.0))]
    distances = [v if math.isfinite(v) else diagonal for v in (hd95, asd)]
    return _result(values[0], values[1], distances[0], distances[1], False, False, False)


# ---------------------------------------------------------------- folders


def evaluate_folders(
    prediction_dir: Path,
    truth: Path,
    out_dir: Path,
    classes: Optional[dict[int, str]] = None,
) -> dict:
    """Score every prediction file against its truth; write metrics.csv and summary.json.

    ``prediction_dir`` holds ``<case>.<ext>`` label maps (subfolders, e.g. ``uncertainty/``,
    are ignored). ``truth`` is a dataset (anything ``train --data`` reads: an MSD or nnU-Net
    ``dataset.json``, a folder holding one, or a folder with ``imagesTr/`` and ``labelsTr/``)
    whose labeled cases give the labels, or a folder of label files. Files are listed, cases
    named, label maps read and checked, and geometries compared by the rules training uses
    (``datasets``, ``validation``, ``volumes``). ``classes`` maps foreground label values to
    names; by default the dataset's classes, else the non-zero values found in the files.
    Every foreground value in the files must be one of the classes. Raises DataError naming
    the file for an unreadable file, a prediction without truth, a geometry mismatch, when no
    case matches, or for a folder whose ``predictions.json`` says it is partial or mixed.
    Returns the summary.
    """
    prediction_dir = Path(prediction_dir)
    truth = Path(truth)
    out_dir = Path(out_dir)
    if not prediction_dir.is_dir():
        raise DataError(prediction_dir, "the prediction folder does not exist")
    check_complete(prediction_dir)  # a partial or mixed folder of ours would mislead
    predictions = files_by_case(prediction_dir)
    truths, truth_classes = label_maps(truth)
    if not predictions:
        raise DataError(prediction_dir, f"no prediction files ({', '.join(IMAGE_SUFFIXES)})")

    missing = sorted(set(predictions) - set(truths))
    if missing:
        raise DataError(
            predictions[missing[0]],
            f"no truth label for case {missing[0]!r} in {truth}"
            + (f" ({len(missing)} such predictions)" if len(missing) > 1 else ""),
        )
    names = sorted(predictions)

    if classes is not None:
        class_names = {int(k): str(v) for k, v in classes.items() if int(k) != 0}
    elif truth_classes is not None:
        class_names = {k: v for k, v in truth_classes.items() if k != 0}
    else:
        class_names = None  # found from the files as we go
    allowed = None if class_names is None else {0: "background", **class_names}

    per_case: Dict[str, dict[int, dict[str, float]]] = {}
    found_values: set = set()
    for name in names:
        pred_path, truth_path = predictions[name], truths[name]
        pred_image, pred_values = validate_label(pred_path, allowed)
        truth_image, truth_values = validate_label(truth_path, allowed)
        mismatch = geometry_mismatch(pred_image, truth_image)
        if mismatch:
            raise DataError(
                pred_path,
                f"prediction geometry differs from the truth {truth_path} ({mismatch}; "
                "prediction vs truth); resample it onto the truth's grid",
            )
        values = (pred_values | truth_values) - {0}
        found_values |= values
        evaluate = sorted(class_names) if class_names is not None else sorted(values)
        pred = sitk.GetArrayViewFromImage(pred_image)
        true = sitk.GetArrayViewFromImage(truth_image)
        per_case[name] = case_metrics(pred, true, truth_image.GetSpacing(), evaluate)

    if class_names is None:
        class_names = {v: f"class {v}" for v in sorted(found_values)}
        for name in names:
            for value in class_names:
                # A class absent from both files of this case: both empty.
                per_case[name].setdefault(value, _result(1.0, 1.0, 0.0, 0.0, False, True, True))
    if not class_names:
        raise DataError(truth, "no foreground class to evaluate (all label maps are empty)")

    summary = _summary(per_case, class_names, prediction_dir, truth, len(truths))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / METRICS_FILE, table_text(_rows(per_case, class_names), MetricsRow))
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def case_mean_dice(metrics_csv: Path) -> Dict[str, float]:
    """Mean foreground Dice per case from an evaluation's ``metrics.csv``: what paired
    comparisons of two runs on the same cases use."""
    per_case: Dict[str, List[float]] = {}
    for row in read_table(metrics_csv, MetricsRow):
        per_case.setdefault(row.case, []).append(row.dice)
    return {case: sum(values) / len(values) for case, values in per_case.items()}


def format_summary(summary: dict) -> str:
    """A few lines for a terminal: per class Dice and HD95, then the mean foreground Dice."""
    lines = [f"Evaluated {summary['num_cases']} case(s), {len(summary['classes'])} class(es)"]
    width = max((len(c["name"]) for c in summary["classes"].values()), default=0)
    for value, stats in summary["classes"].items():
        dice, hd95 = stats["dice"], stats["hd95_mm"]
        line = (
            f"  {value:>3} {stats['name']:<{width}}  "
            f"Dice {dice['mean']:.3f} ± {dice['std']:.3f}  "
            f"HD95 {hd95['mean']:.2f} ± {hd95['std']:.2f} mm (median {hd95['median']:.2f})"
        )
        if stats["num_penalties"]:
            line += f"  [{stats['num_penalties']} empty-mask penalt"
            line += "y]" if stats["num_penalties"] == 1 else "ies]"
        lines.append(line)
    lines.append(f"  Mean foreground Dice {summary['mean_foreground']['dice']:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- helpers


def _penalty_word(result: dict[str, float]) -> str:
    if not result["penalty"]:
        return "none"
    return "empty_prediction" if result["prediction_empty"] else "empty_truth"


def _rows(
    per_case: Dict[str, dict[int, dict[str, float]]], class_names: Dict[int, str]
) -> List[MetricsRow]:
    return [
        MetricsRow(
            case=name,
            class_value=value,
            class_name=class_names[value],
            penalty=_penalty_word(per_case[name][value]),
            **{column: float(per_case[name][value][key]) for key, column in _COLUMNS.items()},
        )
        for name in sorted(per_case)
        for value in sorted(class_names)
    ]


def _stats(values: Sequence[float]) -> Dict[str, float]:
    array = np.asarray(values, dtype=float)
    return {
        "mean": float(array.mean()),
        "std": float(array.std()),
        "median": float(np.median(array)),
    }


def _summary(
    per_case: Dict[str, dict[int, dict[str, float]]],
    class_names: Dict[int, str],
    prediction_dir: Path,
    truth: Path,
    num_truth_cases: int,
) -> dict:
    cases = sorted(per_case)
    per_class: Dict[str, Any] = {}
    for value in sorted(class_names):
        results = [per_case[c][value] for c in cases]
        entry: Dict[str, Any] = {"name": class_names[value]}
        for key, column in _COLUMNS.items():
            entry[column] = _stats([r[key] for r in results])
        entry["num_penalties"] = int(sum(bool(r["penalty"]) for r in results))
        per_class[str(value)] = entry
    mean_foreground = {
        column: float(np.mean([per_class[str(v)][column]["mean"] for v in class_names]))
        for column in _COLUMNS.values()
    }
    return {
        "num_cases": len(cases),
        "num_truth_cases_without_prediction": num_truth_cases - len(cases),
        "classes": per_class,
        "mean_foreground": mean_foreground,
        "statistics": "mean, population std and median over cases; mean_foreground is the "
        "mean of the per-class means",
        "penalty_convention": PENALTY_CONVENTION,
        "prediction_dir": str(prediction_dir),
        "truth": str(truth),
        "cases": cases,
    }
