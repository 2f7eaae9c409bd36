"""Extension packaging: every Python file and resource listed in CMake, the extension metadata,
the in-Slicer tests registered, requirements that never touch Slicer's own packages, Slicer-side
code that runs on Python 3.9 and never imports torch."""

import ast
import re
import subprocess
import sys

from slicer_side_helpers import LIB_DIR, MODULE_DIR, REPO

MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
EXTENSION_CMAKE = REPO / "CMakeLists.txt"
SLICER_SIDE = (
    [MODULE_DIR / "SemiSupSeg.py"]
    + sorted(p for p in LIB_DIR.glob("*.py"))
    + sorted((MODULE_DIR / "Testing").rglob("*.py"))
)
HEAVY = {"torch", "monai", "timm"}


def cmake_list(text, variable):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"no set({variable} ...)"
    items = []
    for line in match.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            items.extend(line.split())
    return [i.replace("${MODULE_NAME}", "SemiSupSeg") for i in items]


def test_every_python_file_is_listed_in_cmake():
    text = MODULE_CMAKE.read_text()
    listed = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    on_disk = sorted(
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*.py")
        if "Testing" not in p.relative_to(MODULE_DIR).parts and "__pycache__" not in p.parts
    )
    assert on_disk, "no Python files found"
    missing = [f for f in on_disk if f not in listed]
    stale = [f for f in listed if f not in on_disk]
    assert not missing, f"add to MODULE_PYTHON_SCRIPTS in {MODULE_CMAKE}: {missing}"
    assert not stale, f"listed in {MODULE_CMAKE} but not on disk: {stale}"
    assert any(f.startswith("SemiSupSegLib/backend/") for f in listed)


def test_resources_and_build_macro():
    text = MODULE_CMAKE.read_text()
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert sorted(resources) == [
        "Resources/Icons/SemiSupSeg.png",
        "Resources/UI/SemiSupSeg.ui",
        "Resources/requirements.txt",
    ]
    for resource in resources:
        assert (MODULE_DIR / resource).is_file(), resource
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS", text, re.S)
    testing = text[text.index("if(BUILD_TESTING)") :]
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in testing
    assert "add_subdirectory(Testing)" in testing
    assert "add_subdirectory(Python)" in (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text()
    registered = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text()
    for test in (MODULE_DIR / "Testing" / "Python").glob("*.py"):
        assert test.name.replace("SemiSupSeg", "${MODULE_NAME}") in registered, test.name


def test_extension_metadata():
    text = EXTENSION_CMAKE.read_text()
    assert "project(SemiSupSeg)" in text
    values = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text))
    assert values["EXTENSION_CATEGORY"] == "Segmentation"
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    homepage = values["EXTENSION_HOMEPAGE"]
    assert homepage == "https://github.com/semisupseg/SemiSupSeg"
    raw = "https://raw.githubusercontent.com/semisupseg/SemiSupSeg/main/"
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in values[key].split():
            assert url.startswith(raw), url
            assert (REPO / url[len(raw) :]).is_file(), f"{key}: {url} is not in the repository"
    for key in ("EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert values[key]
    for line in (
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(SemiSupSeg)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert line in text


def test_requirements_leave_slicers_packages_alone():
    from SemiSupSegLib.dependencies import readRequirements, requirementName

    requirements = readRequirements(MODULE_DIR / "Resources" / "requirements.txt")
    names = {requirementName(r).lower() for r in requirements}
    assert HEAVY <= names
    assert all(">=" in r for r in requirements)
    assert not names & {"numpy", "simpleitk", "vtk"}


def test_slicer_side_is_python39_and_never_imports_torch():
    backend = LIB_DIR / "backend"
    assert SLICER_SIDE
    for path in SLICER_SIDE:
        assert backend not in path.parents
        source = path.read_text()
        tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
        deferred = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
                if node.module == "__future__":
                    # the shared protocol module may defer annotations; module code does not
                    assert path.name == "protocol.py", f"{path}: no __future__ imports"
                    deferred = True
                module = node.module or ""
                if module == "SemiSupSegLib.backend" or module.startswith("SemiSupSegLib.backend."):
                    raise AssertionError(f"{path}: the Slicer side must not import the backend")
            else:
                continue
            assert not roots & HEAVY, f"{path}: imports {roots & HEAVY}"
        # PEP 604 unions (X | None) in annotations need Python 3.10 at runtime
        for node in ast.walk(tree):
            annotations = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                annotations = [a.annotation for a in node.args.args + node.args.kwonlyargs]
                annotations.append(node.returns)
            elif isinstance(node, ast.AnnAssign):
                annotations = [node.annotation]
            for annotation in annotations:
                if (
                    not deferred
                    and annotation is not None
                    and any(
                        isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                        for n in ast.walk(annotation)
                    )
                ):
                    raise AssertionError(f"{path}:{node.lineno}: X | Y annotation needs 3.10")


def test_importing_the_slicer_side_loads_no_torch():
    modules = sorted(p.stem for p in LIB_DIR.glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        + "".join(f"import SemiSupSegLib.{m}\n" for m in modules)
        + "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai', 'timm'))\n"
        + "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
