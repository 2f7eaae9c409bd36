"""Dependency check and install plan: what is missing in the Python that runs the backend,
found by a probe in a child process (never importing torch into Slicer), and an install plan
that never replaces Slicer's own numpy, SimpleITK or VTK."""

import sys
import types
from pathlib import Path

import pytest

from SemiSupSegLib import dependencies
from SemiSupSegLib.backend_process import BackendProcess
from SemiSupSegLib.dependencies import (
    ProbeResult,
    bestComputationBackend,
    constraintsFor,
    externalInstallCommand,
    parseProbeOutput,
    planInstall,
    probeCommand,
    readRequirements,
    requirementName,
    satisfies,
    summary,
)
from SemiSupSegLib.training_options import describeGpu
from slicer_side_helpers import MODULE_DIR

REQUIREMENTS = readRequirements(MODULE_DIR / "Resources" / "requirements.txt")


def test_requirement_parsing_and_versions():
    assert requirementName("torch>=2.1") == "torch"
    assert requirementName("SimpleITK[extra] >= 2") == "SimpleITK"
    assert satisfies("2.5.1+cu121", "torch>=2.1")
    assert not satisfies("2.0.1", "torch>=2.1")
    assert satisfies("1.4", "monai>=1.4,<2")
    assert not satisfies("2.0.0", "monai>=1.4,<2")
    assert not satisfies(None, "timm>=1.0")
    assert satisfies("present", "timm>=1.0")  # importable without metadata (Slicer's builds)
    assert satisfies("1.0.9", "timm")


def test_probe_runs_in_a_child_process_without_blocking():
    process = BackendProcess(probeCommand(sys.executable, REQUIREMENTS)).start()
    code = process.wait(timeout=120)
    result = parseProbeOutput(process.readLines(), process.stderrTail(), code)
    assert not result.error, result.error
    assert result.python and result.version.startswith("3.")
    assert result.missing(REQUIREMENTS) == []  # this venv has the backend's packages
    assert result.torch["installed"] is True
    assert summary(result, REQUIREMENTS).endswith(")") and "all set" in summary(
        result, REQUIREMENTS
    )
    text, has_gpu = describeGpu(result.asDict())
    assert text and isinstance(has_gpu, bool)


def test_a_broken_python_is_reported(tmp_path):
    result = parseProbeOutput([], "SyntaxError: boom", 1)
    assert result.error.startswith("the Python could not be run") and "boom" in result.error
    assert summary(result, REQUIREMENTS).startswith("Check failed")
    assert describeGpu(None) == ("not checked yet", False)


def test_missing_packages_and_the_install_plan():
    probe = ProbeResult(
        python="/slicer/bin/PythonSlicer",
        version="3.9.10",
        packages={
            "torch": None,
            "monai": "1.3.0",
            "timm": "1.0.3",
            "numpy": "1.26.4",
            "SimpleITK": "2.4.0",
            "einops": None,
        },
    )
    missing = probe.missing(REQUIREMENTS + ["numpy>=99"])
    assert missing == ["torch>=2.1", "monai>=1.4", "einops>=0.6", "numpy>=99"]
    plan = planInstall(missing, probe.packages, pyTorchUtilsAvailable=True)
    assert plan.torchRequirement == "torch>=2.1" and plan.torchViaPyTorchUtils
    assert plan.pipRequirements == ["monai>=1.4", "einops>=0.6"]  # numpy is Slicer's: never
    assert plan.constraints == ["numpy==1.26.4", "SimpleITK==2.4.0"]
    text = plan.description()
    assert "PyTorch extension picks" in text and "numpy, SimpleITK stay as they are" in text
    without = planInstall(missing, probe.packages, pyTorchUtilsAvailable=False)
    assert not without.torchViaPyTorchUtils and "from PyPI" in without.description()
    assert planInstall([], probe.packages, True).empty


def test_constraints_pin_what_is_installed(tmp_path):
    pins = constraintsFor({"numpy": "2.0.1", "SimpleITK": "present", "torch": "2.5.1+cu121"})
    assert pins == ["numpy==2.0.1", "torch==2.5.1+cu121"]
    path = dependencies.writeConstraints(pins, tmp_path)
    assert path.read_text() == "numpy==2.0.1\ntorch==2.5.1+cu121\n"


