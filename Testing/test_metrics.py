"""Known-answer tests for backend.metrics (MONAI metrics, spacing order, empty-mask penalty)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.backend.metrics import case_metrics, evaluate_folders, format_summary
from SemiSupSegLib.output_layout import (
    METRICS_COLUMNS,
    METRICS_FILE,
    SUMMARY_FILE,
    UNCERTAINTY_FOLDER,
    MetricsRow,
    read_table,
)

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared/data/msd-hippocampus"
needs_hippocampus = pytest.mark.skipif(
    not (HIPPOCAMPUS / "dataset.json").is_file(), reason="msd-hippocampus data not available"
)
REAL_CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004")


def _cube(shape=(20, 20, 20), start=(5, 5, 5), size=6, value=1) -> np.ndarray:
    array = np.zeros(shape, dtype=np.uint8)
    z, y, x = start
    array[z : z + size, y : y + size, x : x + size] = value
    return array


def _assert_finite(result: dict) -> None:
    for per_class in result.values():
        for key in ("dice", "iou", "hd95", "asd"):
            assert math.isfinite(per_class[key]), (key, per_class)


def test_identical_masks():
    mask = _cube()
    result = case_metrics(mask, mask.copy(), (1.0, 1.0, 3.0), [1])
    assert result[1]["dice"] == pytest.approx(1.0)
    assert result[1]["iou"] == pytest.approx(1.0)
    assert result[1]["hd95"] == pytest.approx(0.0)
    assert result[1]["asd"] == pytest.approx(0.0)
    assert result[1]["penalty"] is False


@pytest.mark.parametrize("k", [1, 2])
def test_shift_along_z_uses_z_spacing(k):
    # spacing (x, y, z) = (1, 1, 3): a shift along array axis 0 (z) is k * 3 mm.
    truth = _cube(start=(5, 5, 5))
    pred = _cube(start=(5 + k, 5, 5))
    result = case_metrics(pred, truth, (1.0, 1.0, 3.0), [1])
    assert result[1]["hd95"] == pytest.approx(3.0 * k)
    assert result[1]["dice"] == pytest.approx((6 - k) / 6)
    assert result[1]["iou"] == pytest.approx((6 - k) / (6 + k))


@pytest.mark.parametrize("k", [1, 2])
def test_shift_along_x_uses_x_spacing(k):
    truth = _cube(start=(5, 5, 5))
    pred = _cube(start=(5, 5, 5 + k))
    result = case_metrics(pred, truth, (1.0, 1.0, 3.0), [1])
    assert result[1]["hd95"] == pytest.approx(1.0 * k)


def test_plates_average_surface_distance():
    # One-voxel-thick plates: every voxel is surface and its nearest match is k slices away.
    truth = np.zeros((12, 16, 16), dtype=np.uint8)
    pred = truth.copy()
    truth[3, 2:14, 2:14] = 1
    pred[5, 2:14, 2:14] = 1
    result = case_metrics(pred, truth, (0.5, 0.5, 2.5), [1])
    assert result[1]["asd"] == pytest.approx(2 * 2.5)
    assert result[1]["hd95"] == pytest.approx(2 * 2.5)
    assert result[1]["dice"] == 0.0


def test_empty_prediction_gets_finite_penalty():
    truth = _cube(shape=(10, 20, 30))
    pred = np.zeros_like(truth)
    spacing = (1.0, 2.0, 3.0)  # x, y, z
    diagonal = math.sqrt((30 * 1.0) ** 2 + (20 * 2.0) ** 2 + (10 * 3.0) ** 2)
    result = case_metrics(pred, truth, spacing, [1])
    _assert_finite(result)
    r = result[1]
    assert r["dice"] == 0.0 and r["iou"] == 0.0
    assert r["hd95"] == pytest.approx(diagonal) and r["asd"] == pytest.approx(diagonal)
    assert r["penalty"] is True and r["prediction_empty"] is True and r["truth_empty"] is False
    # The reverse (a false detection) is penalised the same way.
    reverse = case_metrics(truth, pred, spacing, [1])[1]
    assert reverse["dice"] == 0.0 and reverse["hd95"] == pytest.approx(diagonal)
    assert reverse["penalty"] is True and reverse["truth_empty"] is True


def test_both_empty():
    empty = np.zeros((8, 8, 8), dtype=np.uint8)
    r = case_metrics(empty, empty, (1.0, 1.0, 1.0), [1])[1]
    assert (r["dice"], r["iou"], r["hd95"], r["asd"]) == (1.0, 1.0, 0.0, 0.0)
    assert r["penalty"] is False


def test_multiclass_per_class_results():
    truth = _cube(start=(2, 2, 2), size=5, value=1) + _cube(start=(12, 12, 12), size=5, value=2)
    pred = truth.copy()
    pred[pred == 2] = 0
    pred[13:18, 12:17, 12:17] = 2  # class 2 shifted by one voxel along z
    result = case_metrics(pred, truth, (1.0, 1.0, 2.0), [1, 2, 3])
    assert set(result) == {1, 2, 3}
    assert result[1]["dice"] == pytest.approx(1.0) and result[1]["hd95"] == 0.0
    assert result[2]["dice"] == pytest.approx(0.8) and result[2]["hd95"] == pytest.approx(2.0)
    assert result[3]["dice"] == 1.0 and result[3]["hd95"] == 0.0  # absent from both
    _assert_finite(result)


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1), [1])


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_evaluate_folders_synthetic_label_folder(tmp_path):
    preds, truths, out = tmp_path / "pred", tmp_path / "truth", tmp_path / "out"
    preds.mkdir()
    truths.mkdir()
    (preds / UNCERTAINTY_FOLDER).mkdir()
    truth = _cube(shape=(12, 12, 12), start=(3, 3, 3), size=4)
    _write(truth, truths / "a.nii.gz", (1.0, 1.0, 3.0))
    _write(truth, truths / "b.nrrd", (1.0, 1.0, 3.0))
    _write(truth, truths / "c.nii.gz", (1.0, 1.0, 3.0))  # no prediction: not scored
    _write(truth, preds / "a.nii.gz", (1.0, 1.0, 3.0))
    _write(np.zeros_like(truth), preds / "b.mha", (1.0, 1.0, 3.0))
    _write(np.zeros_like(truth, dtype=np.float32), preds / UNCERTAINTY_FOLDER / "zz.nii.gz")
    summary = evaluate_folders(preds, truths, out, classes={1: "thing"})
    assert summary["cases"] == ["a", "b"]
    assert summary["num_truth_cases_without_prediction"] == 1
    assert summary["classes"]["1"]["dice"]["mean"] == pytest.approx(0.5)
    assert summary["classes"]["1"]["num_penalties"] == 1
    rows = read_table(out / METRICS_FILE, MetricsRow)
    assert [(r.case, r.class_name, r.penalty) for r in rows] == [
        ("a", "thing", "none"),
        ("b", "thing", "empty_prediction"),
    ]
    assert "Dice 0.500" in format_summary(summary)


def test_prediction_without_truth(tmp_path):
    preds, truths = tmp_path / "pred", tmp_path / "truth"
    preds.mkdir()
    truths.mkdir()
    _write(_cube(), truths / "a.nii.gz")
    _write(_cube(), preds / "zzz.nii.gz")
    with pytest.raises(DataError, match="zzz") as info:
        evaluate_folders(preds, truths, tmp_path / "out")
    assert info.value.path.name == "zzz.nii.gz"


def test_no_prediction_files(tmp_path):
    preds, truths = tmp_path / "pred", tmp_path / "truth"
    preds.mkdir()
    truths.mkdir()
    _write(_cube(), truths / "a.nii.gz")
    with pytest.raises(DataError):
        evaluate_folders(preds, truths, tmp_path / "out")


@needs_hippocampus
def test_evaluate_folders_real_labels_are_perfect(tmp_path):
    preds, out = tmp_path / "pred", tmp_path / "out"
    preds.mkdir()
    for name in REAL_CASES:
        shutil.copy(HIPPOCAMPUS / "labelsTr" / f"{name}.nii.gz", preds / f"{name}.nii.gz")
    summary = evaluate_folders(preds, HIPPOCAMPUS / "dataset.json", out)
    assert summary["num_cases"] == 3 and summary["cases"] == list(REAL_CASES)
    assert {v["name"] for v in summary["classes"].values()} == {"Anterior", "Posterior"}
    for stats in summary["classes"].values():
        assert stats["dice"]["mean"] == pytest.approx(1.0)
        assert stats["hd95_mm"]["mean"] == pytest.approx(0.0)
    assert summary["mean_foreground"]["dice"] == pytest.approx(1.0)

    header = (out / METRICS_FILE).read_text().splitlines()[0]
    assert tuple(header.split(",")) == METRICS_COLUMNS
    rows = read_table(out / METRICS_FILE, MetricsRow)
    assert [(r.case, r.class_value) for r in rows] == [(c, v) for c in REAL_CASES for v in (1, 2)]
    assert all(r.dice == pytest.approx(1.0) and r.hd95_mm == 0.0 for r in rows)
    on_disk = json.loads((out / SUMMARY_FILE).read_text())
    assert on_disk == summary
    assert "penalty" in on_disk["penalty_convention"] or "diagonal" in on_disk["penalty_convention"]
    assert not list(out.glob("*.tmp"))
    # A folder holding dataset.json works as well.
    again = evaluate_folders(preds, HIPPOCAMPUS, tmp_path / "out2")
    assert again["classes"] == summary["classes"]


@needs_hippocampus
def test_evaluate_folders_spacing_mismatch_names_file(tmp_path):
    preds = tmp_path / "pred"
    preds.mkdir()
    shutil.copy(HIPPOCAMPUS / "labelsTr" / "hippocampus_001.nii.gz", preds)
    image = sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / "hippocampus_003.nii.gz"))
    image.SetSpacing((1.0, 1.0, 2.0))
    bad = preds / "hippocampus_003.nii.gz"
    sitk.WriteImage(image, str(bad))
    with pytest.raises(DataError, match="hippocampus_003") as info:
        evaluate_folders(preds, HIPPOCAMPUS / "dataset.json", tmp_path / "out")
    assert info.value.path == bad
    assert "spacing" in str(info.value)


def test_classes_found_from_files_and_unknown_values_rejected(tmp_path):
    preds, truths = tmp_path / "pred", tmp_path / "truth"
    preds.mkdir()
    truths.mkdir()
    one = _cube(shape=(12, 12, 12), start=(2, 2, 2), size=4, value=1)
    two = _cube(shape=(12, 12, 12), start=(2, 2, 2), size=4, value=2)
    _write(one, truths / "a.nii.gz")
    _write(one, preds / "a.nii.gz")
    _write(two, truths / "b.nii.gz")
    _write(two, preds / "b.nii.gz")
    summary = evaluate_folders(preds, truths, tmp_path / "out")
    assert {k: v["name"] for k, v in summary["classes"].items()} == {"1": "class 1", "2": "class 2"}
    assert summary["mean_foreground"]["dice"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="not among the declared classes") as info:
        evaluate_folders(preds, truths, tmp_path / "out", classes={1: "one"})
    assert info.value.path.name == "b.nii.gz"


# ------------------------------------------- evaluate reads data by the rules training uses


def _nnunet(root: Path, labels: dict) -> None:
    images = root / "imagesTr"
    images.mkdir(parents=True)
    for name in labels:
        shutil.copy(labels[name], images / f"{name}_0000.nii.gz")  # any volume is an image
    manifest = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "thing": 1},
        "numTraining": len(labels),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(manifest))


def _decathlon(root: Path, labels: dict) -> None:
    (root / "imagesTr").mkdir()
    for name in labels:
        shutil.copy(labels[name], root / "imagesTr" / f"{name}.nii.gz")
    training = [
        {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in labels
    ]
    manifest = {"training": training, "labels": {"0": "background", "1": "thing"}}
    (root / "dataset.json").write_text(json.dumps(manifest))


def _plain(root: Path, labels: dict) -> None:
    (root / "imagesTr").mkdir()
    for name in labels:
        shutil.copy(labels[name], root / "imagesTr" / f"{name}.nii.gz")


@pytest.mark.parametrize("layout", ["label files named case_0000", "nnU-Net", "imagesTr+labelsTr", "Decathlon"])  # fmt: skip
def test_truth_in_every_layout_train_reads(tmp_path, layout):
    """evaluate --truth takes what train --data takes, and names its cases as training does:
    an nnU-Net raw folder, a folder with imagesTr/ and labelsTr/, and label files named with
    nnU-Net's _0000 channel suffix all match predictions named case.nii.gz."""
    from SemiSupSegLib.backend.datasets import load_dataset

    preds, root = tmp_path / "pred", tmp_path / "truth"
    preds.mkdir()
    (root / "labelsTr").mkdir(parents=True)
    truth = _cube(shape=(12, 12, 12), start=(3, 3, 3), size=4)
    labels = {n: _write(truth, root / "labelsTr" / f"{n}.nii.gz") for n in ("a", "b")}
    _write(truth, preds / "a.nii.gz")
    _write(np.zeros_like(truth), preds / "b.nii.gz")
    if layout == "label files named case_0000":
        for name, path in labels.items():
            path.rename(root / f"{name}_0000.nii.gz")
    else:
        {"nnU-Net": _nnunet, "imagesTr+labelsTr": _plain, "Decathlon": _decathlon}[layout](
            root, labels
        )
        assert sorted(c.name for c in load_dataset(root).labeled) == ["a", "b"]

    summary = evaluate_folders(preds, root, tmp_path / "out")
    assert summary["cases"] == ["a", "b"]
    assert summary["classes"]["1"]["dice"]["mean"] == pytest.approx(0.5)
    named = "thing" if layout in ("nnU-Net", "Decathlon") else "class 1"
    assert summary["classes"]["1"]["name"] == named


