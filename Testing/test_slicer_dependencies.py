"""Dependency check and install plan: what is missing in the Python that runs the backend,
found by a probe in a child process (never importing torch into Slicer), and an install plan
that never replaces Slicer's own numpy, SimpleITK or VTK."""

import sys

from SemiSupSegLib import dependencies
from SemiSupSegLib.backend_process import BackendProcess
from SemiSupSegLib.dependencies import (
    ProbeResult,
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
    assert "PyTorch extension" in text and "numpy, SimpleITK stay as they are" in text
    without = planInstall(missing, probe.packages, pyTorchUtilsAvailable=False)
    assert not without.torchViaPyTorchUtils and "through pip" in without.description()
    assert planInstall([], probe.packages, True).empty


def test_constraints_pin_what_is_installed(tmp_path):
    pins = constraintsFor({"numpy": "2.0.1", "SimpleITK": "present", "torch": "2.5.1+cu121"})
    assert pins == ["numpy==2.0.1", "torch==2.5.1+cu121"]
    path = dependencies.writeConstraints(pins, tmp_path)
    assert path.read_text() == "numpy==2.0.1\ntorch==2.5.1+cu121\n"


def test_external_environment_gets_a_command_not_an_install():
    command = externalInstallCommand("/opt/env/bin/python", ["torch>=2.1", "monai>=1.4"])
    assert command == '"/opt/env/bin/python" -m pip install "torch>=2.1" "monai>=1.4"'
