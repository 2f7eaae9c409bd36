"""Render the module panel (SemiSupSeg.ui) offscreen to Resources/Screenshots/panel.png.

    .venv/bin/python scripts/render_panel.py [OUTPUT.png]

Slicer's custom widgets are mapped to look-alike Qt classes before loading (collapsible
button -> group box, node selectors -> combo boxes, path line edit -> line edit, slider widget
-> slider) and filled with example content, so the picture resembles the panel in Slicer.
"""

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt  # noqa: E402
from PySide6.QtGui import QColor, QFont, QPalette  # noqa: E402
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


def fill(panel: QWidget) -> None:
    """Example content: round 1 finished and reviewed, round 2 (retraining) running."""

    def find(cls, name):
        widget = panel.findChild(cls, name)
        if widget is None:
            raise SystemExit(f"{UI_FILE}: no {cls.__name__} named {name}")
        return widget

    combos = {
        "labeledVolumeSelector": ["hippocampus_017"],
        "labeledSegmentationSelector": ["hippocampus_017 segmentation"],
        "unlabeledVolumesSelector": ["152 volumes checked"],
        "methodComboBox": ["mn+em", "mn", "em", "supervised", "mean-teacher", "ua-mt"],
        "modalityComboBox": ["MR", "CT", "other"],
        "network3DComboBox": ["unet", "segresnet", "swinunetr"],
        "presetComboBox": ["standard", "quick", "thorough", "custom"],
        "deviceComboBox": ["auto", "cuda", "mps", "cpu"],
        "colourMapComboBox": ["Inferno", "Viridis"],
    }
    for name, items in combos.items():
        combo = find(QComboBox, name)
        combo.addItems(items)
    find(QLineEdit, "encoder2DLineEdit").setText("mobilenetv2_100")
    find(QLineEdit, "unlabeledFolderPathLineEdit").setText("/data/hippocampus/imagesUnlabeled")
    find(QLineEdit, "externalPythonPathLineEdit").setText("")
    find(QLineEdit, "outputFolderPathLineEdit").setText("~/SlicerScenes/SemiSupSeg")
    find(QLineEdit, "extraSettingsLineEdit").setPlaceholderText("name=value, ...")
    find(QSpinBox, "iterationsSpinBox").setValue(1500)
    find(QSpinBox, "iterationsSpinBox").setEnabled(False)
    find(QLabel, "gpuLabel").setText("GPU: CUDA: NVIDIA RTX A5000 (24 GB)")
    find(QLabel, "dependenciesLabel").setText("Python 3.9.10: all set")
    find(QLabel, "classesLabel").setText("Classes: 1 Anterior, 2 Posterior")
    fill_table(
        find(QTableWidget, "labeledTable"),
        [
            ("hippocampus_001", "hippocampus_001 segmentation", "user"),
            ("hippocampus_003", "hippocampus_003 segmentation", "user"),
            ("hippocampus_004", "hippocampus_004 segmentation", "user"),
            ("hippocampus_033", "hippocampus_033.v2.nrrd", "round 1 (v2)"),
        ],
    )
    apply = find(QPushButton, "applyButton")
    apply.setText("Cancel")
    apply.setEnabled(True)
    find(QProgressBar, "progressBar").setValue(62)
    find(QLabel, "statusLabel").setText(
        "Co-training 930/1500 · loss 0.2113, loss_2d 0.2471 · 4m12s left"
    )
    log = find(QPlainTextEdit, "logTextEdit")
    log.setFixedHeight(96)
    log.setPlainText(
        "Job: ~/SlicerScenes/SemiSupSeg/round-002/job.json\n"
        "[Checking data] checking the 4 labeled and 151 unlabeled case(s)\n"
        "[Training] warm start from round-001/run/model.pt\n"
        "[Training] training mn+em (unet) on cuda (NVIDIA RTX A5000, 24 GB)\n"
        "[Co-training] 2D and 3D models teach each other"
    )
    find(QLabel, "resultsLabel").setText("Round 1: 152 case(s), most uncertain first")
    results = find(QTableWidget, "resultsTable")
    fill_table(
        results,
        [
            ("hippocampus_033", "0.4127", "1204", "1", "accepted (hippocampus_033.v2.nrrd)"),
            ("hippocampus_121", "0.3981", "1377", "1", "to review"),
            ("hippocampus_088", "0.3755", "1519", "1", "to review"),
            ("hippocampus_150", "0.3310", "1288", "1", "to review"),
        ],
    )
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


def render(output: Path) -> Path:
    app = QApplication.instance() or QApplication(sys.argv)
    slicer_like_palette(app)
    data = QByteArray(look_alike_ui(UI_FILE))
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    panel = loader.load(buffer)
    if panel is None:
        raise SystemExit(f"{UI_FILE}: {loader.errorString()}")
    fill(panel)
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
    path = render(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT)
    print(f"wrote {path}")
