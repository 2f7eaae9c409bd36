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
from SemiSupSegLib.backend.method_comparison import (
    MethodResult,
    default_holdout,
    hold_out,
    recommend,
)
from SemiSupSegLib.output_layout import (
    CASES_FILE,
    COMPARISON_FILE,
    EVALUATION_FOLDER,
    MODEL_FILE,
    RUN_FOLDER,
)


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


def test_a_stopped_comparison_resumes_without_retraining_what_finished(tmp_path):
    images, labels = write_tiny_dataset(tmp_path, count=5)
    extra, _ = write_tiny_dataset(tmp_path / "more", count=7)
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for case in ("case5", "case6"):
        shutil.copy(extra / f"{case}.nii.gz", unlabeled / f"extra{case[-1]}.nii.gz")
    out = tmp_path / "comparison"

    def compare(events_file, holdout="2", folder=out, *extra):
        return run_cli(
            ["compare", "--images", images, "--labels", labels, "--unlabeled", unlabeled,
             "--methods", "supervised", "mean-teacher", "--holdout", holdout,
             "--iterations", "4", "--set", "checkpoint_every=2", "--device", "cpu",
             "--out", folder, *tiny_set_arguments(), *extra],
            tmp_path / events_file,
        )  # fmt: skip

    code, events = compare("first.jsonl")
    assert code == 0, events[-1]["message"]
    # As if stopped during mean-teacher's training: its result, model and evaluation gone.
    comparison = json.loads((out / COMPARISON_FILE).read_text())
    comparison["results"] = [r for r in comparison["results"] if r["method"] == "supervised"]
    (out / COMPARISON_FILE).write_text(json.dumps(comparison))
    (out / "mean-teacher" / RUN_FOLDER / MODEL_FILE).unlink()
    shutil.rmtree(out / "mean-teacher" / EVALUATION_FOLDER)
    supervised_model = out / "supervised" / RUN_FOLDER / MODEL_FILE
    before = supervised_model.stat().st_mtime_ns

    code, events = compare("resumed.jsonl", "2", out, "--resume")
    assert code == 0, events[-1]["message"]
    assert supervised_model.stat().st_mtime_ns == before  # reused, not trained again
    messages = [e.get("message", "") for e in events]
    assert any("supervised, finished before: reused" in m for m in messages)
    assert any(m.startswith("resuming") and "mean-teacher" in m for m in messages)
    resumed = json.loads((out / COMPARISON_FILE).read_text())
    assert [r["method"] for r in resumed["results"]] == ["supervised", "mean-teacher"]
    assert resumed["results"][0] == comparison["results"][0]
    assert resumed["recommended"] in ("supervised", "mean-teacher")

    code, events = compare("other.jsonl", "3", out, "--resume")
    assert (
        code == 1 and "give the same labeled cases, --holdout and --seed" in events[-1]["message"]
    )
    code, events = compare("none.jsonl", "2", tmp_path / "nothing", "--resume")
    assert code == 1 and "holds no comparison to continue" in events[-1]["message"]


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
