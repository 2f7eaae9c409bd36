"""The command line as a user (or the Slicer module) calls it: train, predict, evaluate, run."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from SemiSupSegLib.output_layout import (
    CONFIG_FILE,
    PREDICTIONS_FOLDER,
    SCORES_FILE,
    SUMMARY_FILE,
    UNCERTAINTY_FOLDER,
)
from SemiSupSegLib.protocol import EXIT_FAILED, JobSpec, LabeledCase, UnlabeledCase, parse_event

CLI = [sys.executable, "-m", "SemiSupSegLib.backend"]
QUICK = ["--set", "batch_size=1", "--set", "checkpoint_every=0", "--set", "log_every=1"]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout
    )


def read_events(path: Path) -> list:
    return [parse_event(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cases(hippocampus_dir):
    names = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
    return {
        n: (
            hippocampus_dir / "imagesTr" / f"{n}.nii.gz",
            hippocampus_dir / "labelsTr" / f"{n}.nii.gz",
        )
        for n in names
    }


def test_train_predict_evaluate_on_folders(cases, tmp_path):
    """--images/--labels folders, a --labeled list, then predict and evaluate through the CLI."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name, (image, label) in cases.items():
        shutil.copy(image, images / f"{name}.nii.gz")
        shutil.copy(label, labels / f"{name}.nii.gz")
    (tmp_path / "labeled.txt").write_text("hippocampus_001\nhippocampus_003\n")
    events = tmp_path / "events.jsonl"
    result = run_cli(
        "train", "--images", images, "--labels", labels, "--labeled", tmp_path / "labeled.txt",
        "--method", "supervised", "--iterations", 4, "--out", tmp_path / "run",
        "--events", events, *QUICK,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    log = read_events(events)
    assert log[-1]["event"] == "done"
    start = next(e for e in log if e["event"] == "start")
    assert "2 labeled" in start["message"]
    assert [e["iteration"] for e in log if e["event"] == "progress"] == [1, 2, 3, 4]
    config = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert config["iterations"] == 4 and config["batch_size"] == 1

    result = run_cli(
        "predict",
        "--run",
        tmp_path / "run",
        "--input",
        images,
        "--out",
        tmp_path / "pred",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    for name in cases:
        assert (tmp_path / "pred" / f"{name}.nii.gz").exists()
        assert (tmp_path / "pred" / UNCERTAINTY_FOLDER / f"{name}.nii.gz").exists()
    with open(tmp_path / "pred" / SCORES_FILE) as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["case"] for r in rows) == sorted(cases)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)

    result = run_cli(
        "evaluate", "--pred", tmp_path / "pred", "--truth", labels, "--out", tmp_path / "eval"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "eval" / SUMMARY_FILE).read_text())
    assert summary["num_cases"] == 3
    assert "Mean foreground Dice" in result.stdout


def test_run_job_writes_model_predictions_and_scores(cases, tmp_path):
    """What the Slicer module does: write a job, run it, read the outputs named in the events."""
    (a, b, c) = cases
    job = JobSpec(
        method="supervised",
        labeled=[LabeledCase(n, str(cases[n][0]), str(cases[n][1])) for n in (a, b)],
        unlabeled=[UnlabeledCase(c, str(cases[c][0]))],
        classes={"0": "background", "1": "Anterior", "2": "Posterior"},
        output="out",
        settings={"iterations": 3, "batch_size": 1, "checkpoint_every": 0},
    )
    job.save(tmp_path / "job.json")
    result = run_cli("run", tmp_path / "job.json", "--events", "-", "--quiet")
    assert result.returncode == 0, result.stderr
    events = [parse_event(line) for line in result.stdout.splitlines()]
    outputs = {}
    for event in events:
        outputs.update(event.get("outputs", {}))
    assert Path(outputs["model"]).exists()
    prediction = sitk.ReadImage(str(tmp_path / "out" / PREDICTIONS_FOLDER / f"{c}.nii.gz"))
    source = sitk.ReadImage(str(cases[c][0]))
    assert prediction.GetSize() == source.GetSize()
    assert prediction.GetDirection() == source.GetDirection()
    assert Path(outputs["scores"]).read_text().splitlines()[1].startswith(c)


def test_malformed_job_is_rejected_with_the_field_named(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"version": 1, "labeled": [{"image": "a.nii.gz"}]}))
    result = run_cli("run", path, "--events", "-", "--quiet")
    assert result.returncode == EXIT_FAILED
    error = parse_event(result.stdout.splitlines()[-1])
    assert error["event"] == "error"
    assert "job.labeled[0].label" in error["message"] and str(path) in error["message"]
    assert not (tmp_path / "outputs").exists()


def test_bad_input_stops_before_anything_is_written(cases, tmp_path):
    """A label whose geometry differs from its image is named, and no run folder appears."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    image, label = cases["hippocampus_001"]
    shutil.copy(image, images / "case.nii.gz")
    broken = sitk.ReadImage(str(label))
    broken.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(broken, str(labels / "case.nii.gz"))
    result = run_cli(
        "train", "--images", images, "--labels", labels, "--method", "supervised", "--iterations", 2, "--out", tmp_path / "run",
        "--quiet", "--events", "-",
    )  # fmt: skip
    assert result.returncode == EXIT_FAILED
    error = parse_event(result.stdout.splitlines()[-1])
    assert "case.nii.gz" in error["message"] and "spacing" in error["message"]
    assert not (tmp_path / "run").exists()


def test_unknown_setting_is_a_clear_error(cases, tmp_path):
    image, label = cases["hippocampus_001"]
    result = run_cli(
        "train", "--images", image.parent, "--labels", label.parent, "--method", "supervised", "--iterations", 2,
        "--out", tmp_path / "run", "--set", "learning_rat=0.1",
    )  # fmt: skip
    assert result.returncode == EXIT_FAILED
    assert "unknown setting 'learning_rat'" in result.stderr
