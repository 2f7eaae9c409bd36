"""Job protocol v1: valid jobs round-trip, malformed jobs and events are rejected clearly."""

from __future__ import annotations

import json

import pytest

from SemiSupSegLib.protocol import (
    JobSpec,
    LabeledCase,
    ProtocolError,
    UnlabeledCase,
    case_name_from_path,
    encode_event,
    make_event,
    parse_event,
)


def valid_job() -> dict:
    return {
        "version": 1,
        "method": "supervised",
        "classes": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "labeled": [{"name": "a", "image": "inputs/a.nrrd", "label": "inputs/a_label.nrrd"}],
        "unlabeled": ["inputs/b.nii.gz", {"image": "inputs/c.mha"}],
        "output": "outputs",
        "settings": {"iterations": 5},
    }


def test_valid_job_round_trips(tmp_path):
    job = JobSpec.from_dict(valid_job())
    assert [c.name for c in job.unlabeled] == ["b", "c"]
    path = tmp_path / "job.json"
    job.save(path)
    again = JobSpec.load(path)
    assert again == job
    resolved = again.resolve(tmp_path)
    assert resolved.labeled[0].image == str(tmp_path / "inputs" / "a.nrrd")
    assert resolved.output == str(tmp_path / "outputs")


def test_job_built_in_python_matches_json():
    job = JobSpec(
        labeled=[LabeledCase("a", "a.nrrd", "a-label.nrrd")],
        unlabeled=[UnlabeledCase("b", "b.nrrd")],
        classes={"0": "background", "1": "tumour"},
    )
    assert JobSpec.from_dict(json.loads(json.dumps(job.to_dict()))) == job


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 2}, "protocol 1"),
        ({"method": "magic"}, "job.method"),
        ({"device": "tpu"}, "job.device"),
        ({"labeled": []}, "at least one labeled case"),
        ({"labeled": "a.nrrd"}, "job.labeled: expected a list"),
        ({"labeled": [{"image": "a.nrrd"}]}, "job.labeled[0].label"),
        ({"unlabeled": [{"name": "a", "image": "x.nrrd"}]}, "duplicate case names ['a']"),
        ({"classes": {"0": "background", "2": "x"}}, "without gaps"),
        ({"classes": {"zero": "background"}}, "not an integer"),
        ({"settings": [1, 2]}, "job.settings"),
        ({"colour": "red"}, "unknown field"),
        ({"predict_unlabeled": "yes"}, "predict_unlabeled"),
        ({"method": "mn", "unlabeled": []}, "add unlabeled volumes, or choose 'supervised'"),
    ],
)
def test_malformed_jobs_are_rejected(change, message):
    data = valid_job()
    data.update(change)
    with pytest.raises(ProtocolError) as err:
        JobSpec.from_dict(data)
    assert message in str(err.value)


def test_job_file_errors_name_the_file(tmp_path):
    broken = tmp_path / "job.json"
    broken.write_text("{ not json")
    with pytest.raises(ProtocolError, match=str(broken)):
        JobSpec.load(broken)
    with pytest.raises(ProtocolError, match="cannot read"):
        JobSpec.load(tmp_path / "missing.json")


def test_events_round_trip_and_reject_garbage():
    event = make_event(
        "progress", stage="training", iteration=3, total=10, loss={"loss": float("nan")}
    )
    line = encode_event(event)
    assert "\n" not in line
    parsed = parse_event(line)
    assert parsed["iteration"] == 3 and parsed["loss"] == {"loss": None}
    with pytest.raises(ProtocolError):
        parse_event("not json")
    with pytest.raises(ProtocolError):
        parse_event(json.dumps({"v": 1, "event": "explode"}))
    with pytest.raises(ProtocolError):
        parse_event(json.dumps({"v": 1, "event": "progress", "iteration": "3"}))
    with pytest.raises(ProtocolError):
        make_event("error")  # an error needs its message


@pytest.mark.parametrize(
    "path, name",
    [
        ("/data/case_001.nii.gz", "case_001"),
        ("case.NRRD", "case"),
        ("x/y/scan.mha", "scan"),
        ("dicom/series_7/", "series_7"),
        ("imagesTs/la_003_0000.nii.gz", "la_003"),  # nnU-Net's channel suffix
        ("case_0001.nii.gz", "case_0001"),  # a second channel is not stripped (datasets refuses it)
    ],
)
def test_case_names(path, name):
    assert case_name_from_path(path) == name


def test_a_job_names_unnamed_cases_as_train_and_predict_do():
    """An nnU-Net image case_0000.nii.gz is case "case" in a job too, so its pseudo-mask is
    case.nii.gz as with ``predict`` and it matches the label case.nii.gz in ``evaluate``."""
    job = valid_job()
    job["labeled"] = [{"image": "imagesTr/la_003_0000.nii.gz", "label": "labelsTr/la_003.nii.gz"}]
    job["unlabeled"] = ["imagesTs/la_100_0000.nii.gz"]
    spec = JobSpec.from_dict(job)
    assert [c.name for c in spec.labeled + spec.unlabeled] == ["la_003", "la_100"]


def test_the_output_layout_keeps_the_names_existing_folders_use():
    """Run, prediction and session folders written by earlier versions are read by these
    names: a rename here would orphan them, so it must be a deliberate change of this test."""
    from SemiSupSegLib import output_layout as layout

    names = {
        "RUN_FOLDER": "run", "PREDICTIONS_FOLDER": "predictions", "EVALUATION_FOLDER": "evaluation",
        "MODEL_FILE": "model.pt", "CHECKPOINT_FILE": "checkpoint.pt", "CONFIG_FILE": "config.json",
        "PLAN_FILE": "plan.json", "CASES_FILE": "cases.json", "UNCERTAINTY_FOLDER": "uncertainty",
        "SCORES_FILE": "scores.csv", "PREDICTION_MANIFEST_FILE": "predictions.json",
        "METRICS_FILE": "metrics.csv", "SUMMARY_FILE": "summary.json",
    }  # fmt: skip
    assert {k: getattr(layout, k) for k in names} == names
    assert layout.SCORES_COLUMNS[:6] == (
        "case", "score", "foreground_voxels", "label", "uncertainty", "image"
    )  # fmt: skip
    assert layout.METRICS_COLUMNS == (
        "case", "class_value", "class_name", "dice", "iou", "hd95_mm", "asd_mm", "penalty"
    )  # fmt: skip
