"""Training on two CPU processes under torchrun (gloo): both ranks end with identical weights,
training moved them, and only rank 0 writes into the run folder.

Each rank's final state comes from the test hook ``$SEMISUPSEG_RANK_STATE_DIR`` (every rank
saves ``rank<r>.pt`` there, outside ``--out``); see ``SemiSupSegLib.backend.distributed``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.utils import set_determinism

from SemiSupSegLib.backend.checkpoint import load_checkpoint
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.distributed import RANK_STATE_DIR
from SemiSupSegLib.backend.methods import create_method
from SemiSupSegLib.output_layout import (
    CASES_FILE,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    PLAN_FILE,
)
from SemiSupSegLib.protocol import parse_event

CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
SETTINGS = {
    "batch_size": 2,
    "patch_size": [16, 16, 16],
    "feature_channels": 8,
    "network_options": {"channels": [4, 8, 16], "strides": [2, 2]},
    "checkpoint_every": 0,
    "log_every": 1,
}
ITERATIONS = 4
#: What a single-process ``train`` writes into --out (events go to a file outside it).
RUN_FILES = sorted([CASES_FILE, CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE, PLAN_FILE])
#: Per method: the network trained by gradient, and the one ``predict`` deploys.
NETWORKS = {
    "supervised": ("network", "network"),
    "mean-teacher": ("student", "teacher"),
    "bcp": ("student", "student"),
    "mn+em": ("net3d", "net3d"),
}


@pytest.fixture(scope="module")
def folders(hippocampus_dir, tmp_path_factory):
    """Four real cases in images/ and labels/; the first two keep their labels."""
    root = tmp_path_factory.mktemp("cases")
    for sub in ("images", "labels"):
        (root / sub).mkdir()
    for name in CASES:
        shutil.copy(hippocampus_dir / "imagesTr" / f"{name}.nii.gz", root / "images")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{name}.nii.gz", root / "labels")
    (root / "labeled.txt").write_text("\n".join(CASES[:2]) + "\n")
    return root


def _settings() -> list:
    args = []
    for key, value in SETTINGS.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def _equal(a, b, path: str = "") -> int:
    """Assert two nested states are identical; return how many tensors were compared."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs between the ranks"
        return 1
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        return sum(_equal(a[k], b[k], f"{path}/{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return sum(_equal(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    assert a == b, path
    return 0


def _rank_log(logs: Path, rank: int, stream: str) -> str:
    found = list(logs.glob(f"**/attempt_0/{rank}/{stream}.log"))
    assert len(found) == 1, found
    return found[0].read_text()


@pytest.mark.parametrize(
    "method",
    [
        "supervised",
        "mean-teacher",
        "bcp",  # self-training from iteration 1 of 4: a teacher of each rank's own patches
        # Two DDP models, one a timm encoder with unused stages and BatchNorm statistics.
        pytest.param("mn+em", marks=pytest.mark.slow),
    ],
)
def test_two_processes_train_identical_replicas(method, folders, tmp_path):
    out, ranks, logs, events = (
        tmp_path / "run",
        tmp_path / "ranks",
        tmp_path / "logs",
        tmp_path / "events.jsonl",
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "--log-dir", str(logs), "--redirects", "3",
        "-m", "SemiSupSegLib.backend", "train",
        "--images", str(folders / "images"), "--labels", str(folders / "labels"),
        "--labeled", str(folders / "labeled.txt"), "--method", method,
        "--iterations", str(ITERATIONS), "--device", "cpu", "--out", str(out),
        "--events", str(events), *_settings(),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", RANK_STATE_DIR: str(ranks)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr + _rank_log(logs, 0, "stderr")

    # Only rank 0 wrote: the run folder holds what one process writes, one event stream.
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    log = [parse_event(line) for line in events.read_text().splitlines()]
    assert [e["event"] for e in log].count("start") == 1 and log[-1]["event"] == "done"
    assert "x 2 processes" in next(e for e in log if e["event"] == "start")["message"]
    assert [e["iteration"] for e in log if e["event"] == "progress"] == [1, 2, 3, 4]
    assert "training:" in _rank_log(logs, 0, "stderr")
    assert _rank_log(logs, 1, "stderr") == "" and _rank_log(logs, 1, "stdout") == ""

    # Both ranks hold the same networks, optimiser moments and schedules (not the losses
    # each reports for its own patches).
    states = [torch.load(ranks / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for state in states:
        state.pop("last_losses", None)
    assert _equal(*states) > 10
    name, deploy = NETWORKS[method]
    deployed = load_checkpoint(out / MODEL_FILE)["model"]["state_dict"]
    assert _equal(states[0][deploy], deployed) == len(deployed)

    # ... and training moved them from the shared initial weights.
    set_determinism(seed=0)
    config = TrainConfig.from_dict({**SETTINGS, "method": method, "iterations": ITERATIONS})
    initial = create_method(config, 3, torch.device("cpu")).state_dict()
    assert initial[name].keys() == states[0][name].keys()
    moved = [not torch.equal(initial[name][k], states[0][name][k]) for k in initial[name]]
    assert sum(moved) > len(moved) // 2, f"only {sum(moved)} of {len(moved)} tensors changed"
