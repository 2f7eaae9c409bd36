"""Which of the backend's Python packages are missing, and how to install them safely.

The check runs a small probe in the Python that will run the backend (Slicer's own
``PythonSlicer`` or an external environment), as a child process, so torch is never imported
into Slicer by this module and the GUI does not wait for it. The probe also reports the GPU.

Installing happens only after the user agreed, on the main thread (``installInSlicer``), with
pip and never importing torch into Slicer: torch and torchvision in the build the PyTorch
extension (``PyTorchUtils``) picks for the GPU driver when it is there, the rest after them,
always with a constraints file that pins the numpy and SimpleITK Slicer already has (and the
torch and torchvision just installed), so Slicer's own packages are never replaced. VTK is
Slicer's own build and is never installed from pip. For an external Python nothing is installed: the user gets the
command to run in that environment.
"""

import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

PROBE_MARKER = "SEMISUPSEG-PROBE "
# Never installed or upgraded by this module: Slicer builds and ships them.
SLICER_OWNED = ("numpy", "SimpleITK", "vtk")
# Pinned in every pip call once installed: Slicer's own, and the torch build that was chosen.
PINNED = SLICER_OWNED + ("torch", "torchvision")
PROBED_PACKAGES = ("torch", "monai", "timm", "einops", "numpy", "SimpleITK", "scipy")
# What an external environment needs on top: Slicer ships these, another Python may not.
EXTERNAL_EXTRA_REQUIREMENTS = ("numpy>=1.24", "SimpleITK>=2.2", "scipy>=1.10")
DEFAULT_REQUIREMENTS = ("torch>=2.1", "monai>=1.4", "timm>=1.0", "einops>=0.6")
# PyTorch's own package index, one per build ('cu121', 'cpu'...).
PYTORCH_INDEX_URL = "https://download.pytorch.org/whl/{backend}"

PROBE_CODE = r"""
import json, sys
out = {"python": sys.executable, "version": sys.version.split()[0], "packages": {}}
try:
    from importlib import metadata
except ImportError:
    metadata = None
import importlib.util
for name in sys.argv[1:] or __PACKAGES__:
    version = None
    if metadata is not None:
        try:
            version = metadata.version(name)
        except Exception:
            version = None
    if version is None:
        try:
            if importlib.util.find_spec(name) is not None:
                version = "present"
        except Exception:
            pass
    out["packages"][name] = version
try:
    torch = importlib.import_module("torch")  # in the probe's child process, never in Slicer
    info = {"installed": True, "version": torch.__version__, "cuda": torch.version.cuda,
            "cuda_devices": [], "mps": False}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["cuda_devices"].append({"name": p.name,
                                         "memory_gb": round(p.total_memory / 2**30, 1)})
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = bool(mps is not None and mps.is_available())
except Exception as err:
    info = {"installed": False, "error": "{}: {}".format(type(err).__name__, err)}
out["torch"] = info
print(__MARKER__ + json.dumps(out), flush=True)
""".replace("__PACKAGES__", repr(PROBED_PACKAGES)).replace("__MARKER__", repr(PROBE_MARKER))


def readRequirements(path=None) -> List[str]:
    """Requirement lines of ``requirements.txt`` (comments and blanks dropped)."""
    if path is None or not Path(path).exists():
        return list(DEFAULT_REQUIREMENTS)
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")


def requirementName(requirement: str) -> str:
    match = _REQUIREMENT.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


def _versionTuple(text: str) -> Tuple[int, ...]:
    numbers = []
    for part in re.split(r"[.+-]", text):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def satisfies(installed: Optional[str], requirement: str) -> bool:
    """Whether an installed version meets ``requirement`` (>=, >, ==, <, <=; commas = and)."""
    if installed is None:
        return False
    if installed == "present":
        return True
    match = _REQUIREMENT.match(requirement)
    spec = match.group(2) if match else ""
    have = _versionTuple(installed)
    for clause in [c.strip() for c in spec.split(",") if c.strip()]:
        op = re.match(r"(>=|<=|==|!=|~=|>|<)\s*(.+)", clause)
        if not op:
            continue
        want = _versionTuple(op.group(2))
        width = max(len(have), len(want))
        a = have + (0,) * (width - len(have))
        b = want + (0,) * (width - len(want))
        ok = {
            ">=": a >= b,
            "~=": a >= b,
            ">": a > b,
            "<=": a <= b,
            "<": a < b,
            "==": a == b,
            "!=": a != b,
        }[op.group(1)]
        if not ok:
            return False
    return True