@pytest.mark.parametrize("side", ["prediction", "truth"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_label_map_is_a_clean_error_naming_it(tmp_path, side, suffix):
    """A label map cut short is refused with the file named, as training refuses it; ITK alone
    reads a cut .nii as a volume whose missing part is background."""
    preds, truths = tmp_path / "pred", tmp_path / "truth"
    preds.mkdir()
    truths.mkdir()
    label = _cube(shape=(40, 40, 40), start=(5, 5, 5), size=30)
    files = {
        "prediction": _write(label, preds / f"a{suffix}"),
        "truth": _write(label, truths / f"a{suffix}"),
    }
    data = files[side].read_bytes()
    files[side].write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match="truncated") as info:
        evaluate_folders(preds, truths, tmp_path / "out")
    assert info.value.path == files[side]


def _rotation_z(angle: float) -> tuple:
    c, s = math.cos(angle), math.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize(
    "geometry, same_grid",
    [
        ({"direction": _rotation_z(5e-4)}, True),  # single-precision-sized: one grid
        ({"spacing": (0.5003, 0.5, 0.5)}, True),
        ({"origin": (8e-4, 0.0, 0.0)}, False),  # more than 1e-3 of a 0.5 mm voxel
        ({"spacing": (0.6, 0.5, 0.5)}, False),
    ],
)
def test_one_geometry_rule_for_training_and_evaluation(tmp_path, geometry, same_grid):
    """A prediction lies on its truth's grid for evaluate exactly when training would take the
    two as an image and its label map (``volumes.geometry_mismatch``)."""
    from SemiSupSegLib.backend.validation import validate_pair

    preds, truths = tmp_path / "pred", tmp_path / "truth"
    preds.mkdir()
    truths.mkdir()
    label = _cube(shape=(12, 12, 12), start=(3, 3, 3), size=4)
    truth = _write(label, truths / "a.nii.gz", (0.5, 0.5, 0.5))
    image = sitk.GetImageFromArray(label)
    image.SetSpacing(geometry.get("spacing", (0.5, 0.5, 0.5)))
    image.SetOrigin(geometry.get("origin", (0.0, 0.0, 0.0)))
    image.SetDirection(geometry.get("direction", _rotation_z(0.0)))
    prediction = preds / "a.nii.gz"
    sitk.WriteImage(image, str(prediction))

    def accepted(check) -> bool:
        try:
            check()
        except DataError as error:
            assert "spacing" in str(error) or "origin" in str(error) or "direction" in str(error)
            return False
        return True

    assert accepted(lambda: validate_pair(truth, prediction, None)) is same_grid
    assert accepted(lambda: evaluate_folders(preds, truths, tmp_path / "out")) is same_grid