def test_external_environment_gets_a_command_not_an_install():
    command = externalInstallCommand("/opt/env/bin/python", ["torch>=2.1", "monai>=1.4"])
    assert command == '"/opt/env/bin/python" -m pip install "torch>=2.1" "monai>=1.4"'


class PipRecorder:
    """Stands in for slicer.util.pip_install (Slicer's pip and the network): records each call
    with the constraints file's content at that moment."""

    def __init__(self):
        self.calls = []

    def __call__(self, requirements, constraints=None, requester=None):
        assert isinstance(requirements, list)  # Slicer's pip_install wants a list or a string
        path = constraints or requirements[requirements.index("-c") + 1]
        pins = Path(path).read_text().split()
        self.calls.append((requirements, constraints is not None, requester, pins))


def without_constraints(arguments):
    """pip arguments without the ``-c FILE`` of Slicer 5.8 to 5.11."""
    if "-c" in arguments:
        index = arguments.index("-c")
        return arguments[:index] + arguments[index + 2 :]
    return arguments


@pytest.fixture
def slicer_pip(monkeypatch):
    util = pytest.importorskip("slicer.util")
    recorder = PipRecorder()
    monkeypatch.setattr(util, "pip_install", recorder)
    return recorder


class PyTorchExtension:
    """The PyTorch extension's logic as SlicerPyTorch defines it; installTorch imports torch
    into Slicer's process, so it must not be used."""

    @staticmethod
    def getCompatibleComputationBackends(
        forceComputationBackend=None, torchVersionRequirement=None
    ):
        assert torchVersionRequirement == ">=2.1"
        return ["cpu", "cu118", "cu121"]

    def installTorch(self, *args, **kwargs):
        raise AssertionError("installTorch imports torch inside Slicer")


@pytest.mark.parametrize("slicer_512", [True, False])
def test_install_in_slicer_uses_pip_with_constraints_and_never_imports_torch(
    slicer_pip, monkeypatch, slicer_512
):
    monkeypatch.setitem(
        sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchExtension)
    )
    if slicer_512:
        monkeypatch.setitem(sys.modules, "slicer.packaging", types.ModuleType("slicer.packaging"))
    else:
        monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
    packages = {"torch": "2.0.1", "numpy": "1.26.4", "SimpleITK": "2.4.0"}
    plan = planInstall(["torch>=2.1", "monai>=1.4"], packages, pyTorchUtilsAvailable=True)
    dependencies.installInSlicer(plan)

    (torch_step, torch_keywords, torch_requester, torch_pins), (rest, _, _, rest_pins) = (
        slicer_pip.calls
    )
    assert without_constraints(torch_step) == [
        "torch>=2.1",
        "torchvision",  # the same build as torch, and under the same constraints
        "--index-url",
        "https://download.pytorch.org/whl/cu121",  # the newest CUDA the driver supports
    ]
    assert torch_pins == ["numpy==1.26.4", "SimpleITK==2.4.0"]  # torch 2.0.1 is replaced
    assert torch_keywords == slicer_512 and torch_requester == (
        "SemiSupSeg" if slicer_512 else None
    )
    assert without_constraints(rest) == ["monai>=1.4"]
    installed = dependencies.installedVersions(("torch", "numpy"))
    assert f"torch=={installed['torch']}" in rest_pins  # what was just installed stays
    assert f"numpy=={installed['numpy']}" in rest_pins


def test_without_the_pytorch_extension_torch_comes_from_pypi(slicer_pip, monkeypatch):
    monkeypatch.delitem(sys.modules, "PyTorchUtils", raising=False)
    plan = planInstall(["torch>=2.1"], {"numpy": "1.26.4"}, pyTorchUtilsAvailable=False)
    dependencies.installInSlicer(plan)
    ((arguments, _keywords, _requester, pins),) = slicer_pip.calls
    assert arguments[:2] == ["torch>=2.1", "torchvision"] and "--index-url" not in arguments
    assert pins == ["numpy==1.26.4"]


def test_the_newest_cuda_build_is_chosen():
    assert bestComputationBackend(["cpu", "cu118", "cu121", "cu92"]) == "cu121"
    assert bestComputationBackend(["cpu", "rocm6.0"]) == "rocm6.0"
    assert bestComputationBackend(["cpu"]) == bestComputationBackend([]) == "cpu"
