"""Files → txt/srt/vtt/json with the daemon's gate and model.

Speech is cut out by the gate, packed into chunks of up to 15 s (fewer, fuller chunks save encoder
passes; much longer chunks of repetitive speech trip the decoder's temperature fallback, which costs
more), decoded with word timestamps, and mapped back to the file's own time line.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .capture import CaptureError, decode_file, probe_duration, seekable, truncation
from .config import Config
from .engine import SHORT, Segment, WhisperDecoder
from .events import Word, undecoded
from .frames import SAMPLE_RATE, int16_to_float
from .gate import UtteranceAudio, UtteranceEnd, UtteranceStart
from .gatedriver import segment

CHUNK_S = 15.0
_GAP = np.zeros(SAMPLE_RATE * 3 // 10, dtype=np.int16)  # 0.3 s between packed pieces keeps words apart
LINE_CHARS = 42  # the usual subtitle line limit (BBC, Netflix guidelines)
CUE_MAX_S = 7.0


@dataclass(frozen=True)
class Piece:
    """One stretch of speech the gate found: where it starts in the file, and its samples."""

    start: int
    pcm: np.ndarray


@dataclass(frozen=True)
class FileTranscript:
    """A whole file's transcript, times in seconds of the file."""

    file: str
    duration: float
    language: str
    segments: tuple[Segment, ...]
    damage: str = ""
    """Why the file could not be read to its end (corrupt or truncated); what came before is transcribed."""


@dataclass
class Reading:
    """How far a file was decoded, and why it stopped early if it did."""

    samples: int = 0
    damage: str = ""


def speech_pieces(path: Path, config: Config, reading: Reading | None = None) -> Iterator[Piece]:
    """The file's speech, utterance by utterance, as the daemon's gate cuts it.

    Damage part way through ends the file there (noted in `reading`); with nothing decodable before
    it, the CaptureError is raised.
    """
    reading = reading if reading is not None else Reading()

    def chunks() -> Iterator[np.ndarray]:
        try:
            for chunk in decode_file(path):
                reading.samples += len(chunk)
                yield chunk
        except CaptureError as exc:
            if not reading.samples:
                raise
            reading.damage = str(exc)

    start, audio = 0, []
    for event in segment(chunks(), config.gate):
        if isinstance(event, UtteranceStart):
            start, audio = event.start, []
        elif isinstance(event, UtteranceAudio):
            audio.append(event.pcm)
        elif isinstance(event, UtteranceEnd):
            yield Piece(start, np.concatenate(audio)[: event.audio_end - start])


def pack(pieces: Iterator[Piece], max_s: float = CHUNK_S) -> Iterator[list[Piece]]:
    """Group consecutive pieces into chunks of at most max_s seconds (a longer piece goes alone)."""
    group: list[Piece] = []
    size = 0
    limit = int(max_s * SAMPLE_RATE)
    for piece in pieces:
        if group and size + len(_GAP) + len(piece.pcm) > limit:
            yield group
            group, size = [], 0
        size += len(piece.pcm) + (len(_GAP) if group else 0)
        group.append(piece)
    if group:
        yield group


class _TimeMap:
    """Maps seconds in a packed chunk back to seconds in the file."""

    def __init__(self, group: list[Piece]) -> None:
        self._spans = []  # (chunk start s, chunk end s, file start s)
        pos = 0
        for piece in group:
            self._spans.append((pos / SAMPLE_RATE, (pos + len(piece.pcm)) / SAMPLE_RATE, piece.start / SAMPLE_RATE))
            pos += len(piece.pcm) + len(_GAP)

    def __call__(self, t: float) -> float:
        for c_start, c_end, f_start in self._spans:
            if t <= c_end + len(_GAP) / SAMPLE_RATE / 2:
                return round(f_start + max(0.0, min(t, c_end) - c_start), 3)
        c_start, c_end, f_start = self._spans[-1]
        return round(f_start + (c_end - c_start), 3)


