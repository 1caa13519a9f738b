"""Stopping a long-running command (`serve`, `worker`) on SIGTERM or SIGINT without hanging.

Written by hand because two CPython details make the obvious `signal.signal(..., lambda *_: event.set())` plus
`event.wait()` hang now and then (seen: `serve` ignoring SIGTERM in one stop out of six):
- Python signal handlers run in the main thread only. A signal the kernel delivers to another thread never wakes a
  main thread blocked in a wait without a timeout, so `wait` polls.
- Event.set takes the lock an Event.wait in the interrupted main thread may hold, so the handler hands the set to a
  thread of its own.
"""
from __future__ import annotations

import signal
import threading

POLL_S = 0.5


class StopSignal:
    """Installs SIGTERM/SIGINT handlers that set `requested`; `name` says which signal came first."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._received: list[int] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:  # no logging here: it could re-enter a write in progress
        self._received.append(signum)
        threading.Thread(target=self.requested.set, name="stop-signal").start()

    def wait(self) -> None:
        while not self.requested.wait(POLL_S):
            pass

    @property
    def name(self) -> str:
        return signal.Signals(self._received[0]).name if self._received else ""
