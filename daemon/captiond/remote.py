"""Finals decoded by an OpenAI-compatible inference server (POST {remote_url}/audio/transcriptions:
vLLM, speaches, faster-whisper-server, OpenAI), with the local engine as the fallback.

A server that is down, slow, failing or answering garbage never costs a final: that final is decoded
here (origin "fallback", flag `fallback`), further finals stay here for a backoff that doubles from
1 s to 60 s, and the first request after it that succeeds ends the episode. Requests run on daemon
threads the event loop only waits for, up to asr.remote_timeout_s; past that the connection is shut
and the thread abandoned, so neither a stalled server nor a shutdown waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import logging
import math
import os
import secrets
import socket
import ssl
import stat
import threading
import time
import unicodedata
import wave
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import numpy as np

from .config import LOOPBACK, WHISPER_LANGUAGES, AsrConfig, ConfigError
from .engine import Engine, Segment, Transcript, joined, kept
from .events import Word, one_line, text_problem
from .frames import SAMPLE_RATE
from .tasks import spawn

log = logging.getLogger(__name__)

KEY_ENV = "CAPTIOND_REMOTE_KEY"
"""Environment variable read for the API key when asr.remote_key_file is empty (not OPENAI_API_KEY,
which would then go to whatever server remote_url names)."""
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 60.0
HURRY_S = 1.0
"""Once the daemon stops, what a request may still take (the drain also needs time for a local decode)."""
_BACKSTOP_S = 2.0  # the socket's timeout past asr.remote_timeout_s, which the event loop enforces
_MAX_BODY = 4 << 20  # bytes of answer read: a verbose_json of 30 s of speech is ~20 KB
_MAX_TEXT = 20_000
_MAX_ITEMS = 5_000  # segments or words in one answer
_MAX_ERROR = 200  # characters of a server's error message quoted in logs and status
_MAX_ERROR_BODY = 64 << 10  # bytes of an error answer read for its message
# Words and characters an answer may hold per second of audio (plus a few): fast speech is ~4 words
# and ~20 characters a second. More is no transcript of this audio, and a final that long would
# outgrow the lines clients read (a 5000-word final is a 283 KB event).
_WORDS_PER_S, _CHARS_PER_S = 8, 60
_JOINERS = "\u200c\u200d"
_LATE_S = 0.2  # a word begun this little after the audio was heard (a last word pinned to its end, float32 times)


class RemoteError(Exception):
    """A request that gave no usable transcript; the message says why, and never holds the key."""


class _Busy(RemoteError):
    """Every request slot stayed taken, or a stop cut the request short: not the server's failure, so no
    backoff (a stop logged "no answer within 5 s … next try in 1 s" for a request cut after 1 s)."""


_KEY_MAX = 4096  # bytes of a key file; API keys are under 200


def read_key(cfg: AsrConfig, environ: Mapping[str, str] = os.environ) -> str:
    """The API key from asr.remote_key_file, else $CAPTIOND_REMOTE_KEY, else "" (no key sent).

    Raises ConfigError naming the file or variable (never the key) when the key cannot be used.
    """
    if cfg.remote_key_file:
        path = Path(cfg.remote_key_file).expanduser()
        try:
            # Opened without blocking and only if a plain file: a FIFO would hang the start, /dev/zero fill memory.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as file:
                if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                    raise ConfigError(f"asr.remote_key_file: {str(path)!r} is not a plain file; put the key in one")
                raw = file.read(_KEY_MAX + 1)
            if len(raw) > _KEY_MAX:
                raise ConfigError(f"asr.remote_key_file: {str(path)!r} is longer than {_KEY_MAX} bytes; "
                                  "it should hold the key alone")
            key = raw.decode("utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"asr.remote_key_file: cannot read {str(path)!r}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"asr.remote_key_file: {str(path)!r} is not UTF-8 text") from None
        where = f"asr.remote_key_file: {str(path)!r}"
        if not key:
            raise ConfigError(f"{where} is empty; put the API key on its one line")
    else:
        key = environ.get(KEY_ENV, "").strip()
        where = f"${KEY_ENV}"
    # The key goes into a header: a line break or a control character would let it write others.
    if key and not all(33 <= ord(c) < 127 for c in key):
        raise ConfigError(f"{where}: the key must be one line of printable ASCII without spaces")
    return key


def wav_bytes(audio: np.ndarray) -> bytes:
    """float32 16 kHz mono samples as a 16-bit PCM WAV file."""
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def multipart(fields: list[tuple[str, str]], wav: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body of text fields and the audio as file "audio.wav"; and its content type."""
    boundary = "captiond-" + secrets.token_hex(16)
    parts = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="audio.wav"\r\n'
                 f"Content-Type: audio/wav\r\n\r\n".encode() + wav + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# --- the server's answer, validated -------------------------------------------------------------

