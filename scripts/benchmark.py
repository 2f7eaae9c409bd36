#!/usr/bin/env python3
"""The benchmark every method is measured on, through the public command line.

Two datasets (``--dataset``):

- ``hippocampus``: MSD Hippocampus (the 200 shared labeled cases), the fixed split of
  ``SemiSupSegLib.backend.splits.benchmark_split`` (seed 0): 160 training and 40 test cases.
- ``la``: the 2018 Left Atrium challenge as UA-MT distributes it (convert it first with
  ``scripts/convert_left_atrium.py``): the 80 cases of ``train.list`` and the 20 of
  ``test.list``, labeled subsets the first 8 or 16 of ``train.list`` as the papers use.

Labeled subsets are nested (4 within 8 within 16); the other training cases are given to the
semi-supervised methods as images only. The validation protocol (``--score val`` or
``--score test``) holds ``VALIDATION_CASES`` training cases out of both pools, drawn with seed 0
from those after the first 16; settings are chosen by their scores on those (``--score val``),
and a final configuration is scored once on the test cases (``--score test``). Test and
validation cases never reach training (``--exclude``). Every method gets the same network and
iteration budget; the settings are planned from the data (``--plan off``: the fixed preset).
Results stored before the protocol (no ``scored_on``) trained on all 160 hippocampus training
cases and are kept as they were.

Each run is three subprocesses (train, predict, evaluate), so wall time and peak memory (of
the training process, from ``os.wait4``) are measured per run. Results accumulate in
``docs/benchmark-results.json``; ``docs/benchmarks.md`` and ``docs/benchmarks.png`` are
regenerated from all results each time, with the sections of the sibling benchmarks that
reuse this one's steps (``train_run``, ``score_run``): ``review_order_benchmark.py`` (does the
review order pay?) and ``round_trip.py`` (the panel's accept-retrain-review round trip).

    python scripts/benchmark.py --dataset la --methods supervised mn --labels 8 --score val
    python scripts/benchmark.py --methods supervised --labels 4 8 16 160 --seeds 0
    python scripts/benchmark.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSupSeg"))

from SemiSupSegLib.backend.splits import Split, benchmark_split  # noqa: E402
from SemiSupSegLib.method_catalogue import BASELINE_METHOD  # noqa: E402
from SemiSupSegLib.output_layout import (  # noqa: E402
    CHECKPOINT_FILE,
    EVALUATION_FOLDER,
    METRICS_FILE,
    MODEL_FILE,
    PLAN_FILE,
    PREDICTIONS_FOLDER,
    RUN_FOLDER,
    SUMMARY_FILE,
)

DATASETS = {
    "hippocampus": {
        "data": os.environ.get("SEMISUPSEG_DATA", str(ROOT.parent / "shared" / "data" / "msd-hippocampus")),
        "validation": 20,
        "key": "",
        "labels": [4, 8, 16],
    },
    "la": {
        "data": os.environ.get("SEMISUPSEG_LA", str(ROOT.parent / "data" / "LA")),
        "validation": 10,
        "key": "la-",
        "labels": [8, 16],
    },
}  # fmt: skip
#: UA-MT's and the V-Net baseline's schedule on Left Atrium (Yu et al., MICCAI 2019): SGD there,
#: the product's optimiser here; the same patches, batch, resolution and iterations.
PUBLISHED_SCHEDULE = ["patch_size=112x112x80", "batch_size=4", "target_spacing=0.625,0.625,0.625"]
RESULTS = ROOT / "docs" / "benchmark-results.json"
REPORT = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks.png"
#: Variants that name what was the method's default when they ran (mn's unlabeled_mode until
#: 2026-12): the plot draws them as the method's line.
FORMER_DEFAULTS = {"mn [replace]"}
CLASS_NAMES = {"1": "Anterior", "2": "Posterior"}


def run_command(command: list, log: Path, threads: int) -> tuple:
    """Run ``command`` with ``threads`` CPU threads; return (exit status, wall seconds, peak
    resident memory in MiB, CPU seconds). CPU seconds (user + system, all threads) barely
    depend on what else the shared machine runs: the time to compare runs made apart."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    cpu_seconds = usage.ru_utime + usage.ru_stime
    return process.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024, cpu_seconds


def training_rate(events_path: Path) -> float | None:
    """Iterations per second over consecutive training progress events (a pause between a
    cancel and a resume is left out)."""
    iterations, seconds, previous = 0, 0.0, None
    for line in events_path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event.get("event") != "progress" or event.get("stage") == "prediction":
            if event.get("event") in ("cancelled", "start"):
                previous = None
            continue
        point = (event["time"], event["iteration"])
        if previous is not None and point[1] > previous[1]:
            iterations += point[1] - previous[1]
            seconds += point[0] - previous[0]
        previous = point
    return iterations / seconds if seconds > 0 else None


def dataset_split(name: str, data: Path, hold_validation: bool) -> Split:
    """The dataset's fixed training/test split, with its validation cases held out if asked."""
    if not (data / "labelsTr").is_dir():
        hint = " (make it with scripts/convert_left_atrium.py)" if name == "la" else ""
        raise SystemExit(f"{data}: no labelsTr/ folder; --data names the dataset{hint}")
    if name == "la":
        lists = [(data / f).read_text().split() for f in ("train.list", "test.list")]
        split = Split(train=lists[0], test=lists[1])
    else:
        names = sorted(p.name[: -len(".nii.gz")] for p in (data / "labelsTr").glob("*.nii.gz"))
        split = benchmark_split(names)
    return split.with_validation(DATASETS[name]["validation"]) if hold_validation else split


