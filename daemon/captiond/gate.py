"""Speech gate: webrtcvad per frame, confirmed by log-mel features, cut into utterances."""

from __future__ import annotations

import functools
import io
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .config import GateConfig
from .frames import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, Frame, int16_to_float
from .signals import UNHOLD

# webrtcvad says "voiced" to anything periodic or broadband (hum, fans, tones, click trains).
# Speech differs in two ways a log-mel spectrogram shows cheaply: its band energies move
# (syllables, formant changes) where steady noise stays put, and its energy is sustained
# over tens of milliseconds where a click is over in one hop.
_N_FFT = 512
_WIN = 400  # 25 ms
_HOP = 160  # 10 ms
_N_MELS = 40
_SMOOTH_HOPS = 3
_LOUD_BANDS_DB = 40.0  # bands this far below the loudest are left out of the modulation measure
_SUSTAIN_DB = 12.0
_RECHECK_FRAMES = 10  # how often features are recomputed while voiced audio keeps coming
_SPEECH_CHECK_FRAMES = 33  # ~1 s window for the in-speech check, long enough to span a held vowel
_SPLIT_SEARCH_FRAMES = 50  # how far back from the length limit a quiet split point is sought
_TAIL_FRAMES = 7  # ~200 ms after the last voiced frame stay with the utterance: word endings are soft
_PAUSE_FRAMES = 3  # unvoiced frames after which the utterance may be ending (UtterancePause)


@dataclass(frozen=True)
class Features:
    """Speech-likeness measures of a stretch of audio."""

    modulation_db: float
    """Mean over loud mel bands of the band's standard deviation over time, dB."""
    sustain_ms: float
    """Longest run of hops whose energy is within 12 dB of the stretch's peak, ms."""


_MEL_PROGRAM = UNHOLD + f"""
import sys, librosa, numpy as np
basis = librosa.filters.mel(sr={SAMPLE_RATE}, n_fft={_N_FFT}, n_mels={_N_MELS}, fmin=80, fmax=7600)
lpad = ({_N_FFT} - {_WIN}) // 2  # centred in the FFT frame, as librosa's stft does
window = np.pad(librosa.filters.get_window("hann", {_WIN}, fftbins=True), (lpad, {_N_FFT} - {_WIN} - lpad))
np.save(sys.stdout.buffer, basis.astype(np.float32))
np.save(sys.stdout.buffer, window.astype(np.float32))
"""


class FeatureError(RuntimeError):
    """librosa could not design the gate's mel filterbank; the message says why."""


