"""What predict writes, and where: every input checked first, nothing outside --out, never into
an input, a folder replaced whole with a manifest, a partial or mixed folder detected."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from backend_helpers import StopAt, run_cli, train_tiny
from SemiSupSegLib.backend.checkpoint import load_checkpoint, save_checkpoint
from SemiSupSegLib.backend.cli import main
from SemiSupSegLib.backend.datasets import Case
from SemiSupSegLib.backend.errors import CancelledError, DataError
from SemiSupSegLib.backend.inference import Predictor, predict_cases
from SemiSupSegLib.backend.metrics import evaluate_folders
from SemiSupSegLib.output_layout import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    PREDICTION_MANIFEST_FILE,
    SCORES_COLUMNS,
    SCORES_FILE,
    UNCERTAINTY_FOLDER,
    label_file_name,
    uncertainty_file_name,
)
from SemiSupSegLib.protocol import EXIT_FAILED, JobSpec, ProtocolError
from SemiSupSegLib.results import readScores


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder of the tiny network (1 iteration) and the folder of its data."""
    folder = tmp_path_factory.mktemp("tiny")
    train_tiny(folder, folder / "run", 1)
    return folder


@pytest.fixture
def images(trained, tmp_path):
    """A private copy of the three tiny images."""
    copy = tmp_path / "images"
    shutil.copytree(trained / "images", copy)
    return copy


def _predict(trained, inputs, out, *extra):
    events = out.parent / "predict-events.jsonl"
    arguments = ["predict", "--run", trained / "run", "--input", *inputs, "--out", out, *extra]
    return run_cli(arguments + ["--device", "cpu"], events)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / PREDICTION_MANIFEST_FILE).read_text())


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped-abs", "sub/escaped", "..", ".hidden"])
def test_case_names_cannot_leave_the_output_folder(trained, images, tmp_path, name):
    """Neither a job nor the backend writes a case named with a path outside its folder."""
    job = {
        "version": 1,
        "labeled": [{"name": "a", "image": "a.nii.gz", "label": "b.nii.gz"}],
        "unlabeled": [{"name": name, "image": "c.nii.gz"}],
    }
    with pytest.raises(ProtocolError, match=r"job\.unlabeled\[0\]\.name"):
        JobSpec.from_dict(job)
    victim = tmp_path / "escaped.nii.gz"
    victim.write_bytes(b"precious")
    predictor = Predictor.from_run(trained / "run", device="cpu")
    case = Case(name, images / "case0.nii.gz")
    with pytest.raises(DataError, match="plain file name") as caught:
        predict_cases(predictor, [case], tmp_path / "out" / "pred")
    assert str(case.image) in str(caught.value)
    assert victim.read_bytes() == b"precious"
    assert not Path("/tmp/escaped-abs.nii.gz").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["same", "parent"])
def test_predict_refuses_an_output_folder_holding_its_inputs(trained, images, where):
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    out = images if where == "same" else images.parent
    code, events = _predict(trained, [images], out)
    assert code == EXIT_FAILED
    assert "holds the input" in events[-1]["message"]
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_a_rerun_replaces_the_folder_whole(trained, images, tmp_path):
    """A second prediction with fewer cases leaves no map of the first beside its scores."""
    out = tmp_path / "pred"
    code, _ = _predict(trained, [images], out)
    assert code == 0
    manifest = _manifest(out)
    assert manifest["status"] == "complete" and len(manifest["cases"]) == 3
    assert manifest["model"]["file"] == str((trained / "run" / MODEL_FILE).absolute())
    assert manifest["model"]["iteration"] == 1 and manifest["time"]

    code, _ = _predict(trained, [images / "case1.nii.gz"], out)
    assert code == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case1.nii.gz"]
    assert sorted(p.name for p in (out / UNCERTAINTY_FOLDER).iterdir()) == ["case1.nii.gz"]
    assert [c["case"] for c in _manifest(out)["cases"]] == ["case1"]
    assert len((out / SCORES_FILE).read_text().splitlines()) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pred")] == []


def test_scores_written_by_predict_are_read_by_the_review_table(trained, images, tmp_path):
    """``predict`` writes scores.csv and the Slicer module's review table reads it, both by
    ``output_layout.ScoreRow``: every case with its score, voxel count and files."""
    out = tmp_path / "pred"
    assert _predict(trained, [images], out)[0] == 0
    header = (out / SCORES_FILE).read_text().splitlines()[0]
    assert tuple(header.split(",")) == SCORES_COLUMNS
    listed = {c["case"]: c for c in _manifest(out)["cases"]}
    rows = readScores(out / SCORES_FILE, roundNumber=3)
    assert sorted(r.case for r in rows) == sorted(listed) == ["case0", "case1", "case2"]
    assert [r.score for r in rows] == sorted((r.score for r in rows), reverse=True)
    for row in rows:
        name = label_file_name(row.case, row.image)
        assert listed[row.case]["label"] == name
        assert listed[row.case]["uncertainty"] == uncertainty_file_name(name)
        assert (row.label, row.uncertainty) == (
            str(out / name),
            str(out / uncertainty_file_name(name)),
        )
        label = sitk.GetArrayFromImage(sitk.ReadImage(row.label))
        assert row.foregroundVoxels == int((label > 0).sum())
        assert Path(row.uncertainty).is_file() and row.image == str(images / name)
        assert row.round == 3