def run_key(args: argparse.Namespace, method: str, labels: int, seed: int) -> str:
    """The run's name: results and work folders are kept by it."""
    key = f"{DATASETS[args.dataset]['key']}{method}-L{labels}-s{seed}-{args.network}"
    key += f"-it{args.iterations}"
    if args.variant:
        key += f"-{args.variant}"
    if args.score:
        key += f"-{args.score}"
    return key


def run_one(args: argparse.Namespace, split, method: str, labels: int, seed: int) -> dict:
    key = run_key(args, method, labels, seed)
    work = Path(args.work) / key
    work.mkdir(parents=True, exist_ok=True)
    (work / "labeled.txt").write_text("\n".join(split.labeled(labels)) + "\n")
    scored = split.validation if args.score == "val" else split.test
    held_out = split.test + (split.validation if args.score else [])
    (work / "test.txt").write_text("\n".join(held_out) + "\n")
    init_from = Path(args.work) / args.init_from / RUN_FOLDER if args.init_from else None
    trained = train_run(args, work, method, seed, args.iterations, init_from)
    run = work / RUN_FOLDER
    predict_seconds, summary = score_run(
        args, run, scored, work / PREDICTIONS_FOLDER, work / EVALUATION_FOLDER, work / "log.txt"
    )
    plan_file = run / PLAN_FILE
    return {
        "key": key,
        "dataset": args.dataset,
        "scored_on": {"val": "validation", "test": "test"}.get(args.score),
        "plan": json.loads(plan_file.read_text())["values"] if plan_file.exists() else None,
        "method": method,
        "variant": args.variant,
        "labels": labels,
        "seed": seed,
        "network": args.network,
        "iterations": args.iterations,
        "settings": list(args.set),
        "init_from": args.init_from,
        "test_cases": len(scored),
        "threads": args.threads,
        **trained,
        "predict_seconds": round(predict_seconds, 1),
        "summary": summary,
        "case_dice": case_dice(work / EVALUATION_FOLDER / METRICS_FILE),
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join([sys.executable, "scripts/benchmark.py"] + sys.argv[1:]),
    }


def train_run(
    args: argparse.Namespace,
    work: Path,
    method: str,
    seed: int,
    iterations: int,
    init_from: Path | None = None,
) -> dict:
    """Train ``method`` into ``work/run`` on the cases of ``work/labeled.txt`` (labeled) and the
    other cases of ``args.data`` except those of ``work/test.txt`` (unlabeled), with the
    settings of ``args`` (network, plan, ``--set``, device, threads), warm-started from the run
    folder ``init_from`` if given. A finished training (final model and its time recorded) is
    reused; an interrupted one (checkpoint, no final model) resumes; anything else starts
    afresh. Returns the training's wall and CPU seconds, peak memory and iterations per second.
    """
    cli = [sys.executable, "-m", "SemiSupSegLib.backend"]
    log, events = work / "log.txt", work / "events.jsonl"
    earlier, peak_file = work / "train_seconds.txt", work / "train_peak_mib.txt"
    earlier_cpu = work / "train_cpu_seconds.txt"
    run = work / RUN_FOLDER
    model = run / MODEL_FILE
    if model.exists() and earlier.exists():
        train_seconds = float(earlier.read_text())
        peak_mib = float(peak_file.read_text()) if peak_file.exists() else None
        cpu_seconds = float(earlier_cpu.read_text()) if earlier_cpu.exists() else None
    else:
        resume = (run / CHECKPOINT_FILE).exists() and not model.exists()
        if not resume:
            for stale in (events, earlier, peak_file, earlier_cpu):
                if stale.exists():
                    stale.unlink()
        train = cli + [
            "train", "--data", str(args.data), "--labeled", str(work / "labeled.txt"),
            "--exclude", str(work / "test.txt"), "--method", method, "--network", args.network,
            "--iterations", str(iterations), "--seed", str(seed), "--device", args.device,
            "--out", str(run), "--events", str(events), "--quiet",
        ] + [x for s in args.set for x in ("--set", s)] + (["--resume"] if resume else [])  # fmt: skip
        train += ["--plan", args.plan]
        if init_from and not resume:
            train += ["--init-from", str(init_from)]
        status, seconds, peak_mib, cpu_seconds = run_command(train, log, args.threads)
        train_seconds = seconds + (float(earlier.read_text()) if earlier.exists() else 0.0)
        earlier.write_text(str(train_seconds))
        cpu_seconds += float(earlier_cpu.read_text()) if earlier_cpu.exists() else 0.0
        earlier_cpu.write_text(str(cpu_seconds))
        if peak_file.exists():
            peak_mib = max(peak_mib, float(peak_file.read_text()))
        peak_file.write_text(str(peak_mib))
        if status != 0:
            if model.exists():
                model.unlink()  # not a finished training: the next run resumes the checkpoint
            raise SystemExit(f"training failed ({status}); see {log}; run again to resume")
    return {
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1) if cpu_seconds is not None else None,
        "iterations_per_second": training_rate(events),
        "peak_memory_mib": round(peak_mib) if peak_mib is not None else None,
    }


