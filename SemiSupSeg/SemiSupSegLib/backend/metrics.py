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

import csv
import io
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
from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.backend.prediction_manifest import check_complete
from SemiSupSegLib.protocol import IMAGE_SUFFIXES, case_name_from_path

PENALTY_CONVENTION = (
    "Both prediction and truth empty for a class: dice 1, iou 1, hd95 0 mm, asd 0 mm. "
    "Exactly one of them empty: dice 0, iou 0, and hd95 and asd are set to the image's physical "
    "diagonal in mm, sqrt(sum((size*spacing)^2)), with penalty flagged "
    "(empty_prediction or empty_truth)."
)

METRIC_NAMES = ("dice", "iou", "hd95_mm", "asd_mm")
CSV_COLUMNS = ("case", "class_value", "class_name", "dice", "iou", "hd95_mm", "asd_mm", "penalty")

_SPACING_RTOL = 1e-4
_ORIGIN_ATOL_MM = 1e-3
_DIRECTION_ATOL = 1e-4


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
    are ignored). ``truth`` is a folder of label files named by case, or an MSD
    ``dataset.json`` (or a folder holding one) whose ``training`` entries give the labels.
    ``classes`` maps foreground label values to names; by default the manifest's ``labels``,
    else the non-zero values found in the files. Every foreground value in the files must be
    one of the classes. Raises DataError naming the file for an unreadable file, a prediction
    without truth, a geometry mismatch, when no case matches, or for a folder whose
    ``predictions.json`` says it is partial or mixed. Returns the summary.
    """
    prediction_dir = Path(prediction_dir)
    truth = Path(truth)
    out_dir = Path(out_dir)
    if not prediction_dir.is_dir():
        raise DataError(prediction_dir, "the prediction folder does not exist")
    check_complete(prediction_dir)  # a partial or mixed folder of ours would mislead
    predictions = _image_files(prediction_dir)
    truths, manifest_classes = _truth_files(truth)
    if not predictions:
        raise DataError(prediction_dir, "no prediction files (.nii.gz, .nii, .nrrd, .mha, .mhd)")

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
    elif manifest_classes is not None:
        class_names = {k: v for k, v in manifest_classes.items() if k != 0}
    else:
        class_names = None  # found from the files as we go

    per_case: Dict[str, dict[int, dict[str, float]]] = {}
    found_values: set = set()
    for name in names:
        pred_path, truth_path = predictions[name], truths[name]
        pred_image = _read_label(pred_path)
        truth_image = _read_label(truth_path)
        _check_geometry(pred_image, pred_path, truth_image, truth_path)
        pred = sitk.GetArrayViewFromImage(pred_image)
        true = sitk.GetArrayViewFromImage(truth_image)
        values = set()
        for array, path in ((pred, pred_path), (true, truth_path)):
            present = _label_values(array, path)
            if class_names is not None:
                unknown = sorted(present - set(class_names) - {0})
                if unknown:
                    raise DataError(
                        path,
                        f"contains label value(s) {unknown} that are not among the classes "
                        f"{sorted(class_names)}",
                    )
            values |= present
        values.discard(0)
        found_values |= values
        evaluate = sorted(class_names) if class_names is not None else sorted(values)
        per_case[name] = case_metrics(pred, true, truth_image.GetSpacing(), evaluate)

    if class_names is None:
        class_names = {v: f"class {v}" for v in sorted(found_values)}
        for name in names:
            for value in class_names:
                # A class absent from both files of this case: both empty.
                per_case[name].setdefault(value, _result(1.0, 1.0, 0.0, 0.0, False, True, True))
    if not class_names:
        raise DataError(truth, "no foreground class to evaluate (all label maps are empty)")

    rows = _rows(per_case, class_names)
    summary = _summary(per_case, class_names, prediction_dir, truth, len(truths))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "metrics.csv", _csv_text(rows))
    write_text_atomic(
        out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n"
    )
    return summary


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


def _image_files(folder: Path) -> Dict[str, Path]:
    """Image files directly inside ``folder`` by case name (subfolders and hidden files skipped)."""
    files: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if not path.name.lower().endswith(IMAGE_SUFFIXES):
            continue
        name = case_name_from_path(str(path))
        if name in files:
            raise DataError(path, f"case {name!r} also has the file {files[name].name}")
        files[name] = path
    return files


def _truth_files(truth: Path) -> Tuple[Dict[str, Path], Optional[Dict[int, str]]]:
    """Truth label files by case name, and the manifest's classes when there is a manifest."""
    if truth.is_dir() and not (truth / "dataset.json").is_file():
        files = _image_files(truth)
        if not files:
            raise DataError(
                truth, "no label files (.nii.gz, .nii, .nrrd, .mha, .mhd) in the folder"
            )
        return files, None
    manifest = truth / "dataset.json" if truth.is_dir() else truth
    if not manifest.is_file():
        raise DataError(truth, "the truth folder or dataset.json does not exist")
    return _read_manifest(manifest)


