"""Cancel on request: SIGINT/SIGTERM, or the stop file the Slicer side writes, set a flag that
long loops check between steps, so a stop always leaves a consistent checkpoint behind. No
torch import: the CLI uses it early."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from SemiSupSegLib.protocol import STOP_FILE_VARIABLE


class StopFlag:
    """Set by SIGINT/SIGTERM, by code, or once the stop file exists; the loop checks it once
    per iteration.

    Args:
        stop_file: the file whose appearance requests a stop; by default the one named by the
            ``SEMISUPSEG_STOP_FILE`` environment variable (``protocol.STOP_FILE_VARIABLE``),
            how the Slicer side stops the backend gently on Windows.
    """

    def __init__(self, stop_file: Optional[str] = None) -> None:
        self._event = threading.Event()
        self.signal_name: Optional[str] = None
        self.stop_file = stop_file or os.environ.get(STOP_FILE_VARIABLE) or None

    def request(self, reason: str = "request") -> None:
        self.signal_name = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        if not self._event.is_set() and self.stop_file and os.path.exists(self.stop_file):
            self.request("stop file")
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