def _number(item: dict, key: str, where: str, default: float | None = None) -> float:
    value = item.get(key, default)
    try:  # JSON's integers have no bound: float() of a 4000-digit one overflows
        number = math.nan if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise RemoteError(f"the server's answer has a bad {where}.{key}: {str(value)[:40]!r}")
    return number


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise RemoteError(f"the server's answer has no usable {where} (a string of at most {_MAX_TEXT} characters)")
    text = " ".join(value.split())
    if (problem := text_problem(text)) is not None:
        raise RemoteError(f"the server's {where} is not plain text: {problem}")
    # Invisible format characters (a soft hyphen, a byte-order mark, a right-to-left mark) would be typed
    # by `captiond type` and hide in the log; the joiners stay, as Persian and Indic scripts need them.
    return " ".join("".join(c for c in text if unicodedata.category(c) != "Cf" or c in _JOINERS).split())


def _items(data: dict, key: str) -> list[dict]:
    items = data.get(key) or []
    if not isinstance(items, list) or len(items) > _MAX_ITEMS or not all(isinstance(i, dict) for i in items):
        raise RemoteError(f"the server's answer has a bad {key} (a list of at most {_MAX_ITEMS} objects)")
    return items


def _timed(item: dict, where: str, seconds: float) -> tuple[float, float]:
    start, end = _number(item, "start", where), _number(item, "end", where)
    if not 0 <= start <= end <= seconds + 30.0:  # Whisper may place words past the audio, not past its window
        raise RemoteError(f"the server's answer has a {where} from {start} to {end} s in {seconds:.2f} s of audio")
    return start, end


