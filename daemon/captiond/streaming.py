"""Per-utterance streaming policy (partials while speech goes on, one final at its end) and the ASR worker."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import AsrConfig
from .engine import SHORT, Engine, Transcript, Window
from .events import Error, Event, Final, Partial, SpeechEnd, SpeechStart, Word
from .frames import FRAME_MS, SAMPLE_RATE, int16_to_float
from .gate import GateEvent, UtteranceAudio, UtteranceEnd, UtterancePause, UtteranceStart
from .rules import PUNCTUATION, WHISPER, TextRules, bare, doubtful, guessed, loop, looping, tail_guesses

log = logging.getLogger(__name__)

_PROMPT_CHARS = 200
_PAUSING_MS = 90
_RESUMED = SAMPLE_RATE // 2  # audio past a pause's audio_end with no end of utterance: speech went on
_BEHIND_S = 1.0  # with this much speech waiting for the decoder, no final is begun early
_CHECK_EVERY = 2  # greedy partials between two decoded at the final's beam (the only ones that make words stable)

MIC, SESSION = 0, 1
"""Engine priorities of a worker's finals; its partials queue behind every final (priority + 2)."""


@dataclass(frozen=True)
class _Speculation:
    """A final's decode begun at a pause, before the gate closed the utterance."""

    utt: int
    voiced_end: int
    audio_end: int
    decode: asyncio.Task[Transcript]


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


def gate_queue(cfg: AsrConfig) -> asyncio.Queue[GateEvent | None]:
    """The bounded queue between a gate and its worker, sized by asr.queue_seconds of 30 ms frames."""
    return asyncio.Queue(maxsize=max(16, round(cfg.queue_seconds * 1000 / FRAME_MS)))


def _agreed(a: list[str], b: list[str]) -> int:
    """Length of the common prefix of two word lists, ignoring case and punctuation."""
    n = 0
    for x, y in zip(a, b):
        if bare(x) != bare(y):
            break
        n += 1
    return n


def _after(stable: str, text: str) -> str | None:
    """What `text` says after `stable` when it begins with it, comparing letters and digits only
    (case, spaces and punctuation aside); None when it does not begin with it.

    Character-wise, because a decode made to begin with the stable words may run on inside the last
    one: stable "... peppered flower", decode "... peppered, flower-fattened sauce".
    """
    key = [c.lower() for c in stable if c.isalnum()]
    i = j = 0
    while j < len(key) and i < len(text):
        if text[i].isalnum():
            if text[i].lower() != key[j]:
                return None
            j += 1
        i += 1
    if j < len(key):
        return None
    if stable and stable[-1] in PUNCTUATION:  # the stable word's punctuation stands: "aligner." then ", but" is " but"
        while i < len(text) and text[i] in PUNCTUATION:
            i += 1
    return text[i:]


def _letters(word: str) -> int:
    return sum(c.isalnum() for c in word)


