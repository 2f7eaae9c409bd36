"""Volume I/O: geometry and values survive every supported format; bad files give DataError."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.backend.volumes import (
    Geometry,
    array_from_image,
    geometry_mismatch,
    geometry_of,
    image_from_array,
    read_image,
    write_image,
)

COS, SIN = math.cos(math.radians(30)), math.sin(math.radians(30))
ROTATED_Z30 = (COS, -SIN, 0.0, SIN, COS, 0.0, 0.0, 0.0, 1.0)
HIPPOCAMPUS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
SPACING = (0.7, 0.9, 3.0)
ORIGIN = (12.5, -30.25, 7.0)
FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def make_image(direction: Sequence[float], dtype=np.float32) -> sitk.Image:
    """A 5x6x7 (x, y, z) volume with distinct values and anisotropic, oblique geometry."""
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((7, 6, 5)) * 100).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(direction)
    return image


def write_dicom_series(
    image: sitk.Image, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1"
) -> None:
    """Write ``image`` as one DICOM file per slice, following SimpleITK's DICOM series example."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for z in range(image.GetDepth()):
        slice_image = image[:, :, z]
        for tag, value in (
            ("0008|0060", "MR"),
            ("0008|0008", "DERIVED\\SECONDARY"),
            ("0020|000e", series_uid),
            ("0020|000d", series_uid + ".0"),
            ("0020|0037", orientation),
            (
                "0020|0032",
                "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            ),
            ("0020|0013", str(z + 1)),
            ("0018|0050", str(image.GetSpacing()[2])),
        ):
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{z:03d}.dcm"))
        writer.Execute(slice_image)


@pytest.mark.parametrize("direction", [ROTATED_Z30, HIPPOCAMPUS_DIRECTION], ids=["rot30", "hippo"])
@pytest.mark.parametrize("suffix", FILE_SUFFIXES)
def test_file_round_trip_keeps_geometry_and_values(tmp_path, suffix, direction):
    image = make_image(direction)
    path = tmp_path / "nested" / f"case{suffix}"
    write_image(image, path)
    back = read_image(path)
    assert geometry_mismatch(image, back, tolerance=1e-5) is None
    assert back.GetPixelID() == image.GetPixelID()
    np.testing.assert_array_equal(array_from_image(back), array_from_image(image))
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("direction", [ROTATED_Z30, HIPPOCAMPUS_DIRECTION], ids=["rot30", "hippo"])
def test_dicom_series_folder_round_trip_keeps_geometry(tmp_path, direction):
    image = make_image(direction, dtype=np.int16)
    write_dicom_series(image, tmp_path / "series")
    back = read_image(tmp_path / "series")
    assert geometry_mismatch(image, back) is None, geometry_mismatch(image, back)
    np.testing.assert_array_equal(array_from_image(back).astype(np.int16), array_from_image(image))


def test_labels_round_trip_exactly_as_integers(tmp_path):
    label = sitk.GetImageFromArray(np.arange(60, dtype=np.uint8).reshape(3, 4, 5) % 3)
    write_image(label, tmp_path / "label.nii.gz")
    back = read_image(tmp_path / "label.nii.gz")
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(array_from_image(back), array_from_image(label))


def test_write_replaces_existing_file_and_compresses(tmp_path):
    zeros = sitk.Image(40, 40, 40, sitk.sitkFloat32)
    path = tmp_path / "volume.nii.gz"
    write_image(make_image(ROTATED_Z30), path)
    write_image(zeros, path)
    assert read_image(path).GetSize() == (40, 40, 40)
    assert path.stat().st_size < 40**3 * 4 / 10  # zeros compress well
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume.nii.gz"]


def test_write_rejects_unknown_format(tmp_path):
    with pytest.raises(DataError, match=r"out\.png: cannot write this format"):
        write_image(make_image(ROTATED_Z30), tmp_path / "out.png")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.nii\.gz: file or folder does not exist"):
        read_image(tmp_path / "nothing.nii.gz")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    write_image(make_image(ROTATED_Z30), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as caught:
        read_image(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "Exception thrown" not in str(caught.value)


def test_mhd_without_its_data_file(tmp_path):
    path = tmp_path / "header.mhd"
    write_image(make_image(ROTATED_Z30), path)
    (tmp_path / "header.raw").unlink()
    with pytest.raises(DataError, match=r"header\.mhd: .*data file .* missing"):
        read_image(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.nii\.gz: not a readable image"):
        read_image(path)
    empty = tmp_path / "empty.nrrd"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.nrrd: file is empty"):
        read_image(empty)


def test_empty_and_non_dicom_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: folder is empty"):
        read_image(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match=r"other: folder holds no DICOM series"):
        read_image(tmp_path / "other")


def test_folder_with_two_dicom_series_names_them(tmp_path):
    image = make_image(HIPPOCAMPUS_DIRECTION, dtype=np.int16)
    write_dicom_series(image, tmp_path / "mixed", series_uid="1.2.3.4.1")
    write_dicom_series(image[:, :, :3], tmp_path / "second", series_uid="1.2.3.4.2")
    for path in (tmp_path / "second").iterdir():
        os.replace(path, tmp_path / "mixed" / f"b_{path.name}")
    with pytest.raises(DataError, match=r"mixed: folder holds 2 DICOM series") as caught:
        read_image(tmp_path / "mixed")
    assert "1.2.3.4.1 (7 files)" in str(caught.value)
    assert "1.2.3.4.2 (3 files)" in str(caught.value)


def test_geometry_mismatch_describes_each_difference():
    a = make_image(HIPPOCAMPUS_DIRECTION)
    assert geometry_mismatch(a, a) is None
    assert geometry_mismatch(geometry_of(a), a) is None
    b = sitk.Image(a)
    b.SetSpacing((0.7, 0.9, 3.0002))  # within 1e-3 of the spacing
    b.SetOrigin((12.5, -30.25, 7.0004))
    assert geometry_mismatch(a, b) is None
    b.SetSpacing((0.7, 0.9, 2.5))
    b.SetOrigin((12.5, -30.25, 9.0))
    b.SetDirection(ROTATED_Z30)
    message = geometry_mismatch(a, b)
    assert "spacing (0.7, 0.9, 3) vs (0.7, 0.9, 2.5)" in message
    assert "origin (12.5, -30.25, 7) vs (12.5, -30.25, 9)" in message
    assert "direction (-1, 0, 0" in message
    bigger = sitk.Image(5, 6, 8, sitk.sitkFloat32)
    assert geometry_mismatch(a, bigger) == "size 5x6x7 vs 5x6x8"


def test_geometry_is_a_frozen_value():
    geometry = geometry_of(make_image(ROTATED_Z30))
    assert geometry == Geometry((5, 6, 7), SPACING, ORIGIN, ROTATED_Z30)
    with pytest.raises(AttributeError):
        geometry.size = (1, 1, 1)


def test_image_from_array_copies_reference_geometry():
    reference = make_image(ROTATED_Z30)
    array = array_from_image(reference)
    assert array.shape == (7, 6, 5)
    mask = image_from_array(array > 0, reference)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert geometry_mismatch(mask, reference, tolerance=0) is None
    with pytest.raises(ValueError, match=r"shape \(5, 6, 7\)"):
        image_from_array(np.zeros((5, 6, 7)), reference)
