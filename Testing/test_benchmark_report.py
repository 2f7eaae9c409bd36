"""The benchmark report's recommendation: a semi-supervised method only when it beats
supervised training on the validation cases over enough seeds, else supervised, said plainly."""

from __future__ import annotations

import pytest

from backend_helpers import load_script


@pytest.fixture(scope="module")
def benchmark():
    return load_script("benchmark")


def run(method: str, seed: int, dice: float, variant: str = "") -> dict:
    return {
        "method": method,
        "variant": variant,
        "seed": seed,
        "labels": 8,
        "iterations": 1500,
        "network": "unet",
        "summary": {"classes": {"1": {"dice": {"mean": dice}}}},
    }


def recommendation(benchmark, results: list) -> str:
    lines = [line for line in benchmark.recommendation_lines(results) if line]
    assert len(lines) == 1
    return lines[0]


def test_a_method_that_wins_in_most_seeds_is_recommended(benchmark):
    results = [run("supervised", s, 0.80) for s in range(3)]
    results += [run("mn", s, d) for s, d in enumerate((0.82, 0.81, 0.79))]
    text = recommendation(benchmark, results)
    assert "**mn**" in text and "+0.67 Dice points over 3 seeds, higher in 2" in text
    assert "not significant" in text  # one seed of three lower: p well above 0.05


def test_supervised_is_recommended_when_no_method_beats_it(benchmark):
    results = [run("supervised", s, 0.80) for s in range(3)]
    # Higher on average, but only in one seed of three: not a win.
    results += [run("mn", s, d) for s, d in enumerate((0.86, 0.79, 0.79))]
    text = recommendation(benchmark, results)
    assert "**supervised**" in text and "(mn)" in text


def test_one_seed_screens_are_reported_but_never_decide(benchmark):
    results = [run("supervised", s, 0.80) for s in range(3)]
    results += [run("mn", 0, 0.90, variant="add")]
    text = recommendation(benchmark, results)
    assert "not decided" in text and "mn [add] (1 seed)" in text
    results += [run("mn", s, 0.79) for s in range(3)]
    text = recommendation(benchmark, results)
    assert "**supervised**" in text and "mn [add] (1 seed)" in text
