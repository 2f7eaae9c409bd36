"""The training loop's hooks: a callback is told of every phase, in order, with the iteration
numbers a resumed run continues from, and a plain function still watches every step."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import pytest

from backend_helpers import TINY_SETTINGS, StopAt, write_tiny_dataset
from SemiSupSegLib.backend.cancellation import StopFlag
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.datasets import from_folders
from SemiSupSegLib.backend.errors import CancelledError
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.backend.training import train
from SemiSupSegLib.backend.training_callbacks import TrainingCallback
from SemiSupSegLib.output_layout import MODEL_FILE

CLASSES = {0: "background", 1: "upper", 2: "lower"}


class Recorder(TrainingCallback):
    def __init__(self) -> None:
        self.calls: List[Tuple] = []

    def on_start(self, method, start, total):
        self.calls.append(("start", start, total, method.deploy_network().training))

    def on_iteration_start(self, iteration):
        self.calls.append(("iteration", iteration))

    def on_batch_ready(self, iteration):
        self.calls.append(("batch", iteration))

    def on_step(self, done, method, result):
        self.calls.append(("step", done, sorted(result.losses)))

    def on_end(self, method):
        self.calls.append(("end",))


@pytest.fixture()
def tiny(tmp_path: Path):
    write_tiny_dataset(tmp_path)
    dataset = from_folders(tmp_path / "images", tmp_path / "labels", classes=CLASSES)
    config = TrainConfig.from_dict(
        {**TINY_SETTINGS, "method": "supervised", "iterations": 3, "device": "cpu"}
    )
    return dataset, config, tmp_path / "run"


def test_a_callback_sees_every_phase_in_order_and_the_model_exists_at_the_end(tiny):
    dataset, config, run = tiny
    seen_model = []

    class Recording(Recorder):
        def on_end(self, method):
            seen_model.append((run / MODEL_FILE).exists())
            super().on_end(method)

    recorder = Recording()
    steps: List[int] = []
    train(
        dataset,
        config,
        run,
        EventSink(quiet=True),
        callbacks=[recorder, lambda done, method, result: steps.append(done)],
    )
    names = [c[0] for c in recorder.calls]
    assert names == ["start"] + ["iteration", "batch", "step"] * 3 + ["end"]
    assert recorder.calls[0][1:3] == (0, 3)
    assert [c[1] for c in recorder.calls if c[0] == "iteration"] == [0, 1, 2]
    assert [c[1] for c in recorder.calls if c[0] == "step"] == [1, 2, 3]
    assert recorder.calls[3][2] == ["loss"]
    assert steps == [1, 2, 3]
    assert seen_model == [True]


def test_a_resumed_run_tells_its_callbacks_where_it_continues(tiny):
    dataset, config, run = tiny
    stop = StopFlag()
    with pytest.raises(CancelledError):
        train(dataset, config, run, StopAt(stop, at=1), stop=stop)
    recorder = Recorder()
    train(dataset, config, run, EventSink(quiet=True), resume=True, callbacks=[recorder])
    assert recorder.calls[0][1:3] == (1, 3)  # cancelled after the first iteration
    assert [c[1] for c in recorder.calls if c[0] == "iteration"] == [1, 2]
    assert recorder.calls[-1] == ("end",)