def transcribe_file(path: Path, decoder: WhisperDecoder, config: Config,
                    progress: Callable[[float], None] = lambda done: None) -> FileTranscript:
    """Transcribe one file; progress(fraction) is called after each chunk. Raises CaptureError for bad files."""
    # A pipe (a FIFO, <(cmd), /dev/stdin) can be read once: the probe took what the decode then waited for.
    once = not seekable(path)
    duration = 0.0 if once else probe_duration(path)
    segments: list[Segment] = []
    language = config.asr.language
    end = 0.0
    reading = Reading()
    for group in pack(speech_pieces(path, config, reading)):
        pcm = np.concatenate([part for piece in group for part in (_GAP, piece.pcm)][1:])
        # With the temperature fallback whatever asr.temperature_fallback says: on the dev corpus as one
        # 592 s file it took WER 0.317 to 0.29-0.30, for a quarter more time (live finals: no gain).
        t = decoder.decode(int16_to_float(pcm), beam_size=config.asr.beam_size, words=True, fallback=True,
                           window=SHORT if config.asr.short_window else None, verify=True)
        # A loop is cut back to one saying, as in a live final. Decoding a looping chunk again with the
        # whole window, as a live final is, was no better here than the fallback's own draws (dev as one
        # file, three runs each: WER 0.307-0.329 with, 0.314-0.334 without) for a quarter more time.
        t = t.unlooped(decoder.rules)[0]
        language = t.language
        to_file = _TimeMap(group)
        for seg in t.segments:
            words = tuple(Word(w.word, to_file(w.start), to_file(w.end), round(w.p, 3)) for w in seg.words)
            segments.append(replace(seg, start=to_file(seg.start), end=to_file(seg.end), words=words))
        end = (group[-1].start + len(group[-1].pcm)) / SAMPLE_RATE
        if duration:
            progress(min(1.0, end / duration))
    progress(1.0)
    decoded = reading.samples / SAMPLE_RATE
    damage = reading.damage
    if not damage and not once:
        damage = truncation(path, decoded, duration)
    return FileTranscript(undecoded(str(path)), duration or decoded or end, language, tuple(segments), damage)


# --- output formats ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cue:
    """One subtitle: at most two lines of LINE_CHARS, at most CUE_MAX_S long."""

    start: float
    end: float
    lines: tuple[str, ...]


def cues(transcript: FileTranscript) -> list[Cue]:
    """Cut the words into subtitle cues: break at long pauses, sentence ends, two full lines or 7 s."""
    out: list[Cue] = []
    words = [w for seg in transcript.segments for w in seg.words]
    group: list[Word] = []

    def flush() -> None:
        if group:
            lines = textwrap.wrap(" ".join(w.word for w in group), LINE_CHARS)
            out.append(Cue(group[0].start, max(group[-1].end, group[0].start + 0.2), tuple(lines)))
            group.clear()

    for word in words:
        if group:
            text = " ".join(w.word for w in group + [word])
            too_long = len(textwrap.wrap(text, LINE_CHARS)) > 2 or word.end - group[0].start > CUE_MAX_S
            pause = word.start - group[-1].end > 1.0
            sentence = group[-1].word.endswith((".", "?", "!")) and len(" ".join(w.word for w in group)) > 20
            if too_long or pause or sentence:
                flush()
        group.append(word)
    flush()
    # Cues must not overlap: a word's end can run past the next word's start.
    for i in range(len(out) - 1):
        if out[i].end > out[i + 1].start:
            out[i] = Cue(out[i].start, max(out[i].start + 0.01, out[i + 1].start), out[i].lines)
    return out


def _stamp(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def render(transcript: FileTranscript, fmt: str) -> str:
    """The transcript as txt, srt, vtt or json text."""
    if fmt == "txt":
        return "".join(seg.text + "\n" for seg in transcript.segments)
    if fmt == "json":
        return json.dumps(asdict(transcript), ensure_ascii=False) + "\n"
    blocks = []
    for i, cue in enumerate(cues(transcript), 1):
        sep = "," if fmt == "srt" else "."
        timing = f"{_stamp(cue.start, sep)} --> {_stamp(cue.end, sep)}"
        blocks.append((f"{i}\n" if fmt == "srt" else "") + timing + "\n" + "\n".join(cue.lines) + "\n")
    header = "WEBVTT\n\n" if fmt == "vtt" else ""
    return header + "\n".join(blocks)
