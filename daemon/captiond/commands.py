"""Client commands (ping, status, pause, resume, finalize, context) answered against the running daemon's parts;
`subscribe` is the hub's own. Commands arrive validated (events.parse_command)."""

from __future__ import annotations

import logging
from typing import Callable

from .events import Command, Event, Pong, Status
from .gatedriver import CaptureFeed
from .health import Health
from .worker import AsrWorker

log = logging.getLogger(__name__)


class Commands:
    """Answers one command at a time on the event loop; `status()` makes the daemon's status event and
    `listening()` names the source for the `listening` state's detail."""

    def __init__(self, worker: AsrWorker, feed: CaptureFeed, health: Health, status: Callable[[], Status],
                 listening: Callable[[], str]) -> None:
        self._worker = worker
        self._feed = feed
        self._health = health
        self._status = status
        self._listening = listening

    def __call__(self, cmd: Command) -> Event | None:
        """The answer to a client's command."""
        if cmd.cmd == "ping":
            return Pong()
        if cmd.cmd == "context":
            if cmd.prompt is not None:
                self._worker.prompt = cmd.prompt
            if cmd.hotwords is not None:
                self._worker.hotwords = cmd.hotwords
            # Lengths only: up to 50 commands a second per client would otherwise copy 2 KiB each into the log.
            log.info("context set by a client: prompt of %d characters, hotwords of %d",
                     len(self._worker.prompt), len(self._worker.hotwords))
        if cmd.cmd == "finalize" and not self._feed.paused:  # paused, nothing is open and nothing is heard
            self._feed.finalize()
        if cmd.cmd in ("pause", "resume") and self._feed.paused != (cmd.cmd == "pause"):  # else: only answered
            self._feed.paused = cmd.cmd == "pause"
            self._health.settle(self._listening())
        return self._status()
