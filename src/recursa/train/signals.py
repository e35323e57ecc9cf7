"""Ctrl-C and SIGTERM during training: finish the step, write a checkpoint, then exit.

    with StopOnSignal() as stop:
        while not stop.requested: ...one optimizer step...
    # the loop saves a checkpoint and raises Interrupted(signum, message)

The first SIGINT/SIGTERM only sets `requested` (the loop checks it between steps, reduced over
ranks so every rank stops at the same step); the second one raises KeyboardInterrupt at once,
which is safe because every checkpoint write is atomic (the previous checkpoint stays). Outside
the main thread (where Python cannot install handlers) nothing is installed.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal after saving its checkpoint; `signum` gives the exit code 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopOnSignal:
    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt   # the second one: stop now (the last checkpoint is intact)
        self.signum = signum
        if self.announce:
            print(f"\nrecursa train: {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  f"(again to quit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
