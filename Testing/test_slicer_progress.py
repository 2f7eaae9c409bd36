"""Slicer side, no Slicer: backend events -> progress model, and the job runner's states."""

import json

import pytest

from SemiSupSegLib.job_runner import JobRunner
from SemiSupSegLib.progress import (
    PLAN_PENDING,
    ProgressModel,
    describeEvent,
    formatPartSeconds,
    formatSeconds,
    planSummary,
    roundTimesText,
)
from SemiSupSegLib.protocol import EXIT_CANCELLED, EXIT_FAILED, encode_event, make_event
from slicer_side_helpers import FakeProcess, planEventLine


def line(kind, **fields):
    return encode_event(make_event(kind, **fields))


def test_format_seconds():
    assert formatSeconds(0) == "0s"
    assert formatSeconds(59.4) == "59s"
    assert formatSeconds(185) == "3m05s"
    assert formatSeconds(3725) == "1h02m"
    assert formatSeconds(-5) == "0s"


@pytest.mark.parametrize(
    "first, second", [("warm-up", "co-training"), ("pre-training", "self-training"), ("a", "b")]
)
def test_a_jobs_parts_are_timed_from_the_backends_events(first, second):
    """Start-up until the first event, checks until training starts, training (whatever stages
    the method names) until its model is written, prediction (with the checks of its images)
    until the last event."""
    model = ProgressModel()
    model.startTime = 100.0
    events = [
        ("stage", 103.0, {"stage": "validation", "message": "checking"}),
        ("plan", 104.0, {"stage": "planning", "plan": {"values": {}}}),
        ("start", 105.0, {"stage": "training", "total": 10}),
        ("progress", 110.0, {"stage": first, "iteration": 1, "total": 10}),
        ("log", 115.0, {"message": "warm start from the last round"}),
        ("stage", 120.0, {"stage": second}),
        ("stage", 121.0, {"stage": "validation", "message": "a method's own check"}),
        ("output", 150.0, {"stage": "training", "outputs": {"model": "m"}}),
        ("stage", 151.0, {"stage": "validation", "message": "checking 3 image(s)"}),
        ("stage", 152.0, {"stage": "prediction", "iteration": 0, "total": 3}),
        ("progress", 160.0, {"stage": "prediction", "iteration": 3, "total": 3}),
        ("output", 170.0, {"stage": "job", "outputs": {"scores": "s"}}),
        ("done", 171.0, {}),
    ]
    for kind, time, fields in events:
        event = make_event(kind, **fields)
        event["time"] = time
        model.feedLine(encode_event(event))
    assert model.partSeconds() == {
        "start-up": 3.0,
        "checks": 2.0,
        "training": 45.0,
        "prediction": 21.0,
    }
    times = {"import": 0.04, "export": 1.23, **model.partSeconds()}
    assert roundTimesText(2, times) == (
        "Round 2 took 1m12s: export 1.2s, start-up 3.0s, checks 2.0s, training 45s, "
        "prediction 21s, import 0.04s."
    )
    assert ProgressModel().partSeconds() == {}
    assert (formatPartSeconds(0.034), formatPartSeconds(9.94), formatPartSeconds(75)) == (
        "0.03s",
        "9.9s",
        "1m15s",
    )


def test_training_progress_stage_iteration_losses_eta():
    model = ProgressModel()
    assert model.statusText() == "Starting the backend..."
    model.feedLine(line("stage", stage="validation", message="checking 2 labeled case(s)"))
    model.feedLine(line("start", stage="training", message="training unet", total=200))
    assert (model.stage, model.total, model.percent) == ("training", 200, 0)
    model.feedLine(
        line(
            "progress",
            stage="training",
            iteration=50,
            total=200,
            loss={"loss": 0.5, "dice": 0.25},
            eta=130.0,
        )
    )
    assert model.percent == 25
    assert model.losses == {"loss": 0.5, "dice": 0.25}
    assert model.statusText() == "Training 50/200 · loss 0.5000, dice 0.2500 · 2m10s left"
    # a new stage resets the time estimate and the bar
    model.feedLine(line("stage", stage="prediction", iteration=0, total=4))
    assert (model.stage, model.iteration, model.total, model.eta) == ("prediction", 0, 4, None)
    model.feedLine(line("progress", stage="prediction", iteration=1, total=4, message="case_a"))
    assert model.percent == 25
    assert model.statusText().startswith("Predicting 1/4")
    log = model.takeNewLogLines()
    assert log[0] == "[Checking data] checking 2 labeled case(s)"
    assert "[Training] training unet" in log
    assert not any("case_a" in entry for entry in log)  # progress events move the bar only
    assert model.takeNewLogLines() == []


