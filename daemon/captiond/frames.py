"""Frames, the frame ring buffer and PCM helpers: the lowest floor, importing nothing of ours."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
FRAME_MS = 30
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 480


@dataclass(frozen=True)
class Frame:
    """One fixed 30 ms frame of 16 kHz mono int16 audio."""

    index: int
    """Frame number since the stream began (its first sample is index * FRAME_SAMPLES)."""
    pcm: np.ndarray
    """FRAME_SAMPLES int16 samples."""
    captured: float
    """time.monotonic() when the frame's last sample reached us; used only to measure latency."""

    @property
    def start(self) -> int:
        """First sample of the frame, counted from the stream start."""
        return self.index * FRAME_SAMPLES

    @property
    def end(self) -> int:
        """One past the last sample of the frame."""
        return (self.index + 1) * FRAME_SAMPLES


def int16_to_float(pcm: np.ndarray) -> np.ndarray:
    """Scale int16 samples to float32 in [-1, 1)."""
    return pcm.astype(np.float32) / 32768.0


class FrameAssembler:
    """Cuts a stream of arbitrary-length int16 chunks into numbered fixed frames."""

    def __init__(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)
        self._next_index = 0

    def insert(self, pcm: np.ndarray, captured: float) -> list[Frame]:
        """Add samples; return every frame they complete."""
        if len(self._pending):
            pcm = np.concatenate([self._pending, pcm.astype(np.int16, copy=False)])
        n = len(pcm) // FRAME_SAMPLES
        frames = []
        for i in range(n):
            chunk = pcm[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES].copy()
            frames.append(Frame(self._next_index, chunk, captured))
            self._next_index += 1
        self._pending = pcm[n * FRAME_SAMPLES:].copy()
        return frames

    def finish(self, captured: float) -> list[Frame]:
        """Pad the last partial frame with silence so no sample is lost at end of stream."""
        if not len(self._pending):
            return []
        pad = np.zeros(FRAME_SAMPLES - len(self._pending), dtype=np.int16)
        return self.insert(pad, captured)


class FrameRing:
    """Fixed-size ring of frames between capture and the gate.

    A live writer never waits: when the reader falls a whole ring behind, the oldest unread
    frame is overwritten and counted as an overrun (a dropped frame). Pre-roll before speech
    is the gate's business; this ring only absorbs the jitter between capture and the gate.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("ring capacity must be at least one frame")
        self.capacity = capacity
        self._slots: list[Frame | None] = [None] * capacity
        self._written = 0  # frames ever pushed
        self._read = 0  # frames ever consumed (or skipped by an overrun)
        self.overruns = 0

    def __len__(self) -> int:
        return self._written - self._read

    @property
    def written(self) -> int:
        """Frames ever pushed: the index the next frame pushed will carry."""
        return self._written

    @property
    def full(self) -> bool:
        """True when the next push would overwrite an unread frame."""
        return len(self) >= self.capacity

    def push(self, frame: Frame) -> None:
        """Store a frame, overwriting (and counting) the oldest unread one when full."""
        if self.full:
            self._read += 1
            self.overruns += 1
        self._slots[self._written % self.capacity] = frame
        self._written += 1

    def pop(self) -> Frame | None:
        """Take the oldest unread frame, or None when there is none."""
        if self._read == self._written:
            return None
        frame = self._slots[self._read % self.capacity]
        self._read += 1
        return frame
