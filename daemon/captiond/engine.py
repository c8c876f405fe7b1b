"""The faster-whisper model, run in one dedicated thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import heapq
import itertools
import math
import threading
import time
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .config import AsrConfig
from .events import Word
from .frames import SAMPLE_RATE
from .models import ModelError, ModelRef, check_languages, resolve_model
from .rules import TextRules, loop, rules_for, unheard


@dataclass(frozen=True)
class Segment:
    """One decoded segment; times are seconds into the decoded audio."""

    start: float
    end: float
    text: str
    words: tuple[Word, ...]
    avg_logprob: float
    """Average log-probability of the tokens of the 30 s pass that made it (each pass has its own)."""
    no_speech_prob: float
    """Whisper's probability that the 30 s pass that made it holds no speech."""


@dataclass(frozen=True)
class Transcript:
    """What one decode of a stretch of audio produced; times are seconds into that audio."""

    text: str
    segments: tuple[Segment, ...]
    language: str
    avg_logprob: float
    """Lowest segment average log-probability (the least confident segment)."""
    compression_ratio: float
    """Highest segment gzip compression ratio (repetition loops compress well)."""
    no_speech_prob: float
    """Highest segment no-speech probability."""
    audio_seconds: float
    decode_seconds: float
    unheard: tuple[str, ...] = ()
    """Words left out of text and segments: placed after the audio, or cut by a text rule (rules.py)."""
    origin: str = "local"
    """Who decoded it: local, remote (an inference server, remote.py: it cannot be made to begin with
    the stable words), or fallback (here, because the server failed)."""
    language_p: float = 1.0
    """How sure Whisper was of `language` when it detected it (1 when it was told the language)."""

    @property
    def words(self) -> tuple[Word, ...]:
        """Every word of every segment, in order."""
        return tuple(w for seg in self.segments for w in seg.words)

    def unlooped(self, rules: TextRules, after: int = 0, written: Sequence[str] | None = None) -> tuple[Transcript, bool]:
        """The transcript less every loop (rules.loop) from words[after] on, each cut back to one saying,
        and whether any was cut.

        Loops are found in the decode as Whisper wrote it (`written`; by default its words, then those
        left out as unheard), so a loop the engine already shortened is still seen: with its last
        saying left out, "10 of clubs.. 10 of clubs.." for 1.1 s of "ten of clubs" was too short to
        be one. A loop only left-out words make is gone already."""
        written = list([*(w.word for w in self.words), *self.unheard] if written is None else written)
        kept, cut = self, False
        while (found := loop(written, rules, after=after)) is not None:
            first, stop = found
            if first < len(kept.words):  # kept.words is always the first of the written words
                cut, kept = True, kept.without(first, min(stop, len(kept.words)))
            del written[first:stop]
        return kept, cut

    def without(self, first: int, end: int) -> Transcript:
        """The transcript less words[first:end] (a loop, a tail the decoder ran on into); every
        segment keeps its own bounds and scores, less those words (a file's lines and JSON show them)."""
        if end <= first:
            return self
        segments, at = [], 0
        for seg in self.segments:
            lo, hi = max(first - at, 0), min(end - at, len(seg.words))
            at += len(seg.words)
            if hi <= lo:
                segments.append(seg)
            elif left := seg.words[:lo] + seg.words[hi:]:
                segments.append(dataclasses.replace(seg, start=seg.start if lo else left[0].start,
                                                    end=left[-1].end if hi == len(seg.words) else seg.end,
                                                    text=_said_without(seg.text, seg.words, lo, hi), words=left))
        dropped = tuple(w.word for w in self.words[first:end])
        return dataclasses.replace(self, text=joined(seg.text for seg in segments), segments=tuple(segments),
                                   unheard=self.unheard + dropped)


_FRAMES_PER_S = 100  # Whisper's log-mel hop is 10 ms
_WINDOW_FRAMES = 30 * _FRAMES_PER_S


@dataclass(frozen=True)
class Window:
    """How much of Whisper's 30 s window the encoder hears: the audio, pad_s of silence after it, at
    least min_s in all (whole seconds). The encoder's cost grows with its input."""

    pad_s: float
    min_s: float = 0.0

    def cuts(self, seconds: float) -> bool:
        """True when, for this much audio, the encoder hears less than Whisper's whole 30 s window."""
        return math.ceil(max(self.min_s, seconds + self.pad_s)) * _FRAMES_PER_S < _WINDOW_FRAMES


