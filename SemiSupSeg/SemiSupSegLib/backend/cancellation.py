"""Cancel on request: SIGINT/SIGTERM set a flag that long loops check between steps, so a
stop always leaves a consistent checkpoint behind. No torch import: the CLI uses it early."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional


class StopFlag:
    """Set by SIGINT/SIGTERM (or by code); the loop checks it once per iteration."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: Optional[str] = None

    def request(self, reason: str = "request") -> None:
        self.signal_name = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Route SIGINT and SIGTERM to this flag while the block runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda s, _f: self.request(signal.Signals(s).name))
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
