"""Opt-in Wyoming speech-to-text server (Home Assistant, voice satellites): each transcription is a
LiveSession on the shared engine, streamed back as transcript-chunk events of settled text only."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import concurrent.futures
import dataclasses
import errno
import json
import logging
import time
from typing import Any, Awaitable, Callable

import numpy as np
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.error import Error as WyError
from wyoming.event import Event as WyEvent
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncServer, AsyncUnixServer
from wyoming.vad import VoiceStarted, VoiceStopped

from . import __version__
from .config import AsrConfig, WyomingConfig
from .events import MAX_CONTEXT, Error, Event, Final, Partial, SpeechEnd, SpeechStart, text_problem
from .frames import SAMPLE_RATE
from .lognames import Named, shown
from .server import ServerError, check_socket_path
from .session import MAX_RATE, MIN_RATE, AudioError, LiveSession
from .tasks import spawn, within

log = logging.getLogger(__name__)

_CLOSE_S = 10.0  # after audio-stop, a session that decodes nothing for this long loses what it has left
_MAX_CHANNELS = 8
_NOTICES = 64  # voice and error events not yet written; a client that never reads loses the oldest
_MAX_DATA = 64 * 1024  # JSON data an event may carry after its header, in bytes
_MAX_PAYLOAD = 1 << 20  # payload an event may carry (an audio chunk), in bytes: 32 s of 16 kHz mono s16le
_LINGER_BYTES = 64 << 20  # what a client may still send after a bad event, read and dropped before the close
_LINGER_S = 2.0  # and for how long, in seconds
_STOP_TELL_S = 1.0  # what telling the open transcriptions of a stop may take

NewSession = Callable[..., LiveSession]


class WyomingError(ServerError):
    """The Wyoming server cannot start; the message says why and what to do."""


class BadEvent(ValueError):
    """A client sent bytes that are not a Wyoming event the server takes; the message says what."""


def _length(header: dict, key: str, most: int) -> int:
    value = header.get(key) or 0
    if type(value) is not int or not 0 <= value <= most:
        raise BadEvent(f"{key} {value!r:.40} is not a length of 0-{most} bytes")
    return value


async def read_event(reader: asyncio.StreamReader) -> WyEvent | None:
    """The client's next event, None once it closed the stream; BadEvent for a header that is not
    JSON or announces more data or payload than an event may carry (the wyoming package's reader
    reads whatever length a client names)."""
    try:
        line = await reader.readline()
    except ValueError:  # the stream's limit (64 KiB) reached before a newline
        raise BadEvent("an event header longer than 64 KiB") from None
    if not line:
        return None
    try:
        header = json.loads(line)
    except (ValueError, RecursionError):
        raise BadEvent("an event header that is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str) \
            or not isinstance(header.get("data") or {}, dict):
        raise BadEvent('an event header that is not {"type": "...", "data": {...}}')
    data, data_length = header.get("data") or {}, _length(header, "data_length", _MAX_DATA)
    payload_length = _length(header, "payload_length", _MAX_PAYLOAD)
    if data_length:
        try:
            more = json.loads(await reader.readexactly(data_length))
        except (ValueError, RecursionError):
            raise BadEvent("event data that is not JSON") from None
        if not isinstance(more, dict):
            raise BadEvent("event data that is not a JSON object")
        data = {**data, **more}
    payload = await reader.readexactly(payload_length) if payload_length else None
    return WyEvent(type=header["type"], data=data, payload=payload)


def _audio(event: WyEvent, kind: type[AudioStart] | type[AudioChunk]) -> Any:
    """The audio-start or audio-chunk, its format checked: whole numbers (the wyoming package takes any value)."""
    try:
        audio = kind.from_event(event)
    except KeyError as exc:
        raise BadEvent(f"{event.type} without {exc}") from None
    for name in ("rate", "width", "channels"):
        if type(getattr(audio, name)) is not int:
            raise BadEvent(f"{event.type} {name} {getattr(audio, name)!r:.40} is not a whole number")
    return audio


def _transcribe(event: WyEvent) -> Transcribe:
    """The transcribe request, its fields checked (the wyoming package takes any JSON value for them)."""
    transcribe = Transcribe.from_event(event)
    for name, value, kind in (("language", transcribe.language, str), ("context", transcribe.context, dict),
                              ("transcript_names", transcribe.transcript_names, list),
                              ("transcript_terms", transcribe.transcript_terms, list)):
        if value is not None and not isinstance(value, kind):
            raise BadEvent(f"transcribe {name} {value!r:.40} is not a {kind.__name__}")
    return transcribe


def _languages(cfg: AsrConfig, multilingual: bool) -> list[str]:
    """What the loaded model transcribes: the configured language, or under auto the languages
    asr.languages names, else every Whisper language a multilingual model hears."""
    if cfg.language != "auto":
        return [cfg.language]
    if not multilingual:
        return ["en"]
    if cfg.candidate_languages:
        return sorted(cfg.candidate_languages)
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return list(_LANGUAGE_CODES)


def wanted_language(transcribe: Transcribe) -> str:
    """The Whisper code of the language a transcribe event asks for ("es-ES" -> "es"); empty for none."""
    return (transcribe.language or "").split("-")[0].split("_")[0].lower()


def info(cfg: AsrConfig, model: str, multilingual: bool) -> Info:
    """The answer to describe: one ASR program (captiond) with the daemon's model."""
    return Info(asr=[AsrProgram(
        name="captiond", description="captiond: streaming faster-whisper with partials and a speech gate",
        attribution=Attribution(name="captiond", url=""), installed=True, version=__version__,
        models=[AsrModel(name=model, description=f"Whisper {model}",
                         attribution=Attribution(name="OpenAI", url="https://github.com/openai/whisper"),
                         installed=True, version=None, languages=_languages(cfg, multilingual))],
        supports_transcript_streaming=True)])


