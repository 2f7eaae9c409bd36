"""Shared helpers of the backend reliability tests: a tiny synthetic dataset, the settings of a
tiny network, and the command line run in this process (fast) with its events read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SemiSupSegLib.backend.cli import main
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


def train_tiny(folder: Path, run: Path, iterations: int = 2, *extra: object) -> None:
    """Train the tiny network on the tiny dataset into ``run`` through the command line."""
    images, labels = folder / "images", folder / "labels"
    if not images.is_dir():
        images, labels = write_tiny_dataset(folder)
    code, events = run_cli(
        ["train", "--images", images, "--labels", labels, "--method", "supervised",
         "--iterations", iterations, "--device", "cpu", "--out", run, *tiny_set_arguments(),
         *extra],
        folder / "train-events.jsonl",
    )  # fmt: skip
    assert code == 0, events[-1]["message"]
