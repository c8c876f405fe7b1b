"""The daemon's published state (an Enum), the overload state machine, and the systemd watchdog."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from enum import Enum
from typing import Callable

from .events import one_line

log = logging.getLogger(__name__)

OVERLOADED_LAG_S = 5.0
"""Speech waiting for the decoder, in seconds, past which a listening daemon says it is overloaded."""
RECOVERED_LAG_S = 1.0
"""Speech waiting, in seconds, below which an overloaded daemon is listening again."""


class State(str, Enum):
    """What the daemon is doing, as status events and systemd's STATUS line name it."""

    STARTING = "starting"
    LISTENING = "listening"
    PAUSED = "paused"
    DEVICE_LOST = "device_lost"
    OVERLOADED = "overloaded"
    STOPPING = "stopping"


def sd_notify(message: str) -> None:
    """Send a state line to systemd when run under Type=notify (NOTIFY_SOCKET set); no-op otherwise."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], exc)


class Health:
    """The current state and its detail; every change is announced once through `changed`.

    What listening looks like is derived from the facts that make it, so that none can hide another:
    a client's pause (`paused`, the capture feed's flag), a lost device, whether the daemon has been
    ready yet, and the decoder's lag. A paused daemon said `listening` once its lost device came back,
    a resume said `listening` while the device was still gone, or while 180 s of speech waited."""

    def __init__(self, changed: Callable[[], None], paused: Callable[[], bool] = lambda: False) -> None:
        self.state = State.STARTING
        self.detail = ""
        self.lost: str | None = None
        """Why the source's device is lost, while it is; None while it delivers (or before it opened)."""
        self._paused = paused
        self._ready = False
        self._lag = 0.0  # speech waiting for the decoder at the last look, in seconds
        self._overloaded = False
        self._changed = changed

    def set(self, state: State, detail: str = "") -> None:
        """Change the state (a status event for subscribers, a STATUS line for systemd); `stopping` is
        the last (protocol.md: a command read during the stop's flush changes nothing)."""
        # The detail names files and devices: a name that is not UTF-8 could not be sent to clients,
        # and a newline in one would add lines to systemd's message (READY=1, STOPPING=1, ...).
        detail = one_line(detail)
        if (state, detail) == (self.state, self.detail) or self.state is State.STOPPING:
            return
        self.state, self.detail = state, detail
        self._changed()
        sd_notify(f"STATUS={state.value}{': ' + detail if detail else ''}")

    def ready(self, listening_detail: str) -> None:
        """Audio flows and the model is loaded: listening (unless a client paused the daemon meanwhile)."""
        self._ready, self.lost = True, None
        self.settle(listening_detail)

    def device_lost(self, why: str) -> None:
        """The device failed; a paused daemon says so only once it is resumed."""
        self.lost = why
        self.settle("")

    def device_back(self, listening_detail: str) -> None:
        """The device delivers audio again."""
        self.lost = None
        self.settle(listening_detail)

    def settle(self, listening_detail: str) -> None:
        """The state the facts make: paused, device_lost, starting, or listening (called again when
        the pause changes)."""
        if self._paused():
            self.set(State.PAUSED, "paused by a client; send resume (captiond ptt start) to listen again")
        elif self.lost is not None:
            self.set(State.DEVICE_LOST, self.lost)
        elif not self._ready:
            self.set(State.STARTING)
        elif self._overloaded:
            self.set(State.OVERLOADED, f"{self._lag:.0f} s of speech waiting for the decoder")
        else:
            self.set(State.LISTENING, listening_detail)

    def lag(self, lag: float, listening_detail: str) -> None:
        """The overload state machine: overloaded past OVERLOADED_LAG_S of waiting speech, listening
        again below RECOVERED_LAG_S (the gap keeps it from flapping); meanwhile the detail says the
        lag of the last look, to the second. Paused or without its device the daemon says so instead."""
        self._lag = lag
        self._overloaded = lag >= RECOVERED_LAG_S if self._overloaded else lag > OVERLOADED_LAG_S
        self.settle(listening_detail)


class Watchdog:
    """Pings systemd's watchdog while every check passes; each check returns what is stuck, or None."""

    def __init__(self, checks: list[Callable[[float], str | None]]) -> None:
        self._checks = checks

    def problem(self) -> str | None:
        """The first thing that keeps the pipeline from moving, or None."""
        now = time.monotonic()
        return next((p for check in self._checks if (p := check(now)) is not None), None)

    async def run(self, interval: float) -> None:
        """Ping every interval seconds while nothing is stuck; say once what is, and stop pinging."""
        complained = None
        while True:
            problem = self.problem()
            if problem is None:
                sd_notify("WATCHDOG=1")
            elif problem != complained:
                log.error("watchdog: %s; no longer telling systemd we are alive", problem)
            complained = problem
            await asyncio.sleep(interval)