def score_run(
    args: argparse.Namespace,
    run: Path,
    cases: list,
    predictions: Path,
    evaluation: Path,
    log: Path,
    extra: tuple = (),
) -> tuple:
    """Predict ``cases`` of ``args.data`` with the model of ``run`` into ``predictions`` (with
    the ``extra`` arguments of ``predict``) and evaluate them against their labels into
    ``evaluation``; returns the prediction's wall seconds and the evaluation's summary."""
    cli = [sys.executable, "-m", "SemiSupSegLib.backend"]
    images = [str(Path(args.data) / "imagesTr" / f"{name}.nii.gz") for name in cases]
    predict = cli + ["predict", "--run", str(run), "--input", *images,
                     "--out", str(predictions), "--device", args.device, "--quiet", *extra]  # fmt: skip
    status, predict_seconds, _, _ = run_command(predict, log, args.threads)
    if status != 0:
        raise SystemExit(f"prediction failed ({status}); see {log}")
    evaluate = cli + ["evaluate", "--pred", str(predictions), "--truth", str(args.data),
                      "--out", str(evaluation)]  # fmt: skip
    status, _, _, _ = run_command(evaluate, log, args.threads)
    if status != 0:
        raise SystemExit(f"evaluation failed ({status}); see {log}")
    return predict_seconds, json.loads((evaluation / SUMMARY_FILE).read_text())


def case_dice(metrics_csv: Path) -> dict:
    """Mean foreground Dice per case from an evaluation's metrics.csv, for paired comparisons."""
    from SemiSupSegLib.backend.metrics import case_mean_dice

    return case_mean_dice(metrics_csv)


