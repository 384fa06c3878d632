"""SIGINT (Ctrl-C) and SIGTERM during the steps: the first one asks the run to stop, a second one aborts.

The first finishes the step; the Trainer then saves a checkpoint and returns an interrupted summary (the
CLI exits 130 or 143). A second one raises at once, without a checkpoint. Under torchrun the terminal's
Ctrl-C reaches every rank twice (from the terminal and from torchrun): a repeat this soon is the same one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable

# Under torchrun a signal this soon after the first is the same one, passed on by torchrun.
REPEAT_SIGNAL_S = 1.0


class StopSignals:
    """Whether a stop was asked for (``requested``) and by which signal (``signum``)."""

    def __init__(self, world_size: int, say: Callable[[str], None]):
        self.world_size, self.say = world_size, say
        self.requested = False
        self.signum: int | None = None
        self._first_at = 0.0

    @contextlib.contextmanager
    def caught(self):
        """The handlers installed for the block (in the main thread only), the previous ones restored after."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.requested:
            # torchrun passes the terminal's Ctrl-C on to each rank, which the terminal signalled too.
            if self.world_size > 1 and time.monotonic() - self._first_at < REPEAT_SIGNAL_S:
                return
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.requested, self.signum, self._first_at = True, signum, time.monotonic()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.say(f"{name}: saving a checkpoint after this step (send it again to abort without one)")
