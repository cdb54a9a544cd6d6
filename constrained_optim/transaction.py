"""State changes that complete or leave nothing behind.

Attach, load and the projections of a step compute their results on the side and store them
with as few in-place writes as possible. Two things could still split such a write from the
bookkeeping around it: an exception raised by a torch call (checked before the call runs, so a
refused call changes nothing) and Ctrl-C, which Python delivers between any two bytecodes.
`deferred_interrupts` holds Ctrl-C back for the few lines of a commit and raises it right after,
so a commit is never interrupted half-way.
"""

from __future__ import annotations

import signal
import threading
from typing import Literal


class deferred_interrupts:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Inside, SIGINT is recorded instead of raised; on exit it is raised as KeyboardInterrupt.

    Only where Python's own handler is installed and only on the main thread (the one signals
    reach); elsewhere, and under a handler the user installed, it does nothing."""

    def __enter__(self):
        self._previous = None
        self._received = False
        if threading.current_thread() is not threading.main_thread():
            return self
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return self
        self._previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        self._received = True

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            if self._received and exc_type is None:
                raise KeyboardInterrupt
        return False
