"""The review-order benchmark's choices: each strategy picks the cases its score ranks first,
random draws are fixed by their seed and never repeat, diversity skips a near-duplicate, the
retraining is the panel's Fast retrain, and the report's ratio against random."""

from __future__ import annotations

import numpy as np
import pytest

from backend_helpers import load_script
from SemiSupSegLib.output_layout import REVIEW_SCORE, ScoreRow
from SemiSupSegLib.training_options import TrainingOptions


@pytest.fixture(scope="module")
def review():
    return load_script("review_order_benchmark")


def row(case: str, score: float, **scores) -> ScoreRow:
    return ScoreRow(case, score, 10, f"{case}.nii.gz", f"u/{case}.nii.gz", f"/d/{case}.nii.gz", **scores)  # fmt: skip


def pool_rows() -> list:
    """Eight cases whose scores rank them differently: shipped order h, g, f, e, ...;
    disagreement a, b, c, d, ...; expected change d, c, b, a, ..."""
    rows = []
    for index, case in enumerate("abcdefgh"):
        rows.append(
            row(
                case,
                score=0.1 * index,
                boundary_uncertainty=0.1 * index,
                disagreement=1.0 - 0.1 * index,
                expected_changed_share=[0.5, 0.6, 0.7, 0.8, 0.1, 0.2, 0.3, 0.0][index],
            )
        )
    return rows


def test_each_strategy_picks_the_cases_its_score_ranks_first(review):
    choices = review.choose(pool_rows(), 4)
    assert choices["shipped"] == ["h", "g", "f", "e"]
    assert choices["disagreement"] == ["a", "b", "c", "d"]
    assert choices["expected-changed-share"] == ["d", "c", "b", "a"]
    assert REVIEW_SCORE not in {c.replace("-", "_") for c in choices}  # shipped is that one
    assert "mutual-information" not in choices  # no dropout passes: no BALD
    assert "diverse" not in choices  # no features: no diversity


def test_a_score_some_case_lacks_is_not_a_strategy(review):
    rows = pool_rows()
    rows[3] = row("d", 0.3, boundary_uncertainty=0.3, expected_changed_share=0.8)
    assert "disagreement" not in review.choose(rows, 4)


def test_bald_ranks_by_the_monte_carlo_predictions(review):
    mc = [row(r.case, r.score, mutual_information=float(i % 3)) for i, r in enumerate(pool_rows())]
    choices = review.choose(pool_rows(), 2, mc_rows=mc)
    assert choices["mutual-information"] == ["c", "f"]  # 2.0 twice, then by name


def test_random_draws_are_fixed_by_seed_and_distinct(review):
    pool = [f"c{i:02d}" for i in range(5)]
    draws = review.random_draws(pool, 4, (0, 1, 2))
    assert draws == review.random_draws(list(reversed(pool)), 4, (0, 1, 2))
    assert len({tuple(d) for d in draws}) == 3
    # seeds 1 and 2 draw the same four of these five at first: the second is drawn again
    first = [
        sorted(pool[i] for i in np.random.default_rng(s).choice(5, 4, replace=False))
        for s in (1, 2)
    ]
    assert first[0] == first[1] and draws[1] == first[0] and draws[2] != first[1]
    assert all(len(set(d)) == 4 and set(d) <= set(pool) for d in draws)
    choices = review.choose(pool_rows(), 4)
    assert [choices[f"random-{s}"] for s in (0, 1, 2)] == review.random_draws("abcdefgh", 4, (0, 1, 2))  # fmt: skip


def test_diversity_skips_a_near_duplicate(review):
    # cases 1.1 to 1.9 apart on a line, g on h: a near-duplicate
    line = dict(zip("abcdefgh", (0.0, 1.3, 2.9, 4.0, 5.6, 7.1, 9.001, 9.0)))
    features = {case: [x, 0.0] for case, x in line.items()}
    ranked = ["h", "g", "f", "e", "d", "c", "b", "a"]
    assert review.diverse_cases(ranked, features, 4) == ["h", "f", "e", "d"]
    features["g"] = [20.0, 0.0]  # g unlike the others: taken in its turn; now e, 1.5 from f,
    # is nearer than the tenth of the pairs (1.1, 1.3, 1.5, 1.6, ...: 1.57) and gives way
    assert review.diverse_cases(ranked, features, 4) == ["h", "g", "f", "d"]
    # too few cases apart from each other: the skipped ones fill up, in order
    twins = {case: [0.0, 0.0] for case in "abc"}
    assert review.diverse_cases(["a", "b", "c"], twins, 2) == ["a", "b"]
    features["g"] = [9.001, 0.0]
    assert review.choose(pool_rows(), 4, features=features)["diverse"] == ["h", "f", "e", "d"]


