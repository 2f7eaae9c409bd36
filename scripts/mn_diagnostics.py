#!/usr/bin/env python3
"""Watch M&N train: each model's Dice on validation cases and the accuracy of its
pseudo-masks on unlabeled cases as training goes, and the share of unlabeled patches.

Why M&N wins or loses against supervised training on a dataset is a question of its two
teachers: the 3D model learns from the 2D model's pseudo-masks and the other way round, so
the run is only as good as the weaker teacher allows. Every ``--every`` iterations this
evaluates both models (sliding window over whole volumes on the training grid, hard argmax,
Dice with MONAI) on ``--cases`` validation cases (held out of training) and on ``--cases``
unlabeled training cases whose labels the benchmark knows but training never sees (the
pseudo-masks each model hands the other). The benchmark's split and plan are used
(``scripts/benchmark.py``). Output: ``diagnostics.jsonl`` (one line per evaluation) and
``diagnostics.png`` in ``--out``.

    python scripts/mn_diagnostics.py --dataset la --labels 8 --out runs/la-mn-diagnostics
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSupSeg"))
sys.path.insert(0, str(ROOT / "scripts"))

from monai.inferers import sliding_window_inference  # noqa: E402
from monai.metrics import compute_dice  # noqa: E402
from monai.networks.utils import one_hot  # noqa: E402

from benchmark import DATASETS, dataset_split  # noqa: E402
from SemiSupSegLib.backend.config import parse_setting  # noqa: E402
from SemiSupSegLib.backend.data import load_case  # noqa: E402
from SemiSupSegLib.backend.datasets import load_dataset, with_labeled_subset  # noqa: E402
from SemiSupSegLib.backend.events import EventSink  # noqa: E402
from SemiSupSegLib.backend.planning import plan_training  # noqa: E402
from SemiSupSegLib.backend.preprocessing import xyz_to_zyx  # noqa: E402
from SemiSupSegLib.backend.training import train  # noqa: E402
from SemiSupSegLib.method_catalogue import DEFAULT_METHOD, methods  # noqa: E402
from SemiSupSegLib.output_layout import RUN_FOLDER  # noqa: E402


def mean_dice(network: torch.nn.Module, volumes: list, patch_zyx: tuple, classes: int) -> float:
    """Mean foreground Dice of ``network``'s argmax over ``volumes`` (a copy runs in eval mode,
    so the training network's mode and statistics are untouched)."""
    model = copy.deepcopy(network).eval()
    scores = []
    with torch.no_grad():
        for volume in volumes:
            image = torch.as_tensor(volume.image[None])
            logits = sliding_window_inference(image, patch_zyx, 4, model, overlap=0.25)
            prediction = one_hot(logits.argmax(1, keepdim=True), classes)
            truth = one_hot(torch.as_tensor(volume.label[None]).long(), classes)
            scores.append(
                float(compute_dice(prediction, truth, include_background=False).nanmean())
            )
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="la")
    parser.add_argument("--data", help="the dataset's folder (default: per --dataset)")
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--cases", type=int, default=5)
    co_training = [m.name for m in methods() if m.needs_2d_encoder]  # a 2D and a 3D model
    parser.add_argument(
        "--method",
        default=DEFAULT_METHOD if DEFAULT_METHOD in co_training else co_training[0],
        choices=co_training,
    )
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = Path(args.data or DATASETS[args.dataset]["data"])
    split = dataset_split(args.dataset, data, hold_validation=True)
    dataset = load_dataset(data)
    dataset = with_labeled_subset(dataset, split.labeled(args.labels))
    training = set(split.train)
    unlabeled = [c for c in dataset.unlabeled if c.name in training]
    dataset = replace(dataset, unlabeled=unlabeled)
    by_name = {c.name: c for c in load_dataset(data).labeled}
    watched = {
        "validation": [by_name[n] for n in split.validation[: args.cases]],
        "unlabeled": [by_name[c.name] for c in unlabeled[: args.cases]],
    }
    explicit = {"iterations": args.iterations, "seed": args.seed}
    explicit.update(parse_setting(text) for text in args.set)
    base = {"method": args.method, "device": "cpu", "modality": dataset.modality}
    events = EventSink()
    config, _ = plan_training(dataset, base, explicit, events)
    volumes = {k: [load_case(c, config) for c in cases] for k, cases in watched.items()}
    patch = xyz_to_zyx(config.patch_size)
    classes = max(dataset.classes) + 1
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "diagnostics.jsonl"
    log.write_text("")
    shares: list = []

    def watch(done: int, method, result) -> None:
        shares.append(result.info.get("n_unlabeled", 0) / config.batch_size)
        if done % args.every and done != config.iterations:
            return
        row = {"iteration": done, "unlabeled_share": sum(shares) / len(shares)}
        shares.clear()
        for name, network in (("3d", method.net3d), ("2d", method.net2d)):
            for group, cases in volumes.items():
                row[f"{name}_{group}_dice"] = mean_dice(network, cases, patch, classes)
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    train(dataset, config, args.out / RUN_FOLDER, events, callbacks=[watch])
    plot(log, args.out / "diagnostics.png")


def plot(log: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log.read_text().splitlines()]
    its = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (
        ("3d_validation_dice", "-"),
        ("2d_validation_dice", "-"),
        ("3d_unlabeled_dice", "--"),
        ("2d_unlabeled_dice", "--"),
    ):
        ax.plot(its, [r[key] for r in rows], style, marker=".", label=key.replace("_", " "))
    ax.plot(its, [r["unlabeled_share"] for r in rows], ":", color="grey", label="unlabeled share")
    ax.set_xlabel("iteration")
    ax.set_ylabel("Dice / share")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
