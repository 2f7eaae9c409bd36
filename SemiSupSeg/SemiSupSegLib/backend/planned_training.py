"""From the settings a user gave to a trained run folder, planned from the data unless told
otherwise: the one path the command line, jobs and method comparison share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

from SemiSupSegLib.backend.datasets import Dataset
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.protocol import DEFAULT_BUDGET


def train_planned(
    dataset: Dataset,
    context: Dict[str, Any],
    explicit: Dict[str, Any],
    run_dir: Union[str, Path],
    events: EventSink,
    stop: Any = None,
    plan: bool = True,
    budget: str = DEFAULT_BUDGET,
    resume: bool = False,
    init_from: Optional[Union[str, Path]] = None,
    check_unlabeled: Optional[bool] = None,
) -> Any:
    """Check the settings and the data, plan, then train ``dataset`` into ``run_dir``.

    Args:
        dataset: the cases to train on.
        context: settings that are not the user's choice of value (method, device, modality).
        explicit: the settings the user gave; they override the plan and are listed as such.
        run_dir: the run folder (``model.pt``, ``checkpoint.pt``, ``config.json``, ``plan.json``).
        events: where progress, the plan and warnings go.
        stop: a ``StopFlag``; training saves a checkpoint and stops when it is set.
        plan: plan from the data and device (``planning.plan_training``); False: the preset.
            A resumed run keeps the settings it started with and is not planned again.
        budget: quick, standard or thorough (``protocol.TIME_BUDGETS``), unless ``explicit``
            gives ``iterations``.
        resume: continue the run in ``run_dir``.
        init_from: warm start from this run folder or model file.
        check_unlabeled: also check the unlabeled images (default: when the method uses them).

    Returns:
        The ``TrainResult`` of ``training.train``.

    Raises:
        ConfigError, DataError: bad settings or data, before anything is written.
    """
    from SemiSupSegLib.backend.config import TrainConfig
    from SemiSupSegLib.backend.methods import method_class
    from SemiSupSegLib.backend.planning import plan_training
    from SemiSupSegLib.backend.training import train
    from SemiSupSegLib.backend.validation import check_dataset

    config = TrainConfig.from_dict({**context, **explicit}).validate()
    if check_unlabeled is None:
        check_unlabeled = method_class(config.method).uses_unlabeled
    check_dataset(dataset, events, check_unlabeled=check_unlabeled)
    training_plan = None
    if plan and not resume:
        config, training_plan = plan_training(dataset, context, explicit, events, budget)
    return train(
        dataset,
        config,
        run_dir,
        events,
        stop,
        resume=resume,
        init_from=init_from,
        plan=training_plan,
        new_budget=config.iterations if "iterations" in explicit else None,
    )
