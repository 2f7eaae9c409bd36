"""SemiSupSeg.py's Logic outside Slicer: the module file is imported with small stand-ins for
the Qt-based parts of Slicer (ScriptedLoadableModule base classes, i18n, parameterNodeWrapper,
slicer.app) while the MRML scene, nodes and slicer.util come from slicer-core. The Logic then
runs a round the way a Python-console user would, against the REAL backend.

What this cannot check is how Slicer itself connects the widgets; test_slicer_ui.py checks
the .ui side, and the in-Slicer tests (SemiSupSegTest, Testing/Python) run the panel."""

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from unittest import mock

import pytest

from SemiSupSegLib import mrml_io
from SemiSupSegLib.dependencies import PROBE_MARKER, ProbeResult
from SemiSupSegLib.method_catalogue import DEFAULT_METHOD
from SemiSupSegLib.output_layout import MODEL_FILE
from SemiSupSegLib.progress import ProgressModel
from SemiSupSegLib.protocol import encode_event, make_event
from slicer_side_helpers import (
    CLASS_NAMES,
    MODULE_DIR,
    MODULE_FILE,
    UI_FILE,
    FakeProcess,
    hippocampusCase,
    ijkToRas,
    labelArray,
    labelmapNode,
    loadPanel,
    newScene,
    nodeIds,
    panelWidgets,
    planEventLine,
    segmentationFromLabelFile,
)


def _stub_parameter_node_wrapper(cls):
    """Instances get every annotated field with its default (lists empty, paths '.')."""
    hints = typing.get_type_hints(cls, include_extras=True)

    def __init__(self, parameterNode=None):
        self.parameterNode = parameterNode
        for name, hint in hints.items():
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if hasattr(cls, name):
                value = getattr(cls, name)
            elif typing.get_origin(base) is list:
                value = []
            elif base is pathlib.Path:
                value = pathlib.Path()
            else:
                value = None
            setattr(self, name, value)

    return type(cls.__name__, (), {"__init__": __init__, "__doc__": cls.__doc__})


class StartupEnvironment(dict):
    """What slicer.util.startupEnvironment reads from slicer.app (a QProcessEnvironment)."""

    def value(self, key):
        return self[key]


class _Validator:
    def __init__(self, *args):
        self.args = args


