"""Shared pytest fixtures: the real hippocampus data set and small synthetic volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

HIPPOCAMPUS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd-hippocampus"


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    """The MSD hippocampus subset next to the repository; the test is skipped without it."""
    if not (HIPPOCAMPUS_DIR / "dataset.json").is_file():
        pytest.skip(f"real data not found at {HIPPOCAMPUS_DIR}")
    return HIPPOCAMPUS_DIR


WriteVolume = Callable[..., Path]


@pytest.fixture
def write_volume(tmp_path: Path) -> WriteVolume:
    """A function writing a small volume under ``tmp_path`` and returning its path.

    ``write_volume(name, array=None, spacing=None, origin=None, direction=None, vector=False)``:
    ``array`` is in z, y, x order (default: a 4x5x6 float32 ramp); unset geometry keeps
    SimpleITK's defaults; ``name`` may contain sub-folders.
    """

    def write(
        name: str,
        array: Optional[np.ndarray] = None,
        spacing: Optional[Sequence[float]] = None,
        origin: Optional[Sequence[float]] = None,
        direction: Optional[Sequence[float]] = None,
        vector: bool = False,
    ) -> Path:
        if array is None:
            array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
        image = sitk.GetImageFromArray(np.asarray(array), isVector=vector)
        if spacing is not None:
            image.SetSpacing(tuple(float(v) for v in spacing))
        if origin is not None:
            image.SetOrigin(tuple(float(v) for v in origin))
        if direction is not None:
            image.SetDirection(tuple(float(v) for v in direction))
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path))
        return path

    return write
