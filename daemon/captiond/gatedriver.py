"""Driving the gate, written once: a synchronous stage (frames in, utterance events out, new settings
swapped in between utterances), the synchronous driver files use, and the thin async driver that runs
the stage on a gate thread into an ASR worker (the microphone, and each WebSocket/Wyoming session)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable, Iterator

import numpy as np

from .capture import Capture
from .config import GateConfig
from .frames import Frame, FrameAssembler
from .gate import Gate, GateEvent, Vad
from .reloader import Handoff
from .worker import AsrWorker

log = logging.getLogger(__name__)

_IDLE_BATCH_FRAMES = 3  # 90 ms: later speech starts by at most 60 ms, the ends are not delayed
_GATE_STALL_S = 15.0


@dataclass(frozen=True)
class Batch:
    """Frames for the gate, in order, and what follows them."""

    frames: list[Frame]
    close: bool = False
    """Close an open utterance after these frames (a pause, a lost device, a client's Finalize)."""
    last: bool = False
    """The stream ends after these frames (an open utterance is closed too)."""


class GateStage:
    """A Gate whose settings can be replaced from another thread: the new gate takes over between two
    utterances (one open at the change ends under the settings it began with), numbering on, and
    first hears the frames the old one held for a start."""

    def __init__(self, config: GateConfig, vad: Vad | None = None) -> None:
        self._config = config
        self._vad = vad  # None: each gate makes the webrtcvad its settings ask for
        self._gate = Gate(config, vad)
        self._next: Handoff[GateConfig] = Handoff()

    @property
    def in_speech(self) -> bool:
        """True while an utterance is open (read it only while feed() is not running)."""
        return self._gate.in_speech

    def reconfigure(self, config: GateConfig) -> None:
        """Use these settings from the next utterance on; the latest call wins (any thread)."""
        self._next.put(config)

    def end_at_pause(self, utt: int, voiced_end: int) -> None:
        """Gate.end_at_pause on the gate in use (any thread)."""
        self._gate.end_at_pause(utt, voiced_end)

    def warm_up(self) -> None:
        """Run the gate's feature code once, so the first real frames do not wait for it."""
        self._gate.warm_up()

    def feed(self, frames: list[Frame], close: bool = False) -> list[GateEvent]:
        """The utterance events these frames produce; `close` ends an open utterance after them."""
        if not self._gate.in_speech and (config := self._next.take()) is not None:
            changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                       if getattr(config, f.name) != getattr(self._config, f.name)}
            old, self._gate, self._config = self._gate, Gate(config, self._vad, first_utt=self._gate.next_utt), config
            log.info("gate: new settings from utterance %d on: %s", self._gate.next_utt,
                     ", ".join(f"{k}={v!r}" for k, v in changed.items()) or "none changed")
            # The new gate hears what the old one kept for a start: a reload as speech begins (or
            # reloads faster than a start window) must not make the gate deaf to it.
            return self._gate.feed(old.heard) + self._gate.feed(frames, close)
        return self._gate.feed(frames, close)


def segment(chunks: Iterable[np.ndarray], config: GateConfig) -> Iterator[GateEvent]:
    """The synchronous driver: a whole stream of 16 kHz samples through a gate, events as they come."""
    stage, frames = GateStage(config), FrameAssembler()
    for pcm in chunks:
        yield from stage.feed(frames.insert(pcm, 0.0))
    yield from stage.feed(frames.finish(0.0), close=True)


async def drive(batches: AsyncIterator[Batch], stage: GateStage, worker: AsrWorker,
                gate_thread: concurrent.futures.Executor) -> None:
    """The async driver: each batch through the stage on the gate thread, its events into the worker's
    queue (waiting while it is full), and the end of the stream after the last batch."""
    loop = asyncio.get_running_loop()
    async for batch in batches:
        for event in await loop.run_in_executor(gate_thread, stage.feed, batch.frames, batch.close or batch.last):
            await worker.put(event)
        if batch.last:
            break
    await worker.put(None)


class CaptureFeed:
    """The capture ring's frames as batches: taken whenever frames are ready, three at a time in
    silence (a third of the wake-ups); dropped unheard while `paused`. A pause, flush() (a lost device)
    or the source's end closes the open utterance."""

    def __init__(self, capture: Capture, stage: GateStage, ended: Callable[[], bool]) -> None:
        self._capture = capture
        self._stage = stage
        self._ended = ended
        self._flush = False
        self._finalize_at: int | None = None  # a client's finalize: close after the frames before this index
        self.paused = False
        """Set while a client has paused listening."""
        self.tick = time.monotonic()
        """When frames were last taken from the ring (for the watchdog)."""

    def end_at_pause(self, utt: int, voiced_end: int) -> None:
        """GateStage.end_at_pause, and a wake-up with no frames, so that a pause already long enough ends
        the utterance now rather than with the next frames (on the event loop)."""
        self._stage.end_at_pause(utt, voiced_end)
        self._capture.frames_ready.set()

    def flush(self) -> None:
        """Close the open utterance after the frames captured so far (its final comes now)."""
        self._flush = True
        self._capture.frames_ready.set()

    def finalize(self) -> None:
        """Close the open utterance after the frames captured so far, even those still in the ring when
        a pause follows at once (push-to-talk's stop), and not those captured after it, which the feed
        may take in the same wake-up; separate from flush(), so that a device lost while paused never
        feeds frames heard during the pause."""
        self._finalize_at = self._capture.ring.written
        self._capture.frames_ready.set()

    async def batches(self) -> AsyncIterator[Batch]:
        """Batches until the source has ended for good."""
        capture, ring = self._capture, self._capture.ring
        while True:
            await capture.frames_ready.wait()
            capture.frames_ready.clear()
            ended = self._ended()
            if (len(ring) < _IDLE_BATCH_FRAMES and not self._stage.in_speech and not ended and not self.paused
                    and not self._flush and self._finalize_at is None):
                continue
            frames = []
            while (frame := ring.pop()) is not None:
                frames.append(frame)
            capture.made_room()
            self.tick = time.monotonic()
            if (finalize_at := self._finalize_at) is not None:
                self._finalize_at = None
                before = [f for f in frames if f.index < finalize_at]
                frames = frames[len(before):]
                yield Batch(before, close=True)
            if self.paused:
                frames = []  # not heard at all; an utterance open at the pause is closed and finalised
            close, self._flush = self.paused or self._flush, False
            yield Batch(frames, close=close, last=ended)
            if ended:
                return

    def stuck(self, now: float, held_up: bool) -> str | None:
        """What is wrong with the gate for the watchdog, or None; `held_up` when the worker's queue is full."""
        if len(self._capture.ring) and not held_up and now - self.tick > _GATE_STALL_S:
            return f"the gate has not taken a frame for {now - self.tick:.0f} s"
        return None