@dataclass
class ProbeResult:
    """What the probe found in one Python."""

    python: str = ""
    version: str = ""
    packages: Dict[str, Optional[str]] = field(default_factory=dict)
    torch: Dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def missing(self, requirements: Sequence[str]) -> List[str]:
        """Requirements not met (absent, or too old)."""
        return [r for r in requirements if not satisfies(self.installed(r), r)]

    def installed(self, requirement: str) -> Optional[str]:
        name = requirementName(requirement)
        for key, value in self.packages.items():
            if key.lower() == name.lower():
                return value
        return None

    def asDict(self) -> Dict[str, Any]:
        return {
            "python": self.python,
            "version": self.version,
            "packages": self.packages,
            "torch": self.torch,
            "error": self.error,
        }


def probeCommand(python: str, requirements: Sequence[str] = ()) -> List[str]:
    """``python -c PROBE_CODE <package names>``: the probed packages plus the requirements'."""
    names = list(PROBED_PACKAGES)
    for requirement in requirements:
        name = requirementName(requirement)
        if name not in names:
            names.append(name)
    return [str(python), "-c", PROBE_CODE] + names


def parseProbeOutput(lines: Sequence[str], stderr: str = "", returncode: int = 0) -> ProbeResult:
    """The probe's report from its stdout lines; ``error`` says why when there is none."""
    for line in lines:
        if line.startswith(PROBE_MARKER):
            try:
                data = json.loads(line[len(PROBE_MARKER) :])
            except json.JSONDecodeError:
                break
            return ProbeResult(
                python=data.get("python", ""),
                version=data.get("version", ""),
                packages=dict(data.get("packages") or {}),
                torch=dict(data.get("torch") or {}),
            )
    tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return ProbeResult(
        error=f"the Python could not be run or did not answer (exit code {returncode})"
        + (f": {tail}" if tail else "")
    )


def summary(result: ProbeResult, requirements: Sequence[str]) -> str:
    """One line for the panel: what is missing, or that everything is there."""
    if result.error:
        return f"Check failed: {result.error}"
    missing = result.missing(requirements)
    where = f"Python {result.version}"
    if not missing:
        versions = ", ".join(f"{requirementName(r)} {result.installed(r)}" for r in requirements)
        return f"{where}: all set ({versions})"
    return f"{where}: missing {', '.join(missing)}"


