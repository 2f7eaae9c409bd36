import logging
import os
import pathlib
import sys
import time
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SemiSupSegLib import dependencies, mrml_io
from SemiSupSegLib.backend_process import BackendProcess, backendEnvironment, slicerPython
from SemiSupSegLib.job_export import ExportCancelled, JobExporter, LabeledPair
from SemiSupSegLib.method_catalogue import DEFAULT_METHOD, describe_methods, method_names
from SemiSupSegLib.output_layout import review_order
from SemiSupSegLib.progress import planSummary
from SemiSupSegLib.protocol import MODALITIES
from SemiSupSegLib.scene_import import COLOUR_MAPS, setUncertaintyColours
from SemiSupSegLib.training_options import (
    CUSTOM_PRESET,
    DEFAULT_ENCODER_2D,
    DEFAULT_ITERATIONS,
    DEFAULT_NETWORK_3D,
    DEFAULT_PRESET,
    DEVICE_NAMES,
    MEMORY_LIMITED,
    NETWORKS_3D,
    PRESET_NAMES,
    TrainingOptions,
    budgetLimitOf,
    describeBudgets,
    describeGpu,
    needsEncoder,
    parseExtraSettings,
)
from SemiSupSegLib.workflow import Workflow

#
# SemiSupSeg
#


class SemiSupSeg(ScriptedLoadableModule):
    """Semi-supervised 3D segmentation: label a few cases, train in the background, review
    pseudo-masks and uncertainty, correct, retrain."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Semi-Supervised Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SemiSupSeg developers"]
        self.parent.helpText = _(
            """
Train a 3D segmentation model from a few labeled volumes and many unlabeled ones
(M&amp;N 2D/3D co-training, embedding matching, or both), in a background process.
Review the pseudo-masks of the unlabeled volumes, sorted by a case score, with their
uncertainty maps; correct them in the Segment Editor, accept them as labeled, and retrain.
See <a href="https://github.com/semisupseg/SemiSupSeg">the documentation</a>.
"""
        )
        self.parent.acknowledgementText = _(
            """
