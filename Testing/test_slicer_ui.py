"""The panel's .ui: it loads with Qt (PySide6, offscreen), every widget the code names exists,
every parameter-node field is bound to a widget of a class Slicer's parameterNodeWrapper can
connect, and the rendered panel shows the Data, Training, Run and Review sections."""

import ast
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from slicer_side_helpers import (
    MODULE_DIR,
    MODULE_FILE,
    REPO,
    TINY_SETTINGS,
    UI_FILE,
    hippocampusDir,
    loadPanel,
)

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")
QtUiTools = pytest.importorskip("PySide6.QtUiTools")
QtCore = pytest.importorskip("PySide6.QtCore")

MODULE_TEST = MODULE_DIR / "Testing" / "Python" / "SemiSupSegModuleTest.py"

# Widget classes that Slicer 5.8's parameterNodeWrapper connects to each parameter type
# (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py).
CONNECTABLE = {
    "node": {"qMRMLNodeComboBox"},
    "list": set(),  # lists are kept in sync by the widget code, not connected
    "str-choice": {"QComboBox", "ctkComboBox"},
    "str": {"QLineEdit", "QLabel", "QTextEdit"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "ctkDoubleSlider"},
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
}


@pytest.fixture(scope="module")
def panel():
    return loadPanel()


def ui_classes():
    """objectName -> class, straight from the XML."""
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def parameter_bindings():
    root = ET.parse(UI_FILE).getroot()
    bindings = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings[prop.find("string").text] = (widget.get("name"), widget.get("class"))
    return bindings


def parameter_fields():
    """Field name -> kind, from the @parameterNodeWrapper class in SemiSupSeg.py."""
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SemiSupSegParameterNode"
    )
    fields = {}
    for statement in cls.body:
        if not isinstance(statement, ast.AnnAssign):
            continue
        text = ast.unparse(statement.annotation)
        if text.startswith("list["):
            kind = "list"
        elif "vtkMRML" in text:
            kind = "node"
        elif text.startswith("Annotated[str") and "Choice" in text:
            kind = "str-choice"
        elif "pathlib.Path" in text:
            kind = "path"
        else:
            kind = re.sub(r"^Annotated\[(\w+).*", r"\1", text)
        fields[statement.target.id] = kind
    return fields


def names_used(path, owner):
    return set(re.findall(rf"{owner}\.ui\.(\w+)", path.read_text()))


def test_every_widget_the_code_names_exists(panel):
    existing = {w.objectName() for w in panel.findChildren(QtCore.QObject) if w.objectName()}
    used = names_used(MODULE_FILE, "self") | names_used(MODULE_TEST, "widget")
    assert len(used) >= 20  # the regex found the names (guards against a silent no-op)
    missing = sorted(used - existing)
    assert not missing, f"used in code but not in {UI_FILE.name}: {missing}"


def test_parameter_node_fields_are_bound_to_connectable_widgets():
    fields = parameter_fields()
    bindings = parameter_bindings()
    assert set(bindings) <= set(fields), sorted(set(bindings) - set(fields))
    for name, kind in fields.items():
        if kind == "list":
            assert name not in bindings
            continue
        assert name in bindings, f"parameter {name} has no widget in the .ui"
        widget, cls = bindings[name]
        assert cls in CONNECTABLE[kind], f"{widget} ({cls}) cannot be connected to {name} ({kind})"


def test_sections_and_scene_connections():
    classes = ui_classes()
    root = ET.parse(UI_FILE).getroot()
    sections = {
        w.find("property[@name='text']/string").text
        for w in root.iter("widget")
        if w.get("class") == "ctkCollapsibleButton"
    }
    assert sections == {"Data", "Training", "Run", "Review"}
    receivers = {c.find("receiver").text for c in root.iter("connection")}
    mrml = {n for n, c in classes.items() if c.startswith("qMRML") and c != "qMRMLWidget"}
    assert mrml <= receivers, f"MRML widgets without the scene: {sorted(mrml - receivers)}"
    declared = {c.find("class").text for c in root.iter("customwidget")}
    custom = {c for c in classes.values() if c.startswith(("qMRML", "ctk"))}
    assert custom <= declared


def run_script(name, *args):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name)] + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def real_session(tmp_path_factory):
    """What scripts/screenshot_session.py makes for the README pictures, tiny: two real rounds
    (train and predict, accept the most uncertain case, retrain) on hippocampus cases."""
    hippocampusDir()
    folder = tmp_path_factory.mktemp("session")
    settings = json.dumps({k: v for k, v in TINY_SETTINGS.items() if k != "iterations"})
    run_script(
        "screenshot_session.py",
        folder,
        "--labeled=2",
        "--unlabeled=2",
        "--method=supervised",
        f"--iterations={TINY_SETTINGS['iterations']}",
        f"--settings={settings}",
    )
    return folder


def test_rendered_panel_picture(real_session, tmp_path):
    output = tmp_path / "panel.png"
    run_script("render_panel.py", real_session, output)
    from PySide6.QtGui import QImage

    image = QImage(str(output))
    assert image.width() >= 400 and image.height() >= 800
    assert not QImage(str(REPO / "Resources" / "Screenshots" / "panel.png")).isNull()


def test_rendered_review_picture(real_session, tmp_path):
    output = tmp_path / "review.png"
    result = run_script("render_review.py", real_session, output)
    from PySide6.QtGui import QImage

    image = QImage(str(output))
    assert image.width() >= 600 and image.height() >= 300
    assert "wrote" in result.stdout
    assert not QImage(str(REPO / "Resources" / "Screenshots" / "review.png")).isNull()


def test_icons():
    from PySide6.QtGui import QImage

    for path in (
        MODULE_DIR / "Resources" / "Icons" / "SemiSupSeg.png",
        REPO / "Resources" / "SemiSupSeg.png",
    ):
        image = QImage(str(path))
        assert (image.width(), image.height()) == (128, 128), path