SHORT = Window(7.0, 10.0)
"""Enough silence after speech for Whisper to end its transcript there. On the dev corpus (63 clips,
beam 5) decodes 2-3x faster than the full window at the same or lower WER; a 2 s pad raised WER by a
sixth."""


def short_window(features: np.ndarray, window: Window = SHORT) -> np.ndarray:
    """Cut the zero padding faster-whisper put after the audio's log-mel frames down to the window."""
    columns = np.flatnonzero(np.any(features.reshape(-1, features.shape[-1]) != 0, axis=0))
    content = int(columns[-1]) + 1 if len(columns) else 0
    keep = max(round(window.min_s * _FRAMES_PER_S), content + round(window.pad_s * _FRAMES_PER_S), 1)
    keep = min(_WINDOW_FRAMES, -(-keep // _FRAMES_PER_S) * _FRAMES_PER_S)
    return np.ascontiguousarray(features[..., :keep])


class Preempted(Exception):
    """A decode given up at a safe point of the model (before or after the encoder, before word
    alignment): its caller stopped waiting for it, or a more urgent decode asked for the thread."""


def _go_on(stop: threading.Event | None) -> None:
    """Raise Preempted once `stop` is set: called between the model's steps, which cannot be stopped."""
    if stop is not None and stop.is_set():
        raise Preempted("given up for a more urgent decode")


def _missing_from_cache(exc: BaseException) -> bool:
    """True when a local_files_only load failed only because the model is not downloaded yet."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    return isinstance(exc, LocalEntryNotFoundError)


def _open_whisper(whisper_model: Any, ref: ModelRef, cfg: AsrConfig) -> Any:
    """The model asr.model names, loaded; a name is fetched only when the local hub cache lacks it."""
    kwargs = dict(device=cfg.device, compute_type=cfg.compute_type, cpu_threads=cfg.cpu_threads)
    if ref.fetch:
        try:
            return whisper_model(ref.target, local_files_only=True, **kwargs)
        except Exception as exc:
            if not _missing_from_cache(exc):  # a bad compute_type, no CUDA, a broken model: not the network
                raise ModelError(f"asr.model = {cfg.model!r}: cannot load it from the local cache: {exc}") from None
        try:
            return whisper_model(ref.target, **kwargs)
        except Exception as exc:
            raise ModelError(f"asr.model = {cfg.model!r}: cannot fetch this model ({type(exc).__name__}); "
                             "it needs internet once, or use bundled or a CTranslate2 model folder") from None
    target = ref.load_target()
    try:
        return whisper_model(target, **kwargs)
    except Exception as exc:
        raise ModelError(f"asr.model: cannot load {target!r}: {exc}") from None


# How many times likelier than the speaker's language a detected one must be to replace it. base
# named a Spanish clip Italian, Latin, Polish or Hindi in 12 of 50 (p 0.24-0.93), with Spanish 0.01-0.98
# times as likely; Spanish, French and Russian clips gave one another at most 0.0009 of the detected
# one's probability (but 0.32 for French on one Spanish clip): 20 keeps 10 of the 12 and lets every
# French and Russian clip change from Spanish (docs/benchmarks.md, "Languages in a session").
_SWITCH_ODDS = 20.0


def speakers_language(detected: str, p: float, probs: list[tuple[str, float]], likely: str) -> tuple[str, float]:
    """The language to decode in and its detection probability: the `detected` one, or `likely` (the
    speaker's) unless the detection made that _SWITCH_ODDS times less probable."""
    if likely and detected != likely:
        p_likely = dict(probs).get(likely, 0.0)
        if p_likely * _SWITCH_ODDS >= p:
            return likely, p_likely
    return detected, p


# Below this detection probability (faster-whisper's own language_detection_threshold) a final's
# language is checked by decoding (rivals). base named 13 of 50 Spanish prompts otherwise, 7 of them
# at p < 0.5; decoded in the rivals too, the Spanish decode was the likeliest for 5 of those 7, and
# one Spanish prompt detected right at 0.39 went to English: 37 -> 41 right. Of 189 English clips and
# passages none was detected at p < 0.5 (docs/benchmarks.md, twenty-sixth round).
_UNSURE = 0.5
_RIVALS = 3  # the likeliest languages whose decodes are compared, the detected one included
# A rival no more than this many times less probable than the detected language (_SWITCH_ODDS, taken
# as it was: measured with it, not fitted to the check; docs/benchmarks.md, twenty-sixth round).
_RIVAL_ODDS = _SWITCH_ODDS


def rivals(detected: str, p: float, probs: list[tuple[str, float]]) -> list[str]:
    """The languages to decode in as well when Whisper is unsure of `detected` (p < _UNSURE): those among
    the _RIVALS likeliest that are no more than _RIVAL_ODDS times less probable than it. With two
    languages named (asr.languages), one of them is always at 0.5 or more: there is no check."""
    if p >= _UNSURE:
        return []
    return [code for code, q in probs[:_RIVALS] if code != detected and q * _RIVAL_ODDS >= p]


def among(probs: list[tuple[str, float]], allowed: frozenset[str]) -> list[tuple[str, float]]:
    """A detection's language probabilities given that the speaker speaks one of `allowed` (asr.languages):
    the others dropped, the rest scaled to sum to 1, likeliest first."""
    kept = [(code, p) for code, p in probs if code in allowed]
    total = sum(p for _, p in kept)
    if total <= 0:  # none of them heard at all: each as likely, the restriction still holds
        return [(code, 1 / len(allowed)) for code in sorted(allowed)]
    return sorted(((code, p / total) for code, p in kept), key=lambda item: -item[1])


def _load_whisper(cfg: AsrConfig) -> Any:
    from faster_whisper import WhisperModel

    class ShortWindowModel(WhisperModel):
        window: Window | None = None
        """The window the next decodes encode, None for the full one (set per decode by WhisperDecoder)."""
        likely = ""
        """The speaker's language, which the next decodes' detection keeps unless it is far less probable."""
        allowed = cfg.candidate_languages
        """The languages detection may name (asr.languages); empty for any."""
        stop: threading.Event | None = None
        """Set when the running decode is to give up at the next safe point (Preempted)."""

        # The safe points: CTranslate2's encode, generate and align each run to their end once begun, so a
        # partial under way at a pause delayed the final by all of what it had left (up to 0.65 s here).
        def encode(self, features: np.ndarray) -> Any:
            _go_on(self.stop)
            encoded = super().encode(short_window(features, self.window) if self.window else features)
            _go_on(self.stop)
            return encoded

        def add_word_timestamps(self, *args: Any, **kwargs: Any) -> Any:
            _go_on(self.stop)
            return super().add_word_timestamps(*args, **kwargs)

        def detect_language(self, *args: Any, **kwargs: Any) -> tuple[str, float, list[tuple[str, float]]]:
            language, p, probs = super().detect_language(*args, **kwargs)
            if self.allowed:
                probs = among(probs, self.allowed)
                language, p = probs[0]
            return (*speakers_language(language, p, probs, self.likely), probs)

    WhisperModel = ShortWindowModel  # noqa: N806

    ref = resolve_model(cfg.model)
    model = _open_whisper(WhisperModel, ref, cfg)
    check_languages(cfg, ref.display, model.model.is_multilingual)
    return model


# Decoding settings measured on the dev corpus (63 WER-usable clips, beam 5, full window, this 2-core
# machine): faster-whisper's default ladder (0.0, 0.2, ..., 1.0) with no token limit gave WER 0.332
# and a slowest clip of 6.3 s (a loop decoded to 448 tokens at six temperatures); this shorter ladder
# and a token budget by audio length gave WER 0.330, slowest 2.2 s. A repetition penalty (1.1) looked
# better still on whole clips but, with context, penalises words the prompt or prefix already has: it
# cut "... ask what you can do for your country" short and invented text after repeated names.
# Live finals do without the fallback by default (asr.temperature_fallback); files keep it (see there).
_TEMPERATURES = (0.0, 0.4, 0.8)
_TOKENS_BASE, _TOKENS_PER_S = 16, 8  # fast speech is ~5 tokens a second, timestamps included
_MAX_LENGTH = 448  # Whisper's decoder context, prompt included
# Tokens a prompt and hotwords may each take of it, so a prefix (up to half) and the decode's own words
# always fit: 1000 characters of a Japanese prompt and of technical names as hotwords filled it, and
# every final failed ("the length of the prompt is 448 ... exceeds the max_length").
_CONTEXT_TOKENS = _MAX_LENGTH // 4


try:
    _glibc: Any = ctypes.CDLL("libc.so.6")
    _glibc.mallopt, _glibc.malloc_trim
except (OSError, AttributeError):  # another C library: its allocator is left as it is
    _glibc = None
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 8 << 20


def settle_allocator() -> None:
    """Keep the C heap from growing with every new decode size: blocks of 8 MiB or more (attention
    scores over a long window) are mapped and unmapped, not kept in glibc's arenas.

    glibc raises its mapping threshold each time such a block is freed, after which decodes of
    new lengths leave their buffers behind in CTranslate2's threads' arenas. 90 decodes of 0.5-20 s
    here: RSS 190 -> 336-371 MB as glibc has it; 164 -> 222 MB with this and release_memory(),
    CPU +5 % (a 1 MiB threshold cost +26 %).
    """
    if _glibc is not None:
        _glibc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def release_memory() -> None:
    """Hand the free pages of all of glibc's heaps back to the system (about 1 ms)."""
    if _glibc is not None:
        _glibc.malloc_trim(0)


def joined(texts: Iterable[str]) -> str:
    """Segment texts as one text: a space between two, none before one that goes on a word ("'m", ",")."""
    out = ""
    for text in texts:
        out += text if not out or text[0] in ".,!?;:'" else " " + text
    return out


def _heard(segments: list[Any], seconds: float, rules: TextRules) -> tuple[list[Segment], tuple[str, ...]]:
    """faster-whisper segments as Segments, less the words placed after the audio (rules.unheard)."""
    found = [Segment(float(seg.start), float(seg.end), seg.text.strip(), _words(seg.words or ()), seg.avg_logprob,
                     seg.no_speech_prob) for seg in segments]
    words = [w for seg in found for w in seg.words]
    drop = unheard(words, seconds, rules)
    if not drop:  # decodes without word times among them
        return found, ()
    return kept(found, len(words) - drop), tuple(w.word for w in words[len(words) - drop:])


def kept(segments: Iterable[Segment], n: int) -> list[Segment]:
    """The segments holding the first n of their words; a segment cut short says its own text through them."""
    out = []
    for seg in segments:
        if n <= 0:
            break
        if len(seg.words) <= n:
            out.append(seg)
        else:
            mine = seg.words[:n]
            text = _said_without(seg.text, seg.words, n, len(seg.words))
            out.append(dataclasses.replace(seg, end=mine[-1].end, text=text, words=mine))
        n -= len(seg.words)
    return out


_FOLD = str.maketrans("\u2018\u2019\u02bc\u201c\u201d", "\'\'\'\"\"")


def _fold(text: str) -> str:
    """The text as words are looked for in it: curly quotes straight, lower case (where that keeps its length)."""
    text = text.translate(_FOLD)
    lower = text.lower()
    return lower if len(lower) == len(text) else text


def _spaced(c: str) -> bool:
    """True for a letter or digit of a script that puts spaces between words (not CJK, kana, hangul)."""
    return c.isalnum() and ord(c) < 0x2E80


def _find_word(text: str, word: str, at: int) -> int:
    """Where `word` first stands alone in `text` from `at` on (not inside a longer word), else where it
    first is at all, or -1. Chinese and Japanese put no space between words: there every place stands alone."""
    if not word:
        return -1
    first = found = text.find(word, at)
    while found >= 0:
        end = found + len(word)
        if (found == 0 or not _spaced(text[found - 1]) or not _spaced(word[0])) and \
                (end == len(text) or not _spaced(text[end]) or not _spaced(word[-1])):
            return found
        found = text.find(word, found + 1)
    return first


def _said_without(text: str, words: Sequence[Word], lo: int, hi: int) -> str:
    """`text` less what it says of words[lo:hi], the punctuation on words[lo - 1] kept; the words left
    joined where the two words around the cut are not found in it, in order. An inference server's
    words carry no punctuation (OpenAI's), so a segment rebuilt from them lost every comma and full
    stop; and its words may differ from its text ("don't" for "don’t", "five dollars" for "$5", one
    left out or said twice), so a word not found is passed over."""
    folded = _fold(text)
    spans: list[tuple[int, int] | None] = []
    at = 0
    for w in words:
        word = _fold(w.word)
        found = _find_word(folded, word, at)
        if found < 0:
            spans.append(None)
            continue
        at = found + len(word)
        spans.append((found, at))
    first, last = (spans[lo - 1] if lo else (0, 0)), (spans[hi] if hi < len(words) else (len(text), len(text)))
    if first is None or last is None:
        return " ".join(w.word for w in (*words[:lo], *words[hi:]))
    before = ""
    if lo:
        end = first[1]
        while end < len(text) and not text[end].isspace() and not text[end].isalnum():
            end += 1
        before = text[:end].strip()
    after = text[last[0]:].strip()
    return f"{before} {after}".strip()


def _words(words: list[Any]) -> tuple[Word, ...]:
    """faster-whisper's words as Words, a piece that goes on the word before it joined to it.

    Whisper's word split starts a word at punctuation and puts "-" before what follows it, so
    "re-enter" comes as "re" and "-enter", "28.8" as "28" and ".8" (no space before the second); as
    separate words they became stable and were joined with a space: "re -enter", "28 .8".
    """
    out: list[Word] = []
    for w in words:
        word, start, end, p = w.word.strip(), float(w.start), float(w.end), float(w.probability)
        if out and word and not w.word[:1].isspace() and not word[0].isalnum():
            last = out.pop()
            word, start, p = last.word + word, last.start, min(last.p, p)
        out.append(Word(word, start, end, p))
    return tuple(out)


class WhisperDecoder:
    """Blocking decoder around a faster-whisper model; call only from the engine thread."""

    def __init__(self, cfg: AsrConfig, loader: Callable[[AsrConfig], Any] = _load_whisper) -> None:
        self._cfg = cfg
        self._loader = loader
        self._model: Any = None
        self.name = resolve_model(cfg.model).display
        self.rules = rules_for(self.name)
        """The text rules fitted to this model's family."""

    @property
    def multilingual(self) -> bool:
        """True when the loaded model hears every Whisper language (False before it is loaded)."""
        return self._model is not None and bool(self._model.model.is_multilingual)

    def load(self) -> None:
        """Load the model and run one decode so the first real one is not slow."""
        settle_allocator()
        self._model = self._loader(self._cfg)
        self.decode(np.zeros(SAMPLE_RATE, dtype=np.float32), beam_size=1, words=False, window=None)

    def decode(self, audio: np.ndarray, *, beam_size: int, words: bool, prompt: str | None = None,
               hotwords: str | None = None, prefix: str | None = None, fallback: bool = True,
               window: Window | None = SHORT, language: str = "", likely: str = "", verify: bool = False,
               stop: threading.Event | None = None) -> Transcript:
        """Transcribe float32 16 kHz audio, consuming faster-whisper's lazy generator here.

        `language` is the code to decode in; empty: asr.language (auto: detected from this audio, the
        `likely` one kept unless the detection makes it far less probable: speakers_language).
        `verify`: when the language is detected (transcribe task) with no `likely` one, a detection
        Whisper is unsure of is checked by decoding in its rivals too (rivals); the likeliest decode
        that has words is kept, with its language's detection probability.
        `prefix` is text the transcript must begin with (words already published as stable).
        `fallback` lets Whisper decode again at rising temperatures when a result looks like a loop
        or is improbable: better text on long audio, slower, and it samples (varies run to run).
        `window` is what the encoder hears of Whisper's 30 s window (None: all of it).
        Once `stop` is set, the decode raises Preempted at the model's next safe point.
        """
        _go_on(stop)
        started = time.monotonic()
        prompt, hotwords = self._fitted(prompt, keep_end=True), self._fitted(hotwords, keep_end=False)
        self._model.window, self._model.likely, self._model.stop = window, likely, stop
        once = functools.partial(self._once, audio, beam_size=beam_size, words=words, prompt=prompt,
                                 hotwords=hotwords, prefix=prefix, fallback=fallback)
        t, probs = once(language or (None if self._cfg.language == "auto" else self._cfg.language))
        if verify and probs and not likely and self._cfg.task == "transcribe":
            p = dict(probs)
            for rival in rivals(t.language, t.language_p, probs):
                other, _ = once(rival)
                # An empty decode's avg_logprob is 0: faster-whisper drops a pass it takes for no speech
                # (its no-speech probability is the same in every language), and nothing beats it.
                if t.segments and other.segments and other.avg_logprob > t.avg_logprob:
                    t = dataclasses.replace(other, language_p=p[rival])
        return dataclasses.replace(t, decode_seconds=time.monotonic() - started)

    def _once(self, audio: np.ndarray, language: str | None, *, beam_size: int, words: bool, prompt: str | None,
              hotwords: str | None, prefix: str | None, fallback: bool) -> tuple[Transcript, list[tuple[str, float]]]:
        """One transcription in `language` (None: detect it); with the detection's probabilities if it ran."""
        decoded = []
        logprob, ratio, no_speech = 0.0, 0.0, 0.0
        try:
            segments, info = self._model.transcribe(
                audio, language=language, task=self._cfg.task, beam_size=beam_size, word_timestamps=words,
                condition_on_previous_text=False, initial_prompt=prompt or None, hotwords=hotwords or None,
                prefix=prefix or None, temperature=_TEMPERATURES if fallback else 0.0, vad_filter=False,
                max_new_tokens=self._token_budget(len(audio) / SAMPLE_RATE, prompt, hotwords, prefix))
            for seg in segments:  # the generator does the decoding as it is consumed
                logprob = min(logprob, seg.avg_logprob)
                ratio = max(ratio, seg.compression_ratio)
                no_speech = max(no_speech, seg.no_speech_prob)
                if any(c.isalnum() for c in seg.text):  # with a prefix, tiny.en may end a segment at a lone "."
                    decoded.append(seg)
        finally:
            release_memory()
        found, unheard = _heard(decoded, len(audio) / SAMPLE_RATE, self.rules)
        t = Transcript(joined(s.text for s in found), tuple(found), info.language, logprob, ratio, no_speech,
                       len(audio) / SAMPLE_RATE, 0.0, unheard,
                       language_p=1.0 if language else info.language_probability)
        return t, ([] if language else list(info.all_language_probs or ()))

    def _fitted(self, text: str | None, keep_end: bool) -> str | None:
        """The text cut to _CONTEXT_TOKENS tokens: its end kept (a prompt: what was said last) or its
        start (hotwords: as listed), without the word or character the cut went through."""
        if not text:
            return text
        ids = self._model.hf_tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids
        if len(ids) <= _CONTEXT_TOKENS:
            return text
        cut = self._model.hf_tokenizer.decode(ids[-_CONTEXT_TOKENS:] if keep_end else ids[:_CONTEXT_TOKENS])
        cut = cut.replace("\ufffd", "").strip()  # a character whose bytes the cut split
        if " " in cut:
            cut = cut.split(" ", 1)[1] if keep_end else cut.rsplit(" ", 1)[0]
        return cut

    def _token_budget(self, seconds: float, prompt: str | None, hotwords: str | None, prefix: str | None) -> int:
        """New tokens a decode of this much audio may produce: enough for fast speech, not for a loop.

        Never more than the decoder context leaves after the prompt faster-whisper will build
        (each of its parts is cut to half the context there).
        """
        def count(text: str | None) -> int:
            ids = self._model.hf_tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids if text else ()
            return min(_MAX_LENGTH // 2 - 1, len(ids))

        used = 8 + count(prompt) + count(prefix) + (0 if prefix else count(hotwords))  # 8: special tokens
        return max(1, min(_TOKENS_BASE + round(_TOKENS_PER_S * seconds), _MAX_LENGTH - used))


@dataclass
class _Running:
    """The decode on the inference thread."""

    priority: int
    preemptible: bool
    stop: threading.Event


STALL_S = 60.0
"""Seconds no decode takes on a working machine, temperature fallbacks included: one running longer is
stuck (the watchdog says so); one running less is progress."""


class Engine:
    """Owns the one inference thread; every model call goes through it, never the event loop.

    Several pipelines share it (the microphone and WebSocket sessions): decodes take turns by
    priority, lowest first, in arrival order within one priority. A decode asked for as
    `preemptible` (a partial, a session's final) gives the thread up at the model's next safe point
    when an `urgent` one (a final) of a lower priority number asks for it, and any decode whose
    caller stops waiting gives it up too.
    """

    def __init__(self, decoder: WhisperDecoder, stall_s: float = STALL_S) -> None:
        self.decoder = decoder
        self._stall_s = stall_s
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="captiond-asr")
        self._waiting: list[tuple[int, int, bool, asyncio.Future[None]]] = []  # a heap; bool: urgent
        self._arrivals = itertools.count()
        self._busy = False
        self._running: _Running | None = None
        self.preempted = 0
        """Decodes given up for a more urgent one."""
        self.ended = 0
        """Decodes the thread has finished or given up since the start (a session waiting behind another's
        sees the model go on)."""
        self.busy_since: float | None = None
        """monotonic time the running decode began, None while no decode runs (the watchdog reads it)."""
        self.loaded = asyncio.Event()
        """Set once load() is done: what the model hears (multilingual) is known from then on."""

    def working(self, now: float) -> bool:
        """True while a decode runs that began less than stall_s before `now` (time.monotonic()): the
        model is slow, not stuck."""
        return self.busy_since is not None and now - self.busy_since <= self._stall_s

    @property
    def name(self) -> str:
        """Display name of the loaded model."""
        return self.decoder.name

    @property
    def rules(self) -> TextRules:
        """The text rules of the loaded model's family."""
        return self.decoder.rules

    @property
    def multilingual(self) -> bool:
        """True when the loaded model hears every Whisper language (False before it is loaded)."""
        return self.decoder.multilingual

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn(*args, **kwargs) on the inference thread and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: fn(*args, **kwargs))

    async def load(self) -> None:
        """Load and warm the model on the inference thread."""
        await self.run(self.decoder.load)
        self.loaded.set()

    async def decode(self, audio: np.ndarray, *, beam_size: int, words: bool, prompt: str | None = None,
                     hotwords: str | None = None, prefix: str | None = None, fallback: bool = True,
                     window: Window | None = SHORT, priority: int = 0, language: str = "",
                     likely: str = "", verify: bool = False, preemptible: bool = False,
                     urgent: bool | None = None) -> Transcript:
        """Decode on the inference thread once every decode of a lower priority number has had its turn;
        a `preemptible` one raises Preempted if an `urgent` one (by default: one that is not
        preemptible) of a lower priority number asks for the thread before it is done."""
        urgent = not preemptible if urgent is None else urgent
        await self._turn(priority, urgent)
        self.busy_since = time.monotonic()
        stop = threading.Event()
        self._running = _Running(priority, preemptible, stop)
        # One that asked while the turn was on its way here (it saw no decode running) is not kept waiting.
        if preemptible and any(u and rank < priority and not granted.done() for rank, _, u, granted in self._waiting):
            stop.set()
        running = asyncio.get_running_loop().run_in_executor(self._thread, lambda: self.decoder.decode(
            audio, beam_size=beam_size, words=words, prompt=prompt, hotwords=hotwords, prefix=prefix,
            fallback=fallback, window=window, language=language, likely=likely, verify=verify, stop=stop))
        try:
            result = await asyncio.shield(running)
        except asyncio.CancelledError:
            # Nobody waits for it any more: it gives up at the model's next safe point. The turn
            # passes (and the watchdog stops seeing a busy decoder) only when the thread is free.
            stop.set()
            running.add_done_callback(self._decode_done)
            raise
        except Preempted:
            self.preempted += 1
            self._decode_done(running)
            raise
        except BaseException:
            self._decode_done(running)
            raise
        self._decode_done(running)
        return result

    def _decode_done(self, running: asyncio.Future[Any]) -> None:
        if not running.cancelled():
            running.exception()  # retrieved: an abandoned decode's error was its caller's to see
        self.busy_since = None
        self._running = None
        self.ended += 1
        self._pass_turn()

    async def _turn(self, priority: int, urgent: bool) -> None:
        if not self._busy:
            self._busy = True
            return
        now = self._running
        if now is not None and now.preemptible and urgent and priority < now.priority:
            now.stop.set()  # a final stops a partial (or a session's final); a partial never stops another
        granted = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._arrivals), urgent, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._pass_turn()  # the turn arrived just as we were cancelled: hand it on
            raise

    def _pass_turn(self) -> None:
        while self._waiting:
            *_, granted = heapq.heappop(self._waiting)
            if not granted.done():
                granted.set_result(None)
                return
        self._busy = False

    def close(self) -> None:
        """Let the thread finish its current decode and exit."""
        self._thread.shutdown(wait=False, cancel_futures=True)