def test_outputs_warnings_and_success():
    model = ProgressModel()
    model.feedLine(line("warning", message="case x is small"))
    model.feedLine(line("output", stage="job", outputs={"model": "/o/run/model.pt"}))
    model.feedLine(line("done", stage="run"))
    model.finish(0)
    assert model.succeeded and model.finished and not model.failed
    assert model.percent == 100
    assert model.warnings == ["case x is small"]
    assert model.outputs == {"model": "/o/run/model.pt"}
    assert "Warning: case x is small" in model.log
    assert model.statusText() == "Finished"


def test_failure_shows_the_backends_error_text():
    model = ProgressModel()
    model.feedLine(
        line("error", stage="run", message="unknown setting 'foo'", errors=["Traceback..."])
    )
    model.finish(EXIT_FAILED, stderrTail="something else")
    assert model.failed
    assert model.errorText == "unknown setting 'foo'"
    assert model.errorDetails == ["Traceback..."]
    assert model.statusText() == "Failed: unknown setting 'foo'"


def test_failure_without_error_event_uses_stderr():
    model = ProgressModel()
    model.finish(
        EXIT_FAILED, stderrTail="Traceback (most recent call last):\nImportError: no torch"
    )
    assert model.failed
    assert model.errorText == "the backend failed: ImportError: no torch"
    crashed = ProgressModel()
    crashed.finish(-9)
    assert crashed.errorText == "the backend was stopped by signal 9"


def test_cancelled_exit_code_and_event():
    model = ProgressModel()
    model.feedLine(line("cancelled", stage="training", message="cancelled at iteration 3"))
    model.finish(EXIT_CANCELLED)
    assert model.cancelled and not model.failed and not model.succeeded
    assert model.statusText() == "Cancelled"


def test_non_json_lines_go_to_the_log_and_the_log_is_capped():
    model = ProgressModel(maxLogLines=5)
    assert model.feedLine("plain text from a library") is None
    assert model.feedLine('{"v": 99, "event": "stage"}') is None  # wrong version: shown as is
    for i in range(20):
        model.feedLine(line("log", message=f"line {i}"))
    assert len(model.log) == 5
    assert list(model.log)[-1] == "line 19"
    assert len(model.takeNewLogLines()) == 5
    model.addLog("x" * 5000)
    assert len(model.log[-1]) < 2100


CPU_PLAN = {
    "target_spacing": [1.25, 1.25, 1.25],
    "patch_size": [56, 40, 24],
    "batch_size": 4,
    "network_options": {"channels": [16, 32, 64, 128], "strides": [[2, 2, 2]] * 3},
    "iterations": 1500,
}


def test_a_plan_event_gives_the_plan_line_and_its_table_in_the_log():
    model = ProgressModel()
    assert model.plan is None and planSummary(model.plan) == PLAN_PENDING
    model.feedLine(line("stage", stage="validation", message="checking 2 labeled case(s)"))
    model.feedLine(planEventLine(CPU_PLAN, overrides={"batch_size": 2}))
    assert planSummary(model.plan) == (
        "Plan (cpu): 1.25 mm, patch 56x40x24, batch 2, 1500 iterations; "
        "1 setting of yours (batch_size)"
    )
    assert model.planTable.startswith("plan for cpu (standard budget")
    log = model.takeNewLogLines()
    # the table, a log line per row: the planned values and the one set by you
    assert log[1] == "[Planning] plan for cpu (standard budget, about 0.3 GiB per training step):"
    rows = {entry.split()[0]: entry.split()[1:] for entry in log[2:]}
    assert list(rows) == list(CPU_PLAN)
    assert rows["batch_size"] == ["2", "set", "by", "you"]
    assert rows["patch_size"] == ["56x40x24", "planned", "for", "cpu"]
    assert model.statusText() == "Checking data"  # a plan does not move the progress bar