@pytest.fixture
def module(monkeypatch, tmp_path):
    slicer = pytest.importorskip("slicer")
    scene = newScene()
    base = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            return scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget"):
        setattr(base, name, type(name, (), {}))
    base.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    base.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = _stub_parameter_node_wrapper
    wrapper.Choice = wrapper.WithinRange = _Validator
    app = types.SimpleNamespace(
        defaultScenePath=str(tmp_path / "scenes"),
        processEvents=lambda: None,
        layoutManager=lambda: None,  # no views to fit
        startupEnvironment=lambda: StartupEnvironment(os.environ),
    )
    for name, stub in (
        ("qt", types.ModuleType("qt")),
        ("slicer.ScriptedLoadableModule", base),
        ("slicer.i18n", i18n),
        ("slicer.parameterNodeWrapper", wrapper),
    ):
        monkeypatch.setitem(sys.modules, name, stub)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    spec = importlib.util.spec_from_file_location("SemiSupSeg", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded, scene


def test_the_logic_runs_a_round_like_a_console_user(module, tmp_path, monkeypatch):
    semisupseg, scene = module
    logic = semisupseg.SemiSupSegLogic()
    p = logic.getParameterNode()
    assert (p.method, p.preset, p.device, p.colourMap) == (
        DEFAULT_METHOD,
        "standard",
        "auto",
        "Inferno",
    )
    assert logic.defaultOutputFolder() == tmp_path / "scenes" / "SemiSupSeg"

    volumes = []
    for number in ("001", "003", "004"):
        volumes.append(mrml_io.readVolumeNode(scene, hippocampusCase(number)[0], f"hc{number}"))
    segmentations = [
        segmentationFromLabelFile(scene, hippocampusCase(n)[1], v, f"hc{n} labels")
        for n, v in zip(("001", "003"), volumes)
    ]
    text, ok = logic.describeClasses(p)
    assert not ok and "add a labeled case" in text
    logic.setLabeledNodePairs(p, list(zip(volumes[:2], segmentations)))
    assert logic.describeClasses(p) == ("Classes: 1 Anterior, 2 Posterior", True)
    p.unlabeledVolumes = volumes[2:]
    p.method, p.preset, p.iterations, p.device = "supervised", "custom", 3, "cpu"
    p.extraSettings = "batch_size=1, checkpoint_every=0"
    p.outputFolder = tmp_path / "out"
    # Slicer's own Python: PythonSlicer in Slicer, this interpreter here

    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # one slice view
    before = nodeIds(scene)
    runner = logic.run(p, wait=True, timeout=300)
    assert runner.succeeded, runner.progress.errorText
    assert nodeIds(scene) == before
    assert runner.process.env["CUDA_VISIBLE_DEVICES"] == "-1"
    rows = logic.reviewRows(p)
    assert [r.case for r in rows] == ["hc004"]
    loaded = logic.showCase(p, "hc004")
    assert loaded.volume is volumes[2]
    assert mrml_io.segmentNames(loaded.segmentation) == list(CLASS_NAMES)
    assert composite.GetBackgroundVolumeID() == volumes[2].GetID()
    assert composite.GetForegroundVolumeID() == loaded.uncertainty.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    logic.setUncertaintyOpacity(0.7)
    assert composite.GetForegroundOpacity() == pytest.approx(0.7)
    assert not logic.canRetrain(p)
    accepted = logic.acceptCase(p, "hc004")
    assert pathlib.Path(accepted.label).name == "hc004.v1.nrrd"
    assert logic.canRetrain(p)
    assert logic.acceptedCases(p) == [("hc004", accepted.label, "round 1 (v1)")]
    retrain = logic.exportRetrainJob(p)
    assert retrain.parent.name == "round-002"
    assert json.loads(retrain.read_text())["init_from"].endswith(MODEL_FILE)
    p.fastRetrain = False  # the Fast check box
    scratch = json.loads(logic.exportRetrainJob(p).read_text())
    assert scratch["init_from"] is None
    assert scratch["settings"]["iterations"] == logic.trainingOptions(p).totalIterations()

    # a fast round after a named budget: a fifth of its iterations on the device found
    p.fastRetrain, p.preset, p.device = True, "quick", "auto"
    retrain = {}
    for machine, devices in (("gpu", [A100]), ("cpu", [])):
        logic.dependencyProbe = probeAnswer(devices)
        retrain[machine] = json.loads(logic.exportRetrainJob(p).read_text())
    assert retrain["gpu"]["settings"]["iterations"] == 400  # a fifth of quick's 2000 on a GPU
    assert retrain["cpu"]["settings"]["iterations"] == 100  # a fifth of quick's 500 on a CPU
    assert retrain["cpu"]["budget"] == retrain["gpu"]["budget"] == "quick"
    assert logic.retrainNote(p) == (
        "Fast retraining: 20% of the quick budget's 500 iterations for a CPU or Apple GPU "
        "(the dependency check found no CUDA GPU) = 100 iterations."
    )
    logic.dependencyProbe = ProbeResult(error="the Python could not be run")
    assert not logic.retrainWaitsForCheck(p)  # a failed check is an answer, and says so:
    assert "for a CPU (the dependency check failed) = 100" in logic.retrainNote(p)

    # Retrain pressed on a GPU machine before the check answered: a fifth of the CPU budget
    # went out; now Retrain starts the check, waits for it and logs the device
    logic.dependencyProbe = None
    assert logic.retrainWaitsForCheck(p)
    retrainAfterTheCheck(semisupseg, logic, p, monkeypatch)


class ProbeProcess:
    """The dependency probe at the process boundary: answers after one poll."""

    def __init__(self, answer):
        self.answer, self.polls = answer, 0

    def start(self):
        return self

    def poll(self):
        self.polls += 1
        return 0 if self.polls > 1 else None

    def readLines(self, maxLines=10000):
        return [PROBE_MARKER + json.dumps(self.answer.asDict())]

    def stderrTail(self):
        return ""


@contextlib.contextmanager
def noErrorDialog(*args, **kwargs):
    yield  # the message box and wait cursor of slicer.util.tryWithErrorDisplay


def retrainAfterTheCheck(semisupseg, logic, p, monkeypatch):
    probes = []

    def processFactory(command, env=None, cwd=None):
        if command[1] == "-c":  # dependencies.probeCommand
            probes.append(ProbeProcess(probeAnswer([A100])))
            return probes[-1]
        return FakeProcess(command, env, cwd)

    logic.processFactory = processFactory
    widget = panelOn(semisupseg, logic, monkeypatch)
    widget._parameterNode, widget.pollTimer = p, mock.MagicMock()
    widget.updateGui = lambda *args: None
    widget._rememberPathsOfThisJob = lambda: None  # CTK's path fields are plain QWidgets here
    monkeypatch.setattr(slicer_util(), "tryWithErrorDisplay", noErrorDialog)
    dialog = mock.MagicMock(wasCanceled=False)
    monkeypatch.setattr(slicer_util(), "createProgressDialog", lambda **kwargs: dialog)
    rounds = sorted(logic.workflow.outputFolder.glob("round-*"))
    runner = logic.runner

    widget.onRetrain()
    assert len(probes) == 1 and logic.checkingDependencies
    assert sorted(logic.workflow.outputFolder.glob("round-*")) == rounds  # nothing exported
    FakeProcess.script = [encode_event(make_event("stage", stage="training"))] * 4
    widget.onPollTimer()  # the check is still running
    assert logic.runner is runner
    widget.onPollTimer()  # the check found the GPU: retraining starts
    assert logic.runner is not runner and logic.running
    job = json.loads(pathlib.Path(logic.runner.process.command[4]).read_text())
    assert job["settings"]["iterations"] == 400  # a fifth of quick's 2000 on a GPU
    assert (
        "Fast retraining: 20% of the quick budget's 2000 iterations for a CUDA GPU (found by "
        "the dependency check) = 400 iterations." in widget.ui.logTextEdit.toPlainText()
    )
    logic.shutdown()


A100 = {"name": "NVIDIA A100", "memory_gb": 80.0}


def probeAnswer(cudaDevices):
    """The dependency probe's answer (the probe runs in a child process: its output is the
    boundary) on a machine with these CUDA GPUs."""
    torch = {"installed": True, "version": "2.5.1", "cuda_devices": cudaDevices, "mps": False}
    return ProbeResult(python=sys.executable, version="3.9.10", torch=torch)


def test_a_named_budget_shows_the_detected_devices_iterations_and_sends_its_name(module, tmp_path):
    """The spin box shows a named budget's iterations on the device the panel found; the job
    sends the budget's name, so that the backend runs the schedule of the device it gets."""
    semisupseg, scene = module
    logic = semisupseg.SemiSupSegLogic()
    p = logic.getParameterNode()
    assert (p.preset, logic.budgetIterations(p)) == ("standard", 1500)  # not checked yet: CPU
    logic.dependencyProbe = probeAnswer([A100])
    assert logic.budgetIterations(p) == 6000
    p.device = "cpu"  # the GPU is there, the user trains on the CPU
    assert logic.budgetIterations(p) == 1500
    p.device = "auto"
    p.preset, p.iterations = "custom", 7
    assert logic.budgetIterations(p) == 7

    volumes = [
        mrml_io.readVolumeNode(scene, hippocampusCase(n)[0], f"hc{n}") for n in ("001", "004")
    ]
    labels = segmentationFromLabelFile(scene, hippocampusCase("001")[1], volumes[0], "hc001 l")
    logic.setLabeledNodePairs(p, [(volumes[0], labels)])
    p.unlabeledVolumes, p.method, p.preset = volumes[1:], "supervised", "quick"
    p.outputFolder = tmp_path / "out"
    job = json.loads(logic.exportJob(p).read_text())  # a GPU was found: still no iterations
    assert job["budget"] == "quick" and "iterations" not in job["settings"]


def test_an_external_python_must_be_chosen(module, tmp_path):
    semisupseg, _scene = module
    logic = semisupseg.SemiSupSegLogic()
    p = logic.getParameterNode()
    p.useExternalPython = True
    with pytest.raises(ValueError, match="external environment"):
        logic.pythonExecutable(p)
    p.useExternalPython = False
    assert logic.pythonExecutable(p)  # PythonSlicer, or this Python outside Slicer
    assert logic.requirements(p) == ["torch>=2.1", "monai>=1.4", "timm>=1.0", "einops>=0.6"]
    p.useExternalPython = True  # another Python may lack what Slicer ships
    assert logic.requirements(p)[-3:] == ["numpy>=1.24", "SimpleITK>=2.2", "scipy>=1.10"]


def test_the_class_table_is_computed_again_only_when_the_labels_change(module, monkeypatch):
    """The panel asks for the classes on every parameter change (each keystroke and slider
    tick); reading every labelmap's voxels each time made the panel sluggish."""
    semisupseg, scene = module
    logic = semisupseg.SemiSupSegLogic()
    p = logic.getParameterNode()
    image, label = hippocampusCase("001")
    first = mrml_io.readVolumeNode(scene, image, "first")
    second = mrml_io.readVolumeNode(scene, hippocampusCase("003")[0], "second")
    truth = labelArray(label)
    labelmap = labelmapNode(scene, truth, ijkToRas(first), list(CLASS_NAMES))
    segmentation = segmentationFromLabelFile(
        scene, hippocampusCase("003")[1], second, "second labels"
    )
    reads = []
    labelmapClasses = mrml_io.labelmapClasses
    monkeypatch.setattr(
        mrml_io, "labelmapClasses", lambda node: reads.append(node) or labelmapClasses(node)
    )
    logic.setLabeledNodePairs(p, [(first, labelmap), (second, segmentation)])
    answer = ("Classes: 1 Anterior, 2 Posterior", True)
    assert logic.describeClasses(p) == answer
    computed = len(reads)
    assert computed > 0
    for iterations in range(10, 20):  # what updateGui does while the user types
        p.iterations = iterations
        assert logic.describeClasses(p) == answer
    assert len(reads) == computed

    segmentation.GetSegmentation().GetNthSegment(1).SetName("Tail")  # renamed in the editor
    text, ok = logic.describeClasses(p)
    assert not ok and "'second labels' has different segment names" in text
    segmentation.GetSegmentation().GetNthSegment(1).SetName("Posterior")
    assert logic.describeClasses(p) == answer

    painted = slicer_util().arrayFromVolume(labelmap)
    painted[painted == 2] = 3  # painted with a value the colour table does not name
    slicer_util().arrayFromVolumeModified(labelmap)
    text, ok = logic.describeClasses(p)
    assert not ok and "every labeled case has ['Anterior', 'label 3']" in text
    logic.setLabeledNodePairs(p, [(second, segmentation)])
    assert logic.describeClasses(p) == answer


def slicer_util():
    import slicer

    return slicer.util


def panelOn(semisupseg, logic, monkeypatch):
    """The widget on the real .ui (PySide6) without Slicer's setup: Qt's table items, and a
    parameter node set without connectGui (the stand-in wrapper has none)."""
    from PySide6 import QtCore, QtWidgets

    monkeypatch.setattr(
        semisupseg,
        "qt",
        types.SimpleNamespace(QTableWidgetItem=QtWidgets.QTableWidgetItem, Qt=QtCore.Qt),
    )
    widget = object.__new__(semisupseg.SemiSupSegWidget)
    widget.ui = panelWidgets(loadPanel())
    widget.logic, widget._watchedRunner, widget._parameterNode = logic, None, None
    widget.parent = types.SimpleNamespace(isEntered=True)
    widget.setParameterNode = lambda node: setattr(widget, "_parameterNode", node)
    return widget


def resultCases(widget):
    from PySide6.QtCore import Qt

    table = widget.ui.resultsTable
    return [table.item(row, 0).data(Qt.UserRole) for row in range(table.rowCount())]


def test_closing_the_scene_forgets_its_nodes_and_keeps_a_running_jobs_results(
    module, tmp_path, monkeypatch, request
):
    """Also after a close with no job running, the results the panel shows are those of the
    new parameter node's output folder, and a row selected there loads."""
    semisupseg, scene = module
    logic = semisupseg.SemiSupSegLogic()
    # what the widget's onSceneStartClose does
    tag = scene.AddObserver(scene.StartCloseEvent, lambda *args: logic.onSceneStartClose())
    # also when the test stops early: a Python callback left on the scene crashes its collection
    request.addfinalizer(lambda: scene.RemoveObserver(tag))
    p = logic.getParameterNode()
    volumes = [
        mrml_io.readVolumeNode(scene, hippocampusCase(n)[0], f"hc{n}")
        for n in ("001", "003", "004")
    ]
    segmentations = [
        segmentationFromLabelFile(scene, hippocampusCase(n)[1], v, f"hc{n} labels")
        for n, v in zip(("001", "003"), volumes)
    ]
    logic.setLabeledNodePairs(p, list(zip(volumes[:2], segmentations)))
    p.unlabeledVolumes = volumes[2:]
    p.method, p.preset, p.iterations, p.device = "supervised", "custom", 3, "cpu"
    p.extraSettings = "batch_size=1, checkpoint_every=0"
    p.outputFolder = tmp_path / "out"
    assert logic.run(p, wait=True, timeout=300).succeeded
    logic.showCase(p, "hc004")
    second = logic.run(p)  # still running when the user closes the scene
    assert logic.running

    scene.Clear(False)
    assert logic.currentCase is None
    # nothing keeps the closed scene's nodes (and their voxels) alive
    assert not logic.workflow.loaded and not logic.workflow.sourceVolumes
    assert not second.finished
    fresh = logic.getParameterNode()  # what the panel sets up after the close
    assert logic.initialOutputFolder() == tmp_path / "out"
    fresh.outputFolder = logic.initialOutputFolder()
    assert logic.workflow.wait(timeout=300) and second.succeeded
    rows = logic.reviewRows(fresh)
    assert [(row.case, row.round) for row in rows] == [("hc004", 2)]
    # Accept works without selecting the case again: it loads from the job's files
    accepted = logic.acceptCase(fresh, "hc004")
    assert pathlib.Path(accepted.label).is_file() and accepted.round == 2
    loaded = logic.workflow.loadedCase("hc004")
    assert loaded is not None and scene.IsNodePresent(loaded.volume)
    assert loaded.volume is not volumes[2]  # the closed scene's node is not used

    # no job running now: a close keeps the session the panel shows
    widget = panelOn(semisupseg, logic, monkeypatch)
    widget._parameterNode = fresh
    widget._fillResultsTable()  # as when the job finished
    assert resultCases(widget) == ["hc004"]
    # the caption names the sort (the review score), not an unproven "most uncertain first"
    assert widget.ui.resultsLabel.text == "Round 2: 1 case(s), highest boundary uncertainty first"
    scene.Clear(False)
    widget.onSceneEndClose(scene, None)
    assert widget._parameterNode.outputFolder == tmp_path / "out"
    assert resultCases(widget) == ["hc004"]
    assert logic.showCase(widget._parameterNode, "hc004").volume is not None  # a row's case
    # a scene whose parameter node names another folder: not the previous scene's rows
    other, first = logic.getParameterNode(), logic.getParameterNode()
    other.outputFolder, first.outputFolder = tmp_path / "other", tmp_path / "out"
    monkeypatch.setattr(logic, "getParameterNode", lambda: other)
    scene.Clear(False)
    widget.onSceneEndClose(scene, None)
    assert resultCases(widget) == []
    monkeypatch.setattr(logic, "getParameterNode", lambda: first)
    widget.parent.isEntered = False  # another module is shown during the close
    widget.initializeParameterNode()
    assert resultCases(widget) == ["hc004"]
    scene.Clear(False)
    widget.onSceneEndClose(scene, None)
    assert resultCases(widget) == []  # nothing of the closed scene to click
    logic.dependencyProbe = probeAnswer([])  # checked already: enter starts no probe
    widget.enter()
    assert resultCases(widget) == ["hc004"]


def executable(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_slicers_python_is_pythonslicer_not_the_application(module, tmp_path, monkeypatch):
    """Inside Slicer sys.executable is the application (SlicerApp-real, Slicer.exe), which
    cannot run ``-m SemiSupSegLib.backend``; PythonSlicer is on the PATH or next to it."""
    semisupseg, _scene = module
    logic = semisupseg.SemiSupSegLogic()
    p = logic.getParameterNode()
    application = executable(tmp_path / "Slicer-5.8" / "bin" / "SlicerApp-real")
    monkeypatch.setattr(sys, "executable", str(application))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing here"))
    with pytest.raises(FileNotFoundError, match="neither on the PATH nor next to .*SlicerApp-real"):
        logic.pythonExecutable(p)
    beside = executable(application.with_name("PythonSlicer"))
    assert logic.pythonExecutable(p) == str(beside)
    on_path = executable(tmp_path / "launchers" / "PythonSlicer")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert logic.pythonExecutable(p) == str(on_path)  # where Slicer puts it: first choice
    monkeypatch.setenv("PATH", str(tmp_path / "nothing here"))
    monkeypatch.setattr(sys, "executable", "/opt/conda/bin/python3.11")
    assert logic.pythonExecutable(p) == "/opt/conda/bin/python3.11"  # scripts and tests


def test_pythonslicer_in_a_macos_bundle_and_when_slicer_names_no_python(
    module, tmp_path, monkeypatch
):
    """Current Slicer sets sys.executable to PythonSlicer found on the PATH, or to "" when it
    is not there; in a macOS bundle the application is in Contents/MacOS and PythonSlicer in
    Contents/bin."""
    semisupseg, _scene = module
    logic = semisupseg.SemiSupSegLogic()
    p = logic.getParameterNode()
    monkeypatch.setenv("PATH", str(tmp_path / "nothing here"))
    monkeypatch.setattr(sys, "executable", "")
    with pytest.raises(FileNotFoundError, match="not on the PATH.*sys.executable is empty"):
        logic.pythonExecutable(p)
    contents = tmp_path / "Slicer.app" / "Contents"
    application = executable(contents / "MacOS" / "Slicer")
    monkeypatch.setattr(sys, "executable", str(application))
    with pytest.raises(FileNotFoundError, match="next to .*Slicer"):
        logic.pythonExecutable(p)
    in_bin = executable(contents / "bin" / "PythonSlicer")
    assert logic.pythonExecutable(p) == str(in_bin)


def test_an_external_python_works_where_pythonslicer_cannot_be_found(module, tmp_path, monkeypatch):
    """The panel (its tables, the export) and a job in an external Python need no
    PythonSlicer; only a job in Slicer's own Python does, and it says so when it starts."""
    semisupseg, scene = module
    external = pathlib.Path(sys.executable)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing here"))
    monkeypatch.setattr(sys, "executable", "")  # Slicer: PythonSlicer not on the PATH
    FakeProcess.script, FakeProcess.returncode = [], 0
    logic = semisupseg.SemiSupSegLogic(processFactory=FakeProcess)
    p = logic.getParameterNode()
    p.outputFolder, p.method = tmp_path / "out", "supervised"
    assert logic.reviewRows(p) == []
    volume = mrml_io.readVolumeNode(scene, hippocampusCase("001")[0], "hc001")
    labels = segmentationFromLabelFile(scene, hippocampusCase("001")[1], volume, "hc001 labels")
    logic.setLabeledNodePairs(p, [(volume, labels)])
    jobPath = logic.exportJob(p)
    with pytest.raises(FileNotFoundError, match="choose an external Python environment"):
        logic.startJob(jobPath, p)
    assert not logic.running
    p.useExternalPython, p.externalPython = True, external
    runner = logic.startJob(jobPath, p)
    assert runner.process.command[:3] == [str(external), "-m", "SemiSupSegLib.backend"]


def path_fields_with_history():
    """The ctkPathLineEdit widgets of the .ui that keep a history (a settingKey)."""
    root = ET.parse(UI_FILE).getroot()
    return sorted(
        widget.get("name")
        for widget in root.iter("widget")
        if widget.get("class") == "ctkPathLineEdit"
        and widget.find("property[@name='settingKey']") is not None
    )


def test_starting_a_job_adds_its_paths_to_the_fields_history(module, tmp_path):
    """A settingKey alone does nothing: ctkPathLineEdit keeps a history only of the paths
    given to addCurrentPathToHistory()."""
    semisupseg, scene = module
    FakeProcess.script, FakeProcess.returncode = [], 0
    widget = object.__new__(semisupseg.SemiSupSegWidget)  # the panel without Qt: a fake .ui
    widget.ui, widget.pollTimer = mock.MagicMock(), mock.MagicMock()
    widget.updateGui = lambda *args: None
    widget.logic = semisupseg.SemiSupSegLogic(processFactory=FakeProcess)
    widget._parameterNode = p = widget.logic.getParameterNode()
    volume = mrml_io.readVolumeNode(scene, hippocampusCase("001")[0], "hc001")
    labels = segmentationFromLabelFile(scene, hippocampusCase("001")[1], volume, "hc001 labels")
    widget.logic.setLabeledNodePairs(p, [(volume, labels)])
    p.outputFolder, p.method = tmp_path / "out", "supervised"
    p.useExternalPython, p.externalPython = True, pathlib.Path(sys.executable)

    widget._start(widget.logic.exportJob(p))
    fields = path_fields_with_history()
    assert len(fields) == 3
    for name in fields:
        getattr(widget.ui, name).addCurrentPathToHistory.assert_called_once_with()


def test_a_plan_event_fills_the_plan_line_and_the_log(module, tmp_path):
    """The panel (the real .ui in PySide6, offscreen) polling a job whose backend sends its
    plan: the line under Time budget gives the plan, the log its table."""
    semisupseg, scene = module
    values = {
        "target_spacing": [1.25, 1.25, 1.25],
        "patch_size": [56, 40, 24],
        "batch_size": 4,
        "iterations": 1500,
    }
    plan = planEventLine(values, overrides={"batch_size": 2})  # batch_size=2 under Advanced
    FakeProcess.script = [
        encode_event(make_event("stage", stage="validation", message="checking 1 case")),
        plan,
        encode_event(make_event("start", stage="training", total=1500)),
        encode_event(make_event("progress", stage="training", iteration=1, total=1500)),
    ]
    FakeProcess.returncode = 0
    widget = object.__new__(semisupseg.SemiSupSegWidget)
    widget.ui, widget.pollTimer = panelWidgets(loadPanel()), mock.MagicMock()
    widget.updateGui = lambda *args: None
    # CTK's path fields load as plain QWidgets here (their history is tested above)
    widget._rememberPathsOfThisJob = lambda: None
    widget.logic = semisupseg.SemiSupSegLogic(processFactory=FakeProcess)
    widget._parameterNode = p = widget.logic.getParameterNode()
    volume = mrml_io.readVolumeNode(scene, hippocampusCase("001")[0], "hc001")
    labels = segmentationFromLabelFile(scene, hippocampusCase("001")[1], volume, "hc001 labels")
    widget.logic.setLabeledNodePairs(p, [(volume, labels)])
    p.outputFolder, p.method, p.extraSettings = tmp_path / "out", "supervised", "batch_size=2"

    widget.ui.planLabel.setText("Plan (cuda): the last job's")
    widget._start(widget.logic.exportJob(p))
    assert (
        widget.ui.planLabel.text()
        == "Plan: made from your data and the device when training starts."
    )
    widget.onPollTimer()  # the validation stage and the plan
    assert widget.ui.planLabel.text() == (
        "Plan (cpu): 1.25 mm, patch 56x40x24, batch 2, 1500 iterations; "
        "1 setting of yours (batch_size)"
    )
    table = json.loads(plan)["message"]
    assert widget.ui.planLabel.toolTip() == table
    log = widget.ui.logTextEdit.toPlainText().splitlines()
    assert (
        log[-len(table.splitlines()) :]
        == ["[Planning] " + table.splitlines()[0]] + (table.splitlines()[1:])
    )
    assert any(row.split()[:2] == ["batch_size", "2"] and "set by you" in row for row in log)
    widget.onPollTimer()  # training starts: the plan stays
    assert widget.ui.planLabel.text().startswith("Plan (cpu): 1.25 mm")
    widget.logic.shutdown()


def test_the_plan_lines_tool_tip_explains_it_while_there_is_no_plan(module):
    """setup shows 'no plan yet' on the plan line: its tool tip must stay the .ui's
    explanation (real .ui in PySide6), and come back when the next job starts."""
    semisupseg, _scene = module
    widget = object.__new__(semisupseg.SemiSupSegWidget)
    widget.ui = panelWidgets(loadPanel())
    explanation = widget.ui.planLabel.toolTip()
    assert "planned from the data and the device" in explanation
    widget._showPlan(None)  # what setup does
    assert widget.ui.planLabel.toolTip() == explanation
    progress = ProgressModel()
    progress.feedLine(planEventLine({"batch_size": 4, "iterations": 1500}))
    widget._showPlan(progress)
    assert widget.ui.planLabel.toolTip() == progress.planTable != explanation
    widget._showPlan(None)  # the next job starts
    assert widget.ui.planLabel.toolTip() == explanation


def test_reload_reads_the_library_again(module, monkeypatch):
    """Developer mode's Reload: Slicer executes SemiSupSeg.py again (reloadScriptedModule);
    the SemiSupSegLib modules it imports must be read again too."""
    semisupseg, _scene = module
    reloaded = []

    def reloadScriptedModule(widget):  # what slicer.util.reloadScriptedModule does
        spec = importlib.util.spec_from_file_location("SemiSupSeg", MODULE_FILE)
        fresh = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fresh)
        reloaded.append(fresh)

    monkeypatch.setattr(
        semisupseg.ScriptedLoadableModuleWidget, "onReload", reloadScriptedModule, raising=False
    )
    for name in [n for n in sys.modules if n.split(".")[0] == "SemiSupSegLib"]:
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # restored after the test
    widget = object.__new__(semisupseg.SemiSupSegWidget)
    widget.onReload()
    (fresh,) = reloaded
    assert fresh.mrml_io is not mrml_io
    assert fresh.mrml_io.__file__ == mrml_io.__file__
    assert fresh.JobExporter is sys.modules["SemiSupSegLib.job_export"].JobExporter
    assert fresh.JobExporter is not semisupseg.JobExporter


def in_slicer_tests(semisupseg, monkeypatch):
    """The tests ctest runs inside Slicer: SemiSupSegTest and SemiSupSegModuleTest."""
    monkeypatch.setitem(sys.modules, "SemiSupSeg", semisupseg)
    path = MODULE_DIR / "Testing" / "Python" / "SemiSupSegModuleTest.py"
    spec = importlib.util.spec_from_file_location("SemiSupSegModuleTest", path)
    module_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module_test)
    return [semisupseg.SemiSupSegTest("runTest"), module_test.SemiSupSegModuleTest("runTest")]