class UtteranceStream:
    """The open utterance: its audio so far and the partials published for it.

    Stabilisation is LocalAgreement-2 over decodes of the utterance's window: a word becomes stable
    once two consecutive partials agree on it, it is not the newest word of the later one, and the
    later one heard at least a second of audio after it. Later decodes, the final's included, are
    made to begin with the stable words (the decoder's prefix), so a stable word is never retracted.

    The window is the whole utterance until it is longer than `max_window_s`; then the audio of
    stable words is cut off its front at a pause between two of them (a sentence end if there is
    one), and those words become the decoder's prompt instead. Cutting sooner cost accuracy on the
    dev corpus (whole-utterance decodes hear more), so short utterances are always decoded whole.
    """

    def __init__(self, utt: int, start: int, partial_interval_s: float, context: str = "",
                 max_window_s: float = 1e9, rules: TextRules = WHISPER, stable_after_s: float = 1.0) -> None:
        self.utt = utt
        self._settle_s = stable_after_s
        self._rules = rules
        self.start = start
        self._context = context
        self._chunks: list[np.ndarray] = []
        self._samples = 0
        self._interval = round(partial_interval_s * SAMPLE_RATE)
        self._max_window = round(max_window_s * SAMPLE_RATE)
        self._decoded_at = 0  # samples of audio the last partial covered
        self.rev = 0
        self.base = 0
        """Samples cut off the front of the utterance: decodes hear its audio from here on."""
        self._done: list[str] = []  # stable words whose audio was cut off
        self._done_words: list[Word] = []  # their timings, in seconds into the utterance
        self.committed: list[str] = []
        """Stable words still in the window: every later decode of this utterance begins with them."""
        self._pending: list[str] = []  # the last partial's words after the stable ones
        self._greedy_since_check = 0
        self._unvoiced_ms = 0

    @property
    def samples(self) -> int:
        """Samples of audio received so far."""
        return self._samples

    @property
    def stable(self) -> str:
        """All the stable words as text, those cut off the window included."""
        return " ".join(self._done + self.committed)

    @property
    def prefix(self) -> str:
        """The stable words in the window: the text every later decode must begin with.

        Without a sentence end after the last word: given "... aligner." tiny.en mostly stops
        there, and the words said after it were lost (in partials and the final alike).
        """
        return " ".join(self.committed).rstrip(".!?…")

    @property
    def prompt(self) -> str:
        """What the decoder is told came before the window: context, then the words cut off it."""
        return " ".join(t for t in (self._context, *self._done) if t)[-_PROMPT_CHARS:]

    def keeps_stable(self, t: Transcript) -> bool:
        """True when a decode begins with every stable word in the window (a final must)."""
        return _after(self.prefix, t.text) is not None

    def insert(self, audio: UtteranceAudio) -> None:
        """Append the next piece of the utterance's audio."""
        self._chunks.append(audio.pcm)
        self._samples += len(audio.pcm)
        self._unvoiced_ms = audio.unvoiced_ms

    def partial_due(self) -> bool:
        """True when enough new audio has come since the last partial, and speech is not pausing:
        a pause brings no new words, and a partial decode begun there would delay the final's."""
        return self._samples - self._decoded_at >= self._interval and self._unvoiced_ms < _PAUSING_MS

    def audio(self, until: int | None = None) -> np.ndarray:
        """The window's audio as float32, up to stream sample `until` when given."""
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        pcm = self._chunks[0] if self._chunks else np.zeros(0, dtype=np.int16)
        if until is not None:
            pcm = pcm[:max(0, until - self.start - self.base)]
        return int16_to_float(pcm)

    def wants_check(self) -> bool:
        """True when the next partial should be decoded as the final would be (its beam): there are
        words waiting to become stable, and _CHECK_EVERY greedy partials have come since the last check."""
        return bool(self._pending) and self._greedy_since_check >= _CHECK_EVERY

    def partial(self, t: Transcript, covered: int, checked: bool = True) -> Partial:
        """The partial event for a decode of the window up to the utterance's `covered` samples.

        Words become stable only on a `checked` decode (decoded as the final will be): a greedy
        decode's words bound the final to greedy mistakes ("How do you" where beam 5 hears "Had he").
        """
        self._decoded_at = covered
        self.rev += 1
        self._greedy_since_check = 0 if checked else self._greedy_since_check + 1
        # Punctuation alone is no word: greedy decodes can loop on " . . ." and must not make it stable.
        timed = [w for w in t.words if _letters(w.word)]
        said = [w.word for w in timed] if timed else [w for w in t.text.split() if _letters(w)]
        # Past the stable words by the same letter-wise rule as the final, so a word that ran on
        # ("flower" -> "flower-fattened") is neither dropped here nor doubled there.
        rest = _after(" ".join(self.committed), " ".join(said))
        # (a stable word's own punctuation, ". Forest" after stable "Montreal", is no word either)
        hypothesis = [w for w in rest.split() if _letters(w)] if rest is not None else said
        skip = len(said) - len(hypothesis)
        agreed = _agreed(self._pending, hypothesis[:-1]) if checked else 0
        if t.no_speech_prob > self._rules.max_no_speech:
            # Whisper doubts there is speech at all ("You" on a noise burst): show nothing new, and make
            # nothing stable, which would force it into the final past the no-speech check there.
            hypothesis, agreed = [], 0
        elif t.avg_logprob < self._rules.min_logprob:
            # Whisper's own doubt: a guess made twice is still a guess (greedy partials said "I'm …"
            # or "I don't know" to breaths, p ~0.1), and once stable it is forced into the final.
            agreed = 0
        if timed:  # and only words the decoder heard at least stable_after_s of audio after
            settled = (covered - self.base) / SAMPLE_RATE - self._settle_s
            agreed = min(agreed, sum(1 for _ in itertools.takewhile(lambda w: w.end <= settled, timed[skip:])))
        self.committed += hypothesis[:agreed]
        self._pending = hypothesis[agreed:]
        if covered - self.base > self._max_window:
            if self.committed and timed and rest is not None and checked:
                # Cut where a check places the words: a greedy partial's word times can be off by a
                # word, and a cut there lost the audio of words not yet stable ("dial 500 to attempt
                # an [... 20 words ...] internet" with greedy partials on a 2 s pad).
                self._trim(timed)
            elif not self.committed and t.no_speech_prob > self._rules.max_no_speech:
                # Noise the gate let through (music, a long rumble) with nothing stable to cut at: what
                # Whisper hears no speech in is not kept past the window, or decodes would grow to the
                # gate's 60 s limit. Half a window stays, so speech just beginning is not cut into.
                self._cut(covered - self.base - self._max_window // 2)
                log.debug("utterance %d: no speech heard in the window; it now begins at %.1f s",
                          self.utt, self.base / SAMPLE_RATE)
        unstable = " ".join(self._pending)
        return Partial(self.utt, self.rev, self.start / SAMPLE_RATE, (self.start + covered) / SAMPLE_RATE,
                       stable=self.stable, unstable=unstable, text=" ".join(self._done + self.committed + self._pending))

    def _trim(self, timed: list[Word]) -> None:
        """Cut the audio of stable words off the window's front between two of them (at the sentence
        end with the widest pause after it, else at the widest pause); the words go to the prompt."""
        ends = list(itertools.accumulate(_letters(w) for w in self.committed))  # letters up to each stable word
        cuts = []  # (sentence end, pause, window words before the cut, stable words before it)
        letters = 0
        for i, (word, after) in enumerate(zip(timed, timed[1:])):
            letters += _letters(word.word)
            if letters in ends:  # else not between two stable words (Whisper may split words differently)
                n = len(ends) - ends[::-1].index(letters)
                cuts.append((word.word.endswith((".", "?", "!")), after.start - word.end, i + 1, n))
        if not cuts:
            return
        _, _, k, n = max(cuts)
        offset = self.base / SAMPLE_RATE
        cut = round((timed[k - 1].end + timed[k].start) / 2 * SAMPLE_RATE)
        self._done += self.committed[:n]
        self._done_words += [Word(w.word, w.start + offset, w.end + offset, w.p) for w in timed[:k]]
        self.committed = self.committed[n:]
        self._cut(cut)
        log.debug("utterance %d: %.1f s of audio (%d stable words) cut off the window, which now begins at %.1f s",
                  self.utt, cut / SAMPLE_RATE, n, self.base / SAMPLE_RATE)

    def _cut(self, samples: int) -> None:
        self.base += samples
        self._chunks = [np.concatenate(self._chunks)[samples:]]

    def final(self, t: Transcript, end: UtteranceEnd, latency: float) -> Final:
        """The final event for the decode of the window, less what the text rules cut (rules.py)."""
        rules = self._rules
        flags = []
        if not t.text:
            flags.append("empty")
        elif doubtful(t.avg_logprob, t.compression_ratio, t.no_speech_prob, rules):
            flags.append("possible_hallucination")
        # Stable words are never cut: they end asr.stable_after_s or more before the voiced end.
        n = len(t.words)
        cut = t.without(n - tail_guesses(t.words, (end.end - self.start - self.base) / SAMPLE_RATE, rules), n)
        looped = loop([w.word for w in cut.words], rules)
        if looped and looped[0] < len(self.committed):
            looped = None
        if looped or looping([*t.text.split(), *t.unheard], rules):
            flags.append("repetition")
        if end.reason != "silence":
            flags.append(end.reason)
        t = cut.without(*looped) if looped else cut
        if t.unheard:
            log.debug("utterance %d: left out %r (after the audio, a tail or a loop)", self.utt, " ".join(t.unheard))
        offset = self.start / SAMPLE_RATE
        base = self.base / SAMPLE_RATE
        words = tuple(Word(w.word, round(w.start + offset, 3), round(w.end + offset, 3), round(w.p, 3))
                      for w in (*self._done_words, *(Word(w.word, w.start + base, w.end + base, w.p) for w in t.words)))
        if not self.stable and guessed(words, t.no_speech_prob, "repetition" in flags, rules):
            log.info("utterance %d: withheld %r (word p %s, no-speech p %.2f, avg log-p %.2f)", self.utt, t.text,
                     [round(w.p, 3) for w in words], t.no_speech_prob, t.avg_logprob)
            return Final(self.utt, offset, end.end / SAMPLE_RATE, "", (), t.language, latency, (*flags, "withheld"))
        committed = " ".join(self.committed)
        rest = _after(committed, t.text)
        said = (committed + rest).strip() if rest is not None else " ".join(self.committed + t.text.split())
        text = " ".join([*self._done, said]).strip()
        return Final(self.utt, offset, end.end / SAMPLE_RATE, text, words, t.language, latency, tuple(flags))


class AsrWorker:
    """Async driver: takes gate events off a bounded queue, decodes on the engine thread, publishes events.

    Finals come first: a partial is decoded only when the queue is empty, so a worker that
    falls behind skips partials (counted) and never a final.
    """

    def __init__(self, engine: Engine, cfg: AsrConfig, queue: asyncio.Queue[GateEvent | None],
                 publish: Callable[[Event], None], clock: Callable[[], float] = time.monotonic,
                 priority: int = MIC) -> None:
        self._engine = engine
        self._priority = priority
        self._cfg = cfg
        self.queue = queue
        self._publish = publish
        self._clock = clock
        self._stream: UtteranceStream | None = None
        self.queued_samples = 0
        """Audio waiting in the queue, in samples (put() adds, the worker subtracts)."""
        self.partials_skipped = 0
        self.finals = 0
        self.rtf = 0.0
        """Decode seconds per audio second of recent finals (exponential average)."""
        self.prompt = cfg.initial_prompt
        """Context text given to the decoder before every utterance (names, jargon, spelling)."""
        self.hotwords = cfg.hotwords
        """Words the decoder should favour."""
        self._last_text = ""
        self._last_end = -(1 << 62)
        self._speculation: _Speculation | None = None
        self.waiting = False
        """True while the worker waits for gate events (a replay feeds it at the pace it takes them)."""
        self.speculations_used = 0
        """Finals whose decode began at a pause, before the gate closed the utterance."""
        self.speculations_wasted = 0
        """Such decodes thrown away because speech went on."""
        self.finals_bound = 0
        """Finals decoded a second time, made to begin with the stable words the first decode disagreed with."""
        self._partials_failed = 0  # the utterance whose partial decode raised: no more partials for it

    def reconfigure(self, cfg: AsrConfig) -> None:
        """Use new beam sizes and partial interval from the next decode / utterance on."""
        self._cfg = cfg

    async def put(self, event: GateEvent | None) -> None:
        """Queue a gate event for the worker (None ends the stream), counting the audio that waits."""
        if isinstance(event, UtteranceAudio):
            self.queued_samples += len(event.pcm)
        await self.queue.put(event)

    @property
    def lag(self) -> float:
        """Seconds of speech audio waiting for the decoder."""
        return self.queued_samples / SAMPLE_RATE

    async def run(self) -> None:
        """Consume gate events until the None that marks the end of the stream."""
        try:
            await self._run()
        finally:
            if self._speculation is not None:  # stopping: not a decode wasted on speech that went on
                self._speculation.decode.cancel()
                self._speculation = None

    async def _run(self) -> None:
        while True:
            self.waiting = True
            batch = [await self.queue.get()]
            self.waiting = False
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            for item in batch:
                if item is None:
                    return
                await self._handle(item)
            stream = self._stream
            spec = self._speculation
            if spec is not None and stream is not None and stream.start + stream.samples > spec.audio_end + _RESUMED:
                self._discard(spec)  # speech went on after the pause; its decode is not the final
                self._speculation = None
            if (stream is not None and stream.partial_due() and self._speculation is None
                    and stream.utt != self._partials_failed):
                if self.queue.empty():
                    covered = stream.samples
                    check = stream.wants_check()
                    # No temperature fallback for a partial: it would take seconds on hard audio, and
                    # the final follows anyway. A check is decoded as the final will be; a greedy
                    # partial only shows what is heard.
                    try:
                        t = await self._decode(stream.audio(), beam_size=self._cfg.beam_size if check
                                               else self._cfg.partial_beam_size, words=True, prompt=stream.prompt,
                                               prefix=stream.prefix, fallback=False, priority=self._priority + 2,
                                               window=self._final_window if check else Window(self._cfg.partial_pad_s))
                    except Exception as exc:  # a decode that raises costs this utterance's partials, not the worker
                        self._partials_failed = stream.utt
                        self._decode_failed(stream.utt, "partial", exc)
                        continue
                    partial = stream.partial(t, covered, checked=check or self._cfg.partial_beam_size >= self._cfg.beam_size)
                    if partial.text:
                        self._publish(partial)
                else:
                    self.partials_skipped += 1

    async def _final_decode(self, stream: UtteranceStream, audio_end: int, bound: bool = False) -> Transcript:
        """The final's decode: free, as the naive decoder would hear the window; `bound` makes it begin
        with the stable words, for when the free one does not (a prefix that already holds all that was
        said makes tiny.en run on past the speech: "… or 8 to exit. Thank you very much for watching")."""
        return await self._decode(stream.audio(until=audio_end), beam_size=self._cfg.beam_size, words=True,
                                  prompt=stream.prompt, prefix=stream.prefix if bound else "",
                                  window=self._final_window, priority=self._priority,
                                  fallback=self._cfg.temperature_fallback)

    def _decode_failed(self, utt: int, kind: str, exc: Exception) -> None:
        log.error("utterance %d: %s decode failed", utt, kind, exc_info=exc)
        self._publish(Error("decode_failed", f"utterance {utt}: the {kind} decode failed ({exc!r}); "
                                             "the daemon goes on with the next utterance"))

    def _discard(self, spec: _Speculation | None) -> None:
        if spec is not None:
            spec.decode.cancel()
            self.speculations_wasted += 1

    async def _decode(self, audio: np.ndarray, *, beam_size: int, words: bool, prompt: str, prefix: str,
                      priority: int, fallback: bool, window: Window | None) -> Transcript:
        return await self._engine.decode(audio, beam_size=beam_size, words=words, prompt=prompt or None,
                                         hotwords=self.hotwords or None, prefix=prefix or None,
                                         fallback=fallback, window=window, priority=priority)

    @property
    def _final_window(self) -> Window | None:
        return SHORT if self._cfg.short_window else None

    async def _handle(self, item: GateEvent) -> None:
        if isinstance(item, UtteranceStart):
            # Carry the previous final over as context only across a short pause: conditioning on
            # old text across silence is how Whisper streamers repeat themselves.
            recent = item.start - self._last_end <= self._cfg.carry_over_s * SAMPLE_RATE
            context = " ".join(t for t in (self.prompt, self._last_text if recent else "") if t)
            self._stream = UtteranceStream(item.utt, item.start, self._cfg.partial_interval_s, context,
                                           self._cfg.max_window_s, self._engine.rules, self._cfg.stable_after_s)
            self._publish(SpeechStart(item.utt, item.start / SAMPLE_RATE))
        elif isinstance(item, UtteranceAudio):
            self.queued_samples -= len(item.pcm)
            if self._stream is not None and self._stream.utt == item.utt:
                self._stream.insert(item)
        elif isinstance(item, UtterancePause):
            # Start the final's decode while the gate waits out the rest of its hangover; if the
            # utterance does end here the decode is already done or under way. Not when behind.
            stream = self._stream
            if self._cfg.early_final and stream is not None and stream.utt == item.utt and self.lag < _BEHIND_S:
                self._discard(self._speculation)
                decode = asyncio.get_running_loop().create_task(self._final_decode(stream, item.audio_end),
                                                                name=f"speculative-final-{item.utt}")
                decode.add_done_callback(_log_failure)
                self._speculation = _Speculation(item.utt, item.voiced_end, item.audio_end, decode)
        elif isinstance(item, UtteranceEnd):
            stream, self._stream = self._stream, None
            if stream is None or stream.utt != item.utt:
                return
            self._publish(SpeechEnd(item.utt, item.end / SAMPLE_RATE))
            spec, self._speculation = self._speculation, None
            try:
                if spec is not None and (spec.utt, spec.voiced_end) == (item.utt, item.end):
                    self.speculations_used += 1
                    log.debug("utterance %d ended at its pause; final decode %s", item.utt,
                              "already done" if spec.decode.done() else "under way")
                    t = await spec.decode
                else:
                    log.debug("utterance %d: final decoded at its end (speculation: %s)", item.utt,
                              "none" if spec is None else "speech went on")
                    self._discard(spec)
                    t = await self._final_decode(stream, item.audio_end)
                if not stream.keeps_stable(t):  # the free decode disagrees with a stable word
                    self.finals_bound += 1
                    t = await self._final_decode(stream, item.audio_end, bound=True)
            except Exception as exc:  # a decode that raises costs this one utterance, never the worker
                self._decode_failed(item.utt, "final", exc)
                self._publish(Final(item.utt, stream.start / SAMPLE_RATE, item.end / SAMPLE_RATE, "", (), "",
                                    max(0.0, self._clock() - item.voiced_captured), ("error",)))
                return
            if t.audio_seconds > 0:
                ratio = t.decode_seconds / t.audio_seconds
                self.rtf = ratio if not self.finals else 0.8 * self.rtf + 0.2 * ratio
            self.finals += 1
            final = stream.final(t, item, max(0.0, self._clock() - item.voiced_captured))
            if final.text and not {"possible_hallucination", "repetition"} & set(final.flags):
                self._last_text, self._last_end = final.text, item.end
            self._publish(final)
