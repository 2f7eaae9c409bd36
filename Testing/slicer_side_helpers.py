"""Shared helpers of the test_slicer_* tests: the real data, MRML scenes built with slicer-core,
a fake process for the process boundary, and the job settings of every real backend run."""

import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SemiSupSeg"
LIB_DIR = MODULE_DIR / "SemiSupSegLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SemiSupSeg.ui"
MODULE_FILE = MODULE_DIR / "SemiSupSeg.py"

# Every real backend run in these tests: tiny, CPU, no intermediate checkpoints.
TINY_SETTINGS = {"iterations": 3, "batch_size": 1, "checkpoint_every": 0}
CLASS_NAMES = ("Anterior", "Posterior")


def hippocampusDir() -> Path:
    """The MSD hippocampus data ($SEMISUPSEG_DATA, else ../shared next to the repository)."""
    candidates = []
    if os.environ.get("SEMISUPSEG_DATA"):
        candidates.append(Path(os.environ["SEMISUPSEG_DATA"]))
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "msd-hippocampus")
    for folder in candidates:
        if (folder / "dataset.json").is_file():
            return folder
    pytest.skip(f"hippocampus data not found (looked in {[str(c) for c in candidates]})")


def hippocampusCase(number: str):
    folder = hippocampusDir()
    return (
        folder / "imagesTr" / f"hippocampus_{number}.nii.gz",
        folder / "labelsTr" / f"hippocampus_{number}.nii.gz",
    )


def newScene():
    """A real MRML scene (slicer-core) with the segmentation converters registered."""
    slicer = pytest.importorskip("slicer")
    from SemiSupSegLib import mrml_io

    mrml_io.ensureSegmentationConverters()
    return slicer.vtkMRMLScene()


def nodeIds(scene) -> List[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def segmentationFromLabelFile(
    scene, labelPath, volume, name: str, segmentNames: Sequence[str] = CLASS_NAMES, order=None
):
    """A segmentation node as a user would have it: one named segment per label value.

    ``order`` permutes the segments (e.g. [1, 0] puts label 2's segment first) to check that
    export follows names, not the segmentation's order.
    """
    import slicer

    from SemiSupSegLib import mrml_io

    labelmap = mrml_io.readVolumeNode(scene, labelPath, name + " labels", labelmap=True)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = []
    colours = [(0.9, 0.2, 0.1), (0.1, 0.4, 0.9), (0.2, 0.8, 0.2)]
    indices = list(order) if order is not None else list(range(len(segmentNames)))
    import vtk

    array = vtk.vtkStringArray()
    for value in range(len(segmentNames)):
        sid = segmentation.GetSegmentation().AddEmptySegment(
            "", segmentNames[value], list(colours[value % len(colours)])
        )
        ids.append(sid)
        array.InsertNextValue(sid)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        labelmap, segmentation, array
    )
    assert ok
    mrml_io.removeNodeWithDependents(scene, labelmap)
    if order is not None:  # reorder segments in the segmentation itself
        seg = segmentation.GetSegmentation()
        for position, index in enumerate(indices):
            seg.SetSegmentIndex(ids[index], position)
    return segmentation


def colourTable(scene, names):
    """A user colour table: value i + 1 is names[i], coloured red, blue, green..."""
    import slicer

    colours = slicer.vtkMRMLColorTableNode()
    colours.SetTypeToUser()
    colours.SetNumberOfColors(len(names) + 1)
    colours.SetColor(0, "background", 0, 0, 0, 0)
    rgb = [(1, 0, 0), (0, 0, 1), (0, 1, 0)]
    for value, name in enumerate(names, start=1):
        colours.SetColor(value, name, *rgb[(value - 1) % 3], 1)
    scene.AddNode(colours)
    return colours


def labelmapNode(scene, array, matrix, names, name="labels"):
    """A labelmap volume node with the voxels ``array`` (k, j, i) on the grid whose IJK to RAS
    matrix is ``matrix``, and a colour table naming value i + 1 ``names[i]``."""
    import numpy as np
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.int16))
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetAndObserveColorNodeID(colourTable(scene, names).GetID())
    return node


def ijkToRas(node):
    """A volume node's IJK to RAS matrix as a 4x4 array."""
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def labelArray(path):
    import numpy as np
    import SimpleITK as sitk

    return np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


class FakeProcess:
    """Stands in for BackendProcess at the process boundary: replays lines, then an exit code."""

    script: List[str] = []
    returncode = 0
    stderr = ""
    instances: List["FakeProcess"] = []

    def __init__(self, command, env=None, cwd=None):
        self.command, self.env, self.cwd = command, env, cwd
        self.lines = list(type(self).script)
        self.code: Optional[int] = None
        self.cancelRequested = False
        self.started = False
        type(self).instances.append(self)

    def start(self):
        self.started = True
        return self

    def readLines(self, maxLines=10000):
        out, self.lines = self.lines[:2], self.lines[2:]  # a couple of lines per poll
        return out

    def poll(self):
        if self.cancelRequested and not self.lines:
            return 130
        if self.lines:
            return None
        return type(self).returncode

    def cancel(self):
        self.cancelRequested = True
        self.lines = self.lines[:1]

    def stop(self):
        self.cancelRequested = True
        self.lines = []
        return self.poll()

    def stderrTail(self):
        return type(self).stderr


def pythonExecutable() -> str:
    return sys.executable


def planEventLine(values, overrides=None, device="cpu", budget="standard", memoryGiB=0.3) -> str:
    """A ``plan`` event line as the backend sends it (``planning.plan_training``), from the
    backend's own ``Plan``: ``values`` planned, ``overrides`` set by the user."""
    from SemiSupSegLib.backend.planning import Plan
    from SemiSupSegLib.protocol import encode_event, make_event

    plan = Plan(
        values=dict(values),
        reasons={name: f"planned for {device}" for name in values},
        device=device,
        budget=budget,
        estimated_memory_gib=memoryGiB,
        overrides=dict(overrides or {}),
    )
    event = make_event("plan", stage="planning", message=plan.table(), plan=plan.to_dict())
    return encode_event(event)


_QT_APPLICATION = []  # the one QApplication of the test process, kept alive


def loadPanel():
    """The panel's real .ui loaded with PySide6 (offscreen); Slicer's own widget classes load
    as the Qt classes they extend (the .ui's customwidgets)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    QtUiTools = pytest.importorskip("PySide6.QtUiTools")
    QtCore = pytest.importorskip("PySide6.QtCore")
    if not _QT_APPLICATION:
        _QT_APPLICATION.append(QtWidgets.QApplication.instance() or QtWidgets.QApplication([]))
    loader = QtUiTools.QUiLoader()
    handle = QtCore.QFile(str(UI_FILE))
    assert handle.open(QtCore.QFile.ReadOnly)
    panel = loader.load(handle)
    handle.close()
    assert panel is not None, loader.errorString()
    return panel


def panelWidgets(panel):
    """The panel's named widgets as attributes, what slicer.util.childWidgetVariables gives the
    module as ``self.ui``; the panel itself too (it owns the others: they live while it does)."""
    import types

    from PySide6.QtCore import QObject

    widgets = {w.objectName(): w for w in panel.findChildren(QObject) if w.objectName()}
    return types.SimpleNamespace(**widgets, **{panel.objectName(): panel})
