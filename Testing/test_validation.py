"""Input validation: every bad input gives a DataError naming the file and the problem."""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk

from SemiSupSegLib.backend.datasets import Case, Dataset, exclude_cases, load_dataset
from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.backend.validation import validate_dataset, validate_image, validate_pair

CLASSES = {0: "background", 1: "organ", 2: "lesion"}
SPACING = (0.7, 0.9, 3.0)
SHAPE = (4, 5, 6)  # z, y, x


def label_array(values=(0, 1, 2), dtype=np.uint8) -> np.ndarray:
    array = np.zeros(SHAPE, dtype=dtype)
    for i, value in enumerate(values):
        array[i, 0, 0] = value
    return array


@pytest.fixture
def good_case(write_volume):
    """Write a valid image/label pair named ``name`` and return (image path, label path)."""

    def write(name: str = "case", **label_geometry):
        image = write_volume(f"images/{name}.nii.gz", spacing=SPACING)
        geometry = {"spacing": SPACING, **label_geometry}
        label = write_volume(f"labels/{name}.nii.gz", label_array(), **geometry)
        return image, label

    return write


def dataset_of(*pairs, unlabeled=()) -> Dataset:
    labeled = [Case(image.name.split(".")[0], image, label) for image, label in pairs]
    return Dataset(labeled, [Case(p.name.split(".")[0], p) for p in unlabeled], dict(CLASSES))


def raises_naming(path, *words):
    """pytest.raises for a DataError whose message starts with ``path`` and holds ``words``."""
    pattern = re.escape(f"{path}: ") + ".*" + ".*".join(re.escape(w) for w in words)
    return pytest.raises(DataError, match=pattern)


def test_valid_pair_and_dataset(good_case, tmp_path):
    image_path, label_path = good_case()
    before = sorted(tmp_path.rglob("*"))
    image, label, warnings = validate_pair(image_path, label_path, CLASSES)
    assert image.GetSize() == label.GetSize() == (6, 5, 4)
    assert warnings == []
    assert validate_dataset(dataset_of((image_path, label_path))) == []
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_real_hippocampus_cases_validate(hippocampus_dir):
    dataset = load_dataset(hippocampus_dir)
    few = exclude_cases(dataset, [c.name for c in dataset.labeled[8:]])
    assert len(few.labeled) == 8
    assert validate_dataset(few) == []


