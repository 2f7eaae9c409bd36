"""Per-volume preprocessing: optional resampling to a target spacing (and back), intensity
normalisation (z-score for MR, window-clip-scale for CT), and the MONAI training transforms.

Arrays are channel-first in SimpleITK's axis order: (C, z, y, x). Settings that name sizes
(``patch_size``, ``target_spacing``) are given in (x, y, z), as SimpleITK and Slicer show them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from monai import transforms as mt

from SemiSupSegLib.backend.config import TrainConfig


def xyz_to_zyx(size: Sequence[float]) -> Tuple:
    return tuple(reversed(tuple(size)))


def resample_to_spacing(image: sitk.Image, spacing: Sequence[float], is_label: bool) -> sitk.Image:
    """Resample onto a grid of the given (x, y, z) spacing covering the same physical extent."""
    old_spacing = np.array(image.GetSpacing())
    new_spacing = np.array(spacing, dtype=float)
    if np.allclose(old_spacing, new_spacing, rtol=1e-6, atol=0):
        return image
    size = np.maximum(np.round(np.array(image.GetSize()) * old_spacing / new_spacing), 1)
    return sitk.Resample(
        image,
        [int(s) for s in size],
        sitk.Transform(),
        sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear,
        image.GetOrigin(),
        [float(s) for s in new_spacing],
        image.GetDirection(),
        0,
        image.GetPixelID(),
    )


def resample_like(image: sitk.Image, reference: sitk.Image, is_label: bool) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid (used to bring results back to the input)."""
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, image.GetPixelID())


def normalize_intensity(
    array: np.ndarray,
    modality: str,
    ct_window: Tuple[float, float] = (-1000.0, 1000.0),
    ct_foreground_stats: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """Z-score per volume (MR and other). CT: with the planned foreground statistics (low,
    high, mean, std), clip to [low, high] and z-score with the foreground's mean and std
    (nnU-Net's CT scheme); without them, clip to the CT window and scale to [0, 1]."""
    array = array.astype(np.float32, copy=False)
    if modality == "CT" and ct_foreground_stats is not None:
        low, high, mean, std = (float(v) for v in ct_foreground_stats)
        return ((np.clip(array, low, high) - mean) / std).astype(np.float32)
    if modality == "CT":
        low, high = ct_window
        scale = mt.ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
        return np.asarray(scale(array), dtype=np.float32)
    return np.asarray(mt.NormalizeIntensity()(array), dtype=np.float32)


@dataclass
class PreparedVolume:
    """A volume ready for the network: normalised (1, z, y, x) image, optional label, and the
    SimpleITK images that hold the original and the working geometry."""

    name: str
    image: np.ndarray
    label: Optional[np.ndarray]
    original: sitk.Image
    working: sitk.Image

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + (0 if self.label is None else self.label.nbytes)


def prepare_volume(
    name: str,
    image: sitk.Image,
    label: Optional[sitk.Image],
    modality: str,
    target_spacing: Optional[Sequence[float]] = None,
    ct_window: Tuple[float, float] = (-1000.0, 1000.0),
    ct_foreground_stats: Optional[Sequence[float]] = None,
) -> PreparedVolume:
    """Resample (if asked) and normalise one case already read from disk."""
    working = sitk.Cast(image, sitk.sitkFloat32)
    if target_spacing is not None:
        working = resample_to_spacing(working, target_spacing, is_label=False)
        if label is not None:
            label = resample_to_spacing(label, target_spacing, is_label=True)
    array = normalize_intensity(
        sitk.GetArrayFromImage(working), modality, ct_window, ct_foreground_stats
    )[None]
    label_array = None
    if label is not None:
        label_array = sitk.GetArrayFromImage(label).astype(np.uint8)[None]
    return PreparedVolume(name, array, label_array, image, working)


def labeled_transforms(config: TrainConfig) -> mt.Compose:
    """Pad, crop a patch (foreground oversampled), augment: for image + label dicts."""
    patch = xyz_to_zyx(config.patch_size)
    keys = ["image", "label"]
    ratio = config.foreground_ratio
    steps = [
        mt.SpatialPadd(keys, spatial_size=patch, mode="constant"),
        mt.RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=patch,
            pos=ratio,
            neg=1.0 - ratio,
            num_samples=1,
            allow_smaller=False,
        ),
    ]
    if config.augment:
        steps += spatial_augmentations(config, keys, modes=("bilinear", "nearest"))
        steps += intensity_augmentations(config)
    return mt.Compose(steps + [mt.ToTensord(keys, track_meta=False)])


def unlabeled_transforms(config: TrainConfig) -> mt.Compose:
    """Pad and crop a random patch of an image without label, with the same augmentations."""
    patch = xyz_to_zyx(config.patch_size)
    keys = ["image"]
    steps = [
        mt.SpatialPadd(keys, spatial_size=patch, mode="constant"),
        mt.RandSpatialCropd(keys, roi_size=patch, random_size=False),
    ]
    if config.augment:
        steps += spatial_augmentations(config, keys, modes=("bilinear",))
        steps += intensity_augmentations(config)
    return mt.Compose(steps + [mt.ToTensord(keys, track_meta=False)])


def spatial_augmentations(config: TrainConfig, keys: list, modes: tuple) -> list:
    """Small rotations and scaling; flips only along axes the user declares symmetric, since a
    flip can swap anatomical classes (anterior/posterior, left/right)."""
    steps = [
        mt.RandAffined(
            keys,
            prob=0.25,
            rotate_range=(config.augment_rotation,) * 3,
            scale_range=(config.augment_scaling,) * 3,
            mode=modes,
            padding_mode="border",
        )
    ]
    for axis in config.flip_axes:
        steps.append(mt.RandFlipd(keys, prob=0.5, spatial_axis=2 - int(axis)))
    return steps


def intensity_augmentations(config: TrainConfig) -> list:
    """Noise, intensity scaling and shifting, and gamma, within the config's ranges."""
    return [
        mt.RandGaussianNoised(["image"], prob=0.15, std=config.augment_noise_std),
        mt.RandScaleIntensityd(["image"], factors=config.augment_intensity_scale, prob=0.2),
        mt.RandShiftIntensityd(["image"], offsets=config.augment_intensity_shift, prob=0.2),
        mt.RandAdjustContrastd(["image"], prob=0.15, gamma=tuple(config.augment_gamma)),
    ]
