"""Checks that a dataset's files can be trained on, before any training starts.

Problems that would make training fail or learn nonsense raise ``DataError`` naming the file and
what is wrong; things worth knowing but harmless come back as warning strings. Nothing is
written anywhere. ``validate_image`` and ``validate_pair`` check one case, so training can call
them while streaming volumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple, Union

import numpy as np
import SimpleITK as sitk

from SemiSupSegLib.backend.datasets import Case, Dataset
from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.backend.volumes import geometry_mismatch, read_image
from SemiSupSegLib.protocol import MODALITIES

PathLike = Union[str, Path]

#: Label values are counted with ``np.bincount`` up to this value, with ``np.unique`` beyond.
_BINCOUNT_LIMIT = 1 << 16


def validate_image(path: PathLike) -> sitk.Image:
    """Read an image and check it is a single-channel 3D volume with finite intensities."""
    image = _read_volume(path, "image")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        voxels = sitk.GetArrayViewFromImage(image)
        nan = int(np.count_nonzero(np.isnan(voxels)))
        infinite = int(np.count_nonzero(np.isinf(voxels)))
        if nan or infinite:
            raise DataError(
                path,
                f"image has {nan} NaN and {infinite} infinite voxel values; "
                "intensities must be finite numbers",
            )
    return image


def validate_label(
    path: PathLike, classes: Optional[Mapping[int, str]]
) -> Tuple[sitk.Image, Set[int]]:
    """Read a label map and check it holds whole numbers among ``classes`` (any >= 0 if None).

    Returns the label image and the set of values it contains.
    """
    label = _read_volume(path, "label map")
    voxels = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(voxels.dtype, np.floating):
        fractional = ~np.isfinite(voxels) | (voxels != np.round(voxels))
        if fractional.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(voxels[fractional])[:5])
            raise DataError(
                path,
                f"label map is not integer-valued (values such as {examples}); "
                "labels must be whole numbers, one per class",
            )
    values = _values_in(voxels)
    negative = sorted(v for v in values if v < 0)
    if negative:
        raise DataError(path, f"label map has negative values {_list(negative)}")
    if classes is not None:
        undeclared = sorted(values - set(classes))
        if undeclared:
            declared = ", ".join(f"{k} ({v})" for k, v in sorted(classes.items()))
            raise DataError(
                path,
                f"label values {_list(undeclared)} are not among the declared classes {declared}",
            )
    return label, values


def validate_pair(
    image_path: PathLike, label_path: PathLike, classes: Optional[Mapping[int, str]]
) -> Tuple[sitk.Image, sitk.Image, List[str]]:
    """Check one labeled case: the image, the label map and that their geometries agree.

    Returns the image, the label map and warnings (e.g. a label map with no foreground).
    """
    image, label, warnings, _ = _validate_pair(image_path, label_path, classes)
    return image, label, warnings


def _validate_pair(
    image_path: PathLike, label_path: PathLike, classes: Optional[Mapping[int, str]]
) -> Tuple[sitk.Image, sitk.Image, List[str], Set[int]]:
    """``validate_pair`` that also returns the label values found."""
    image = validate_image(image_path)
    label, values = validate_label(label_path, classes)
    mismatch = geometry_mismatch(image, label)
    if mismatch:
        raise DataError(
            label_path,
            f"label map does not line up with its image {image_path}: {mismatch} (image vs label)",
        )
    warnings = []
    if values <= {0}:
        warnings.append(f"{label_path}: label map is empty (background only)")
    return image, label, warnings, values


def validate_dataset(dataset: Dataset, check_unlabeled: bool = True) -> List[str]:
    """Check every case of ``dataset``; return warnings, raise ``DataError`` on the first problem.

    Each volume is read once and dropped, so memory stays at one case.
    """
    if not dataset.labeled:
        raise DataError(dataset.source, "the dataset has no labeled case; at least one is needed")
    if dataset.modality not in MODALITIES:
        raise DataError(
            dataset.source,
            f"modality {dataset.modality!r} is not one of {', '.join(MODALITIES)}",
        )
    _check_classes(dataset)
    _check_unique_names(dataset)
    warnings: List[str] = []
    seen: Set[int] = set()
    for case in dataset.labeled:
        if case.label is None:
            raise DataError(case.image, f"case {case.name} is listed as labeled but has no label")
        _, _, case_warnings, values = _validate_pair(case.image, case.label, dataset.classes)
        warnings.extend(case_warnings)
        seen |= values
    if check_unlabeled:
        for case in dataset.unlabeled:
            validate_image(case.image)
    if dataset.classes:
        for value, name in sorted(dataset.classes.items()):
            if value != 0 and value not in seen:
                warnings.append(
                    f"{dataset.source or 'dataset'}: class {value} ({name}) appears in no label map"
                )
    return warnings


def check_dataset(dataset: Dataset, events: Any, check_unlabeled: bool = True) -> None:
    """Validate ``dataset`` before anything is written, telling ``events`` (an EventSink) what
    is being checked and every warning; raises ``DataError`` like ``validate_dataset``."""
    unlabeled = len(dataset.unlabeled) if check_unlabeled else 0
    events.emit(
        "stage",
        stage="validation",
        message=f"checking {len(dataset.labeled)} labeled and {unlabeled} unlabeled case(s)",
    )
    for warning in validate_dataset(dataset, check_unlabeled=check_unlabeled):
        events.warn(warning)


def _read_volume(path: PathLike, what: str) -> sitk.Image:
    """Read ``path`` and check it is a 3D single-component volume."""
    image = read_image(path)
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise DataError(
            path,
            f"{what} has {components} components per voxel (a vector or colour image); "
            "a single-channel 3D volume is needed",
        )
    if image.GetDimension() != 3:
        size = "x".join(str(v) for v in image.GetSize())
        raise DataError(
            path,
            f"{what} is {image.GetDimension()}D (size {size}); a single-channel 3D volume is needed",
        )
    return image


def _values_in(voxels: np.ndarray) -> Set[int]:
    """The distinct whole-number values in ``voxels`` (which hold whole numbers only)."""
    if voxels.size == 0:
        return set()
    low, high = voxels.min(), voxels.max()
    if low >= 0 and high < _BINCOUNT_LIMIT:
        counts = np.bincount(voxels.ravel().astype(np.int64, copy=False))
        return {int(v) for v in np.flatnonzero(counts)}
    return {int(v) for v in np.unique(voxels)}


def _list(values: List[int], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _check_classes(dataset: Dataset) -> None:
    classes: Optional[Dict[int, str]] = dataset.classes
    if classes is None:
        return
    if 0 not in classes:
        raise DataError(dataset.source, "classes must include 0 (background)")
    if len(classes) < 2:
        raise DataError(dataset.source, "classes declare no foreground class (only 0)")
    values = sorted(classes)
    if values != list(range(len(values))):
        raise DataError(
            dataset.source,
            f"the declared label values {_list(values)} are not 0..N without gaps; a missing "
            "value would be trained as an empty class: renumber the label maps and the classes",
        )


def _check_unique_names(dataset: Dataset) -> None:
    first: Dict[str, Case] = {}
    for case in dataset.all_cases():
        if case.name in first:
            raise DataError(
                case.image,
                f"case name {case.name!r} is already used by {first[case.name].image}; "
                "case names must be unique (rename one of the files)",
            )
        first[case.name] = case
