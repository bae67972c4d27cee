"""Ctrl-C / SIGTERM as a request to stop at the next safe point, not an exception at an arbitrary one.

A ``KeyboardInterrupt`` raised asynchronously can land anywhere, e.g. between a lock's acquire and its
``try`` inside ``subprocess``, leaving the lock held for good. Long-running loops (training, the sweep
scheduler) instead install :class:`StopRequest` and check ``stop.signal`` where stopping is safe.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    """Turns SIGINT/SIGTERM into a request (``.signal`` names it) that the caller acts on at its next
    safe point: training finishes the step and checkpoints, the sweep stops its jobs.

    A second signal of the same kind acts immediately, as the previous handler would.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # asked twice: stop now
            self.restore()
            signal.raise_signal(signum)
            return
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
