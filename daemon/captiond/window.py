"""The open utterance's audio window: what its decodes hear, cut at the front as speech goes on.

The audio cut off stays (the gate bounds an utterance at gate.max_utterance_s, under 2 MB at 60 s):
a final may hear the whole utterance again."""

from __future__ import annotations

import numpy as np

from .frames import SAMPLE_RATE, int16_to_float

# Voice allowed between a word's end, as a decode placed it, and a cut after it: Whisper's word times
# are off by a tenth of a second or two, the gate's voice by a frame or two; most words are longer.
_SLACK = 0.3 * SAMPLE_RATE


class AudioWindow:
    """The utterance's audio from `base` on; `start` and sample numbers are in stream samples."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._chunks: list[np.ndarray] = []
        self.samples = 0
        """Samples of the utterance received so far."""
        self.base = 0
        """Samples cut off the front of the utterance: decodes hear its audio from here on."""
        self._pauses: list[list[int]] = []  # [first, end) utterance samples the gate heard no voice in

    @property
    def length(self) -> int:
        """Samples in the window now."""
        return self.samples - self.base

    @property
    def offset(self) -> float:
        """Seconds from the utterance's start to the window's."""
        return self.base / SAMPLE_RATE

    def insert(self, pcm: np.ndarray, unvoiced_ms: int = 0) -> None:
        """Append the next int16 samples of the utterance, the last `unvoiced_ms` of them (and any
        before them, counted in earlier inserts) unvoiced to the gate."""
        self._chunks.append(pcm)
        first, self.samples = self.samples, self.samples + len(pcm)
        run = unvoiced_ms * SAMPLE_RATE // 1000
        if not run:
            return
        if run > len(pcm) and self._pauses and self._pauses[-1][1] == first:
            self._pauses[-1][1] = self.samples  # a pause begun in an earlier insert goes on
        else:
            self._pauses.append([self.samples - min(run, len(pcm)), self.samples])

    def pause_in(self, begin: float, end: float) -> float | None:
        """The middle of the longest pause (audio the gate heard no voice in) touching window seconds
        [begin, end] with no more than _SLACK of voice between `begin` and it, in window seconds; None
        when there is none.

        `begin` is where a decode says a word ended. A decode can misplace the words after it ("now."
        ending at 4.5 s, the next word at 12.5 s: 8 s of speech taken for a gap); a cut in a pause far on
        would take the audio of words that are not stable off the window, and they were lost."""
        a, b = self.base + begin * SAMPLE_RATE, self.base + end * SAMPLE_RATE
        best: tuple[int, int] | None = None
        for first, last in self._pauses:
            first = max(first, self.base)  # only the part still in the window
            if first < last and first <= b and last >= a and self._voiced(a, (first + last) / 2) <= _SLACK \
                    and (best is None or last - first >= best[1] - best[0]):
                best = (first, last)
        return None if best is None else (sum(best) / 2 - self.base) / SAMPLE_RATE

    def _voiced(self, a: float, b: float) -> float:
        """Samples between utterance samples `a` and `b` the gate heard voice in."""
        unvoiced = sum(max(0.0, min(b, last) - max(a, first)) for first, last in self._pauses)
        return max(0.0, b - a - unvoiced)

    def audio(self, until: int | None = None, whole: bool = False) -> np.ndarray:
        """The window's audio (the utterance's, if `whole`) as float32, up to stream sample `until` when given."""
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        pcm = self._chunks[0] if self._chunks else np.zeros(0, dtype=np.int16)
        begin = 0 if whole else self.base
        end = len(pcm) if until is None else max(begin, until - self.start)
        return int16_to_float(pcm[begin:end])

    def cut(self, samples: int) -> None:
        """Move the window's front on by `samples`."""
        self.base += samples

    def uncut(self) -> None:
        """Make the window the whole utterance again."""
        self.base = 0