def test_the_plan_line_of_a_gpu_plan_and_of_your_settings():
    values = {**CPU_PLAN, "target_spacing": [0.7, 0.7, 2.5], "batch_size": 5, "iterations": 6000}
    model = ProgressModel()
    model.feedLine(planEventLine(values, device="cuda", memoryGiB=7.2))
    assert (
        planSummary(model.plan)
        == "Plan (cuda): 0.7x0.7x2.5 mm, patch 56x40x24, batch 5, 6000 iterations"
    )
    yours = {"iterations": 300, "target_spacing": None, "patch_size": [64, 64, 32]}
    model.feedLine(planEventLine(values, overrides=yours, device="cuda"))
    assert planSummary(model.plan) == (
        "Plan (cuda): native spacing, patch 64x64x32, batch 5, 300 iterations; "
        "3 settings of yours (iterations, target_spacing, patch_size)"
    )


def test_describe_event():
    assert describeEvent(make_event("progress", stage="training", iteration=1, total=2)) is None
    assert describeEvent(make_event("error", message="boom")) == "Error: boom"
    assert describeEvent(make_event("stage", stage="training", total=3)) == "[Training] at 0/3"
    assert (
        describeEvent(make_event("stage", stage="co-training", iteration=500, total=1500))
        == "[Co-training] at 500/1500"
    )


def test_runner_with_an_injected_process():
    FakeProcess.instances = []
    FakeProcess.script = [
        line("stage", stage="validation", message="checking"),
        "not json",
        line("start", stage="training", total=3),
        line("progress", stage="training", iteration=3, total=3, loss={"loss": 1.0}),
        line("output", stage="job", outputs={"scores": "/x/scores.csv"}),
        line("done", stage="run"),
    ]
    FakeProcess.returncode = 0
    finished = []
    runner = JobRunner(FakeProcess)
    runner.onFinished.append(finished.append)
    runner.start(["python", "-m", "x"], env={"A": "1"}, cwd="/tmp")
    process = FakeProcess.instances[-1]
    assert process.started and process.command == ["python", "-m", "x"] and process.cwd == "/tmp"
    polls = 0
    while not runner.finished:
        events = runner.poll()
        polls += 1
        assert polls < 20
        assert all(isinstance(e, dict) for e in events)
    assert polls > 1  # the runner never waits for the whole stream at once
    assert runner.succeeded and finished == [runner]
    assert runner.progress.outputs == {"scores": "/x/scores.csv"}
    assert "not json" in runner.progress.log
    assert runner.poll() == []  # nothing after the end, and the callback ran once
    assert finished == [runner]


def test_runner_cancel_and_failure_with_an_injected_process():
    FakeProcess.script = [line("start", stage="training", total=100)] + [
        line("progress", stage="training", iteration=i, total=100) for i in range(1, 50)
    ]
    runner = JobRunner(FakeProcess).start(["python"])
    runner.poll()
    runner.cancel()
    assert runner.wait(timeout=5, interval=0)
    assert runner.cancelled and not runner.failed
    assert "Cancelling..." in runner.progress.log

    FakeProcess.script = [line("error", message="case 'a': label and image differ in size")]
    FakeProcess.returncode = EXIT_FAILED
    runner = JobRunner(FakeProcess).start(["python"])
    assert runner.wait(timeout=5, interval=0)
    assert runner.failed
    assert runner.progress.statusText() == "Failed: case 'a': label and image differ in size"
    FakeProcess.returncode = 0


def test_runner_reports_a_python_that_cannot_start(tmp_path):
    runner = JobRunner().start([str(tmp_path / "no-such-python"), "-c", "pass"])
    assert runner.finished and runner.failed
    assert "could not start the backend" in runner.progress.errorText


def test_events_are_json_lines():
    text = line("progress", stage="training", iteration=1, total=2, loss={"loss": float("nan")})
    assert json.loads(text)["loss"] == {"loss": None}
    model = ProgressModel()
    model.feedLine(text)
    assert model.losses == {}
