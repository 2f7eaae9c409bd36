"""Supervised training on real hippocampus cases: it learns, predicts in the input's geometry,
and a cancelled run resumes where it stopped."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SemiSupSegLib.backend.checkpoint import load_checkpoint
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.datasets import Dataset, load_dataset
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.backend.inference import Predictor, predict_cases
from SemiSupSegLib.backend.metrics import case_metrics
from SemiSupSegLib.backend.splits import benchmark_split
from SemiSupSegLib.backend.training import (
    WeightAverage,
    new_case_weights,
    previous_labeled,
    shrink_towards,
    train,
)
from SemiSupSegLib.output_layout import CHECKPOINT_FILE, MODEL_FILE, SCORES_FILE, UNCERTAINTY_FOLDER
from SemiSupSegLib.protocol import EXIT_CANCELLED, parse_event

ITERATIONS = 160


@pytest.fixture(scope="module")
def hippocampus(hippocampus_dir):
    full = load_dataset(hippocampus_dir)
    split = benchmark_split([c.name for c in full.labeled])
    by_name = {c.name: c for c in full.labeled}
    return full, [by_name[n] for n in split.train], [by_name[n] for n in split.test]


@pytest.fixture(scope="module")
def trained_run(hippocampus, tmp_path_factory):
    """A short supervised run on 8 real labeled cases, shared by the tests below."""
    full, train_cases, _ = hippocampus
    run = tmp_path_factory.mktemp("run")
    events_path = run / "events.jsonl"
    config = TrainConfig.from_dict(
        {
            "method": "supervised",
            "iterations": ITERATIONS,
            "batch_size": 2,
            "log_every": 5,
            "learning_rate": 3e-3,
        }
    )
    dataset = Dataset(train_cases[:8], [], full.classes, "MR")
    sink = EventSink(str(events_path), quiet=True)
    train(dataset, config, run, sink)
    sink.close()
    events = [parse_event(line) for line in events_path.read_text().splitlines()]
    return run, events


def test_loss_falls(trained_run):
    _, events = trained_run
    losses = [e["loss"]["loss"] for e in events if e["event"] == "progress"]
    assert len(losses) == ITERATIONS // 5
    early, late = np.mean(losses[:3]), np.mean(losses[-3:])
    assert late < 0.6 * early, (early, late)


def test_dice_on_unseen_cases_above_chance(trained_run, hippocampus, tmp_path):
    run, _ = trained_run
    _, _, test_cases = hippocampus
    cases = test_cases[:6]
    predict_cases(Predictor.from_run(run), cases, tmp_path)
    dice = []
    for case in cases:
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{case.name}.nii.gz")))
        truth_image = sitk.ReadImage(str(case.label))
        truth = sitk.GetArrayFromImage(truth_image)
        scores = case_metrics(pred, truth, truth_image.GetSpacing(), [1, 2])
        dice.append(np.mean([scores[c]["dice"] for c in (1, 2)]))
    # Chance level (a random or constant guess) is below 0.1 on these small structures.
    assert np.mean(dice) > 0.5, dice


def test_prediction_keeps_the_input_geometry(trained_run, hippocampus, tmp_path):
    """A non-identity direction, anisotropic spacing and a shifted origin survive prediction,
    also when the model resamples to a working spacing and back."""
    run, _ = trained_run
    _, _, test_cases = hippocampus
    image = sitk.ReadImage(str(test_cases[0].image))
    angle = math.radians(30)
    image.SetDirection(
        (math.cos(angle), -math.sin(angle), 0, math.sin(angle), math.cos(angle), 0, 0, 0, 1)
    )
    image.SetSpacing((0.8, 1.1, 1.4))
    image.SetOrigin((12.5, -40.0, 7.25))
    source = tmp_path / "tilted.nrrd"
    sitk.WriteImage(image, str(source))

    predictor = Predictor.from_run(run)
    for target in (None, (1.0, 1.0, 1.0)):
        predictor.preprocessing["target_spacing"] = target
        out = tmp_path / f"out-{target}"
        rows = predict_cases(predictor, [_case("tilted", source)], out)
        for path in (out / "tilted.nrrd", out / UNCERTAINTY_FOLDER / "tilted.nrrd"):
            result = sitk.ReadImage(str(path))
            assert result.GetSize() == image.GetSize()
            np.testing.assert_allclose(result.GetSpacing(), image.GetSpacing(), atol=1e-6)
            np.testing.assert_allclose(result.GetOrigin(), image.GetOrigin(), atol=1e-6)
            np.testing.assert_allclose(result.GetDirection(), image.GetDirection(), atol=1e-6)
        uncertainty = sitk.GetArrayFromImage(
            sitk.ReadImage(str(out / UNCERTAINTY_FOLDER / "tilted.nrrd"))
        )
        assert uncertainty.min() >= 0 and uncertainty.max() <= math.log(3) + 1e-5
        assert rows[0].case == "tilted" and rows[0].score > 0
        assert (out / SCORES_FILE).read_text().startswith("case,score")


def _case(name, path):
    from SemiSupSegLib.backend.datasets import Case

    return Case(name, Path(path))


def test_cancel_then_resume_continues(hippocampus, hippocampus_dir, tmp_path):
    """SIGINT stops at the next iteration with a checkpoint and exit code 130; --resume then
    finishes the remaining iterations from that checkpoint."""
    _, train_cases, _ = hippocampus
    labeled = tmp_path / "labeled.txt"
    labeled.write_text("\n".join(c.name for c in train_cases[:2]))
    run, events_path = tmp_path / "run", tmp_path / "events.jsonl"
    total = 60
    command = [
        sys.executable, "-m", "SemiSupSegLib.backend", "train", "--data", str(hippocampus_dir),
        "--labeled", str(labeled), "--method", "supervised", "--iterations", str(total), "--out", str(run),
        "--events", str(events_path), "--quiet", "--device", "cpu",
        "--set", "batch_size=1", "--set", "log_every=1", "--set", "checkpoint_every=0",
    ]  # fmt: skip
    process = subprocess.Popen(command)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if _last_iteration(events_path) >= 2:
                break
            time.sleep(0.2)
        assert process.poll() is None, "training ended before it could be cancelled"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == EXIT_CANCELLED
    finally:
        if process.poll() is None:
            process.kill()
    stopped_at = load_checkpoint(run / CHECKPOINT_FILE)["iteration"]
    assert 2 <= stopped_at < total
    assert not (run / MODEL_FILE).exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    events = [parse_event(line) for line in events_path.read_text().splitlines()]
    assert events[-1]["event"] == "cancelled"

    resumed = subprocess.run(
        command + ["--resume"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run / CHECKPOINT_FILE)["iteration"] == total
    events = [parse_event(line) for line in events_path.read_text().splitlines()]
    after = events[events.index(next(e for e in events if e["event"] == "cancelled")) + 1 :]
    progress = [e["iteration"] for e in after if e["event"] == "progress"]
    assert progress[0] == stopped_at + 1 and progress[-1] == total
    assert any(f"at iteration {stopped_at}" in e.get("message", "") for e in after)


def _last_iteration(events_path: Path) -> int:
    if not events_path.exists():
        return 0
    last = 0
    for line in events_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written
        if event.get("event") == "progress":
            last = event["iteration"]
    return last


def test_resume_refuses_another_method(trained_run, hippocampus):
    from SemiSupSegLib.backend.errors import ConfigError

    run, _ = trained_run
    full, train_cases, _ = hippocampus
    dataset = Dataset(train_cases[:2], train_cases[2:3], full.classes, "MR")
    with pytest.raises(ConfigError, match="method"):
        train(dataset, TrainConfig(method="mean-teacher"), run, resume=True)


def test_asking_for_a_missing_gpu_is_a_clear_error():
    import torch

    from SemiSupSegLib.backend.device import select_device
    from SemiSupSegLib.backend.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        select_device("cuda")
    assert select_device("auto").type in ("cpu", "mps")


def test_new_cases_get_their_share_of_a_warm_start():
    config = TrainConfig(new_case_share=0.5)
    weights = new_case_weights(["a", "b", "c", "d"], ["a", "b", "c"], config)
    assert weights == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0.5])
    assert new_case_weights(["a", "b"], ["a", "b"], config) is None  # nothing new
    assert new_case_weights(["x", "y"], ["a"], config) is None  # all new: uniform
    assert new_case_weights(["a", "d"], None, config) is None  # unknown history
    assert new_case_weights(["a", "d"], ["a"], TrainConfig(new_case_share=0.0)) is None
    with pytest.raises(Exception, match="new_case_share"):
        TrainConfig(new_case_share=1.0).validate()


def test_shrink_towards_mixes_float_weights_only():
    import torch

    previous = {"w": torch.full((2, 3), 4.0), "steps": torch.tensor(7)}
    fresh = {"w": torch.zeros(2, 3), "steps": torch.tensor(0)}
    mixed = shrink_towards(previous, fresh, 0.25)
    assert torch.allclose(mixed["w"], torch.full((2, 3), 1.0))
    assert int(mixed["steps"]) == 7  # integer buffers are counters, not weights
    assert shrink_towards(previous, fresh, 1.0) is previous
    with pytest.raises(Exception, match="warm_start_shrink"):
        TrainConfig(warm_start_shrink=0.0).validate()


def test_weight_average_keeps_an_ema_and_survives_a_checkpoint():
    import torch

    network = torch.nn.Linear(2, 1)
    average = WeightAverage(network, decay=0.5)
    expected = network.weight.detach().clone()
    for step, value in enumerate([1.0, 3.0, -2.0], start=1):
        with torch.no_grad():
            network.weight.fill_(value)
        average.update()
        decay = min(0.5, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * value
    saved = average.state_dict()
    restored = WeightAverage(network, decay=0.5)
    restored.load_state_dict(saved)
    restored.apply()
    assert torch.allclose(network.weight, expected)
    assert not torch.allclose(network.weight, torch.full_like(network.weight, -2.0))

    off = WeightAverage(network, decay=0.0)
    off.update()
    before = network.weight.detach().clone()
    off.apply()
    assert off.state_dict() is None and torch.equal(network.weight, before)
    with pytest.raises(Exception, match="weight_average"):
        TrainConfig(weight_average=1.0).validate()


def test_warm_start_names_the_new_cases(trained_run, hippocampus, tmp_path):
    """The model records its labeled cases; a warm start on more cases finds the new ones
    (also from cases.json, for a model file without the list)."""
    run, _ = trained_run
    full, train_cases, _ = hippocampus
    model = load_checkpoint(run / MODEL_FILE)
    assert model["labeled_cases"] == [c.name for c in train_cases[:8]]
    del model["labeled_cases"]
    assert previous_labeled(model, run / MODEL_FILE) == [c.name for c in train_cases[:8]]

    events_path = tmp_path / "events.jsonl"
    sink = EventSink(str(events_path), quiet=True)
    dataset = Dataset(train_cases[:10], [], full.classes, "MR")
    config = TrainConfig(method="supervised", iterations=2, batch_size=2, weight_average=0.9)
    train(dataset, config, tmp_path / "warm", sink, init_from=run)
    sink.close()
    logs = [json.loads(line).get("message", "") for line in events_path.read_text().splitlines()]
    new = [c.name for c in train_cases[8:10]]
    assert any("2 case(s) new" in m and all(n in m for n in new) for m in logs), logs
