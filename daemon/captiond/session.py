"""A live session for a client's own audio (WebSocket /listen): decode → frames → its own gate → a worker
that shares the daemon's engine at a lower priority than the microphone."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

import numpy as np

from .config import Config
from .engine import Engine
from .events import Error, Event
from .frames import SAMPLE_RATE, FrameAssembler
from .gatedriver import Batch, GateStage, drive
from .lognames import Named
from .tasks import spawn
from .worker import SESSION, AsrWorker, gate_queue

log = logging.getLogger(__name__)

ENCODINGS = ("linear16", "webm")
MIN_RATE, MAX_RATE = 8000, 192000
_AUDIO_QUEUE = 32  # decoded chunks waiting for the gate; a full queue stops reading the client's socket
_PIPE_CHUNKS = 32  # WebM messages waiting for the decoder thread
_FINALIZE_WAIT_S = 2.0  # how long Finalize waits for the WebM decoder to catch up


class AudioError(ValueError):
    """The client's audio cannot be decoded; the message says why."""


class _Abandoned(Exception):
    """The session was cancelled while the WebM thread waited for it."""


class _Finalize:
    """Marker in the audio queue: close the open utterance here."""


FINALIZE = _Finalize()


class Linear16Decoder:
    """Raw s16le mono at a declared rate, resampled to 16 kHz."""

    def __init__(self, rate: int) -> None:
        import soxr

        self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="int16") if rate != SAMPLE_RATE else None
        self._odd = b""  # a sample split across two messages

    def insert(self, data: bytes) -> np.ndarray:
        """Samples at 16 kHz for one binary message."""
        data = self._odd + data
        cut = len(data) - len(data) % 2
        self._odd = data[cut:]
        pcm = np.frombuffer(data[:cut], dtype="<i2").astype(np.int16)
        return self._resampler.resample_chunk(pcm) if self._resampler is not None else pcm

    def finish(self) -> np.ndarray:
        """What the resampler still holds at the end of the stream."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.int16)
        return self._resampler.resample_chunk(np.zeros(0, dtype=np.int16), last=True)


class _Pipe(io.RawIOBase):
    """A blocking byte stream fed from the event loop and read by PyAV on the decoder thread."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=_PIPE_CHUNKS)
        self.starved = threading.Event()
        """Set while the reader waits for bytes that have not come: all it was given is decoded."""
        self._buffer = b""
        self.ended = False
        """Set once the reader took the end of the stream (None) off the queue."""
        self.taken = 0
        """Bytes the reader has taken."""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        while not self._buffer and not self.ended:
            try:
                chunk = self.chunks.get_nowait()
            except queue.Empty:
                self.starved.set()
                chunk = self.chunks.get()
                self.starved.clear()
            if chunk is None:
                self.ended = True
            else:
                self._buffer = chunk
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        self.taken += n
        return n