def paired_lines(results: list) -> list:
    """Each method against supervised training with the same labels, budget, network and seed,
    case by case: mean Dice difference, cases better, Wilcoxon signed-rank p."""
    from scipy import stats

    baseline = {
        (r["labels"], r["iterations"], r["network"], r["seed"]): r
        for r in results
        if r["method"] == BASELINE_METHOD and not r.get("variant") and r.get("case_dice")
    }
    rows = []
    for r in sorted(results, key=lambda r: (-r["iterations"], method_label(r), r["labels"])):
        base = baseline.get((r["labels"], r["iterations"], r["network"], r["seed"]))
        if base is None or base is r or not r.get("case_dice"):
            continue
        cases = sorted(set(base["case_dice"]) & set(r["case_dice"]))
        diff = [r["case_dice"][c] - base["case_dice"][c] for c in cases]
        better = sum(d > 0 for d in diff)
        p = stats.wilcoxon(diff).pvalue if any(diff) else 1.0
        rows.append(
            f"| {method_label(r)} | {r['labels']} | {r['iterations']} | {r['seed']} | "
            f"{sum(diff) / len(diff):+.4f} | {better}/{len(cases)} | {p:.2g} |"
        )
    if not rows:
        return []
    return [
        "",
        "Paired with `supervised` (same labeled cases, budget, network and seed), case by case",
        "on the test cases: mean difference of the mean foreground Dice, the cases where the",
        "method is better, and the Wilcoxon signed-rank p-value (one training seed: it says",
        "the difference is consistent across cases, not across training runs).",
        "",
        "| method | labeled | iterations | seed | Δ Dice | cases better | p |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def mean_dice(result: dict) -> float:
    return mean_stat(result["summary"], "dice")


def mean_stat(summary: dict, metric: str) -> float:
    """Mean of ``metric`` over the foreground classes of an evaluation summary."""
    values = [class_stat(summary, value, metric) for value in summary["classes"]]
    return sum(values) / len(values)


def retraining_settings(run: dict) -> list:
    """A run's settings other than its method's own (``method.*``): the training's."""
    return [s for s in run["settings"] if not s.startswith("method.")]


def migration_note_lines(results: list) -> list:
    """One line per distinct ``migration_note`` of stored results (rows rewritten after a
    default changed)."""
    notes = sorted({r["migration_note"] for r in results if r.get("migration_note")})
    return [f"Rows with `migration_note` in the results file: {note}." for note in notes]


def from_scratch_runs(results: list, warm: dict) -> list:
    """The runs trained from scratch like the warm-started run ``warm``: the same dataset,
    method and ``method.*`` settings, labeled cases, network, plan and scored cases, and no
    other settings (``warm``'s other settings are the retraining's, the subject of the
    comparison)."""

    def like(r: dict) -> tuple:
        return (
            r.get("dataset", "hippocampus"),
            r["method"],
            r["labels"],
            r["network"],
            sorted(s for s in r["settings"] if s not in retraining_settings(r)),
            bool(r.get("plan")),
            r.get("scored_on"),
        )

    return [
        s
        for s in results
        if not s.get("init_from") and not retraining_settings(s) and like(s) == like(warm)
    ]


def warm_start_lines(results: list) -> list:
    """Retraining after corrections: each warm-started run against training from scratch on
    the same labeled cases (same method, network and seed, the default budget); where a
    setting ran with several seeds, a row of their means follows its per-seed rows."""
    pairs = []
    for r in sorted(
        results, key=lambda r: (r["labels"], r["iterations"], method_label(r), r["seed"])
    ):
        if not r.get("init_from"):
            continue
        from_scratch = from_scratch_runs(results, r)
        scratch = [
            s for s in from_scratch if s["seed"] == r["seed"] and s["iterations"] >= r["iterations"]
        ]
        if scratch:
            s = max(scratch, key=lambda s: s["iterations"])
            seeds = [mean_dice(o) for o in from_scratch if o["iterations"] == s["iterations"]]
            pairs.append((r, s, seeds))

    def row(group: list, seed: str) -> str:
        r, s, seeds = group[0]
        spread = (
            f"{min(seeds):.4f}-{max(seeds):.4f} ({len(seeds)})" if len(seeds) > 1 else "one seed"
        )
        start = next((b for b in results if b["key"] == r["init_from"]), None)
        warm = sum(mean_dice(g[0]) for g in group) / len(group)
        cold = sum(mean_dice(g[1]) for g in group) / len(group)

        def ratio(field: str) -> str:
            if not all(g[0].get(field) and g[1].get(field) for g in group):
                return "not recorded"
            a = sum(g[0][field] for g in group) / len(group)
            b = sum(g[1][field] for g in group) / len(group)
            return f"{a:.0f}/{b:.0f} s = {a / b:.0%}"

        return (
            f"| {method_label(r)} | {r['labels']} | {seed} | {r['init_from']} | "
            + (f"{mean_dice(start):.4f} | " if start else "n/a | ")
            + f"{warm:.4f} | {cold:.4f} | {spread} | {warm - cold:+.4f} | "
            f"{r['iterations']}/{s['iterations']} = {r['iterations'] / s['iterations']:.0%} | "
            f"{ratio('train_seconds')} | {ratio('train_cpu_seconds')} |"
        )

    rows = []
    for pair in pairs:
        rows.append(row([pair], str(pair[0]["seed"])))
        r = pair[0]
        same = [
            p
            for p in pairs
            if (method_label(p[0]), p[0]["labels"], p[0]["iterations"], p[0]["init_from"])
            == (method_label(r), r["labels"], r["iterations"], r["init_from"])
        ]
        if len(same) > 1 and pair is same[-1]:
            rows.append(row(same, f"mean of {len(same)}"))
    if not rows:
        return []
    return [
        "",
        "Retraining after corrections (target: the from-scratch Dice in at most 25% of its",
        "iterations and time): the previous round's model, trained on fewer labeled cases, is",
        "warm-started on the enlarged labeled set and trained for a fraction of the budget;",
        "mean foreground Dice of the starting model, the warm-started one and one trained from",
        "scratch on the same cases. Wall time includes start-up (reading the data, building",
        "the networks), which does not shrink with the iterations, and depends on what else",
        "the shared machine ran at the time; CPU time (the training process's user + system",
        "seconds) depends on it less but still does (a run sharing its core with others pays",
        "in cache misses: the same 1500 supervised iterations took 330 to 550 CPU seconds), so",
        "the iterations are the load-free measure and times compare best between runs made",
        "side by side (the `mn` warm and scratch runs of seeds 1 and 2). The scratch seeds column",
        "gives the range of the from-scratch Dice over training seeds (and how many): the",
        "run-to-run noise a warm start's shortfall should be read against. Dice before is the",
        "stored result of the starting run; the `mn` and `mn+em` starting models are repeats",
        "of those runs (same command and seed, on a fresh machine, with the code of 2026-11-30),",
        "which scored 0.8588 and 0.8565 against the stored 0.8591 and 0.8580.",
        "",
        "| run | labeled | seed | warm start from | Dice before | Dice warm | Dice scratch | scratch seeds | Δ | iterations | wall time | CPU time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Why supervised warm starts fall short (rows above). Over 3 seeds the shortfall is",
        "-0.0026 at 20% of the iterations (every seed below its from-scratch run) and -0.0023",
        "at 25%; on seed 0 alone it is -0.0025 (20%), -0.0028 (25%), -0.0014 (50%) and -0.0005",
        "(100%), so only a run of half the budget or more narrows it, and by then it is within",
        "the spread of from-scratch seeds (0.8560-0.8589). Nothing at the restart changed it:",
        "twice the learning rate (`lr6e-3`, -0.0021 over 3 seeds), drawing old and new cases",
        "alike (`uniform`, -0.0029), shrinking the weights towards a fresh init (`shrink0.8`",
        "-0.0025, `shrink0.5` -0.0043) or averaging them (`ema0.99`, -0.0027), one seed each.",
        "Our reading, a hypothesis these runs do not prove: a short warm start stays near the",
        "8-case solution, the warm-starting gap Ash and Adams describe (NeurIPS 2020,",
        "arXiv:1910.08475), though their remedy, shrink-and-perturb, did not help here. `mn`",
        "shows it on 2 of 3 seeds (-0.0020, +0.0051, -0.0017; +0.0005 on average), `mn+em` on",
        "none. Training from scratch instead does not help at this budget: 300 iterations from",
        "scratch on the 12 cases reach 0.8398. So Fast keeps the warm start for supervised",
        "training; for a final supervised model, uncheck Fast (the full budget from scratch).",
    ]


def retraining_summary(results: list) -> list:
    """Figure 4 in one row per setting: warm starts with default settings (every seed run)
    against training from scratch on the same cases (every seed run), as shares of the
    scratch iterations and CPU time, and the Dice both reach, with a Wilcoxon signed-rank
    test on the per-case Dice averaged over seeds. Reached: the warm mean lies within the
    scratch seeds' range and the per-case difference is not significant (p >= 0.05)."""
    from scipy import stats

    groups: dict = {}
    for r in results:
        if r.get("init_from") and not retraining_settings(r) and r.get("case_dice"):
            key = (method_label(r), r["labels"], r["iterations"], r["init_from"])
            groups.setdefault(key, []).append(r)
    lines = []
    for (label, labels, iterations, init_from), warm in sorted(groups.items()):
        scratch = [
            s
            for s in from_scratch_runs(results, warm[0])
            if s["iterations"] >= iterations and s.get("case_dice")
        ]
        if not scratch:
            continue
        budget = max(s["iterations"] for s in scratch)
        scratch = [s for s in scratch if s["iterations"] == budget]
        cases = sorted(set.intersection(*(set(r["case_dice"]) for r in warm + scratch)))
        diff = [
            sum(r["case_dice"][c] for r in warm) / len(warm)
            - sum(s["case_dice"][c] for s in scratch) / len(scratch)
            for c in cases
        ]
        p = stats.wilcoxon(diff).pvalue if any(diff) else 1.0
        dice_warm = sum(mean_dice(r) for r in warm) / len(warm)
        seeds = [mean_dice(s) for s in scratch]
        dice_scratch = sum(seeds) / len(seeds)
        cpu_warm = [r["train_cpu_seconds"] for r in warm if r.get("train_cpu_seconds")]
        cpu_scratch = [s["train_cpu_seconds"] for s in scratch if s.get("train_cpu_seconds")]
        cpu_share = (
            f"{sum(cpu_warm) / len(cpu_warm) / (sum(cpu_scratch) / len(cpu_scratch)):.0%} of "
            f"CPU time ({len(cpu_warm)} and {len(cpu_scratch)} runs recorded it)"
            if cpu_warm and cpu_scratch
            else "CPU time not recorded"
        )
        wall_share = (sum(r["train_seconds"] for r in warm) / len(warm)) / (
            sum(s["train_seconds"] for s in scratch) / len(scratch)
        )
        start = next((b for b in results if b["key"] == init_from), None)
        before = f"{start['labels']} -> " if start else ""
        reached = dice_warm >= min(seeds) and p >= 0.05
        lines.append(
            f"| retraining after corrections, {label} ({before}{labels} labeled): warm start "
            f"against from scratch ({len(warm)} and {len(scratch)} seeds) | "
            f"{iterations / budget:.0%} of iterations, {wall_share:.0%} of wall time, "
            f"{cpu_share}; "
            f"Dice {dice_warm:.4f} against {dice_scratch:.4f}"
            + (f" (seeds {min(seeds):.4f}-{max(seeds):.4f})" if len(seeds) > 1 else "")
            + f", per case {sum(diff) / len(diff):+.4f}, "
            f"p = {p:.2g}: from-scratch Dice "
            + ("reached" if reached else "not reached")
            + " | ≤ 25% |"
        )
    return lines


def performance_lines(results: list) -> list:
    """Issue #6's figures 1-3 from docs/performance-results.json (scripts/performance.py),
    each beside its target, and figure 4 from the retraining runs."""
    path = ROOT / "docs" / "performance-results.json"
    if not path.exists():
        return []
    perf = json.loads(path.read_text())
    targets = perf["targets"]
    lines = [
        "",
        "Performance and scale, measured by `python scripts/performance.py` (details, profiles",
        "and method in [performance.md](performance.md)); one CPU thread, ratios within one run:",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
    ]
    for m in perf["overhead"]["methods"]:
        lines.append(
            f"| training loop / floor (the method's step on pre-loaded batches), {m['method']} | "
            f"{m['ratio']:.2f}x | ≤ {targets['overhead']}x |"
        )
    memory = perf["memory"]
    runs = {r["unlabeled"]: r["peak_rss_mib"] for r in memory["runs"]}
    lines.append(
        f"| peak memory, {max(runs)} / {min(runs)} unlabeled volumes ({memory['method']}) | "
        f"{memory['ratio']:.2f}x | ≤ {targets['memory']}x |"
    )
    for r in perf["prediction"]["results"]:
        lines.append(
            f"| prediction end to end / sliding window alone, M = {r['mc_samples']} | "
            f"{r['ratio']:.2f}x | ≤ {targets['prediction']}x |"
        )
    return lines + retraining_summary(results)


def class_stat(summary: dict, value: str, metric: str) -> float | None:
    """Mean of ``metric`` for class ``value`` from an evaluation summary.json."""
    entry = summary["classes"][value][metric]
    return entry["mean"] if isinstance(entry, dict) else entry


def method_label(result: dict) -> str:
    """The method's name in the report, with the variant (non-default settings) if any."""
    variant = result.get("variant")
    return f"{result['method']} [{variant}]" if variant else result["method"]


def protocol_lines(results: list) -> list:
    """Runs of the validation protocol, per dataset and the cases they were scored on: mean
    over seeds with the range, every foreground metric averaged over classes."""

    lines = []
    titles = {"la": "Left Atrium 2018", "hippocampus": "MSD Hippocampus"}
    for dataset in ("la", "hippocampus"):
        for scored_on in ("test", "validation"):
            chosen = [
                r for r in results if r.get("dataset") == dataset and r["scored_on"] == scored_on
            ]
            if not chosen:
                continue
            groups: dict = {}
            for r in chosen:
                key = (method_label(r), r["labels"], r["network"], r["iterations"])
                groups.setdefault(key, []).append(r)
            lines += [
                f"## {titles[dataset]}, scored on the {chosen[0]['test_cases']} {scored_on} cases",
                "",
                "Mean over seeds (range over seeds where there are several; a single seed says "
                "so). Dice and Jaccard in %, HD95 and ASD in mm, averaged over foreground classes; "
                "training CPU-hours (user + system, one thread per run).",
                "",
                "| method | labeled | iterations | seeds | Dice | Jaccard | HD95 | ASD | train CPU-h | plan: spacing, patch, batch |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]  # fmt: skip
            for (method, labels, _network, its), runs in sorted(groups.items()):
                plan = runs[0].get("plan") or {}
                plan_text = ", ".join(
                    format_plan_value(plan.get(k)) for k in ("target_spacing", "patch_size", "batch_size")
                ) if plan else "preset"  # fmt: skip
                lines.append(
                    f"| {method} | {labels} | {its} | {seed_list(runs)} | "
                    f"{seeds_cell(runs, 'dice', 100)} | {seeds_cell(runs, 'iou', 100)} | "
                    f"{seeds_cell(runs, 'hd95_mm', 1)} | {seeds_cell(runs, 'asd_mm', 1)} | "
                    f"{cpu_hours_cell(runs)} | {plan_text} |"
                )
            lines += protocol_paired_lines(chosen)
            if scored_on == "validation":
                lines += recommendation_lines(chosen)
            lines.append("")
    return lines


#: Seeds a method needs on the validation cases before it can be recommended over supervised.
RECOMMENDATION_SEEDS = 3


def recommendation_lines(results: list) -> list:
    """What the validation runs recommend, per labeled count and budget: the semi-supervised
    method (or variant) with the highest mean Dice among those that beat supervised training on
    the same seeds — higher mean Dice and higher in most of at least ``RECOMMENDATION_SEEDS``
    seeds — else supervised training, said plainly."""
    from scipy import stats

    lines = []
    supervised: dict = {}
    for r in results:
        if r["method"] == BASELINE_METHOD and not r.get("variant"):
            key = (r["labels"], r["iterations"], r["network"])
            supervised.setdefault(key, {})[r["seed"]] = mean_dice(r)
    candidates: dict = {}
    for r in results:
        if r["method"] != BASELINE_METHOD:
            key = (r["labels"], r["iterations"], r["network"])
            candidates.setdefault(key, {}).setdefault(method_label(r), {})[r["seed"]] = mean_dice(r)
    for key in sorted(set(supervised) | set(candidates)):
        labels, iterations, network = key
        base = supervised.get(key, {})
        winners, compared, screened = [], [], []
        for label, runs in sorted(candidates.get(key, {}).items()):
            seeds = sorted(set(runs) & set(base))
            if len(seeds) < RECOMMENDATION_SEEDS:
                screened.append(f"{label} ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})")
                continue
            compared.append(label)
            deltas = [runs[s] - base[s] for s in seeds]
            if sum(deltas) > 0 and sum(d > 0 for d in deltas) > len(deltas) / 2:
                p_runs = stats.ttest_rel([runs[s] for s in seeds], [base[s] for s in seeds]).pvalue
                winners.append((sum(runs[s] for s in seeds) / len(seeds), label, deltas, p_runs))
        head = f"Recommendation for {labels} labeled cases, {iterations} iterations, {network}: "
        if winners:
            _, label, deltas, p_runs = max(winners)
            text = (
                f"{head}**{label}** (beats supervised training by "
                f"{100 * sum(deltas) / len(deltas):+.2f} Dice points over {len(deltas)} seeds, "
                f"higher in {sum(d > 0 for d in deltas)} of them; paired t-test over runs p = "
                f"{p_runs:.2g}{', not significant' if p_runs >= 0.05 else ''})."
            )
        elif compared:
            text = (
                f"{head}**supervised**: no semi-supervised method ({', '.join(compared)}) beat "
                "supervised training on these validation cases."
            )
        else:
            text = f"{head}not decided yet: no method has {RECOMMENDATION_SEEDS} seeds beside supervised."
        if screened:
            text += f" Screened on fewer seeds, not counted: {', '.join(screened)}."
        lines += ["", text]
    return lines


def protocol_paired_lines(results: list) -> list:
    """Each method against supervised training on the same cases, budget and labeled set:
    over cases (Wilcoxon signed-rank on the per-case Dice averaged over the seeds both have)
    and over runs (paired t-test on the per-seed mean Dice, from 3 seeds)."""
    from scipy import stats

    def group_key(r: dict) -> tuple:
        return (r["labels"], r["iterations"], r["network"])

    supervised: dict = {}
    for r in results:
        if r["method"] == BASELINE_METHOD and not r.get("variant") and r.get("case_dice"):
            supervised.setdefault(group_key(r), {})[r["seed"]] = r
    groups: dict = {}
    for r in results:
        if r.get("case_dice") and not (r["method"] == BASELINE_METHOD and not r.get("variant")):
            groups.setdefault((method_label(r),) + group_key(r), {})[r["seed"]] = r
    rows = []
    for (label, labels, its, network), runs in sorted(groups.items()):
        base = supervised.get((labels, its, network), {})
        seeds = sorted(set(runs) & set(base))
        if not seeds:
            continue
        cases = sorted(
            set.intersection(*(set(x[s]["case_dice"]) for x in (runs, base) for s in seeds))
        )
        diff = [
            sum(runs[s]["case_dice"][c] - base[s]["case_dice"][c] for s in seeds) / len(seeds)
            for c in cases
        ]
        per_seed = [mean_dice(runs[s]) - mean_dice(base[s]) for s in seeds]
        p_cases = stats.wilcoxon(diff).pvalue if any(diff) else 1.0
        p_runs = f"{stats.ttest_rel([mean_dice(runs[s]) for s in seeds], [mean_dice(base[s]) for s in seeds]).pvalue:.2g}" if len(seeds) >= 3 else "n/a (fewer than 3 seeds)"  # fmt: skip
        rows.append(
            f"| {label} | {labels} | {its} | {', '.join(map(str, seeds))} | "
            f"{100 * sum(per_seed) / len(per_seed):+.2f} | "
            + ", ".join(f"{100 * d:+.2f}" for d in per_seed)
            + f" | {sum(d > 0 for d in diff)}/{len(cases)} | {p_cases:.2g} | {p_runs} |"
        )
    if not rows:
        return []
    return [
        "",
        "Against `supervised` on the same labeled cases, budget and seeds: Dice difference in "
        "points (mean and per seed), cases better (per-case Dice averaged over seeds), Wilcoxon "
        "p over cases, paired t-test p over runs.",
        "",
        "| method | labeled | iterations | seeds | Δ Dice | Δ per seed | cases better | p cases | p runs |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]  # fmt: skip


def seeds_cell(runs: list, metric: str, scale: float, digits: int = 2) -> str:
    """A foreground metric's mean over ``runs`` (seeds), with its range when there are several."""
    values = [scale * mean_stat(r["summary"], metric) for r in runs]
    text = f"{sum(values) / len(values):.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    return text


def seed_list(runs: list) -> str:
    return ", ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))


def cpu_hours_cell(runs: list) -> str:
    """Mean training CPU-hours of the runs that recorded them."""
    cpu = [r["train_cpu_seconds"] / 3600 for r in runs if r.get("train_cpu_seconds")]
    return f"{sum(cpu) / len(cpu):.2f}" if cpu else "n/a"


def format_plan_value(value) -> str:
    if isinstance(value, list):
        return "x".join(f"{v:g}" for v in value)
    return str(value)


def write_report(all_results: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = [r for r in all_results if not r.get("scored_on")]
    groups: dict = {}
    for r in results:
        groups.setdefault((method_label(r), r["labels"], r["network"], r["iterations"]), []).append(
            r
        )

    def cell(values: list, digits: int) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"

    lines = [
        "# Benchmarks",
        "",
        "Settings are chosen on validation cases held out of training; test cases score a",
        "final configuration once (`scripts/benchmark.py`, its docstring says how).",
        "",
        *protocol_lines(all_results),
        *sibling_sections(),
        "## MSD Hippocampus, earlier protocol",
        "",
        "These runs predate the validation protocol: their defaults were chosen by scores on",
        "the same test cases, so read them as development history, not as held-out results.",
        "",
        "MSD Hippocampus (200 shared labeled cases), fixed split (seed 0): 160 training and 40",
        "test cases. Labeled subsets of 4, 8 and 16 training cases (nested); the other training",
        "cases are unlabeled images for the semi-supervised methods; the test cases are never",
        "used for training. Same 3D network and iteration budget for every method. Metrics on",
        "the 40 test cases by `semisupseg evaluate` (MONAI metrics; HD95 and ASD in mm); mean",
        "over cases, then mean ± std over seeds where there are several. Machine: 2 CPU cores,",
        "no GPU, shared with other work: each run uses one CPU thread (`--threads 1`), so times",
        "and it/s are indicative; compare them within one table.",
        "",
        "| method | labeled | iterations | seeds | Dice Ant. | Dice Post. | IoU Ant. | IoU Post. | HD95 Ant. (mm) | HD95 Post. (mm) | ASD Ant. (mm) | ASD Post. (mm) | train s | it/s | threads | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, labels, _network, its), runs in sorted(
        groups.items(), key=lambda g: (-g[0][3], g[0][:3])
    ):
        stats = []
        for metric, digits in (("dice", 3), ("iou", 3), ("hd95_mm", 2), ("asd_mm", 2)):
            for value in CLASS_NAMES:
                stats.append(cell([class_stat(r["summary"], value, metric) for r in runs], digits))
        lines.append(
            f"| {method} | {labels} | {its} | {len(runs)} | " + " | ".join(stats) + " | "
            + cell([r["train_seconds"] for r in runs], 0) + " | "
            + cell([r["iterations_per_second"] for r in runs], 2) + " | "
            + ", ".join(sorted({str(r.get("threads", "2*")) for r in runs})) + " | "
            + cell([r["peak_memory_mib"] for r in runs], 0) + " |"
        )  # fmt: skip
    networks = sorted({(r["network"], r["iterations"]) for r in results})
    lines += [
        "",
        "Network and budget: "
        + "; ".join(f"`{n}`, {i} iterations" for n, i in networks)
        + ". CPU defaults otherwise (see `TrainConfig`). `2*`: run before `--threads` existed,"
        " with two threads while up to five runs shared the two cores; its time and it/s are"
        " not comparable with the others.",
    ]
    lines += paired_lines(results)
    lines += warm_start_lines(results)
    lines += performance_lines(results)
    variants = sorted(
        {
            (
                method_label(r),
                f"`{' '.join(r['settings'])}`" if r["settings"] else "default settings",
                f", warm start from `{r['init_from']}`" if r.get("init_from") else "",
                ", the automatic plan (`--plan auto`)" if r.get("plan") else "",
            )
            for r in results
            if r.get("variant")
        }
    )
    if variants:
        lines += ["", "Variants (settings beside the defaults):", ""]
        lines += [
            f"- `{name}`: {settings}{start}{plan}" for name, settings, start, plan in variants
        ]
    lines += [
        "",
        "![Dice against the number of labeled cases](benchmarks.png)",
        "",
        "Reproduce (each run's command; results accumulate in docs/benchmark-results.json).",
    ]
    lines += migration_note_lines(all_results) + ["", "```"]
    lines += sorted({r["command"].replace(sys.executable, "python") for r in all_results})
    lines += ["```", ""]
    REPORT.write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(6, 4))
    # One line per method at the full budget with the settings that were its defaults when it
    # ran; other variants, shorter budgets and warm starts are in the tables.
    budget = max(i for _, _, _, i in groups)
    for method in sorted(
        {m for m, _, _, i in groups if i == budget and ("[" not in m or m in FORMER_DEFAULTS)}
    ):
        points = sorted(
            (labels, np.mean([np.mean([class_stat(r["summary"], v, "dice") for v in CLASS_NAMES]) for r in runs]))
            for (m, labels, _, i), runs in groups.items()
            if (m, i) == (method, budget)
        )  # fmt: skip
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            label=f"{method}, {budget} it",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labeled training cases")
    ax.set_ylabel("mean foreground Dice (40 test cases)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)


def save_result(result: dict, path: Path = RESULTS) -> list:
    """Add (or replace, by its ``key``) one result in the results file ``path`` under a lock:
    several benchmark processes may run at once. Returns all the file's results."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else []
        results = [r for r in results if r["key"] != result["key"]] + [result]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, path)
    return results


def load_results(path: Path = RESULTS) -> list:
    """The results stored in ``path`` (none yet: an empty list)."""
    return json.loads(path.read_text()) if path.exists() else []


def sibling_sections() -> list:
    """The report sections of the sibling benchmarks, from their own results files: UA-MT's own
    code beside ours (``peer_benchmark.py``), the review order (``review_order_benchmark.py``)
    and the panel's round trip (``round_trip.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peer_benchmark import report_lines as peer_lines
    from review_order_benchmark import report_lines as review_order_lines
    from round_trip import report_lines as round_trip_lines

    return peer_lines() + review_order_lines() + round_trip_lines()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="hippocampus")
    parser.add_argument("--data", help="the dataset's folder (default: per --dataset)")
    parser.add_argument(
        "--score",
        choices=["val", "test", ""],
        default="",
        help="validation protocol: hold the validation cases out and score on them (val: for "
        "choosing settings) or on the test cases (test: a final configuration, once); empty: "
        "the earlier protocol (hippocampus only; no validation cases held out)",
    )
    parser.add_argument(
        "--plan",
        choices=["auto", "off"],
        help="passed to train --plan (default: auto with --score, off for the earlier protocol)",
    )
    parser.add_argument("--methods", nargs="+", default=[BASELINE_METHOD])
    parser.add_argument(
        "--labels",
        nargs="+",
        type=int,
        help="labeled training cases (default: 4 8 16 on the hippocampus, 8 16 on Left Atrium)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--network", default="unet")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument(
        "--schedule",
        choices=["cpu", "published"],
        default="cpu",
        help="cpu (default): the plan's settings at --iterations; published: the papers' GPU "
        "schedule on Left Atrium (6000 iterations of batch 4 at 112x112x80 patches, native "
        "spacing) for a machine with a GPU",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--set", action="append", default=[], help="extra training setting NAME=VALUE"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per run (default 1: several runs share a small machine without "
        "oversubscribing it; it/s figures are per thread)",
    )
    parser.add_argument(
        "--variant",
        default="",
        help="name for a run with non-default --set settings (kept apart in results and report)",
    )
    parser.add_argument(
        "--init-from",
        default="",
        help="warm start from the model of an earlier run, by its key (e.g. "
        "supervised-L8-s0-unet-it1500): retraining after corrections; use with --variant",
    )
    parser.add_argument("--work", default=str(ROOT / "benchmark-runs"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for r in results:  # results from before per-case Dice was kept, where the run is still here
        metrics = Path(args.work) / r["key"] / EVALUATION_FOLDER / METRICS_FILE
        if "case_dice" not in r and metrics.exists():
            r["case_dice"] = case_dice(metrics)
            results = save_result(r)
    if not args.report_only:
        args.data = args.data or DATASETS[args.dataset]["data"]
        args.labels = args.labels or DATASETS[args.dataset]["labels"]
        if not args.score and args.dataset != "hippocampus":
            raise SystemExit("--score val or --score test: the validation protocol is required")
        args.plan = args.plan or ("auto" if args.score else "off")
        if args.schedule == "published":
            args.iterations = 6000
            args.set = PUBLISHED_SCHEDULE + list(args.set)
            args.variant = "-".join(v for v in ("published", args.variant) if v)
        split = dataset_split(args.dataset, Path(args.data), hold_validation=bool(args.score))
        for seed in args.seeds:
            for method in args.methods:
                for labels in args.labels:
                    print(f"benchmark: {method}, {labels} labeled, seed {seed}", flush=True)
                    result = run_one(args, split, method, labels, seed)
                    results = save_result(result)
                    dice = mean_dice(result)
                    print(f"  mean Dice {dice:.4f}, {result['train_seconds']} s", flush=True)
                    write_report(results)
    write_report(results)
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