def _read_manifest(manifest: Path) -> Tuple[Dict[str, Path], Optional[Dict[int, str]]]:
    """Labeled cases and classes of an MSD ``dataset.json`` (paths relative to its folder).

    Only the label paths matter here, so this small reader does not touch the images. A case is
    named as in the job protocol: its ``name`` if given, else its image's file name.
    """
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(manifest, f"cannot read the file ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise DataError(manifest, f"not valid JSON (line {err.lineno}: {err.msg})") from err
    if not isinstance(data, dict) or not isinstance(data.get("training"), list):
        raise DataError(manifest, "expected an MSD dataset.json with a 'training' list")
    files: Dict[str, Path] = {}
    for index, entry in enumerate(data["training"]):
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(label, str) or not label:
            raise DataError(manifest, f"training[{index}] has no 'label' path")
        path = Path(label)
        if not path.is_absolute():
            path = (manifest.parent / path).resolve()
        name = entry.get("name") or case_name_from_path(str(entry.get("image") or label))
        if name in files:
            raise DataError(manifest, f"case {name!r} is listed twice in 'training'")
        files[name] = path
    return files, _manifest_classes(data.get("labels"), manifest)


def _manifest_classes(labels: Any, manifest: Path) -> Optional[Dict[int, str]]:
    """MSD ``labels``: value -> name ({"0": "background"}) or name -> value (nnU-Net v2)."""
    if labels is None:
        return None
    if not isinstance(labels, dict):
        raise DataError(manifest, "'labels' must be an object of label value -> name")
    classes: Dict[int, str] = {}
    for key, item in labels.items():
        try:
            if isinstance(item, int) and not isinstance(item, bool):
                classes[item] = str(key)
            else:
                classes[int(key)] = str(item)
        except (TypeError, ValueError):
            raise DataError(
                manifest, f"'labels' entry {key!r}: {item!r} has no integer value"
            ) from None
    return classes


def _read_label(path: Path) -> sitk.Image:
    if not path.is_file():
        raise DataError(path, "the label file does not exist")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        lines = str(err).strip().splitlines() or ["unknown error"]
        raise DataError(path, f"cannot read the image ({lines[-1]})") from err
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(path, "expected a label map with one value per voxel, got a vector image")
    return image


def _label_values(array: np.ndarray, path: Path) -> set:
    values = np.unique(array)
    if values.dtype.kind == "f" and not np.all(np.isfinite(values) & (values == np.round(values))):
        raise DataError(path, "expected an integer label map, found non-integer values")
    if values.size and values.min() < 0:
        raise DataError(path, f"negative label value {values.min()} in a label map")
    return {int(v) for v in values}


def _check_geometry(pred: sitk.Image, pred_path: Path, truth: sitk.Image, truth_path: Path) -> None:
    """Raise DataError naming the prediction when it does not lie on the truth's voxel grid."""
    problems = []
    if pred.GetSize() != truth.GetSize():
        problems.append(f"size {pred.GetSize()} vs {truth.GetSize()}")
    else:
        p_sp, t_sp = np.array(pred.GetSpacing()), np.array(truth.GetSpacing())
        if not np.allclose(p_sp, t_sp, rtol=_SPACING_RTOL, atol=1e-6):
            problems.append(f"spacing {_fmt(p_sp)} vs {_fmt(t_sp)}")
        p_or, t_or = np.array(pred.GetOrigin()), np.array(truth.GetOrigin())
        if not np.allclose(p_or, t_or, rtol=1e-5, atol=_ORIGIN_ATOL_MM):
            problems.append(f"origin {_fmt(p_or)} vs {_fmt(t_or)}")
        p_dir, t_dir = np.array(pred.GetDirection()), np.array(truth.GetDirection())
        if not np.allclose(p_dir, t_dir, rtol=0, atol=_DIRECTION_ATOL):
            problems.append(f"direction {_fmt(p_dir)} vs {_fmt(t_dir)}")
    if problems:
        raise DataError(
            pred_path,
            "prediction geometry differs from the truth "
            f"{truth_path} ({'; '.join(problems)}); resample it onto the truth's grid",
        )


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _penalty_word(result: dict[str, float]) -> str:
    if not result["penalty"]:
        return "none"
    return "empty_prediction" if result["prediction_empty"] else "empty_truth"


def _rows(
    per_case: Dict[str, dict[int, dict[str, float]]], class_names: Dict[int, str]
) -> List[List[Any]]:
    rows = []
    for name in sorted(per_case):
        for value in sorted(class_names):
            r = per_case[name][value]
            rows.append(
                [name, value, class_names[value]]
                + [f"{r[k]:.6f}" for k in ("dice", "iou", "hd95", "asd")]
                + [_penalty_word(r)]
            )
    return rows


def _csv_text(rows: List[List[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
    return buffer.getvalue()


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
    keys = {"dice": "dice", "iou": "iou", "hd95_mm": "hd95", "asd_mm": "asd"}
    per_class: Dict[str, Any] = {}
    for value in sorted(class_names):
        results = [per_case[c][value] for c in cases]
        entry: Dict[str, Any] = {"name": class_names[value]}
        for out_key, key in keys.items():
            entry[out_key] = _stats([r[key] for r in results])
        entry["num_penalties"] = int(sum(bool(r["penalty"]) for r in results))
        per_class[str(value)] = entry
    mean_foreground = {
        k: float(np.mean([per_class[str(v)][k]["mean"] for v in class_names])) for k in keys
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
