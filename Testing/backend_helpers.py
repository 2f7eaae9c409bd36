"""Shared helpers of the backend reliability tests: a tiny synthetic dataset, the settings of a
tiny network, and the command line run in this process (fast) with its events read back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SemiSupSegLib.backend.cancellation import StopFlag
from SemiSupSegLib.backend.cli import main
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.protocol import parse_event

#: A 3-level UNet with 8 base channels on 16-voxel patches: a training step takes milliseconds.
TINY_SETTINGS = {
    "batch_size": 1,
    "patch_size": [16, 16, 16],
    "feature_channels": 8,
    "checkpoint_every": 0,
    "log_every": 1,
    "network_options": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
}


def tiny_set_arguments() -> List[str]:
    """``TINY_SETTINGS`` as ``--set name=value`` arguments of ``train``."""
    arguments: List[str] = []
    for key, value in TINY_SETTINGS.items():
        arguments += ["--set", f"{key}={json.dumps(value)}"]
    return arguments


def write_tiny_dataset(folder: Path, count: int = 3, size: int = 20) -> Tuple[Path, Path]:
    """``folder/images`` and ``folder/labels``: ``count`` noisy cubes with classes 0, 1 and 2."""
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        label = np.zeros((size, size, size), np.uint8)
        label[4:11, 5:14, 4 + index : 12 + index] = 1
        label[11:15, 5:14, 4 + index : 12 + index] = 2
        image = (rng.normal(size=label.shape) + 2.0 * label).astype(np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(images / f"case{index}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(labels / f"case{index}.nii.gz"))
    return images, labels


def run_cli(arguments: Sequence[object], events: Path) -> Tuple[int, List[dict]]:
    """Run the command line in this process with ``--events events --quiet``; the exit code and
    the events it wrote (this run's only)."""
    before = len(events.read_text().splitlines()) if events.exists() else 0
    code = main([str(a) for a in arguments] + ["--events", str(events), "--quiet"])
    lines = events.read_text().splitlines() if events.exists() else []
    return code, [parse_event(line) for line in lines[before:]]


def train_arguments(folder: Path, out: Path, *extra: object) -> List[object]:
    """``train`` of the tiny network on the tiny dataset in ``folder`` (see
    ``write_tiny_dataset``) into ``out``, supervised, on the CPU; ``extra`` arguments last."""
    return ["train", "--images", folder / "images", "--labels", folder / "labels",
            "--method", "supervised", "--device", "cpu", "--out", out,
            *tiny_set_arguments(), *extra]  # fmt: skip


def train_tiny(folder: Path, run: Path, iterations: int = 2, *extra: object) -> None:
    """Train the tiny network on the tiny dataset into ``run`` through the command line."""
    if not (folder / "images").is_dir():
        write_tiny_dataset(folder)
    arguments = train_arguments(folder, run, "--iterations", iterations, *extra)
    code, events = run_cli(arguments, folder / "train-events.jsonl")
    assert code == 0, events[-1]["message"]


class StopAt(EventSink):
    """An event sink that asks ``stop`` to stop (as SIGINT would) once progress reaches
    ``at`` (None: the first progress), so that a test can cancel at a chosen iteration."""

    def __init__(self, stop: StopFlag, at: Optional[int] = None) -> None:
        super().__init__(quiet=True)
        self.stop, self.at = stop, at

    def progress(self, stage: str, iteration: int, total: int, **fields: object) -> None:
        super().progress(stage, iteration, total, **fields)
        if self.at is None or iteration == self.at:
            self.stop.request("test")


def load_script(name: str) -> ModuleType:
    """A script of ``scripts/`` imported as a module, for tests of its functions."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
