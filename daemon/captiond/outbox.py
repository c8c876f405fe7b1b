"""The daemon's outbox: events go to subscribers in the order they were published, and a final with
words only once the transcript log has written its line, so a client that saw a final finds it in the
log even if the daemon is killed the next instant (SIGKILL, power cut after the page cache is synced)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .events import Event, Final
from .translog import LogWriter

log = logging.getLogger(__name__)

HOLD_S = 2.0
"""Longest a final waits for its log line; a log slower than this (a disk that hangs) holds no final
until it has caught up, and those finals reach clients before the log."""


@dataclass
class _Entry:
    event: Event
    ready: bool
    timer: asyncio.TimerHandle | None = None


class Outbox:
    """publish() on the event loop; `deliver` sends to every subscriber, `log` (None: no transcript log)
    writes finals on its own thread."""

    def __init__(self, deliver: Callable[[Event], None], hold_s: float = HOLD_S) -> None:
        self._deliver = deliver
        self._hold_s = hold_s
        self.log: LogWriter | None = None
        """The transcript log's writer; replaced when a reload turns the log on or off."""
        self._queue: deque[_Entry] = deque()
        self._stalled = False  # a final waited hold_s for the log: hold none until its queue is empty
        self._empty = asyncio.Event()
        self._empty.set()

    def publish(self, event: Event) -> None:
        """Send an event once everything published before it has gone; a final with words waits for its
        log line (at most hold_s)."""
        entry = _Entry(event, ready=True)
        if isinstance(event, Final) and event.text and self.log is not None:
            loop = asyncio.get_running_loop()
            writer = self.log

            def written() -> None:  # on the writer's thread, once the line is written (or kept in memory)
                # Asked here, between two lines: one written while hundreds wait is no catching up.
                caught_up = not writer.queued
                with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting
                    loop.call_soon_threadsafe(self._written, entry, caught_up)

            if self.log.offer(event, time.time(), written) and not self._stalled:
                entry.ready = False
                entry.timer = loop.call_later(self._hold_s, self._too_slow, entry)
        if entry.ready and not self._queue:
            self._deliver(event)
            return
        self._queue.append(entry)
        self._empty.clear()

    async def flush(self, timeout: float) -> None:
        """Wait up to timeout seconds for held finals' lines, then send everything still queued."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout)
        for entry in self._queue:
            entry.ready = True
        self._release()

    def _written(self, entry: _Entry, caught_up: bool) -> None:
        if caught_up:
            self._stalled = False
        if entry.timer is not None:
            entry.timer.cancel()
        entry.ready = True
        self._release()

    def _too_slow(self, entry: _Entry) -> None:
        if entry.ready:
            return
        log.warning("the transcript log has not written utterance %d's line in %.0f s; finals go to clients "
                    "without waiting for it until it catches up", getattr(entry.event, "utt", 0), self._hold_s)
        self._stalled = True
        for held in self._queue:
            held.ready = True
        self._release()

    def _release(self) -> None:
        while self._queue and self._queue[0].ready:
            entry = self._queue.popleft()
            if entry.timer is not None:
                entry.timer.cancel()
            self._deliver(entry.event)
        if not self._queue:
            self._empty.set()