def _join(a: str, b: str) -> str:
    return f"{a} {b}" if a and b else a or b


class _Transcription:
    """One transcribe … audio-stop: the LiveSession, and what of its text the client has been sent.

    Chunks carry only text the session will not take back: the finals so far, then the stable words
    of the open utterance (every later decode of it, its final's included, is made to begin with
    them). So the chunks, joined, are always a prefix of the final transcript, and equal it at the end.
    """

    def __init__(self, handler: _Handler, vad: bool, language: str | None) -> None:
        self._handler = handler
        self._vad = vad
        self.session: LiveSession | None = None
        self.converter = AudioChunkConverter(width=2)
        self.format: tuple[int, int, int] = (0, 0, 0)
        self.finals = ""
        """The finals' text so far, space-separated: the transcript."""
        self.settled = ""
        """finals, then the open utterance's stable words: what may be sent as chunks."""
        self.sent = ""
        self.language = language
        self.notices: collections.deque[WyEvent] = collections.deque(maxlen=_NOTICES)
        """voice-started / voice-stopped and error events not yet written."""
        self.failed = False
        """Set when the audio cannot be used; the rest of the stream is ignored until audio-stop."""
        self.seconds = 0.0
        """Audio the client has sent, in seconds."""
        self.opened = time.monotonic()
        """When audio-start came (time.monotonic(), seconds)."""
        self._wake = asyncio.Event()
        self._ended = False
        self._emitter: asyncio.Task | None = None

    def start_emitter(self, name: str) -> None:
        """Start the task that writes the session's events to the client as they come."""
        self._emitter = spawn(self._emit(), name)

    def on_event(self, event: Event) -> None:
        """The session's events (from its worker): keep the settled text, queue voice events, wake the emitter."""
        if isinstance(event, Partial):
            candidate = _join(self.finals, event.stable)
            if candidate.startswith(self.settled):
                self.settled = candidate
        elif isinstance(event, Final):
            self.language = event.language or self.language
            if event.text:
                self.finals = _join(self.finals, event.text)
                if not self.finals.startswith(self.sent):
                    self._handler.logger.warning("a final does not begin with the text already streamed (%r); "
                                                 "the transcript carries the final", self.sent[-80:])
            self.settled = self.finals
        elif isinstance(event, SpeechStart) and self._vad:
            self.notices.append(VoiceStarted(timestamp=round(event.start * 1000)).event())
        elif isinstance(event, SpeechEnd) and self._vad:
            self.notices.append(VoiceStopped(timestamp=round(event.end * 1000)).event())
        elif isinstance(event, Error):
            self._handler.logger.warning("%s: %s", event.code, event.message)
            self.notices.append(WyError(text=event.message, code=event.code).event())
        self._wake.set()

    async def finish(self) -> None:
        """After the session's last final: the last chunk, the transcript and transcript-stop."""
        self._ended = True
        self._wake.set()
        if self._emitter is not None:
            await self._emitter

    def cancel(self) -> None:
        """The client is gone or the server stops: end at once."""
        if self.session is not None:
            self.session.cancel()
        if self._emitter is not None:
            self._emitter.cancel()

    async def tell(self, event: WyEvent) -> None:
        """Write one event to the client now, the emitter cancelled; a client gone is no error."""
        with contextlib.suppress(OSError):
            await self._handler.write_event(event)

    async def _emit(self) -> None:
        try:
            await self._emit_events()
        except ConnectionError as exc:  # the client went: nothing it sent need be decoded any more
            self._handler.logger.info("cannot write to the client: %r", exc)
            if self.session is not None:
                self.session.cancel()

    async def _emit_events(self) -> None:
        write = self._handler.write_event
        started = False
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.notices:
                await write(self.notices.popleft())
            if self.settled.startswith(self.sent) and len(self.settled) > len(self.sent):
                if not started:
                    await write(TranscriptStart(language=self.language).event())
                    started = True
                chunk, self.sent = self.settled[len(self.sent):], self.settled
                await write(TranscriptChunk(text=chunk).event())
            if self._ended:
                if not started:
                    await write(TranscriptStart(language=self.language).event())
                await write(Transcript(text=self.finals, language=self.language).event())
                await write(TranscriptStop().event())
                return


