#!/usr/bin/env python3
"""UA-MT's own code beside ours on Left Atrium: store the peer's test scores and report them
next to our runs of the same split, labels and iteration budget.

The peer is the code of Yu et al., "Uncertainty-aware Self-ensembling Model for Semi-supervised
3D Left Atrium Segmentation" (MICCAI 2019, github.com/yulequan/UA-MT):
``code/train_LA_meanteacher_certainty.py`` (UA-MT) and ``code/train_LA.py`` (its supervised
V-Net), tested with the ``test_single_case`` and medpy metrics of its ``code/test_util.py``.
It runs from a scratch folder outside this repository and is never committed;
``scripts/peer/uamt_peer.py`` prepares that folder, applies the changes the benchmark allows
(the device, the split, the iteration count and, where CPU time requires it, the patch size)
and writes the RESULT.json read here. Network, losses, augmentation, optimiser and schedule,
EMA, consistency ramp, test strides and metrics are the peer's. Its schedules are tied to
6000 iterations: at 1500 the learning rate never steps down and the consistency weight
reaches only a fraction of its final value, unless ``--consistency_rampup`` is scaled (each
stored row keeps its training arguments).

The peer's test script writes Dice, Jaccard, HD95 and ASD per case with medpy, HD95 and ASD
in voxels of the h5 grid; stored here in mm at the challenge's 0.625 mm isotropic spacing. An
empty prediction scores 0 on all four there (a 0 HD95 would flatter the mean): such cases are
counted, and left out of the HD95 and ASD means (ours penalise them with the image diagonal).

    python scripts/peer_benchmark.py add RESULT.json --label "UA-MT (peer code)" \\
        --method ua-mt --labels 8 --seed 1337 \\
        --command "scripts/peer/uamt_peer.py train --script uamt --name uamt-L8 ..."
    python scripts/peer_benchmark.py report   # regenerates docs/benchmarks.md

``RESULT.json``: what ``uamt_peer.py test`` writes for one run: ``mean`` and
``per_case`` (``id``, ``dice``, ``jaccard``, ``hd95``, ``asd``), ``meta`` (``iterations``,
``train_patch_size``, ``extra_train_args``), ``train_time`` (``cpu_s``) and ``test_time``
(``cpu_s``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark import (  # noqa: E402
    RESULTS,
    cpu_hours_cell,
    format_plan_value,
    load_results,
    method_label,
    save_result,
    seed_list,
    seeds_cell,
)

PEER_RESULTS = ROOT / "docs" / "peer-results.json"
#: Our method name -> the peer training script that runs it (``scripts/peer/uamt_peer.py``).
PEER_SCRIPT = {"ua-mt": "uamt", "supervised": "supervised"}
#: Left Atrium 2018's voxel spacing (mm): the h5 files do not store it.
LA_SPACING_MM = 0.625
#: Published GPU figures (Dice %), for context only: other budget, patch and hardware.
PUBLISHED = (
    "Published on a GPU (6000 iterations, 112x112x80 patches; Yu et al. 2019 and the papers "
    "that reuse its split): V-Net 79.99 Dice % with 8 labeled cases and 86.03 with 16, UA-MT "
    "84.25 and 88.88, V-Net with all 80 labeled 91.14."
)


def peer_row(result: dict, label: str, method: str, labels: int, seed: int, command: str) -> dict:
    """One stored row from the peer wrapper's ``result``: means in % and mm, per-case Dice."""
    cases = result["per_case"]
    if not cases:
        raise ValueError("the peer result has no scored case")
    trained = {"labels": labels, "script": PEER_SCRIPT.get(method, method)}
    for name, value in trained.items():
        if name in result and result[name] != value:
            raise ValueError(f"the peer run has {name} {result[name]!r}, not {value!r}")
    empty = [c for c in cases if float(c["dice"]) == 0.0 and float(c["hd95"]) == 0.0]
    predicted = [c for c in cases if c not in empty]

    def mean(metric: str, scale: float, over: list = cases) -> float | None:
        return scale * sum(float(c[metric]) for c in over) / len(over) if over else None

    meta = result.get("meta", {})
    train = (result.get("train_time") or {}).get("cpu_s")
    test = (result.get("test_time") or {}).get("cpu_s")
    iterations = int(meta["iterations"])
    return {
        "key": f"peer-{method}-L{labels}-it{iterations}-s{seed}-{result.get('name', label)}",
        "label": label,
        "method": method,
        "labels": labels,
        "seed": seed,
        "iterations": iterations,
        "patch": meta.get("train_patch_size", ""),
        "train_arguments": meta.get("extra_train_args", ""),
        "test_cases": len(cases),
        "dice": mean("dice", 100),
        "jaccard": mean("jaccard", 100),
        "hd95_mm": mean("hd95", LA_SPACING_MM, predicted),
        "asd_mm": mean("asd", LA_SPACING_MM, predicted),
        "empty_predictions": len(empty),
        "case_dice": {c["id"]: float(c["dice"]) for c in cases},
        "train_cpu_hours": float(train) / 3600 if train else None,
        "test_cpu_hours": float(test) / 3600 if test else None,
        "command": command,
        "date": datetime.date.today().isoformat(),
    }


