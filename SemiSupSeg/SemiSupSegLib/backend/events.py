"""Progress reporting: JSON lines for the Slicer module (``--events``), a bar for a terminal."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO, Any, Dict, List, Optional

from SemiSupSegLib.protocol import encode_event, make_event


class EventSink:
    """Emits protocol events to an optional JSON-lines stream and a human view on stderr.

    ``events`` is a path, ``-`` for stdout, or None. The human view is a tqdm bar when stderr is
    a terminal, and a line every tenth of the run otherwise (logs stay short).
    """

    def __init__(self, events: Optional[str] = None, quiet: bool = False) -> None:
        self._stream: Optional[IO[str]] = None
        self._owns_stream = False
        if events == "-":
            self._stream = sys.stdout
        elif events:
            Path(events).parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(events, "a", encoding="utf-8")  # noqa: SIM115
            self._owns_stream = True
        self.quiet = quiet
        self._human = sys.stderr
        self._bar = None
        self._bar_stage: Optional[str] = None
        self._last_decile: Dict[str, int] = {}
        self.warnings: List[str] = []
        self.history: List[Dict[str, Any]] = []

    def emit(self, kind: str, **fields: Any) -> Dict[str, Any]:
        event = make_event(kind, **fields)
        if self._stream is not None:
            self._stream.write(encode_event(event) + "\n")
            self._stream.flush()
        if kind == "warning":
            self.warnings.append(fields.get("message", ""))
        if kind != "progress":
            self.history.append(event)
        if not self.quiet:
            self._show(event)
        return event

    # convenience wrappers
    def log(self, message: str, **fields: Any) -> None:
        self.emit("log", message=message, **fields)

    def warn(self, message: str, **fields: Any) -> None:
        self.emit("warning", message=message, **fields)

    def progress(self, stage: str, iteration: int, total: int, **fields: Any) -> None:
        self.emit("progress", stage=stage, iteration=iteration, total=total, **fields)

    def close(self) -> None:
        self._close_bar()
        if self._owns_stream and self._stream is not None:
            self._stream.close()
        self._stream = None

    def _show(self, event: Dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "progress":
            self._show_progress(event)
            return
        self._close_bar()
        text = event.get("message")
        if kind in ("warning", "error"):
            text = f"{kind}: {text}"
        elif kind == "output" and not text:
            text = "wrote " + ", ".join(f"{k}: {v}" for k, v in event.get("outputs", {}).items())
        elif kind in ("stage", "start", "cancelled") and not text:
            text = f"[{event.get('stage', kind)}]"
        if text:
            print(text, file=self._human, flush=True)

    def _show_progress(self, event: Dict[str, Any]) -> None:
        stage, iteration, total = (
            event.get("stage", ""),
            event.get("iteration", 0),
            event.get("total", 0),
        )
        losses = ", ".join(
            f"{k} {v:.4f}" for k, v in (event.get("loss") or {}).items() if v is not None
        )
        if self._human.isatty():
            from tqdm import tqdm

            if self._bar is None or self._bar_stage != stage:
                self._close_bar()
                self._bar = tqdm(total=total, desc=stage, file=self._human, dynamic_ncols=True)
                self._bar_stage = stage
            self._bar.update(iteration - self._bar.n)
            if losses:
                self._bar.set_postfix_str(losses, refresh=False)
            return
        decile = int(10 * iteration / max(total, 1))
        if decile > self._last_decile.get(stage, -1) or iteration == total:
            self._last_decile[stage] = decile
            eta = event.get("eta")
            eta_text = f", {format_seconds(eta)} left" if eta is not None else ""
            print(f"{stage}: {iteration}/{total}{eta_text}  {losses}", file=self._human, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_stage = None


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class RateEstimator:
    """Remaining-time estimate from an exponential moving average of seconds per step."""

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self._last: Optional[float] = None
        self.seconds_per_step: Optional[float] = None

    def step(self, steps: int = 1) -> None:
        now = time.perf_counter()
        if self._last is not None and steps > 0:
            rate = (now - self._last) / steps
            if self.seconds_per_step is None:
                self.seconds_per_step = rate
            else:
                self.seconds_per_step += self.smoothing * (rate - self.seconds_per_step)
        self._last = now

    def eta(self, remaining: int) -> Optional[float]:
        if self.seconds_per_step is None:
            return None
        return round(self.seconds_per_step * remaining, 1)
