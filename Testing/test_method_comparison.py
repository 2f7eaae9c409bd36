"""`semisupseg compare`: methods trained without held-out labeled cases, scored on them, and a
semi-supervised method recommended only when it beats supervised training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backend_helpers import run_cli, tiny_set_arguments, write_tiny_dataset
from SemiSupSegLib.backend.datasets import from_folders
from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.backend.method_comparison import (
    MethodResult,
    default_holdout,
    hold_out,
    recommend,
)
from SemiSupSegLib.output_layout import (
    CASES_FILE,
    COMPARISON_FILE,
    MODEL_FILE,
    RUN_FOLDER,
)
from SemiSupSegLib.protocol import STOP_FILE_VARIABLE


def result(method: str, dice: list) -> MethodResult:
    return MethodResult(method, {f"case{i}": d for i, d in enumerate(dice)}, 1.0, "")


def test_a_method_is_recommended_only_when_it_wins_on_average_and_on_most_cases():
    base = result("supervised", [0.80, 0.80, 0.80, 0.80])
    wins = result("mn", [0.85, 0.82, 0.79, 0.81])
    assert recommend([base, wins])[0] == "mn"
    one_lucky_case = result("mn", [0.99, 0.79, 0.79, 0.79])  # higher mean, 1 of 4 cases
    method, reason = recommend([base, one_lucky_case])
    assert method == "supervised" and "use supervised training" in reason
    worse = result("em", [0.70, 0.70, 0.70, 0.70])
    assert recommend([base, worse, wins])[0] == "mn"


def test_hold_out_is_fixed_by_seed_and_leaves_enough_to_train(tmp_path):
    images, labels = write_tiny_dataset(tmp_path, count=5, size=8)
    dataset = from_folders(images, labels)
    training, held = hold_out(dataset, 2, seed=0)
    assert [c.name for c in held] == [c.name for c in hold_out(dataset, 2, seed=0)[1]]
    assert len(held) == 2 and len(training.labeled) == 3
    assert not {c.name for c in held} & {c.name for c in training.labeled + training.unlabeled}
    with pytest.raises(ConfigError, match="fewer than 2 to train on"):
        hold_out(dataset, 4, seed=0)
    assert default_holdout(8) == 2 and default_holdout(16) == 4 and default_holdout(3) == 1


def test_compare_trains_each_method_without_the_held_out_cases(tmp_path):
    images, labels = write_tiny_dataset(tmp_path, count=5)
    extra, _ = write_tiny_dataset(tmp_path / "more", count=7)  # other noise: other images
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for case in ("case5", "case6"):
        shutil.copy(extra / f"{case}.nii.gz", unlabeled / f"extra{case[-1]}.nii.gz")
    out = tmp_path / "comparison"
    code, events = run_cli(
        ["compare", "--images", images, "--labels", labels, "--unlabeled", unlabeled,
         "--methods", "supervised", "mean-teacher", "--holdout", "2", "--iterations", "2",
         "--set", "method.ema_decay=0.9",  # mean-teacher's alone: supervised must not get it
         "--device", "cpu", "--out", out, *tiny_set_arguments()],
        tmp_path / "events.jsonl",
    )  # fmt: skip
    assert code == 0, events[-1]["message"]
    comparison = json.loads((out / COMPARISON_FILE).read_text())
    held = set(comparison["held_out"])
    assert len(held) == 2
    results = {r["method"]: r for r in comparison["results"]}
    assert set(results) == {"supervised", "mean-teacher"}
    for method, entry in results.items():
        assert set(entry["case_dice"]) == held
        cases = json.loads((out / method / RUN_FOLDER / CASES_FILE).read_text())
        trained_on = cases["labeled"] + cases.get("unlabeled", [])
        assert not {c["name"] for c in trained_on} & held, method
        held_images = {(images / f"{name}.nii.gz").read_bytes() for name in held}
        assert not any(Path(c["image"]).read_bytes() in held_images for c in trained_on), method
    scored = [MethodResult(r["method"], r["case_dice"], 0.0, "") for r in comparison["results"]]
    assert (comparison["recommended"], comparison["reason"]) == recommend(scored)
    assert any(e["event"] == "output" and "recommended" in e["message"] for e in events)


def _stop_during(monkeypatch, tmp_path, method: str, iteration: int) -> None:
    """Create the stop file (as the panel does to stop a job) once ``method``'s training reports
    ``iteration``."""
    stop_file = tmp_path / "stop"
    stop_file.unlink(missing_ok=True)
    monkeypatch.setenv(STOP_FILE_VARIABLE, str(stop_file))
    emit, current = EventSink.emit, {"method": None}

    def watching(sink, kind, **fields):
        message = fields.get("message") or ""
        if kind == "stage" and fields.get("stage") == "comparison":
            current["method"] = message.split(": ")[1].split(",")[0]
        if kind == "progress" and current["method"] == method:
            if fields.get("iteration", 0) >= iteration:
                stop_file.touch()
        return emit(sink, kind, **fields)

    monkeypatch.setattr(EventSink, "emit", watching)


def test_a_stopped_comparison_resumes_without_retraining_what_finished(tmp_path, monkeypatch):
    images, labels = write_tiny_dataset(tmp_path, count=5)
    extra, _ = write_tiny_dataset(tmp_path / "more", count=7)
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for case in ("case5", "case6"):
        shutil.copy(extra / f"{case}.nii.gz", unlabeled / f"extra{case[-1]}.nii.gz")
    out = tmp_path / "comparison"

    def compare(events_file, *extra, holdout="2", iterations="6", folder=out):
        return run_cli(
            ["compare", "--images", images, "--labels", labels, "--unlabeled", unlabeled,
             "--methods", "supervised", "mean-teacher", "--holdout", holdout,
             "--iterations", iterations, "--device", "cpu", "--out", folder,
             *tiny_set_arguments(), "--set", "checkpoint_every=2", *extra],
            tmp_path / events_file,
        )  # fmt: skip

    with monkeypatch.context() as patch:
        _stop_during(patch, tmp_path, "mean-teacher", 3)
        code, events = compare("first.jsonl")
    assert code == 130, events[-1]["message"]
    partial = json.loads((out / COMPARISON_FILE).read_text())
    assert not partial["complete"] and partial["reason"] == "incomplete: 1 of 2 methods scored"
    assert [r["method"] for r in partial["results"]] == ["supervised"]
    assert partial["started"] == ["supervised", "mean-teacher"]
    assert set(partial["trained"]) == {"supervised"}
    supervised_model = out / "supervised" / RUN_FOLDER / MODEL_FILE
    before = supervised_model.stat().st_mtime_ns

    code, events = compare("other.jsonl", "--resume", holdout="3")
    assert code == 1 and "the held-out cases" in events[-1]["message"]
    code, events = compare("other.jsonl", "--resume", iterations="8")
    assert code == 1 and "the settings" in events[-1]["message"]
    code, events = compare("none.jsonl", "--resume", folder=tmp_path / "nothing")
    assert code == 1 and "holds no comparison to continue" in events[-1]["message"]

    code, events = compare("resumed.jsonl", "--resume")
    assert code == 0, events[-1]["message"]
    assert supervised_model.stat().st_mtime_ns == before  # reused, not trained again
    messages = [e.get("message", "") for e in events]
    assert any("supervised, finished before: reused" in m for m in messages)
    resumed_at = [m for m in messages if m.startswith("resuming")]
    assert len(resumed_at) == 1 and "mean-teacher" in resumed_at[0]
    assert "at iteration 6 of 6" not in resumed_at[0]  # continued from where it stopped
    final = json.loads((out / COMPARISON_FILE).read_text())
    assert final["complete"] and [r["method"] for r in final["results"]] == [
        "supervised",
        "mean-teacher",
    ]
    assert final["results"][0] == partial["results"][0]
    assert final["recommended"] in ("supervised", "mean-teacher")

    # A new comparison into the same folder, stopped in its first method, resumes that one: the
    # finished runs of the earlier comparison are not taken for its results.
    with monkeypatch.context() as patch:
        _stop_during(patch, tmp_path, "supervised", 3)
        code, events = compare("again.jsonl")
    assert code == 130
    again = json.loads((out / COMPARISON_FILE).read_text())
    assert (again["started"], again["trained"], again["results"]) == (["supervised"], {}, [])
    code, events = compare("again-resumed.jsonl", "--resume")
    assert code == 0, events[-1]["message"]
    messages = [e.get("message", "") for e in events]
    assert not any("reused" in m for m in messages)
    assert [m for m in messages if m.startswith("resuming")] == [
        m for m in messages if m.startswith("resuming") and "supervised" in m
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "method.no_such_option=1"], "none of the compared methods"),
        (["--set", "method.ema_decay=7"], "--methods mean-teacher"),
        (["--no-unlabeled"], "mean-teacher learns from unlabeled images"),
    ],
)
def test_compare_checks_every_method_before_training_any(tmp_path, extra, message):
    images, labels = write_tiny_dataset(tmp_path, count=5)
    unlabeled = [] if extra == ["--no-unlabeled"] else ["--unlabeled", images]
    extra = [] if extra == ["--no-unlabeled"] else extra
    out = tmp_path / "comparison"
    code, events = run_cli(
        ["compare", "--images", images, "--labels", labels, *unlabeled,
         "--methods", "supervised", "mean-teacher", "--iterations", "2", "--device", "cpu",
         "--out", out, *tiny_set_arguments(), *extra],
        tmp_path / "events.jsonl",
    )  # fmt: skip
    assert code == 1 and message in events[-1]["message"]
    assert not (out / "supervised").exists()  # nothing trained
