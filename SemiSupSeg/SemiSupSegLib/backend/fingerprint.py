"""A dataset's fingerprint: the facts a training plan is made from.

Sizes, spacings and orientations come from every image's header (no voxels are read, so a
pool of hundreds of unlabeled CT volumes costs seconds); intensities inside the foreground,
class voxel shares and the foreground's extent come from the labeled cases, whose voxels are
read once. The quantities follow nnU-Net's dataset fingerprint (Isensee et al., Nature Methods
2021). MONAI's ``auto3dseg.DataAnalyzer`` computes similar statistics but loads every image in
full, the unlabeled ones included, and has no notion of a labeled subset; a header pass is what
keeps planning instant on a semi-supervised pool.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SemiSupSegLib.backend.datasets import Case, Dataset
from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.backend.volumes import read_image

#: Foreground voxels sampled per labeled case for the intensity statistics.
INTENSITY_SAMPLES_PER_CASE = 10000


@dataclass(frozen=True)
class Fingerprint:
    """What planning needs to know about a dataset. Sizes and spacings are (x, y, z).

    Attributes:
        sizes: voxel counts per axis, one row per case (labeled then unlabeled).
        spacings: voxel spacing in mm per axis, same rows.
        orientations: the three-letter orientation code of each case (e.g. "RAS"), counted.
        foreground_extent_mm: median size of the labeled foreground's bounding box, per axis.
        class_shares: share of labeled voxels per class value (0 = background).
        foreground_intensity: percentiles (0.5, 50, 99.5), mean and std of intensities inside
            the labeled foreground (what CT normalisation uses).
        modality: "MR", "CT" or "other", as the dataset declares it.
    """

    sizes: Tuple[Tuple[int, int, int], ...]
    spacings: Tuple[Tuple[float, float, float], ...]
    orientations: Dict[str, int]
    foreground_extent_mm: Tuple[float, float, float]
    class_shares: Dict[int, float]
    foreground_intensity: Dict[str, float]
    modality: str

    @property
    def median_spacing(self) -> Tuple[float, float, float]:
        return tuple(float(v) for v in np.median(np.array(self.spacings), axis=0))

    @property
    def median_size_mm(self) -> Tuple[float, float, float]:
        extent = np.array(self.sizes, dtype=float) * np.array(self.spacings)
        return tuple(float(v) for v in np.median(extent, axis=0))

    def spacing_percentile(self, percentile: float) -> Tuple[float, float, float]:
        return tuple(float(v) for v in np.percentile(np.array(self.spacings), percentile, axis=0))

    def to_dict(self) -> Dict[str, Any]:
        values = asdict(self)
        values["class_shares"] = {str(k): v for k, v in self.class_shares.items()}
        values["median_spacing"] = self.median_spacing
        values["median_size_mm"] = self.median_size_mm
        return values


def header(path: Path) -> Tuple[Tuple[int, ...], Tuple[float, ...], Tuple[float, ...]]:
    """Size, spacing and direction from a file's header; a DICOM folder is read whole."""
    if path.is_dir():
        image = read_image(path)
        return image.GetSize(), image.GetSpacing(), image.GetDirection()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(
            path, f"cannot read the image header ({str(error).strip()[:200]})"
        ) from None
    return reader.GetSize(), reader.GetSpacing(), reader.GetDirection()


def orientation_code(direction: Sequence[float]) -> str:
    """The anatomical orientation of a direction matrix as three letters (ITK's convention)."""
    try:
        return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(list(direction))
    except RuntimeError:
        return "oblique"


def fingerprint_dataset(dataset: Dataset, seed: int = 0) -> Fingerprint:
    """Read headers of every case and the voxels of the labeled ones.

    Args:
        dataset: the cases to plan for; labeled cases must have label maps.
        seed: seeds the sampling of foreground intensities, so a plan is reproducible.

    Raises:
        DataError: a file whose header cannot be read, or a non-3D image.
    """
    sizes: List[Tuple[int, int, int]] = []
    spacings: List[Tuple[float, float, float]] = []
    orientations: Dict[str, int] = {}
    for case in dataset.all_cases():
        size, spacing, direction = header(Path(case.image))
        if len(size) != 3:
            raise DataError(case.image, f"expected a 3D image, found {len(size)} dimensions")
        sizes.append(tuple(int(v) for v in size))
        spacings.append(tuple(float(v) for v in spacing))
        code = orientation_code(direction)
        orientations[code] = orientations.get(code, 0) + 1
    extents, counts, samples = [], {}, []
    rng = np.random.default_rng(seed)
    for case in dataset.labeled:
        extent, case_counts, intensities = _labeled_statistics(case, rng)
        if extent is not None:
            extents.append(extent)
        for value, count in case_counts.items():
            counts[value] = counts.get(value, 0) + count
        samples.append(intensities)
    total = sum(counts.values()) or 1
    voxels = np.concatenate(samples) if samples else np.zeros(0, dtype=np.float32)
    return Fingerprint(
        sizes=tuple(sizes),
        spacings=tuple(spacings),
        orientations=orientations,
        foreground_extent_mm=tuple(float(v) for v in np.median(extents, axis=0))
        if extents
        else (0.0, 0.0, 0.0),
        class_shares={int(v): counts[v] / total for v in sorted(counts)},
        foreground_intensity=_intensity_statistics(voxels),
        modality=dataset.modality,
    )


def _labeled_statistics(
    case: Case, rng: np.random.Generator
) -> Tuple[Optional[np.ndarray], Dict[int, int], np.ndarray]:
    """Foreground bounding-box size in mm, voxel count per class and sampled foreground
    intensities of one labeled case."""
    image = read_image(case.image)
    label = read_image(case.label)
    labels = sitk.GetArrayViewFromImage(label)
    values, counts = np.unique(labels, return_counts=True)
    foreground = labels > 0
    if not foreground.any():
        return None, dict(zip(values.tolist(), counts.tolist())), np.zeros(0, np.float32)
    index = np.argwhere(foreground)
    extent_zyx = (index.max(axis=0) - index.min(axis=0) + 1).astype(float)
    extent = extent_zyx[::-1] * np.array(label.GetSpacing())
    intensities = sitk.GetArrayViewFromImage(image)[foreground].astype(np.float32)
    if intensities.size > INTENSITY_SAMPLES_PER_CASE:
        intensities = rng.choice(intensities, INTENSITY_SAMPLES_PER_CASE, replace=False)
    return extent, dict(zip(values.tolist(), counts.tolist())), intensities


def _intensity_statistics(voxels: np.ndarray) -> Dict[str, float]:
    if voxels.size == 0:
        return {}
    low, median, high = np.percentile(voxels, (0.5, 50.0, 99.5))
    return {
        "percentile_00_5": float(low),
        "median": float(median),
        "percentile_99_5": float(high),
        "mean": float(voxels.mean()),
        "std": float(voxels.std()),
    }
