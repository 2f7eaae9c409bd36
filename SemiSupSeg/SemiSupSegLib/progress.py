"""What the user sees of a running job: the backend's events folded into a progress model.

Plain Python (no Slicer, no Qt): the widget reads ``percent``, ``statusText()``, the plan
(``planSummary``) and the new log lines after each poll; tests feed it event lines directly.
"""

import collections
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

from SemiSupSegLib.protocol import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    ProtocolError,
    effective_plan_values,
    parse_event,
)

MAX_LOG_LINES = 2000
MAX_LINE_LENGTH = 2000

STAGE_TITLES = {
    "validation": "Checking data",
    "training": "Training",
    "warmup": "Warm-up",
    "warm-up": "Warm-up",
    "co-training": "Co-training",
    "prediction": "Predicting",
    "job": "Finishing",
    "run": "Finished",
}

PLAN_PENDING = "Plan: made from your data and the device when training starts."

#: The parts of a job the log times, in order: the backend starting (Python, torch), its
#: checks of the data and its plan, training, and the prediction of the unlabeled cases.
STARTUP, CHECKS, TRAINING, PREDICTION = "start-up", "checks", "training", "prediction"
#: A round (``Workflow``) adds the export of its inputs before the job and the import of its
#: results (the review table) after it.
EXPORT, IMPORT = "export", "import"
ROUND_PARTS = (EXPORT, STARTUP, CHECKS, TRAINING, PREDICTION, IMPORT)


