"""Job protocol v1: the contract between the Slicer module and the training backend.

The Slicer side writes a job (``job.json``) into a job folder and starts the backend with
``semisupseg run job.json --events -``. The backend answers with one JSON object per line
(events). Both sides import only this module and ``method_catalogue`` (the methods a job may
name), which use the standard library alone, so that a remote runner can carry the same job
folder and event stream later. The names of the files the backend writes, and the columns of
its tables, are in ``output_layout`` beside it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from SemiSupSegLib.method_catalogue import (
    BASELINE_METHOD,
    DEFAULT_METHOD,
    method_info,
    method_names,
)

PROTOCOL_VERSION = 1

DEVICES = ("auto", "cuda", "mps", "cpu")
MODALITIES = ("MR", "CT", "other")
#: Training budgets in the user's terms, as iterations on a time-limited device (CPU, Apple
#: MPS) and on a memory-limited one (CUDA). A GPU's standard budget is the published
#: semi-supervised schedule (UA-MT: 6000 iterations).
TIME_BUDGETS = {
    "quick": {"time": 500, "memory": 2000},
    "standard": {"time": 1500, "memory": 6000},
    "thorough": {"time": 4000, "memory": 15000},
}
DEFAULT_BUDGET = "standard"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130
#: The environment variable that names the backend's stop file: once the file exists the
#: backend stops as on SIGTERM (checkpoint, exit 130). Windows has no SIGTERM for a windowless
#: child, so there it is the only gentle stop; elsewhere it backs up the signal.
STOP_FILE_VARIABLE = "SEMISUPSEG_STOP_FILE"

EVENT_KINDS = (
    "plan",
    "start",
    "stage",
    "progress",
    "log",
    "warning",
    "error",
    "output",
    "done",
    "cancelled",
)

JOB_FILE_NAME = "job.json"


class ProtocolError(ValueError):
    """A job or an event that does not follow the protocol; the message says which field."""


@dataclass
class LabeledCase:
    """One labeled volume: an image file (or DICOM folder) and its label map file."""

    name: str
    image: str
    label: str


@dataclass
class UnlabeledCase:
    """One image without a label; it gets a pseudo-mask and an uncertainty map."""

    name: str
    image: str


@dataclass
class JobSpec:
    """Everything the backend needs to train and predict, with paths relative to the job file.

    ``classes`` maps label values (as strings, JSON keys) to names; value 0 is background.
    ``settings`` holds training settings by name (see the backend's ``TrainConfig``);
    unknown names are rejected by the backend, not here, so this module stays small.
    ``init_from`` names a previous run's checkpoint to warm-start from (retraining rounds).
    ``plan`` (default true) plans the settings from the data and the device, ``settings``
    overriding planned values; ``budget`` is the training time in the user's terms
    (``TIME_BUDGETS``).
    """

    labeled: List[LabeledCase]
    unlabeled: List[UnlabeledCase] = field(default_factory=list)
    classes: Dict[str, str] = field(default_factory=lambda: {"0": "background", "1": "foreground"})
    method: str = DEFAULT_METHOD
    device: str = "auto"
    modality: str = "MR"
    output: str = "outputs"
    settings: Dict[str, Any] = field(default_factory=dict)
    predict_unlabeled: bool = True
    init_from: Optional[str] = None
    plan: bool = True
    budget: str = DEFAULT_BUDGET
    version: int = PROTOCOL_VERSION

    def to_dict(self) -> Dict[str, Any]:
        return {
            "version": self.version,
            "method": self.method,
            "device": self.device,
            "modality": self.modality,
            "classes": dict(self.classes),
            "labeled": [vars(c).copy() for c in self.labeled],
            "unlabeled": [vars(c).copy() for c in self.unlabeled],
            "output": self.output,
            "settings": dict(self.settings),
            "predict_unlabeled": self.predict_unlabeled,
            "init_from": self.init_from,
            "plan": self.plan,
            "budget": self.budget,
        }

    @classmethod
    def from_dict(cls, data: Any) -> JobSpec:
        """Build a job from parsed JSON; raise ProtocolError naming the first bad field."""
        if not isinstance(data, dict):
            raise ProtocolError("job: expected a JSON object at the top level")
        known = {
            "version",
            "method",
            "device",
            "modality",
            "classes",
            "labeled",
            "unlabeled",
            "output",
            "settings",
            "predict_unlabeled",
            "init_from",
            "plan",
            "budget",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProtocolError(
                f"job: unknown field(s) {shorten(str(unknown))}; known fields: {sorted(known)}"
            )
        version = data.get("version")
        if type(version) is not int or version != PROTOCOL_VERSION:  # true == 1 in Python
            raise ProtocolError(
                f"job.version: this backend speaks protocol {PROTOCOL_VERSION}, the job says {shorten(repr(version))}"
            )
        method = _choice(data, "method", method_names(), DEFAULT_METHOD)
        device = _choice(data, "device", DEVICES, "auto")
        modality = _choice(data, "modality", MODALITIES, "MR")
        classes = _classes(data.get("classes", {"0": "background", "1": "foreground"}))
        labeled = [
            _labeled_case(item, i) for i, item in enumerate(_list(data, "labeled", required=True))
        ]
        if not labeled:
            raise ProtocolError("job.labeled: at least one labeled case is needed")
        unlabeled = [_unlabeled_case(item, i) for i, item in enumerate(_list(data, "unlabeled"))]
        names = [c.name for c in labeled] + [c.name for c in unlabeled]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ProtocolError(f"job: duplicate case names {duplicates}")
        if method_info(method).uses_unlabeled and not unlabeled:
            raise ProtocolError(
                f"job.unlabeled: method {method!r} learns from unlabeled images and the job has "
                f"none; add unlabeled volumes, or choose {BASELINE_METHOD!r}"
            )
        output = data.get("output", "outputs")
        if not isinstance(output, str) or not output:
            raise ProtocolError("job.output: expected a non-empty folder path")
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise ProtocolError("job.settings: expected an object of name -> value")
        predict_unlabeled = data.get("predict_unlabeled", True)
        if not isinstance(predict_unlabeled, bool):
            raise ProtocolError("job.predict_unlabeled: expected true or false")
        init_from = data.get("init_from")
        if init_from is not None and (not isinstance(init_from, str) or not init_from):
            raise ProtocolError("job.init_from: expected a checkpoint path or null")
        plan = data.get("plan", True)
        if not isinstance(plan, bool):
            raise ProtocolError("job.plan: expected true or false")
        budget = _choice(data, "budget", tuple(TIME_BUDGETS), DEFAULT_BUDGET)
        return cls(
            labeled=labeled,
            unlabeled=unlabeled,
            classes=classes,
            method=method,
            device=device,
            modality=modality,
            output=output,
            settings=settings,
            predict_unlabeled=predict_unlabeled,
            init_from=init_from,
            plan=plan,
            budget=budget,
            version=version,
        )

    def save(self, path: str | Path) -> None:
        """Write the job as JSON, atomically (temporary file, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ProtocolError(f"{path}: cannot read the job file ({err.strerror})") from err
        except UnicodeDecodeError as err:
            raise ProtocolError(
                f"{path}: not a UTF-8 text file (byte {err.start}); a job file is UTF-8 JSON"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ProtocolError(
                f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            ) from err
        except RecursionError:
            raise ProtocolError(f"{path}: JSON nested too deeply to be a job file") from None
        try:
            return cls.from_dict(data)
        except ProtocolError as err:
            raise ProtocolError(f"{path}: {err}") from err

    def resolve(self, base: str | Path) -> JobSpec:
        """Return a copy whose relative paths are made absolute against ``base``."""

        def absolute(p: Optional[str]) -> Optional[str]:
            if p is None:
                return None
            q = Path(p)
            return str(q if q.is_absolute() else (Path(base) / q).resolve())

        data = self.to_dict()
        for case in data["labeled"]:
            case["image"], case["label"] = absolute(case["image"]), absolute(case["label"])
        for case in data["unlabeled"]:
            case["image"] = absolute(case["image"])
        data["output"] = absolute(data["output"])
        data["init_from"] = absolute(data["init_from"])
        return JobSpec.from_dict(data)


def _choice(data: Dict[str, Any], key: str, allowed: tuple, default: str) -> str:
    value = data.get(key, default)
    if value not in allowed:
        raise ProtocolError(f"job.{key}: {shorten(repr(value))} is not one of {list(allowed)}")
    return value


def _list(data: Dict[str, Any], key: str, required: bool = False) -> list:
    if key not in data:
        if required:
            raise ProtocolError(f"job.{key}: missing (a list of cases)")
        return []
    value = data[key]
    if not isinstance(value, list):
        raise ProtocolError(f"job.{key}: expected a list, got {type(value).__name__}")
    return value


def _text(item: Dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{where}.{key}: expected a non-empty string")
    return value


def _case_name(item: Dict[str, Any], where: str) -> str:
    name = item.get("name")
    if name is None:
        name = case_name_from_path(_text(item, "image", where))
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{where}.name: expected a non-empty string")
    problem = case_name_problem(name)
    if problem:
        raise ProtocolError(f"{where}.name: {shorten(repr(name))} {problem}")
    return name


def case_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be a case name, or None when it can.

    A case name becomes a file name inside an output folder (``<out>/<case>.nii.gz``), so it
    must stay a plain file name there: no path separator, no drive, no ``..``, not hidden.
    """
    if not name:
        return "is empty"
    if "/" in name or "\\" in name:
        return "contains a path separator; a case name must be a plain file name"
    if name.startswith("."):
        return "starts with a dot ('..' or a hidden file); a case name must be a plain file name"
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        return "starts with a drive letter; a case name must be a plain file name"
    if any(ord(character) < 32 for character in name):
        return "contains a control character"
    return None


def shorten(text: str, limit: int = 200) -> str:
    """``text``, cut to ``limit`` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _labeled_case(item: Any, index: int) -> LabeledCase:
    where = f"job.labeled[{index}]"
    if not isinstance(item, dict):
        raise ProtocolError(f"{where}: expected an object with image and label")
    return LabeledCase(
        name=_case_name(item, where),
        image=_text(item, "image", where),
        label=_text(item, "label", where),
    )


def _unlabeled_case(item: Any, index: int) -> UnlabeledCase:
    where = f"job.unlabeled[{index}]"
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict):
        raise ProtocolError(f"{where}: expected an object with image (or a path string)")
    return UnlabeledCase(name=_case_name(item, where), image=_text(item, "image", where))


def _classes(value: Any) -> Dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise ProtocolError("job.classes: expected an object of label value -> name")
    classes = {}
    for key, name in value.items():
        try:
            number = int(key)
        except (TypeError, ValueError):
            raise ProtocolError(
                f"job.classes: key {shorten(repr(key))} is not an integer label value"
            ) from None
        if number < 0 or number > 255:
            raise ProtocolError(f"job.classes: label value {number} is outside 0..255")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"job.classes[{key}]: expected a non-empty name")
        classes[str(number)] = name
    values = sorted(int(k) for k in classes)
    if values != list(range(len(values))):
        raise ProtocolError(
            f"job.classes: label values must be 0..N without gaps (0 = background), got {values}"
        )
    return classes


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: nnU-Net's suffix for the first (only supported) channel of an image file: ``case_0000.nii.gz``.
CHANNEL_SUFFIX = "_0000"


def case_name_from_path(path: str) -> str:
    """A case's name: the file name without its image extension and without nnU-Net's
    ``_0000`` channel suffix (a DICOM folder: its name). Train, predict, evaluate and jobs all
    name cases by this rule, so an image ``case_0000.nii.gz`` and a label ``case.nii.gz`` are
    one case everywhere."""
    name = Path(path.rstrip("/\\")).name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[: -len(CHANNEL_SUFFIX)] if name.endswith(CHANNEL_SUFFIX) else name


# ---------------------------------------------------------------- events


def effective_plan_values(plan: Dict[str, Any]) -> Dict[str, Any]:
    """The settings a planned run trains with, from the ``plan`` of a ``plan`` event.

    ``plan["values"]`` holds what the backend planned from the data and the device;
    ``plan["overrides"]`` what the user set (job settings, ``--set``), which win.
    """
    return {**(plan.get("values") or {}), **(plan.get("overrides") or {})}


def make_event(kind: str, **fields: Any) -> Dict[str, Any]:
    """Build an event dict; ``validate_event`` accepts what this returns."""
    event = {"v": PROTOCOL_VERSION, "event": kind, "time": round(time.time(), 3)}
    event.update({k: v for k, v in fields.items() if v is not None})
    validate_event(event)
    return event


def encode_event(event: Dict[str, Any]) -> str:
    """One line of JSON, no newline inside; NaN and infinity become null."""
    return json.dumps(_finite(event), separators=(",", ":"))


def parse_event(line: str) -> Dict[str, Any]:
    """Parse and validate one line of the backend's event stream."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"event: not JSON ({err.msg}): {line[:200]!r}") from err
    validate_event(event)
    return event


_EVENT_TYPES = {
    "v": int,
    "event": str,
    "time": (int, float),
    "stage": str,
    "message": str,
    "iteration": int,
    "total": int,
    "eta": (int, float),
    "loss": dict,
    "metrics": dict,
    "outputs": dict,
    "plan": dict,
    "warnings": list,
    "errors": list,
}


def validate_event(event: Any) -> None:
    """Raise ProtocolError unless ``event`` is a well-formed v1 event."""
    if not isinstance(event, dict):
        raise ProtocolError("event: expected a JSON object")
    if event.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"event.v: expected {PROTOCOL_VERSION}, got {event.get('v')!r}")
    if event.get("event") not in EVENT_KINDS:
        raise ProtocolError(
            f"event.event: {event.get('event')!r} is not one of {list(EVENT_KINDS)}"
        )
    for key, expected in _EVENT_TYPES.items():
        value = event.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ProtocolError(f"event.{key}: unexpected type {type(value).__name__}")
    if event["event"] in ("error", "warning", "log") and "message" not in event:
        raise ProtocolError(f"event: a {event['event']} event needs a message")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
