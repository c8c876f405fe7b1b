"""Stop and reload signals handed to the event loop, none lost however many others arrive."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from typing import Callable

STOP_AND_RELOAD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

UNHOLD = f"import signal; signal.pthread_sigmask(signal.SIG_UNBLOCK, {tuple(map(int, STOP_AND_RELOAD))})\n"
"""The first line of a Python child's program: the signals blocked in the daemon stay blocked across exec,
and a child that kept SIGTERM blocked would hold up a stop. (Short-lived tools that libraries start, such
as ctypes' ldconfig, keep them blocked.)"""


def hold() -> None:
    """Keep the stop and reload signals pending, in this thread and every thread it starts, until a
    SignalRelay takes them: one sent while the daemon starts neither kills it nor is lost."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_AND_RELOAD)


class SignalRelay:
    """Calls `on_signal(sig)` on the event loop for each stop or reload signal; from close() on they are
    ignored. Made in the main thread before it starts any other (or after hold()).

    The signals are blocked in every thread, and a thread of the relay's own takes them with sigwait.
    A handler runs on whichever thread the kernel picks: a storm of SIGHUPs during speech, landing on
    the model's and the audio's native threads, crashed the daemon (glibc "corrupted size vs.
    prev_size", SIGSEGV: 8 of 18 storms; none of 13 with the signals blocked outside the main thread).
    asyncio's add_signal_handler, before that, learnt which signal came from a byte that a full wakeup
    socket dropped (a SIGTERM lost in a storm). A blocked signal is pending once however often it is
    sent, so a storm reaches the loop as a callback now and then, and a SIGTERM in it as its own.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_signal: Callable[[signal.Signals], None]) -> None:
        self._loop, self._on_signal = loop, on_signal
        self._lock = threading.Lock()
        self._tripped: set[int] = set()
        self._closed = False
        self._before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_AND_RELOAD)
        self._thread = threading.Thread(target=self._take, name="signals", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        while True:
            sig = signal.sigwait(STOP_AND_RELOAD)
            with self._lock:
                if self._closed:
                    return
                first = not self._tripped
                self._tripped.add(sig)
            if first:
                try:
                    self._loop.call_soon_threadsafe(self._relay)
                except RuntimeError:  # the loop is closed: nobody to tell
                    return

    def _relay(self) -> None:
        with self._lock:
            tripped, self._tripped = self._tripped, set()
            if self._closed:
                return
        for sig in STOP_AND_RELOAD:  # a stop before a reload that came with it
            if sig in tripped:
                self._on_signal(sig)

    def close(self) -> None:
        """Ignore the signals from now on: one racing a clean stop must not kill the stopped daemon."""
        with self._lock:
            self._closed = True
        for sig in STOP_AND_RELOAD:
            signal.signal(sig, signal.SIG_IGN)
        if self._thread.is_alive():
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                signal.pthread_kill(self._thread.ident, signal.SIGHUP)  # ends its sigwait
        signal.pthread_sigmask(signal.SIG_SETMASK, self._before)
