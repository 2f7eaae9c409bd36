"""Which method to use on *your* data: train supervised and semi-supervised methods on the same
labeled cases, score each on labeled cases held out of training, and recommend one.

A semi-supervised method does not beat supervised training on every dataset (on Left Atrium
M&N at the published settings did not; see docs/benchmarks.md), so the default method should
not be trusted blindly. This is the benchmark's validation protocol applied to a user's own
data: the held-out cases are out of both the labeled and the unlabeled pools, every method gets
the same plan rule and time budget, and a method is recommended over supervised training only
when it scores higher on average *and* on most held-out cases; otherwise supervised training is
recommended, said plainly. One seed and a few held-out cases make this a check, not a proof:
the result names how many cases it rests on.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from SemiSupSegLib.backend.atomic_files import write_text_atomic
from SemiSupSegLib.backend.datasets import Case, Dataset, exclude_cases
from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.method_catalogue import BASELINE_METHOD
from SemiSupSegLib.output_layout import (
    CHECKPOINT_FILE,
    COMPARISON_FILE,
    EVALUATION_FOLDER,
    HELD_OUT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PREDICTIONS_FOLDER,
    RUN_FOLDER,
)
from SemiSupSegLib.protocol import DEFAULT_BUDGET

#: Labeled cases that must stay for training after the held-out ones are taken.
MIN_TRAINING_CASES = 2


@dataclass
class MethodResult:
    """One method's scores on the held-out cases (mean foreground Dice per case).

    ``train_seconds``: wall time of its training (of the last process that trained it: a
    resumed training counts only the part after the resume)."""

    method: str
    case_dice: Dict[str, float]
    train_seconds: float
    run: str

    @property
    def mean_dice(self) -> float:
        return sum(self.case_dice.values()) / len(self.case_dice)


@dataclass
class Comparison:
    """The held-out cases, every method's result, and the recommendation with its reason.

    ``complete`` is false while methods remain (``reason`` then says how many); ``inputs`` is
    what a resumed comparison must match (``comparison_inputs``); ``started`` lists the methods
    whose training this comparison started (a resume continues only their checkpoints, not a
    run folder left by another comparison); ``trained`` holds the training seconds of each
    method whose training finished, scored or not."""

    held_out: List[str]
    results: List[MethodResult] = field(default_factory=list)
    recommended: str = BASELINE_METHOD
    reason: str = ""
    complete: bool = False
    inputs: Dict[str, Any] = field(default_factory=dict)
    started: List[str] = field(default_factory=list)
    trained: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        data = asdict(self)
        for entry, result in zip(data["results"], self.results):
            entry["mean_dice"] = result.mean_dice
        return data

    def save(self, out: Path) -> None:
        write_text_atomic(out / COMPARISON_FILE, json.dumps(self.to_json(), indent=1) + "\n")


def hold_out(dataset: Dataset, count: int, seed: int) -> Tuple[Dataset, List[Case]]:
    """Draw ``count`` labeled cases (fixed by ``seed``) and the dataset without them.

    Raises:
        ConfigError: when fewer than ``MIN_TRAINING_CASES`` labeled cases would remain.
    """
    if count < 1:
        raise ConfigError(f"--holdout must be at least 1, not {count}")
    if len(dataset.labeled) - count < MIN_TRAINING_CASES:
        raise ConfigError(
            f"comparing methods holds {count} labeled case(s) out of training; with "
            f"{len(dataset.labeled)} labeled case(s) that leaves fewer than "
            f"{MIN_TRAINING_CASES} to train on: label more cases or hold fewer out"
        )
    names = sorted(c.name for c in dataset.labeled)
    held = sorted(random.Random(seed).sample(names, count))
    held_cases = [c for c in dataset.labeled if c.name in held]
    return exclude_cases(dataset, held), held_cases


def default_holdout(labeled: int) -> int:
    """A quarter of the labeled cases, at least 2 (1 when only 3 are labeled)."""
    return max(1, min(max(2, labeled // 4), labeled - MIN_TRAINING_CASES))


def recommend(results: Sequence[MethodResult]) -> Tuple[str, str]:
    """The method to use and why: the best of those that beat supervised training in mean Dice
    and on more than half of the held-out cases, else supervised training."""
    by_name = {r.method: r for r in results}
    if BASELINE_METHOD not in by_name:
        best = max(results, key=lambda r: r.mean_dice)
        return best.method, f"{best.method} scored highest (supervised training was not compared)"
    base = by_name[BASELINE_METHOD]
    winners = []
    for result in results:
        if result.method == BASELINE_METHOD:
            continue
        better = sum(result.case_dice[c] > base.case_dice[c] for c in base.case_dice)
        gain = result.mean_dice - base.mean_dice
        if gain > 0 and better > len(base.case_dice) / 2:
            winners.append((result.mean_dice, result.method, gain, better))
    cases = len(base.case_dice)
    if not winners:
        others = ", ".join(r.method for r in results if r.method != BASELINE_METHOD)
        if not others:
            return BASELINE_METHOD, "supervised training was the only method compared"
        return BASELINE_METHOD, (
            f"no semi-supervised method ({others}) beat supervised training on the {cases} "
            "held-out case(s): use supervised training for this data"
        )
    _, method, gain, better = max(winners)
    return method, (
        f"{method} beat supervised training by {100 * gain:+.1f} Dice points and on {better} "
        f"of the {cases} held-out case(s)"
    )


def settings_per_method(
    methods: Sequence[str], context: Dict[str, Any], explicit: Dict[str, Any], unlabeled: bool
) -> Dict[str, Dict[str, Any]]:
    """Each method's share of the user's settings, every one checked before anything trains.

    A ``method.NAME`` setting goes to the methods that have that option (e.g. ``method.ema_decay``
    to mean-teacher, not to supervised training); the others go to every method.

    Raises:
        ConfigError: an unknown method, a ``method.*`` setting none of them has, a bad value
            (naming the method), or a method that needs unlabeled images when there are none.
    """
    from SemiSupSegLib.backend.config import TrainConfig
    from SemiSupSegLib.backend.methods import method_class
    from SemiSupSegLib.backend.methods.base import describe_method

    per_method: Dict[str, Dict[str, Any]] = {}
    for method in methods:
        info = describe_method(method_class(method))
        names = {f"method.{option.name}" for option in info.options}
        per_method[method] = {
            k: v for k, v in explicit.items() if not k.startswith("method.") or k in names
        }
        if info.uses_unlabeled and not unlabeled:
            raise ConfigError(
                f"--methods: {method} learns from unlabeled images and the data has none "
                "(give --unlabeled or more cases than --labeled lists, or compare other methods)"
            )
        try:
            TrainConfig.from_dict({**context, "method": method, **per_method[method]}).validate()
        except ConfigError as err:
            raise ConfigError(f"--methods {method}: {err}") from None
    unused = sorted(
        k
        for k in explicit
        if k.startswith("method.") and not any(k in s for s in per_method.values())
    )
    if unused:
        raise ConfigError(
            f"--set {unused[0]}: none of the compared methods ({', '.join(methods)}) has this "
            "setting (semisupseg methods NAME lists a method's settings)"
        )
    return per_method


def compare_methods(
    dataset: Dataset,
    methods: Sequence[str],
    context: Dict[str, Any],
    explicit: Dict[str, Any],
    out: Path,
    events: EventSink,
    stop: Any = None,
    holdout: int = 0,
    seed: int = 0,
    budget: str = DEFAULT_BUDGET,
    resume: bool = False,
) -> Comparison:
    """Train each of ``methods`` without the held-out cases, score each on them, recommend one.

    ``comparison.json`` is written before the first method and after each step, so a stopped
    comparison keeps what it finished (``complete`` false until the end); ``resume`` reuses the
    methods scored and trained, and continues an interrupted training from its checkpoint, when
    the inputs are the same (``comparison_inputs``).

    Args:
        dataset: the user's cases; ``holdout`` of the labeled ones are held out of training.
        methods: method names; supervised training should be among them (it is the baseline).
        context: device and modality (``method`` is set per method).
        explicit: the settings the user gave (they apply to every method).
        out: the comparison folder: ``<method>/run``, ``<method>/predictions`` (of the held-out
            cases), ``<method>/evaluation`` and ``comparison.json``.
        events: progress for each method in turn.
        stop: a ``StopFlag``.
        holdout: held-out labeled cases (0: ``default_holdout``).
        seed: draws the held-out cases.
        budget: the time budget every method gets.
        resume: continue the comparison in ``out``.

    Raises:
        ConfigError: too few labeled cases, an unknown or repeated method; with ``resume``, no
            comparison in ``out`` or one made with other inputs.
    """
    from SemiSupSegLib.backend.inference import Predictor, predict_cases
    from SemiSupSegLib.backend.metrics import case_mean_dice, evaluate_folders
    from SemiSupSegLib.backend.planned_training import train_planned

    if len(set(methods)) != len(methods) or not methods:
        raise ConfigError(f"--methods: give each method once, not {list(methods)}")
    training, held = hold_out(dataset, holdout or default_holdout(len(dataset.labeled)), seed)
    settings = settings_per_method(methods, context, explicit, bool(training.unlabeled))
    out = Path(out)
    comparison = Comparison(held_out=[c.name for c in held])
    comparison.inputs = comparison_inputs(training, held, methods, context, explicit, budget, seed)
    if resume:
        previous = previous_comparison(out, comparison.inputs)
        comparison.trained = {
            m: t for m, t in previous.trained.items() if (out / m / RUN_FOLDER / MODEL_FILE).is_file()
        }  # fmt: skip
        finished = {r.method: r for r in previous.results if r.method in comparison.trained}
        comparison.started = previous.started
    else:
        finished = {}
    out.mkdir(parents=True, exist_ok=True)
    truth = out / HELD_OUT_FILE
    write_text_atomic(truth, json.dumps(_truth_manifest(held, dataset.classes), indent=1) + "\n")
    for number, method in enumerate(methods, 1):
        comparison.reason = f"incomplete: {number - 1} of {len(methods)} methods scored"
        comparison.recommended = ""
        comparison.save(out)
        if method in finished:
            events.emit(
                "stage",
                stage="comparison",
                message=f"method {number} of {len(methods)}: {method}, finished before: reused",
            )
            comparison.results.append(finished[method])
            continue
        events.emit(
            "stage",
            stage="comparison",
            message=f"method {number} of {len(methods)}: {method}, holding out "
            f"{len(held)} labeled case(s): {', '.join(comparison.held_out)}",
        )
        folder = out / method
        run = folder / RUN_FOLDER
        if method not in comparison.trained:
            continuing = method in comparison.started and (run / CHECKPOINT_FILE).is_file()
            if method not in comparison.started:
                comparison.started.append(method)
                comparison.save(out)
            result = train_planned(
                training, {**context, "method": method}, settings[method], run, events, stop,
                budget=budget, resume=continuing,
            )  # fmt: skip
            comparison.trained[method] = float(getattr(result, "seconds", 0.0) or 0.0)
            comparison.save(out)
        predictor = Predictor.from_run(run, device=context.get("device", "auto"))
        predictions = folder / PREDICTIONS_FOLDER
        predict_cases(predictor, held, predictions, 1, events, stop)
        evaluate_folders(predictions, truth, folder / EVALUATION_FOLDER, dataset.classes)
        comparison.results.append(
            MethodResult(
                method=method,
                case_dice=case_mean_dice(folder / EVALUATION_FOLDER / METRICS_FILE),
                train_seconds=comparison.trained[method],
                run=str(run.absolute()),
            )
        )
    comparison.recommended, comparison.reason = recommend(comparison.results)
    comparison.complete = True
    comparison.save(out)
    events.emit(
        "output",
        stage="comparison",
        message=f"recommended: {comparison.recommended} ({comparison.reason})",
        outputs={"comparison": str(out / COMPARISON_FILE)},
    )
    return comparison


def comparison_inputs(
    training: Dataset,
    held: Sequence[Case],
    methods: Sequence[str],
    context: Dict[str, Any],
    explicit: Dict[str, Any],
    budget: str,
    seed: int,
) -> Dict[str, Any]:
    """What a comparison's results depend on, as JSON: the methods, settings, budget and seed,
    the classes and modality, and every case's files (path and size) by role."""

    def files(cases: Sequence[Case]) -> List[List[Any]]:
        return [[c.name, *_file_identity(c.image), *_file_identity(c.label)] for c in cases]

    return json.loads(
        json.dumps(
            {
                "methods": list(methods),
                "settings": explicit,
                "budget": budget,
                "seed": seed,
                "modality": context.get("modality"),
                "classes": {str(k): v for k, v in (training.classes or {}).items()},
                "labeled": files(training.labeled),
                "unlabeled": files(training.unlabeled),
                "held_out": files(held),
            },
            default=str,
        )
    )