def run_like_ctest(tests):
    """What slicer.testing.runUnitTest does: the run fails unless the result is successful."""
    return unittest.TextTestRunner(stream=io.StringIO()).run(unittest.TestSuite(tests))


def test_in_slicer_tests_skip_where_slicers_python_lacks_the_backend(module, monkeypatch, tmp_path):
    semisupseg, _scene = module
    tests = in_slicer_tests(semisupseg, monkeypatch)
    importlib.import_module("SemiSupSegLib.sample_cases")  # before the packages disappear
    monkeypatch.setattr(sys, "path", [str(tmp_path)])  # a Python without torch, monai, timm
    result = run_like_ctest(tests)
    assert result.wasSuccessful(), result.errors + result.failures
    assert len(result.skipped) == 2
    for _test, reason in result.skipped:
        assert "needs torch>=2.1, monai>=1.4, timm>=1.0, einops>=0.6 in Slicer's Python" in reason


def test_in_slicer_tests_skip_where_mrhead_cannot_be_downloaded(module, monkeypatch):
    semisupseg, _scene = module

    def downloadSample(name):  # the network boundary
        raise OSError("network is unreachable")

    monkeypatch.setitem(
        sys.modules, "SampleData", types.SimpleNamespace(downloadSample=downloadSample)
    )
    result = run_like_ctest(in_slicer_tests(semisupseg, monkeypatch))
    assert result.wasSuccessful(), result.errors + result.failures
    assert [reason for _test, reason in result.skipped] == [
        "the MRHead sample could not be downloaded (network is unreachable)"
    ] * 2
