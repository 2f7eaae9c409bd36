"""One backend job from start to outcome: launch, non-blocking polls, cancel, result.

The process class is injected (``processFactory``), so the Logic can be driven by a fake
process in tests and by ``BackendProcess`` in Slicer. Plain Python: no Slicer, no Qt.
"""

import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from SemiSupSegLib.backend_process import BackendProcess
from SemiSupSegLib.progress import ProgressModel

ProcessFactory = Callable[..., Any]


class JobRunner:
    """Runs one command whose stdout is the backend's event stream.

    ``poll()`` returns at once with the events that arrived since the last call and, when the
    process has ended, records its outcome in ``progress`` (succeeded, cancelled or failed with
    the backend's error text). ``onFinished`` callbacks run once, from ``poll``.
    """

    def __init__(self, processFactory: ProcessFactory = BackendProcess) -> None:
        self.processFactory = processFactory
        self.process: Any = None
        self.progress = ProgressModel()
        self.onFinished: List[Callable[[JobRunner], None]] = []
        self._finishedReported = False

    def start(
        self,
        command: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> "JobRunner":
        if self.process is not None:
            raise RuntimeError("this runner already ran a job; create a new one")
        self.progress = ProgressModel()
        self.process = self.processFactory(list(command), env=env, cwd=cwd)
        try:
            self.process.start()
        except OSError as err:
            self.progress.addLog(f"Could not start {command[0]}: {err}")
            self.progress.errorText = f"could not start the backend ({command[0]}): {err}"
            self.progress.finish(-1)
            self._reportFinished()
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and not self.progress.finished

    @property
    def finished(self) -> bool:
        return self.progress.finished

    @property
    def succeeded(self) -> bool:
        return self.progress.succeeded

    @property
    def cancelled(self) -> bool:
        return self.progress.cancelled

    @property
    def failed(self) -> bool:
        return self.progress.failed

    def poll(self) -> List[Dict[str, Any]]:
        """Events received since the last call; never waits."""
        if self.process is None or self.progress.finished:
            return []
        events = self._drain()
        code = self.process.poll()
        if code is not None:
            events += self._drain()  # the reader finished: everything is in the queue now
            if getattr(self.process, "cancelRequested", False):
                self.progress.markCancelled()
            self.progress.finish(code, self.process.stderrTail())
            self._reportFinished()
        return events

    def cancel(self) -> None:
        """Stop the job and every process it started (returns at once; ``poll`` sees the end)."""
        if self.running:
            self.progress.addLog("Cancelling...")
            self.process.cancel()

    def stop(self) -> None:
        """Stop the job and wait until every process it started is gone (grace time, then
        kill; for Slicer's exit), and record the outcome."""
        if self.running:
            self.progress.addLog("Stopping...")
            self.process.stop()
            self.poll()

    def wait(
        self,
        timeout: Optional[float] = None,
        interval: float = 0.1,
        processEvents: Optional[Callable[[], None]] = None,
    ) -> bool:
        """Poll until the job ends (console scripts and tests only); True if it ended in time."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if processEvents is not None:
                processEvents()
            if self.finished:
                break
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(interval)
        return True

    def _drain(self) -> List[Dict[str, Any]]:
        events = []
        for line in self.process.readLines():
            event = self.progress.feedLine(line)
            if event is not None:
                events.append(event)
        return events

    def _reportFinished(self) -> None:
        if self._finishedReported:
            return
        self._finishedReported = True
        for callback in list(self.onFinished):
            callback(self)
