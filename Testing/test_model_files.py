"""Model files are data, never code: a crafted pickle placed where a model file is expected is
refused, through every door that reads one (predict --run, train --init-from, train --resume and
a job's init_from), and what SemiSupSeg writes loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from backend_helpers import run_cli, train_arguments, train_tiny, write_tiny_dataset
from SemiSupSegLib.backend.checkpoint import (
    library_versions,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.output_layout import CHECKPOINT_FILE, MODEL_FILE
from SemiSupSegLib.protocol import EXIT_FAILED, JobSpec, LabeledCase


class _Payload:
    """Unpickling this creates ``marker``: proof that loading ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _craft(path: Path, marker: Path) -> Path:
    """A file that looks like a SemiSupSeg checkpoint and runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"format": "semisupseg-checkpoint", "format_version": 1, "x": _Payload(marker)}, path
    )
    return path


@pytest.fixture
def data(tmp_path):
    write_tiny_dataset(tmp_path)
    return tmp_path


def _assert_refused(code, events, crafted: Path, marker: Path) -> None:
    assert code == EXIT_FAILED
    assert not marker.exists(), "the crafted model file ran its code"
    assert events[-1]["event"] == "error"
    assert str(crafted) in events[-1]["message"] and "refused" in events[-1]["message"]


def test_predict_refuses_a_crafted_model(data):
    marker = data / "ran"
    crafted = _craft(data / "shared" / MODEL_FILE, marker)
    code, events = run_cli(
        ["predict", "--run", crafted.parent, "--input", data / "images", "--out", data / "pred"],
        data / "events.jsonl",
    )
    _assert_refused(code, events, crafted, marker)
    assert not (data / "pred").exists()


def test_train_init_from_refuses_a_crafted_model(data):
    marker = data / "ran"
    crafted = _craft(data / "shared" / MODEL_FILE, marker)
    arguments = train_arguments(data, data / "run", "--iterations", 1, "--init-from", crafted)
    code, events = run_cli(arguments, data / "events.jsonl")
    _assert_refused(code, events, crafted, marker)


def test_train_resume_refuses_a_crafted_checkpoint(data):
    marker = data / "ran"
    crafted = _craft(data / "run" / CHECKPOINT_FILE, marker)
    code, events = run_cli(train_arguments(data, data / "run", "--resume"), data / "events.jsonl")
    _assert_refused(code, events, crafted, marker)


def test_job_init_from_refuses_a_crafted_model(data):
    marker = data / "ran"
    crafted = _craft(data / "shared" / MODEL_FILE, marker)
    settings = {"iterations": 1, "batch_size": 1, "patch_size": [16, 16, 16]}
    job = JobSpec(
        method="supervised",
        labeled=[LabeledCase("case0", "images/case0.nii.gz", "labels/case0.nii.gz")],
        classes={"0": "background", "1": "a", "2": "b"},
        output="out",
        settings=settings,
        init_from=str(crafted),
    )
    job.save(data / "job.json")
    code, events = run_cli(["run", data / "job.json"], data / "events.jsonl")
    _assert_refused(code, events, crafted, marker)


def test_what_training_writes_loads_with_weights_only(data):
    """Plain ``torch.load(weights_only=True)``, without any allow-list, reads the checkpoint and
    the model file of a real (tiny) training."""
    train_tiny(data, data / "run", 1)
    for name in (CHECKPOINT_FILE, MODEL_FILE):
        payload = torch.load(data / "run" / name, map_location="cpu", weights_only=True)
        assert payload["versions"]["torch"] == str(torch.__version__)
        assert payload["iteration"] == 1


def test_random_state_survives_a_safe_round_trip(tmp_path):
    """The global random states, stored as plain values, restore the same streams."""
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in NumPy's state
    path = save_checkpoint(tmp_path / "state.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.standard_normal(3), torch.rand(3))
    restore_rng_state(load_checkpoint(path)["rng"])
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.standard_normal(3), expected[1])
    assert torch.equal(torch.rand(3), expected[2])


def test_a_checkpoint_of_an_older_version_still_loads(tmp_path):
    """Files written before the safe format (TorchVersion, NumPy's state as an array) load, and
    their random state restores."""
    np.random.seed(5)
    payload = {
        "format": "semisupseg-checkpoint",
        "format_version": 1,
        "versions": {**library_versions(), "torch": torch.__version__},
        "rng": {**rng_state(), "numpy": np.random.get_state()},
    }
    torch.save(payload, tmp_path / "old.pt")
    expected = np.random.random(2)
    restore_rng_state(load_checkpoint(tmp_path / "old.pt")["rng"])
    np.testing.assert_array_equal(np.random.random(2), expected)


def test_a_damaged_model_file_is_named(tmp_path):
    path = tmp_path / MODEL_FILE
    path.write_bytes(b"\x80\x02" + b"garbage" * 10)
    with pytest.raises(DataError, match="not a readable checkpoint") as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)
    assert "weights_only" not in str(caught.value)  # no advice to load it unsafely