def parse_transcript(body: bytes, audio_seconds: float, decode_seconds: float, language: str) -> Transcript:
    """A verbose_json answer as the Transcript a local decode would give (words in their segments).

    Everything is checked: types, finite times within the audio (plus Whisper's 30 s window),
    words in order, text without control characters, bounded sizes. Words without a probability
    (OpenAI's API gives none) get p = 1. `language` is used when the answer names none that is a
    Whisper code (OpenAI names it in English: "english").
    Raises RemoteError saying what is wrong.
    """
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # json nests by recursion: "[" * 100000
        raise RemoteError(f"the server's answer is not JSON: {body[:60]!r}") from None
    if not isinstance(data, dict):
        raise RemoteError("the server's answer is not a JSON object")
    text = _text(data.get("text"), "text")
    most_words, most_chars = 16 + int(_WORDS_PER_S * audio_seconds), 200 + int(_CHARS_PER_S * audio_seconds)
    if len(text) > most_chars or len(text.split()) > most_words:
        raise RemoteError(f"the server's text has {len(text.split())} words, {len(text)} characters for "
                          f"{audio_seconds:.1f} s of audio (at most {most_words}, {most_chars}): no transcript of it")
    words, chars = [], 0
    for i, w in enumerate(_items(data, "words")):
        start, end = _timed(w, f"words[{i}]", audio_seconds)
        if words and start < words[-1].start:
            raise RemoteError(f"the server's words are out of order at words[{i}]")
        p = _number(w, "probability", f"words[{i}]", 1.0)
        if not 0 <= p <= 1:
            raise RemoteError(f"the server's answer has a bad words[{i}].probability: {p}")
        if said := _text(w.get("word", w.get("text")), f"words[{i}].word"):  # some services say "text"
            words.append(Word(said, start, end, p))
            # Characters, not words: Thai, Lao, Burmese and Chinese come as one "word" per token.
            chars += len(said)
            if chars > most_chars:
                raise RemoteError(f"the server's words hold more than {most_chars} characters for "
                                  f"{audio_seconds:.1f} s of audio: no transcript of it")
    every = tuple(words)
    segments, logprob, ratio, no_speech, seg_chars = [], 0.0, 0.0, 0.0, 0
    raw = _items(data, "segments")
    for i, seg in enumerate(raw):
        where = f"segments[{i}]"
        start, end = _timed(seg, where, audio_seconds)
        seg_text = _text(seg.get("text", ""), f"{where}.text")
        seg_chars += len(seg_text)
        if seg_chars > most_chars:  # the final's text is made of them
            raise RemoteError(f"the server's segments hold more than {most_chars} characters for "
                              f"{audio_seconds:.1f} s of audio: no transcript of it")
        seg_logprob, seg_no_speech = _number(seg, "avg_logprob", where, 0.0), _number(seg, "no_speech_prob", where, 0.0)
        logprob, no_speech = min(logprob, seg_logprob), max(no_speech, seg_no_speech)
        ratio = max(ratio, _number(seg, "compression_ratio", where, 0.0))
        last = i == len(raw) - 1
        mine = [w for w in words if last or w.start < end]  # a word goes to the segment it begins in
        words = words[len(mine):]
        if any(c.isalnum() for c in seg_text):
            segments.append(Segment(start, end, seg_text, tuple(mine), seg_logprob, seg_no_speech))
    if not segments and any(c.isalnum() for c in text):  # text only, words only, or segments without text
        segments = [Segment(every[0].start if every else 0.0, every[-1].end if every else audio_seconds, text,
                            tuple(every), 0.0, 0.0)]
    # Words begun after the audio were not heard in it (Whisper places a loop or a stock phrase there),
    # and the final's text is what the segments kept say: the worker cuts a loop or an improbable last
    # word out of the segments, so a text that said more than they do would come back in its place.
    said = [w for seg in segments for w in seg.words]
    heard = sum(w.start < audio_seconds + _LATE_S for w in said)  # words are in order
    segments = _before(segments, heard, audio_seconds + _LATE_S)
    code = data.get("language")
    language = code if isinstance(code, str) and code in WHISPER_LANGUAGES else language
    # A server says no detection probability: its language never becomes the speaker's (worker.heard_language).
    return Transcript(joined(seg.text for seg in segments), tuple(segments), language, logprob, ratio, no_speech,
                      audio_seconds, decode_seconds, tuple(w.word for w in said[heard:]), origin="remote",
                      language_p=0.0)


def _before(segments: list[Segment], heard: int, end: float) -> list[Segment]:
    """The segments holding the first `heard` of their words, and those without words begun before `end`.
    A segment cut short says its own text through its last word kept (engine.kept)."""
    out = []
    for seg in segments:
        if not seg.words:
            if seg.start < end:
                out.append(seg)
        elif heard > 0:
            out.extend(kept([seg], heard))
            heard -= len(seg.words)
    return out


