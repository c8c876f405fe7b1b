"""The ASR worker: takes gate events off a bounded queue, schedules decodes on the engine (finals
first, partials when nothing waits, a final begun early at a pause) and publishes the events."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

import numpy as np

from .config import AsrConfig
from .engine import SHORT, Engine, Preempted, Transcript, Window
from .events import Error, Event, Final, SpeechEnd, SpeechStart
from .frames import FRAME_MS, SAMPLE_RATE
from .gate import GateEvent, UtteranceAudio, UtteranceEnd, UtterancePause, UtteranceStart
from .lognames import Named
from .rules import ends_sentence
from .streaming import UtteranceStream
from .tasks import spawn

log = logging.getLogger(__name__)

_RESUMED = SAMPLE_RATE // 2
_BEHIND_S = 1.0  # with this much speech waiting for the decoder, no final is begun early
# Nor one of more audio than Whisper's window: a second 30 s pass (60 s took 2.3-2.5 s here). Begun at
# every pause of a long utterance nobody watched partials of (nothing cuts its window), most were
# thrown away, and one under way held a stop's final past its drain.
_EARLY_FINAL_MAX = 30 * SAMPLE_RATE
_DETECT_S = 2.0  # audio Whisper's language detection needs before its answer may change the language
_SURE_LANGUAGE = 0.5  # detection probability from which a detected language is the speaker's

MIC, SESSION = 0, 1
"""Engine priorities of a worker's finals; its partials queue behind every final (priority + 2)."""


class FinalDecoder(Protocol):
    """What decodes a worker's finals: the Engine itself, or remote.RemoteFinals (a server, the
    Engine when it fails); called with Engine.decode's arguments."""

    async def decode(self, audio: np.ndarray, **kwargs: Any) -> Transcript: ...


@dataclass(frozen=True)
class _PartialDecode:
    """A partial's (or check's) decode under way while the worker takes more gate events."""

    stream: UtteranceStream
    covered: int
    """The utterance's samples it decodes."""
    check: bool
    holds: bool
    """Asked for again after the utterance's last one gave way: no early final stops it."""
    decode: asyncio.Task[Transcript | None]


@dataclass(frozen=True)
class _Speculation:
    """A final's decode begun at a pause, before the gate closed the utterance."""

    utt: int
    voiced_end: int
    audio_end: int
    whole: bool
    """It decodes the whole utterance (UtteranceStream.fits_whole), not the window."""
    decode: asyncio.Task[Transcript]


