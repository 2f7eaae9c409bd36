"""Train every method a few iterations on tiny synthetic data with a fixed seed and print a
digest of each run's final state (every network, optimiser and schedule), one line per method.

Why: a refactoring that must not change behaviour is checked by running this against the code
before and after it (``PYTHONPATH`` pointing at each tree) and comparing the digests bit for bit::

    PYTHONPATH=OLD/SemiSupSeg python scripts/bitwise_training_check.py --out old.json
    PYTHONPATH=NEW/SemiSupSeg python scripts/bitwise_training_check.py --out new.json --compare old.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))

from backend_helpers import write_tiny_dataset  # noqa: E402
from SemiSupSegLib.backend.checkpoint import load_checkpoint  # noqa: E402
from SemiSupSegLib.backend.config import TrainConfig  # noqa: E402
from SemiSupSegLib.backend.datasets import from_folders  # noqa: E402
from SemiSupSegLib.backend.events import EventSink  # noqa: E402
from SemiSupSegLib.backend.methods.base import list_methods  # noqa: E402  (older trees have it too)
from SemiSupSegLib.backend.training import train  # noqa: E402

try:
    from SemiSupSegLib.output_layout import CHECKPOINT_FILE
except ImportError:  # a tree from before output_layout: this script compares old with new
    from SemiSupSegLib.backend.checkpoint import CHECKPOINT_NAME as CHECKPOINT_FILE

CLASSES = {0: "background", 1: "upper", 2: "lower"}

#: Method, and the options that make a few iterations reach every stage of it.
RUNS: Dict[str, Dict[str, Any]] = {
    "supervised": {"weight_average": 0.9},
    "mean-teacher": {},
    "ua-mt": {"method_options": {"mc_passes": 2}},
    "em": {},
    "mn": {"method_options": {"warmup_stage_fraction": 0.3, "train_slices": 4}},
    "mn-phase": {
        "method": "mn",
        "method_options": {
            "warmup_stage_fraction": 0.3,
            "train_slices": 4,
            "alternation": "phase",
            "phase_length": 2,
        },
    },
    "mn+em": {"method_options": {"warmup_stage_fraction": 0.3, "train_slices": 2}},
    "mn+em-disagreement": {
        "method": "mn+em",
        "method_options": {
            "warmup_stage_fraction": 0.3,
            "train_slices": 2,
            "disagreement": True,
            "max_unreliable_share": 0.5,
        },
    },
    "bcp": {},  # the switch to self-training at iteration 2 of 6
    "bcp-centre-one-cycle": {
        "method": "bcp",
        "method_options": {
            "cuboid_position": "centre",
            "largest_component": False,
            "restart_lr": False,
            "deploy": "teacher",
        },
    },
}


def digest(value: Any, hasher: Any) -> None:
    """Fold ``value`` (nested dicts, lists, tensors, numbers) into ``hasher``, in a fixed order."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            hasher.update(repr(key).encode())
            digest(value[key], hasher)
    elif isinstance(value, (list, tuple)):
        for item in value:
            digest(item, hasher)
    elif isinstance(value, torch.Tensor):
        hasher.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
        hasher.update(
            value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    else:
        hasher.update(repr(value).encode())


def run(name: str, folder: Path) -> str:
    settings = dict(RUNS[name])
    config = TrainConfig.from_dict(
        {
            "method": settings.pop("method", name),
            "device": "cpu",
            "iterations": 6,
            "batch_size": 2,
            "patch_size": [16, 16, 16],
            "feature_channels": 8,
            "checkpoint_every": 0,
            "log_every": 1,
            "prefetch": 0,
            "network_options": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
            **settings,
        }
    )
    dataset = from_folders(
        folder / "images", folder / "labels", unlabeled=folder / "unlabeled", classes=CLASSES
    )
    train(dataset, config, folder / f"run-{name}", EventSink(quiet=True))
    state = load_checkpoint(folder / f"run-{name}" / CHECKPOINT_FILE)
    hasher = hashlib.sha256()
    digest({k: state[k] for k in ("method_state", "model", "weight_average")}, hasher)
    return hasher.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the digests")
    parser.add_argument("--compare", type=Path, help="digests of the other tree, to compare")
    parser.add_argument("--methods", nargs="*", default=list(RUNS))
    args = parser.parse_args()
    uncovered = set(list_methods()) - {
        settings.get("method", name) for name, settings in RUNS.items()
    }
    if uncovered:
        print(f"methods without a run in RUNS (add one): {sorted(uncovered)}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        write_tiny_dataset(folder, count=3)
        unlabeled, _ = write_tiny_dataset(folder / "extra", count=2)
        unlabeled.rename(folder / "unlabeled")
        digests = {name: run(name, folder) for name in args.methods}
    args.out.write_text(json.dumps(digests, indent=2))
    if args.compare is None:
        print(json.dumps(digests, indent=2))
        return 0
    other = json.loads(args.compare.read_text())
    same = True
    for name, value in digests.items():
        verdict = "identical" if other.get(name) == value else "DIFFERENT"
        same &= verdict == "identical"
        print(f"{name:14s} {verdict}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
