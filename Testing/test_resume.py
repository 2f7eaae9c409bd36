"""Resume continues the stored run exactly: its budget, its weights and its random streams, so a
run stopped and resumed ends with the very weights of one that was never interrupted."""

from __future__ import annotations

import json

import pytest
import torch

from backend_helpers import TINY_SETTINGS, StopAt, run_cli, train_arguments, write_tiny_dataset
from SemiSupSegLib.backend.cancellation import StopFlag
from SemiSupSegLib.backend.checkpoint import load_checkpoint
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.datasets import from_folders, infer_classes
from SemiSupSegLib.backend.errors import CancelledError, ConfigError
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.backend.training import train
from SemiSupSegLib.output_layout import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE


@pytest.fixture
def dataset(tmp_path):
    images, labels = write_tiny_dataset(tmp_path / "data")
    data = from_folders(images, labels)
    data.classes = infer_classes(data)  # as the command line names them
    data.unlabeled, data.labeled = data.labeled[2:], data.labeled[:2]
    return data


def _stopped(dataset, config, run, at):
    stop = StopFlag()
    with pytest.raises(CancelledError):
        train(dataset, config, run, StopAt(stop, at), stop)
    assert load_checkpoint(run / CHECKPOINT_FILE)["iteration"] == at


@pytest.mark.parametrize(
    "method, at",
    [
        ("supervised", 4),
        ("mn", 4),
        ("bcp", 3),  # stopped at the stage switch: the resumed run starts the teacher
        ("bcp", 4),  # stopped in self-training: the teacher comes from the checkpoint
    ],
)
def test_a_resumed_run_equals_an_uninterrupted_one(dataset, tmp_path, method, at):
    settings = {**TINY_SETTINGS, "method": method, "iterations": 6, "seed": 7}
    if method == "mn":
        settings["batch_size"] = 2
        settings["method_options"] = {"train_slices": 4, "warmup_stage_fraction": 0.3}
    if method == "bcp":
        settings["batch_size"] = 2
        settings["method_options"] = {"pretrain_fraction": 0.5}
    config = TrainConfig.from_dict(settings)
    train(dataset, config, tmp_path / "whole")
    _stopped(dataset, config, tmp_path / "parts", at=at)
    train(dataset, config, tmp_path / "parts", resume=True)
    whole = load_checkpoint(tmp_path / "whole" / MODEL_FILE)["model"]["state_dict"]
    parts = load_checkpoint(tmp_path / "parts" / MODEL_FILE)["model"]["state_dict"]
    assert whole.keys() == parts.keys()
    different = [k for k in whole if not torch.equal(whole[k], parts[k])]
    assert not different, different
    if method == "bcp":  # and the teacher, which predict does not deploy by default
        whole = load_checkpoint(tmp_path / "whole" / CHECKPOINT_FILE)["method_state"]["teacher"]
        parts = load_checkpoint(tmp_path / "parts" / CHECKPOINT_FILE)["method_state"]["teacher"]
        different = [k for k in whole if not torch.equal(whole[k], parts[k])]
        assert not different, different


def test_resume_keeps_the_stored_budget(dataset, tmp_path):
    """``train --resume`` without --iterations finishes the run's own budget (not the
    default 1500); with --iterations it takes the new one."""
    config = TrainConfig.from_dict({**TINY_SETTINGS, "method": "supervised", "iterations": 5})
    run = tmp_path / "run"
    _stopped(dataset, config, run, at=2)
    data = tmp_path / "data"
    arguments = train_arguments(data, run, "--resume")
    code, events = run_cli(arguments, tmp_path / "events.jsonl")
    assert code == 0, events[-1]["message"]
    assert next(e for e in events if e["event"] == "start")["total"] == 5
    assert load_checkpoint(run / MODEL_FILE)["iteration"] == 5
    assert json.loads((run / CONFIG_FILE).read_text())["iterations"] == 5

    code, events = run_cli(arguments + ["--iterations", 7], tmp_path / "events.jsonl")
    assert code == 0, events[-1]["message"]
    assert load_checkpoint(run / MODEL_FILE)["iteration"] == 7


class LearningRates(EventSink):
    """Records each progress event's learning rate(s) by iteration."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.rates: dict = {}

    def progress(self, stage: str, iteration: int, total: int, **fields) -> None:
        super().progress(stage, iteration, total, **fields)
        metrics = fields.get("metrics") or {}
        self.rates[iteration] = {k: v for k, v in metrics.items() if k.startswith("lr")}


@pytest.mark.parametrize("method", ["supervised", "mn", "bcp"])
def test_a_new_budget_on_resume_continues_that_budgets_schedule(dataset, tmp_path, method):
    """Resumed with more iterations, the learning rate follows the schedule of the new budget
    (not the old one's, which reaches 0 at the old end): the rates of the resumed iterations
    equal those of a run planned for the new budget from the start."""
    settings = {**TINY_SETTINGS, "method": method, "iterations": 6, "seed": 7}
    if method != "supervised":
        settings["batch_size"] = 2
    if method == "mn":  # stage 1 is 0.3 of 6 or of 12 iterations: iteration 4 co-trains in both
        settings["method_options"] = {"train_slices": 4, "warmup_stage_fraction": 0.3}
    if method == "bcp":  # stage 1 ends at 2 of 6 and 4 of 12: iteration 4 self-trains in both
        settings["method_options"] = {"pretrain_fraction": 0.34}
    _stopped(dataset, TrainConfig.from_dict(settings), tmp_path / "parts", at=4)
    longer = TrainConfig.from_dict({**settings, "iterations": 12})
    resumed, planned = LearningRates(), LearningRates()
    train(dataset, longer, tmp_path / "parts", resumed, resume=True, new_budget=12)
    train(dataset, longer, tmp_path / "whole", planned)
    resumed_rates, planned_rates = resumed.rates, planned.rates
    assert sorted(resumed_rates) == list(range(5, 13))
    for iteration, rates in resumed_rates.items():
        assert rates and rates == pytest.approx(planned_rates[iteration]), iteration
    assert all(v > 0 for rates in list(resumed_rates.values())[:-1] for v in rates.values())


def test_a_new_budget_that_moves_a_stage_switch_past_the_run_is_refused(dataset, tmp_path):
    settings = {**TINY_SETTINGS, "method": "bcp", "batch_size": 2, "iterations": 6, "seed": 7}
    settings["method_options"] = {"pretrain_fraction": 0.5}  # switch at 3 of 6, 6 of 12
    _stopped(dataset, TrainConfig.from_dict(settings), tmp_path / "run", at=4)
    longer = TrainConfig.from_dict({**settings, "iterations": 12})
    with pytest.raises(ConfigError, match="'self-training' stage.*'pre-training' stage"):
        train(dataset, longer, tmp_path / "run", EventSink(quiet=True), resume=True, new_budget=12)