def test_retraining_is_the_panels_fast_retrain(review):
    panel = TrainingOptions(preset="standard").validate().forRetraining().totalIterations()
    assert review.fast_retrain_iterations(1500) == panel == 300
    assert review.fast_retrain_iterations(500) == 100


def test_the_same_cases_share_one_retraining(review):
    folders = review.run_folders({"shipped": ["a", "b"], "x": ["b", "a"], "random-0": ["c", "d"]})
    assert folders == {"shipped": "retrain-shipped", "x": "retrain-shipped", "random-0": "retrain-random-0"}  # fmt: skip


def result(strategy: str, gain: float) -> dict:
    return {
        "dataset": "la",
        "base": "la-mn-L8-s0-unet-it1500-val",
        "scored_on": "validation",
        "strategy": strategy,
        "review_score": REVIEW_SCORE,
        "cases": ["a", "b", "c", "d"],
        "labels": 8,
        "added": 4,
        "iterations": 300,
        "test_cases": 10,
        "dice_before": 0.80,
        "dice_after": 0.80 + gain,
        "gain": gain,
        "command": "/venv/python scripts/review_order_benchmark.py --dataset la",
    }


def test_the_report_compares_each_gain_with_the_mean_random_gain(review):
    results = [result("shipped", 0.03), result("disagreement", 0.01)]
    results += [result(f"random-{s}", g) for s, g in enumerate((0.01, 0.02, 0.03))]
    text = "\n".join(review.report_lines(results))
    assert "| shipped (`boundary_uncertainty`) | a, b, c, d | 83.00 | +3.00 | 1.50 |" in text
    assert "| disagreement | a, b, c, d | 81.00 | +1.00 | 0.50 |" in text
    assert "| random, mean of 3 | | | +2.00 (+1.00 to +3.00) | 1.00 |" in text
    assert "ratio 1.50: meets the target of 1.5" in text
    results[0] = result("shipped", 0.025)
    assert "ratio 1.25: does not meet" in "\n".join(review.report_lines(results))
    losing = [result("shipped", 0.01)] + [result(f"random-{s}", -0.01) for s in range(3)]
    text = "\n".join(review.report_lines(losing))
    assert "random choice loses Dice on average, no ratio: meets the target" in text
    losing[1] = result("random-0", 0.02)  # a losing mean, but one draw gained more
    assert "does not meet" in "\n".join(review.report_lines(losing))
    losing[0] = result("shipped", -0.005)  # above 1.5 x the random mean, but a loss
    assert "does not meet" in "\n".join(review.report_lines(losing))
    assert "| random, mean of 3 | | | -1.00 (-1.00 to -1.00) | n/a (random gain ≤ 0) |" in text
    partial = "\n".join(review.report_lines(results[:3]))  # shipped, disagreement, 1 draw
    assert "No verdict yet: 1 of 3 random draws scored." in partial
    assert "meet" not in partial


def test_the_score_to_ship_must_meet_the_target_on_every_datasets_validation_cases(review):
    def on(dataset: str, strategy: str, gain: float, scored_on: str = "validation") -> dict:
        return dict(result(strategy, gain), dataset=dataset, scored_on=scored_on)

    results = [on("la", "shipped", 0.01), on("la", "disagreement", 0.002)]
    results += [on("la", f"random-{s}", g) for s, g in enumerate((0.001, -0.002, -0.002))]
    results += [on("hippo", "shipped", 0.005), on("hippo", "disagreement", 0.01)]
    results += [on("hippo", f"random-{s}", g) for s, g in enumerate((0.002, 0.004, 0.006))]
    results += [on("hippo", "disagreement", -0.05, "test")]  # never changes the choice
    text = "\n".join(review.report_lines(results))
    base = "`la-mn-L8-s0-unet-it1500-val`"
    assert f"| score | hippo from {base} (random +0.40) | la from {base} (random -0.10) |" in text
    assert "| boundary_uncertainty (shipped) | +0.50 no | +1.00 meets |" in text
    assert "| disagreement | +1.00 meets | +0.20 meets |" in text
    assert "Meets the target on every dataset: disagreement." in text
    text = "\n".join(review.report_lines([r for r in results if r["strategy"] != "disagreement"]))
    assert "No score meets the target on every dataset" in text
    one_dataset = [r for r in results if r["dataset"] == "la"]
    assert "Which score to ship" not in "\n".join(review.report_lines(one_dataset))
