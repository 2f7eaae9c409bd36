"""Render the module panel (SemiSupSeg.ui) offscreen, filled from a real session's files.

    .venv/bin/python scripts/screenshot_session.py SESSION      # a real two-round session
    .venv/bin/python scripts/render_panel.py SESSION [OUTPUT.png]

Slicer's custom widgets are mapped to look-alike Qt classes before loading (collapsible
button -> group box, node selectors -> combo boxes, path line edit -> line edit, slider widget
-> slider). Every value shown comes from SESSION and this machine, through the module's own
code: the training choices from the rounds' job.json, the review table of round 1 (with the
case accepted from it), round 2 (the retraining) replayed from its recorded events up to the
middle of its training, as the panel shows a running job, and the dependency check and GPU
line from the probe run in this Python.
"""

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt  # noqa: E402
from PySide6.QtGui import QColor, QFont, QPalette, QTextCursor  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import (  # noqa: E402
    QAbstractItemView,
    QApplication,
    QComboBox,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SemiSupSeg"))
sys.path.insert(0, str(REPO / "scripts"))

from screenshot_session import EVENTS_FILE, render_command  # noqa: E402
from SemiSupSegLib import dependencies  # noqa: E402
from SemiSupSegLib.backend_process import BackendProcess  # noqa: E402
from SemiSupSegLib.dependencies import ProbeResult, parseProbeOutput, probeCommand  # noqa: E402
from SemiSupSegLib.output_layout import review_order  # noqa: E402
from SemiSupSegLib.progress import ProgressModel, planSummary  # noqa: E402
from SemiSupSegLib.protocol import JOB_FILE_NAME, JobSpec  # noqa: E402
from SemiSupSegLib.results import Session  # noqa: E402
from SemiSupSegLib.training_options import ENCODER_SETTING, describeGpu  # noqa: E402

REQUIREMENTS = dependencies.readRequirements(REPO / "SemiSupSeg" / "Resources" / "requirements.txt")
UI_FILE = REPO / "SemiSupSeg" / "Resources" / "UI" / "SemiSupSeg.ui"
OUTPUT = REPO / "Resources" / "Screenshots" / "panel.png"

LOOK_ALIKES = {
    "qMRMLWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "qMRMLCheckableNodeComboBox": "QComboBox",
    "qMRMLSegmentSelectorWidget": "QComboBox",
    "ctkPathLineEdit": "QLineEdit",
    "ctkSliderWidget": "QSlider",
}
# properties the look-alike classes do not have
DROP = {
    "nodeTypes",
    "showChildNodeTypes",
    "noneEnabled",
    "addEnabled",
    "removeEnabled",
    "filters",
    "settingKey",
    "collapsed",
    "singleStep",
    "pageStep",
    "minimum",
    "maximum",
    "value",
}


def look_alike_ui(path: Path) -> bytes:
    """The .ui with custom widgets replaced by plain Qt classes (no customwidgets block)."""
    tree = ET.parse(path)
    root = tree.getroot()
    for block in ("customwidgets", "connections"):
        for element in root.findall(block):
            root.remove(element)
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls not in LOOK_ALIKES:
            continue
        widget.set("class", LOOK_ALIKES[cls])
        for prop in list(widget.findall("property")):
            name = prop.get("name")
            if cls == "ctkCollapsibleButton" and name == "text":
                prop.set("name", "title")
            elif name in DROP:
                widget.remove(prop)
        if cls == "ctkSliderWidget":
            orientation = ET.SubElement(widget, "property", name="orientation")
            ET.SubElement(orientation, "enum").text = "Qt::Horizontal"
    return ET.tostring(root, encoding="utf-8")


def fill_table(table: QTableWidget, rows) -> None:
    table.setRowCount(len(rows))
    for r, values in enumerate(rows):
        for c, value in enumerate(values):
            table.setItem(r, c, QTableWidgetItem(value))
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
    table.horizontalHeader().setStretchLastSection(True)
    table.setFixedHeight(
        table.horizontalHeader().height() + sum(table.rowHeight(r) for r in range(len(rows))) + 4
    )


def probe_this_python() -> ProbeResult:
    """The module's dependency probe, run in this Python as the panel runs it."""
    process = BackendProcess(probeCommand(sys.executable, REQUIREMENTS)).start()
    code = process.wait(timeout=300)
    return parseProbeOutput(process.readLines(), process.stderrTail(), code)


def replay_halfway(events: Path) -> ProgressModel:
    """The progress model of a job fed with its recorded events up to half of its training."""
    progress = ProgressModel()
    for line in events.read_text(encoding="utf-8").splitlines():
        event = progress.feedLine(line)
        if event and event.get("event") == "progress" and progress.total:
            if progress.iteration >= progress.total / 2:
                break
    return progress


def fill(panel: QWidget, session_folder: Path) -> None:
    """The panel as it looks while round 2 (retraining) runs, after round 1 was reviewed."""

    def find(cls, name):
        widget = panel.findChild(cls, name)
        if widget is None:
            raise SystemExit(f"{UI_FILE}: no {cls.__name__} named {name}")
        return widget

    session = Session.load(session_folder)
    if len(session.rounds) < 2 or session.classes is None:
        raise SystemExit(f"{session.path}: expected two rounds (scripts/screenshot_session.py)")
    first, second = session.rounds[0].round, session.rounds[1].round
    job = JobSpec.load(session.roundFolder(first) / JOB_FILE_NAME)
    retrain_path = session.roundFolder(second) / JOB_FILE_NAME
    retrain = JobSpec.load(retrain_path)
    user_cases = [c.name for c in retrain.labeled if c.name not in session.accepted]

    combos = {
        "labeledVolumeSelector": [user_cases[0]],
        "labeledSegmentationSelector": [f"{user_cases[0]} labels"],
        "unlabeledVolumesSelector": [f"{len(job.unlabeled)} volumes checked"],
        "methodComboBox": [job.method],
        "modalityComboBox": [job.modality],
        "network3DComboBox": [job.settings["network"]],
        "presetComboBox": ["custom"],
        "deviceComboBox": [job.device],
        "colourMapComboBox": ["Inferno"],
    }
    for name, items in combos.items():
        find(QComboBox, name).addItems(items)
    find(QLineEdit, "encoder2DLineEdit").setText(str(job.settings.get(ENCODER_SETTING, "")))
    find(QLineEdit, "unlabeledFolderPathLineEdit").setText("")
    find(QLineEdit, "externalPythonPathLineEdit").setText("")
    find(QLineEdit, "outputFolderPathLineEdit").setText(str(session.folder))
    find(QLineEdit, "extraSettingsLineEdit").setPlaceholderText("name=value, ...")
    find(QSpinBox, "iterationsSpinBox").setValue(int(job.settings["iterations"]))
    probe = probe_this_python()
    gpu, _has_gpu = describeGpu(probe.asDict() if not probe.error else None)
    find(QLabel, "gpuLabel").setText(f"GPU: {gpu}")
    find(QLabel, "dependenciesLabel").setText(dependencies.summary(probe, REQUIREMENTS))
    names = ", ".join(f"{i + 1} {name}" for i, name in enumerate(session.classes.names))
    find(QLabel, "classesLabel").setText(f"Classes: {names}")
    labeled_rows = [(case, f"{case} labels", "user") for case in user_cases]
    labeled_rows += [
        (case, Path(accepted.label).name, session.labelOrigin(case))
        for case, accepted in session.accepted.items()
    ]
    fill_table(find(QTableWidget, "labeledTable"), labeled_rows)

    progress = replay_halfway(session.roundFolder(second) / EVENTS_FILE)
    find(QLabel, "planLabel").setText(planSummary(progress.plan))
    apply = find(QPushButton, "applyButton")
    apply.setText("Cancel")
    apply.setEnabled(True)
    find(QProgressBar, "progressBar").setValue(progress.percent)
    find(QLabel, "statusLabel").setText(progress.statusText())
    log = find(QPlainTextEdit, "logTextEdit")
    log.setFixedHeight(96)
    log.setPlainText("\n".join([f"Job: {retrain_path}"] + list(progress.log)))
    log.moveCursor(QTextCursor.End)

    rows = session.reviewRows(first)
    find(QLabel, "resultsLabel").setText(f"Round {first}: {len(rows)} case(s), {review_order()}")
    results = find(QTableWidget, "resultsTable")
    fill_table(results, [row.cells() for row in rows[:6]])
    results.setSelectionBehavior(QAbstractItemView.SelectRows)
    results.selectRow(1)
    slider = find(QSlider, "uncertaintyOpacitySliderWidget")
    slider.setRange(0, 100)
    slider.setValue(40)
    for name in ("editSegmentationButton", "acceptButton"):
        find(QPushButton, name).setEnabled(True)
    find(QPushButton, "retrainButton").setEnabled(False)  # a job is running


def slicer_like_palette(app: QApplication) -> None:
    app.setStyle("Fusion")
    palette = QPalette()
    palette.setColor(QPalette.Window, QColor("#f5f5f5"))
    palette.setColor(QPalette.Base, QColor("#ffffff"))
    palette.setColor(QPalette.AlternateBase, QColor("#eef3f8"))
    palette.setColor(QPalette.Button, QColor("#f0f0f0"))
    palette.setColor(QPalette.Highlight, QColor("#3a87d6"))
    palette.setColor(QPalette.HighlightedText, QColor("#ffffff"))
    app.setPalette(palette)
    font = QFont()
    font.setPointSize(9)
    app.setFont(font)


def render(session_folder: Path, output: Path) -> Path:
    app = QApplication.instance() or QApplication(sys.argv)
    slicer_like_palette(app)
    data = QByteArray(look_alike_ui(UI_FILE))
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    panel = loader.load(buffer)
    if panel is None:
        raise SystemExit(f"{UI_FILE}: {loader.errorString()}")
    fill(panel, session_folder)
    panel.setAttribute(Qt.WA_DontShowOnScreen)
    panel.resize(460, 100)
    panel.show()
    panel.resize(460, panel.sizeHint().height())
    app.processEvents()
    review = panel.findChild(QWidget, "reviewCollapsibleButton")
    bottom = review.geometry().bottom() + 10  # leave out the trailing spacer
    output.parent.mkdir(parents=True, exist_ok=True)
    picture = panel.grab().copy(0, 0, panel.width(), min(bottom, panel.height()))
    if not picture.save(str(output), "PNG"):
        raise SystemExit(f"could not write {output}")
    return output


if __name__ == "__main__":
    render_command(render, OUTPUT, __doc__)