class _Handler(AsyncEventHandler):
    """One client connection; transcriptions on it run one after another."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: WyomingServer) -> None:
        super().__init__(reader, writer)
        self._server = server
        self._peer = str(writer.get_extra_info("peername") or "unix socket")
        self.logger = Named(log, f"wyoming connection from {self._peer}")
        """The server's logger, its lines naming this client."""
        self._write_lock = asyncio.Lock()
        self._transcribe: Transcribe | None = None
        self._current: _Transcription | None = None

    async def write_event(self, event: WyEvent) -> None:
        """Send one event; the connection's writers (this handler and its session's emitter) take turns.

        A client that reads nothing for wyoming.idle_timeout_s is dropped (ConnectionError): it would
        hold its connection, and a transcription slot, for ever.
        """
        async with self._write_lock:
            try:
                await asyncio.wait_for(super().write_event(event), self._server.cfg.idle_timeout_s)
            except asyncio.TimeoutError:
                self.writer.transport.abort()
                raise ConnectionError(f"the client read nothing for {self._server.cfg.idle_timeout_s:g} s "
                                      "(wyoming.idle_timeout_s)") from None

    async def run(self) -> None:
        """Read events until the client goes, an idle timeout, or the server stops; never raise."""
        idle, most = self._server.cfg.idle_timeout_s, self._server.cfg.max_connections
        self._server.handlers.add(self)
        try:
            if len(self._server.handlers) > most:
                await self._error("too_many_connections", f"{most} connections are open (wyoming.max_connections); "
                                                          "try again later")
                return
            while True:
                try:
                    event = await self._next_event(idle)
                except asyncio.TimeoutError:
                    await self._error("idle_timeout", f"no event for {idle:g} s (wyoming.idle_timeout_s); closing")
                    return
                except BadEvent as exc:  # the stream's framing is lost with it: nothing after it can be read
                    await self._error("bad_event", f"{exc}; closing the connection")
                    self._drop()  # its session must not write into the half-closed connection
                    await self._linger()
                    return
                if event is None or not await self.handle_event(event):
                    return
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.logger.info("went away: %r", exc)
        except Exception:
            self.logger.exception("the connection failed")
        finally:
            self._server.handlers.discard(self)
            self._drop()
            self.writer.close()

    async def _linger(self) -> None:
        """Half-close, then drop what the client still sends, within bounds: closing on bytes not read
        resets the connection, and the client would lose the error it has not read yet."""
        try:
            self.writer.write_eof()
        except OSError:  # the client reset the connection first (ENOTCONN is no ConnectionError)
            return
        loop = asyncio.get_running_loop()
        left, deadline = _LINGER_BYTES, loop.time() + _LINGER_S
        while left > 0:
            try:
                chunk = await asyncio.wait_for(self.reader.read(min(left, 1 << 16)), deadline - loop.time())
            except asyncio.TimeoutError:
                return
            if not chunk:
                return
            left -= len(chunk)

    async def handle_event(self, event: WyEvent) -> bool:
        """Answer describe and ping; run transcribe / audio-start / audio-chunk… / audio-stop."""
        try:
            await self._handle(event)
        except BadEvent as exc:  # a field missing or of the wrong type: the stream itself is fine
            await self._error("bad_request", f"{exc}; the event is ignored")
        await self._expire()  # at least every idle_timeout_s: a quieter client is closed
        return True

    async def _handle(self, event: WyEvent) -> None:
        if AudioChunk.is_type(event.type):
            await self._chunk(_audio(event, AudioChunk))
        elif Describe.is_type(event.type):
            if self._server.loaded is not None:
                await self._server.loaded()
            await self.write_event(self._server.info.event())
        elif Transcribe.is_type(event.type):
            self._transcribe = _transcribe(event)
        elif AudioStart.is_type(event.type):
            await self._start(_audio(event, AudioStart))
        elif AudioStop.is_type(event.type):
            await self._stop()
        elif Ping.is_type(event.type):
            await self.write_event(Pong(text=Ping.from_event(event).text).event())
        else:
            self.logger.debug("ignoring a '%s' event", shown(event.type))

    async def _next_event(self, idle: float) -> WyEvent | None:
        """The client's next event (None at its end); TimeoutError after `idle` seconds without one."""
        # Its exception (a bad event, a closed connection) is read here, so the task is not spawn()ed to log it.
        reading = asyncio.get_running_loop().create_task(read_event(self.reader), name="wyoming-read")
        try:
            if not await within({reading}, idle):
                raise asyncio.TimeoutError
        finally:
            if not reading.done():
                reading.cancel()
        return reading.result()

    async def _error(self, code: str, text: str) -> None:
        self.logger.warning("%s", shown(text, 500))
        await self.write_event(WyError(text=text, code=code).event())

    async def _start(self, start: AudioStart) -> None:
        transcribe, self._transcribe = self._transcribe or Transcribe(), None
        if self._server.loaded is not None:
            await self._server.loaded()
        if self._current is not None:
            await self._error("bad_request", "audio-start while a transcription is open; send audio-stop first")
            return
        # Until audio-stop the stream belongs to this transcription, even a refused one (its chunks are dropped).
        languages = self._server.info.asr[0].models[0].languages
        # Under asr.language = auto a multilingual model serves every language: the client's, if it names one.
        own = wanted_language(transcribe) if len(languages) > 1 else ""
        self._current = current = _Transcription(self, vad=transcribe.vad_sensitivity is not None,
                                                 language=own or (languages[0] if len(languages) == 1 else None))
        current.format = (start.rate, start.width, start.channels)
        problem = self._server.refusal(start, transcribe)
        if problem:
            current.failed = True
            await self._error(*problem)
            return
        try:
            current.session = self._server.new_session(current.on_event, sample_rate=start.rate, language=own,
                                                       name=f"wyoming session from {self._peer}")
        except AudioError as exc:
            current.failed = True
            await self._error("bad_audio", f"{exc}; send 8-192 kHz PCM, e.g. 16000 Hz, width 2, 1 channel")
            return
        context = transcribe.context or {}
        prompt = context.get("prompt") if isinstance(context.get("prompt"), str) else None
        if prompt:
            current.session.worker.prompt = prompt[-MAX_CONTEXT:]
        terms = [t for t in (transcribe.transcript_names or []) + (transcribe.transcript_terms or [])
                 if isinstance(t, str)]
        if terms:
            current.session.worker.hotwords = " ".join(terms)[:MAX_CONTEXT]
        self._server.admit(current)
        self.logger.info("transcription: %d Hz, %d byte(s), %d channel(s); %d in use", *current.format,
                         len(self._server.sessions))
        current.session.start()
        current.start_emitter(f"wyoming-emit-{shown(self._peer)}")

    async def _chunk(self, chunk: AudioChunk) -> None:
        current = self._current
        if current is None:
            await self._error("bad_request", "audio-chunk without audio-start; send transcribe, audio-start first")
            return
        if current.failed or current.session is None:
            return
        frame = chunk.width * chunk.channels
        if (chunk.rate, chunk.width, chunk.channels) != current.format or len(chunk.audio) % frame:
            current.failed = True
            current.cancel()
            self._server.release(current)
            await self._error("bad_audio", f"audio-chunk of {chunk.rate} Hz, width {chunk.width}, {chunk.channels} "
                              f"channel(s), {len(chunk.audio)} bytes does not match audio-start "
                              f"{current.format}; send whole frames in the announced format")
            return
        await current.session.feed(self._mono16(current, chunk))
        current.seconds += len(chunk.audio) / frame / chunk.rate

    async def _expire(self) -> None:
        """End the open transcription once it has streamed, or been open, longer than max_audio_s: a
        stream that never stops, or trickles audio or pings, would hold its slot for ever."""
        current, most = self._current, self._server.cfg.max_audio_s
        if current is None or current.failed or current.session is None:
            return
        if current.seconds > most or time.monotonic() - current.opened > most:
            await self._error("too_long", f"more than {most:g} s of audio or of time (wyoming.max_audio_s); here "
                                          "is the transcript so far, and the rest of this stream is ignored")
            current.failed = True  # its chunks until audio-stop are dropped
            await self._finish(current)

    @staticmethod
    def _mono16(current: _Transcription, chunk: AudioChunk) -> bytes:
        """The chunk as s16le mono at its own rate (the session resamples with soxr).

        Channels are averaged here: audioop's tomono adds them, and clips where both are loud.
        """
        pcm = current.converter.convert(chunk).audio
        if chunk.channels == 1:
            return pcm
        frames = np.frombuffer(pcm, dtype="<i2").reshape(-1, chunk.channels)
        return frames.mean(axis=1).round().astype("<i2").tobytes()

    async def _stop(self) -> None:
        current, self._current = self._current, None
        if current is None:
            await self._error("bad_request", "audio-stop without audio-start")
            return
        if current.session is None or current.failed:
            return
        await self._finish(current)

    async def _finish(self, current: _Transcription) -> None:
        """The open utterance's final, then the transcript; the slot is free again."""
        assert current.session is not None
        try:
            await current.session.close(_CLOSE_S)
            await current.finish()
            # What was said goes to the client only, not to the system log.
            self.logger.info("transcription%s: %.1f s of audio, %d word(s)",
                             " abandoned" if current.session.abandoned else "",
                             current.session.samples / SAMPLE_RATE, len(current.finals.split()))
        finally:
            self._server.release(current)

    def _drop(self) -> None:
        """The connection ends: an open transcription is abandoned."""
        current, self._current = self._current, None
        if current is not None:
            if not current.failed:  # a failed one already ended (too_long gave its transcript)
                self.logger.info("the connection ended in the middle of a transcription; abandoned it")
            current.cancel()
            self._server.release(current)


