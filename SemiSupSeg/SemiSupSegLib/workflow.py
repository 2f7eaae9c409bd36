"""A whole labeling round without the GUI: scene -> job -> backend -> review -> accept -> retrain.

``Workflow`` takes the MRML scene and the process class as arguments, so the Slicer Logic
passes ``slicer.mrmlScene`` and ``BackendProcess``, and tests pass a ``slicer-core`` scene and
a real or fake process. Nothing here waits for the backend except ``wait`` (for scripts).

Each round's parts are timed (export, the backend's start-up, checks, training and prediction,
and the import of its results into the review table); the times are kept in the session and
written to the job's log when it ends.

A Python console user can script a round::

    wf = logic.workflow  # or Workflow(slicer.mrmlScene, "/data/session", python=...)
    job = wf.exportJob([LabeledPair(volume, segmentation)], unlabeledFolder="/data/unlabeled")
    wf.startJob(job); wf.wait()
    rows = wf.reviewRows(); loaded = wf.loadCase(rows[0].case)
    wf.acceptCase(rows[0].case); wf.startJob(wf.exportRetrainJob([...])); wf.wait()
"""

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from SemiSupSegLib import mrml_io
from SemiSupSegLib.backend_process import (
    BackendProcess,
    backendCommand,
    backendEnvironment,
    slicerPython,
)
from SemiSupSegLib.job_export import ExportProgress, JobExporter, LabeledPair
from SemiSupSegLib.job_runner import JobRunner
from SemiSupSegLib.progress import EXPORT, IMPORT, roundTimesText
from SemiSupSegLib.protocol import JOB_FILE_NAME, JobSpec
from SemiSupSegLib.results import ResultsError, ReviewRow, Session
from SemiSupSegLib.scene_import import LoadedCase, loadReviewCase
from SemiSupSegLib.training_options import TrainingOptions


class WorkflowError(RuntimeError):
    """A step that cannot be done now (e.g. accept before any result); the message says why."""


