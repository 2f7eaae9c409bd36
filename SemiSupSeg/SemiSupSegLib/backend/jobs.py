"""Run a protocol v1 job: validate inputs, train, predict the unlabeled cases, report outputs.

The job's output folder holds a run folder and a prediction folder (``output_layout``); their
paths are in the final ``output`` event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from SemiSupSegLib.backend.datasets import Case, Dataset
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.output_layout import MODEL_FILE, PREDICTIONS_FOLDER, RUN_FOLDER, SCORES_FILE
from SemiSupSegLib.protocol import JobSpec


def dataset_from_job(job: JobSpec) -> Dataset:
    """The job's cases as a backend Dataset (paths already resolved)."""
    return Dataset(
        labeled=[Case(c.name, Path(c.image), Path(c.label)) for c in job.labeled],
        unlabeled=[Case(c.name, Path(c.image)) for c in job.unlabeled],
        classes={int(k): v for k, v in job.classes.items()},
        modality=job.modality,
    )


def job_context(job: JobSpec) -> Dict[str, Any]:
    """The settings a job states outside ``settings``: method, device, modality."""
    return {"method": job.method, "device": job.device, "modality": job.modality}


def run_job(
    job_path: Path, events: Optional[EventSink] = None, stop: Any = None, resume: bool = False
) -> Dict[str, str]:
    """Run ``job_path`` end to end; returns the output paths also sent as the last event."""
    from SemiSupSegLib.backend.inference import Predictor, predict_cases
    from SemiSupSegLib.backend.planned_training import train_planned

    events = events or EventSink(quiet=True)
    job = JobSpec.load(job_path).resolve(job_path.parent)
    dataset = dataset_from_job(job)
    output = Path(job.output)
    run_dir = output / RUN_FOLDER
    train_planned(
        dataset,
        job_context(job),
        dict(job.settings),
        run_dir,
        events,
        stop,
        plan=job.plan,
        budget=job.budget,
        resume=resume,
        init_from=job.init_from,
        check_unlabeled=True,  # the unlabeled cases are predicted after training
    )
    outputs = {"model": str(run_dir / MODEL_FILE), "run": str(run_dir)}
    if job.predict_unlabeled and dataset.unlabeled:
        predictor = Predictor.from_run(run_dir, device=job.device)
        predictions = output / PREDICTIONS_FOLDER
        predict_cases(predictor, dataset.unlabeled, predictions, 1, events, stop)
        outputs.update({"predictions": str(predictions), "scores": str(predictions / SCORES_FILE)})
    events.emit("output", stage="job", message=f"job finished: {output}", outputs=outputs)
    return outputs
