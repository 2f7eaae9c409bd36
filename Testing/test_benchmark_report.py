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


def test_a_warm_start_is_compared_with_runs_from_scratch_of_its_method_settings(benchmark):
    def scratch(key: str, settings: list, dataset: str = "hippocampus", **extra) -> dict:
        return {**run("mn", 0, 0.8), "key": key, "settings": settings, "dataset": dataset, **extra}

    replace = ["method.unlabeled_mode=replace"]
    warm = scratch("warm", replace + ["new_case_share=0"], init_from="base", labels=12)
    candidates = [
        scratch("same", replace, labels=12),
        scratch("default", [], labels=12),  # another mn configuration
        scratch("tuned", replace + ["learning_rate=0.001"], labels=12),  # not from defaults
        scratch("other-data", replace, dataset="la", labels=12),
        scratch("validation", replace, labels=12, scored_on="validation"),
        scratch("eight", replace),
        scratch("warm-too", replace, init_from="base", labels=12),
    ]
    assert [s["key"] for s in benchmark.from_scratch_runs(candidates, warm)] == ["same"]


def test_peer_scores_are_stored_in_mm_and_reported_beside_our_runs_at_the_same_budget():
    peer = load_script("peer_benchmark")
    result = {
        "name": "uamt-L8",
        "meta": {"iterations": "1500", "train_patch_size": [64, 64, 48], "extra_train_args": ""},
        "per_case": [
            {"id": "a", "dice": 0.9, "jaccard": 0.8, "hd95": 8.0, "asd": 2.0},
            {"id": "b", "dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0},  # empty
        ],
        "train_time": {"cpu_s": 7200},
        "test_time": {"cpu_s": 1800},
    }
    result["per_case"].append({"id": "c", "dice": 0.0, "jaccard": 0.0, "hd95": 4.0, "asd": 2.0})
    row = peer.peer_row(result, "UA-MT (peer code)", "ua-mt", 8, 1337, "./run.sh 1500 64 64 48 x")
    result.update(labels=8, script="uamt")  # what uamt_peer.py test writes: checked against
    with pytest.raises(ValueError, match="labels 8, not 16"):
        peer.peer_row(result, "UA-MT (peer code)", "ua-mt", 16, 1337, "x")
    with pytest.raises(ValueError, match="script 'uamt', not 'supervised'"):
        peer.peer_row(result, "V-Net (peer code)", "supervised", 8, 1337, "x")
    assert row["dice"] == pytest.approx(30.0)
    # The empty prediction (all four 0) is counted and left out of HD95 and ASD; a prediction
    # that misses (Dice 0, distances measured) is not empty.
    assert row["empty_predictions"] == 1 and row["hd95_mm"] == pytest.approx(0.625 * 6)
    assert row["asd_mm"] == pytest.approx(0.625 * 2)
    assert (row["labels"], row["iterations"], row["train_cpu_hours"]) == (8, 1500, 2.0)

    def ours(seed: int, dice: float, iterations: int = 1500) -> dict:
        metrics = {"dice": {"mean": dice}, "iou": {"mean": 0.8}}
        metrics.update({"hd95_mm": {"mean": 5.0}, "asd_mm": {"mean": 1.0}})
        return {**run("supervised", seed, dice), "iterations": iterations, "dataset": "la",
                "scored_on": "test", "summary": {"classes": {"1": metrics}},
                "train_cpu_seconds": 1800, "plan": {"patch_size": [56, 40, 24], "target_spacing": [1.25] * 3}}  # fmt: skip

    warm = {**ours(2, 0.95), "init_from": "supervised-L4"}
    lines = peer.report_lines([row], [ours(0, 0.88), ours(1, 0.90), ours(0, 0.5, 6000), warm])
    table = [line for line in lines if line.startswith("| ")]
    assert table[1].startswith(
        "| UA-MT (peer code) | ua-mt | 8 | 1500 | 1337 | 64x64x48, 0.625 | 30.00 (1 empty)"
    )
    assert table[2].startswith(
        "| SemiSupSeg | supervised | 8 | 1500 | 0, 1 | 56x40x24, 1.25x1.25x1.25 | 89.00 (88.00-90.00)"
    )
    assert len(table) == 3  # the 6000-iteration run is another budget, the warm start not ours
    assert peer.report_lines([], []) == []


def test_peer_changes_are_only_the_allowed_ones_and_a_changed_peer_stops_the_preparation():
    peer = load_script("peer/uamt_peer")
    script = (
        "parser.add_argument('--gpu', type=str,  default='0', help='GPU to use')\n"
        "args = parser.parse_args()\n"
        "patch_size = (112, 112, 80)\n"
        "net = VNet().cuda()\n"
        "loader = DataLoader(db, num_workers=4, pin_memory=True)\n"
        "labeled_idxs = list(range(16))\n"
        "unlabeled_idxs = list(range(16, 80))\n"
        "ema.mul_(alpha).add_(1 - alpha, param.data)\n"  # deprecated, still taken: unchanged
        "preds = torch.zeros([stride * T, 2, 112, 112, 80]).cuda()\n"
    )
    changed = peer.allowed_changes("train_LA_meanteacher_certainty.py", script)
    assert ".cuda()" not in changed and "torch.zeros([stride * T, 2, *patch_size])" in changed
    assert "num_workers=0, pin_memory=False" in changed
    assert "patch_size = tuple(args.patch_size)" in changed
    assert "list(range(args.labeled_num, len(db_train)))" in changed
    assert "add_(1 - alpha, param.data)" in changed  # not a change the benchmark allows
    assert "--labeled_num" in changed.split("args = parser.parse_args()")[0]
    with pytest.raises(SystemExit, match="range"):
        peer.allowed_changes(
            "train_LA_meanteacher_certainty.py", script.replace("range(16)", "range(20)")
        )