class WyomingServer:
    """The Wyoming listener: start() binds wyoming.uri, close() ends every connection."""

    def __init__(self, cfg: WyomingConfig, asr: Callable[[], AsrConfig], model: str,
                 multilingual: Callable[[], bool], new_session: NewSession,
                 loaded: Callable[[], Awaitable[object]] | None = None) -> None:
        self.cfg = cfg
        self._asr = asr  # the daemon's asr settings in effect (SIGHUP may change them)
        self._model = model
        self._multilingual = multilingual  # known once the model is loaded, which is after this
        self.loaded = loaded
        """Waits until the model is loaded (None: it is): describe and audio-start wait for it, since what
        the model hears decides the languages served (while base loaded, describe said English only)."""
        self._new_session = new_session
        self._server: AsyncServer | None = None
        self.sessions: set[_Transcription] = set()
        self.handlers: set[_Handler] = set()
        """The connections open now, one handler each."""
        self.gate_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                 thread_name_prefix="captiond-wyoming-gate")
        """The gate of every Wyoming session runs here, off the event loop and the microphone's gate thread."""

    @property
    def info(self) -> Info:
        """The answer to describe, for the model as loaded."""
        return info(self._asr(), self._model, self._multilingual())

    def new_session(self, send: Callable[[Event], None], *, sample_rate: int, language: str = "",
                    name: str = "wyoming session") -> LiveSession:
        """A LiveSession on the daemon's engine for s16le mono audio at `sample_rate`, decoded in the
        client's `language` (empty: asr.language); `name` begins its log lines."""
        # Chunks already sent can never be taken back: finals must begin with the stable words they carried.
        return self._new_session(send, encoding="linear16", sample_rate=sample_rate, gate_thread=self.gate_thread,
                                 bind=True, language=language, name=name)

    def admit(self, current: _Transcription) -> None:
        """Count a transcription that has begun."""
        self.sessions.add(current)
        self._pace_partials()

    def release(self, current: _Transcription) -> None:
        """Stop counting a transcription that ended or failed."""
        self.sessions.discard(current)
        self._pace_partials()

    def _pace_partials(self) -> None:
        """Space every open transcription's partials by asr.first_partial_s and asr.partial_interval_s
        times the number open.

        Each partial decodes its whole utterance again, and the sessions share one model thread: with
        four at once on 2 busy CPUs, finals waited behind partials (bench/wyoming_bench.py: audio-stop ->
        transcript p50 0.56 and 0.87 s; spaced so, 0.49 s). Takes effect from each session's next utterance.
        """
        asr = self._asr()
        n = max(1, len(self.sessions))
        paced = dataclasses.replace(asr, partial_interval_s=asr.partial_interval_s * n,
                                    first_partial_s=asr.first_partial_s * n)
        for current in self.sessions:
            if current.session is not None:
                current.session.worker.reconfigure(paced)

    def refusal(self, start: AudioStart, transcribe: Transcribe) -> tuple[str, str] | None:
        """Why a transcription cannot begin (error code, message), or None."""
        if len(self.sessions) >= self.cfg.max_sessions:
            return "too_many_sessions", (f"{self.cfg.max_sessions} Wyoming transcriptions are running "
                                         "(wyoming.max_sessions); try again later")
        if start.width not in (1, 2, 3, 4) or not 1 <= start.channels <= _MAX_CHANNELS \
                or not MIN_RATE <= start.rate <= MAX_RATE:
            return "bad_audio", (f"audio-start of {start.rate} Hz, width {start.width}, {start.channels} channel(s) "
                                 f"is not supported; send {MIN_RATE}-{MAX_RATE} Hz PCM, width 1-4 bytes, "
                                 f"1-{_MAX_CHANNELS} channels (16000 Hz, width 2, mono is best)")
        languages = self.info.asr[0].models[0].languages
        wanted = wanted_language(transcribe)
        if wanted and wanted not in languages:
            served = repr(languages[0]) if len(languages) == 1 else "Whisper's language codes"
            return "unsupported_language", (f"language {transcribe.language!r:.40} is not served: the model is "
                                            f"set to {served} (asr.language, asr.model)")
        # What goes to the decoder is checked as the socket's context command checks it.
        texts = [("context prompt", (transcribe.context or {}).get("prompt"))]
        texts += [("transcript_names", t) for t in transcribe.transcript_names or ()]
        texts += [("transcript_terms", t) for t in transcribe.transcript_terms or ()]
        for name, text in texts:
            why = text_problem(text) if isinstance(text, str) else None
            if why:
                return "bad_request", f"transcribe {name} {why}; send plain text"
        return None

    def _handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Handler:
        return _Handler(reader, writer, self)

    async def start(self) -> None:
        """Bind wyoming.uri; an address in use is a clear error. Warns that Wyoming has no authentication."""
        server = AsyncServer.from_uri(self.cfg.uri)
        if isinstance(server, AsyncUnixServer):  # whose start() unlinks whatever is at the path
            try:
                check_socket_path(server.socket_path, "wyoming.uri")
            except ServerError as exc:
                raise WyomingError(f"wyoming: {exc}") from None
        try:
            await server.start(self._handler)
        except OSError as exc:
            if exc.errno == errno.EAFNOSUPPORT:
                fix = "allow AF_INET AF_INET6 in the unit's RestrictAddressFamilies (systemctl edit captiond)"
            else:
                fix = "set wyoming.uri to a free port or path"
            raise WyomingError(f"wyoming: cannot listen on {self.cfg.uri}: {exc.strerror or exc}; {fix}, "
                               "or set wyoming.enabled = false") from None
        self._server = server
        if self.cfg.remote:
            log.warning("Wyoming server on %s, reachable from other machines: Wyoming has no authentication, "
                        "so anyone who can reach this port can use the model", self.cfg.uri)
        else:
            log.info("Wyoming server on %s (no authentication: every local user and process may use it)",
                     self.cfg.uri)

    async def close(self, timeout: float) -> None:
        """Stop accepting; abandon open transcriptions and close connections within `timeout`."""
        if self._server is None:
            return
        # A transcription under way ends without its transcript: the client is told so, briefly.
        stopping = WyError(text="captiond is stopping: this transcription ends without its transcript; send "
                                "the audio again once it is back", code="stopping").event()
        told = set()
        for current in list(self.sessions):
            current.cancel()
            told.add(spawn(current.tell(stopping), "wyoming-stopping"))
        if told:
            await asyncio.wait(told, timeout=min(timeout, _STOP_TELL_S))
        try:
            await asyncio.wait_for(self._server.stop(), timeout)
        except asyncio.TimeoutError:
            log.warning("wyoming: connections still open after %.0f s; dropping them", timeout)
        for handler in list(self.handlers):  # a client that reads nothing would keep its socket open
            handler.writer.transport.abort()
        self.gate_thread.shutdown(wait=False, cancel_futures=True)
