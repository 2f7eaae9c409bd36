"""A whole round through the Logic's workflow, with a real MRML scene (slicer-core) and the REAL
backend on tiny hippocampus cases: export -> train/predict -> review -> import -> accept ->
warm-started retrain; and a cancelled job that leaves the scene untouched."""

import json
import sys
import time

import numpy as np
import pytest

from SemiSupSegLib import mrml_io
from SemiSupSegLib.job_export import ExportCancelled, LabeledPair
from SemiSupSegLib.output_layout import MODEL_FILE, RUN_FOLDER
from SemiSupSegLib.progress import roundTimesText
from SemiSupSegLib.protocol import JobSpec
from SemiSupSegLib.scene_import import ROLE_PSEUDO_MASK, findCaseNode
from SemiSupSegLib.training_options import TrainingOptions
from SemiSupSegLib.workflow import Workflow, WorkflowError
from slicer_side_helpers import (
    CLASS_NAMES,
    TINY_SETTINGS,
    hippocampusCase,
    labelArray,
    newScene,
    nodeIds,
    segmentationFromLabelFile,
)

OPTIONS = TrainingOptions(
    method="supervised",
    preset="custom",
    iterations=TINY_SETTINGS["iterations"],
    device="cpu",
    extraSettings={k: v for k, v in TINY_SETTINGS.items() if k != "iterations"},
)


def build_scene():
    scene = newScene()
    pairs = []
    for number in ("001", "003"):
        image, label = hippocampusCase(number)
        volume = mrml_io.readVolumeNode(scene, image, f"case{number}")
        segmentation = segmentationFromLabelFile(scene, label, volume, f"case{number} labels")
        pairs.append(LabeledPair(volume, segmentation))
    unlabeled = mrml_io.readVolumeNode(scene, hippocampusCase("004")[0], "case004")
    return scene, pairs, unlabeled