def formatSeconds(seconds: float) -> str:
    """A short duration: 45s, 3m05s, 1h02m."""
    seconds = int(max(0, round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def formatPartSeconds(seconds: float) -> str:
    """A part's duration: hundredths of a second below 1 s and tenths below 10 s (an export,
    an import), else as ``formatSeconds``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds:.2f}s"
    if seconds < 10:
        return f"{seconds:.1f}s"
    return formatSeconds(seconds)


def roundTimesText(number: Optional[int], times: Dict[str, float]) -> str:
    """The log line of a round's times, e.g. 'Round 2 took 6m20s: export 1.2s, start-up 4.1s,
    checks 3.0s, training 5m02s, prediction 1m10s, import 0.1s.'"""
    parts = [p for p in ROUND_PARTS if p in times] + sorted(set(times) - set(ROUND_PARTS))
    total = sum(times[p] for p in parts)
    name = f"Round {number}" if number is not None else "The job"
    listed = ", ".join(f"{p} {formatPartSeconds(times[p])}" for p in parts)
    return f"{name} took {formatPartSeconds(total)}: {listed}."


def jobPart(event: Dict[str, Any], current: Optional[str]) -> str:
    """The part of a job (``CHECKS``, ``TRAINING``, ``PREDICTION``) an event belongs to, given
    the part of the events before it. Training begins with its ``start`` event and ends when
    its model is written (its ``output`` event); the checks of the images to predict that
    follow belong to the prediction."""
    kind, stage = event.get("event"), event.get("stage", "")
    if kind == "start":
        return TRAINING
    if current == TRAINING:  # whatever stages the method names, until its model is written
        return PREDICTION if kind == "output" else TRAINING
    if stage == "prediction" or (stage == "validation" and current == PREDICTION):
        return PREDICTION
    return current or CHECKS


def stageTitle(stage: str) -> str:
    if not stage:
        return ""
    return STAGE_TITLES.get(stage, stage.replace("_", " ").capitalize())


def planSummary(plan: Optional[Dict[str, Any]]) -> str:
    """One line for the ``plan`` of a ``plan`` event, the values that train (yours where you
    set them), e.g. 'Plan (cpu): 1.25 mm, patch 56x40x24, batch 4, 1500 iterations; 1 setting
    of yours (batch_size)'; ``PLAN_PENDING`` before there is a plan."""
    if not plan:
        return PLAN_PENDING
    overrides = plan.get("overrides") or {}
    values = effective_plan_values(plan)
    parts = []
    if "target_spacing" in values:
        spacing = values["target_spacing"]
        parts.append(f"{_sizes(spacing, collapse=True)} mm" if spacing else "native spacing")
    if values.get("patch_size"):
        parts.append(f"patch {_sizes(values['patch_size'])}")
    if "batch_size" in values:
        parts.append(f"batch {values['batch_size']}")
    if "iterations" in values:
        parts.append(f"{values['iterations']} iterations")
    text = f"Plan ({plan.get('device', 'device unknown')}): " + ", ".join(parts)
    if overrides:
        count = "1 setting" if len(overrides) == 1 else f"{len(overrides)} settings"
        text += f"; {count} of yours ({', '.join(overrides)})"
    return text


def _sizes(value: Any, collapse: bool = False) -> str:
    """'56x40x24' for a list of numbers; '1.25' for an isotropic one when ``collapse``."""
    if not isinstance(value, (list, tuple)):
        return f"{value:g}" if isinstance(value, (int, float)) else str(value)
    if collapse and value and all(v == value[0] for v in value):
        return _sizes(value[0])
    return "x".join(_sizes(v) for v in value)


def describeEvent(event: Dict[str, Any]) -> Optional[str]:
    """One log line for an event, or None for events that only move the progress bar."""
    kind = event.get("event")
    message = event.get("message")
    stage = event.get("stage", "")
    if kind == "progress":
        return None
    if kind == "warning":
        return f"Warning: {message}"
    if kind == "error":
        return f"Error: {message}"
    if kind == "cancelled":
        return f"Cancelled: {message}" if message else "Cancelled"
    if kind == "done":
        return "Done."
    if kind == "output" and not message:
        outputs = event.get("outputs") or {}
        return "Wrote " + ", ".join(f"{k}: {v}" for k, v in outputs.items())
    if kind == "stage" and not message:
        total, iteration = event.get("total"), event.get("iteration", 0)
        suffix = f" at {iteration}/{total}" if total else ""
        return f"[{stageTitle(stage)}]{suffix}"
    if message:
        return f"[{stageTitle(stage)}] {message}" if stage else str(message)
    return None


class ProgressModel:
    """Progress of one backend job: stage, iteration of total, losses, time left, log, outcome."""

    def __init__(self, maxLogLines: int = MAX_LOG_LINES) -> None:
        self.stage = ""
        self.iteration = 0
        self.total = 0
        self.losses: Dict[str, float] = {}
        self.eta: Optional[float] = None
        self.message = ""
        self.log: Deque[str] = collections.deque(maxlen=maxLogLines)
        self._newLog: List[str] = []
        self._maxLogLines = maxLogLines
        self.warnings: List[str] = []
        self.errorText: Optional[str] = None
        self.errorDetails: List[str] = []
        self.outputs: Dict[str, str] = {}
        self.plan: Optional[Dict[str, Any]] = None
        self.planTable = ""
        self.events: int = 0
        self.returncode: Optional[int] = None
        self.finished = False
        self.succeeded = False
        self.cancelled = False
        self.startTime = time.time()
        self.endTime: Optional[float] = None
        # (part, the backend's time of its first event), in order; see ``partSeconds``
        self._parts: List[Tuple[str, float]] = []
        self._lastEventTime: Optional[float] = None

    # ------------------------------------------------------------------ input

    def feedLine(self, line: str) -> Optional[Dict[str, Any]]:
        """Take one line of the backend's stdout; a non-event line goes to the log as it is."""
        line = line.rstrip("\r\n")
        if not line.strip():
            return None
        try:
            event = parse_event(line)
        except ProtocolError:
            self.addLog(line)
            return None
        self.feedEvent(event)
        return event

    def feedEvent(self, event: Dict[str, Any]) -> None:
        self.events += 1
        self._timePart(event)
        kind = event.get("event")
        if event.get("stage") and kind in ("start", "stage", "progress"):
            if event["stage"] != self.stage:
                self.eta = None
            self.stage = event["stage"]
        if kind in ("start", "stage", "progress"):
            if "total" in event:
                self.total = int(event["total"])
            if "iteration" in event:
                self.iteration = int(event["iteration"])
        if kind == "progress":
            if isinstance(event.get("loss"), dict):
                self.losses = {
                    k: float(v) for k, v in event["loss"].items() if isinstance(v, (int, float))
                }
            self.eta = event.get("eta")
        if event.get("message") and kind in ("start", "stage", "progress", "log"):
            self.message = str(event["message"])
        if kind == "warning":
            self.warnings.append(str(event.get("message", "")))
        if kind == "error":
            self.errorText = str(event.get("message", "the backend reported an error"))
            self.errorDetails = [str(e) for e in event.get("errors") or []]
        if kind == "output" and isinstance(event.get("outputs"), dict):
            self.outputs.update({k: str(v) for k, v in event["outputs"].items()})
        if kind == "plan" and isinstance(event.get("plan"), dict):
            self.plan = event["plan"]
            self.planTable = str(event.get("message", ""))
        if kind == "cancelled":
            self.cancelled = True
        line = describeEvent(event)
        if line:
            self.addLog(line)

    def _timePart(self, event: Dict[str, Any]) -> None:
        stamp = event.get("time")
        if not isinstance(stamp, (int, float)):
            return
        current = self._parts[-1][0] if self._parts else None
        part = jobPart(event, current)
        if part != current:
            self._parts.append((part, float(stamp)))
        self._lastEventTime = float(stamp)

    def partSeconds(self) -> Dict[str, float]:
        """Seconds each part of the job took, in order (``STARTUP``: from the launch to the
        backend's first event; the others between the backend's own timestamps, the last part
        up to its last event)."""
        if not self._parts:
            return {}
        seconds = {STARTUP: max(0.0, self._parts[0][1] - self.startTime)}
        ends = [start for _, start in self._parts[1:]] + [self._lastEventTime]
        for (part, start), end in zip(self._parts, ends):
            seconds[part] = seconds.get(part, 0.0) + max(0.0, end - start)
        return seconds

    def addLog(self, text: str) -> None:
        """Add ``text`` to the log, a line per line of it (a plan's table is several)."""
        for line in text.splitlines() or [""]:
            if len(line) > MAX_LINE_LENGTH:
                line = line[:MAX_LINE_LENGTH] + " [...]"
            self.log.append(line)
            self._newLog.append(line)
        if len(self._newLog) > self._maxLogLines:
            del self._newLog[: len(self._newLog) - self._maxLogLines]

    def finish(self, returncode: int, stderrTail: str = "") -> None:
        """Record the process's exit; a failure without an error event shows stderr instead."""
        self.returncode = returncode
        self.finished = True
        self.endTime = time.time()
        if returncode == EXIT_OK:
            self.succeeded = True
            self.errorText = None
            self.addLog(f"Job finished in {formatSeconds(self.endTime - self.startTime)}.")
            return
        if returncode == EXIT_CANCELLED or self.cancelled:
            self.cancelled = True
            self.addLog("Job cancelled.")
            return
        if self.errorText is None:
            tail = stderrTail.strip()
            if returncode == EXIT_FAILED:
                what = "the backend failed"
            elif returncode < 0:
                what = f"the backend was stopped by signal {-returncode}"
            else:
                what = f"the backend exited with code {returncode}"
            self.errorText = f"{what}: {tail.splitlines()[-1]}" if tail else what
            if tail:
                self.errorDetails = [tail]
        self.addLog(f"Job failed: {self.errorText}")

    def markCancelled(self) -> None:
        self.cancelled = True

    # ----------------------------------------------------------------- output

    def takeNewLogLines(self) -> List[str]:
        """Log lines added since the last call (for appending to a log pane)."""
        lines, self._newLog = self._newLog, []
        return lines

    @property
    def failed(self) -> bool:
        return self.finished and not self.succeeded and not self.cancelled

    @property
    def percent(self) -> int:
        """Progress of the current stage, 0..100."""
        if self.succeeded:
            return 100
        if self.total <= 0:
            return 0
        return max(0, min(100, int(round(100.0 * self.iteration / self.total))))

    def lossText(self) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in self.losses.items())

    def etaText(self) -> str:
        if self.eta is None:
            return ""
        return f"{formatSeconds(self.eta)} left"

    def statusText(self) -> str:
        """One line: what is happening now, e.g. 'Training 120/1500 · loss 0.4321 · 2m10s left'."""
        if self.finished:
            if self.succeeded:
                return "Finished"
            if self.cancelled:
                return "Cancelled"
            return f"Failed: {self.errorText}"
        if not self.stage:
            return "Starting the backend..."
        parts = [stageTitle(self.stage)]
        if self.total:
            parts[0] += f" {self.iteration}/{self.total}"
        loss = self.lossText()
        if loss:
            parts.append(loss)
        eta = self.etaText()
        if eta:
            parts.append(eta)
        return " · ".join(parts)
