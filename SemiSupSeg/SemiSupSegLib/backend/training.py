"""The training loop every method shares: data, schedule of checkpoints, progress, cancel, resume."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from monai.utils import set_determinism
from timm.utils.model_ema import ModelEmaV3

from SemiSupSegLib.backend import distributed
from SemiSupSegLib.backend.atomic_files import write_text_atomic
from SemiSupSegLib.backend.cancellation import StopFlag
from SemiSupSegLib.backend.checkpoint import (
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.data import BatchSource
from SemiSupSegLib.backend.datasets import Dataset
from SemiSupSegLib.backend.device import describe_device, select_device
from SemiSupSegLib.backend.errors import CancelledError, ConfigError, DataError
from SemiSupSegLib.backend.events import EventSink, RateEstimator
from SemiSupSegLib.backend.folder_lock import holds_folder
from SemiSupSegLib.backend.methods import Method, create_method
from SemiSupSegLib.backend.networks import network_divisors
from SemiSupSegLib.backend.planning import Plan
from SemiSupSegLib.backend.training_callbacks import CallbackList, StepCallback, TrainingCallback
from SemiSupSegLib.method_catalogue import BASELINE_METHOD
from SemiSupSegLib.output_layout import (
    CASES_FILE,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    PLAN_FILE,
)


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    seconds: float
    final_losses: Dict[str, float]


def adjust_patch_size(config: TrainConfig, events: EventSink) -> TrainConfig:
    """Round the patch size up to what the network's down-sampling needs, and say so."""
    divisors = network_divisors(config.network, config.network_options)
    patch = tuple(int(-(-s // d) * d) for s, d in zip(config.patch_size, divisors))
    if patch != tuple(config.patch_size):
        events.warn(
            f"patch size {tuple(config.patch_size)} rounded up to {patch}: "
            f"network {config.network!r} needs multiples of {'x'.join(map(str, divisors))}"
        )
        config = config.with_setting("patch_size", list(patch))
    return config


@holds_folder("run_dir", when=lambda: distributed.launched().is_main)
def train(
    dataset: Dataset,
    config: TrainConfig,
    run_dir: str | Path,
    events: Optional[EventSink] = None,
    stop: Optional[StopFlag] = None,
    resume: bool = False,
    init_from: Optional[str | Path] = None,
    plan: Optional[Plan] = None,
    callbacks: Sequence[Union[TrainingCallback, StepCallback]] = (),
    new_budget: Optional[int] = None,
) -> TrainResult:
    """Train ``config.method`` on ``dataset`` into ``run_dir``.

    ``callbacks`` (``training_callbacks``) are told, on the main process, when training starts,
    when each iteration starts, draws its patches and ends its step, and when training ends; a
    plain function is called after every step with the number of iterations done, the method
    (its networks in training mode) and the step's result. Scripts use them to watch and time
    training (``scripts/mn_diagnostics.py``, ``scripts/performance.py``).

    ``plan``, when the settings were planned (``planning.plan_training``), is written to
    ``plan.json`` in the run folder beside ``config.json``.

    Writes ``checkpoint.pt`` (resumable) every ``checkpoint_every`` iterations and at the end,
    and ``model.pt`` (what ``predict`` loads). Raises CancelledError after saving a checkpoint
    when ``stop`` is set (SIGINT/SIGTERM), and ConfigError when the loss stops being finite.

    ``run_dir`` is locked for the call (``folder_lock``): a second training into it is refused.
    A new training removes the previous run's model and checkpoint before it writes anything,
    so the folder never holds one run's model beside another's settings. ``resume`` continues
    the stored run with its settings, its random streams and its iteration budget (the result
    equals an uninterrupted run's), or ``new_budget`` iterations when given: the learning-rate
    schedules then continue as those of a run of the new budget, from the current iteration.

    Under ``torchrun`` every rank runs this function (module ``distributed``): the networks
    trained by gradient are DistributedDataParallel replicas, each rank draws its own patches
    (its shard of the unlabeled cases, a labeled stream seeded per rank) and trains
    ``batch_size`` of them per iteration, so the effective batch is ``world size x batch_size``
    (the reported losses are rank 0's). Only rank 0 writes into ``run_dir`` and emits events;
    the ranks agree every iteration whether to stop, so a cancel stops all of them at once.
    """
    world = distributed.launched()
    events = events if events is not None and world.is_main else EventSink(quiet=True)
    stop = stop or StopFlag()
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / CHECKPOINT_FILE
    state: Optional[Dict[str, Any]] = None
    if resume:
        state = load_checkpoint(checkpoint_path)
        stored = TrainConfig.from_dict(state["config"])
        if stored.method != config.method:
            raise ConfigError(
                f"--resume: {checkpoint_path} was trained with method {stored.method!r}, "
                f"not {config.method!r}"
            )
        config = stored.with_setting("iterations", new_budget or stored.iterations)
        dataset_classes = {int(k): v for k, v in state["classes"].items()}
        if dataset_classes != dataset.classes:
            raise ConfigError(f"--resume: the classes differ from {checkpoint_path}'s")
    elif init_from is not None and _inside(Path(init_from), run_dir):
        raise ConfigError(
            f"--init-from {init_from} is inside the run folder {run_dir}, which a new training "
            "replaces; copy that model elsewhere or choose another --out"
        )
    config = adjust_patch_size(config.validate(), events)

    device = select_device(config.device)
    with distributed.process_group(device) as world:
        return _train(
            dataset,
            config,
            run_dir,
            events,
            stop,
            state,
            init_from,
            world,
            distributed.rank_device(device, world),
            plan,
            callbacks,
        )


def _train(
    dataset: Dataset,
    config: TrainConfig,
    run_dir: Path,
    events: EventSink,
    stop: StopFlag,
    state: Optional[Dict[str, Any]],
    init_from: Optional[str | Path],
    world: distributed.World,
    device: torch.device,
    plan: Optional[Plan] = None,
    callbacks: Sequence[Union[TrainingCallback, StepCallback]] = (),
) -> TrainResult:
    """``train`` once the config and device are settled, on one rank (or the only process):
    build the method, restore it or warm-start it, open the run folder, loop, finalize."""
    run = _Run.build(dataset, config, run_dir, events, stop, world, device, callbacks)
    if state is not None:
        run.restore(state)
    elif init_from is not None:
        run.warm_start(init_from)
    run.method.distribute()
    if world.rank > 0:  # dropout and noise of their own; rank 0 keeps the single-process stream
        set_determinism(seed=distributed.rank_seed(config.seed * 1000 + run.start, world))
    run.open_folder(plan, resuming=state is not None)
    run.open_source(state)
    run.hooks.on_start(run.method, run.start, config.iterations)
    started = time.perf_counter()
    # The prefetch threads must stop before the interpreter does: a thread still inside a
    # torch call at exit aborts the process ("terminate called without an active exception").
    try:
        losses = run.loop()
    finally:
        run.source.close()
    run.finalize()
    run.hooks.on_end(run.method)
    seconds = time.perf_counter() - started
    events.emit(
        "output",
        stage="training",
        message=f"trained {config.iterations - run.start} iterations in {seconds:.0f} s; model: {run_dir / MODEL_FILE}",
        outputs={"model": str(run_dir / MODEL_FILE), "checkpoint": str(run.checkpoint_path)},
    )
    return TrainResult(run_dir, config.iterations, seconds, losses)


@dataclass
class _Run:
    """One training on one rank: what its phases share, and the phases themselves."""

    dataset: Dataset
    config: TrainConfig
    run_dir: Path
    events: EventSink
    stop: StopFlag
    world: distributed.World
    device: torch.device
    hooks: CallbackList
    method: Method
    average: WeightAverage
    run_id: str
    start: int = 0
    labeled_weights: Optional[List[float]] = None
    source: Optional[BatchSource] = None

    @classmethod
    def build(
        cls,
        dataset: Dataset,
        config: TrainConfig,
        run_dir: Path,
        events: EventSink,
        stop: StopFlag,
        world: distributed.World,
        device: torch.device,
        callbacks: Sequence[Union[TrainingCallback, StepCallback]],
    ) -> _Run:
        """The method with its initial weights (the same on every rank) and its average."""
        set_determinism(seed=config.seed)
        method = create_method(config, max(dataset.classes) + 1, device)
        if method.uses_unlabeled and not dataset.unlabeled:
            raise ConfigError(
                f"method {config.method!r} learns from unlabeled images and this dataset has "
                "none; add some (--unlabeled FOLDER, or unlisted cases of --data) or use "
                f"--method {BASELINE_METHOD}"
            )
        average = WeightAverage(method.deploy_network(), config.weight_average)
        hooks = CallbackList(callbacks if world.is_main else ())
        return cls(
            dataset, config, run_dir, events, stop, world, device, hooks, method, average,
            run_id=uuid.uuid4().hex,
        )  # fmt: skip

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    # ------------------------------------------------------------ restore or warm-start

    def restore(self, state: Dict[str, Any]) -> None:
        """Continue a checkpoint: its method, average, random streams and iteration."""
        self.start = int(state["iteration"])
        stored_budget = state.get("config", {}).get("iterations")
        new_budget = stored_budget not in (None, self.config.iterations)
        stored_stage, stage = state.get("next_stage"), self.method.stage(self.start)
        if new_budget and stored_stage is not None and stored_stage != stage:
            raise ConfigError(
                f"--iterations {self.config.iterations}: the run in {self.run_dir} is at iteration "
                f"{self.start} in its {stored_stage!r} stage, which a budget of "
                f"{self.config.iterations} would make its {stage!r} stage (stages are shares of "
                f"the budget); resume with its budget of {stored_budget} or one that keeps "
                f"iteration {self.start} in {stored_stage!r}"
            )
        self.method.load_state_dict(state["method_state"], new_budget=new_budget)
        self.average.load_state_dict(state.get("weight_average"))
        restore_rng_state(state["rng"])
        self.run_id = state.get("run_id") or self.run_id
        self.labeled_weights = state.get("labeled_weights")
        self.events.log(
            f"resuming {self.checkpoint_path} at iteration {self.start} of {self.config.iterations}"
        )

    def warm_start(self, init_from: str | Path) -> None:
        """Start from a previous model's weights, with the cases new to it drawn more often."""
        config, dataset, events = self.config, self.dataset, self.events
        previous = load_checkpoint(init_from)
        weights = shrink_towards(
            previous["model"]["state_dict"],
            self.method.deploy_network().state_dict(),
            config.warm_start_shrink,
        )
        fresh = self.method.warm_start(weights, previous_method_state(previous, init_from, config))
        self.average.reset()
        events.log(
            f"warm start from {init_from}"
            + (
                f" (shrunk: {config.warm_start_shrink:g} of its weights, the rest a fresh init)"
                if config.warm_start_shrink < 1
                else ""
            )
        )
        if fresh:
            events.log(
                f"{', '.join(fresh)}: not in a {config.method} checkpoint beside {init_from}; "
                "starts fresh"
            )
        known_cases = previous_labeled(previous, init_from)
        self.labeled_weights = new_case_weights(
            [c.name for c in dataset.labeled], known_cases, config
        )
        if self.labeled_weights is not None:
            known = set(known_cases or [])
            new_cases = [c.name for c in dataset.labeled if c.name not in known]
            events.log(
                f"{config.new_case_share:.0%} of labeled patches from the {len(new_cases)} "
                f"case(s) new since that model: {', '.join(new_cases)}"
            )

    # ------------------------------------------------------------ run folder and data

    def open_folder(self, plan: Optional[Plan], resuming: bool) -> None:
        """Write the run's settings (main process) and announce the training."""
        config, dataset, world = self.config, self.dataset, self.world
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _remove_previous_outputs(self.run_dir, keep_checkpoint=resuming)
            _write_run_files(self.run_dir, config, dataset, plan)
        self.events.emit(
            "start",
            stage="training",
            message=(
                f"training {config.method} ({config.network}) on {describe_device(self.device)}"
                + (
                    f" x {world.size} processes (batch {world.size} x {config.batch_size})"
                    if world.enabled
                    else ""
                )
                + f": {len(dataset.labeled)} labeled, "
                + (
                    f"{len(dataset.unlabeled)} unlabeled"
                    if self.method.uses_unlabeled
                    else "no unlabeled"
                )
                + f" cases, {config.iterations} iterations"
            ),
            total=config.iterations,
        )

    def open_source(self, state: Optional[Dict[str, Any]]) -> None:
        """The patch streams. A resumed run continues them where they stood (rank 0's are
        stored); the others, and those of checkpoints without that record, restart from a
        seed of their own."""
        config, world = self.config, self.world
        stream_state = state.get("data_stream") if state is not None and world.is_main else None
        restarted = state is not None and stream_state is None
        self.source = BatchSource(
            self.dataset.labeled,
            distributed.shard(self.dataset.unlabeled, world) if self.method.uses_unlabeled else [],
            config,
            seed=distributed.rank_seed(
                config.seed * 1000 + (self.start if restarted else 0), world
            ),
            labeled_weights=self.labeled_weights,
            state=stream_state,
        )

    # ------------------------------------------------------------ loop

    def loop(self) -> Dict[str, float]:
        """Iterations ``start`` to the end; the last step's losses."""
        config, events, method, hooks = self.config, self.events, self.method, self.hooks
        rate = RateEstimator()
        losses: Dict[str, float] = {}
        last_stage = None
        for iteration in range(self.start, config.iterations):
            if distributed.any_rank(self.stop.requested):
                self.cancel(iteration)
            stage = method.stage(iteration)
            if stage != last_stage:
                events.emit("stage", stage=stage, iteration=iteration, total=config.iterations)
                last_stage = stage
            hooks.on_iteration_start(iteration)
            n_labeled, n_unlabeled = method.batch_composition(iteration)
            labeled = self.source.labeled(n_labeled)
            unlabeled = self.source.unlabeled(n_unlabeled) if n_unlabeled else None
            hooks.on_batch_ready(iteration)
            result = method.train_step(labeled, unlabeled, iteration)
            self.average.update()
            losses = result.losses
            _check_finite(losses, iteration, config)
            rate.step()
            done = iteration + 1
            hooks.on_step(done, method, result)
            if done % config.log_every == 0 or done == config.iterations:
                events.progress(
                    stage,
                    done,
                    config.iterations,
                    loss=losses,
                    eta=rate.eta(config.iterations - done),
                    metrics={k: v for k, v in result.info.items() if isinstance(v, (int, float))},
                    message=result.info.get("message"),
                )
            if (
                self.world.is_main
                and config.checkpoint_every
                and done % config.checkpoint_every == 0
                and done < config.iterations
            ):
                save_checkpoint(self.checkpoint_path, self.payload(done))
        return losses

    def cancel(self, iteration: int) -> None:
        """Save a checkpoint at ``iteration`` and raise CancelledError (every rank)."""
        if self.world.is_main:
            save_checkpoint(self.checkpoint_path, self.payload(iteration))
        distributed.barrier()
        self.events.emit(
            "cancelled",
            stage="training",
            iteration=iteration,
            total=self.config.iterations,
            message=f"cancelled at iteration {iteration}; checkpoint saved, --resume continues",
            outputs={"checkpoint": str(self.checkpoint_path)},
        )
        raise CancelledError(f"cancelled at iteration {iteration}")

    # ------------------------------------------------------------ finalize

    def finalize(self) -> None:
        """Apply the weight average and write the final checkpoint and the model file."""
        self.method.share_buffers()
        self.average.apply()
        if self.world.is_main:
            final = self.payload(self.config.iterations)
            save_checkpoint(self.checkpoint_path, final)
            save_checkpoint(self.run_dir / MODEL_FILE, {k: final[k] for k in MODEL_KEYS})
        distributed.dump_rank_state(self.method.state_dict(), self.world)
        distributed.barrier()  # every rank ends once the outputs are written

    def payload(self, iteration: int) -> Dict[str, Any]:
        """The checkpoint after ``iteration`` iterations."""
        config, dataset = self.config, self.dataset
        return {
            "iteration": iteration,
            "next_stage": self.method.stage(iteration),
            "config": config.to_dict(),
            "classes": {str(k): v for k, v in dataset.classes.items()},
            "method_state": self.method.state_dict(),
            "model": _model_entry(self.method),
            "preprocessing": _preprocessing(config),
            "labeled_cases": [c.name for c in dataset.labeled],
            "rng": rng_state(),
            "weight_average": self.average.state_dict(),
            "data_stream": self.source.state_dict(),
            "labeled_weights": self.labeled_weights,
            "run_id": self.run_id,
        }


#: What the model file keeps of the final checkpoint (what ``predict`` needs).
MODEL_KEYS = ("iteration", "config", "classes", "model", "preprocessing", "labeled_cases", "run_id")


class WeightAverage:
    """An exponential moving average of a network's weights (Polyak averaging), which the
    model file keeps in place of the last iterate when ``decay > 0``.

    Why: batches of a few patches make the last iterate noisy; its average over the final
    ~1/(1-decay) steps sits nearer the middle of the basin. Most useful on a short warm-start
    retraining, whose schedule has little time to anneal the noise out. The decay ramps up
    as ``(1+n)/(10+n)`` so that the first steps do not freeze the start into the average.
    The average is timm's ``ModelEmaV3`` (every floating-point tensor of the state, buffers
    too), stepped with that decay; its checkpoint entry keeps this project's format.
    """

    def __init__(self, network: torch.nn.Module, decay: float) -> None:
        self.network = network
        self.decay = float(decay)
        self.updates = 0
        self.ema: Optional[ModelEmaV3] = ModelEmaV3(network, decay=self.decay) if decay else None

    @property
    def average(self) -> Optional[Dict[str, torch.Tensor]]:
        """The averaged tensors by name (None when off)."""
        if self.ema is None:
            return None
        return {k: v for k, v in self.ema.module.state_dict().items() if v.is_floating_point()}

    def reset(self) -> None:
        """Start the average over from the network's current weights."""
        self.updates = 0
        if self.ema is not None:
            self.ema.module.load_state_dict(self.network.state_dict())

    @torch.no_grad()
    def update(self) -> None:
        """Fold the network's current weights into the average (one call per step)."""
        if self.ema is None:
            return
        self.updates += 1
        self.ema.apply_update_(
            self.network, min(self.decay, (1 + self.updates) / (10 + self.updates))
        )

    @torch.no_grad()
    def apply(self) -> None:
        """Copy the average into the network (at the end of training)."""
        if self.ema is not None:
            self.network.load_state_dict(self.average, strict=False)

    def state_dict(self) -> Optional[Dict[str, Any]]:
        if self.ema is None:
            return None
        return {"updates": self.updates, "average": self.average}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """Restore from a checkpoint; an older checkpoint without one restarts the average."""
        if self.ema is None or not state:
            self.reset()
            return
        self.updates = int(state["updates"])
        average = self.average
        for name, value in state["average"].items():
            average[name].copy_(value)


def shrink_towards(
    previous: Dict[str, torch.Tensor], fresh: Dict[str, torch.Tensor], shrink: float
) -> Dict[str, torch.Tensor]:
    """``shrink * previous + (1 - shrink) * fresh`` for every floating-point tensor.

    Shrink-and-perturb (Ash and Adams, NeurIPS 2020): a network warm-started from weights fit
    to fewer cases tends to stay in their basin and generalise worse than one trained from
    scratch; pulling the weights part way towards a fresh initialisation (which supplies the
    perturbation, at each layer's own scale) keeps most of what was learnt while restoring
    room to move. ``shrink=1`` returns the previous weights unchanged.
    """
    if shrink >= 1:
        return previous
    mixed = {}
    for name, value in previous.items():
        start = fresh.get(name)
        if start is not None and value.is_floating_point() and start.shape == value.shape:
            mixed[name] = shrink * value + (1.0 - shrink) * start.to(value.device, value.dtype)
        else:
            mixed[name] = value
    return mixed


def run_folder(path: str | Path) -> Path:
    """The run folder of a model: ``path`` itself, or the folder of a model file."""
    return Path(path) if Path(path).is_dir() else Path(path).parent


def previous_method_state(
    previous: Dict[str, Any], init_from: str | Path, config: TrainConfig
) -> Optional[Dict[str, Any]]:
    """The previous round's full method state (every network, not only the deployed one), if
    it trained with the same method: from ``previous`` when that is a checkpoint, else from
    the checkpoint in its run folder."""
    if "method_state" not in previous:
        folder = run_folder(init_from)
        if not (folder / CHECKPOINT_FILE).exists():
            return None
        try:
            previous = load_checkpoint(folder / CHECKPOINT_FILE)
        except DataError:
            return None
    if previous.get("config", {}).get("method") != config.method:
        return None
    return previous.get("method_state")


def previous_labeled(previous: Dict[str, Any], init_from: str | Path) -> Optional[List[str]]:
    """The labeled case names the warm-start model was trained on: from the model file, or
    from ``cases.json`` in its run folder (models written before the names were kept)."""
    if previous.get("labeled_cases") is not None:
        return list(previous["labeled_cases"])
    try:
        cases = json.loads((run_folder(init_from) / CASES_FILE).read_text(encoding="utf-8"))
        return [c["name"] for c in cases["labeled"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def new_case_weights(
    labeled: List[str], previous: Optional[List[str]], config: TrainConfig
) -> Optional[List[float]]:
    """Per labeled case, its relative chance of being drawn on a warm start: the cases the
    previous model was not trained on (the clinician's corrections) share ``new_case_share``
    of the patches, the others the rest. None (all equal) when that cannot be told, when no
    case or every case is new, or when the share is 0.

    Why: a warm start runs a fraction of a full training; drawn uniformly, a few new cases
    among many would get a fraction of that fraction, although they hold what the model
    has not learned yet.
    """
    if previous is None or not config.new_case_share:
        return None
    known = set(previous)
    new = [name not in known for name in labeled]
    n_new = sum(new)
    if n_new == 0 or n_new == len(labeled):
        return None
    share = float(config.new_case_share)
    return [share / n_new if is_new else (1.0 - share) / (len(labeled) - n_new) for is_new in new]


def _model_entry(method: Method) -> Dict[str, Any]:
    network = method.deploy_network()
    return {"spec": dict(network.spec), "state_dict": network.state_dict()}


def _preprocessing(config: TrainConfig) -> Dict[str, Any]:
    return {
        "modality": config.modality,
        "target_spacing": config.target_spacing,
        "ct_window": config.ct_window,
        "ct_foreground_stats": config.ct_foreground_stats,
        "patch_size": config.patch_size,
        "sliding_window_overlap": config.sliding_window_overlap,
        "sliding_window_batch": config.sliding_window_batch,
    }


def _check_finite(losses: Dict[str, float], iteration: int, config: TrainConfig) -> None:
    """Stop a training whose loss is no longer a finite number: it cannot recover, and its
    weights (NaN) would predict nothing."""
    bad = {k: v for k, v in losses.items() if v is not None and not math.isfinite(v)}
    if distributed.any_rank(bool(bad)):
        named = ", ".join(f"{k} {v}" for k, v in bad.items()) or "on another process"
        raise ConfigError(
            f"training diverged at iteration {iteration + 1}: the loss is not finite ({named}); "
            f"no model was written. Lower learning_rate (now {config.learning_rate:g}) or "
            "check the images and labels"
        )


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _remove_previous_outputs(run_dir: Path, keep_checkpoint: bool) -> None:
    """Remove a previous run's model (and, unless resuming, its checkpoint and plan) before
    this run writes its settings: the folder then holds one run or, until it ends, no model."""
    names = [MODEL_FILE] if keep_checkpoint else [MODEL_FILE, CHECKPOINT_FILE, PLAN_FILE]
    for name in names:
        (run_dir / name).unlink(missing_ok=True)


def _write_run_files(
    run_dir: Path, config: TrainConfig, dataset: Dataset, plan: Optional[Plan]
) -> None:
    write_text_atomic(run_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2))
    if plan is not None:
        write_text_atomic(run_dir / PLAN_FILE, json.dumps(plan.to_dict(), indent=2))
    cases = {
        "classes": {str(k): v for k, v in dataset.classes.items()},
        "labeled": [
            {"name": c.name, "image": str(c.image), "label": str(c.label)} for c in dataset.labeled
        ],
        "unlabeled": [{"name": c.name, "image": str(c.image)} for c in dataset.unlabeled],
    }
    write_text_atomic(run_dir / CASES_FILE, json.dumps(cases, indent=2))
