#!/usr/bin/env python3
"""Does the review order pay? Correct the cases a score puts first, retrain, and compare the
Dice gain with that of correcting random cases (an active-learning benchmark).

The panel lists unlabeled cases in the order of a case score (``scores.csv``'s ``score``:
``output_layout.REVIEW_SCORE``) and tells users to review in that order. Here, from a run of
``scripts/benchmark.py`` (``--base KEY``, under ``--work``; trained under the validation
protocol, with the validation and test cases held out), the model's unlabeled pool is
predicted once; each strategy picks ``--add`` cases from it:

- ``shipped``: the first by ``score``, as the panel lists them;
- ``random-0`` .. ``random-2``: drawn with seeds 0, 1, 2 (distinct draws);
- one per other case score the model gives (``output_layout.CASE_SCORES``: the 2D/3D
  ``disagreement`` of M&N runs, the ``mutual-information`` of dropout passes (BALD) with
  ``--mc-samples`` > 1 for a model with dropout, the ``expected-changed-share``);
- ``diverse``: the shipped order, skipping a case whose image features (the network's own
  embedding, averaged inside and around the predicted structure) lie closer to a case already
  chosen than ``--near`` of all pairs of pool cases do: no four near-duplicates.

Those cases get their true labels (the correction a clinician would make) and the model is
retrained as the panel's Fast retrain does it: a warm start from the base model for the
panel's share of the base run's iterations (``TrainingOptions.forRetraining``). Each model,
the base one included, is scored on the validation cases (``--score val``: for choosing a
score) or the test cases (``--score test``: once, for the final one). Reported: the Dice gain
over the base model per strategy, random as mean and range, and the ratio of the shipped
score's gain to the mean random gain (issue 18's acceptance: at least 1.5).

Every step keeps its outputs in ``--work``/review-<base>/ and is not redone once finished:
the pool's predictions (``pool/``, ``pool-mc/``), the features (``features.json``), the
choices (``choices.json``, fixed once written, shared by ``--score val`` and ``test``), a
retraining per distinct choice (``retrain-<strategy>/``, resumed if interrupted) and each
model's scores (``predictions-<score>/``, ``evaluation-<score>/``). Results accumulate in
``docs/review-order-results.json``; ``docs/benchmarks.md`` is regenerated with them.

    python scripts/review_order_benchmark.py --dataset la --base la-mn-L8-s0-unet-it1500-add-val \\
        --score val --work /work/benchmark-runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSupSeg"))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402

from benchmark import (  # noqa: E402
    DATASETS,
    RESULTS,
    case_dice,
    dataset_split,
    load_results,
    mean_dice,
    save_result,
    score_run,
    train_run,
    write_report,
)
from SemiSupSegLib.backend.datasets import read_case_list  # noqa: E402
from SemiSupSegLib.output_layout import (  # noqa: E402
    CASE_SCORES,
    EVALUATION_FOLDER,
    METRICS_FILE,
    MODEL_FILE,
    PREDICTIONS_FOLDER,
    REVIEW_SCORE,
    RUN_FOLDER,
    SCORES_FILE,
    SUMMARY_FILE,
    ScoreRow,
    read_table,
)
from SemiSupSegLib.training_options import CUSTOM_PRESET, TrainingOptions  # noqa: E402

REVIEW_RESULTS = ROOT / "docs" / "review-order-results.json"
SHIPPED, DIVERSE = "shipped", "diverse"
RANDOM_SEEDS = (0, 1, 2)
#: issue 18's acceptance: the shipped score's gain at least this multiple of random's
TARGET_RATIO = 1.5
#: Seconds a training process spends before its first iteration (reading and resampling the
#: data, building the networks), for the time estimate.
TRAINING_START_SECONDS = {"hippocampus": 20.0, "la": 90.0}


# ------------------------------------------------------------------ choosing cases


def score_strategy(column: str) -> str:
    """The strategy that ranks by a ``CASE_SCORES`` column."""
    return column.replace("_", "-")


def random_strategy(seed: int) -> str:
    return f"random-{seed}"


def ranked_by(rows: Sequence[ScoreRow], column: str) -> List[str]:
    """Case names, highest ``column`` first (ties by name); rows without a value left out."""
    scored = [(getattr(r, column), r.case) for r in rows if getattr(r, column) is not None]
    return [case for _, case in sorted(scored, key=lambda item: (-item[0], item[1]))]


def random_draws(pool: Sequence[str], count: int, seeds: Sequence[int]) -> List[List[str]]:
    """One draw of ``count`` cases per seed (``numpy.random.default_rng``), each sorted, none
    equal to an earlier draw (a repeat is drawn again from the same generator)."""
    names = sorted(pool)
    draws: List[List[str]] = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        while True:
            draw = sorted(names[i] for i in rng.choice(len(names), count, replace=False))
            if draw not in draws or len(draws) >= _combinations(len(names), count):
                break
        draws.append(draw)
    return draws


def _combinations(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def diverse_cases(
    ranked: Sequence[str], features: Dict[str, Sequence[float]], count: int, near: float = 0.1
) -> List[str]:
    """``count`` cases in ``ranked`` order, skipping a case closer to one already chosen than
    the ``near`` quantile of the distances between all pairs of ranked cases (features
    standardised per dimension over them, Euclidean distance): a near-duplicate adds little
    that its twin does not. Skipped cases fill up, in order, if too few are left."""
    names = list(ranked)
    matrix = np.asarray([features[name] for name in names], dtype=float)
    spread = matrix.std(0)
    matrix = (matrix - matrix.mean(0)) / np.where(spread > 0, spread, 1.0)
    distances = np.linalg.norm(matrix[:, None] - matrix[None], axis=-1)
    pairs = distances[np.triu_indices(len(names), 1)]
    threshold = float(np.quantile(pairs, near)) if len(pairs) else 0.0
    chosen: List[int] = []
    for index in range(len(names)):
        if len(chosen) == count:
            break
        if all(distances[index, other] >= threshold for other in chosen):
            chosen.append(index)
    for index in range(len(names)):
        if len(chosen) == count:
            break
        if index not in chosen:
            chosen.append(index)
    return [names[i] for i in chosen]


def choose(
    rows: Sequence[ScoreRow],
    count: int,
    features: Optional[Dict[str, Sequence[float]]] = None,
    mc_rows: Optional[Sequence[ScoreRow]] = None,
    near: float = 0.1,
) -> Dict[str, List[str]]:
    """Every strategy's ``count`` cases from the pool predictions ``rows`` (``mc_rows``: the
    same pool predicted with Monte Carlo passes, for BALD); a score column some case lacks is
    not a strategy for this model."""
    pool = [r.case for r in rows]
    choices = {SHIPPED: ranked_by(rows, "score")[:count]}
    for seed, draw in zip(RANDOM_SEEDS, random_draws(pool, count, RANDOM_SEEDS)):
        choices[random_strategy(seed)] = draw
    for column in CASE_SCORES:
        if column == REVIEW_SCORE:
            continue  # the shipped strategy
        source = mc_rows if column == "mutual_information" else rows
        if source is None:
            continue
        ranked = ranked_by(source, column)
        if len(ranked) == len(pool):
            choices[score_strategy(column)] = ranked[:count]
    if features is not None:
        choices[DIVERSE] = diverse_cases(ranked_by(rows, "score"), features, count, near)
    return choices


# ------------------------------------------------------------------ features for diversity


def pool_features(run: Path, images: Dict[str, Path], device: str) -> Dict[str, List[float]]:
    """Per case, the deployed network's embedding (``SegmentationNetwork.embed``, blended
    over the sliding window as ``predict`` blends logits) averaged inside the predicted
    foreground and in the rest of its bounding box: how the model sees the structure and
    its surroundings."""
    import torch

    from SemiSupSegLib.backend.case_scores import foreground_region
    from SemiSupSegLib.backend.inference import Predictor
    from SemiSupSegLib.backend.volumes import read_image

    class Embedding(torch.nn.Module):
        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.network.embed(x)

    predictor = Predictor.from_run(run, device=device, companion=False)
    embedding = Embedding(predictor.network)
    features = {}
    for name, path in images.items():
        volume = predictor.prepare(name, read_image(path))
        image = torch.as_tensor(volume.image[None], device=predictor.device)
        embedded = predictor.sliding_window(image, 1, embedding)
        with torch.no_grad():  # the classifier is 1x1: it commutes with the blending
            label = predictor.network.classifier(embedded).argmax(1)[0].cpu().numpy()
        embedded = embedded[0].cpu().numpy()
        region = foreground_region([label])
        inside = label[region] > 0
        box = embedded[(slice(None),) + region]
        foreground = box[:, inside].mean(1) if inside.any() else box.reshape(len(box), -1).mean(1)
        around = box[:, ~inside].mean(1) if (~inside).any() else foreground
        features[name] = [float(v) for v in np.concatenate([foreground, around])]
    return features


# ------------------------------------------------------------------ the benchmark


def fast_retrain_iterations(base_iterations: int) -> int:
    """The iterations of the panel's Fast retrain after a run of ``base_iterations``: the
    share ``TrainingOptions`` gives a retraining round (as for a custom budget; the named
    budgets' iterations give the same)."""
    options = TrainingOptions(preset=CUSTOM_PRESET, iterations=base_iterations, warmStart=True)
    return options.forRetraining().totalIterations()


def has_dropout(run: Path) -> bool:
    """Whether the run's deployed network was built with dropout (BALD is then possible)."""
    from SemiSupSegLib.backend.checkpoint import load_checkpoint

    return float(load_checkpoint(run)["model"]["spec"].get("dropout", 0.0)) > 0


def run_folders(choices: Dict[str, List[str]]) -> Dict[str, str]:
    """The retraining folder of each strategy: ``retrain-<strategy>`` of the first strategy
    that chose the same cases (the same labeled set trains the same model)."""
    first: Dict[tuple, str] = {}
    return {s: first.setdefault(tuple(sorted(c)), f"retrain-{s}") for s, c in choices.items()}


def wanted(args, strategy: str) -> bool:
    return not args.strategies or strategy in args.strategies


def done(evaluation: Path) -> bool:
    return (evaluation / SUMMARY_FILE).exists() and (evaluation / METRICS_FILE).exists()


def estimate_seconds(args, base: dict, steps: dict) -> float:
    """Seconds the remaining ``steps`` take, from the base run's own times on this machine:
    its seconds per training iteration and per predicted case."""
    per_iteration = base["train_seconds"] / base["iterations"]
    per_case = base["predict_seconds"] / max(1, base["test_cases"])
    start = TRAINING_START_SECONDS.get(args.dataset, 60.0)
    seconds = steps.get("pool", 0) * per_case * 1.3  # the 2D model's pass, where there is one
    seconds += steps.get("pool_mc", 0) * per_case * args.mc_samples
    seconds += steps.get("features", 0) * per_case
    seconds += steps.get("retrain", 0) * (start + per_iteration * args.iterations_retrain)
    seconds += steps.get("score", 0) * per_case
    return seconds


def format_minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--data", help="the dataset's folder (default: per --dataset)")
    parser.add_argument(
        "--base",
        required=True,
        help="the benchmark key of the run to start from (e.g. la-mn-L8-s0-unet-it1500-add-val): "
        "its folder under --work and its entry in docs/benchmark-results.json",
    )
    parser.add_argument("--score", choices=["val", "test"], required=True)
    parser.add_argument("--add", type=int, default=4, help="cases corrected per strategy")
    parser.add_argument(
        "--strategies", nargs="+", help="only these strategies (default: every one available)"
    )
    parser.add_argument(
        "--mc-samples",
        type=int,
        default=8,
        help="Monte Carlo dropout passes for BALD (only for a model with dropout)",
    )
    parser.add_argument(
        "--near",
        type=float,
        default=0.1,
        help="diverse: a case nearer to a chosen one than this quantile of the pool's pairwise "
        "feature distances is skipped",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=str(ROOT / "benchmark-runs"))
    parser.add_argument(
        "--estimate-only", action="store_true", help="print the time estimate and stop"
    )
    args = parser.parse_args()
    args.data = args.data or DATASETS[args.dataset]["data"]

    base = next((r for r in load_results(RESULTS) if r["key"] == args.base), None)
    base_dir = Path(args.work) / args.base
    if base is None or not (base_dir / RUN_FOLDER).is_dir():
        raise SystemExit(
            f"{args.base}: no finished benchmark run of that key (its entry in {RESULTS} and "
            f"its folder under {args.work}); run scripts/benchmark.py first"
        )
    split = dataset_split(args.dataset, Path(args.data), hold_validation=True)
    labeled = read_case_list(base_dir / "labeled.txt")
    held_out = read_case_list(base_dir / "test.txt")
    if sorted(held_out) != sorted(split.test + split.validation):
        raise SystemExit(
            f"{args.base} was not trained under the validation protocol (its test.txt is not "
            "the test and validation cases): train it with scripts/benchmark.py --score val"
        )
    pool = [name for name in split.train if name not in set(labeled)]
    scored = split.validation if args.score == "val" else split.test
    image = {name: Path(args.data) / "imagesTr" / f"{name}.nii.gz" for name in pool}
    args.iterations_retrain = fast_retrain_iterations(base["iterations"])
    args.network, args.set = base["network"], list(base["settings"])
    args.plan = "auto" if base.get("plan") else "off"
    review = Path(args.work) / f"review-{args.base}"
    base_run = base_dir / RUN_FOLDER
    dropout = has_dropout(base_run)
    log = review / "log.txt"

    # what is left to do, for the estimate
    choices_file = review / "choices.json"
    choices = json.loads(choices_file.read_text()) if choices_file.exists() else None
    if choices is not None:
        folders = {f for s, f in run_folders(choices).items() if wanted(args, s)}
        retrain = sum(not (review / f / RUN_FOLDER / MODEL_FILE).exists() for f in folders)
        evaluations = [review / f / f"{EVALUATION_FOLDER}-{args.score}" for f in folders]
    else:  # shipped, random, expected change, diverse, and the scores the model may give
        folders = range(len(RANDOM_SEEDS) + 5 + (1 if dropout and args.mc_samples > 1 else 0))
        retrain, evaluations = len(folders), [None] * len(folders)
    evaluations.append(review / "base" / f"{EVALUATION_FOLDER}-{args.score}")
    mc = dropout and args.mc_samples > 1
    steps = {
        "pool": 0 if (review / "pool" / SCORES_FILE).exists() else len(pool),
        "pool_mc": len(pool) if mc and not (review / "pool-mc" / SCORES_FILE).exists() else 0,
        "features": 0 if (review / "features.json").exists() else len(pool),
        "retrain": retrain,
        "score": sum(e is None or not done(e) for e in evaluations) * len(scored),
    }
    print(
        f"review order on {args.dataset} from {args.base}: {len(pool)} unlabeled cases, "
        f"{args.add} added per strategy, Fast retrain {args.iterations_retrain} iterations, "
        f"scored on {len(scored)} {args.score} cases; estimated "
        f"{format_minutes(estimate_seconds(args, base, steps))} left "
        f"(from {args.base}'s own times: {base['train_seconds'] / base['iterations']:.2f} s "
        f"per iteration, {base['predict_seconds'] / max(1, base['test_cases']):.1f} s per "
        "predicted case)",
        flush=True,
    )
    if args.estimate_only:
        return
    review.mkdir(parents=True, exist_ok=True)

    # 1. the pool, predicted once (and with dropout passes for BALD)
    images = [str(image[name]) for name in pool]
    predictions = {"pool": ()}
    if dropout and args.mc_samples > 1:
        predictions["pool-mc"] = ("--mc-samples", str(args.mc_samples))
    for folder, extra in predictions.items():
        if not (review / folder / SCORES_FILE).exists():
            print(f"  predicting the {len(pool)} pool cases into {folder}/", flush=True)
            predict_pool(args, base_run, images, review / folder, log, extra)
    rows = read_table(review / "pool" / SCORES_FILE, ScoreRow)
    mc_rows = (
        read_table(review / "pool-mc" / SCORES_FILE, ScoreRow) if "pool-mc" in predictions else None
    )

    # 2. features for diversity
    features_file = review / "features.json"
    if not features_file.exists():
        print("  image features of the pool cases", flush=True)
        features = pool_features(base_run, image, args.device)
        features_file.write_text(json.dumps(features))
    features = json.loads(features_file.read_text())

    # 3. the choices, fixed once made
    if choices is None:
        choices = choose(rows, args.add, features, mc_rows, args.near)
        choices_file.write_text(json.dumps(choices, indent=1))

    # 4. the base model's Dice, then per distinct choice: retrain, score
    before = score_model(args, base_run, scored, review / "base", log)
    folders = run_folders(choices)
    for strategy, cases in choices.items():
        if not wanted(args, strategy):
            continue
        folder = folders[strategy]
        work = review / folder
        work.mkdir(exist_ok=True)
        (work / "labeled.txt").write_text("\n".join(labeled + sorted(cases)) + "\n")
        (work / "test.txt").write_text("\n".join(held_out) + "\n")
        print(f"  {strategy}: {', '.join(cases)} ({folder})", flush=True)
        trained = train_run(
            args, work, base["method"], base["seed"], args.iterations_retrain, base_run
        )
        after = score_model(args, work / RUN_FOLDER, scored, work, log)
        gain = mean_dice(after) - mean_dice(before)
        result = {
            "key": f"{args.base}-{strategy}-{args.score}",
            "dataset": args.dataset,
            "base": args.base,
            "method": base["method"],
            "labels": len(labeled),
            "added": len(cases),
            "strategy": strategy,
            "review_score": REVIEW_SCORE,
            "cases": sorted(cases),
            "run": folder,
            "scored_on": {"val": "validation", "test": "test"}[args.score],
            "test_cases": len(scored),
            "iterations": args.iterations_retrain,
            "dice_before": round(mean_dice(before), 6),
            "dice_after": round(mean_dice(after), 6),
            "gain": round(gain, 6),
            "case_dice": after["case_dice"],
            **trained,
            "threads": args.threads,
            "date": time.strftime("%Y-%m-%d"),
            "command": shlex.join(
                [sys.executable, "scripts/review_order_benchmark.py"] + sys.argv[1:]
            ),
        }
        save_result(result, REVIEW_RESULTS)
        print(
            f"    Dice {mean_dice(before):.4f} -> {mean_dice(after):.4f} ({gain:+.4f})", flush=True
        )
        write_report(load_results(RESULTS))
    write_report(load_results(RESULTS))
    print("wrote docs/benchmarks.md")


def predict_pool(args, run: Path, images: List[str], out: Path, log: Path, extra) -> None:
    from benchmark import run_command

    cli = [sys.executable, "-m", "SemiSupSegLib.backend", "predict", "--run", str(run)]
    command = cli + ["--input", *images, "--out", str(out), "--device", args.device, "--quiet"]
    status, _, _, _ = run_command(command + list(extra), log, args.threads)
    if status != 0:
        raise SystemExit(f"prediction failed ({status}); see {log}")


def score_model(args, run: Path, cases: List[str], work: Path, log: Path) -> dict:
    """The model of ``run`` scored on ``cases`` (``predictions-<score>/``,
    ``evaluation-<score>/`` in ``work``; kept once done): summary and per-case Dice."""
    predictions = work / f"{PREDICTIONS_FOLDER}-{args.score}"
    evaluation = work / f"{EVALUATION_FOLDER}-{args.score}"
    if not done(evaluation):
        score_run(args, run, cases, predictions, evaluation, log)
    return {
        "summary": json.loads((evaluation / SUMMARY_FILE).read_text()),
        "case_dice": case_dice(evaluation / METRICS_FILE),
    }


# ------------------------------------------------------------------ report


def report_lines(results: Optional[list] = None) -> list:
    """The review order's section of docs/benchmarks.md: per dataset, base run and scored
    cases, every strategy's Dice gain over the base model (random: mean and range over its
    draws) and its ratio to the mean random gain."""
    results = load_results(REVIEW_RESULTS) if results is None else results
    if not results:
        return []
    lines = [
        "## Review order: does correcting the cases the score puts first pay?",
        "",
        "From an 8-label run, the unlabeled pool is predicted once; each strategy picks cases,",
        "which get their true labels (a clinician's correction); the model is retrained as the",
        "panel's Fast retrain does (warm start, the panel's share of the iterations) and scored",
        "(`scripts/review_order_benchmark.py`, its docstring says how). Gain: mean foreground",
        "Dice after minus before, in points; × random: the gain over the mean gain of the",
        f"random draws (target for the shipped score: ≥ {TARGET_RATIO}). One training seed per",
        "strategy: the random draws' range holds both the choice's and the training's noise.",
        "",
    ]
    groups: dict = {}
    for r in results:
        groups.setdefault((r["dataset"], r["base"], r["scored_on"]), []).append(r)
    # validation first (where the score is chosen), then the test cases (scored once)
    order = sorted(groups, key=lambda k: (k[0], k[1], k[2] != "validation"))
    for (dataset, base, scored_on), group in ((key, groups[key]) for key in order):
        randoms = random_gains(group)
        mean_random = sum(randoms) / len(randoms) if randoms else None

        def ratio(gain: float, mean_random: Optional[float] = mean_random) -> str:
            if mean_random is None:
                return "n/a (no random draw yet)"
            if mean_random <= 0:
                return "n/a (random gain ≤ 0)"
            return f"{gain / mean_random:.2f}"

        first = group[0]
        lines += [
            f"### {dataset}, from `{base}` ({first['labels']} labeled, Dice "
            f"{100 * first['dice_before']:.2f}), +{first['added']} cases, "
            f"{first['iterations']} iterations, scored on {first['test_cases']} {scored_on} cases",
            "",
            "| strategy | cases | Dice after | gain | × random |",
            "|---|---|---|---|---|",
        ]
        for r in sorted(group, key=lambda r: (r["strategy"] != SHIPPED, r["strategy"])):
            name = r["strategy"] + (f" (`{r['review_score']}`)" if r["strategy"] == SHIPPED else "")
            lines.append(
                f"| {name} | {', '.join(r['cases'])} | {100 * r['dice_after']:.2f} | "
                f"{100 * r['gain']:+.2f} | {ratio(r['gain'])} |"
            )
        if randoms:
            lines.append(
                f"| random, mean of {len(randoms)} | | | {100 * mean_random:+.2f} "
                f"({100 * min(randoms):+.2f} to {100 * max(randoms):+.2f}) | "
                f"{ratio(mean_random)} |"
            )
        shipped = next((r for r in group if r["strategy"] == SHIPPED), None)
        if shipped is not None and 0 < len(randoms) < len(RANDOM_SEEDS):
            lines += [
                "",
                f"No verdict yet: {len(randoms)} of {len(RANDOM_SEEDS)} random draws scored.",
            ]
        elif shipped is not None and mean_random is not None:
            meets = meets_target(shipped["gain"], randoms)
            value = (
                f"ratio {ratio(shipped['gain'])}" if mean_random > 0
                else "random choice loses Dice on average, no ratio"
            )  # fmt: skip
            lines += [
                "",
                f"Shipped score (`{shipped['review_score']}`): gain {100 * shipped['gain']:+.2f} "
                f"against {100 * mean_random:+.2f} for random, {value}: "
                f"{'meets' if meets else 'does not meet'} the target of {TARGET_RATIO}.",
            ]
        lines.append("")
    commands = sorted({r["command"].replace(sys.executable, "python") for r in results})
    return lines + choice_lines(groups) + ["Reproduce:", "", "```", *commands, "```", ""]


def random_gains(group: Sequence[dict]) -> List[float]:
    """The Dice gains of a group's random draws."""
    return [r["gain"] for r in group if r["strategy"].startswith("random-")]


def meets_target(gain: float, randoms: Sequence[float]) -> bool:
    """At least ``TARGET_RATIO`` times the mean random gain; where random choice loses Dice on
    average (no ratio to give), a gain at all and at least the best random draw's."""
    mean_random = sum(randoms) / len(randoms)
    if mean_random > 0:
        return gain >= TARGET_RATIO * mean_random
    return gain > 0 and gain >= max(randoms)


def choice_lines(groups: dict) -> list:
    """Every score against random on every dataset's validation cases, where the choice is
    made (the test cases are scored once and never change it): the score to ship meets the
    target (``meets_target``) on all of them."""
    validation = {k: g for k, g in groups.items() if k[2] == "validation"}
    draws = {}
    for key, group in validation.items():
        randoms = random_gains(group)
        if len(randoms) == len(RANDOM_SEEDS):
            draws[key] = randoms
    if len(draws) < 2:
        return []
    keys = sorted(draws)
    means = {key: sum(draws[key]) / len(draws[key]) for key in keys}
    left_out = sorted(f"{k[0]} from `{k[1]}`" for k in validation if k not in draws)
    scores = sorted({r["review_score"] for k in keys for r in validation[k]})
    by_score: dict = {}
    for key in keys:
        for r in validation[key]:
            name = f"{r['review_score']} (shipped)" if r["strategy"] == SHIPPED else r["strategy"]
            if not r["strategy"].startswith("random-"):
                by_score.setdefault(name, {})[key] = r["gain"]
    lines = [
        "### Which score to ship (validation cases)",
        "",
        "| score | "
        + " | ".join(f"{k[0]} from `{k[1]}` (random {100 * means[k]:+.2f})" for k in keys)
        + " |",
        "|---|" + "---|" * len(keys),
    ]
    winners = []
    for name, gains in sorted(by_score.items()):
        meets = {k: meets_target(gains[k], draws[k]) for k in keys if k in gains}
        cells = [
            f"{100 * gains[k]:+.2f} {'meets' if meets[k] else 'no'}" if k in gains else ""
            for k in keys
        ]
        if len(meets) == len(keys) and all(meets.values()):
            winners.append(name)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    shipped = scores[0] if len(scores) == 1 else ", ".join(scores)
    verdict = (
        f"Meets the target on every dataset: {', '.join(winners)}."
        if winners
        else "No score meets the target on every dataset, so the panel names its sort "
        f"(`{shipped}`) without promising an order."
    )
    if left_out:
        verdict += (
            f" Left out (fewer than {len(RANDOM_SEEDS)} random draws): {', '.join(left_out)}."
        )
    return lines + ["", verdict, ""]


if __name__ == "__main__":
    main()
