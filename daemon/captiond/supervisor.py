"""The capture supervisor: runs the audio source and, when a live device is lost, says so and reopens it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Hashable

from .capture import FIRST_AUDIO_S, PROBE_S, Capture, CaptureError, Source, abandonable, audio_devices
from .health import Health

log = logging.getLogger(__name__)

_RETRY_MIN_S = 0.25
_RETRY_MAX_S = 1.0  # a device back within a minute is picked up within about a second
# Each retry initialises PortAudio again, which leaks ~13 kB here (libportaudio 19.6, libasound 1.2.8):
# a gigabyte a day at one a second. A device away longer is retried when the system's audio devices
# change (audio_devices), else once a minute if the source says it looks back (source.present: a
# microphone asks a child process, whose leak goes with it).
_ABSENT_S = 60.0
_ABSENT_RETRY_S = 60.0
_DEVICES_POLL_S = 1.0
_LOOK_S = 1.0  # a look at the devices that takes longer (a driver stuck in a USB disconnect) sees no change
_CAPTURE_STALL_S = 10.0  # past audio.read_timeout_s, a device this quiet is already being reopened
_CAPTURE_RETRY_STALL_S = _ABSENT_RETRY_S + 30.0


class CaptureSupervisor:
    """Keeps a source running into a Capture; everything else stays up while a device is away.

    `lost()` is called once per loss, so the open utterance can be finalised at once.
    """

    def __init__(self, source: Source, capture: Capture, health: Health, lost: Callable[[], None],
                 devices: Callable[[], Hashable] = audio_devices, clock: Callable[[], float] = time.monotonic,
                 read_timeout_s: float = 5.0) -> None:
        self.source = source
        # Quiet for longer than the source's own read timeout and not reported lost: the capture itself
        # is stuck. A fixed 15 s stopped the watchdog's pings while a microphone with a read timeout
        # over 75 s was not yet declared lost, and systemd (WatchdogSec=60) killed the daemon.
        self._stall_s = read_timeout_s + _CAPTURE_STALL_S
        # A retry may take a look at the devices, an open that hangs for the read timeout and a first
        # chunk that never comes, after the minute's wait for the devices to change, or that minute and
        # a child's look for the device (source.present): past that, the retrying itself is stuck (90 s
        # flat missed retries of a long read timeout that were working).
        self._retry_stall_s = _CAPTURE_RETRY_STALL_S + _LOOK_S + PROBE_S + read_timeout_s + max(
            read_timeout_s, FIRST_AUDIO_S)
        self._devices = devices
        self._clock = clock
        self.capture = capture
        self._health = health
        self._lost = lost
        self.done = False
        """Set when the source has ended for good (a file or pipe at its end, or a stop)."""
        self._tick = clock()  # the last (re)open attempt
        self._looking: asyncio.Future[Any] | None = None  # the last look at the audio devices

    async def run(self) -> None:
        """Run the source until it ends; a live device that fails is retried until it comes back."""
        delay, lost_at = _RETRY_MIN_S, None
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._tick = self._clock()
                self.capture.started.clear()
                # Looked at before the attempt: a device that comes while it opens is a change too.
                devices = await self._look() if lost_at is not None else None
                run = loop.create_task(self.source.run(self.capture), name="capture-source")
                try:
                    flowing = loop.create_task(self.capture.started.wait(), name="capture-flowing")
                    await asyncio.wait([run, flowing], return_when=asyncio.FIRST_COMPLETED)
                    flowing.cancel()
                    if self.capture.started.is_set() and self._health.lost is not None:
                        log.info("%s is back", self.source.description)
                        self._health.device_back(self.source.description)
                    await run
                    return  # a file or pipe ended
                except CaptureError as exc:
                    if not self.source.live:
                        raise
                    if self.capture.started.is_set() or lost_at is None:  # it had worked: retry quickly again
                        delay, lost_at = _RETRY_MIN_S, self._clock()
                    if self._health.lost is None:
                        log.error("%s; retrying until it comes back", exc)
                        self._health.device_lost(str(exc))
                        self._lost()
                finally:
                    run.cancel()
                self.capture.started.clear()  # audio from now on is news: a late open's, say
                if self._clock() - lost_at <= _ABSENT_S:
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, _RETRY_MAX_S)
                elif await self._back(devices):
                    # A USB microphone's nodes come before the user may open them and before the audio
                    # server lists it: retried quickly again for a minute, not once.
                    delay, lost_at = _RETRY_MIN_S, self._clock()
        finally:
            self.source.abandon()
            self.done = True
            self.capture.frames_ready.set()

    async def _back(self, devices: Hashable | None) -> bool:
        """Wait until a source away for long may be back: True when the audio devices changed (or audio
        flowed), False when a minute passed without that and the source says it looks back."""
        while True:
            self._tick = self._clock()  # waiting here is retrying, for the watchdog (stuck)
            if devices is None:  # the look before the attempt did not answer: a change needs a baseline
                devices = await self._look()
            if await self._devices_change(devices, _ABSENT_RETRY_S):
                return True
            try:
                if await self.source.present():
                    return False
            except Exception:  # a bug in the look must not end the capture: the reopen tells
                log.exception("looking for %s failed; reopening it to see", self.source.description)
                return False
            log.debug("%s still not there", self.source.description)

    async def _devices_change(self, before: Hashable | None, limit: float) -> bool:
        """Wait up to `limit` seconds for the system's audio devices to differ from `before`, or for
        audio to flow (an open that hung has finished); True if either came."""
        until = self._clock() + limit
        while self._clock() < until:
            await asyncio.sleep(_DEVICES_POLL_S)
            if self.capture.started.is_set():
                return True
            now = await self._look()
            if before is not None and now is not None and now != before:
                return True
        return False

    async def _look(self) -> Hashable | None:
        """The audio devices, looked at off the event loop; None when the look does not answer within
        _LOOK_S (one stuck look is waited for again, never a second one started beside it)."""
        if self._looking is None or self._looking.done():
            self._looking = abandonable(self._devices)
        try:
            return await asyncio.wait_for(asyncio.shield(self._looking), _LOOK_S)
        except asyncio.TimeoutError:
            return None

    def stuck(self, now: float, paused: bool) -> str | None:
        """What is wrong with capture for the watchdog, or None."""
        if not self.source.live or paused:
            return None
        if self._health.lost is not None:
            if now - self._tick > self._retry_stall_s:
                return f"capture has not retried its device for {now - self._tick:.0f} s"
        elif now - self.capture.last_chunk > self._stall_s:
            return f"no audio from {self.source.description} for {now - self.capture.last_chunk:.0f} s"
        return None