class GateQueue(asyncio.Queue):
    """The gate's events waiting for a worker: full at asr.queue_seconds of audio in them, or as many
    events as that is 30 ms frames. Counting events alone let a gate catching up, which hands over many
    frames in one event, queue twice the audio (a lag of 233 s at 120)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self._most_samples = round(seconds * SAMPLE_RATE)
        self._most_events = max(16, round(seconds * 1000 / FRAME_MS))
        self._samples = 0

    def full(self) -> bool:
        """True when no more may be put: as much audio or as many events as the bound."""
        return self._samples >= self._most_samples or self.qsize() >= self._most_events

    def _put(self, item: GateEvent | None) -> None:
        super()._put(item)
        self._samples += len(item.pcm) if isinstance(item, UtteranceAudio) else 0

    def _get(self) -> GateEvent | None:
        item = super()._get()
        self._samples -= len(item.pcm) if isinstance(item, UtteranceAudio) else 0
        return item


def gate_queue(cfg: AsrConfig) -> GateQueue:
    """The bounded queue between a gate and its worker, sized by asr.queue_seconds."""
    return GateQueue(cfg.queue_seconds)


class AsrWorker:
    """Async driver: takes gate events off a bounded queue, decodes on the engine thread, publishes events.

    Finals come first: a partial is begun only when the queue is empty, so a worker that falls
    behind skips partials (counted) and never a final, and one under way gives way to a final's
    decode (the engine stops it at the model's next safe point).
    """

    def __init__(self, engine: Engine, cfg: AsrConfig, queue: asyncio.Queue[GateEvent | None],
                 publish: Callable[[Event], None], clock: Callable[[], float] = time.monotonic,
                 priority: int = MIC, finals: FinalDecoder | None = None,
                 end_at_pause: Callable[[int, int], None] | None = None, bind: bool | None = None,
                 language: str = "", watched: Callable[[], bool] | None = None, name: str = "microphone") -> None:
        self._engine = engine
        # A session's utterance numbers overlap the microphone's: its log lines say whose they are.
        self._log = Named(log, name)
        self._language = language  # a Wyoming client names its language: never detected, never changed
        self._bind = bind  # None: asr.bind_finals decides; a client that streams stable words as settled needs True
        self._end_at_pause = end_at_pause  # GateStage.end_at_pause: a sentence ended at this pause
        self._finals = finals or engine
        # An utterance that begins while no subscriber would be sent its partials (each wants finals only,
        # or none is connected) gets none: they are most of the streaming's CPU. Decided once per utterance,
        # so none is half streamed, and a watcher who comes mid-utterance costs no catch-up decode of it all.
        self._watched = watched or (lambda: True)
        self._priority = priority
        self._cfg = cfg
        self.queue = queue
        self._publish = publish
        self._clock = clock
        self._stream: UtteranceStream | None = None
        self.queued_samples = 0
        """Audio waiting in the queue, in samples (put() adds, the worker subtracts)."""
        self.partials_skipped = 0
        """Partials not decoded because gate events waited (the worker was behind)."""
        self.partials_given_way = 0
        """Partial decodes given up for a final's (or, preempted, another more urgent decode)."""
        self._partial: _PartialDecode | None = None
        # The utterance whose last partial gave way: its next one holds, or with short pauses that speech
        # goes on after, each pause's early final stopped the check under way and was itself thrown
        # away (base: no partial for 11-14 s, a session's window never cut).
        self._yielded = -1
        # A pause that came while a partial that holds decoded: its early final waits for that partial.
        self._deferred: UtterancePause | None = None
        self.finals = 0
        self.rtf = 0.0
        """Decode seconds per audio second of recent finals (exponential average)."""
        self.prompt = cfg.initial_prompt
        """Context text given to the decoder before every utterance (names, jargon, spelling)."""
        self.hotwords = cfg.hotwords
        """Words the decoder should favour."""
        self.heard_language = ""
        """Under asr.language = auto, the language a final's or check's decode last detected surely (p >= 0.5
        on 2 s or more); decodes of less audio are made in it."""
        self._last_text = ""
        self._last_end = -(1 << 62)
        self._speculation: _Speculation | None = None
        # The utterance announced (speech_start) whose final has not been published, and its end once known.
        self._announced: UtteranceStream | None = None
        self._announced_end: UtteranceEnd | None = None
        self._stopping = False
        self._waiting = False
        self.speculations_used = 0
        """Finals whose decode began at a pause, before the gate closed the utterance."""
        self.speculations_wasted = 0
        """Such decodes thrown away because speech went on."""
        self.finals_bound = 0
        """Finals decoded a second time, made to begin with the stable words the first decode disagreed with."""
        self.finals_unbound = 0
        """Finals whose decode disagreed with the stable words and stood (flag unbound): stable words revised."""
        self._no_partials = 0  # an utterance nobody watched at its start, or whose partial decode raised
        self.decodes: Counter[str] = Counter()
        """Decodes finished, by kind: partial, check, speculation, final, "whole" ones of these two (of
        the whole utterance, not the window), bound (a final decoded again, made to begin with the
        stable words), retry (a looping final decoded again hearing Whisper's whole window)."""
        self.decode_seconds: Counter[str] = Counter()
        """Seconds the model spent on them, by kind."""

    def reconfigure(self, cfg: AsrConfig) -> None:
        """Use new beam sizes and partial interval from the next decode / utterance on."""
        self._cfg = cfg

    async def put(self, event: GateEvent | None) -> None:
        """Queue a gate event for the worker (None ends the stream), counting the audio that waits."""
        if isinstance(event, UtteranceAudio):
            self.queued_samples += len(event.pcm)
        await self.queue.put(event)

    @property
    def waiting(self) -> bool:
        """True while the worker waits for gate events with no partial of its own under way (a replay
        feeds it at the pace it takes them)."""
        return self._waiting and self._partial is None

    @property
    def idle(self) -> bool:
        """True once the worker has taken every gate event and finished every decode it began (a replay
        paces its feed by this, so the same decodes happen on any machine)."""
        return self.waiting and self.queue.empty() and not self.speculating

    @property
    def lag(self) -> float:
        """Seconds of speech audio waiting for the decoder."""
        return self.queued_samples / SAMPLE_RATE

    async def run(self) -> None:
        """Consume gate events until the None that marks the end of the stream."""
        try:
            await self._run()
        finally:
            self._drop_partial()
            if self._speculation is not None:  # stopping: not a decode wasted on speech that went on
                self._speculation.decode.cancel()
                self._speculation = None

    async def _run(self) -> None:
        get: asyncio.Task[GateEvent | None] | None = None
        try:
            while True:
                if get is None:
                    get = spawn(self.queue.get(), "asr-worker-queue")
                # A partial decodes while the worker takes more events: a pause or an end that comes
                # meanwhile starts the final's decode at once, and the engine has the partial give way.
                self._waiting = True
                await asyncio.wait([get] if self._partial is None else [get, self._partial.decode],
                                   return_when=asyncio.FIRST_COMPLETED)
                self._waiting = False
                if self._partial is not None and self._partial.decode.done():
                    self._took_partial(self._partial)
                    self._partial = None
                if get.done():
                    batch, get = [get.result()], None
                    while not self.queue.empty():
                        batch.append(self.queue.get_nowait())
                    for item in batch:
                        if item is None:
                            return
                        await self._handle(item)
                self._next_partial()
        finally:
            if get is not None:
                get.cancel()

    def _speculate(self, pause: UtterancePause) -> None:
        """Begin the final's decode at a pause, while the gate waits out the rest of its hangover: if the
        utterance does end there, the decode is already done or under way. Not when behind."""
        stream = self._stream
        whole = stream is not None and stream.fits_whole(pause.audio_end)
        if (self._cfg.early_final and stream is not None and stream.utt == pause.utt and self.lag < _BEHIND_S
                and stream.span(pause.audio_end, whole) <= _EARLY_FINAL_MAX):
            self._drop_partial()
            self._discard(self._speculation)
            decode = spawn(self._final_decode(stream, pause.audio_end, kind="speculation", whole=whole),
                           f"speculative-final-{pause.utt}")
            self._speculation = _Speculation(pause.utt, pause.voiced_end, pause.audio_end, whole, decode)
            decode.add_done_callback(functools.partial(self._sentence_ended, self._speculation))

    def _next_partial(self) -> None:
        """Begin the early final of a pause a partial that held was decoding through, if speech has not
        gone on; drop one begun at a pause if speech went on; begin a partial if one is due."""
        stream = self._stream
        if self._deferred is not None and self._partial is None:
            pause, self._deferred = self._deferred, None
            if stream is not None and stream.voiced_end <= pause.voiced_end:
                self._speculate(pause)
        spec = self._speculation
        # Speech went on after the pause (a voiced frame came) and half a second of audio has
        # followed: its decode is not the final. Silence alone never discards it, so a slow
        # decode still ends the utterance at a sentence end; discarding at the first voiced
        # frame let partials resume sooner and cost 17 words on tune (docs/benchmarks.md).
        if (spec is not None and stream is not None and stream.voiced_end > spec.voiced_end
                and stream.start + stream.samples > spec.audio_end + _RESUMED):
            self._discard(spec)
            self._speculation = None
        if (not self._cfg.partials or stream is None or self._partial is not None or not stream.partial_due()
                or self._speculation is not None or stream.utt == self._no_partials):
            return
        if not self.queue.empty():
            self.partials_skipped += 1
            return
        check, holds = stream.wants_check(), self._yielded == stream.utt
        # The window as it is now: the task begins only after the worker has taken more events.
        decode = spawn(self._partial_decode(stream, check, holds, stream.audio(), stream.prompt,
                                            stream.partial_prefix), f"partial-{stream.utt}")
        self._partial = _PartialDecode(stream, stream.samples, check, holds, decode)

    async def _partial_decode(self, stream: UtteranceStream, check: bool, holds: bool, audio: np.ndarray,
                              prompt: str, prefix: str) -> Transcript | None:
        """A partial's (or check's) decode of `audio`, the window; None if it gave way or failed.

        No temperature fallback for a partial: it would take seconds on hard audio, and the final
        follows anyway. A check is decoded at the final's beam and window; both are made to begin
        with the stable words (free checks left the window uncut when they disagreed with them: an
        e2e utterance of 19.5 s was never cut to 8 s)."""
        try:
            return await self._decode("check" if check else "partial", audio,
                                      beam_size=self._cfg.beam_size if check else self._cfg.partial_beam_size,
                                      words=True, prompt=prompt, prefix=prefix, fallback=False,
                                      priority=self._priority + 2, preemptible=not holds, urgent=False,
                                      window=self._final_window if check else Window(self._cfg.partial_pad_s))
        except Preempted:
            self._gave_way(stream, check)
        except Exception as exc:  # a decode that raises costs this utterance's partials, not the worker
            self._no_partials = stream.utt
            self._decode_failed(stream.utt, "check" if check else "partial", exc)
        return None

    def _gave_way(self, stream: UtteranceStream, check: bool) -> None:
        self.partials_given_way += 1
        self._yielded = stream.utt
        self._log.debug("utterance %d: a %s decode gave way to a more urgent one", stream.utt,
                        "check" if check else "partial")

    def _took_partial(self, partial: _PartialDecode) -> None:
        """Publish a partial whose decode is done, if its utterance is still open and no final's
        decode has begun (a partial's words must not change the window under one)."""
        if partial.decode.cancelled() or partial.stream is not self._stream or self._speculation is not None:
            return
        t = partial.decode.result()
        if t is None:
            return
        self._yielded = -1
        stream = partial.stream
        shown = stream.partial(t, partial.covered,
                               checked=partial.check or self._cfg.partial_beam_size >= self._cfg.beam_size)
        if shown.text:
            self._publish(shown)

    def _drop_partial(self) -> None:
        """A final's decode begins: the partial under way is of no more use (the engine stops it)."""
        partial, self._partial = self._partial, None
        if partial is not None and not partial.decode.done():
            partial.decode.cancel()
            self._gave_way(partial.stream, partial.check)

    async def _final_decode(self, stream: UtteranceStream, audio_end: int, bound: bool = False,
                            kind: str = "final", whole: bool = False, full: bool = False,
                            language: str = "", prompted: bool = True) -> Transcript:
        """The final's decode: free, as the naive decoder would hear the window (the `whole` utterance
        if asked); `bound` makes it begin with the stable words, for when the free one does not (a
        prefix that already holds all that was said makes tiny.en run on past the speech: "… or 8 to
        exit. Thank you very much for watching"). `full`: the encoder hears Whisper's whole window; not
        `prompted`: the decoder is told nothing came before (a retry's). `language`: the one the
        utterance's first final decode chose, for a bound or retried one.

        Once the daemon is stopping, greedy and without the fallback: the stop waits for this final
        only service.DRAIN_TIMEOUT_S, and an utterance nobody watched partials of is decoded whole
        (60 s of it took 2.3-2.5 s at beam 5 on two threads here, more on one or under load)."""
        audio, prompt = stream.whole(audio_end) if whole else (stream.audio(until=audio_end), stream.prompt)
        prompt = prompt if prompted else ""
        name = "retry" if full else "bound" if bound else f"whole {kind}" if whole else kind
        decode = functools.partial(
            self._decode, name, audio, beam_size=1 if self._stopping else self._cfg.beam_size, words=True,
            prompt=prompt, prefix=stream.prefix if bound else "", window=None if full else self._final_window,
            priority=self._priority, fallback=self._cfg.temperature_fallback and not self._stopping, on=self._finals,
            language=language)
        t = None
        if self._priority > MIC:
            # Each decode of a session's final gives way to the microphone's at the model's next safe
            # point, once: a Wyoming session's 58 s final held the microphone's for 4-6 s, past a stop's drain.
            try:
                t = await decode(preemptible=True, urgent=True)
            except Preempted:
                self._log.debug("utterance %d: its %s decode gave way to the microphone's final; begun again",
                                stream.utt, name)
        if t is None:
            t = await decode()
        if t.origin == "remote" and not t.text and (stream.stable or stream.words.pending or not stream.rev):
            # A server that hears nothing where the partials heard words, or where none was decoded (nobody
            # watched them, or the worker was behind), is checked here: an attack run's answered
            # {"text": ""} and blanked every final. It stays up (no backoff): one empty answer may be
            # right, and the next final asks it again.
            self._log.info("utterance %d: the server heard no words where the partials did or none was "
                           "decoded; this final is decoded here", stream.utt)
            t = replace(await decode(on=self._engine), origin="fallback")
        return t

    async def _retried(self, stream: UtteranceStream, end: UtteranceEnd, t: Transcript, *, bound: bool,
                       binds: bool) -> Transcript:
        """t, the decode of the window that is to be the final, or the same decode again with the
        encoder hearing Whisper's whole 30 s window when t, heard through the short one, loops and
        that one is trusted (has text Whisper does not doubt, and no loop to cut); if it loops too, once
        more without the prompt.

        The short window is not what Whisper was trained on, and loops came with it: "word word word
        word word" came out "word," seven times and was cut to one, "five five" seven times; heard
        whole, neither looped (docs/benchmarks.md). Only loops pay for the second decode, and not
        once the daemon is stopping (stop()): its wait for the last final is bounded."""
        window = self._final_window
        if (self._stopping or t.origin != "local" or window is None or not window.cuts(t.audio_seconds)
                or not stream.loops(t, end, binds)):
            return t
        # If it loops again: once more without the prompt (the words cut off the window, the earlier
        # finals), which a loop may be carried on from. Base looped both ways in a 31 s utterance's
        # window ("to a polite to a polite …"), and cutting the loop lost the 25 words after it.
        for prompted in (True, False) if stream.prompt else (True,):
            heard = "with the full window" if prompted else "without its prompt"
            try:
                again = await self._final_decode(stream, end.audio_end, bound=bound, full=True, language=t.language,
                                                 prompted=prompted)
            except Exception as exc:  # the looping decode is still a final: cut, it loses no utterance
                self._log.warning("utterance %d: the retry %s of a looping final failed (%r); its loop is cut",
                                  stream.utt, heard, exc)
                return t
            # Made to begin with the stable words, as t was (bound, or kept them under asr.bind_finals).
            taken = (stream.trusted(again, looped=stream.loops(again, end, binds))
                     and (bound or not binds or stream.keeps_stable(again)))
            self._log.debug("utterance %d: a looping final decoded %s: %r%s", stream.utt, heard, again.text,
                            "" if taken else ", not taken")
            if taken:
                return again
        return t

    def stop(self) -> None:
        """The daemon is stopping: finish what was heard without second decodes."""
        self._stopping = True

    def _sentence_ended(self, spec: _Speculation, decode: asyncio.Task[Transcript]) -> None:
        # Its words end a sentence: the gate may end the utterance after a shorter pause than its
        # hangover (the final is this decode, already done), unless speech comes first. Not when
        # Whisper doubts the decode: a loop's last full stop says nothing about the speech.
        stream = self._stream
        if (self._end_at_pause is None or self._speculation is not spec or stream is None or stream.utt != spec.utt
                or decode.cancelled() or decode.exception()):
            return
        t = decode.result()
        if ends_sentence(t.text, self._engine.rules) and stream.trusted(t):
            self._end_at_pause(spec.utt, spec.voiced_end)

    @property
    def speculating(self) -> bool:
        """True while a final's decode begun at a pause is under way."""
        return self._speculation is not None and not self._speculation.decode.done()

    def _failed_final(self, stream: UtteranceStream, end: UtteranceEnd) -> None:
        """The final of an utterance whose decode failed: empty, flagged error (and how it ended)."""
        self._announced = None
        flags = (*((end.reason,) if end.reason in ("max_length", "end_of_stream") else ()), "error")
        self._publish(Final(end.utt, stream.start / SAMPLE_RATE, end.end / SAMPLE_RATE, "", (), "",
                            max(0.0, self._clock() - end.voiced_captured), flags))

    def abandon(self, why: str) -> None:
        """The daemon stops without waiting for this worker any more (or it failed): the utterance it
        announced gets its speech_end (if it had none) and a final flagged error, so every speech_start
        still has one."""
        stream, end = self._announced, self._announced_end
        if stream is None:
            return
        if end is None or end.utt != stream.utt:
            end = UtteranceEnd(stream.utt, stream.voiced_end, stream.start + stream.samples, "end_of_stream",
                               self._clock())
            self._publish(SpeechEnd(end.utt, end.end / SAMPLE_RATE, end.reason))
        self._log.error("utterance %d: %s; its final is lost", end.utt, why)
        self._publish(Error("decode_failed", f"utterance {end.utt}: {why}; its final is lost"))
        self._failed_final(stream, end)

    def _decode_failed(self, utt: int, kind: str, exc: Exception) -> None:
        self._log.error("utterance %d: %s decode failed", utt, kind, exc_info=exc)
        after = ("its final is empty, flagged error" if kind == "final"
                 else "it gets no more partials; its final still comes")
        self._publish(Error("decode_failed", f"utterance {utt}: the {kind} decode failed ({exc!r}); {after}; the "
                                             "daemon goes on (its log has the traceback: please report it)"))

    def _discard(self, spec: _Speculation | None) -> None:
        if spec is not None:
            spec.decode.cancel()
            self.speculations_wasted += 1

    async def _decode(self, kind: str, audio: np.ndarray, *, beam_size: int, words: bool, prompt: str,
                      prefix: str, priority: int, fallback: bool, window: Window | None,
                      on: FinalDecoder | None = None, preemptible: bool = False,
                      urgent: bool | None = None, language: str = "") -> Transcript:
        """One decode; `language` is the one the utterance's first final decode chose, for its bound
        and retried decodes (under auto, so they need not detect, nor check an unsure detection again)."""
        asked = self._clock()
        seconds = len(audio) / SAMPLE_RATE
        # Under asr.language = auto, audio too short to tell a language by (a word, a name) is decoded
        # in the last one heard surely: a one-word utterance must not flip a speaker's language.
        detect = self._cfg.language == "auto" and not self._language
        turn = kind not in ("partial", "check")  # a decode of an utterance's end
        language = self._language or language or (self.heard_language if detect and seconds < _DETECT_S else "")
        # An established language is kept by detection unless it names another far likelier
        # (engine.speakers_language): base called 3-8 s Spanish prompts Italian, Latin or Polish.
        t = await (on or self._engine).decode(audio, beam_size=beam_size, words=words, prompt=prompt or None,
                                              hotwords=self.hotwords or None, prefix=prefix or None,
                                              fallback=fallback, window=window, priority=priority,
                                              language=language, likely=self.heard_language if detect else "",
                                              verify=turn and not self._stopping,  # the drain waits 5 s
                                              preemptible=preemptible, urgent=urgent)
        if detect and not language:
            self._log.debug("%s decode of %.1f s: in %s (p %.2f), the speaker's language %s", kind, seconds,
                            t.language, t.language_p, self.heard_language or "not known yet")
        # Only a decode of an utterance's end (a turn) may change the speaker's language: not a partial,
        # nor a check of a window cut mid-sentence (base: Spanish -> Italian, p 0.91, at 11 s into one).
        if detect and turn and not language and seconds >= _DETECT_S and t.language_p >= _SURE_LANGUAGE \
                and t.text:
            self.heard_language = t.language
        self.decodes[kind] += 1
        self.decode_seconds[kind] += t.decode_seconds
        # What a final's latency is made of: the wait for the model thread, then the decode itself.
        self._log.debug("%s decode of %.1f s (beam %d%s): waited %.2f s, took %.2f s", kind, t.audio_seconds,
                        beam_size, ", bound" if prefix else "", self._clock() - asked - t.decode_seconds,
                        t.decode_seconds)
        return t

    @property
    def binds(self) -> bool:
        """True when finals are made to begin with the stable words whatever their own decode heard."""
        return self._cfg.bind_finals if self._bind is None else self._bind

    @property
    def _final_window(self) -> Window | None:
        return SHORT if self._cfg.short_window else None

    async def _handle(self, item: GateEvent) -> None:
        if isinstance(item, UtteranceStart):
            # Carry the previous final over as context only across a short pause: conditioning on
            # old text across silence is how Whisper streamers repeat themselves.
            recent = item.start - self._last_end <= self._cfg.carry_over_s * SAMPLE_RATE
            context = " ".join(t for t in (self.prompt, self._last_text if recent else "") if t)
            self._drop_partial()  # the last utterance's, had its end been lost
            self._stream = UtteranceStream(item.utt, item.start, self._cfg.partial_interval_s, context,
                                           self._cfg.max_window_s, self._engine.rules, self._cfg.stable_after_s,
                                           self._cfg.stable_from_s, self._cfg.partial_share, self._cfg.first_partial_s,
                                           settles=self._cfg.task != "translate", logger=self._log)
            if not self._watched():
                self._no_partials = item.utt
            self._publish(SpeechStart(item.utt, item.start / SAMPLE_RATE))
            self._announced, self._announced_end = self._stream, None
        elif isinstance(item, UtteranceAudio):
            self.queued_samples -= len(item.pcm)
            if self._stream is not None and self._stream.utt == item.utt:
                self._stream.insert(item)
        elif isinstance(item, UtterancePause):
            if self._partial is not None and self._partial.holds:
                self._deferred = item  # its early final begins when that partial is done (_next_partial)
            else:
                self._speculate(item)
        elif isinstance(item, UtteranceEnd):
            stream, self._stream, self._deferred = self._stream, None, None
            self._drop_partial()
            if stream is None or stream.utt != item.utt:
                return
            self._publish(SpeechEnd(item.utt, item.end / SAMPLE_RATE, item.reason))
            self._announced_end = item
            spec, self._speculation = self._speculation, None
            try:
                if spec is not None and (spec.utt, spec.voiced_end) == (item.utt, item.end):
                    self.speculations_used += 1
                    self._log.debug("utterance %d ended at its pause; final decode %s", item.utt,
                                    "already done" if spec.decode.done() else "under way")
                    whole, t = spec.whole, await spec.decode
                else:
                    self._log.debug("utterance %d: final decoded at its end (speculation: %s)", item.utt,
                                    "none" if spec is None else "speech went on")
                    self._discard(spec)
                    whole = stream.fits_whole(item.audio_end)
                    t = await self._final_decode(stream, item.audio_end, whole=whole)
                binds, local, bound = self.binds, t.origin != "remote", False  # one setting for the whole final
                # Unbound, a local decode is the final even where it hears the stable words otherwise:
                # it heard more of the utterance than the checks that made them stable, and binding to
                # them made replay WER worse on every corpus (docs/benchmarks.md, seventh round). Not
                # a decode Whisper itself doubts: an empty one would drop every stable word.
                stands = not binds and stream.trusted(t)
                if whole and (stream.keeps_stable(t, whole=True) or (local and stands)):
                    stream.uncut()
                else:
                    if whole and not local:  # a server's cannot be bound: the window's free decode
                        t = await self._final_decode(stream, item.audio_end)
                        stands = not binds and stream.trusted(t)
                    # Bound to the stable words when the decode disagrees with one, and straight after a
                    # local whole decode that did: a free window decode first made the worst finals wait
                    # for three decodes of 15-20 s. A server's final stands, flagged unbound.
                    if t.origin != "remote" and not stands and ((whole and local) or not stream.keeps_stable(t)):
                        self.finals_bound += 1
                        t = await self._final_decode(stream, item.audio_end, bound=True, language=t.language)
                        bound = True
                # Now the decode that will be the final, of the window (all the utterance if uncut).
                t = await self._retried(stream, item, t, bound=bound, binds=binds)
            except Exception as exc:  # a decode that raises costs this one utterance, never the worker
                self._decode_failed(item.utt, "final", exc)
                self._failed_final(stream, item)
                return
            if t.audio_seconds > 0:
                ratio = t.decode_seconds / t.audio_seconds
                self.rtf = ratio if not self.finals else 0.8 * self.rtf + 0.2 * ratio
            self.finals += 1
            final = stream.final(t, item, max(0.0, self._clock() - item.voiced_captured), bind=binds)
            self.finals_unbound += "unbound" in final.flags
            if final.text and not {"possible_hallucination", "repetition"} & set(final.flags):
                self._last_text, self._last_end = final.text, item.end
            self._announced = None
            self._publish(final)
