#!/usr/bin/env python3
"""Training and prediction cost against their floors, and memory against the data set's size
(issue #6), on real MSD Hippocampus cases.

1. overhead: per method, the seconds per iteration of the real training loop (``train``: patch
   streaming, events, checkpoints) against the floor, the same method's ``train_step`` on the
   same pre-loaded batches in isolation; the step is split into its networks' passes (forward,
   backward and optimiser step) and the rest of the method, and a cProfile of the loop shows
   where the remaining time goes.
2. memory: peak resident memory (``os.wait4``) of a training run (``semisupseg train``) with 160
   and with 1600 unlabeled volumes (the training images listed repeatedly under distinct
   names), and what the volume cache holds.
3. prediction: seconds per volume of ``predict_cases`` (read, preprocess, sliding window,
   resample back, write) against the network's sliding-window inference alone on the same
   preprocessed tensors, for 1 and 5 Monte Carlo dropout passes.

Every ratio is measured within one run of this script (the machine is shared and noisy), with
one CPU thread. Results go to ``docs/performance-results.json`` and ``docs/performance.md``.

    .venv/bin/python scripts/performance.py
    .venv/bin/python scripts/performance.py --items overhead --methods supervised em
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSupSeg"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

from SemiSupSegLib.backend import training  # noqa: E402
from SemiSupSegLib.backend.config import TrainConfig  # noqa: E402
from SemiSupSegLib.backend.data import BatchSource, PatchStream, load_case  # noqa: E402
from SemiSupSegLib.backend.datasets import Case, Dataset, load_dataset  # noqa: E402
from SemiSupSegLib.backend.inference import Predictor, predict_cases  # noqa: E402
from SemiSupSegLib.backend.methods import Method, create_method  # noqa: E402
from SemiSupSegLib.backend.splits import benchmark_split  # noqa: E402
from SemiSupSegLib.backend.training_callbacks import TrainingCallback  # noqa: E402
from SemiSupSegLib.backend.volumes import read_image  # noqa: E402
from SemiSupSegLib.method_catalogue import method_names  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "msd-hippocampus"
RESULTS = ROOT / "docs" / "performance-results.json"
REPORT = ROOT / "docs" / "performance.md"
ITEMS = ["overhead", "memory", "prediction"]
TARGETS = {"overhead": 1.25, "memory": 1.10, "prediction": 1.30}
LABELED = 8


# ----------------------------------------------------------------------------- instruments


class Probe:
    """Times one method from the outside: the start of every iteration (``iteration_started``,
    called by the loop's hook), every ``train_step``, and within the steps the time spent in
    the networks' forward passes (hooks on every network the method checkpoints, outermost
    call only) and in ``optimise`` (backward, gradient clipping, optimiser step).

    With ``profile``, that profiler runs from the start of iteration ``window[0]`` to the end
    of the step of iteration ``window[1] - 1``.
    """

    def __init__(
        self,
        method: Method,
        profile: Optional[cProfile.Profile] = None,
        window: tuple = (0, 0),
    ) -> None:
        self.profile, self.window = profile, window
        self.starts: List[float] = []
        self.cpu_starts: List[tuple] = []  # (this thread's, the process's) CPU seconds
        self.step_cpu: List[float] = []
        self.steps: List[float] = []
        self.network: List[float] = []
        self.step_end = 0.0
        self._network_total = 0.0
        self._depth = 0
        self._entered = 0.0
        self._wrap(method)

    def _wrap(self, method: Method) -> None:
        step, optimise = method.train_step, method.optimise

        def train_step(labeled: Any, unlabeled: Any, iteration: int) -> Any:
            before = self._network_total
            started, cpu = time.perf_counter(), time.thread_time()
            result = step(labeled, unlabeled, iteration)
            self.step_end = time.perf_counter()
            self.steps.append(self.step_end - started)
            self.step_cpu.append(time.thread_time() - cpu)
            self.network.append(self._network_total - before)
            if self.profile is not None and iteration == self.window[1] - 1:
                self.profile.disable()
            return result

        def timed_optimise(*args: Any, **kwargs: Any) -> Any:
            self._enter()
            try:
                return optimise(*args, **kwargs)
            finally:
                self._leave()

        method.train_step = train_step
        method.optimise = timed_optimise
        for part in method.stateful().values():
            if isinstance(part, torch.nn.Module):
                for module in [part, *part.children()]:
                    module.register_forward_pre_hook(lambda *_: self._enter())
                    module.register_forward_hook(lambda *_: self._leave())

    def iteration_started(self, iteration: int) -> None:
        """Record the start of iteration ``iteration`` (and start the profiler at its window)."""
        if self.profile is not None and iteration == self.window[0]:
            self.profile.enable()
        self.starts.append(time.perf_counter())
        self.cpu_starts.append((time.thread_time(), time.process_time()))

    def _enter(self) -> None:
        if self._depth == 0:
            self._entered = time.perf_counter()
        self._depth += 1

    def _leave(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._network_total += time.perf_counter() - self._entered


class LoopTimer(TrainingCallback):
    """Times ``training.train`` through its hooks: a Probe (``probe``: its profile arguments)
    on the method it trains, and how long each iteration waits for its patches (from the
    iteration's start to its batch being drawn)."""

    def __init__(self, **probe: Any) -> None:
        self.probe_arguments = probe
        self.probe: Optional[Probe] = None
        self.waits: List[float] = []
        self._drawing = 0.0

    def on_start(self, method: Method, start: int, total: int) -> None:
        self.probe = Probe(method, **self.probe_arguments)

    def on_iteration_start(self, iteration: int) -> None:
        self.probe.iteration_started(iteration)
        self._drawing = time.perf_counter()

    def on_batch_ready(self, iteration: int) -> None:
        self.waits.append(time.perf_counter() - self._drawing)


def mean(values: List[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def top_entries(profile: cProfile.Profile, count: int, per: int) -> List[Dict[str, Any]]:
    """The ``count`` functions with the most own time, per iteration (``per`` iterations)."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        rows.append(
            {
                "function": _function_name(path, line, name),
                "calls_per_iteration": round(calls / per, 1),
                "own_ms_per_iteration": round(1000 * own / per, 2),
                "cumulative_ms_per_iteration": round(1000 * cumulative / per, 2),
            }
        )
    rows.sort(key=lambda r: -r["own_ms_per_iteration"])
    return rows[:count]


def cumulative_seconds(profile: cProfile.Profile, suffix: str, name: str) -> float:
    """Cumulative seconds of the function ``name`` defined in a file ending in ``suffix``."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    return sum(
        entry[3]
        for (path, _, function), entry in stats.stats.items()
        if function == name and path.replace("\\", "/").endswith(suffix)
    )


def _function_name(path: str, line: int, name: str) -> str:
    if path == "~":
        return name
    path = path.replace("\\", "/")
    for marker in ("site-packages/", "SemiSupSeg/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line}({name})"


# ----------------------------------------------------------------------------- data


def hippocampus(data: Path) -> tuple:
    """(labeled cases, unlabeled cases, test cases, classes) of the benchmark split: the
    first 8 training cases labeled, the other 152 training images unlabeled."""
    full = load_dataset(data)
    split = benchmark_split([c.name for c in full.labeled])
    by_name = {c.name: c for c in full.labeled}
    train_cases = [by_name[n] for n in split.train]
    test = [by_name[n] for n in split.test]
    unlabeled = [Case(c.name, c.image) for c in train_cases[LABELED:]]
    return train_cases[:LABELED], unlabeled, test, full.classes


# ----------------------------------------------------------------------------- 1. overhead


def measure_overhead(method_name: str, data: tuple, args: argparse.Namespace, work: Path) -> dict:
    """Loop against floor for one method, on the same iterations and the same batches. The
    floor is measured before and after the loop and averaged, against drifting load."""
    labeled, unlabeled, _, classes = data
    measured = range(args.warmup, args.warmup + args.iterations)
    total = args.warmup + args.iterations + 1  # the start of iteration W+N closes the window
    config = TrainConfig.from_dict(
        {"method": method_name, "iterations": total, "device": "cpu", "seed": 0}
    ).validate()
    num_classes = max(classes) + 1
    dataset = Dataset(labeled, unlabeled, classes, "MR")

    # The batches the loop draws: the same streams (seeds) and composition per iteration.
    set_determinism(seed=config.seed)
    method = create_method(config, num_classes, torch.device("cpu"))
    source = BatchSource(
        labeled,
        unlabeled if method.uses_unlabeled else [],
        config.with_setting("prefetch", 0),
        seed=config.seed * 1000,
    )
    batches, compositions = [], set()
    for iteration in range(total - 1):
        n_labeled, n_unlabeled = method.batch_composition(iteration)
        compositions.add((n_labeled, n_unlabeled))
        batches.append(
            (source.labeled(n_labeled), source.unlabeled(n_unlabeled) if n_unlabeled else None)
        )
    del method, source

    def floor_run() -> dict:
        """A fresh method (same seed, same initial weights) steps through the pre-loaded
        batches with nothing in between; per-iteration means over the measured window."""
        set_determinism(seed=config.seed)
        method = create_method(config, num_classes, torch.device("cpu"))
        probe = Probe(method)
        for iteration, (batch_l, batch_u) in enumerate(batches):
            method.train_step(batch_l, batch_u, iteration)
        return {
            "step": mean([probe.steps[i] for i in measured]),
            "network": mean([probe.network[i] for i in measured]),
            "cpu": mean([probe.step_cpu[i] for i in measured]),
        }

    def loop(prefetch: int) -> dict:
        run_config = config.with_setting("prefetch", prefetch)
        timer = LoopTimer()
        started = time.perf_counter()
        training.train(
            dataset, run_config, work / f"{method_name}-loop-{prefetch}", callbacks=[timer]
        )
        ended = time.perf_counter()
        probe = timer.probe
        first, last = measured.start, measured.stop
        per_iteration = (probe.starts[last] - probe.starts[first]) / len(measured)
        main_cpu, all_cpu = (
            (probe.cpu_starts[last][k] - probe.cpu_starts[first][k]) / len(measured) for k in (0, 1)
        )
        # The final save writes checkpoint.pt and model.pt; a run saves checkpoint.pt every
        # checkpoint_every iterations, so its cost per iteration is at most this share.
        save = ended - probe.step_end
        checkpoint = save / run_config.checkpoint_every
        step = mean([probe.steps[i] for i in measured])
        wait = mean([timer.waits[i] for i in measured])
        return {
            "prefetch": prefetch,
            "seconds_per_iteration": per_iteration + checkpoint,
            "step": step,
            "data_wait": wait,
            "other": per_iteration - step - wait,
            "checkpoint": checkpoint,
            "main_thread_cpu": main_cpu,
            "process_cpu": all_cpu,
            "final_save_seconds": save,
            "total_seconds": ended - started,
        }

    def averaged(runs: List[dict]) -> dict:
        return {key: mean([r[key] for r in runs]) for key in runs[0]}

    # Floor, loop, floor; with a prefetch comparison floor, on, off, floor, off, on, floor:
    # every average then has its measurements placed symmetrically in time.
    floors, on, off = [floor_run()], [loop(config.prefetch)], []
    if method_name in args.compare_prefetch:
        off.append(loop(0))
        floors.append(floor_run())
        off.append(loop(0))
        on.append(loop(config.prefetch))
    floors.append(floor_run())
    floor = averaged(floors)
    result = {
        "method": method_name,
        "iterations": len(measured),
        "warmup": args.warmup,
        "batches": sorted(list(c) for c in compositions),
        "floor": floor["step"],
        "floor_runs": [f["step"] for f in floors],
        "floor_network": floor["network"],
        "floor_method": floor["step"] - floor["network"],
        "floor_cpu": floor["cpu"],
        "loop": averaged(on),
        "loop_runs": [r["seconds_per_iteration"] for r in on],
    }
    result["ratio"] = result["loop"]["seconds_per_iteration"] / floor["step"]
    result["ratio_network"] = result["loop"]["seconds_per_iteration"] / floor["network"]
    result["cpu_ratio_main"] = result["loop"]["main_thread_cpu"] / floor["cpu"]
    result["cpu_ratio_process"] = result["loop"]["process_cpu"] / floor["cpu"]
    if off:
        result["loop_without_prefetch"] = averaged(off)
        result["ratio_without_prefetch"] = (
            result["loop_without_prefetch"]["seconds_per_iteration"] / floor["step"]
        )
        result["cpu_ratio_main_without_prefetch"] = (
            result["loop_without_prefetch"]["main_thread_cpu"] / floor["cpu"]
        )
    if args.profile_iterations > 0:
        window = (2, 2 + args.profile_iterations)
        profile = cProfile.Profile()
        training.train(
            dataset,
            config.with_setting("iterations", window[1]),
            work / f"{method_name}-profile",
            callbacks=[LoopTimer(profile=profile, window=window)],
        )
        result["profile"] = top_entries(profile, args.profile_top, args.profile_iterations)
        result["profile_iterations"] = args.profile_iterations
    return result


# ----------------------------------------------------------------------------- 2. memory


# The CLI, writing at exit the peak resident memory of its own address space (VmHWM, kB) to
# the file named by its first argument. ``ru_maxrss`` from ``wait4`` would not do from this
# script: Linux carries the peak of the address space a child replaces at exec into it, and
# the child of a fork starts as a copy of this large process.
PEAK_REPORTING_CLI = """
import atexit, sys
def report(path=sys.argv[1]):
    try:
        with open('/proc/self/status') as status:
            peak = [line.split()[1] for line in status if line.startswith('VmHWM:')]
    except OSError:
        return
    with open(path, 'w') as out:
        out.write(peak[0] if peak else '')
atexit.register(report)
from SemiSupSegLib.backend.cli import main
sys.exit(main(sys.argv[2:]))
"""


def measure_memory(data: tuple, args: argparse.Namespace, work: Path) -> dict:
    """Peak RSS of ``semisupseg train`` with 160 and 1600 unlabeled volumes (symlinks)."""
    labeled, unlabeled, _, _ = data
    folder = work / "memory-data"
    for sub, files in (
        ("images", [c.image for c in labeled]),
        ("labels", [c.label for c in labeled]),
    ):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for path in files:
            (folder / sub / path.name).symlink_to(Path(path).resolve())
    pool = [Path(c.image).resolve() for c in unlabeled]
    runs = []
    for count in args.unlabeled_counts:
        target = folder / f"unlabeled-{count}"
        target.mkdir()
        for i in range(count):
            (target / f"u{i:04d}-{pool[i % len(pool)].name}").symlink_to(pool[i % len(pool)])
        out = work / f"memory-run-{count}"
        peak_file = work / f"memory-peak-{count}.txt"
        command = [
            sys.executable, "-c", PEAK_REPORTING_CLI, str(peak_file), "train",
            "--images", str(folder / "images"), "--labels", str(folder / "labels"),
            "--unlabeled", str(target), "--method", args.memory_method,
            "--iterations", str(args.memory_iterations), "--device", "cpu", "--seed", "0",
            "--out", str(out), "--events", str(work / f"memory-events-{count}.jsonl"), "--quiet",
        ]  # fmt: skip
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            PYTHONPATH=str(ROOT / "SemiSupSeg"),
        )
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"training with {count} unlabeled volumes failed: {command}")
        own_peak = peak_file.read_text().strip() if peak_file.exists() else ""
        runs.append(
            {
                "unlabeled": count,
                "peak_rss_mib": int(own_peak) / 1024 if own_peak else usage.ru_maxrss / 1024,
                "peak_from": "VmHWM" if own_peak else "ru_maxrss",
                "ru_maxrss_mib": usage.ru_maxrss / 1024,
                "seconds": time.perf_counter() - started,
            }
        )
    ratio = runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]

    # What the cache holds: the same unlabeled stream drawn in this process, as many patches
    # as the runs drew, with each of the two lists.
    config = TrainConfig.from_dict({"method": args.memory_method, "device": "cpu"})
    volumes = [load_case(c, config) for c in unlabeled[:20]]
    cached = mean([v.nbytes for v in volumes])
    full = mean([v.nbytes + _image_bytes(v.original) + _image_bytes(v.working) for v in volumes])
    draws = args.memory_iterations * max(1, config.batch_size // 2)
    caches = []
    for count in args.unlabeled_counts:
        cases = [Case(f"u{i:04d}", pool[i % len(pool)]) for i in range(count)]
        stream = PatchStream(cases, config.with_setting("prefetch", 0), False, seed=1)
        iterator = iter(stream)
        for _ in range(draws):
            next(iterator)
        caches.append(
            {
                "unlabeled": count,
                "patches_drawn": draws,
                "volumes_cached": len(stream.cache),
                "cache_mib": stream.cache.nbytes / 2**20,
                "hit_rate": stream.cache.hits / draws,
            }
        )
    return {
        "method": args.memory_method,
        "iterations": args.memory_iterations,
        "runs": runs,
        "ratio": ratio,
        "cache_volumes": config.cache_volumes,
        "prefetch": config.prefetch,
        "mib_per_cached_volume": cached / 2**20,
        "mib_per_volume_with_images": full / 2**20,
        "caches": caches,
    }


def _image_bytes(image: Any) -> int:
    return image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()  # fmt: skip


# ----------------------------------------------------------------------------- 3. prediction


def measure_prediction(data: tuple, args: argparse.Namespace, work: Path) -> dict:
    """predict_cases per volume against the sliding-window inference alone, M = 1 and 5."""
    labeled, _, test, classes = data
    run = work / "prediction-model"
    config = TrainConfig.from_dict(
        {"iterations": args.prediction_train_iterations, "device": "cpu", "dropout": 0.15}
    )
    training.train(Dataset(labeled, [], classes, "MR"), config, run)
    cases = test[: args.cases]
    results = []
    for samples in args.mc_samples:
        started = time.perf_counter()
        predictor = Predictor.from_run(run, device="cpu")
        load_seconds = time.perf_counter() - started
        forwards: List[int] = []  # patches per forward call of the network
        predictor.network.register_forward_hook(_counter(forwards))
        out = work / f"predictions-M{samples}"
        predict_cases(predictor, cases[:1], out, samples)  # warm-up
        tensors = [
            torch.as_tensor(predictor.prepare(c.name, read_image(c.image)).image[None])
            for c in cases
        ]
        # Each volume end to end (its own predict_cases call, so scores.csv is written once
        # per volume) and its sliding window alone, back to back, in alternating order.
        end_to_end, window = [], []
        forwards.clear()
        for repeat in range(args.prediction_repeats):
            for index, (case, tensor) in enumerate(zip(cases, tensors)):
                for whole in (True, False) if (repeat + index) % 2 == 0 else (False, True):
                    started = time.perf_counter()
                    if whole:
                        predict_cases(predictor, [case], out, samples)
                        end_to_end.append(time.perf_counter() - started)
                    else:
                        predictor.sliding_window(tensor, samples)
                        window.append(time.perf_counter() - started)
        batch_sizes = sorted(set(forwards))
        calls = len(forwards) / (2 * args.prediction_repeats * len(cases))
        profile = cProfile.Profile()
        profile.enable()
        predict_cases(predictor, cases, out, samples)
        profile.disable()
        n = len(cases)
        total = cumulative_seconds(profile, "backend/inference.py", "predict_cases") / n
        stages = {
            "read": cumulative_seconds(profile, "backend/volumes.py", "read_image") / n,
            "preprocess": cumulative_seconds(profile, "backend/inference.py", "prepare") / n,
            "sliding window": cumulative_seconds(profile, "backend/inference.py", "sliding_window")
            / n,
            "write": (
                cumulative_seconds(profile, "backend/volumes.py", "write_image")
                + cumulative_seconds(profile, "backend/inference.py", "write_scores")
            )
            / n,
        }
        stages["softmax, uncertainty, resample, label, score"] = total - sum(stages.values())
        results.append(
            {
                "mc_samples": samples,
                "cases": n,
                "end_to_end": mean(end_to_end),
                "sliding_window": mean(window),
                "ratio": mean(end_to_end) / mean(window),
                "model_load_seconds": load_seconds,
                "forwards_per_volume": calls,
                "forward_batch_sizes": batch_sizes,
                "sw_batch_size": predictor.sw_batch_size,
                "profiled_stages": stages,
                "profile": top_entries(profile, args.profile_top, n),
            }
        )
    return {"repeats": args.prediction_repeats, "results": results}


def _counter(sizes: List[int]) -> Callable:
    def hook(_module: Any, inputs: tuple, _output: Any) -> None:
        sizes.append(int(inputs[0].shape[0]))

    return hook


# ----------------------------------------------------------------------------- report


def write_report(results: dict) -> None:
    RESULTS.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    lines = [
        "# Performance",
        "",
        "Issue #6: training and prediction time against their floors, and memory against the",
        "size of the unlabeled set, on real MSD Hippocampus cases (the benchmark split: 8",
        "labeled training cases, the other 152 training images unlabeled, test cases for",
        "prediction). Written by `scripts/performance.py` (each section names the command",
        "that measured it; `--items` re-measures some sections and keeps the others).",
        "",
        f"Machine: {results['machine']}; one CPU thread (`OMP_NUM_THREADS=1`,",
        "`torch.set_num_threads(1)`), no GPU. The machine is shared with long benchmark",
        "training runs, so absolute times are noisy; each ratio compares two measurements made",
        "minutes apart in the same run of the script.",
        "",
    ]
    lines += _summary(results) + CHANGES
    if "overhead" in results:
        lines += _overhead_section(results["overhead"])
    if "memory" in results:
        lines += _memory_section(results["memory"])
    if "prediction" in results:
        lines += _prediction_section(results["prediction"])
    REPORT.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _summary(results: dict) -> List[str]:
    """Each figure beside its target, and which miss it."""
    rows = []
    if "overhead" in results:
        for r in results["overhead"]["methods"]:
            rows.append((f"training loop / floor, {r['method']}", r["ratio"], "overhead"))
    if "memory" in results:
        runs = results["memory"]["runs"]
        label = f"peak memory, {runs[-1]['unlabeled']} / {runs[0]['unlabeled']} unlabeled volumes"
        rows.append((label, results["memory"]["ratio"], "memory"))
    if "prediction" in results:
        for r in results["prediction"]["results"]:
            label = f"prediction end to end / sliding window, M = {r['mc_samples']}"
            rows.append((label, r["ratio"], "prediction"))
    lines = ["| figure | measured | target |", "|---|---|---|"]
    for label, ratio, item in rows:
        lines.append(f"| {label} | {ratio:.2f}x | ≤ {TARGETS[item]:.2f}x |")
    missed = [label for label, ratio, item in rows if ratio > TARGETS[item]]
    lines += [
        "",
        "Above target: " + ("; ".join(missed) if missed else "none") + ".",
        "",
    ]
    return lines


#: What was changed for issue #6 and what was found; figures here were measured separately
#: (named as such), the tables below are regenerated by every run.
CHANGES = [
    "## What was changed",
    "",
    "- **Patches drawn ahead** (`data.py`): with `num_workers` = 0 (the default) each patch",
    "  stream has one producer thread keeping `prefetch` patches ready (new setting, default",
    "  8; `--set prefetch=0` draws in the loop as before; `num_workers` > 0 still uses worker",
    "  processes). One producer per stream keeps the order, so a seeded run draws the same",
    "  patches as without it (tested; a seeded em run's losses and weights are bit-identical",
    "  with and without). The thread stops on `BatchSource.close()` or when the source is",
    "  dropped, and a failure while drawing (a damaged file) is raised in the loop.",
    "- **Volume cache** (`data.py`): holds the prepared arrays only (the SimpleITK images",
    "  kept for prediction's geometry nearly tripled an entry), bounded by `cache_volumes`",
    "  and by a quarter of the memory available when training starts (for large CT volumes).",
    "- **em and mn+em, inside the step** (`embedding_matching.py`, `teacher_student.py`,",
    "  `uncertainty.py`; results bit-identical, tested): the surface band for the reference",
    "  voxels comes from a distance transform of a box around the class boundary instead of",
    "  the whole patch; the class prototypes normalise only the reference voxels' vectors",
    "  instead of the teacher's whole embedding map; `class_argmax` takes the class index",
    "  through `max`, since `argmax` along the class axis is about ten times slower on this",
    "  CPU (12-25 ms per call on a batch). Separate measurement on the same batches (20",
    "  steps, before → after): the rest of em's step beside its network passes 134-156 →",
    "  71-73 ms, of mn+em's 154-156 → 84-91 ms.",
    "- **Prediction** (`inference.py`): `Predictor.sliding_window` is the network's whole",
    "  share of a prediction (windows `sw_batch_size` at a time, Monte Carlo passes as copies",
    "  in the same forward); `probabilities` uses it, and this script times it alone.",
    "",
    "What remains, found by the profiles below and separate measurements:",
    "",
    "- The floors hold costs of their own that are not loop overhead: on CPU, dropout masks",
    "  (`torch.dropout`) take about as long as the convolutions they follow, 15-20 % of the",
    "  ua-mt and em steps and about a quarter of Monte Carlo prediction with M = 5; em's rest",
    "  (about 8 % of its step) is mostly normalising the student's embedding map for matching",
    "  (forward and backward) and the distance transforms.",
    "- Prefetching gains little on this machine: drawing a batch costs 15-50 ms against",
    "  steps of 350-1500 ms (volumes of 35x50x35 voxels, cached), and while the producer",
    "  runs the step itself slows (a continuously busy producer slowed supervised steps from",
    "  about 335 to 369 ms, separate measurement), so the wall-time gain is the drawing time",
    "  minus that interference: about 2-3 % for methods with two streams, none (or a small",
    "  loss under load) for supervised",
    "  (see the comparison table). It takes the drawing off the main thread (its CPU time",
    "  per iteration falls to the floor's), which matters more for larger volumes and on a",
    "  GPU, where the main thread otherwise waits for data while the GPU idles.",
    "- Prediction's remaining time beside the network: reading (~8 ms per volume), writing",
    "  the two compressed NIfTI maps (~11 ms) and the softmax, uncertainty and score (~6 ms);",
    "  a writer thread could overlap the writes with the next volume; not done, as the",
    "  figure is within target.",
    "",
]


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}"