def test_a_whole_round_with_the_real_backend(tmp_path):
    scene, pairs, unlabeled = build_scene()
    workflow = Workflow(scene, tmp_path / "session", python=sys.executable)
    with pytest.raises(WorkflowError, match="no finished round"):
        workflow.exportRetrainJob(pairs, OPTIONS)

    job_path = workflow.exportJob(pairs, [unlabeled], None, OPTIONS)
    assert job_path == tmp_path / "session" / "round-001" / "job.json"
    before = nodeIds(scene)
    runner = workflow.startJob(job_path)
    assert workflow.running
    assert workflow.wait(timeout=300), "the job did not finish"
    assert runner.succeeded, runner.progress.errorText
    assert nodeIds(scene) == before  # running changes nothing in the scene
    assert runner.progress.percent == 100
    assert workflow.session.round(1).status == "finished"
    times = workflow.session.round(1).times  # kept in the session, said in the log
    parts = ["export", "start-up", "checks", "training", "prediction", "import"]
    assert list(times) == parts and times["training"] > 0 and times["prediction"] > 0
    assert [line for line in runner.progress.log if " took " in line] == [roundTimesText(1, times)]
    assert [r.case for r in workflow.importedRows] == ["case004"]

    rows = workflow.reviewRows()
    assert [r.case for r in rows] == ["case004"]
    row = rows[0]
    assert row.round == 1 and row.status == "to review"

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")  # the user moved it
    unlabeled.SetAndObserveTransformNodeID(transform.GetID())
    loaded = workflow.loadCase("case004")
    assert loaded.volume is unlabeled  # the scene's own volume, not a second copy
    assert loaded.segmentation.GetTransformNodeID() == transform.GetID()
    assert loaded.uncertainty.GetTransformNodeID() == transform.GetID()
    assert mrml_io.segmentNames(loaded.segmentation) == list(CLASS_NAMES)
    labeled_colours = mrml_io.segmentColours(pairs[0].labels)
    for name, colour in mrml_io.segmentColours(loaded.segmentation).items():
        assert colour == pytest.approx(labeled_colours[name])
    assert (
        loaded.uncertainty.GetImageData().GetDimensions()
        == unlabeled.GetImageData().GetDimensions()
    )
    assert findCaseNode(scene, "case004", ROLE_PSEUDO_MASK, 1) is loaded.segmentation
    again = workflow.loadCase("case004")
    assert again.segmentation is loaded.segmentation  # selecting again reuses the nodes

    # the pseudo-mask in the scene is the backend's label map, value for value
    exported = tmp_path / "check.nrrd"
    mrml_io.exportSegmentsToFile(scene, loaded.segmentation, CLASS_NAMES, unlabeled, exported)
    np.testing.assert_array_equal(labelArray(exported), labelArray(row.label))

    user_labels_before = labelArray(job_path.parent / "inputs" / "labels" / "case001.nrrd")
    first = workflow.acceptCase("case004")
    second = workflow.acceptCase("case004")  # accepting again makes a new version
    assert (first.version, second.version) == (1, 2)
    assert first.label != second.label
    np.testing.assert_array_equal(labelArray(first.label), labelArray(row.label))
    assert workflow.reviewRows()[0].status == "accepted"
    assert workflow.session.labelOrigin("case004") == "round 1 (v2)"

    retrain_path = workflow.exportRetrainJob(pairs, OPTIONS)
    retrain = JobSpec.load(retrain_path)
    assert retrain.init_from == str(tmp_path / "session" / "round-001" / RUN_FOLDER / MODEL_FILE)
    assert [c.name for c in retrain.labeled] == ["case001", "case003", "case004"]
    assert retrain.labeled[2].label == second.label
    assert retrain.unlabeled == []
    assert retrain.settings["iterations"] == 1  # a fifth of 3, at least one
    assert retrain.classes == {"0": "background", "1": "Anterior", "2": "Posterior"}
    np.testing.assert_array_equal(
        labelArray(retrain_path.parent / "inputs" / "labels" / "case001.nrrd"), user_labels_before
    )
    runner = workflow.startJob(retrain_path)
    assert workflow.wait(timeout=300)
    assert runner.succeeded, runner.progress.errorText
    assert any("warm start" in line for line in runner.progress.log)
    assert runner.progress.log[-1] == roundTimesText(2, workflow.session.round(2).times)
    assert runner.progress.log[-1].startswith("Round 2 took ")
    assert workflow.importedRows == []  # nothing left unlabeled to predict
    session = json.loads((tmp_path / "session" / "semisupseg-session.json").read_text())
    assert [r["status"] for r in session["rounds"]] == ["finished", "finished"]

    # Fast unchecked: the same enlarged labeled set, from scratch, the full budget
    scratch = JobSpec.load(
        workflow.exportRetrainJob(
            pairs, TrainingOptions(**{**OPTIONS.__dict__, "warmStart": False})
        )
    )
    assert scratch.init_from is None
    assert scratch.settings["iterations"] == OPTIONS.totalIterations()
    assert [c.name for c in scratch.labeled] == ["case001", "case003", "case004"]


def test_a_cancelled_export_leaves_no_round_behind(tmp_path):
    scene, pairs, unlabeled = build_scene()
    workflow = Workflow(scene, tmp_path / "session", python=sys.executable)
    before = nodeIds(scene)
    seen = []

    def progress(done, total, what):
        seen.append(what)
        if done == 2:
            raise ExportCancelled("stopped by the user")

    with pytest.raises(ExportCancelled):
        workflow.exportJob(pairs, [unlabeled], None, OPTIONS, progress=progress)
    assert seen == ["image of case001", "labels of case001", "image of case003"]
    assert not (tmp_path / "session" / "round-001").exists()
    assert workflow.session.rounds == [] and nodeIds(scene) == before
    assert workflow.exportJob(pairs, [unlabeled], None, OPTIONS).parent.name == "round-001"


def test_cancel_leaves_the_scene_untouched(tmp_path):
    scene, pairs, unlabeled = build_scene()
    workflow = Workflow(scene, tmp_path / "session", python=sys.executable)
    options = TrainingOptions(**{**OPTIONS.__dict__, "iterations": 50})
    job_path = workflow.exportJob(pairs, [unlabeled], None, options)
    before = nodeIds(scene)
    runner = workflow.startJob(job_path)
    deadline = time.monotonic() + 180
    while runner.progress.events == 0 and not runner.finished:
        workflow.poll()
        time.sleep(0.1)
        assert time.monotonic() < deadline
    workflow.cancel()
    assert workflow.wait(timeout=60)
    assert runner.cancelled
    assert nodeIds(scene) == before
    assert workflow.session.round(1).status == "cancelled"
    assert workflow.reviewRows() == []
    with pytest.raises(WorkflowError, match="no finished round"):
        workflow.exportRetrainJob(pairs, OPTIONS)