class Workflow:
    def __init__(
        self,
        scene,
        outputFolder,
        processFactory: Callable[..., Any] = BackendProcess,
        python: Optional[str] = None,
        environment: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.scene = scene
        self.processFactory = processFactory
        # the interpreter is looked for only when a job starts: a panel whose user runs an
        # external Python must work where PythonSlicer cannot be found
        self.python = python
        self.environment = dict(environment) if environment is not None else None
        self.session = Session.load(outputFolder)
        self.runner: Optional[JobRunner] = None
        self.currentRound: Optional[int] = None
        self.sourceVolumes: Dict[str, Any] = {}
        self.loaded: Dict[str, LoadedCase] = {}
        #: The review rows of the last round that finished, as imported when it did.
        self.importedRows: Optional[List[ReviewRow]] = None

    @property
    def outputFolder(self) -> Path:
        return self.session.folder

    def setOutputFolder(self, folder) -> None:
        if self.running:
            raise WorkflowError("a job is running; cancel it before changing the output folder")
        if Path(folder).resolve() != self.session.folder.resolve():
            self.session = Session.load(folder)
            self.loaded = {}

    def forgetSceneNodes(self) -> None:
        """The scene is closing: drop the loaded review cases and the scene volumes of earlier
        exports (cases load from their files again). A running job is not affected."""
        self.loaded = {}
        self.sourceVolumes = {}

    # -------------------------------------------------------------------- export

    def exportJob(
        self,
        pairs: Sequence[LabeledPair],
        unlabeledVolumes: Sequence[Any] = (),
        unlabeledFolder: Optional[str] = None,
        options: Optional[TrainingOptions] = None,
        progress: Optional[ExportProgress] = None,
    ) -> Path:
        """Write a new round's job folder from the scene; returns the path of job.json.

        ``progress`` hears of each file written; if it raises (e.g. ``ExportCancelled``), the
        round's folder is removed again."""
        return self._export(
            pairs, unlabeledVolumes, unlabeledFolder, options, retrain=False, progress=progress
        )

    def exportRetrainJob(
        self,
        pairs: Sequence[LabeledPair],
        options: Optional[TrainingOptions] = None,
        progress: Optional[ExportProgress] = None,
    ) -> Path:
        """The next round: the scene's labeled pairs plus every accepted case, the remaining
        unlabeled cases of the last round, warm-started from the last round's model for
        ``options.retrainShare`` of the iterations, or from scratch for the full budget if
        ``options.warmStart`` is off (``TrainingOptions.forRetraining``)."""
        options = (options or TrainingOptions()).validate().forRetraining()
        return self._export(pairs, (), None, options, retrain=True, progress=progress)

    def _export(
        self, pairs, unlabeledVolumes, unlabeledFolder, options, retrain: bool, progress=None
    ) -> Path:
        if self.running:
            raise WorkflowError("a job is already running")
        extraLabeled, extraUnlabeled, initFrom, classes = [], [], None, None
        if retrain:
            try:
                extraLabeled, extraUnlabeled, initFrom = self.session.retrainInputs()
            except ResultsError as err:
                raise WorkflowError(str(err)) from None
            if not options.warmStart:
                initFrom = None
            classes = self.session.classes
            if not extraLabeled:
                raise WorkflowError(
                    "no case was accepted yet: accept at least one reviewed case before retraining"
                )
        number, jobDir = self.session.newRound()
        exporter = JobExporter(self.scene, jobDir)
        started = time.perf_counter()
        try:
            job, table = exporter.export(
                list(pairs),
                unlabeledVolumes,
                unlabeledFolder,
                options,
                initFrom=initFrom,
                extraLabeled=extraLabeled,
                extraUnlabeled=extraUnlabeled,
                classes=classes,
                progress=progress,
            )
        except Exception:
            shutil.rmtree(jobDir, ignore_errors=True)
            raise
        self.sourceVolumes.update(exporter.exportedNodes)
        self.session.recordRound(number, jobDir, job, table)
        self.session.recordTimes(number, {EXPORT: time.perf_counter() - started})
        return jobDir / JOB_FILE_NAME

    # ----------------------------------------------------------------------- run

    def startJob(self, jobPath, device: Optional[str] = None) -> JobRunner:
        """Start the backend on ``jobPath``; returns at once (poll the runner or this object)."""
        if self.running:
            raise WorkflowError("a job is already running")
        jobPath = Path(jobPath)
        job = JobSpec.load(jobPath)
        number = self._roundOf(jobPath)
        env = backendEnvironment(self.environment, device or job.device)
        command = backendCommand(self.python or slicerPython(), jobPath.resolve())
        runner = JobRunner(self.processFactory)
        runner.onFinished.append(lambda r: self._finished(number, r))
        self.runner, self.currentRound = runner, number
        runner.start(command, env=env, cwd=str(jobPath.parent))
        return runner

    @property
    def running(self) -> bool:
        return self.runner is not None and self.runner.running

    def poll(self) -> List[Dict[str, Any]]:
        return self.runner.poll() if self.runner is not None else []

    def cancel(self) -> None:
        if self.runner is not None:
            self.runner.cancel()

    def shutdown(self) -> None:
        """Stop a running job and wait until its processes are gone (Slicer is closing)."""
        if self.runner is not None:
            self.runner.stop()

    def wait(
        self, timeout: Optional[float] = None, processEvents: Optional[Callable[[], None]] = None
    ) -> bool:
        """Poll until the job ends (scripts and tests; the GUI polls from a timer instead)."""
        if self.runner is None:
            return True
        return self.runner.wait(timeout=timeout, processEvents=processEvents)

    def _roundOf(self, jobPath: Path) -> Optional[int]:
        for record in self.session.rounds:
            if self.session.roundFolder(record.round).resolve() == jobPath.parent.resolve():
                return record.round
        return None

    def _finished(self, number: Optional[int], runner: JobRunner) -> None:
        """Record the round's outcome and times; import a finished round's results (its review
        rows, ``importedRows``) and log how long each part of the round took."""
        self.importedRows = None
        if number is None:
            return
        status = "finished" if runner.succeeded else "cancelled" if runner.cancelled else "failed"
        progress = runner.progress
        self.session.finishRound(number, status, progress.outputs, progress.partSeconds())
        if not runner.succeeded:
            return
        started = time.perf_counter()
        try:
            self.importedRows = self.session.reviewRows(number)
        except ResultsError as err:
            self.importedRows = None
            progress.addLog(f"Could not read the results: {err}")
            return
        record = self.session.recordTimes(number, {IMPORT: time.perf_counter() - started})
        progress.addLog(roundTimesText(number, record.times))

    # -------------------------------------------------------------------- review

    def reviewRows(self, roundNumber: Optional[int] = None) -> List[ReviewRow]:
        return self.session.reviewRows(roundNumber)

    def row(self, case: str, roundNumber: Optional[int] = None) -> ReviewRow:
        for row in self.reviewRows(roundNumber):
            if row.case == case:
                return row
        raise WorkflowError(f"case '{case}' is not among the results to review")

    def loadCase(
        self, case: str, roundNumber: Optional[int] = None, colourMap: str = "Inferno"
    ) -> LoadedCase:
        """Bring the case's volume, pseudo-mask and uncertainty map into the scene."""
        if self.session.classes is None:
            raise WorkflowError("no class names recorded for this output folder")
        row = self.row(case, roundNumber)
        volume = self.sourceVolumes.get(case)
        if volume is not None and not self.scene.IsNodePresent(volume):
            volume = None
        loaded = loadReviewCase(self.scene, row, self.session.classes, volume, colourMap)
        self.loaded[case] = loaded
        return loaded

    def acceptCase(self, case: str, segmentationNode=None, roundNumber: Optional[int] = None):
        """Save the case's (possibly corrected) segmentation as a new label file version and
        move the case into the labeled set of the next round. Never overwrites a file."""
        row = self.row(case, roundNumber)
        loaded = self.loadedCase(case)
        if segmentationNode is None:
            if loaded is None:
                raise WorkflowError(f"load case '{case}' before accepting it")
            segmentationNode = loaded.segmentation
        reference = loaded.volume if loaded is not None else None
        if reference is None:
            raise WorkflowError(f"case '{case}' has no volume in the scene")
        path = self.session.reserveLabelVersion(case)
        try:
            mrml_io.exportSegmentsToFile(
                self.scene, segmentationNode, self.session.classes.names, reference, path
            )
        except Exception:
            if path.exists() and path.stat().st_size == 0:
                path.unlink()  # the reserved name was never written
            raise
        return self.session.accept(case, row.image, path, row.round)

    def loadedCase(self, case: str) -> Optional[LoadedCase]:
        """The case as loaded in the scene, or None (never loaded, or its nodes were removed)."""
        loaded = self.loaded.get(case)
        return loaded if loaded is not None and self._inScene(loaded) else None

    def _inScene(self, loaded: LoadedCase) -> bool:
        nodes = (loaded.volume, loaded.segmentation, loaded.uncertainty)
        return all(node is not None and self.scene.IsNodePresent(node) for node in nodes)