def test_unreadable_and_truncated_files(good_case, tmp_path):
    image_path, label_path = good_case()
    data = label_path.read_bytes()
    label_path.write_bytes(data[: len(data) // 2])
    with raises_naming(label_path, "truncated"):
        validate_dataset(dataset_of((image_path, label_path)))
    image_path.write_text("garbage")
    with raises_naming(image_path, "not a readable image"):
        validate_image(image_path)
    with raises_naming(tmp_path / "gone.nii.gz", "does not exist"):
        validate_image(tmp_path / "gone.nii.gz")


@pytest.mark.parametrize(
    "geometry, words",
    [
        (
            {"spacing": (0.7, 0.9, 2.0)},
            ["spacing (0.7, 0.9, 3) vs (0.7, 0.9, 2)", "image vs label"],
        ),
        ({"origin": (0.0, 0.0, 5.0)}, ["origin (0, 0, 0) vs (0, 0, 5)"]),
        (
            {"direction": (-1, 0, 0, 0, -1, 0, 0, 0, 1)},
            ["direction (1, 0, 0, 0, 1, 0, 0, 0, 1) vs (-1, 0, 0, 0, -1, 0, 0, 0, 1)"],
        ),
    ],
    ids=["spacing", "origin", "direction"],
)
def test_label_geometry_differs_from_image(good_case, geometry, words):
    image_path, label_path = good_case(**geometry)
    with raises_naming(label_path, "does not line up with its image", str(image_path), *words):
        validate_dataset(dataset_of((image_path, label_path)))


def test_label_size_differs(good_case, write_volume):
    image_path, _ = good_case()
    label_path = write_volume("labels/big.nii.gz", np.zeros((5, 5, 6), np.uint8), spacing=SPACING)
    with raises_naming(label_path, "size 6x5x4 vs 6x5x5"):
        validate_pair(image_path, label_path, CLASSES)


def test_small_geometry_differences_are_tolerated(good_case):
    image_path, label_path = good_case(origin=(0.0, 0.0, 1e-4), spacing=(0.7, 0.9, 3.0 + 1e-5))
    validate_pair(image_path, label_path, CLASSES)


def test_label_values_outside_classes(good_case, write_volume):
    image_path, _ = good_case()
    label_path = write_volume("labels/odd.nii.gz", label_array((0, 1, 3, 7)), spacing=SPACING)
    with raises_naming(label_path, "label values 3, 7 are not among the declared classes"):
        validate_pair(image_path, label_path, CLASSES)
    negative = write_volume("labels/neg.nii.gz", label_array((0, -1), np.int16), spacing=SPACING)
    with raises_naming(negative, "negative values -1"):
        validate_pair(image_path, negative, None)


def test_label_not_integer_valued(good_case, write_volume):
    image_path, _ = good_case()
    label_path = write_volume(
        "labels/soft.nii.gz", label_array((0, 0.5, 1), np.float32), spacing=SPACING
    )
    with raises_naming(label_path, "not integer-valued", "0.5"):
        validate_pair(image_path, label_path, CLASSES)
    whole = write_volume("labels/whole.nii.gz", label_array((0, 1, 2), np.float32), spacing=SPACING)
    validate_pair(image_path, whole, CLASSES)  # whole numbers stored as float are fine


def test_non_3d_and_vector_images(write_volume, tmp_path):
    flat = write_volume("flat.nii.gz", np.zeros((5, 6), np.float32))
    with raises_naming(flat, "image is 2D (size 6x5)", "3D volume is needed"):
        validate_image(flat)
    series = sitk.JoinSeries([sitk.Image(3, 4, 5, sitk.sitkFloat32)] * 2)
    sitk.WriteImage(series, str(tmp_path / "four.nii.gz"))
    with raises_naming(tmp_path / "four.nii.gz", "image is 4D"):
        validate_image(tmp_path / "four.nii.gz")
    rgb = write_volume("rgb.mha", np.zeros((4, 5, 6, 3), np.uint8), vector=True)
    with raises_naming(rgb, "3 components per voxel"):
        validate_image(rgb)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize(
    "bad, words", [(np.nan, "1 NaN and 0 infinite"), (np.inf, "0 NaN and 1 infinite")]
)
def test_non_finite_intensities(write_volume, suffix, bad, words):
    array = np.ones(SHAPE, np.float32)
    array[1, 2, 3] = bad
    path = write_volume(f"bad{suffix}", array)
    with raises_naming(path, words, "must be finite"):
        validate_image(path)


def test_nifti_reader_turns_non_finite_values_into_zero(write_volume):
    """ITK's NIfTI reader replaces NaN/inf by 0 itself, so they never reach training."""
    array = np.ones(SHAPE, np.float32)
    array[1, 2, 3], array[0, 0, 0] = np.nan, np.inf
    image = validate_image(write_volume("bad.nii.gz", array))
    assert sitk.GetArrayViewFromImage(image)[1, 2, 3] == 0
    assert sitk.GetArrayViewFromImage(image)[0, 0, 0] == 0


def test_duplicate_case_names(good_case, write_volume):
    pair = good_case("a")
    other = write_volume("more/a.nii.gz", spacing=SPACING)
    dataset = dataset_of(pair, unlabeled=[other])
    with raises_naming(other, "case name 'a' is already used by", str(pair[0]), "unique"):
        validate_dataset(dataset)


def test_no_labeled_case(write_volume, tmp_path):
    image = write_volume("images/u.nii.gz")
    dataset = Dataset([], [Case("u", image)], dict(CLASSES), source=tmp_path / "dataset.json")
    with raises_naming(tmp_path / "dataset.json", "no labeled case"):
        validate_dataset(dataset)
    dataset.labeled.append(Case("v", image))
    with raises_naming(image, "case v is listed as labeled but has no label"):
        validate_dataset(dataset)


def test_empty_label_is_a_warning(good_case, write_volume):
    image_path, _ = good_case()
    empty = write_volume("labels/empty.nii.gz", np.zeros(SHAPE, np.uint8), spacing=SPACING)
    _, _, warnings = validate_pair(image_path, empty, CLASSES)
    assert warnings == [f"{empty}: label map is empty (background only)"]
    dataset = dataset_of((image_path, empty))
    warnings = validate_dataset(dataset)
    assert f"{empty}: label map is empty (background only)" in warnings
    assert any("class 2 (lesion) appears in no label map" in w for w in warnings)


def test_unlabeled_images_are_checked_unless_asked_not_to(good_case, tmp_path):
    pair = good_case()
    broken = tmp_path / "unlabeled" / "u.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"\x1f\x8b garbage")
    dataset = dataset_of(pair, unlabeled=[broken])
    with raises_naming(broken, "not a readable image"):
        validate_dataset(dataset)
    assert validate_dataset(dataset, check_unlabeled=False) == []