def _server_error(status: int, reason: str, body: bytes) -> RemoteError:
    """An HTTP error answer as a short message, quoting the server's own message when it gives one."""
    message = ""
    with contextlib.suppress(UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        error = json.loads(body.decode("utf-8"))
        for _ in range(4):  # OpenAI: {"error": {"message"}}; FastAPI: {"detail": ...}, maybe nested
            if isinstance(error, dict):
                error = next((error[k] for k in ("message", "error", "detail") if k in error), "")
        message = error if isinstance(error, str) else ""
    def shown(text: str, n: int) -> str:
        return one_line(" ".join(text.split()))[:n]

    message = shown(message, _MAX_ERROR)
    return RemoteError(f"HTTP {status} {shown(reason, 40)}" + (f": {message}" if message else ""))


# --- one request, on its own thread -------------------------------------------------------------

class TranscriptionClient:
    """Blocking client of one server's transcription endpoint; each call is one connection."""

    def __init__(self, cfg: AsrConfig, key: str) -> None:
        url = urlsplit(cfg.remote_url)
        self._https = url.scheme == "https"
        self._host, self._port = url.hostname or "", url.port
        self._path = url.path.rstrip("/") + "/audio/transcriptions"
        self._model = cfg.remote_model
        self._language = cfg.language
        self._timeout = cfg.remote_timeout_s
        self._key = key
        self.url = f"{url.scheme}://{url.netloc}{self._path}"
        """The endpoint, for logs and status (it never holds the key)."""

    def fields(self, prompt: str, language: str = "") -> list[tuple[str, str]]:
        """The form fields of a request besides the audio; `language` is the decode's own (empty:
        asr.language, none under auto)."""
        fields = [("model", self._model), ("response_format", "verbose_json"),
                  ("timestamp_granularities[]", "word"), ("timestamp_granularities[]", "segment")]
        if language or self._language != "auto":
            fields.append(("language", language or self._language))
        if prompt:
            fields.append(("prompt", prompt))
        return fields

    def transcribe(self, audio: np.ndarray, prompt: str, call: Call, language: str = "") -> Transcript:
        """POST the audio and parse the answer; raises RemoteError (and only that) when it fails."""
        started = time.monotonic()
        body, content_type = multipart(self.fields(prompt, language), wav_bytes(audio))
        headers = {"Content-Type": content_type, "Accept": "application/json", "User-Agent": "captiond"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        # The event loop owns the deadline; the socket's own timeout is a backstop past it, so a busy loop
        # and a socket timing out at the same moment report one cause. Not while connecting: an abort
        # has no socket to shut then, and a server that drops the connection attempt held its request
        # slot for the backstop's 2 s past the deadline.
        conn = (http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                            context=ssl.create_default_context())
                if self._https else http.client.HTTPConnection(self._host, self._port, timeout=self._timeout))
        try:
            call.attach(conn)
            conn.connect()
            conn.sock.settimeout(self._timeout + _BACKSTOP_S)
            call.check()
            conn.request("POST", self._path, body=body, headers=headers)
            response = conn.getresponse()
            if response.status != 200:  # its status says what went wrong, whatever its body holds
                raise _server_error(response.status, response.reason, response.read(_MAX_ERROR_BODY))
            announced = _announced(response.getheader("Content-Length", ""))
            if announced > _MAX_BODY:
                raise RemoteError(f"the server announced an answer of more than {_MAX_BODY} bytes")
            answer = response.read(_MAX_BODY + 1)
            if len(answer) > _MAX_BODY:
                raise RemoteError(f"the server's answer is more than {_MAX_BODY} bytes")
            if len(answer) < announced:
                raise RemoteError(f"the server closed the connection after {len(answer)} of the {announced} "
                                  "bytes it announced")
        except (OSError, http.client.HTTPException) as exc:
            if call.aborted:
                raise RemoteError("abandoned") from None
            raise RemoteError(_network_error(exc, self._timeout)) from None
        finally:
            conn.close()
        return parse_transcript(answer, len(audio) / SAMPLE_RATE, time.monotonic() - started,
                                "" if self._language == "auto" else self._language)


def _announced(length: str) -> int:
    """A Content-Length header's number of bytes, -1 without one."""
    if not (length.isascii() and length.isdigit()):  # "²" is a digit to isdigit, not to int
        return -1
    return int(length) if len(length) <= 18 else _MAX_BODY + 1  # int() refuses 4300 digits and more


def _network_error(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, http.client.HTTPException):
        return f"the server's answer is not valid HTTP ({type(exc).__name__}: {str(exc)[:60]!r})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


class Call:
    """One request in flight: the event loop can shut its connection while the thread waits on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self.aborted = False

    def attach(self, conn: http.client.HTTPConnection) -> None:
        """Called by the request thread before it connects."""
        with self._lock:
            self._conn = conn
        self.check()

    def check(self) -> None:
        """Raise RemoteError once the request is abandoned. Called again once connected: an abort while
        it connected had no socket to shut, and the request went on past its deadline for as long as
        the server trickled its answer, holding its slot."""
        with self._lock:
            if self.aborted:
                raise RemoteError("abandoned")

    def abort(self) -> None:
        """Make the request thread's blocking socket call return now (it then ends)."""
        with self._lock:
            self.aborted = True
            sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# --- the final decoder --------------------------------------------------------------------------

def _abandon(result: asyncio.Future[Transcript]) -> None:
    """Nobody will read this request's outcome: cancel it, or read an exception it already has, so that
    asyncio does not log it as never retrieved."""
    if not result.cancel() and not result.cancelled():
        result.exception()


class RemoteFinals:
    """Decodes finals on an inference server; the engine decodes those the server does not.

    Bound decodes (a prefix: the stable words) always run here: the API has no prefix. The worker
    asks for one only after a local decode, as a server's transcript is never bound (flag unbound).
    """

    def __init__(self, cfg: AsrConfig, engine: Engine, *, key: str | None = None,
                 client: TranscriptionClient | None = None, changed: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._client = client or TranscriptionClient(cfg, read_key(cfg) if key is None else key)
        self._timeout = cfg.remote_timeout_s
        self._max_in_flight = cfg.remote_max_in_flight
        self._changed = changed
        self._clock = clock
        self._running = 0  # request threads alive, abandoned ones included until they end
        self._freed: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        self._hurried = False
        self._backoff = 0.0
        self._next_try = 0.0
        self.problem = ""
        """Why finals are decoded here, for the status detail; empty while the server answers."""
        self.latency = 0.0
        """Seconds per successful request, an exponential average (0 before the first)."""
        self.requests = 0
        """Requests answered with a usable transcript."""
        self.fallbacks = 0
        """Finals decoded here because the server failed, was backed off from, or had no request free."""
        host = urlsplit(cfg.remote_url).hostname
        if cfg.remote_url.startswith("http://") and host not in LOOPBACK:
            log.warning("asr.remote_url is plain http to %s: the audio of every final (and the key, if any) "
                        "crosses the network unencrypted; use https unless the network is yours", host)

    @property
    def url(self) -> str:
        """The endpoint requests go to."""
        return self._client.url

    def hurry(self) -> None:
        """The daemon is stopping: requests in flight and new ones get HURRY_S at most, then fall back."""
        self._hurried = True
        if self._hurry is not None:
            self._hurry.set()

    async def decode(self, audio: np.ndarray, *, prefix: str | None = None, prompt: str | None = None,
                     hotwords: str | None = None, priority: int = 0, language: str = "", **local: Any) -> Transcript:
        """A final's transcript from the server, else from the engine (origin fallback)."""
        if self._hurry is None:
            self._hurry, self._freed = asyncio.Event(), asyncio.Event()
            if self._hurried:  # a stop before the first request: that one is hurried too
                self._hurry.set()
        if not prefix and self._clock() >= self._next_try:
            # faster-whisper's hotwords go where the prompt goes; the API has only the prompt.
            context = " ".join(t for t in (hotwords, prompt) if t)
            try:
                t = await self._request(audio, context, language)
            except _Busy:
                pass
            except RemoteError as exc:
                self._failed(str(exc))
            else:
                self._succeeded(t.decode_seconds)
                return t
        if not prefix:  # a bound decode follows a free one here, already counted
            self.fallbacks += 1
        t = await self._engine.decode(audio, prefix=prefix, prompt=prompt, hotwords=hotwords, priority=priority,
                                      language=language, **local)
        return replace(t, origin="fallback")

    async def _request(self, audio: np.ndarray, prompt: str, language: str) -> Transcript:
        loop = asyncio.get_running_loop()
        deadline = self._clock() + self._timeout
        while self._running >= self._max_in_flight:
            self._freed.clear()
            if not await self._until(spawn(self._freed.wait(), "remote-slot"), deadline):
                if not self._hurry.is_set():
                    log.info("no request to %s free within %.1f s; this final is decoded here", self.url, self._timeout)
                raise _Busy("busy")
        result: asyncio.Future[Transcript] = loop.create_future()
        call = Call()

        def run() -> None:
            try:
                outcome: Any = self._client.transcribe(audio, prompt, call, language)
            except RemoteError as exc:
                outcome = exc
            except Exception as exc:  # a bug here must still end in a fallback, never a lost final
                log.error("request to %s failed", self.url, exc_info=exc)
                outcome = RemoteError(f"{type(exc).__name__} in the client")
            with contextlib.suppress(RuntimeError):  # the loop is gone: the daemon exited
                loop.call_soon_threadsafe(self._ended, result, outcome)

        self._running += 1
        threading.Thread(target=run, name="captiond-remote", daemon=True).start()
        try:
            if not await self._until(asyncio.shield(result), deadline):
                call.abort()
                _abandon(result)
                # Cut short by a stop (HURRY_S): not the server's failure, and no next try to announce.
                raise _Busy("stopping") if self._hurry.is_set() else RemoteError(f"no answer within {self._timeout:g} s")
        except asyncio.CancelledError:  # a speculative final thrown away, or shutdown: not the server's fault
            call.abort()
            _abandon(result)
            raise
        return result.result()

    async def _until(self, task: asyncio.Future, deadline: float) -> bool:
        """Await task until the deadline, or HURRY_S after the daemon began to stop; False when it passed
        (the task is then cancelled)."""
        hurry = spawn(self._hurry.wait(), "remote-hurry")
        try:
            while not task.done():
                if hurry.done():
                    deadline = min(deadline, self._clock() + HURRY_S)
                left = deadline - self._clock()
                if left <= 0:
                    return False
                await asyncio.wait([task] if hurry.done() else [task, hurry], timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)
            return True
        finally:
            hurry.cancel()
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # read: a failed request's shield would be logged as never retrieved

    def _ended(self, result: asyncio.Future[Transcript], outcome: Any) -> None:
        self._running -= 1
        self._freed.set()
        if result.done():  # abandoned
            return
        if isinstance(outcome, BaseException):
            result.set_exception(outcome)
        else:
            result.set_result(outcome)

    def _failed(self, why: str) -> None:
        self._backoff = min(BACKOFF_MAX_S, self._backoff * 2 or BACKOFF_FIRST_S)
        self._next_try = self._clock() + self._backoff
        problem = f"remote ASR {self.url} unreachable ({why}); finals are decoded here until it answers"
        if problem != self.problem:
            log.warning("%s; next try in %.0f s", problem, self._backoff)
            self.problem = problem
            self._changed()
        else:
            log.info("remote ASR still unreachable (%s); next try in %.0f s", why, self._backoff)

    def _succeeded(self, seconds: float) -> None:
        self.latency = seconds if not self.requests else 0.8 * self.latency + 0.2 * seconds
        self.requests += 1
        self._backoff, self._next_try = 0.0, 0.0
        if self.problem:
            log.warning("remote ASR %s answers again; finals are decoded there", self.url)
            self.problem = ""
            self._changed()