class LiveSession:
    """One client's audio stream: feed() binary messages, finalize() on request, close() at the end.

    Its events (speech_start, partial, final, speech_end, error) go to `send`, for that client only.
    `bind` makes its finals begin with the stable words whatever asr.bind_finals says (None: as it says);
    `language` is the client's own language code (empty: asr.language); `name` begins its log lines.
    """

    def __init__(self, engine: Engine, config: Config, send: Callable[[Event], None], *, encoding: str,
                 sample_rate: int, gate_thread: concurrent.futures.Executor, bind: bool | None = None,
                 language: str = "", name: str = "session") -> None:
        if encoding not in ENCODINGS:
            raise AudioError(f"encoding={encoding!r} is not supported; use linear16 (raw s16le) or webm")
        if encoding == "linear16" and not MIN_RATE <= sample_rate <= MAX_RATE:
            raise AudioError(f"sample_rate={sample_rate} is out of range {MIN_RATE}..{MAX_RATE}")
        self._send = send
        self._engine = engine
        self._gate_thread = gate_thread
        self._encoding = encoding
        self._linear = Linear16Decoder(sample_rate) if encoding == "linear16" else None
        self._pipe: _Pipe | None = None
        self._audio: asyncio.Queue[np.ndarray | _Finalize | None] = asyncio.Queue(maxsize=_AUDIO_QUEUE)
        self._frames = FrameAssembler()
        self._stage = GateStage(config.gate)
        self._events = gate_queue(config.asr)
        self._log = Named(log, name)
        self.worker = AsrWorker(engine, config.asr, self._events, send, priority=SESSION,
                                end_at_pause=self._end_at_pause, bind=bind, language=language, name=name)
        self.failed = ""
        """Why the session ended early ("undecodable audio", "session failed"); empty while it works."""
        self.broken = asyncio.Event()
        """Set (on the event loop) when `failed` is: the client's handler stops waiting for its messages."""
        self.samples = 0
        """Audio the gate has taken so far, in 16 kHz samples."""
        self._received = 0  # audio put on the queue to the gate, in 16 kHz samples
        self._tasks: list[asyncio.Task] = []
        self._cancelled = threading.Event()  # tells the WebM thread to stop waiting and end

    @property
    def abandoned(self) -> bool:
        """True once the session was given up (its client gone, a stalled close, the daemon stopping)."""
        return self._cancelled.is_set()

    def _end_at_pause(self, utt: int, voiced_end: int) -> None:
        """GateStage.end_at_pause, and an empty chunk through the gate, so that a pause already long
        enough ends the utterance now rather than with the client's next message (the captions page
        sends one every 100 ms)."""
        self._stage.end_at_pause(utt, voiced_end)
        with contextlib.suppress(asyncio.QueueFull):  # full: chunks are on their way through the gate anyway
            self._audio.put_nowait(np.zeros(0, dtype=np.int16))

    def start(self) -> None:
        """Start the session's tasks (and the decoder thread for WebM)."""
        loop = asyncio.get_running_loop()
        for coro, name in ((drive(self._batches(), self._stage, self.worker, self._gate_thread), "session-gate"),
                           (self.worker.run(), "session-worker")):
            task = spawn(coro, name)
            task.add_done_callback(self._task_done)
            self._tasks.append(task)
        if self._encoding == "webm":
            self._pipe = _Pipe()
            threading.Thread(target=self._decode_webm, args=(loop, self._pipe), name="captiond-webm",
                             daemon=True).start()

    async def feed(self, data: bytes) -> None:
        """Take one binary message of audio; waits while the session is behind (backpressure)."""
        if self.failed or self._cancelled.is_set():
            return
        if self._linear is not None:
            await self._put(self._linear.insert(data))
        elif self._pipe is not None:
            await self._to_pipe(self._pipe, data)

    async def finalize(self) -> None:
        """Close the open utterance after the audio sent so far (the client's Finalize)."""
        if self.failed or self._cancelled.is_set():
            return
        if self._pipe is not None:
            # Only once the decoder waits for bytes has every chunk sent so far reached the queue.
            await asyncio.get_running_loop().run_in_executor(None, self._wait_starved, self._pipe)
        await self._audio.put(FINALIZE)

    async def close(self, timeout: float) -> None:
        """End the stream: every utterance the session took in gets its final. The wait lasts while
        the session or the model makes progress (a client may send minutes of audio faster than it is
        decoded, another's decodes may go first, and on a busy machine one decode may take longer than
        `timeout`); after `timeout` seconds without any, and no decode under way that is not stuck
        (Engine.working), the rest is abandoned and the client told."""
        if self._cancelled.is_set():  # the client is gone or the daemon stops: nothing is waited for
            return
        ending = spawn(self._end_stream(), "session-end")
        self._tasks.append(ending)  # cancel() ends it too: its put may wait for a gate that is gone
        progress = self._progress()
        while True:
            _, busy = await asyncio.wait(self._tasks, timeout=timeout)
            if not busy or self._cancelled.is_set():
                return
            if self._progress() == progress and not self._engine.working(time.monotonic()):
                break
            progress = self._progress()
        left = (self._received - self.samples) / SAMPLE_RATE + self.worker.lag
        self._log.warning("no decode for %.0f s with %.1f s of audio left (%s busy); abandoning it",
                          timeout, left, ", ".join(t.get_name() for t in busy))
        self.worker.abandon(f"the session decoded nothing for {timeout:.0f} s")  # its speech_start gets a final
        self._send(Error("audio_dropped", f"the session decoded nothing for {timeout:.0f} s; about {left:.1f} s "
                                          "of the audio sent before the end were not transcribed"))
        self.cancel()

    async def _end_stream(self) -> None:
        if self._pipe is not None:
            await self._to_pipe(self._pipe, None)
        elif self._linear is not None:
            await self._put(self._linear.finish())
            await self._audio.put(None)

    def _progress(self) -> tuple[int, int, int]:
        """Changes whenever the session takes audio in or finishes a decode, or the model ends one: two
        Wyoming clients streaming 8 minutes each at once, one's decodes waited behind the other's for
        10 s and it was abandoned, its finals lost, while the model decoded all along."""
        return self.samples, sum(self.worker.decodes.values()), self._engine.ended

    def cancel(self) -> None:
        """Stop at once (the client is gone); the WebM thread ends within half a second."""
        self._cancelled.set()
        for task in self._tasks:
            task.cancel()
        while not self._audio.empty():  # wakes a feed() waiting for room that no task will make now
            self._audio.get_nowait()
        while self._pipe is not None:
            # The end must reach the thread: one still reading the stream's header checks nothing
            # else, and a full queue it then emptied left it waiting for bytes for ever.
            try:
                self._pipe.chunks.put_nowait(None)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._pipe.chunks.get_nowait()  # the client is gone: its unread bytes make room

    def _task_done(self, task: asyncio.Task) -> None:
        """A session task that failed (spawn logged why) ends the session; the client is told."""
        if task.cancelled() or task.exception() is None or self.failed:
            return
        self.failed = "session failed"
        self.broken.set()
        self._send(Error("session_failed", f"the session's {task.get_name()} failed "
                                           f"({task.exception()!r}); start a new session"))
        self.cancel()

    async def _to_pipe(self, pipe: _Pipe, chunk: bytes | None) -> None:
        try:
            pipe.chunks.put_nowait(chunk)
        except queue.Full:  # the decoder is behind: wait for it off the loop, never past a cancel
            await asyncio.get_running_loop().run_in_executor(None, self._put_unless_cancelled, pipe, chunk)

    def _put_unless_cancelled(self, pipe: _Pipe, chunk: bytes | None) -> None:
        while not self._cancelled.is_set():
            try:
                return pipe.chunks.put(chunk, timeout=0.5)
            except queue.Full:
                pass

    @staticmethod
    def _wait_starved(pipe: _Pipe) -> None:
        deadline = time.monotonic() + _FINALIZE_WAIT_S
        while (not pipe.starved.wait(0.05) or not pipe.chunks.empty()) and time.monotonic() < deadline:
            pass

    async def _put(self, pcm: np.ndarray) -> None:
        if len(pcm) and not self.failed and not self._cancelled.is_set():
            await self._audio.put(pcm)
            self._received += len(pcm)

    def _decode_webm(self, loop: asyncio.AbstractEventLoop, pipe: _Pipe) -> None:
        """Decoder thread: demux and decode the WebM stream as its bytes arrive."""
        import av

        from .capture import CaptureError, decode_file

        def put(item: np.ndarray | None) -> None:
            if self._cancelled.is_set():
                raise _Abandoned
            coro = self._audio.put(item)
            try:
                done = asyncio.run_coroutine_threadsafe(coro, loop)
            except RuntimeError:  # the loop is closed: the daemon is stopping
                coro.close()
                raise
            while True:  # the session is behind: wait, but not for a session that was abandoned
                try:
                    done.result(timeout=0.5)
                    self._received += 0 if item is None else len(item)
                    return
                except concurrent.futures.TimeoutError:
                    if self._cancelled.is_set():
                        done.cancel()
                        raise _Abandoned from None

        try:
            try:
                for pcm in decode_file(pipe, "the WebM stream", container_format="webm"):
                    put(pcm)
            except CaptureError as exc:
                self._log.info("the WebM stream cannot be decoded: %s", exc)
                if pipe.taken:  # a stream closed before its first byte is no error
                    self.failed = "undecodable audio"
                    # Not PyAV's words ("[Errno 1094995529] Invalid data", "'utf-8' codec can't decode").
                    loop.call_soon_threadsafe(self._send, Error(
                        "bad_audio", "the WebM stream cannot be decoded: send WebM/Opus as a browser's "
                        "MediaRecorder makes it, whole from its first byte"))
                    loop.call_soon_threadsafe(self.broken.set)
                self._drain(pipe)
            put(None)
        except (_Abandoned, RuntimeError, av.error.FFmpegError) as exc:  # given up, or the loop closed under us
            self._log.debug("webm decoder ended: %r", exc)

    def _drain(self, pipe: _Pipe) -> None:
        """Take (and drop) the client's bytes until it ends the stream, so feed() never blocks."""
        while not self._cancelled.is_set() and not pipe.ended:  # the decoder may have taken the end already
            try:
                if pipe.chunks.get(timeout=0.5) is None:
                    return
            except queue.Empty:
                pass

    async def _batches(self) -> AsyncIterator[Batch]:
        """The audio queue as frames for the gate: Finalize closes the utterance, None ends the stream."""
        while True:
            item = await self._audio.get()
            now = time.monotonic()
            if item is None:
                yield Batch(self._frames.finish(now), last=True)
                return
            if isinstance(item, _Finalize):
                yield Batch([], close=True)
            else:
                self.samples += len(item)
                yield Batch(self._frames.insert(item, now))