def _file_identity(path: Any) -> List[Any]:
    if path is None:
        return [None, None]
    path = Path(path).absolute()
    return [str(path), path.stat().st_size if path.exists() else None]


#: What a resumed comparison names when its inputs differ, by key of ``comparison_inputs``.
_INPUT_NAMES = {
    "methods": "--methods",
    "settings": "the settings (--set, --iterations, ...)",
    "budget": "--budget",
    "seed": "--seed",
    "modality": "the modality",
    "classes": "the classes",
    "labeled": "the labeled cases (names or files)",
    "unlabeled": "the unlabeled images",
    "held_out": "the held-out cases (--holdout or the labeled cases)",
}


def previous_comparison(out: Path, inputs: Dict[str, Any]) -> Comparison:
    """The comparison in ``out`` that a resume continues.

    Raises:
        ConfigError: ``out`` holds no comparison, or one made with other inputs (named).
    """
    path = out / COMPARISON_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: {out} holds no comparison to continue ({path} is missing)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        previous = Comparison(
            held_out=list(data["held_out"]),
            results=[
                MethodResult(
                    method=str(r["method"]),
                    case_dice={str(k): float(v) for k, v in r["case_dice"].items()},
                    train_seconds=float(r["train_seconds"]),
                    run=str(r["run"]),
                )
                for r in data["results"]
            ],
            inputs=dict(data["inputs"]),
            started=[str(m) for m in data["started"]],
            trained={str(k): float(v) for k, v in data["trained"].items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"--resume: {path} is not a comparison file ({error})") from error
    differ = [name for key, name in _INPUT_NAMES.items() if previous.inputs.get(key) != inputs[key]]
    if differ:
        raise ConfigError(
            f"--resume: {path} was made with other inputs: {'; '.join(differ)} differ. Resume "
            "with the same command, or start a new comparison (without --resume, or another --out)"
        )
    return previous


def format_comparison(comparison: Comparison) -> str:
    """A table for a terminal: mean Dice per method, then the recommendation."""
    width = max(len(r.method) for r in comparison.results)
    lines = [
        f"Held-out labeled cases ({len(comparison.held_out)}): {', '.join(comparison.held_out)}"
    ]
    for r in sorted(comparison.results, key=lambda r: -r.mean_dice):
        lines.append(f"  {r.method:<{width}}  mean Dice {r.mean_dice:.4f}")
    lines.append(f"Recommended: {comparison.recommended} ({comparison.reason})")
    return "\n".join(lines)


def _truth_manifest(cases: Sequence[Case], classes: Any) -> Dict[str, Any]:
    labels = {"0": "background", **{str(k): v for k, v in (classes or {}).items() if k != 0}}
    return {
        "labels": labels,
        "training": [
            {"name": c.name, "image": str(Path(c.image).absolute()), "label": str(Path(c.label).absolute())}
            for c in cases
        ],
    }  # fmt: skip
