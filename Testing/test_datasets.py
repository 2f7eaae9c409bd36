"""Dataset sources: MSD and nnU-Net manifests, plain folders, subsets and case lists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from SemiSupSegLib.backend.datasets import (
    Case,
    Dataset,
    cases_from_paths,
    exclude_cases,
    from_folders,
    infer_classes,
    load_dataset,
    read_case_list,
    with_labeled_subset,
)
from SemiSupSegLib.backend.errors import DataError

HIPPO_CLASSES = {0: "background", 1: "Anterior", 2: "Posterior"}
FEW = ("hippocampus_001", "hippocampus_003", "hippocampus_004")


def copy_hippocampus(source: Path, target: Path, names=FEW, image_suffix: str = "") -> None:
    """Copy a few real cases into ``target``/imagesTr and labelsTr."""
    for folder in ("imagesTr", "labelsTr"):
        (target / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(
            source / "imagesTr" / f"{name}.nii.gz",
            target / "imagesTr" / f"{name}{image_suffix}.nii.gz",
        )
        shutil.copy(source / "labelsTr" / f"{name}.nii.gz", target / "labelsTr" / f"{name}.nii.gz")


def test_msd_hippocampus(hippocampus_dir):
    for path in (hippocampus_dir, hippocampus_dir / "dataset.json", str(hippocampus_dir)):
        dataset = load_dataset(path)
        assert len(dataset.labeled) == 200
        assert len(dataset.unlabeled) == 1
    assert dataset.classes == HIPPO_CLASSES
    assert dataset.modality == "MR"
    assert dataset.source == hippocampus_dir / "dataset.json"
    first = dataset.labeled[0]
    assert first == Case(
        "hippocampus_001",
        hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz",
        hippocampus_dir / "labelsTr" / "hippocampus_001.nii.gz",
    )
    assert dataset.unlabeled == [
        Case("hippocampus_118", hippocampus_dir / "imagesUnlabeled" / "hippocampus_118.nii.gz")
    ]
    assert all(case.image.is_file() and case.label.is_file() for case in dataset.labeled)


def test_msd_manifest_variants(tmp_path, write_volume):
    for name in ("a", "b", "c"):
        write_volume(f"imagesTr/{name}.nii.gz")
        write_volume(f"labelsTr/{name}.nii.gz")
    write_volume("imagesTs/t.nii.gz")
    manifest = {
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "training": [
            {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
            {"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz"},
        ],
        "test": ["./imagesTs/t.nii.gz"],
        "unlabeled": [{"image": "./imagesTr/c.nii.gz"}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    dataset = load_dataset(tmp_path)
    assert [c.name for c in dataset.labeled] == ["a", "b"]
    assert [c.name for c in dataset.unlabeled] == ["t", "c"]
    assert dataset.labeled[0].image == tmp_path / "imagesTr" / "a.nii.gz"
    assert dataset.modality == "CT"
    assert dataset.classes == {0: "background", 1: "liver", 2: "tumour"}

    manifest["training"].append({"image": "./imagesTr/zz.nii.gz", "label": "./labelsTr/zz.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DataError, match=r"zz\.nii\.gz: listed in .*dataset\.json but does not exist"
    ):
        load_dataset(tmp_path)

    manifest["modality"] = {"0": "FLAIR", "1": "T1w"}
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"dataset\.json: the dataset has 2 image channels"):
        load_dataset(tmp_path)

    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: not valid JSON"):
        load_dataset(tmp_path / "dataset.json")


def test_nnunet_raw_folder(hippocampus_dir, tmp_path):
    root = tmp_path / "Dataset004_Hippocampus"
    copy_hippocampus(hippocampus_dir, root, image_suffix="_0000")
    (root / "imagesTs").mkdir()
    shutil.copy(
        hippocampus_dir / "imagesUnlabeled" / "hippocampus_118.nii.gz",
        root / "imagesTs" / "hippocampus_118_0000.nii.gz",
    )
    manifest = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": 3,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(manifest))
    dataset = load_dataset(root)
    assert [c.name for c in dataset.labeled] == list(FEW)
    assert dataset.labeled[0].image == root / "imagesTr" / "hippocampus_001_0000.nii.gz"
    assert dataset.labeled[0].label == root / "labelsTr" / "hippocampus_001.nii.gz"
    assert [c.name for c in dataset.unlabeled] == ["hippocampus_118"]
    assert dataset.classes == HIPPO_CLASSES
    assert dataset.modality == "MR"

    manifest["channel_names"] = {"0": "T2", "1": "ADC"}
    (root / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="only single-channel images are supported"):
        load_dataset(root)

    manifest["channel_names"] = {"0": "MRI"}
    (root / "dataset.json").write_text(json.dumps(manifest))
    (root / "labelsTr" / "hippocampus_004.nii.gz").unlink()
    with pytest.raises(DataError, match=r"hippocampus_004_0000\.nii\.gz: image has no label"):
        load_dataset(root)


def test_plain_folder(hippocampus_dir, tmp_path):
    copy_hippocampus(hippocampus_dir, tmp_path)
    (tmp_path / "imagesUnlabeled").mkdir()
    shutil.copy(
        hippocampus_dir / "imagesUnlabeled" / "hippocampus_118.nii.gz", tmp_path / "imagesUnlabeled"
    )
    dataset = load_dataset(tmp_path)
    assert [c.name for c in dataset.labeled] == list(FEW)
    assert [c.name for c in dataset.unlabeled] == ["hippocampus_118"]
    assert dataset.classes is None
    assert dataset.source == tmp_path
    assert infer_classes(dataset) == {0: "background", 1: "class_1", 2: "class_2"}


def test_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match=r"missing: dataset file or folder does not exist"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(DataError, match="not a dataset: expected a dataset.json"):
        load_dataset(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match=r"labelsTr: folder is missing"):
        load_dataset(tmp_path)


def test_from_folders_pairs_by_case_name(tmp_path, write_volume):
    write_volume("img/a_0000.nii.gz")
    write_volume("img/b.nrrd")
    write_volume("img/c.mhd")  # its c.raw must not count as a case
    write_volume("lab/a.nii.gz")
    write_volume("lab/b.nii.gz")
    write_volume("lab/c.nii.gz")
    write_volume("unl/u.mha")
    (tmp_path / "img" / "d_series").mkdir()  # a DICOM series folder is a case
    write_volume("lab/d_series.nii.gz")
    (tmp_path / "img" / ".DS_Store").write_text("")
    (tmp_path / "img" / "._b.nrrd").write_text("")  # macOS resource fork, as in MSD archives
    dataset = from_folders(tmp_path / "img", tmp_path / "lab", tmp_path / "unl", classes={0: "bg"})
    assert [(c.name, c.image.name, c.label.name) for c in dataset.labeled] == [
        ("a", "a_0000.nii.gz", "a.nii.gz"),
        ("b", "b.nrrd", "b.nii.gz"),
        ("c", "c.mhd", "c.nii.gz"),
        ("d_series", "d_series", "d_series.nii.gz"),
    ]
    assert dataset.unlabeled == [Case("u", tmp_path / "unl" / "u.mha")]
    assert dataset.classes == {0: "bg"}


def test_from_folders_errors(tmp_path, write_volume):
    write_volume("img/a.nii.gz")
    write_volume("img/b.nii.gz")
    write_volume("lab/a.nii.gz")
    with pytest.raises(DataError, match=r"img/b\.nii\.gz: image has no label in .*lab"):
        from_folders(tmp_path / "img", tmp_path / "lab")
    dataset = from_folders(tmp_path / "img", tmp_path / "lab", allow_unlabeled=True)
    assert [c.name for c in dataset.labeled] == ["a"]
    assert [c.name for c in dataset.unlabeled] == ["b"]
    write_volume("lab/z.nii.gz")
    with pytest.raises(DataError, match=r"lab/z\.nii\.gz: label has no matching image"):
        from_folders(tmp_path / "img", tmp_path / "lab", allow_unlabeled=True)
    write_volume("img2/a.nii.gz")
    write_volume("img2/a.nrrd")
    with pytest.raises(DataError, match=r"two files give the case name 'a'"):
        from_folders(tmp_path / "img2", tmp_path / "lab", allow_unlabeled=True)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"none: folder holds no images"):
        from_folders(tmp_path / "none", tmp_path / "lab")


def small_dataset() -> Dataset:
    labeled = [
        Case(n, Path(f"{n}.nii.gz"), Path(f"l/{n}.nii.gz"))
        for n in ("case_01", "case_02", "case_03")
    ]
    return Dataset(labeled, [Case("extra", Path("extra.nii.gz"))], {0: "background", 1: "x"})


def test_with_labeled_subset():
    subset = with_labeled_subset(small_dataset(), ["case_02"])
    assert [c.name for c in subset.labeled] == ["case_02"]
    assert [c.name for c in subset.unlabeled] == ["case_01", "case_03", "extra"]
    assert all(c.label is None for c in subset.unlabeled)
    assert subset.classes == small_dataset().classes
    with pytest.raises(DataError, match=r"unknown case names: case_2 \(did you mean case_02"):
        with_labeled_subset(small_dataset(), ["case_2"])
    with pytest.raises(DataError, match="no label to keep: extra"):
        with_labeled_subset(small_dataset(), ["extra"])


def test_exclude_cases():
    remaining = exclude_cases(small_dataset(), ["case_01", "extra"])
    assert [c.name for c in remaining.labeled] == ["case_02", "case_03"]
    assert remaining.unlabeled == []
    with pytest.raises(DataError, match="unknown case names: nope"):
        exclude_cases(small_dataset(), ["nope"])


def test_read_case_list(tmp_path):
    path = tmp_path / "labeled.txt"
    path.write_text(
        "# cases with expert labels\n\ncase_01\n  case_02.nii.gz  # trailing comment\n"
        "imagesTr/case_03_0000.nii.gz\ncase_01\n"
    )
    assert read_case_list(path) == ["case_01", "case_02", "case_03"]
    subset = with_labeled_subset(small_dataset(), read_case_list(path))
    assert [c.name for c in subset.labeled] == ["case_01", "case_02", "case_03"]
    with pytest.raises(DataError, match=r"missing\.txt: case list file does not exist"):
        read_case_list(tmp_path / "missing.txt")


def test_real_subset_of_hippocampus(hippocampus_dir, tmp_path):
    path = tmp_path / "few.txt"
    path.write_text("\n".join(FEW))
    dataset = with_labeled_subset(load_dataset(hippocampus_dir), read_case_list(path))
    assert [c.name for c in dataset.labeled] == list(FEW)
    assert len(dataset.unlabeled) == 198
    assert all(c.label is None for c in dataset.unlabeled)


def test_prediction_inputs_are_named_as_training_names_cases(write_volume, tmp_path):
    """predict's inputs: nnU-Net's _0000 suffix goes, a .mhd's .raw and hidden files are not
    images, a sub-folder is a series, a folder without images is itself a series."""
    folder = tmp_path / "inputs"
    write_volume("inputs/a_0000.nii.gz")
    write_volume("inputs/b.nrrd")
    write_volume("inputs/c.mhd")
    write_volume("inputs/series_d/slice.nii.gz")
    (folder / ".DS_Store").write_text("x")
    assert (folder / "c.raw").exists()
    cases = cases_from_paths([folder])
    assert [c.name for c in cases] == ["a", "b", "c", "series_d"]
    assert cases_from_paths([folder / "a_0000.nii.gz"])[0].name == "a"
    (tmp_path / "empty_series").mkdir()
    assert [c.name for c in cases_from_paths([tmp_path / "empty_series"])] == ["empty_series"]
    with pytest.raises(DataError, match="no such file"):
        cases_from_paths([tmp_path / "missing.nii.gz"])
    with pytest.raises(DataError, match="duplicate case names"):
        cases_from_paths([folder / "b.nrrd", folder])
