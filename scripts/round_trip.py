#!/usr/bin/env python3
"""The panel's round trip, timed: Accept as labeled -> Retrain (Fast) -> new pseudo-masks and
scores for every remaining unlabeled case, through the panel's own workflow code.

A real MRML scene (slicer-core, as the tests use) holds the labeled cases of the benchmark's
split (``scripts/benchmark.py``, validation protocol: ``--labels`` cases with their true
labels as segmentations); the other training cases are the unlabeled folder. The script runs
what a user's clicks run (``SemiSupSegLib.workflow.Workflow``, the real backend):

1. a first round (set-up, not the measurement): a short training of ``--first-iterations``
   and the prediction of every unlabeled case, so that there is a table to review;
2. the ``--add`` cases the table lists first are loaded into the scene (timed: what selecting
   a case costs), corrected (their true labels, as a clinician's correction) and accepted;
3. Retrain with Fast on: a warm start for the panel's share of the ``--budget``'s iterations
   on this device, then the prediction of the remaining unlabeled cases and the import of the
   new table. The workflow times each part (export, backend start-up, checks, training,
   prediction, import) as the panel's log shows them.

The result goes to ``docs/round-trip-results.json`` and the table in ``docs/benchmarks.md``.
Each run starts afresh in ``--work``/round-trip-<dataset>-<method>/.

    python scripts/round_trip.py --dataset hippocampus
    python scripts/round_trip.py --dataset la --work /work/benchmark-runs
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSupSeg"))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark import (  # noqa: E402
    DATASETS,
    RESULTS,
    dataset_split,
    load_results,
    migration_note_lines,
    save_result,
)
from SemiSupSegLib.backend.datasets import infer_classes, load_dataset  # noqa: E402
from SemiSupSegLib.progress import ROUND_PARTS, formatPartSeconds  # noqa: E402

ROUND_TRIP_RESULTS = ROOT / "docs" / "round-trip-results.json"


def class_names(data: Path) -> list:
    """The foreground class names of a dataset, in label-value order (the backend's reader)."""
    dataset = load_dataset(data)
    classes = dataset.classes if dataset.classes is not None else infer_classes(dataset)
    return [classes[value] for value in sorted(classes) if value > 0]


def estimate_seconds(dataset: str, method: str, steps: dict) -> float | None:
    """Seconds from a stored benchmark run of the same dataset and method on this machine (its
    seconds per training iteration and per predicted case), or None without one."""
    prefix = DATASETS[dataset]["key"]
    runs = [
        r
        for r in load_results(RESULTS)
        if r["method"] == method
        and r.get("dataset", "hippocampus") == dataset
        and r["key"].startswith(prefix)
        and not r.get("init_from")
    ]
    if not runs:
        return None
    run = runs[-1]
    per_iteration = run["train_seconds"] / run["iterations"]
    per_case = run["predict_seconds"] / max(1, run["test_cases"])
    return (
        steps["iterations"] * per_iteration
        + steps["cases"] * per_case
        + steps["rounds"] * (90 if dataset == "la" else 20)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="hippocampus")
    parser.add_argument("--data", help="the dataset's folder (default: per --dataset)")
    parser.add_argument("--method", default="mn")
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--add", type=int, default=4, help="cases corrected and accepted")
    parser.add_argument(
        "--budget", default="standard", help="the time budget Fast retrain takes its share of"
    )
    parser.add_argument(
        "--first-iterations",
        type=int,
        default=50,
        help="iterations of the first round (set-up only; its model's quality does not change "
        "the round trip's times)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=str(ROOT / "benchmark-runs"))
    args = parser.parse_args()
    data = Path(args.data or DATASETS[args.dataset]["data"])

    from SemiSupSegLib import mrml_io
    from SemiSupSegLib.job_export import LabeledPair
    from SemiSupSegLib.training_options import CUSTOM_PRESET, TrainingOptions
    from SemiSupSegLib.workflow import Workflow

    split = dataset_split(args.dataset, data, hold_validation=True)
    labeled = split.labeled(args.labels)
    pool = [name for name in split.train if name not in set(labeled)]
    retrain = TrainingOptions(method=args.method, preset=args.budget, device=args.device)
    fast = retrain.validate().forRetraining()  # what Retrain runs with Fast on
    estimate = estimate_seconds(
        args.dataset,
        args.method,
        {
            "iterations": args.first_iterations + fast.totalIterations(),
            "cases": 2 * len(pool) - args.add,
            "rounds": 2,
        },
    )
    print(
        f"round trip on {args.dataset}: {args.labels} labeled, {len(pool)} unlabeled, "
        f"{args.add} corrected, Fast retrain {fast.totalIterations()} iterations; "
        + (f"about {estimate / 60:.0f} min" if estimate else "no stored run to estimate from"),
        flush=True,
    )

    work = Path(args.work) / f"round-trip-{args.dataset}-{args.method}"
    if work.exists():
        shutil.rmtree(work)
    unlabeled = work / "unlabeled"
    unlabeled.mkdir(parents=True)
    for name in pool:
        (unlabeled / f"{name}.nii.gz").symlink_to(data / "imagesTr" / f"{name}.nii.gz")

    import slicer

    mrml_io.ensureSegmentationConverters()
    scene = slicer.vtkMRMLScene()
    names = class_names(data)

    def truth(case: str, volume, title: str):
        label = data / "labelsTr" / f"{case}.nii.gz"
        return mrml_io.importLabelmapAsSegmentation(scene, label, names, {}, volume, title)

    pairs = []
    for case in labeled:
        volume = mrml_io.readVolumeNode(scene, data / "imagesTr" / f"{case}.nii.gz", case)
        pairs.append(LabeledPair(volume, truth(case, volume, f"{case} labels"), case))
    environment = dict(
        os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads)
    )
    workflow = Workflow(scene, work / "session", python=sys.executable, environment=environment)

    first = TrainingOptions(
        method=args.method,
        preset=CUSTOM_PRESET,
        iterations=args.first_iterations,
        device=args.device,
    )
    print(f"  first round: {args.first_iterations} iterations, {len(pool)} cases predicted")
    run_round(workflow, workflow.exportJob(pairs, [], str(unlabeled), first), args.device)

    rows = workflow.reviewRows()
    loads, accepts = [], []
    for row in rows[: args.add]:
        started = time.perf_counter()
        loaded = workflow.loadCase(row.case)
        loads.append(time.perf_counter() - started)
        corrected = truth(row.case, loaded.volume, f"{row.case} corrected")
        started = time.perf_counter()
        workflow.acceptCase(row.case, corrected)
        accepts.append(time.perf_counter() - started)
    print(f"  accepted {', '.join(r.case for r in rows[: args.add])}; retraining (Fast)")

    job = workflow.exportRetrainJob(pairs, retrain)
    number = run_round(workflow, job, args.device)
    record = workflow.session.round(number)
    predicted = len(workflow.importedRows or [])
    if predicted != len(pool) - args.add:
        raise SystemExit(f"round {number} predicted {predicted} cases, not {len(pool) - args.add}")
    times = {part: round(record.times[part], 2) for part in ROUND_PARTS if part in record.times}
    result = {
        "key": f"{DATASETS[args.dataset]['key']}{args.method}-L{args.labels}+{args.add}-{args.budget}",
        "dataset": args.dataset,
        "method": args.method,
        "labels": args.labels,
        "added": args.add,
        "unlabeled_predicted": predicted,
        "iterations": fast.totalIterations(),
        "times": times,
        "total_seconds": round(sum(times.values()), 1),
        "load_case_seconds": round(sum(loads) / len(loads), 2) if loads else None,
        "accept_seconds": round(sum(accepts) / len(accepts), 2) if accepts else None,
        "threads": args.threads,
        "device": args.device,
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join([sys.executable, "scripts/round_trip.py"] + sys.argv[1:]),
    }
    save_result(result, ROUND_TRIP_RESULTS)
    print("  " + ", ".join(f"{k} {formatPartSeconds(v)}" for k, v in times.items()))
    from benchmark import write_report

    write_report(load_results(RESULTS))
    print("wrote docs/benchmarks.md")


def run_round(workflow, job: Path, device: str) -> int:
    """Start the job, wait for it, print its log's times line; the round's number."""
    runner = workflow.startJob(job, device)
    workflow.wait()
    if not runner.succeeded:
        raise SystemExit(f"{job}: {runner.progress.errorText}")
    for line in runner.progress.log:
        if " took " in line:
            print(f"  {line}", flush=True)
    return workflow.currentRound


def report_lines(results: list | None = None) -> list:
    """The round trip's section of docs/benchmarks.md: one row per measurement."""
    results = load_results(ROUND_TRIP_RESULTS) if results is None else results
    if not results:
        return []
    parts = [p.replace("-", " ") for p in ROUND_PARTS]
    lines = [
        "## The panel's round trip: accept, Retrain (Fast), new pseudo-masks and scores",
        "",
        "Through the panel's workflow code (`scripts/round_trip.py`: a real MRML scene, the real",
        "backend): after a first round, the cases the table lists first are corrected (their",
        "true labels) and accepted, then Retrain with Fast on trains the panel's share of the",
        "budget from the last model and predicts every remaining unlabeled case; the parts as",
        "the panel's log times them, then the total from the click to the new table, and what",
        "loading one case into the scene takes (selecting it in the table).",
        "",
        "| dataset | method | labeled + corrected | unlabeled predicted | iterations | "
        + " | ".join(parts)
        + " | total | load a case | threads | date |",
        "|" + "---|" * (len(parts) + 9),
    ]
    for r in sorted(results, key=lambda r: (r["dataset"], r["method"], r["date"])):
        method = " ".join([r["method"], *(f"`{s}`" for s in r.get("settings", []))])
        cells = [formatPartSeconds(r["times"][p]) if p in r["times"] else "" for p in ROUND_PARTS]
        load = formatPartSeconds(r["load_case_seconds"]) if r.get("load_case_seconds") else ""
        lines.append(
            f"| {r['dataset']} | {method} | {r['labels']} + {r['added']} | "
            f"{r['unlabeled_predicted']} | {r['iterations']} | " + " | ".join(cells) + " | "
            f"{formatPartSeconds(r['total_seconds'])} | {load} | {r['threads']} | {r['date']} |"
        )
    commands = sorted({r["command"].replace(sys.executable, "python") for r in results})
    lines += [""] + migration_note_lines(results)
    return lines + ["", "Reproduce:", "", "```", *commands, "```", ""]


if __name__ == "__main__":
    main()
