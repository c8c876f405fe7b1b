"""Stop and reload signals handed to the event loop, none lost however many others arrive."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Callable


class SignalRelay:
    """Calls `on_signal(sig)` on the event loop for each of `signals`; from close() on they are ignored.

    Not asyncio's add_signal_handler: it learns which signal came from the byte the signal wrote to its
    wakeup socket, so a SIGTERM whose byte found the socket full (a storm of SIGHUPs) was lost, and
    removing a handler put back the default action (death) until the daemon could ignore it. Here
    Python's handler notes the signal and the byte only wakes the loop, which any byte does. The
    handler does no more than that: Python runs a handler again inside itself when a signal arrives
    there, and one that scheduled a callback overflowed the stack in a storm.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_signal: Callable[[signal.Signals], None],
                 signals: tuple[signal.Signals, ...]) -> None:
        self._on_signal, self._signals = on_signal, signals
        self._tripped: set[int] = set()
        self._loop = loop
        self._wake, self._waker = socket.socketpair()
        for end in (self._wake, self._waker):
            end.setblocking(False)
        loop.add_reader(self._wake.fileno(), self._drain)
        # A full socket must not warn: Python queued that warning from inside the signal handler, and a
        # signal arriving there deadlocked the daemon (SIGTERM ignored, only SIGKILL ended it).
        self._before = signal.set_wakeup_fd(self._waker.fileno(), warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, self._handle)
            signal.siginterrupt(sig, False)  # the audio and model threads' system calls go on

    def _handle(self, signum: int, _frame: object) -> None:
        self._tripped.add(signum)

    def _drain(self) -> None:
        # A signal whose byte was dropped came while the socket was full, so before the first read
        # here: its handler has run by the time the reads are done.
        try:
            while self._wake.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        for sig in self._signals:
            if sig in self._tripped:
                self._tripped.discard(sig)
                self._on_signal(sig)

    def close(self) -> None:
        """Ignore the signals from now on: one racing a clean stop must not kill the stopped daemon."""
        for sig in self._signals:
            signal.signal(sig, signal.SIG_IGN)
        signal.set_wakeup_fd(self._before)
        self._loop.remove_reader(self._wake.fileno())
        self._wake.close()
        self._waker.close()
