"""The Left Atrium converter: UA-MT's h5 layout (x, y, z arrays) to NIfTI the CLI reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SemiSupSegLib.backend.datasets import load_dataset

h5py = pytest.importorskip("h5py")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_left_atrium.py"


def write_source(root: Path, cases: dict) -> None:
    for case, (image, label) in cases.items():
        folder = root / "2018LA_Seg_Training Set" / case
        folder.mkdir(parents=True)
        with h5py.File(folder / "mri_norm2.h5", "w") as handle:
            handle["image"] = image
            handle["label"] = label
    names = list(cases)
    (root / "train.list").write_text("\n".join(names[:2]) + "\n")
    (root / "test.list").write_text(names[2] + "\n")


def test_cases_keep_axis_order_spacing_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    cases = {}
    for number in range(3):
        image = rng.normal(size=(6, 5, 4)).astype(np.float32)  # (x, y, z)
        label = (image > 0.5).astype(np.uint8)
        cases[f"CASE{number}"] = (image, label)
    write_source(tmp_path / "source", cases)
    out = tmp_path / "la"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--source", str(tmp_path / "source"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert (out / "train.list").read_text().split() == ["CASE0", "CASE1"]
    assert (out / "test.list").read_text().split() == ["CASE2"]
    image = sitk.ReadImage(str(out / "imagesTr" / "CASE1.nii.gz"))
    assert image.GetSize() == (6, 5, 4)
    assert image.GetSpacing() == pytest.approx((0.625, 0.625, 0.625))
    x, y, z = 5, 3, 2
    assert image.GetPixel(x, y, z) == pytest.approx(float(cases["CASE1"][0][x, y, z]))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "CASE1.nii.gz")))
    np.testing.assert_array_equal(label, cases["CASE1"][1].transpose(2, 1, 0))
    dataset = load_dataset(out)
    assert [c.name for c in dataset.labeled] == ["CASE0", "CASE1", "CASE2"]
    assert dataset.classes == {0: "background", 1: "left atrium"}


def test_labels_other_than_0_and_1_are_refused(tmp_path):
    image = np.zeros((4, 4, 4), np.float32)
    bad = np.full((4, 4, 4), 2, np.uint8)
    write_source(tmp_path / "source", {"A": (image, bad), "B": (image, bad), "C": (image, bad)})
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--source",
            str(tmp_path / "source"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "label values [2]" in result.stderr