@functools.lru_cache(maxsize=1)
def _mel_basis() -> tuple[np.ndarray, np.ndarray]:
    """librosa's mel filterbank and Hann window for our STFT, designed once, in a child process.

    Importing librosa brings scipy and numba: ~130 MB of resident memory that a daemon running for
    months would carry for one 40 x 257 matrix. The child designs it and exits; the features are
    then a matrix product here (librosa's melspectrogram would also JIT-compile numba helpers).
    """
    try:
        done = subprocess.run([sys.executable, "-c", _MEL_PROGRAM], capture_output=True, timeout=120, check=False)
        why = "" if done.returncode == 0 else (done.stderr.decode(errors="replace").strip().splitlines() or
                                               ["no output"])[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:  # the interpreter not runnable by this user, a hang
        why = str(exc)
    if why:
        raise FeatureError(f"cannot design the gate's mel filterbank with librosa ({why}); "
                           "reinstall captiond's dependencies (pip install -e .)")
    out = io.BytesIO(done.stdout)
    return np.load(out), np.load(out)


def log_mel(pcm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mel power spectrogram (bands × hops, uncentred 25 ms windows every 10 ms) and its dB values."""
    basis, window = _mel_basis()
    frames = np.lib.stride_tricks.sliding_window_view(int16_to_float(pcm), _N_FFT)[::_HOP]
    mel = basis @ (np.abs(np.fft.rfft(frames * window, axis=1)) ** 2).T
    return mel, _db(mel)


def _db(power: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(np.maximum(power, 1e-10))


def features(pcm: np.ndarray) -> Features:
    """Compute log-mel speech-likeness features of int16 audio (at least ~60 ms long)."""
    mel, db = log_mel(pcm)
    kernel = np.ones(_SMOOTH_HOPS) / _SMOOTH_HOPS
    smooth = np.apply_along_axis(np.convolve, 1, db, kernel, "valid") if db.shape[1] >= _SMOOTH_HOPS else db
    loud = smooth.max(axis=1) > smooth.max() - _LOUD_BANDS_DB
    modulation = float(np.mean(np.std(smooth[loud], axis=1))) if loud.any() else 0.0
    energy = _db(mel.sum(axis=0))
    near = energy > energy.max() - _SUSTAIN_DB
    best = run = 0
    for hot in near:
        run = run + 1 if hot else 0
        best = max(best, run)
    return Features(modulation, best * _HOP * 1000.0 / SAMPLE_RATE)


class Vad(Protocol):
    """What the gate needs of a voice activity detector (webrtcvad.Vad has it)."""

    def is_speech(self, buf: bytes, sample_rate: int) -> bool: ...


@dataclass(frozen=True)
class UtteranceStart:
    """Speech began; `start` is the first sample kept (pre-roll included)."""

    utt: int
    start: int


@dataclass(frozen=True)
class UtteranceAudio:
    """More audio of the open utterance, in order, no gaps."""

    utt: int
    pcm: np.ndarray
    end: int
    """Sample after the last one in pcm."""
    unvoiced_ms: int = 0
    """How long the utterance has been unvoiced at `end` (a pause that may end it), in ms."""


@dataclass(frozen=True)
class UtteranceEnd:
    """The utterance closed: `end` is the end of its last voiced frame.

    Audio sent past `audio_end` belongs to nobody (silence) or, after a split, to the next utterance.
    """

    utt: int
    end: int
    audio_end: int
    """Sample up to which the utterance's audio belongs to it (a little past `end`, or the split point)."""
    reason: str
    """silence, sentence_end (a shorter pause after words that end a sentence), max_length or end_of_stream."""
    voiced_captured: float
    """monotonic time the last voiced frame arrived: where latency is measured from."""


@dataclass(frozen=True)
class UtterancePause:
    """Speech paused (90 ms unvoiced): the utterance may be ending here. When its UtteranceEnd has the
    same `voiced_end`, no speech came after this pause, and a final decoded now from the audio up to
    `audio_end` (all that had arrived) is as good as one decoded at the end."""

    utt: int
    voiced_end: int
    """Sample after the last voiced frame."""
    audio_end: int


GateEvent = UtteranceStart | UtteranceAudio | UtterancePause | UtteranceEnd


class Gate:
    """Push frames in with insert(); process() returns the utterance events they produced."""

    def __init__(self, config: GateConfig, vad: Vad | None = None, first_utt: int = 1) -> None:
        if vad is None:
            import webrtcvad

            vad = webrtcvad.Vad(config.vad_aggressiveness)
        self._vad = vad
        self._cfg = config
        self._start_frames = max(1, round(config.start_ms / FRAME_MS))
        self._window_frames = max(self._start_frames, round(config.start_window_ms / FRAME_MS))
        self._preroll_frames = round(config.preroll_ms / FRAME_MS)
        self._hangover_frames = max(1, round(config.hangover_ms / FRAME_MS))
        self._sentence_end_frames = round(config.sentence_end_ms / FRAME_MS) or self._hangover_frames
        self._end_asked: tuple[int, int] | None = None  # (utt, voiced_end) of end_at_pause()
        self._max_frames = round(config.max_utterance_s * 1000 / FRAME_MS)
        self._min_sustain = config.min_sustain_ms
        self._history: deque[tuple[Frame, bool]] = deque(maxlen=self._preroll_frames + self._window_frames)
        self._speech: list[tuple[Frame, bool]] = []  # frames of the open utterance, oldest first
        self._recent: deque[Frame] = deque(maxlen=_SPEECH_CHECK_FRAMES)
        self._pending: list[Frame] = []
        self._utt = first_utt - 1
        self._open = False
        self._unvoiced_run = 0
        self._last_voiced: Frame | None = None
        self._since_check = _RECHECK_FRAMES
        self._noise = False  # the last in-speech feature check found steady noise, not speech
        self.rejected = 0
        """Voiced runs that webrtcvad passed and the feature check turned down."""

    @property
    def next_utt(self) -> int:
        """The id the next utterance will get."""
        return self._utt + 1

    @property
    def in_speech(self) -> bool:
        """True while an utterance is open."""
        return self._open

    @property
    def heard(self) -> list[Frame]:
        """The frames since the last utterance that a new one could still begin with (start window and
        pre-roll), oldest first; none while an utterance is open."""
        return [] if self._open else [frame for frame, _ in self._history]

    def end_at_pause(self, utt: int, voiced_end: int) -> None:
        """Close utterance `utt` once it has been unvoiced for gate.sentence_end_ms since `voiced_end`,
        unless speech comes first: its words up to that pause end a sentence (any thread may ask)."""
        self._end_asked = (utt, voiced_end)

    def warm_up(self) -> None:
        """Run the feature code once so its first real call does not wait for the filterbank's design."""
        features(np.zeros(SAMPLE_RATE // 2, dtype=np.int16))

    def insert(self, frame: Frame) -> None:
        """Queue one frame for process()."""
        self._pending.append(frame)

    def feed(self, frames: list[Frame], close: bool = False) -> list[GateEvent]:
        """insert() the frames, then process() them, or finish() the stream when `close`."""
        for frame in frames:
            self.insert(frame)
        return self.finish() if close else self.process()

    def process(self) -> list[GateEvent]:
        """Classify the queued frames and return the utterance events they produce."""
        out: list[GateEvent] = []
        for frame in self._pending:
            voiced = self._vad.is_speech(frame.pcm.tobytes(), SAMPLE_RATE)
            if self._open:
                self._in_speech(frame, voiced, out)
            else:
                self._idle(frame, voiced, out)
        self._pending.clear()
        # An end asked after the pause had lasted long enough closes now, not with the next frames
        # (a microphone's come 60 ms apart): the final's decode is done, only this decision waited.
        if self._open and self._end_due():
            self._close("sentence_end", out)
        return out

    def finish(self) -> list[GateEvent]:
        """Flush queued frames and close an open utterance at the end of the stream."""
        out = self.process()
        if self._open:
            self._close("end_of_stream", out)
        return out

    def _speech_like(self, pcm: np.ndarray, sustain: bool) -> bool:
        if not self._cfg.feature_check:
            return True
        f = features(pcm)
        return f.modulation_db >= self._cfg.min_modulation_db and (not sustain or f.sustain_ms >= self._min_sustain)

    def _idle(self, frame: Frame, voiced: bool, out: list[GateEvent]) -> None:
        self._history.append((frame, voiced))
        self._since_check += 1
        window = list(self._history)[-self._window_frames:]
        if sum(v for _, v in window) < self._start_frames or self._since_check < _RECHECK_FRAMES:
            return
        self._since_check = 0
        first_voiced = next(i for i, (_, v) in enumerate(window) if v)
        voiced_pcm = np.concatenate([f.pcm for f, _ in window[first_voiced:]])
        if len(voiced_pcm) < 2 * _N_FFT or not self._speech_like(voiced_pcm, sustain=True):
            self.rejected += 1
            return
        self._open_utterance(list(self._history)[-(len(window) - first_voiced + self._preroll_frames):], out)

    def _open_utterance(self, frames: list[tuple[Frame, bool]], out: list[GateEvent]) -> None:
        self._utt += 1
        self._open = True
        self._history.clear()
        self._speech = []
        self._recent.clear()
        self._unvoiced_run = 0
        self._last_voiced = None
        self._noise = False
        self._since_check = 0
        out.append(UtteranceStart(self._utt, frames[0][0].start))
        for frame, voiced in frames:
            self._add(frame, voiced)
        out.append(self._audio([f for f, _ in frames]))

    def _add(self, frame: Frame, voiced: bool) -> None:
        self._speech.append((frame, voiced))
        self._recent.append(frame)
        if voiced:
            self._last_voiced = frame
            self._unvoiced_run = 0
        else:
            self._unvoiced_run += 1

    def _audio(self, frames: list[Frame]) -> UtteranceAudio:
        return UtteranceAudio(self._utt, np.concatenate([f.pcm for f in frames]), frames[-1].end,
                              self._unvoiced_run * FRAME_MS)

    def _in_speech(self, frame: Frame, voiced: bool, out: list[GateEvent]) -> None:
        self._since_check += 1
        if self._cfg.feature_check and self._since_check >= _RECHECK_FRAMES and len(self._recent) >= _RECHECK_FRAMES:
            self._since_check = 0
            self._noise = not self._speech_like(np.concatenate([f.pcm for f in self._recent]), sustain=False)
        self._add(frame, voiced and not self._noise)
        out.append(self._audio([frame]))
        if self._unvoiced_run == _PAUSE_FRAMES and self._hangover_frames > _PAUSE_FRAMES and self._last_voiced:
            out.append(UtterancePause(self._utt, self._last_voiced.end, frame.end))
        if self._unvoiced_run >= self._hangover_frames:
            self._close("silence", out)
        elif self._end_due():
            self._close("sentence_end", out)
        elif len(self._speech) >= self._max_frames:
            self._split(out)

    def _end_due(self) -> bool:
        """True when end_at_pause() asked to end at this pause and it has lasted gate.sentence_end_ms."""
        return (self._unvoiced_run >= self._sentence_end_frames and self._last_voiced is not None
                and self._end_asked == (self._utt, self._last_voiced.end))

    def _close(self, reason: str, out: list[GateEvent]) -> None:
        last = self._last_voiced or self._speech[-1][0]
        audio_end = min(last.end + _TAIL_FRAMES * FRAME_SAMPLES, self._speech[-1][0].end)
        out.append(UtteranceEnd(self._utt, last.end, audio_end, reason, last.captured))
        self._open = False
        self._speech = []
        self._last_voiced = None
        self._since_check = _RECHECK_FRAMES

    def _split(self, out: list[GateEvent]) -> None:
        # Cut at the quietest frame near the limit so a word is not chopped in half; the frames
        # after the cut were already sent, so they open the next utterance again without loss.
        tail = self._speech[-_SPLIT_SEARCH_FRAMES:]
        quietest = min(range(len(tail) - 1), key=lambda i: float(np.abs(tail[i][0].pcm.astype(np.int32)).mean()))
        cut = tail[quietest][0]
        out.append(UtteranceEnd(self._utt, cut.end, cut.end, "max_length", cut.captured))
        self._open_utterance(tail[quietest + 1:], out)