def ours_at(results: list, labels: int, iterations: int) -> list:
    """Our Left Atrium test runs from scratch with ``labels`` labeled cases and ``iterations``,
    grouped by method label (a variant in brackets): (label, runs)."""
    groups: dict = {}
    for r in results:
        if (
            r.get("dataset") == "la"
            and r.get("scored_on") == "test"
            and not r.get("init_from")
            and r["labels"] == labels
            and r["iterations"] == iterations
        ):
            groups.setdefault(method_label(r), []).append(r)
    return sorted(groups.items())


def report_lines(peers: list | None = None, ours: list | None = None) -> list:
    """The section of docs/benchmarks.md: each peer row beside our test runs at its labels and
    iterations, then the published GPU figures."""
    peers = load_results(PEER_RESULTS) if peers is None else peers
    if not peers:
        return []
    ours = load_results(RESULTS) if ours is None else ours
    lines = [
        "## Left Atrium 2018: UA-MT's own code beside ours, 20 test cases",
        "",
        "The peer's training and test scripts, changed only for the device, our split, the "
        "iteration count and (for CPU time) the patch size (`scripts/peer_benchmark.py` says "
        "exactly what); its metrics (medpy) on its own sliding window, HD95 and ASD over the "
        "cases it predicted anything for (empty ones counted). Ours: the automatic plan (a "
        "variant in brackets names its settings), mean over seeds with the range, HD95 and ASD "
        "with empty predictions penalised. Dice and Jaccard in %, HD95 and ASD in mm; training "
        "CPU-hours (one thread). The peer's code trains at the data's own spacing (it has no "
        "resampling), so its CPU-sized patch spans less of the heart (48x48x32 voxels at "
        "0.625 mm: 30x30x20 mm) than ours at the plan's coarser spacing (56x40x24 at 1.257 mm: "
        "70x50x30 mm); at 0.625 mm our own supervised training falls the same way (58.15 on "
        "the validation cases). Its learning rate steps down and its consistency weight ramps "
        "on a 6000-iteration schedule, so at 1500 iterations neither does much.",
        "",
        "| code | method | labeled | iterations | seeds | patch, spacing (mm) | Dice | Jaccard | HD95 | ASD | train CPU-h |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    settings = sorted({(p["labels"], p["iterations"]) for p in peers})
    for labels, iterations in settings:
        for p in sorted(
            (p for p in peers if (p["labels"], p["iterations"]) == (labels, iterations)),
            key=lambda p: p["label"],
        ):
            cpu = f"{p['train_cpu_hours']:.2f}" if p.get("train_cpu_hours") else "n/a"
            empty = f" ({p['empty_predictions']} empty)" if p["empty_predictions"] else ""

            def mm(value: float | None) -> str:
                return "n/a" if value is None else f"{value:.2f}"

            lines.append(
                f"| {p['label']} | {p['method']} | {labels} | {iterations} | {p['seed']} | "
                f"{format_plan_value(p['patch'])}, {LA_SPACING_MM} | {p['dice']:.2f}{empty} | {p['jaccard']:.2f} | "
                f"{mm(p['hd95_mm'])} | {mm(p['asd_mm'])} | {cpu} |"
            )
        for label, runs in ours_at(ours, labels, iterations):
            plan = runs[0].get("plan") or {}
            patch, spacing = plan.get("patch_size"), plan.get("target_spacing")
            lines.append(
                f"| SemiSupSeg | {label} | {labels} | {iterations} | {seed_list(runs)} | "
                f"{format_plan_value(patch) if patch else 'preset'}"
                f"{', ' + format_plan_value(spacing) if spacing else ''} | "
                f"{seeds_cell(runs, 'dice', 100)} | {seeds_cell(runs, 'iou', 100)} | "
                f"{seeds_cell(runs, 'hd95_mm', 1)} | {seeds_cell(runs, 'asd_mm', 1)} | "
                f"{cpu_hours_cell(runs)} |"
            )
    commands = sorted({p["command"] for p in peers})
    return lines + ["", PUBLISHED, "", "Peer commands (the wrapper; the peer's code runs in the scratch folder it names):", "", "```",
                    *commands, "```", ""]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="store a peer run's test scores")
    add.add_argument("result", type=Path, help="the peer wrapper's RESULT.json")
    add.add_argument("--label", required=True, help='the row\'s name, e.g. "UA-MT (peer code)"')
    add.add_argument("--method", required=True, help="the method it runs: ua-mt or supervised")
    add.add_argument("--labels", type=int, required=True, help="labeled cases it trained on")
    add.add_argument("--seed", type=int, required=True, help="the peer script's --seed")
    add.add_argument("--command", required=True, help="the command that produced it")
    sub.add_parser("report", help="regenerate docs/benchmarks.md")
    args = parser.parse_args()
    if args.action == "add":
        result = json.loads(args.result.read_text())
        row = peer_row(result, args.label, args.method, args.labels, args.seed, args.command)
        save_result(row, PEER_RESULTS)
        print(f"stored {row['key']}: Dice {row['dice']:.2f}")
    from benchmark import write_report

    write_report(load_results(RESULTS))


if __name__ == "__main__":
    main()
