#!/usr/bin/env python3
"""kill -9 at random moments of ``train`` and ``predict`` (issue #14): every folder must be
complete or detectably partial afterwards, never a mix of two runs.

On small real MSD Hippocampus cases, with few iterations and one CPU thread:

- train: one run folder, trained again and again with alternating seeds and budgets (a
  detectably partial folder is resumed every other time). After each kill the folder is
  classified: complete (``model.pt`` loads, has finished its budget, matches ``config.json``
  and the checkpoint beside it), partial (no ``model.pt``; whatever checkpoint is there loads
  and matches ``config.json``) or MIXED (anything else).
- predict: one output folder, complete to begin with, predicted into again and again with two
  models (different seeds) and two input sets. After each kill the folder is absent, or
  complete: ``predictions.json`` says complete, lists exactly the files present, and every
  map equals, voxel for voxel, the map an uninterrupted prediction with the model it names
  gives (this run's, or the previous one's when the kill came before the swap). Anything else
  is MIXED. A killed prediction's staging folder is hidden, marked partial, and removed by the
  next prediction into the same folder.

Each process is killed with SIGKILL at a random moment of its work: once its first event shows
that the imports are done, after a delay drawn uniformly up to 1.05 times the time from the
first event to the last of an uninterrupted run (so the moments depend neither on how long the
imports nor on how long the interpreter's exit take on a busy machine).

A last uninterrupted run of each must succeed (no lock left held, leftovers removed). Exit
code 0 when no folder was ever mixed.

    .venv/bin/python scripts/kill_test.py                       # 12 kills of each
    .venv/bin/python scripts/kill_test.py --kills 20 --seed 3 --work /tmp/kills
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSupSeg"))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from SemiSupSegLib.backend.checkpoint import load_checkpoint  # noqa: E402
from SemiSupSegLib.backend.errors import DataError  # noqa: E402
from SemiSupSegLib.backend.prediction_manifest import check_complete  # noqa: E402
from SemiSupSegLib.output_layout import (  # noqa: E402
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    RUN_FOLDER,
    SCORES_FILE,
    ScoreRow,
    read_table,
)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "msd-hippocampus"
CLI = [sys.executable, "-m", "SemiSupSegLib.backend"]
#: Small but real: the default 3D UNet on hippocampus patches, a checkpoint every 3 iterations.
TRAIN_SETTINGS = ["--set", "batch_size=2", "--set", "checkpoint_every=3", "--set", "log_every=1"]
TRAIN_CASES, PREDICT_CASES = 4, 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD Hippocampus folder")
    parser.add_argument("--kills", type=int, default=12, help="kills of train and of predict")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="semisupseg-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "SemiSupSeg")}
    images, labels, inputs = _data(args.data, work)

    train_rows = _train_trials(images, labels, work / "train", args.kills, rng, env)
    predict_rows = _predict_trials(images, labels, inputs, work / "predict", args.kills, rng, env)
    mixed = [r for r in train_rows + predict_rows if r["state"] == "MIXED"]
    print(_report(train_rows, predict_rows, args))
    (work / "results.json").write_text(json.dumps(train_rows + predict_rows, indent=2))
    print(f"\nper-trial results: {work / 'results.json'}")
    return 1 if mixed else 0


def _data(source: Path, work: Path) -> Tuple[Path, Path, List[Path]]:
    """Folders of links to the first real cases: training images and labels, and the inputs
    of prediction (other cases)."""
    if not (source / "dataset.json").is_file():
        raise SystemExit(f"MSD Hippocampus not found at {source} (use --data)")
    names = sorted(p.name for p in (source / "imagesTr").glob("*.nii.gz"))
    images, labels, inputs = work / "images", work / "labels", work / "inputs"
    for folder in (images, labels, inputs):
        folder.mkdir(exist_ok=True)
    for name in names[:TRAIN_CASES]:
        _link(source / "imagesTr" / name, images / name)
        _link(source / "labelsTr" / name, labels / name)
    for name in names[TRAIN_CASES : TRAIN_CASES + PREDICT_CASES]:
        _link(source / "imagesTr" / name, inputs / name)
    return images, labels, sorted(inputs.iterdir())


def _link(source: Path, link: Path) -> None:
    if not link.exists():
        link.symlink_to(source.resolve())


def _run(command: List[str], env: Dict[str, str]) -> float:
    """Run to the end; the seconds from its first event to its last (its work, without the
    imports before and the interpreter's exit after)."""
    with tempfile.TemporaryDirectory() as folder:
        events = Path(folder) / "events.jsonl"
        result = subprocess.run(
            command + ["--events", str(events)], env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        times = [json.loads(line)["time"] for line in events.read_text().splitlines()]
    return times[-1] - times[0]


def _first_event(process: subprocess.Popen, events: Path) -> float:
    """Wait until ``process`` writes its first event (or ends); the time it did."""
    while process.poll() is None and not (events.exists() and events.stat().st_size):
        time.sleep(0.05)
    return time.perf_counter()


def _killed(command: List[str], env: Dict[str, str], after: float, events: Path) -> tuple:
    """Start ``command`` and SIGKILL it ``after`` seconds after its first event, unless it
    ended first; (whether it was killed, its exit code)."""
    events.unlink(missing_ok=True)
    process = subprocess.Popen(
        command + ["--events", str(events)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = _first_event(process, events)
    try:
        code = process.wait(timeout=max(0.0, started + after - time.perf_counter()))
        return False, code
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        return True, process.wait()


# ----------------------------------------------------------------------------- train


def _train_command(
    images: Path, labels: Path, run: Path, seed: int, iterations: int, resume: bool = False
) -> list:
    """A new training of ``iterations``, or with ``resume`` the continuation of the stored one."""
    budget = ["--resume"] if resume else ["--iterations", str(iterations)]
    return CLI + ["train", "--images", str(images), "--labels", str(labels), "--method",
                  "supervised", "--device", "cpu", "--seed", str(seed), *budget, "--out",
                  str(run), "--quiet", *TRAIN_SETTINGS]  # fmt: skip


def _train_trials(images, labels, folder, kills, rng, env) -> List[dict]:
    run = folder / RUN_FOLDER
    duration = _run(_train_command(images, labels, folder / "timing", 0, 12), env)
    rows = []
    for trial in range(kills):
        resume = trial % 2 == 1 and _train_state(run)[0] == "partial" and _has_checkpoint(run)
        command = _train_command(images, labels, run, trial % 3, (8, 12)[trial % 2], resume)
        after = rng.uniform(0.0, 1.05 * duration)
        killed, code = _killed(command, env, after, folder / "events.jsonl")
        label = "train --resume" if resume else "train"
        rows.append(_row(label, trial, after, killed, code, *_train_state(run), run))
    _run(_train_command(images, labels, run, 0, 8), env)
    rows.append(_row("train (final, not killed)", kills, None, False, 0, *_train_state(run), run))
    return rows


def _row(command, trial, after, killed, code, state, detail, folder) -> dict:
    """One trial's result, also printed."""
    if after is not None:
        print(f"{command:14s} {trial:2d}: kill {after:5.1f} s in -> {state} ({detail})", flush=True)
    return {"command": command, "trial": trial, "kill_after_s": None if after is None else
            round(after, 2), "killed": killed, "exit": code, "state": state, "detail": detail,
            "leftovers": _leftovers(folder)}  # fmt: skip


def _has_checkpoint(run: Path) -> bool:
    return (run / CHECKPOINT_FILE).exists()


def _train_state(run: Path) -> Tuple[str, str]:
    """complete, partial or MIXED, and why."""
    if not run.exists():
        return "partial", "no run folder yet"
    try:
        config = _json(run / CONFIG_FILE)
        model = _checkpoint(run / MODEL_FILE)
        checkpoint = _checkpoint(run / CHECKPOINT_FILE)
    except (DataError, ValueError) as error:
        return "MIXED", f"unreadable file: {error}"
    if model is not None:
        if model["iteration"] != model["config"]["iterations"]:
            return "MIXED", "model.pt of an unfinished run"
        if config != model["config"]:
            return "MIXED", "config.json of another run than model.pt"
        if checkpoint is not None and (
            checkpoint["run_id"] != model["run_id"] or checkpoint["iteration"] != model["iteration"]
        ):
            return "MIXED", "checkpoint.pt of another run than model.pt"
        return "complete", f"model at iteration {model['iteration']}, seed {config['seed']}"
    if checkpoint is not None:
        if config != checkpoint["config"]:
            return "MIXED", "config.json of another run than checkpoint.pt"
        budget = checkpoint["config"]["iterations"]
        return "partial", f"no model; checkpoint at {checkpoint['iteration']} of {budget}"
    return "partial", "no model, no checkpoint" + ("" if config else ", no config.json")


def _json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def _checkpoint(path: Path) -> Optional[dict]:
    return load_checkpoint(path) if path.exists() else None


def _leftovers(folder: Path) -> int:
    """Hidden temporaries in or beside ``folder`` (removed by the next writer)."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    names += [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    return sum(1 for n in names if ".tmp" in n)


# ----------------------------------------------------------------------------- predict


def _predict_command(model: Path, inputs: List[Path], out: Path) -> list:
    return CLI + ["predict", "--run", str(model), "--input", *map(str, inputs), "--out",
                  str(out), "--device", "cpu", "--quiet"]  # fmt: skip


def _predict_trials(images, labels, inputs, folder, kills, rng, env) -> List[dict]:
    models = {}
    for name, seed in (("A", 1), ("B", 2)):
        models[name] = folder / f"model-{name}"
        if not (models[name] / MODEL_FILE).exists():
            _run(_train_command(images, labels, models[name], seed, 6), env)
    references = {}
    for name, model in models.items():
        references[name] = folder / f"reference-{name}"
        duration = _run(_predict_command(model, inputs, references[name]), env)
    out = folder / "pred"
    _run(_predict_command(models["B"], inputs[:3], out), env)  # a complete folder to replace
    rows = []
    for trial in range(kills):
        name = "AB"[trial % 2]
        cases = inputs if (trial // 2) % 2 == 0 else inputs[:3]
        after = rng.uniform(0.0, 1.05 * duration)
        command = _predict_command(models[name], cases, out)
        killed, code = _killed(command, env, after, folder / "events.jsonl")
        state, detail = _predict_state(out, models, references)
        if state == "complete":
            this = f"model {name}, {len(cases)} cases,"
            detail += " (this run's)" if detail.startswith(this) else " (an earlier run's)"
        rows.append(_row("predict", trial, after, killed, code, state, detail, out))
    _run(_predict_command(models["A"], inputs, out), env)
    final = _predict_state(out, models, references)
    rows.append(_row("predict (final, not killed)", kills, None, False, 0, *final, out))
    return rows


def _predict_state(out: Path, models: Dict[str, Path], references: Dict[str, Path]) -> tuple:
    """absent, complete or MIXED, and why."""
    if not out.exists():
        return "absent", "no output folder (none complete yet, or killed between renames)"
    try:
        manifest = check_complete(out)
    except DataError as error:
        return "MIXED", str(error)
    if manifest is None:
        return "MIXED", "files without predictions.json"
    by_file = {str((m / MODEL_FILE).absolute()): n for n, m in models.items()}
    name = by_file.get(manifest["model"]["file"])
    if name is None:
        return "MIXED", f"unknown model {manifest['model']['file']}"
    for case in manifest["cases"]:
        for key in ("label", "uncertainty"):
            ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case[key])))
            reference = references[name] / case[key]
            if not np.array_equal(ours, sitk.GetArrayFromImage(sitk.ReadImage(str(reference)))):
                return "MIXED", f"{case[key]} is not model {name}'s"
    scores = read_table(out / SCORES_FILE, ScoreRow)
    if sorted(row.case for row in scores) != sorted(c["case"] for c in manifest["cases"]):
        return "MIXED", "scores.csv lists other cases"
    return "complete", f"model {name}, {len(manifest['cases'])} cases, every map model {name}'s"


# ----------------------------------------------------------------------------- report


def _report(train_rows: List[dict], predict_rows: List[dict], args: argparse.Namespace) -> str:
    lines = [
        f"kill -9 test: {args.kills} kills of train and of predict, seed {args.seed}, "
        f"{TRAIN_CASES} training and {PREDICT_CASES} prediction cases of {args.data.name}; "
        "each killed at a moment drawn uniformly from its first event to 1.05 x the time an "
        "uninterrupted run takes from its first event to its last",
        "",
        "| command | kills (process still running) | complete | partial | absent | MIXED |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in (("train", train_rows), ("predict", predict_rows)):
        trials = [r for r in rows if r["kill_after_s"] is not None]
        counts = {
            s: sum(r["state"] == s for r in trials) for s in ("complete", "partial", "absent")
        }
        mixed = sum(r["state"] == "MIXED" for r in rows)
        killed = sum(r["killed"] for r in trials)
        lines.append(
            f"| {label} | {len(trials)} ({killed}) | {counts['complete']} | {counts['partial']} "
            f"| {counts['absent']} | {mixed} |"
        )
    finals = [r for r in train_rows + predict_rows if r["kill_after_s"] is None]
    lines.append("")
    for row in finals:
        lines.append(f"- {row['command']}: {row['state']} ({row['detail']}), "
                     f"{row['leftovers']} leftover temporaries")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
