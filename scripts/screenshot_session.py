"""A real SemiSupSeg session for the README pictures, made the way the Slicer panel makes one.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/screenshot_session.py OUTPUT_FOLDER \
        [--data MSD_HIPPOCAMPUS] [--labeled 8] [--unlabeled 12] [--method mn] [--iterations 300]

The module's own Slicer-side code runs on a slicer-core MRML scene: labeled hippocampus cases
(labelmap volumes named by the data set's classes) and unlabeled volumes are exported by the
Workflow, round 1 trains and predicts in the backend process, the table's first case is loaded
and accepted as labeled, and round 2 retrains (warm start). Each round's event stream is also
written to ``round-NNN/events.jsonl`` so that scripts/render_panel.py can replay it.
``scripts/render_panel.py OUTPUT_FOLDER`` and ``scripts/render_review.py OUTPUT_FOLDER`` then
draw the pictures from these files.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SemiSupSeg"))

from SemiSupSegLib import mrml_io  # noqa: E402
from SemiSupSegLib.backend_process import BackendProcess  # noqa: E402
from SemiSupSegLib.job_export import LabeledPair  # noqa: E402
from SemiSupSegLib.method_catalogue import DEFAULT_METHOD  # noqa: E402
from SemiSupSegLib.training_options import TrainingOptions  # noqa: E402
from SemiSupSegLib.workflow import Workflow  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "msd-hippocampus"
EVENTS_FILE = "events.jsonl"
# Slicer-like colours for the data set's classes (value 1, 2...).
CLASS_COLOURS = [(0.95, 0.55, 0.2), (0.3, 0.55, 0.95), (0.45, 0.8, 0.35)]


class RecordingProcess(BackendProcess):
    """The backend process, with every stdout line also appended to the round's events file."""

    def readLines(self, maxLines: int = 10000):
        lines = super().readLines(maxLines)
        if lines:
            with open(Path(self.cwd) / EVENTS_FILE, "a", encoding="utf-8") as handle:
                handle.writelines(line + "\n" for line in lines)
        return lines


def labelled_scene(data: Path, labeled: int, unlabeled: int):
    """A scene with ``labeled`` (volume, labelmap) pairs and ``unlabeled`` more volumes."""
    import slicer

    mrml_io.ensureSegmentationConverters()
    scene = slicer.vtkMRMLScene()
    manifest = json.loads((data / "dataset.json").read_text())
    names = [manifest["labels"][k] for k in sorted(manifest["labels"], key=int) if k != "0"]
    colours = slicer.vtkMRMLColorTableNode()
    colours.SetTypeToUser()
    colours.SetNumberOfColors(len(names) + 1)
    colours.SetColor(0, "background", 0, 0, 0, 0)
    for value, name in enumerate(names, start=1):
        colours.SetColor(value, name, *CLASS_COLOURS[(value - 1) % len(CLASS_COLOURS)], 1)
    scene.AddNode(colours)
    cases = manifest["training"][: labeled + unlabeled]
    pairs, volumes = [], []
    for index, case in enumerate(cases):
        image = data / case["image"]
        name = image.name.split(".")[0]
        volume = mrml_io.readVolumeNode(scene, image, name)
        if index < labeled:
            labels = mrml_io.readVolumeNode(scene, data / case["label"], f"{name} labels", True)
            labels.GetDisplayNode().SetAndObserveColorNodeID(colours.GetID())
            pairs.append(LabeledPair(volume, labels))
        else:
            volumes.append(volume)
    return scene, pairs, volumes


def run_round(workflow: Workflow, job: Path) -> None:
    runner = workflow.startJob(job)
    workflow.wait()
    if not runner.succeeded:
        raise SystemExit(f"{job}: {runner.progress.errorText}")
    print(f"{job.parent.name}: {runner.progress.statusText()}", flush=True)


def render_command(render, default_output: Path, usage: str) -> None:
    """The command line of the render scripts: SESSION [OUTPUT.png]."""
    if len(sys.argv) not in (2, 3):
        raise SystemExit(usage)
    path = render(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else default_output)
    print(f"wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--labeled", type=int, default=8)
    parser.add_argument("--unlabeled", type=int, default=12)
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--settings", default="{}", help="more job settings, as JSON")
    args = parser.parse_args(argv)

    scene, pairs, unlabeled = labelled_scene(args.data, args.labeled, args.unlabeled)
    options = TrainingOptions(
        method=args.method,
        preset="custom",
        iterations=args.iterations,
        device="cpu",
        extraSettings=json.loads(args.settings),
    )
    workflow = Workflow(scene, args.output, RecordingProcess, python=sys.executable)
    run_round(workflow, workflow.exportJob(pairs, unlabeled, None, options))
    most_uncertain = workflow.reviewRows()[0].case
    workflow.loadCase(most_uncertain)
    workflow.acceptCase(most_uncertain)
    run_round(workflow, workflow.exportRetrainJob(pairs, options))


if __name__ == "__main__":
    main()