@dataclass
class InstallPlan:
    """What will be installed, and how, in Slicer's own Python."""

    torchRequirement: Optional[str] = None
    torchViaPyTorchUtils: bool = False
    pipRequirements: List[str] = field(default_factory=list)
    constraints: List[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.torchRequirement and not self.pipRequirements

    def description(self) -> str:
        parts = []
        if self.torchRequirement:
            how = (
                "the build the PyTorch extension picks for this computer's GPU"
                if self.torchViaPyTorchUtils
                else "from PyPI"
            )
            parts.append(f"{self.torchRequirement} with torchvision ({how})")
        parts.extend(self.pipRequirements)
        owned = [s.lower() for s in SLICER_OWNED]
        kept = ", ".join(
            c.split("==")[0] for c in self.constraints if c.split("==")[0].lower() in owned
        )
        text = "SemiSupSeg will install into Slicer's Python: " + ", ".join(parts) + "."
        if kept:
            text += f" Slicer's own {kept} stay as they are."
        return text + " This can take several minutes and needs internet access."


def planInstall(
    missing: Sequence[str], packages: Dict[str, Optional[str]], pyTorchUtilsAvailable: bool
) -> InstallPlan:
    """Split the missing requirements into torch (extension or pip) and the rest (pip)."""
    plan = InstallPlan()
    for requirement in missing:
        name = requirementName(requirement)
        if name.lower() in (s.lower() for s in SLICER_OWNED):
            continue  # never replace Slicer's own packages
        if name.lower() == "torch":
            plan.torchRequirement = requirement
            plan.torchViaPyTorchUtils = pyTorchUtilsAvailable
        else:
            plan.pipRequirements.append(requirement)
    plan.constraints = constraintsFor(packages)
    return plan


def constraintsFor(packages: Dict[str, Optional[str]]) -> List[str]:
    """Pins for Slicer's own packages (and torch, torchvision once installed) so pip cannot
    replace them."""
    pins = []
    for name in PINNED:
        version = next((v for k, v in packages.items() if k.lower() == name.lower()), None)
        if version and version != "present":
            pins.append(f"{name}=={version}")
    return pins


def writeConstraints(pins: Sequence[str], folder=None) -> Path:
    folder = Path(folder or tempfile.mkdtemp(prefix="SemiSupSeg-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "constraints.txt"
    path.write_text("\n".join(pins) + "\n", encoding="utf-8")
    return path


def externalInstallCommand(python: str, missing: Sequence[str]) -> str:
    """The command a user runs to complete an external environment."""
    quoted = " ".join(f'"{r}"' for r in missing)
    return f'"{python}" -m pip install {quoted}'


def installedVersions(
    names: Sequence[str] = PROBED_PACKAGES, path: Optional[Sequence[str]] = None
) -> Dict[str, Optional[str]]:
    """Versions in *this* Python (or in the folders ``path``) from package metadata; nothing
    is imported."""
    from importlib import metadata

    folders = list(sys.path if path is None else path)
    versions = {}
    for name in names:
        found = next(iter(metadata.distributions(name=name, path=folders)), None)
        versions[name] = found.version if found is not None else None
    return versions


def missingHere(requirements: Sequence[str], path: Optional[Sequence[str]] = None) -> List[str]:
    """The requirements this Python (or the folders ``path``) does not meet, from package
    metadata, without importing anything (the in-Slicer tests skip on them)."""
    names = [requirementName(r) for r in requirements]
    return ProbeResult(packages=installedVersions(names, path)).missing(requirements)


def bestComputationBackend(backends: Sequence[str]) -> str:
    """The newest CUDA build among light-the-torch's compatible backends ('cu121' over
    'cu118'), else ROCm, else 'cpu'."""

    def rank(name: str) -> Tuple[int, Tuple[int, ...]]:
        if name.startswith("cu"):
            return 2, _versionTuple(name[2:])
        if name.startswith("rocm"):
            return 1, _versionTuple(name[4:])
        return 0, ()

    return max((str(b) for b in backends), key=rank, default="cpu")


def torchInstallArguments(torchRequirement: str, computationBackend: Optional[str]) -> List[str]:
    """pip arguments for torch with the torchvision of the same build (timm needs it), from
    PyTorch's index for ``computationBackend`` ('cu121', 'cpu'...), or from PyPI if None."""
    arguments = [torchRequirement, "torchvision"]
    if computationBackend:
        arguments += ["--index-url", PYTORCH_INDEX_URL.format(backend=computationBackend)]
    return arguments


def computationBackendFromPyTorchExtension(
    torchRequirement: str,
) -> Optional[str]:  # pragma: no cover
    """The torch build for this machine's GPU driver, as the PyTorch extension picks it
    (light-the-torch), without importing torch; None if the extension cannot tell."""
    import logging

    try:
        import PyTorchUtils

        version = torchRequirement[len(requirementName(torchRequirement)) :] or None
        backends = PyTorchUtils.PyTorchUtilsLogic.getCompatibleComputationBackends(
            torchVersionRequirement=version
        )
    except Exception as err:  # an older extension, or no answer: torch from PyPI
        logging.warning(f"SemiSupSeg: the PyTorch extension did not name a torch build ({err})")
        return None
    return bestComputationBackend([str(b) for b in backends])


def installInSlicer(
    plan: InstallPlan, requester: str = "SemiSupSeg", computationBackend: Optional[str] = None
) -> None:
    """Run the plan in Slicer's Python with pip. Main thread only, after the user agreed.

    torch is never imported here (Slicer's process must stay free of it): torch and its
    torchvision come from PyTorch's index for the build the PyTorch extension picks for the GPU
    driver (``computationBackend``, asked from the extension when there is one), or from PyPI.
    Every pip call has a constraints file, so numpy and SimpleITK stay Slicer's own, and the
    other packages cannot replace the torch and torchvision just installed.
    """
    if plan.torchRequirement:
        if computationBackend is None and plan.torchViaPyTorchUtils:
            computationBackend = computationBackendFromPyTorchExtension(plan.torchRequirement)
        arguments = torchInstallArguments(plan.torchRequirement, computationBackend)
        kept = [
            c for c in plan.constraints if not c.lower().startswith(("torch==", "torchvision=="))
        ]
        pipInstall(arguments, kept, requester)  # an older torch is replaced, not pinned
    if plan.pipRequirements:
        pins = {c.split("==")[0].lower(): c for c in plan.constraints}
        for pin in constraintsFor(installedVersions(PINNED)):
            pins[pin.split("==")[0].lower()] = pin  # what is installed now wins
        pipInstall(list(plan.pipRequirements), sorted(pins.values()), requester)


def pipInstall(arguments: Sequence[str], pins: Sequence[str], requester: str) -> None:
    """``slicer.util.pip_install`` with a constraints file: the ``constraints`` and
    ``requester`` keywords on Slicer 5.12 and later (``slicer.packaging``), ``-c`` before."""
    import slicer
    import slicer.util

    path = writeConstraints(pins)
    try:
        import slicer.packaging  # noqa: F401  (Slicer 5.12 and later)
    except ImportError:
        slicer.util.pip_install(list(arguments) + ["-c", str(path)])
        return
    slicer.util.pip_install(list(arguments), constraints=str(path), requester=requester)
