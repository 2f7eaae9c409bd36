"""A run folder holds one training: a second writer is refused, a new run replaces the old one
before writing anything, leftovers of a killed run are removed, a diverging run stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from backend_helpers import TINY_SETTINGS, StopAt, run_cli, train_arguments, write_tiny_dataset
from SemiSupSegLib.backend.cancellation import StopFlag
from SemiSupSegLib.backend.checkpoint import load_checkpoint
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.datasets import from_folders, infer_classes
from SemiSupSegLib.backend.errors import CancelledError
from SemiSupSegLib.backend.training import train
from SemiSupSegLib.output_layout import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE
from SemiSupSegLib.protocol import EXIT_FAILED

HOLD_LOCK = """
import sys, time
from SemiSupSegLib.backend.folder_lock import FolderLock
lock = FolderLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def data(tmp_path):
    write_tiny_dataset(tmp_path)
    return tmp_path


def _train(data, run, *extra):
    return run_cli(train_arguments(data, run, "--iterations", 2, *extra), data / "events.jsonl")


def test_a_second_training_into_a_busy_run_folder_is_refused(data):
    """Another process holds the run folder: the second training says which, and writes
    nothing there."""
    run = data / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, events = _train(data, run)
        assert code == EXIT_FAILED
        message = events[-1]["message"]
        assert "in use by another SemiSupSeg process" in message
        assert f"pid {holder.pid}" in message and str(run) in message
        assert not run.exists()
    finally:
        holder.kill()
        holder.wait()
    code, _ = _train(data, run)  # the holder died: its lock is released
    assert code == 0
    assert not (data / ".run.lock").exists()


def test_a_stale_lock_file_does_not_block(data):
    (data / ".run.lock").write_text("pid 999999 on elsewhere since 00:00:00")
    assert _train(data, data / "run")[0] == 0


def test_leftovers_of_a_killed_run_are_removed(data):
    run = data / "run"
    run.mkdir()
    leftovers = [run / ".checkpoint.pt.4242.tmp", run / ".config.json.4242-0badcafe.tmp"]
    for path in leftovers:
        path.write_bytes(b"x" * 1000)
    (run / ".keep-me").write_text("not ours")
    assert _train(data, run)[0] == 0
    assert not any(path.exists() for path in leftovers)
    assert (run / ".keep-me").exists()


def test_config_json_does_not_follow_a_symlink(data):
    run = data / "run"
    run.mkdir()
    outside = data / "outside.json"
    outside.write_text("keep")
    os.symlink(outside, run / CONFIG_FILE)
    assert _train(data, run)[0] == 0
    assert outside.read_text() == "keep"
    assert not (run / CONFIG_FILE).is_symlink()
    assert json.loads((run / CONFIG_FILE).read_text())["iterations"] == 2


def test_a_new_run_never_sits_beside_the_previous_model(data):
    """A new training into a finished run's folder, stopped half way, leaves its own settings
    and checkpoint and no model: detectably partial, not one run's model beside another's
    settings."""
    run = data / "run"
    assert _train(data, run, "--seed", 1)[0] == 0
    dataset = from_folders(data / "images", data / "labels")
    dataset.classes = infer_classes(dataset)
    config = TrainConfig.from_dict(
        {**TINY_SETTINGS, "method": "supervised", "iterations": 4, "seed": 2}
    )
    stop = StopFlag()
    with pytest.raises(CancelledError):
        train(dataset, config, run, StopAt(stop, 1), stop)
    assert not (run / MODEL_FILE).exists()
    assert json.loads((run / CONFIG_FILE).read_text())["seed"] == 2
    assert load_checkpoint(run / CHECKPOINT_FILE)["config"]["seed"] == 2


def test_init_from_inside_the_run_folder_is_refused(data):
    run = data / "run"
    assert _train(data, run)[0] == 0
    code, events = _train(data, run, "--init-from", run / MODEL_FILE)
    assert code == EXIT_FAILED and "inside the run folder" in events[-1]["message"]
    assert load_checkpoint(run / MODEL_FILE)["iteration"] == 2


def test_a_diverging_training_stops_with_a_clear_error(data):
    """An absurd learning rate makes the loss infinite or NaN: training stops, names the
    setting, and writes no model."""
    code, events = _train(data, data / "run", "--set", "learning_rate=1e30", "--iterations", 6)
    assert code == EXIT_FAILED
    message = events[-1]["message"]
    assert "diverged" in message and "learning_rate" in message
    assert not (data / "run" / MODEL_FILE).exists()
