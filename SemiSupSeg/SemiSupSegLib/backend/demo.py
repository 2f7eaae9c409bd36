"""``semisupseg demo``: MSD Hippocampus, 8 labeled cases, a few minutes on a CPU, metrics and a
picture. The split is the benchmark's (``splits.benchmark_split``, seed 0): 160 training and
40 test cases; the demo labels the first 8 training cases and evaluates on the 40 test cases.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from SemiSupSegLib.backend.datasets import (
    MANIFEST_NAME,
    Dataset,
    load_dataset,
    with_labeled_subset,
)
from SemiSupSegLib.backend.errors import DataError
from SemiSupSegLib.backend.events import EventSink
from SemiSupSegLib.backend.splits import benchmark_split
from SemiSupSegLib.method_catalogue import BASELINE_METHOD
from SemiSupSegLib.output_layout import (
    EVALUATION_FOLDER,
    METRICS_FILE,
    MODEL_FILE,
    PREDICTIONS_FOLDER,
    RUN_FOLDER,
    SCORES_FILE,
    SUMMARY_FILE,
    UNCERTAINTY_FOLDER,
    uncertainty_file_name,
)

TASK = "Task04_Hippocampus"
LABELED_CASES = 8


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "semisupseg"


def locate_hippocampus(data: Optional[str], events: EventSink) -> Path:
    """--data, then $SEMISUPSEG_DATA, then the cache, then MONAI's Decathlon download."""
    for candidate, origin in (
        (data, "--data"),
        (os.environ.get("SEMISUPSEG_DATA"), "SEMISUPSEG_DATA"),
    ):
        if candidate:
            path = Path(candidate).expanduser()
            if not (path / MANIFEST_NAME).exists() and not path.name.endswith(".json"):
                raise DataError(path, f"({origin}) has no {MANIFEST_NAME}: expected MSD {TASK}")
            return path
    cached = cache_dir() / TASK
    if (cached / MANIFEST_NAME).exists():
        return cached
    events.log(f"downloading MSD {TASK} with MONAI into {cache_dir()} (about 30 MB)")
    try:
        from monai.apps import DecathlonDataset

        DecathlonDataset(
            cache_dir(), TASK, "training", download=True, cache_rate=0.0, num_workers=0
        )
    except Exception as err:  # noqa: BLE001 - no network is the usual cause
        raise DataError(
            cached,
            f"could not download {TASK} ({type(err).__name__}: {err}); download it from "
            "http://medicaldecathlon.com and pass --data FOLDER or set SEMISUPSEG_DATA",
        ) from None
    return cached


def demo_dataset(source: Path) -> tuple:
    """(training dataset with 8 labeled cases, test cases) from the benchmark split."""
    full = load_dataset(source)
    split = benchmark_split([c.name for c in full.labeled])
    test = [c for c in full.labeled if c.name in set(split.test)]
    train_cases = [c for c in full.labeled if c.name in set(split.train)]
    train = Dataset(train_cases, [], full.classes, full.modality, full.source)
    return with_labeled_subset(train, split.labeled(LABELED_CASES)), test


def run_demo(
    data: Optional[str],
    out: Path,
    events: EventSink,
    stop: Any = None,
    iterations: Optional[int] = None,
    method: str = BASELINE_METHOD,
    device: str = "auto",
) -> dict:
    from SemiSupSegLib.backend.inference import Predictor, predict_cases
    from SemiSupSegLib.backend.methods import method_class
    from SemiSupSegLib.backend.metrics import evaluate_folders, format_summary
    from SemiSupSegLib.backend.planned_training import train_planned

    source = locate_hippocampus(data, events)
    dataset, test = demo_dataset(source)
    uses_unlabeled = method_class(method).uses_unlabeled
    if not uses_unlabeled:
        dataset = Dataset(dataset.labeled, [], dataset.classes, dataset.modality, dataset.source)
    events.log(
        f"MSD Hippocampus from {source}: {len(dataset.labeled)} labeled, "
        f"{len(dataset.unlabeled)} unlabeled training cases, {len(test)} test cases"
    )
    context = {"method": method, "device": device, "modality": dataset.modality}
    explicit = {"iterations": iterations} if iterations else {}
    run_dir, predictions = out / RUN_FOLDER, out / PREDICTIONS_FOLDER
    evaluation = out / EVALUATION_FOLDER
    train_planned(dataset, context, explicit, run_dir, events, stop, plan=False)
    predict_cases(Predictor.from_run(run_dir, device=device), test, predictions, 1, events, stop)
    summary = evaluate_folders(predictions, source, evaluation)
    picture = out / "overview.png"
    write_overview(test[:4], predictions, picture)
    print(format_summary(summary))
    print(
        f"\nEverything is in {out.resolve()}:\n"
        f"  model            {run_dir / MODEL_FILE}\n"
        f"  label maps       {predictions}/<case>.nii.gz\n"
        f"  uncertainty maps {predictions / UNCERTAINTY_FOLDER}/<case>.nii.gz\n"
        f"  review order     {predictions / SCORES_FILE}\n"
        f"  metrics          {evaluation / METRICS_FILE}, {evaluation / SUMMARY_FILE}\n"
        f"  picture          {picture}"
    )
    events.emit(
        "output",
        stage="demo",
        outputs={"picture": str(picture), "summary": str(evaluation / SUMMARY_FILE)},
    )
    return summary


def write_overview(cases: list, predictions: Path, path: Path) -> Path:
    """A PNG grid: per case the image, the truth, the prediction and the uncertainty map, on the
    axial slice through the centre of the labeled structure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from SemiSupSegLib.backend.inference import output_name
    from SemiSupSegLib.backend.volumes import array_from_image, read_image

    def voxels(path: Path) -> np.ndarray:
        return array_from_image(read_image(path))

    fig, axes = plt.subplots(len(cases), 4, figsize=(10, 2.6 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        image, truth = voxels(case.image), voxels(case.label)
        pred = voxels(predictions / output_name(case))
        unc = voxels(predictions / uncertainty_file_name(output_name(case)))
        z = int(np.argwhere(truth > 0)[:, 0].mean()) if truth.any() else image.shape[0] // 2
        panels = [
            (image[z], "gray", "image"),
            (truth[z], "viridis", "truth"),
            (pred[z], "viridis", "prediction"),
            (unc[z], "inferno", "uncertainty"),
        ]
        for col, (panel, cmap, title) in enumerate(panels):
            ax = axes[row, col]
            if title in ("truth", "prediction"):
                ax.imshow(image[z], cmap="gray")
                ax.imshow(np.ma.masked_equal(panel, 0), cmap=cmap, vmin=0, vmax=2, alpha=0.6)
            else:
                ax.imshow(panel, cmap=cmap)
            ax.set_title(f"{case.name} {title}" if col == 0 else title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