def _verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f}x (target ≤ {target:.2f}x{'' if ratio <= target else ', missed'})"


def _measured(item: dict) -> List[str]:
    return [f"Measured {item['date']} in {item['seconds']} s by", "", f"    {item['command']}", ""]


def _overhead_section(overhead: dict) -> List[str]:
    target = TARGETS["overhead"]
    rows = overhead["methods"]
    first = rows[0]
    lines = [
        "## 1. Training loop overhead",
        "",
        *_measured(overhead),
        "**Floor**: the method's own `train_step` on the same batches, pre-loaded in memory,",
        "timed in isolation: a fresh method with the same seed steps through exactly the",
        "batches the loop will draw (same batch composition per iteration), so floor and loop",
        "do the same arithmetic. The floor is split into the **network passes** (time inside",
        "the forward calls of every network the method trains or consults, and in",
        "`Method.optimise`: backward, gradient clipping, optimiser step) and the **rest of the",
        "method** (losses, Monte Carlo bookkeeping, EMA update, reference drawing and matching",
        "for em). **Loop**: `training.train` per iteration: drawing patches (with the default",
        "prefetch thread), the step, events, and the checkpoint (the final save divided by",
        "`checkpoint_every`, an upper bound of its share). Iterations "
        f"{first['warmup']} to {first['warmup'] + first['iterations'] - 1} of a "
        f"{first['warmup'] + first['iterations'] + 1}-iteration",
        f"run (the first {first['warmup']} are warm-up); default settings (batch 4, 32x48x32",
        "patches, UNet). The floor is measured before and after the loop (and between the",
        "loops where prefetching is compared, see below) and averaged, against drifting load.",
        "",
        "Wall time is what the target is about, but on a machine whose two cores are busy",
        "with other runs it moves by 10-20 % between minutes. CPU time moves much less, so the",
        "last two columns give CPU seconds per iteration against the floor's: of the loop's",
        "main thread (what the step waits for when a core is free) and of the whole process",
        "(the prefetch threads' drawing included: the work in total).",
        "",
        "| method | floor: step ms | of which networks ms | rest of method ms | loop ms/it "
        "| waiting for data ms | events, loop ms | checkpoint ms | loop / floor "
        "| loop / network passes | CPU main thread / floor | CPU process / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loop = r["loop"]
        lines.append(
            f"| {r['method']} | {_ms(r['floor'])} | {_ms(r['floor_network'])} "
            f"| {_ms(r['floor_method'])} | {_ms(loop['seconds_per_iteration'])} "
            f"| {_ms(loop['data_wait'])} | {_ms(loop['other'])} | {_ms(loop['checkpoint'])} "
            f"| {_verdict(r['ratio'], target)} | {r['ratio_network']:.2f}x "
            f"| {r['cpu_ratio_main']:.2f}x | {r['cpu_ratio_process']:.2f}x |"
        )
    lines += [
        "",
        "Floor runs (ms/it, in order): "
        + "; ".join(f"{r['method']} " + ", ".join(_ms(v) for v in r["floor_runs"]) for r in rows)
        + ".",
    ]
    compared = [r for r in rows if "loop_without_prefetch" in r]
    if compared:
        lines += [
            "",
            "Prefetch (a producer thread per patch stream, `prefetch` patches ahead, default 8)",
            "against drawing the patches in the loop (`--set prefetch=0`), same run, in the",
            "order floor, on, off, floor, off, on, floor (each figure the mean of its two runs):",
            "",
            "| method | loop ms/it, prefetch | waiting for data ms | loop ms/it, no prefetch "
            "| drawing data ms | loop / floor, prefetch | loop / floor, no prefetch "
            "| CPU main thread / floor, prefetch | no prefetch |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in compared:
            plain = r["loop_without_prefetch"]
            lines.append(
                f"| {r['method']} | {_ms(r['loop']['seconds_per_iteration'])} "
                f"| {_ms(r['loop']['data_wait'])} | {_ms(plain['seconds_per_iteration'])} "
                f"| {_ms(plain['data_wait'])} | {r['ratio']:.2f}x "
                f"| {r['ratio_without_prefetch']:.2f}x | {r['cpu_ratio_main']:.2f}x "
                f"| {r['cpu_ratio_main_without_prefetch']:.2f}x |"
            )
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        lines += [
            "",
            "### Profiles",
            "",
            "cProfile of the loop (main thread; the prefetch threads are not profiled, so",
            "drawing patches shows only as the wait in `lock.acquire`), iterations 2 to "
            f"{1 + profiled[0]['profile_iterations']}",
            "of a separate run per method (the final save left out); the functions with the",
            "most own time, in ms per iteration. cProfile slows Python-heavy code, so these",
            "are shares rather than timings.",
            "",
        ]
        for r in profiled:
            lines += [
                f"**{r['method']}**",
                "",
                "| function | calls/it | own ms/it | cumulative ms/it |",
                "|---|---|---|---|",
            ]
            for entry in r["profile"]:
                lines.append(
                    f"| `{entry['function']}` | {entry['calls_per_iteration']} "
                    f"| {entry['own_ms_per_iteration']} | {entry['cumulative_ms_per_iteration']} |"
                )
            lines.append("")
    return lines + [""]


def _memory_section(memory: dict) -> List[str]:
    target = TARGETS["memory"]
    runs = memory["runs"]
    lines = [
        "## 2. Memory against the size of the unlabeled set",
        "",
        *_measured(memory),
        f"`semisupseg train --method {memory['method']} --iterations {memory['iterations']}`",
        "in a subprocess (peak resident memory: the process's own `VmHWM`, read at exit;",
        "`ru_maxrss` from `os.wait4` would include this script's memory, which a child",
        "inherits on Linux through fork and exec), 8 labeled cases and the 152",
        "unlabeled training images listed repeatedly under distinct names (symlinks) to make",
        f"{' and '.join(str(r['unlabeled']) for r in runs)} unlabeled volumes. Patches are",
        f"drawn ahead by a thread per stream (`prefetch` = {memory['prefetch']} patches) and",
        "cut from an LRU cache of prepared volumes per stream: at most `cache_volumes` =",
        f"{memory['cache_volumes']} volumes and at most a quarter of the memory available at",
        "the start (shared by the two streams), so memory depends on neither the number of",
        "volumes nor the length of the run.",
        "",
        "| unlabeled volumes | peak RSS MiB | run s |",
        "|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['unlabeled']} | {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} |")
    lines += [
        "",
        f"Peak memory ratio {runs[-1]['unlabeled']} / {runs[0]['unlabeled']}: "
        f"{_verdict(memory['ratio'], target)}.",
        "",
        f"A cached volume holds the prepared image (float32) and label arrays only: "
        f"{memory['mib_per_cached_volume']:.2f} MiB per hippocampus volume (it held "
        f"{memory['mib_per_volume_with_images']:.2f} MiB with the SimpleITK images that",
        "prediction needs and training does not). What the unlabeled stream's cache holds",
        "after drawing as many patches as the runs did:",
        "",
        "| unlabeled volumes | patches drawn | volumes cached | cache MiB | hit rate |",
        "|---|---|---|---|---|",
    ]
    for c in memory["caches"]:
        lines.append(
            f"| {c['unlabeled']} | {c['patches_drawn']} | {c['volumes_cached']} "
            f"| {c['cache_mib']:.1f} | {c['hit_rate']:.2f} |"
        )
    return lines + ["", ""]


def _prediction_section(prediction: dict) -> List[str]:
    target = TARGETS["prediction"]
    first = prediction["results"][0]
    lines = [
        "## 3. Prediction",
        "",
        *_measured(prediction),
        "**End to end**: `predict_cases` on test cases, per volume: read, preprocess, sliding",
        "window, softmax and uncertainty, resample back (only when the working grid differs),",
        "label map, boundary score, write the label and uncertainty maps (.nii.gz) and",
        "`scores.csv` (once per volume here: each volume is its own `predict_cases` call).",
        "**Sliding window alone**: `Predictor.sliding_window`, the MONAI gaussian-blended",
        "sliding-window inference of the same network on the same preprocessed tensors",
        "(prepared beforehand), in the same process. Each volume is timed both ways back to",
        "back, in alternating order; means over "
        f"{prediction['repeats']} repeat(s) of {first['cases']} test volumes. The model: UNet",
        "with dropout 0.15 (briefly trained; the time does not depend on the weights).",
        "",
        "| MC passes | end to end s/volume | sliding window s/volume | ratio | forwards/volume "
        "| patches per forward | model load s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in prediction["results"]:
        lines.append(
            f"| {r['mc_samples']} | {r['end_to_end']:.3f} | {r['sliding_window']:.3f} "
            f"| {_verdict(r['ratio'], target)} | {r['forwards_per_volume']:.1f} "
            f"| {', '.join(str(b) for b in r['forward_batch_sizes'])} "
            f"| {r['model_load_seconds']:.2f} |"
        )
    lines += [
        "",
        f"Windows go through the network {first['sw_batch_size']} at a time "
        "(`sw_batch_size`); with M passes each forward",
        "holds M copies of those windows (dropout draws a mask per copy), so M passes cost",
        "one forward per window batch, M times larger, rather than M loops.",
        "",
        "Where the end-to-end time goes (cProfile of one more `predict_cases`, s/volume):",
        "",
        "| MC passes | " + " | ".join(first["profiled_stages"]) + " |",
        "|---|" + "---|" * len(first["profiled_stages"]),
    ]
    for r in prediction["results"]:
        lines.append(
            f"| {r['mc_samples']} | "
            + " | ".join(f"{v:.3f}" for v in r["profiled_stages"].values())
            + " |"
        )
    for r in prediction["results"]:
        lines += [
            "",
            f"**M = {r['mc_samples']}**, most own time (ms per volume):",
            "",
            "| function | calls/volume | own ms | cumulative ms |",
            "|---|---|---|---|",
        ]
        for entry in r["profile"]:
            lines.append(
                f"| `{entry['function']}` | {entry['calls_per_iteration']} "
                f"| {entry['own_ms_per_iteration']} | {entry['cumulative_ms_per_iteration']} |"
            )
    return lines + [""]


# ----------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", nargs="+", choices=ITEMS, default=ITEMS)
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("SEMISUPSEG_DATA", DEFAULT_DATA)),
        help="MSD Hippocampus folder (default $SEMISUPSEG_DATA, else ../shared/data/...)",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=method_names(), default=list(method_names())
    )
    parser.add_argument("--warmup", type=int, default=5, help="iterations before the window")
    parser.add_argument("--iterations", type=int, default=30, help="iterations measured")
    parser.add_argument(
        "--compare-prefetch",
        nargs="*",
        default=["supervised", "mean-teacher"],
        help="methods whose loop is also measured without prefetching",
    )
    parser.add_argument("--profile-iterations", type=int, default=8)
    parser.add_argument("--profile-top", type=int, default=10)
    parser.add_argument("--memory-method", default="mean-teacher")
    parser.add_argument("--memory-iterations", type=int, default=60)
    parser.add_argument("--unlabeled-counts", nargs=2, type=int, default=[160, 1600])
    parser.add_argument("--cases", type=int, default=10, help="test volumes predicted")
    parser.add_argument("--mc-samples", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--prediction-repeats", type=int, default=2)
    parser.add_argument("--prediction-train-iterations", type=int, default=10)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--no-report", action="store_true", help="print the results instead of writing docs/"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    data = hippocampus(args.data)
    # Items measured now replace those of an earlier run; each keeps its own command and date.
    results: Dict[str, Any] = {}
    if RESULTS.exists() and not args.no_report:
        results = json.loads(RESULTS.read_text(encoding="utf-8"))
    results.update(
        {
            "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "targets": TARGETS,
        }
    )
    command = shlex.join([".venv/bin/python", "scripts/performance.py"] + sys.argv[1:])
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        steps: Dict[str, Callable[[], dict]] = {
            "overhead": lambda: {
                "methods": [measure_overhead(m, data, args, work) for m in args.methods]
            },
            "memory": lambda: measure_memory(data, args, work),
            "prediction": lambda: measure_prediction(data, args, work),
        }
        for item in ITEMS:
            if item in args.items:
                started = time.perf_counter()
                result = steps[item]()
                result.update(
                    command=command,
                    date=time.strftime("%Y-%m-%d %H:%M"),
                    seconds=round(time.perf_counter() - started),
                )
                results[item] = result
                print(f"{item} ({result['seconds']} s): {_headline(item, result)}", flush=True)
    if args.no_report:
        print(json.dumps(results, indent=1))
    else:
        write_report(results)
        print(f"wrote {REPORT.relative_to(ROOT)} and {RESULTS.relative_to(ROOT)}")
    return 0


def _headline(item: str, result: dict) -> str:
    if item == "overhead":
        ratios = {r["method"]: round(r["ratio"], 3) for r in result["methods"]}
    elif item == "memory":
        ratios = round(result["ratio"], 3)
    else:
        ratios = {r["mc_samples"]: round(r["ratio"], 3) for r in result["results"]}
    return f"ratio {ratios} (target {TARGETS[item]})"


if __name__ == "__main__":
    sys.exit(main())