def test_a_folder_holding_other_files_is_not_replaced(trained, images, tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, events = _predict(trained, [images], out)
    assert code == EXIT_FAILED and "notes.txt" in events[-1]["message"]
    assert (out / "notes.txt").read_text() == "mine"

    (out / "notes.txt").unlink()
    assert _predict(trained, [images], out)[0] == 0
    (out / "notes.txt").write_text("mine")  # added to a prediction folder afterwards
    code, events = _predict(trained, [images], out)
    assert code == EXIT_FAILED and "did not write" in events[-1]["message"]
    assert (out / "notes.txt").read_text() == "mine"


def test_evaluate_refuses_a_partial_or_mixed_folder(trained, images, tmp_path):
    out = tmp_path / "pred"
    assert _predict(trained, [images], out)[0] == 0
    labels = tmp_path / "labels"
    shutil.copytree(trained / "labels", labels)
    assert evaluate_folders(out, labels, tmp_path / "e")["num_cases"] == 3

    stray = out / "case9.nii.gz"  # a map of another run beside this one's
    shutil.copy(out / "case0.nii.gz", stray)
    shutil.copy(labels / "case0.nii.gz", labels / "case9.nii.gz")
    with pytest.raises(DataError, match="mixed.*case9.nii.gz"):
        evaluate_folders(out, labels, tmp_path / "e")
    stray.unlink()

    (out / "case2.nii.gz").unlink()
    with pytest.raises(DataError, match="missing"):
        evaluate_folders(out, labels, tmp_path / "e")

    manifest = _manifest(out)
    manifest["status"] = "partial"
    (out / PREDICTION_MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="did not finish"):
        evaluate_folders(out, labels, tmp_path / "e")
    arguments = ["evaluate", "--pred", str(out), "--truth", str(labels), "--out", str(tmp_path)]
    assert main(arguments) == EXIT_FAILED


def test_a_cancelled_prediction_leaves_the_previous_folder(trained, images, tmp_path):
    from SemiSupSegLib.backend.cancellation import StopFlag

    out = tmp_path / "pred"
    assert _predict(trained, [images / "case0.nii.gz"], out)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    predictor = Predictor.from_run(trained / "run", device="cpu")
    with torch.no_grad():  # another model, whose maps would differ
        for parameter in predictor.network.parameters():
            parameter.mul_(-1.0)
    cases = [Case(p.name.split(".")[0], p) for p in sorted(images.iterdir())]
    stop = StopFlag()
    with pytest.raises(CancelledError):
        predict_cases(predictor, cases, out, 1, StopAt(stop), stop)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "pred", "predict-events.jsonl"]


@pytest.mark.parametrize("kind", ["2D", "4D", "vector"])
def test_a_bad_input_mid_folder_stops_before_anything_is_written(trained, images, tmp_path, kind):
    array = {
        "2D": np.zeros((20, 20), np.float32),
        "4D": np.zeros((2, 20, 20, 20), np.float32),
        "vector": np.zeros((20, 20, 20, 3), np.float32),
    }[kind]
    bad = images / "case1.nii.gz"  # between case0 and case2
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=kind == "vector"), str(bad))
    code, events = _predict(trained, [images], tmp_path / "pred")
    assert code == EXIT_FAILED
    assert str(bad) in events[-1]["message"] and "3D volume" in events[-1]["message"]
    assert not (tmp_path / "pred").exists()


def test_prediction_files_follow_the_umask(trained, images, tmp_path):
    previous = os.umask(0o022)
    try:
        assert _predict(trained, [images / "case0.nii.gz"], tmp_path / "pred")[0] == 0
    finally:
        os.umask(previous)
    for path in (tmp_path / "pred" / "case0.nii.gz", tmp_path / "pred" / SCORES_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_an_unfinished_checkpoint_is_named_in_a_warning(trained, images, tmp_path):
    """A run folder without model.pt predicts from its checkpoint, saying which iteration."""
    state = load_checkpoint(trained / "run" / CHECKPOINT_FILE)
    state["iteration"], state["config"]["iterations"] = 6, 1500
    save_checkpoint(tmp_path / "stopped" / CHECKPOINT_FILE, state)
    arguments = ["predict", "--run", tmp_path / "stopped", "--input", images / "case0.nii.gz",
                 "--out", tmp_path / "pred", "--device", "cpu"]  # fmt: skip
    code, events = run_cli(arguments, tmp_path / "events.jsonl")
    assert code == 0
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("iteration 6 of 1500" in w and CHECKPOINT_FILE in w for w in warnings), warnings
    assert _manifest(tmp_path / "pred")["model"]["iteration"] == 6


@pytest.mark.parametrize("samples", ["0", "-3", "101"])
def test_mc_samples_out_of_range_is_refused(trained, images, tmp_path, samples):
    code, events = _predict(trained, [images], tmp_path / "pred", "--mc-samples", samples)
    assert code == EXIT_FAILED and "mc_samples must be 1 to 100" in events[-1]["message"]
    assert not (tmp_path / "pred").exists()