Methods: Yeung et al., "Semi-Supervised 3D Medical Segmentation from 2D Natural Images
Pretrained Model" (MLMI 2025), and Xie et al., "Semi-Supervised Segmentation via Embedding
Matching" (MIDL 2024). Built on PyTorch, MONAI, timm and SimpleITK.
"""
        )


#
# SemiSupSegParameterNode
#


@parameterNodeWrapper
class SemiSupSegParameterNode:
    """The module's state, saved with the scene.

    labeledVolumes/labeledSegmentations - the labeled pairs (same index = same case).
    pendingVolume/pendingSegmentation - the pair being picked in the Data section.
    unlabeledVolumes - unlabeled volumes from the scene; unlabeledFolder - or from disk.
    method ... extraSettings - training choices; outputFolder - where rounds are written.
    preset - a time budget (the backend's iterations for its device) or custom; iterations -
    the custom number, else the budget's iterations on the device the panel detected.
    colourMap, uncertaintyOpacity - how the uncertainty overlay is shown.
    fastRetrain - Retrain warm-starts for a fifth of the budget (else from scratch, in full).
    """

    labeledVolumes: list[vtkMRMLScalarVolumeNode]
    labeledSegmentations: list[vtkMRMLNode]
    pendingVolume: vtkMRMLScalarVolumeNode
    pendingSegmentation: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    unlabeledVolumes: list[vtkMRMLScalarVolumeNode]
    unlabeledFolder: pathlib.Path
    method: Annotated[str, Choice(list(method_names()))] = DEFAULT_METHOD
    modality: Annotated[str, Choice(list(MODALITIES))] = "MR"
    network3D: Annotated[str, Choice(list(NETWORKS_3D))] = DEFAULT_NETWORK_3D
    encoder2D: str = DEFAULT_ENCODER_2D
    preset: Annotated[str, Choice(list(PRESET_NAMES))] = DEFAULT_PRESET
    iterations: Annotated[int, WithinRange(1, 1000000)] = DEFAULT_ITERATIONS
    device: Annotated[str, Choice(list(DEVICE_NAMES))] = "auto"
    useExternalPython: bool = False
    externalPython: pathlib.Path
    outputFolder: pathlib.Path
    extraSettings: str = ""
    colourMap: Annotated[str, Choice(list(COLOUR_MAPS))] = "Inferno"
    uncertaintyOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.4
    fastRetrain: bool = True


def _isSet(path: Optional[pathlib.Path]) -> bool:
    return path is not None and str(path) not in ("", ".")


#
# SemiSupSegWidget
#


class SemiSupSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the logic; the GUI thread only polls the backend from a QTimer."""

    POLL_MSEC = 250
    # The plan line's tool tip from the .ui (how the plan is made), read before a plan's table
    # replaces it, and shown again while there is no plan.
    _planHelp: Optional[str] = None
    # Retrain was pressed before the dependency check had found the device: it starts when
    # the check finishes.
    _retrainAfterCheck = False

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self._watchedRunner = None
        self.pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SemiSupSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SemiSupSegLogic()
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(self.POLL_MSEC)
        self.pollTimer.connect("timeout()", self.onPollTimer)

        self.ui.presetComboBox.toolTip = describeBudgets()
        self.ui.methodComboBox.toolTip = describe_methods()
        self._showPlan(None)
        for table in (self.ui.labeledTable, self.ui.resultsTable):
            table.horizontalHeader().setSectionResizeMode(qt.QHeaderView.ResizeToContents)
            table.horizontalHeader().setStretchLastSection(True)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.addLabeledButton.connect("clicked(bool)", self.onAddLabeled)
        self.ui.removeLabeledButton.connect("clicked(bool)", self.onRemoveLabeled)
        self.ui.unlabeledVolumesSelector.connect("checkedNodesChanged()", self.onUnlabeledChanged)
        self.ui.checkDependenciesButton.connect("clicked(bool)", self.onCheckDependencies)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadResultsButton.connect("clicked(bool)", self.onLoadResults)
        self.ui.resultsTable.connect("itemSelectionChanged()", self.onResultSelected)
        self.ui.uncertaintyOpacitySliderWidget.connect("valueChanged(double)", self.onOpacity)
        self.ui.colourMapComboBox.connect("currentIndexChanged(int)", self.onColourMap)
        self.ui.editSegmentationButton.connect("clicked(bool)", self.onEditSegmentation)
        self.ui.acceptButton.connect("clicked(bool)", self.onAccept)
        self.ui.retrainButton.connect("clicked(bool)", self.onRetrain)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Slicer unloads the module (it is closing): no backend may outlive it."""
        if self.pollTimer is not None:
            self.pollTimer.stop()
        if self.logic is not None:
            self.logic.shutdown()
        self.removeObservers()

    def onReload(self) -> None:
        """Reload SemiSupSegLib with the module: Slicer's reload re-reads only this file, and
        edits to the library would otherwise need a restart."""
        for name in [n for n in sys.modules if n.split(".")[0] == "SemiSupSegLib"]:
            del sys.modules[name]  # imported afresh when this file is executed again
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()
        if self.logic.dependencyProbe is None and not self.logic.checkingDependencies:
            try:  # in the background: shows what is missing and the GPU
                self.logic.startDependencyCheck(self._parameterNode)
                self.ui.dependenciesLabel.text = _("checking...")
                self.pollTimer.start()
            except Exception as err:  # e.g. no external Python chosen yet: the user checks later
                logging.info(f"SemiSupSeg: dependencies not checked ({err})")

    def exit(self) -> None:
        # the poll timer keeps running: a job continues while another module is shown
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.logic.onSceneStartClose()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
        elif self._watchedRunner is None:
            self._fillResultsTable([])  # the closed scene's rows; enter() shows the new ones

    def initializeParameterNode(self) -> None:
        """Also on every enter and after a scene close: the results table shows the parameter
        node's output folder (another scene may name another one), unless a job fills it."""
        self.setParameterNode(self.logic.getParameterNode())
        if not _isSet(self._parameterNode.outputFolder):
            self._parameterNode.outputFolder = self.logic.initialOutputFolder()
        if self._watchedRunner is None:
            try:
                self._fillResultsTable()
            except Exception as err:
                self._fillResultsTable([])
                logging.warning(f"SemiSupSeg: could not read earlier results: {err}")

    def setParameterNode(self, inputParameterNode: Optional[SemiSupSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
            self.updateGui()

    # ----------------------------------------------------------------- GUI state

    def updateGui(self, caller=None, event=None) -> None:
        if self._updatingGui or not self._parameterNode:
            return
        self._updatingGui = True
        try:
            p = self._parameterNode
            self.ui.iterationsSpinBox.enabled = p.preset == CUSTOM_PRESET
            if p.preset != CUSTOM_PRESET:  # show what the budget runs on this machine
                iterations = self.logic.budgetIterations(p)
                if p.iterations != iterations:
                    p.iterations = iterations
            self.ui.encoder2DLineEdit.enabled = needsEncoder(p.method)
            self.ui.externalPythonPathLineEdit.enabled = p.useExternalPython
            self._syncUnlabeledSelector()
            self._fillLabeledTable()
            classesText, classesOk = self.logic.describeClasses(p)
            self.ui.classesLabel.text = classesText
            self.ui.classesLabel.setStyleSheet("" if classesOk else "color: #c0392b")
            running = self.logic.running
            self.ui.applyButton.enabled = running or (classesOk and _isSet(p.outputFolder))
            self.ui.applyButton.text = _("Cancel") if running else _("Train and predict")
            self.ui.applyButton.toolTip = (
                _("Stop the job and every process it started")
                if running
                else _("Export the job, train in the background and predict the unlabeled cases")
            )
            self._updateReviewButtons()
        finally:
            self._updatingGui = False

    def _syncUnlabeledSelector(self) -> None:
        wanted = {n.GetID() for n in self._parameterNode.unlabeledVolumes if n is not None}
        selector = self.ui.unlabeledVolumesSelector
        wasBlocked = selector.blockSignals(True)
        for index in range(selector.nodeCount()):
            node = selector.nodeFromIndex(index)
            state = qt.Qt.Checked if node.GetID() in wanted else qt.Qt.Unchecked
            selector.setCheckState(node, state)
        selector.blockSignals(wasBlocked)

    def _fillLabeledTable(self) -> None:
        rows = []
        for volume, labels in self.logic.labeledNodePairs(self._parameterNode):
            rows.append((volume.GetName(), labels.GetName(), _("user")))
        for case, label, origin in self.logic.acceptedCases(self._parameterNode):
            rows.append((case, os.path.basename(label), origin))
        table = self.ui.labeledTable
        table.setRowCount(len(rows))
        for row, values in enumerate(rows):
            for column, value in enumerate(values):
                table.setItem(row, column, qt.QTableWidgetItem(value))

    def _fillResultsTable(self, rows=None) -> None:
        if rows is None:
            rows = self.logic.reviewRows(self._parameterNode)
        table = self.ui.resultsTable
        table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            for column, value in enumerate(row.cells()):
                item = qt.QTableWidgetItem(value)
                item.setData(qt.Qt.UserRole, row.case)
                table.setItem(index, column, item)
        if rows:
            self.ui.resultsLabel.text = _("Round {round}: {count} case(s), {order}").format(
                round=rows[0].round, count=len(rows), order=review_order()
            )
        else:
            self.ui.resultsLabel.text = _("No results yet")
        self._updateReviewButtons()

    def _selectedCase(self) -> Optional[str]:
        items = self.ui.resultsTable.selectedItems()
        return items[0].data(qt.Qt.UserRole) if items else None

    def _updateReviewButtons(self) -> None:
        case = self._selectedCase()
        idle = not self.logic.running
        p = self._parameterNode  # None while the scene closes
        self.ui.editSegmentationButton.enabled = case is not None
        self.ui.acceptButton.enabled = case is not None and idle
        self.ui.retrainButton.enabled = idle and p is not None and self.logic.canRetrain(p)

    # ---------------------------------------------------------------------- data

    def onAddLabeled(self) -> None:
        p = self._parameterNode
        if not p.pendingVolume or not p.pendingSegmentation:
            slicer.util.warningDisplay(_("Pick a volume and its segmentation first."))
            return
        pairs = self.logic.labeledNodePairs(p)
        if any(volume is p.pendingVolume for volume, _labels in pairs):
            slicer.util.warningDisplay(_("This volume is already a labeled case."))
            return
        self.logic.setLabeledNodePairs(p, pairs + [(p.pendingVolume, p.pendingSegmentation)])

    def onRemoveLabeled(self) -> None:
        row = self.ui.labeledTable.currentRow()
        pairs = self.logic.labeledNodePairs(self._parameterNode)
        if 0 <= row < len(pairs):
            self.logic.setLabeledNodePairs(self._parameterNode, pairs[:row] + pairs[row + 1 :])

    def onUnlabeledChanged(self) -> None:
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.unlabeledVolumes = list(
                self.ui.unlabeledVolumesSelector.checkedNodes()
            )

    # -------------------------------------------------------------- dependencies

    def onCheckDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(
            _("Could not check the dependencies."), waitCursor=True
        ):
            self.logic.startDependencyCheck(self._parameterNode)
            self.ui.dependenciesLabel.text = _("checking...")
            self.ui.checkDependenciesButton.enabled = False
            self.pollTimer.start()

    def onInstallDependencies(self) -> None:
        p = self._parameterNode
        missing = self.logic.missingRequirements()
        if not missing:
            return
        if p.useExternalPython:
            command = dependencies.externalInstallCommand(str(p.externalPython), missing)
            slicer.util.infoDisplay(
                _("Install the missing packages in that environment, then check again:"),
                detailedText=command,
            )
            return
        plan = self.logic.installPlan()
        if plan.empty or not slicer.util.confirmOkCancelDisplay(plan.description()):
            return
        with slicer.util.tryWithErrorDisplay(_("Installation failed."), waitCursor=True):
            self.logic.installDependencies(plan)  # pip on the main thread, as Slicer requires
        self.onCheckDependencies()

    def _dependencyCheckFinished(self) -> None:
        result = self.logic.dependencyProbe
        self.ui.checkDependenciesButton.enabled = True
        self.ui.dependenciesLabel.text = dependencies.summary(
            result, self.logic.requirements(self._parameterNode)
        )
        self.ui.installDependenciesButton.enabled = bool(self.logic.missingRequirements())
        gpuText, hasGpu = describeGpu(self.logic.probeAnswer())
        self.ui.gpuLabel.text = _("GPU: {text}").format(text=gpuText)
        if not hasGpu and self._parameterNode and self._parameterNode.device != "cpu":
            logging.warning("SemiSupSeg: no GPU found, training will run on the CPU")
        self.updateGui()  # a named budget's iterations depend on the GPU found
        if self._retrainAfterCheck:
            self._retrainAfterCheck = False
            self.onRetrain()

    # ----------------------------------------------------------------------- run

    def onApplyButton(self) -> None:
        if self.logic.running:
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        self._exportAndStart(self.logic.exportJob, _("Could not start the job."))

    def onRetrain(self) -> None:
        p = self._parameterNode
        if self.logic.retrainWaitsForCheck(p):
            if not self.logic.checkingDependencies:
                self.onCheckDependencies()
            self._retrainAfterCheck = True
            self.ui.statusLabel.text = _(
                "Retraining starts when the dependency check has found the device "
                "(its share of the budget depends on it)."
            )
            return
        note = self.logic.retrainNote(p)
        self._exportAndStart(self.logic.exportRetrainJob, _("Could not start retraining."), note)

    def _exportAndStart(self, export, errorText: str, note: Optional[str] = None) -> None:
        """Write the job's inputs under a progress dialog (its Cancel stops the export and
        removes what was written), then start the backend."""
        dialog = slicer.util.createProgressDialog(
            windowTitle=_("Semi-Supervised Segmentation"),
            labelText=_("Writing the job's inputs..."),
            maximum=0,
            windowModality=qt.Qt.ApplicationModal,
        )

        def progress(done: int, total: int, what: str) -> None:
            dialog.maximum = total
            dialog.value = done
            dialog.labelText = _("Writing {what} ({done} of {total})").format(
                what=what, done=min(done + 1, total), total=total
            )
            slicer.app.processEvents()
            if dialog.wasCanceled:
                raise ExportCancelled(_("the export was cancelled"))

        try:
            with slicer.util.tryWithErrorDisplay(errorText):
                try:
                    jobPath = export(self._parameterNode, progress=progress)
                except ExportCancelled:
                    self.ui.statusLabel.text = _("Export cancelled: no job was started.")
                    return
                self._start(jobPath, note)
        finally:
            dialog.close()

    def _start(self, jobPath, note: Optional[str] = None) -> None:
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.statusLabel.setStyleSheet("")
        self._showPlan(None)
        self._watchedRunner = self.logic.startJob(jobPath, self._parameterNode)
        self._rememberPathsOfThisJob()
        self.ui.logTextEdit.appendPlainText(_("Job: {path}").format(path=jobPath))
        if note:
            self.ui.logTextEdit.appendPlainText(note)
        self.pollTimer.start()
        self.updateGui()

    def _rememberPathsOfThisJob(self) -> None:
        """Add the job's paths to their fields' history (Slicer's settings, under each field's
        settingKey), offered in the fields' drop-downs from then on."""
        fields = [self.ui.outputFolderPathLineEdit, self.ui.unlabeledFolderPathLineEdit]
        if self._parameterNode.useExternalPython:
            fields.append(self.ui.externalPythonPathLineEdit)
        for field in fields:
            field.addCurrentPathToHistory()  # an empty path is not added

    def onPollTimer(self) -> None:
        """Runs on the GUI thread every POLL_MSEC; every call returns at once."""
        if self.logic.pollDependencyCheck():
            self._dependencyCheckFinished()
        runner = self._watchedRunner
        if runner is not None:
            self.logic.poll()
            progress = runner.progress
            for line in progress.takeNewLogLines():
                self.ui.logTextEdit.appendPlainText(line)
            self._showPlan(progress)
            self.ui.progressBar.value = progress.percent
            self.ui.statusLabel.text = progress.statusText()
            if runner.finished:
                self._watchedRunner = None
                self._jobFinished(runner)
        if self._watchedRunner is None and not self.logic.checkingDependencies:
            self.pollTimer.stop()

    def _showPlan(self, progress=None) -> None:
        """The line under Time budget: the job's plan once the backend sent it (its table as
        the tool tip), else how the plan is made (the .ui's tool tip)."""
        plan = progress.plan if progress is not None else None
        if self._planHelp is None:
            self._planHelp = self.ui.planLabel.property("toolTip") or ""
        self.ui.planLabel.setText(planSummary(plan))
        self.ui.planLabel.setToolTip(progress.planTable if plan else self._planHelp)

    def _jobFinished(self, runner) -> None:
        progress = runner.progress
        if progress.failed:
            self.ui.statusLabel.setStyleSheet("color: #c0392b")
            self.ui.statusLabel.text = _("Failed: {error}").format(error=progress.errorText)
            slicer.util.errorDisplay(
                _("The job failed: {error}").format(error=progress.errorText),
                detailedText="\n".join(progress.errorDetails),
            )
        elif progress.cancelled:
            self.ui.statusLabel.text = _("Cancelled: nothing was changed in the scene.")
        else:
            self.ui.statusLabel.text = _("Finished: select a case below to review it.")
            self.ui.reviewCollapsibleButton.collapsed = False
            # the job's own session (also right when the scene was closed during the job), as
            # imported when the job ended
            workflow = self.logic.workflow
            rows = workflow.importedRows
            self._fillResultsTable(rows if rows is not None else workflow.reviewRows())
        self.updateGui()

    # -------------------------------------------------------------------- review

    def onLoadResults(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not load the results."), waitCursor=True):
            self.logic.getWorkflow(self._parameterNode, reload=True)
            self._fillResultsTable()
            self.updateGui()

    def onResultSelected(self) -> None:
        case = self._selectedCase()
        self._updateReviewButtons()
        if case is None:
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not load the case."), waitCursor=True):
            self.logic.showCase(p, case)

    def onOpacity(self, value: float) -> None:
        self.logic.setUncertaintyOpacity(value)

    def onColourMap(self, index: int) -> None:
        # read the combo box: this slot may run before the parameter node is updated
        self.logic.setUncertaintyColourMap(self.ui.colourMapComboBox.currentText)

    def onEditSegmentation(self) -> None:
        case = self._selectedCase()
        if case is not None:
            with slicer.util.tryWithErrorDisplay(_("Could not open the Segment Editor.")):
                self.logic.openSegmentEditor(self._parameterNode, case)

    def onAccept(self) -> None:
        case = self._selectedCase()
        if case is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not accept the case."), waitCursor=True):
            accepted = self.logic.acceptCase(self._parameterNode, case)
            self.ui.statusLabel.text = _(
                "Saved {path}; it is labeled from the next round on."
            ).format(path=accepted.label)
        self._fillResultsTable()
        self.updateGui()


#
# SemiSupSegLogic
#


class SemiSupSegLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from the Python console without the GUI::

        logic = slicer.util.getModuleLogic("SemiSupSeg")
        p = logic.getParameterNode()   # fill p.labeledVolumes, p.labeledSegmentations, ...
        logic.run(p, wait=True)        # export the job, run the backend, wait
        rows = logic.reviewRows(p); logic.showCase(p, rows[0].case)
        logic.acceptCase(p, rows[0].case); logic.run(p, retrain=True, wait=True)

    ``processFactory`` is the class that runs the backend (``BackendProcess``); tests inject
    another one.
    """

    def __init__(self, processFactory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.processFactory = processFactory or BackendProcess
        self.workflow: Optional[Workflow] = None
        self.dependencyProbe: Optional[dependencies.ProbeResult] = None
        self._probeProcess = None
        self._probeRequirements = []
        self.currentCase = None
        self._classes = None  # (what the table was computed from, describeClasses' answer)

    def getParameterNode(self):
        return SemiSupSegParameterNode(super().getParameterNode())

    # -------------------------------------------------------------- environment

    @staticmethod
    def defaultOutputFolder() -> pathlib.Path:
        return pathlib.Path(slicer.app.defaultScenePath) / "SemiSupSeg"

    def initialOutputFolder(self) -> pathlib.Path:
        """The output folder of a new parameter node (after a scene close): the workflow's, so
        that the results the panel showed, or a running job's when it finishes, stay
        reachable; the default before any workflow."""
        if self.workflow is not None:
            return self.workflow.outputFolder
        return self.defaultOutputFolder()

    def onSceneStartClose(self) -> None:
        """Forget the nodes of the closing scene (shown case, loaded cases, exported volumes);
        a running job keeps running and its results stay reachable."""
        self.currentCase = None
        self._classes = None
        if self.workflow is not None:
            self.workflow.forgetSceneNodes()

    @staticmethod
    def slicerPython() -> str:
        """Slicer's own Python launcher (PythonSlicer), which sets up Slicer's environment."""
        return slicerPython()

    def pythonExecutable(self, p) -> str:
        if p.useExternalPython:
            if not _isSet(p.externalPython) or not os.path.isfile(str(p.externalPython)):
                raise ValueError(_("Choose the python executable of the external environment."))
            return str(p.externalPython)
        return self.slicerPython()

    def baseEnvironment(self, p):
        """Slicer's environment for PythonSlicer; the environment Slicer started from for an
        external Python (so that Slicer's own library paths do not leak into it)."""
        if p.useExternalPython:
            return slicer.util.startupEnvironment()
        return dict(os.environ)

    def requirements(self, p=None):
        """requirements.txt; for an external Python also numpy, SimpleITK and scipy."""
        requirements = dependencies.readRequirements(self.resourcePath("requirements.txt"))
        if p is not None and p.useExternalPython:
            requirements += list(dependencies.EXTERNAL_EXTRA_REQUIREMENTS)
        return requirements

    def resourcePath(self, filename: str) -> str:
        return os.path.join(os.path.dirname(__file__), "Resources", filename)

    # ---------------------------------------------------------------- workflow

    def getWorkflow(self, p, reload: bool = False) -> Workflow:
        folder = (
            pathlib.Path(p.outputFolder) if _isSet(p.outputFolder) else self.defaultOutputFolder()
        )
        if self.workflow is None or (reload and not self.workflow.running):
            self.workflow = Workflow(slicer.mrmlScene, folder, self.processFactory)
        elif not self.workflow.running:
            self.workflow.setOutputFolder(folder)
        return self.workflow

    def probeAnswer(self) -> Optional[dict]:
        """The dependency probe's answer (packages, torch, GPUs), or None before a check."""
        probe = self.dependencyProbe
        return probe.asDict() if probe is not None and not probe.error else None

    def budgetLimit(self, p) -> str:
        """What limits training on the device the panel detected: a CUDA GPU's memory, else
        time (``training_options.budgetLimitOf``)."""
        return budgetLimitOf(self.probeAnswer(), p.device)

    def budgetDevice(self, p) -> str:
        """The device a named budget's iterations are taken for, as the log names it."""
        if self.budgetLimit(p) == MEMORY_LIMITED:
            return _("a CUDA GPU (found by the dependency check)")
        if p.device in ("cpu", "mps"):
            return _("the CPU") if p.device == "cpu" else _("the Apple GPU")
        if self.dependencyProbe is None:
            return _("a CPU (the dependency check has not run)")
        if self.dependencyProbe.error:
            return _("a CPU (the dependency check failed)")
        return _("a CPU or Apple GPU (the dependency check found no CUDA GPU)")

    def retrainWaitsForCheck(self, p) -> bool:
        """True while a fast retraining round of a named budget cannot know its iterations:
        it is a share of the budget of the device the dependency check finds (auto or CUDA),
        and the check has not answered yet (a failed check counts as an answer: the CPU)."""
        return (
            p.fastRetrain
            and p.preset != CUSTOM_PRESET
            and p.device in ("auto", "cuda")
            and self.dependencyProbe is None
        )

    def retrainNote(self, p) -> str:
        """The log line of a retraining round: a fast round's share of the iterations and the
        device they were taken for, or the full budget of a round from scratch."""
        options = self.trainingOptions(p)
        retraining = options.forRetraining()
        if not retraining.retraining:
            return _("Retraining from scratch: the full budget.")
        if p.preset == CUSTOM_PRESET:
            of = _("{iterations} iterations").format(iterations=options.totalIterations())
        else:
            of = _("the {budget} budget's {iterations} iterations for {device}").format(
                budget=p.preset, iterations=options.totalIterations(), device=self.budgetDevice(p)
            )
        return _("Fast retraining: {share:.0%} of {of} = {iterations} iterations.").format(
            share=retraining.retrainShare, of=of, iterations=retraining.totalIterations()
        )

    def budgetIterations(self, p) -> int:
        """The iterations of the chosen budget on the detected device (the custom number for
        a custom budget)."""
        options = TrainingOptions(
            preset=p.preset, iterations=p.iterations, budgetLimit=self.budgetLimit(p)
        )
        return options.totalIterations()

    def trainingOptions(self, p) -> TrainingOptions:
        return TrainingOptions(
            method=p.method,
            network=p.network3D,
            encoder=p.encoder2D,
            preset=p.preset,
            iterations=p.iterations,
            device=p.device,
            modality=p.modality,
            extraSettings=parseExtraSettings(p.extraSettings),
            warmStart=p.fastRetrain,
            budgetLimit=self.budgetLimit(p),
        ).validate()

    def labeledNodePairs(self, p):
        """The labeled (volume, segmentation) pairs whose nodes still exist."""
        pairs = zip(list(p.labeledVolumes), list(p.labeledSegmentations))
        return [(v, s) for v, s in pairs if v is not None and s is not None]

    def setLabeledNodePairs(self, p, pairs) -> None:
        with slicer.util.NodeModify(p.parameterNode):
            p.labeledVolumes = [v for v, _s in pairs]
            p.labeledSegmentations = [s for _v, s in pairs]

    def labeledPairs(self, p):
        return [LabeledPair(v, s) for v, s in self.labeledNodePairs(p)]

    def describeClasses(self, p):
        """('Classes: 1 liver, 2 tumour', True) or the reason why not, for the Data section.

        The panel asks on every parameter change; the table (which reads every labelmap's
        voxels) is computed again only when a labeled pair or its labels changed."""
        pairs = self.labeledPairs(p)
        key = tuple((pair.volume.GetID(), mrml_io.labelsVersion(pair.labels)) for pair in pairs)
        if self._classes is None or self._classes[0] != key:
            self._classes = (key, self._describeClasses(pairs))
        return self._classes[1]

    @staticmethod
    def _describeClasses(pairs):
        if not pairs:
            return _("Classes: add a labeled case (volume + segmentation)"), False
        try:
            table = JobExporter(slicer.mrmlScene, "").collectClasses(pairs)
        except ValueError as err:
            return str(err), False
        names = ", ".join(f"{i + 1} {name}" for i, name in enumerate(table.names))
        return _("Classes: {names}").format(names=names), True

    def _sessionOrNone(self, p):
        try:
            return self.getWorkflow(p).session
        except Exception as err:  # an unreadable session file must not break the panel
            logging.warning(f"SemiSupSeg: {err}")
            return None

    def acceptedCases(self, p):
        """(case, label file, where it came from) of the cases accepted into the labeled set."""
        session = self._sessionOrNone(p)
        if session is None:
            return []
        return [(a.case, a.label, session.labelOrigin(a.case)) for a in session.accepted.values()]

    def exportJob(self, p, progress=None):
        """Write a new round's job folder; ``progress(done, total, what)`` hears of each file."""
        unlabeledFolder = str(p.unlabeledFolder) if _isSet(p.unlabeledFolder) else None
        unlabeled = [n for n in p.unlabeledVolumes if n is not None]
        return self.getWorkflow(p).exportJob(
            self.labeledPairs(p), unlabeled, unlabeledFolder, self.trainingOptions(p), progress
        )

    def exportRetrainJob(self, p, progress=None):
        logging.info(f"SemiSupSeg: {self.retrainNote(p)}")
        return self.getWorkflow(p).exportRetrainJob(
            self.labeledPairs(p), self.trainingOptions(p), progress
        )

    def startJob(self, jobPath, p):
        """Start the backend on a job (returns at once; the widget polls from a QTimer)."""
        workflow = self.getWorkflow(p)
        workflow.python = self.pythonExecutable(p)
        workflow.environment = self.baseEnvironment(p)
        if p.device == "cpu":
            logging.info("SemiSupSeg: CUDA_VISIBLE_DEVICES=-1 for a CPU job")
        return workflow.startJob(jobPath, p.device)

    def run(self, p, retrain: bool = False, wait: bool = False, timeout: Optional[float] = None):
        """Export and start a job (a retraining round if ``retrain``); ``wait`` is for scripts."""
        jobPath = self.exportRetrainJob(p) if retrain else self.exportJob(p)
        runner = self.startJob(jobPath, p)
        if wait:
            self.workflow.wait(timeout=timeout, processEvents=slicer.app.processEvents)
        return runner

    @property
    def runner(self):
        return self.workflow.runner if self.workflow is not None else None

    @property
    def running(self) -> bool:
        return self.workflow is not None and self.workflow.running

    @property
    def checkingDependencies(self) -> bool:
        return self._probeProcess is not None

    def poll(self):
        return self.workflow.poll() if self.workflow is not None else []

    def shutdown(self) -> None:
        """Stop the running job and the dependency check, and wait until their processes are
        gone: a stop request, the grace time for the backend to save a checkpoint, then kill."""
        if self._probeProcess is not None:
            self._probeProcess.stop()
            self._probeProcess = None
        if self.workflow is not None:
            self.workflow.shutdown()

    def cancel(self) -> None:
        if self.workflow is not None:
            self.workflow.cancel()

    def reviewRows(self, p):
        return self.getWorkflow(p).reviewRows()

    def canRetrain(self, p) -> bool:
        session = self._sessionOrNone(p)
        return session is not None and bool(session.accepted) and bool(session.lastFinishedRound())

    # ------------------------------------------------------------------ review

    def showCase(self, p, case: str):
        """Load the case (volume, pseudo-mask, uncertainty) and show it in the slice views."""
        loaded = self.getWorkflow(p).loadCase(case, colourMap=p.colourMap)
        self.currentCase = loaded
        slicer.util.setSliceViewerLayers(
            background=loaded.volume,
            foreground=loaded.uncertainty,
            foregroundOpacity=p.uncertaintyOpacity,
            fit=True,
        )
        display = loaded.segmentation.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
        return loaded

    def setUncertaintyOpacity(self, opacity: float) -> None:
        if self.currentCase is not None:
            slicer.util.setSliceViewerLayers(foregroundOpacity=opacity)

    def setUncertaintyColourMap(self, colourMap: str) -> None:
        if self.currentCase is not None:
            setUncertaintyColours(slicer.mrmlScene, self.currentCase.uncertainty, colourMap)

    def openSegmentEditor(self, p, case: str) -> None:
        loaded = self.showCase(p, case)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.util.getModuleWidget("SegmentEditor").editor
        editor.setSegmentationNode(loaded.segmentation)
        editor.setSourceVolumeNode(loaded.volume)

    def acceptCase(self, p, case: str):
        """Save the case's (corrected) segmentation as a new file version; labeled next round."""
        workflow = self.getWorkflow(p)
        if workflow.loadedCase(case) is None:
            workflow.loadCase(case, colourMap=p.colourMap)
        return workflow.acceptCase(case)

    # ------------------------------------------------------------ dependencies

    def startDependencyCheck(self, p) -> None:
        """Run the probe in the chosen Python, in the background (poll with pollDependencyCheck)."""
        command = dependencies.probeCommand(self.pythonExecutable(p), self.requirements(p))
        self._probeRequirements = self.requirements(p)
        env = backendEnvironment(self.baseEnvironment(p))
        self.dependencyProbe = None
        self._probeProcess = self.processFactory(command, env=env).start()

    def pollDependencyCheck(self) -> bool:
        """True once, when the probe has just finished (result in ``dependencyProbe``)."""
        process = self._probeProcess
        if process is None:
            return False
        code = process.poll()
        if code is None:
            return False
        self._probeProcess = None
        self.dependencyProbe = dependencies.parseProbeOutput(
            process.readLines(), process.stderrTail(), code
        )
        return True

    def missingRequirements(self):
        if self.dependencyProbe is None or self.dependencyProbe.error:
            return []
        return self.dependencyProbe.missing(self._probeRequirements or self.requirements())

    def installPlan(self) -> dependencies.InstallPlan:
        pyTorchUtils = "PyTorchUtils" in slicer.util.moduleNames()
        packages = self.dependencyProbe.packages if self.dependencyProbe else {}
        return dependencies.planInstall(self.missingRequirements(), packages, pyTorchUtils)

    def installDependencies(self, plan: dependencies.InstallPlan) -> None:
        """Install into Slicer's Python; main thread only, after the user agreed."""
        dependencies.installInSlicer(plan)


#
# SemiSupSegTest
#


class SemiSupSegTest(ScriptedLoadableModuleTest):
    """A quick job end to end on crops of the MRHead sample (a few CPU iterations).

    Skipped, saying why, where Slicer's Python lacks the backend's packages or MRHead cannot
    be downloaded (build machines)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SemiSupSeg_round()
        self.setUp()
        self.test_SemiSupSeg_cancel()

    def _parameters(self, logic, iterations=3):
        from SemiSupSegLib.sample_cases import addThresholdSegmentation, sampleCasesOrSkip

        _head, volumes = sampleCasesOrSkip(self, logic.requirements(), 3)
        p = logic.getParameterNode()
        p.labeledVolumes = volumes[:2]
        p.labeledSegmentations = [addThresholdSegmentation(v) for v in volumes[:2]]
        p.unlabeledVolumes = volumes[2:]
        p.method = "supervised"
        p.preset = "custom"
        p.iterations = iterations
        p.device = "cpu"
        p.extraSettings = "batch_size=1, checkpoint_every=0"
        p.outputFolder = pathlib.Path(slicer.util.tempDirectory("SemiSupSegTest"))
        return p, volumes

    def test_SemiSupSeg_round(self):
        self.delayDisplay("Training a tiny model on MRHead crops")
        logic = SemiSupSegLogic()
        p, volumes = self._parameters(logic)
        runner = logic.run(p, wait=True, timeout=900)
        self.assertTrue(runner.succeeded, runner.progress.errorText)
        rows = logic.reviewRows(p)
        self.assertEqual(len(rows), 1)
        loaded = logic.showCase(p, rows[0].case)
        self.assertIs(loaded.volume, volumes[2])
        names = [
            loaded.segmentation.GetSegmentation().GetNthSegment(i).GetName()
            for i in range(loaded.segmentation.GetSegmentation().GetNumberOfSegments())
        ]
        self.assertEqual(names, ["bright", "dark"])
        first = logic.acceptCase(p, rows[0].case)
        second = logic.acceptCase(p, rows[0].case)
        self.assertNotEqual(first.label, second.label)
        self.assertTrue(os.path.exists(first.label) and os.path.exists(second.label))
        self.assertTrue(logic.canRetrain(p))
        self.delayDisplay("Test passed")

    def test_SemiSupSeg_cancel(self):
        self.delayDisplay("Cancelling a job")
        logic = SemiSupSegLogic()
        p, _volumes = self._parameters(logic, iterations=500)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        runner = logic.run(p)
        deadline = time.monotonic() + 300
        while runner.progress.events == 0 and not runner.finished:  # the backend is up
            self.assertLess(time.monotonic(), deadline, "the backend sent no event")
            logic.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        logic.cancel()
        self.assertTrue(logic.workflow.wait(timeout=120, processEvents=slicer.app.processEvents))
        self.assertTrue(runner.cancelled)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")
