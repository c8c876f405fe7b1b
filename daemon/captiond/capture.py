"""Audio sources behind one interface (PyAudio microphone, file, raw PCM on stdin) and the capture driver."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Protocol

import numpy as np

from .events import one_line
from .frames import FRAME_SAMPLES, SAMPLE_RATE, FrameAssembler, FrameRing
from .signals import UNHOLD

log = logging.getLogger(__name__)

_FILE_CHUNK = SAMPLE_RATE // 2  # samples handed over per step when reading a file
_MIC_BUFFER_FRAMES = 2  # frames per PyAudio callback: 60 ms halves idle CPU against 30 ms (2.2 % -> 1.2 % of a core)
FIRST_AUDIO_S = 10.0
"""Seconds a freshly opened microphone may take to deliver its first chunk (more if audio.read_timeout_s is)."""


class CaptureError(RuntimeError):
    """An audio source cannot deliver audio; the message says why and what to do."""


class Capture:
    """Async driver of capture: cuts a source's chunks into frames and stores them in the ring.

    Live sources (microphones) call put_nowait() and never wait: if the gate falls a whole
    ring behind, frames are overwritten and counted. Other sources await put(), which waits
    for room, so a file or a pipe is never dropped, only slowed down.
    """

    def __init__(self, ring: FrameRing) -> None:
        self.ring = ring
        self._assembler = FrameAssembler()
        self.frames_ready = asyncio.Event()
        self.started = asyncio.Event()
        """Set when the first audio arrives: only then is the daemon really listening."""
        self._room = asyncio.Event()
        self.last_chunk = time.monotonic()
        """monotonic time of the last chunk received (to notice a device that went quiet)."""

    def put_nowait(self, pcm: np.ndarray, captured: float) -> None:
        """Store a live chunk of 16 kHz int16 samples at once (called on the event loop)."""
        self.last_chunk = captured
        self.started.set()
        for frame in self._assembler.insert(pcm, captured):
            self.ring.push(frame)
        self.frames_ready.set()

    async def put(self, pcm: np.ndarray) -> None:
        """Store a chunk from a source that can wait, waiting for room in the ring."""
        now = time.monotonic()
        self.last_chunk = now
        self.started.set()
        for frame in self._assembler.insert(pcm, now):
            await self._wait_for_room()
            self.ring.push(frame)
            self.frames_ready.set()

    async def finish(self) -> None:
        """Flush the last partial frame (padded with silence) at the end of the stream."""
        self.started.set()
        for frame in self._assembler.finish(time.monotonic()):
            await self._wait_for_room()
            self.ring.push(frame)
        self.frames_ready.set()

    def made_room(self) -> None:
        """Called by the reader after it took frames out of the ring."""
        self._room.set()

    async def _wait_for_room(self) -> None:
        while self.ring.full:
            self._room.clear()
            await self._room.wait()


class Source(Protocol):
    """Anything that can feed audio to a Capture."""

    description: str
    live: bool

    def check(self) -> None:
        """Fail fast, with a CaptureError that says what to do, if the source cannot be opened."""

    async def run(self, capture: Capture) -> None:
        """Deliver audio until the stream ends (return) or the task is cancelled."""

    def abandon(self) -> None:
        """Nothing more will be run: close what a run() left under way (at once, without waiting)."""

    async def present(self) -> bool:
        """Whether a live source away for long looks back, asked before its blind once-a-minute retry;
        True (retry) unless the source can tell more cheaply than by a run."""
        return True


# --- PyAudio ---------------------------------------------------------------------------------

_ALSA_HANDLER = None


def _silence_alsa() -> None:
    """Route ALSA's library messages ("cannot find card 0", …) to nowhere; our errors say it plainly."""
    global _ALSA_HANDLER
    if _ALSA_HANDLER is not None:
        return
    name = ctypes.util.find_library("asound")
    if not name:
        return
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p)
    _ALSA_HANDLER = handler_type(lambda *args: None)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.cdll.LoadLibrary(name).snd_lib_error_set_handler(_ALSA_HANDLER)


@contextlib.contextmanager
def _stderr_muted() -> Iterator[None]:
    # JACK prints straight to fd 2 while PortAudio probes host APIs; nothing else is running yet.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def open_pyaudio() -> Any:
    """A PyAudio instance, created without the wall of ALSA/JACK noise on stderr."""
    import pyaudio

    _silence_alsa()
    with _stderr_muted():
        try:
            return pyaudio.PyAudio()
        except OSError as exc:  # "Unanticipated host error" from a broken ~/.asoundrc
            raise CaptureError(f"PortAudio cannot start ({exc}): check the ALSA configuration in ~/.asoundrc "
                               "and /etc/asound.conf") from None


@dataclass(frozen=True)
class InputDevice:
    """An input device as PortAudio lists it."""

    index: int
    name: str
    channels: int
    default_rate: int
    default: bool


def audio_devices() -> tuple[Any, ...]:
    """What changes when a sound card or an audio server comes or goes: ALSA's card list, /dev/snd's
    device nodes and the PulseAudio and PipeWire sockets (cheap to read, unlike PortAudio's own look)."""
    def seen(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    try:
        cards = Path("/proc/asound/cards").read_text(errors="replace")
    except OSError:
        cards = ""
    try:
        nodes = tuple(sorted(os.listdir("/dev/snd")))
    except OSError:
        nodes = ()
    server, runtime = os.environ.get("PULSE_SERVER", ""), os.environ.get("XDG_RUNTIME_DIR", "")
    sockets = [server.removeprefix("unix:")] if server.startswith(("unix:", "/")) else []
    if runtime:
        sockets += [f"{runtime}/pulse/native", f"{runtime}/pipewire-0"]
    return cards, nodes, tuple(seen(path) for path in sockets)


def list_input_devices(pa: Any) -> list[InputDevice]:
    """Every device with input channels."""
    try:
        default = pa.get_default_input_device_info()["index"]
    except OSError:
        default = -1
    found = []
    for i in range(pa.get_device_count()):
        info = pa.get_device_info_by_index(i)
        if info.get("maxInputChannels", 0) > 0:
            found.append(InputDevice(i, info["name"], int(info["maxInputChannels"]),
                                     int(info["defaultSampleRate"]), i == default))
    return found


def pick_device(devices: list[InputDevice], wanted: str) -> InputDevice:
    """The device `wanted` names (index or name substring), or the default device for ''."""
    hint = "list input devices with `captiond devices`, or use --source file:PATH"
    if not devices:
        raise CaptureError(f"no audio input device found (PortAudio lists none; no sound card or audio server?); {hint}")
    if not wanted:
        for dev in devices:
            if dev.default:
                return dev
        raise CaptureError(f"no default audio input device; name one with --source mic:NAME ({hint})")
    if wanted.isdigit():
        for dev in devices:
            if dev.index == int(wanted):
                return dev
        raise CaptureError(f"no input device with index {wanted}; {hint}")
    matches = [d for d in devices if wanted.lower() in d.name.lower()]
    if not matches:
        raise CaptureError(f"no input device whose name contains {wanted!r}; {hint}")
    return matches[0]


# A child's look for a device (MicSource.present), on this process's module path (the same captiond
# whatever installed it); exit 3 is "not there", anything else a look that failed.
_PROBE = (UNHOLD + "import sys\nfrom captiond.capture import CaptureError, MicSource\ntry:\n"
          "    MicSource(sys.argv[1]).find()\nexcept CaptureError:\n    sys.exit(3)")
_ABSENT = 3
PROBE_S = 15.0
"""How long a child's look may take past audio.read_timeout_s (a Python with numpy starts in seconds
on a slow machine)."""


class MicSource(Source):
    """A PyAudio input stream; its callback hands chunks to the event loop with call_soon_threadsafe."""

    live = True

    def __init__(self, device: str = "", read_timeout_s: float = 5.0, pyaudio_factory: Any = open_pyaudio) -> None:
        self._wanted = device
        self._timeout = read_timeout_s
        self._factory = pyaudio_factory
        self._opening: asyncio.Future[tuple[Any, Any]] | None = None  # an open still inside PortAudio
        self._look_warned = False  # present() said why its look failed
        self.description = f"microphone {device!r}" if device else "default microphone"

    def check(self) -> None:
        """Make sure the device exists (opening it is left to run()); an audio server that does not
        answer within audio.read_timeout_s is not a missing device: run() then retries until it does."""
        try:
            dev = _bounded(self.find, self._timeout)
        except TimeoutError:
            log.warning("%s: the audio server did not answer in %.0f s (hung or frozen?); starting anyway, "
                        "the device is retried until it answers", self.description, self._timeout)
            return
        self.description = f"microphone #{dev.index} {dev.name!r}"

    def find(self) -> InputDevice:
        """The wanted device, looked up in a PortAudio initialised for it; CaptureError if it is not there."""
        with _PORTAUDIO:
            pa = self._factory()
            try:
                return pick_device(list_input_devices(pa), self._wanted)
            finally:
                pa.terminate()

    def _rate(self, pa: Any, dev: InputDevice) -> int:
        """16 kHz if the device takes it, else a rate it does (real hardware often refuses 16 kHz: -9997)."""
        import pyaudio

        for rate in dict.fromkeys((SAMPLE_RATE, dev.default_rate, 48000, 44100)):
            try:
                pa.is_format_supported(rate, input_device=dev.index, input_channels=1, input_format=pyaudio.paInt16)
            except ValueError as exc:
                log.debug("device %r refuses %d Hz: %s", dev.name, rate, exc)
                continue
            return rate
        raise CaptureError(f"{self.description} supports none of the sample rates tried; "
                           "check it with `captiond devices`")

    async def run(self, capture: Capture) -> None:
        """Record until cancelled; raise CaptureError if the device stops delivering audio.

        Every PortAudio call runs on an abandonable thread (see abandonable()): with the audio server
        hung, they never return, and neither a stop nor the lost-device check may wait for them.
        """
        loop = asyncio.get_running_loop()
        # An open that hangs (a frozen audio server) is a lost device after audio.read_timeout_s; the
        # next attempt waits for that same open rather than queue another one behind it.
        # One that finished after its attempt gave up is this attempt's: a new open beside it left
        # its stream running, unclosed, into the same capture (each retry one more: audio at 23x).
        if self._opening is None:
            self._opening = portaudio(self._open, loop, capture, abandoned=_close_later)
        try:
            pa, stream = await asyncio.wait_for(asyncio.shield(self._opening), self._timeout)
        except asyncio.TimeoutError:
            raise CaptureError(f"{self.description} did not open in {self._timeout:.0f} s: the audio server "
                               "does not answer (hung or frozen?)") from None
        except asyncio.CancelledError:
            self.abandon()
            raise
        except BaseException:
            self._opening = None  # the open failed: the next attempt opens anew
            raise
        self._opening = None
        try:
            log.info("recording from %s", self.description)
            opened = time.monotonic()
            while True:
                # Only frames count: asking PortAudio whether the stream is active can hang as well.
                await asyncio.sleep(min(1.0, self._timeout / 2))
                if capture.started.is_set():
                    silent_for, limit = time.monotonic() - capture.last_chunk, self._timeout
                else:  # PulseAudio through ALSA takes ~2 s to deliver the first chunk
                    silent_for, limit = time.monotonic() - opened, max(self._timeout, FIRST_AUDIO_S)
                if silent_for > limit:
                    raise CaptureError(f"{self.description} stopped delivering audio "
                                       f"({silent_for:.1f} s without a frame); was it unplugged?")
        finally:
            # Not awaited: stop_stream() blocks for as long as the audio server is hung. The next
            # open waits for it (PortAudio calls are serialised), a stop does not.
            _close_later((pa, stream))

    def abandon(self) -> None:
        """Close an open under way, or one that finished and was never taken (the supervisor stopped
        between two attempts), instead of leaving its stream running."""
        opening, self._opening = self._opening, None
        if opening is None:
            return
        if opening.done() and not opening.cancelled() and opening.exception() is None:
            _close_later(opening.result())
        opening.cancel()  # a later result is closed by abandonable()

    async def present(self) -> bool:
        """Whether the device can be found, asked of a child process: each PortAudio initialisation leaks
        ~13 kB here (libportaudio 19.6, libasound 1.2.8), which a daemon whose microphone stays away for
        weeks paid once a minute (18 MB a day); the child's goes with it. A look that cannot be made
        (no process, a child that fails or does not answer) says True: the reopen then tells, as before."""
        limit = PROBE_S + self._timeout
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _PROBE, self._wanted, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        except OSError as exc:  # EAGAIN, ENOMEM, the interpreter replaced by an upgrade
            return self._look_failed(f"cannot start a process to look for it ({exc})")
        try:
            code = await asyncio.wait_for(child.wait(), limit)
        except asyncio.TimeoutError:
            return self._look_failed(f"the look for it in a child process did not end in {limit:.0f} s")
        finally:
            if child.returncode is None:
                child.kill()
                # One stuck in the kernel (a USB disconnect) dies later; the child watcher reaps it then.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(child.wait(), 2.0)
        if code not in (0, _ABSENT):
            return self._look_failed(f"the child process that looks for it failed (exit {code})")
        self._look_warned = False
        return code == 0

    def _look_failed(self, why: str) -> bool:
        if not self._look_warned:  # once per run of failures, not every minute
            log.warning("%s: %s; reopening it to see instead", self.description, why)
            self._look_warned = True
        return True

    def _open(self, loop: asyncio.AbstractEventLoop, capture: Capture) -> tuple[Any, Any]:
        """Create PyAudio, pick the device and rate, open and start the stream (all blocking calls)."""
        import pyaudio
        import soxr

        pa = self._factory()
        try:
            dev = pick_device(list_input_devices(pa), self._wanted)
            rate = self._rate(pa, dev)
            resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="int16") if rate != SAMPLE_RATE else None

            def callback(data: bytes, count: int, time_info: Any, status: int) -> tuple[None, int]:
                pcm = np.frombuffer(data, dtype=np.int16)
                if resampler is not None:
                    pcm = resampler.resample_chunk(pcm)
                try:
                    loop.call_soon_threadsafe(capture.put_nowait, pcm, time.monotonic())
                except RuntimeError:  # the loop is closed: we are shutting down
                    return None, pyaudio.paComplete
                return None, pyaudio.paContinue

            self.description = f"microphone #{dev.index} {dev.name!r} at {rate} Hz"
            try:
                stream = pa.open(format=pyaudio.paInt16, channels=1, rate=rate, input=True, input_device_index=dev.index,
                                 frames_per_buffer=_MIC_BUFFER_FRAMES * rate * FRAME_SAMPLES // SAMPLE_RATE,
                                 stream_callback=callback, start=False)
            except OSError as exc:
                raise CaptureError(f"cannot open {self.description} for recording ({exc}); "
                                   "is another program holding it? check with `captiond devices`") from None
            try:
                stream.start_stream()
            except OSError as exc:
                with contextlib.suppress(OSError):
                    stream.close()
                raise CaptureError(f"cannot start recording from {self.description} ({exc}); "
                                   "check it with `captiond devices`") from None
        except BaseException:
            pa.terminate()
            raise
        return pa, stream


_PORTAUDIO = threading.Lock()
"""PortAudio is not safe to initialise or terminate while another thread is inside it."""


def _bounded(fn: Callable[[], Any], timeout: float) -> Any:
    """fn() on a daemon thread of its own, for code with no event loop; TimeoutError when it has not
    returned in timeout seconds (the thread is abandoned)."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        done.set()

    threading.Thread(target=work, name=f"captiond-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["result"]


def abandonable(fn: Callable[..., Any], *args: Any, lock: threading.Lock | None = None,
                abandoned: Callable[[Any], None] | None = None) -> asyncio.Future[Any]:
    """Run a call that may block for ever on a daemon thread of its own; cancelling the await abandons it.

    Not asyncio's default executor: asyncio.run joins its threads without a bound at exit, so one
    call stuck in a hung audio server (or a silent pipe) kept a stopped daemon alive for ever.
    `abandoned` gets the result of a call that returned after its awaiter gave up on it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.cancelled():
            if exc is None and abandoned is not None:
                abandoned(result)
        elif exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def work() -> None:
        with lock or contextlib.nullcontext():
            try:
                result, exc = fn(*args), None
            except BaseException as error:  # handed to the awaiting coroutine
                result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits for this call any more
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=work, name=f"captiond-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return future


_PORTAUDIO_CALLS: set[asyncio.Future[Any]] = set()


def portaudio(fn: Callable[..., Any], *args: Any, abandoned: Callable[[Any], None] | None = None) -> asyncio.Future[Any]:
    """abandonable(), one PortAudio call at a time."""
    call = abandonable(fn, *args, lock=_PORTAUDIO, abandoned=abandoned)
    _PORTAUDIO_CALLS.add(call)
    call.add_done_callback(_PORTAUDIO_CALLS.discard)
    return call


async def portaudio_settled(timeout: float) -> bool:
    """Wait up to timeout seconds for PortAudio calls under way (a microphone being closed); True when none is.

    The interpreter must not exit while a thread is inside PortAudio: its teardown then crashed
    (SIGSEGV) under PyAudio's callback thread.
    """
    pending = [c for c in _PORTAUDIO_CALLS if not c.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    return portaudio_idle()


def portaudio_idle() -> bool:
    """True when no PortAudio call is under way (a hung audio server leaves one for ever)."""
    return not _PORTAUDIO.locked() and all(c.done() for c in _PORTAUDIO_CALLS)


def _close(pa: Any, stream: Any) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):
            stream.stop_stream()
        with contextlib.suppress(OSError):
            stream.close()
    pa.terminate()


def _close_later(opened: tuple[Any, Any]) -> None:
    """Close a PyAudio and its stream without waiting: that can take as long as the audio server hangs."""
    def report(closing: asyncio.Future[Any]) -> None:
        if not closing.cancelled() and closing.exception() is not None:
            log.warning("closing the microphone failed: %r", closing.exception())

    portaudio(_close, *opened).add_done_callback(report)


# --- files and pipes ---------------------------------------------------------------------------

def decode_file(source: Path | BinaryIO, name: str | None = None, container_format: str | None = None
                ) -> Iterator[np.ndarray]:
    """Decode any audio PyAV can read (a path or a readable stream) to 16 kHz mono int16 chunks,
    raising CaptureError on bad data."""
    import av

    name = name or str(source)
    try:
        container = av.open(source if not isinstance(source, Path) else str(source), format=container_format)
    except FileNotFoundError:
        raise CaptureError(f"{name}: no such file") from None
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        if isinstance(source, Path) and _empty(source):  # FFmpeg says only "[Errno 1094995529] Invalid data"
            raise CaptureError(f"{name}: the file is empty") from None
        raise CaptureError(f"{name}: not audio PyAV can read ({_ffmpeg_said(exc)})") from None
    with container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            raise CaptureError(f"{name}: has no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        used = 0
        try:
            for i, frame in enumerate(container.decode(streams[0])):
                chunks = _mono16k(resampler, frame, name, first=i == 0)
                used += sum(len(c) for c in chunks)
                yield from chunks
            yield from _mono16k(resampler, None, name)
        except (av.error.FFmpegError, ValueError) as exc:
            kept = f"the {used / SAMPLE_RATE:.2f} s before the damage were used" if used else "none of it could be used"
            raise CaptureError(f"{name}: the audio is corrupt or truncated ({_ffmpeg_said(exc)}); {kept}") from None


def _ffmpeg_said(exc: Exception) -> str:
    """FFmpeg's own words for an error, without PyAV's "[Errno 1094995529] …: PATH" around them."""
    return getattr(exc, "strerror", None) or str(exc)


def _empty(path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def seekable(path: Path) -> bool:
    """False for a pipe, socket or device, which can be read only once (True for what cannot be
    looked at: decode_file names what is wrong with it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def probe_duration(path: Path) -> float:
    """The file's duration in seconds as its container states it, 0 if unknown."""
    import av

    try:
        with av.open(str(path)) as container:
            return container.duration / 1_000_000 if container.duration else 0.0
    except (av.error.FFmpegError, OSError, ValueError):
        return 0.0


def truncation(path: Path, decoded: float, duration: float) -> str:
    """Why a file that decoded without an error looks cut short, or "" if it does not.

    A file cut short decodes cleanly: only its header says there should be more. FFmpeg trims a
    WAV's stated length to the file's size, so its data chunk is read here.
    """
    short = f"{path}: the file looks truncated (" + ("what is there was transcribed" if decoded else
                                                   "it holds no audio: nothing was transcribed") + "): "
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            size = os.fstat(fh.fileno()).st_size
            while head[:4] == b"RIFF" and head[8:12] == b"WAVE":
                chunk = fh.read(8)
                if len(chunk) < 8:
                    break
                length = int.from_bytes(chunk[4:], "little")
                if chunk[:4] == b"data":
                    present = size - fh.tell()
                    if length != 0xFFFFFFFF and present < length:
                        return short + f"its header states {length} bytes of audio, it holds {present}"
                    break
                fh.seek(length + (length & 1), os.SEEK_CUR)
    except OSError:
        pass
    if duration and decoded < duration - max(0.5, 0.02 * duration):
        return short + f"only {decoded:.1f} s of the {duration:.1f} s its header states could be read"
    return ""


_FILE_RATES = (1000, 768000)  # Hz: 5512 Hz AAC and 384 kHz studio files are real; 1 Hz is a damaged header


def _mono16k(resampler: Any, frame: Any, name: str, first: bool = False) -> list[np.ndarray]:
    """A decoded frame (None: the end) as 16 kHz mono int16; CaptureError naming the format when the
    `first` frame cannot be converted (a valid file of 64 channels was called corrupt)."""
    import av

    # Read from the frame, not the header (an MPEG-TS says 0 Hz until its audio begins): a damaged
    # one saying 1 Hz made an 11 s WAV 49 hours of resampling.
    if first and not _FILE_RATES[0] <= frame.sample_rate <= _FILE_RATES[1]:
        raise CaptureError(f"{name}: its audio says {frame.sample_rate} Hz, which is no recording's sample rate "
                           f"({_FILE_RATES[0]}-{_FILE_RATES[1]} Hz); the file is damaged")
    try:
        return [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
    except (av.error.FFmpegError, ValueError) as exc:
        if not first:  # a format that changes mid-stream: damage, as the caller says
            raise
        raise CaptureError(f"{name}: cannot convert its audio ({len(frame.layout.channels)} channel(s), "
                           f"{frame.sample_rate} Hz, {frame.format.name}) to 16 kHz mono ({exc})") from None


def _rechunk(chunks: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    pending: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held >= size:
            yield np.concatenate(pending)
            pending, held = [], 0
    if pending:
        yield np.concatenate(pending)


class FileSource(Source):
    """An audio or video file, decoded with PyAV; paced like a microphone when realtime is set."""

    live = False

    def __init__(self, path: Path, realtime: bool = False) -> None:
        self.path = path
        self.realtime = realtime
        self.description = f"file {one_line(str(path))}" + (" (real time)" if realtime else "")

    def check(self) -> None:
        """Open the file and decode its first chunk, so a bad file fails before the model loads.

        A pipe (a FIFO, <(cmd), /dev/stdin) is refused first: it is read twice, by this check and by
        run(), and the check either waits for ever for a writer or takes the stream's header away."""
        if not seekable(self.path):
            raise CaptureError(f"{one_line(str(self.path))}: a pipe or device, not a file; pipe raw PCM to --source - "
                               "instead (e.g. ffmpeg -i IN -f s16le -ac 1 -ar 16000 - | captiond run --source -)")
        gen = decode_file(self.path)
        try:
            next(gen, None)
        finally:
            gen.close()

    async def run(self, capture: Capture) -> None:
        """Decode in a worker thread and feed the capture, pacing in real time when asked."""
        loop = asyncio.get_running_loop()
        chunks = _rechunk(decode_file(self.path), _FILE_CHUNK)
        started = time.monotonic()
        fed = 0
        reading: asyncio.Future[np.ndarray | None] | None = None
        try:
            while True:
                # Shielded: when we are cancelled the thread is still inside next(), and a generator
                # cannot be closed while it runs, so the finally clause waits for it.
                reading = loop.run_in_executor(None, next, chunks, None)
                if (chunk := await asyncio.shield(reading)) is None:
                    break
                if self.realtime:
                    ahead = fed / SAMPLE_RATE - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                await capture.put(chunk)
                fed += len(chunk)
        finally:
            if reading is not None and not reading.done():
                await asyncio.wait([reading])
            chunks.close()
        # A file cut short decodes cleanly: said, as `captiond transcribe` says it.
        duration = await loop.run_in_executor(None, probe_duration, self.path)
        if damage := await loop.run_in_executor(None, truncation, self.path, fed / SAMPLE_RATE, duration):
            log.warning("%s", one_line(damage))
        await capture.finish()


class StdinSource(Source):
    """Raw s16le 16 kHz mono PCM on a pipe or file (standard input by default)."""

    live = False
    description = "raw PCM on standard input"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream

    def check(self) -> None:
        """Standard input must be open for reading: found now, not once the model has loaded."""
        if self._stream is not None:
            return
        try:
            readable = sys.stdin is not None and fcntl.fcntl(0, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY
        except OSError:  # fd 0 closed
            readable = False
        if not readable:
            raise CaptureError("--source -: standard input is closed or not open for reading; "
                               "pipe raw s16le 16 kHz mono PCM into captiond run --source -")

    async def run(self, capture: Capture) -> None:
        """Read until end of file; an odd trailing byte is dropped (it cannot be a sample)."""
        fd = (self._stream or sys.stdin.buffer).fileno()
        carry = b""
        # On an abandonable thread: a writer that keeps the pipe open but silent must not hold up a stop.
        while data := await abandonable(os.read, fd, 2 * _FILE_CHUNK):
            data = carry + data
            cut = len(data) - len(data) % 2
            carry = data[cut:]
            await capture.put(np.frombuffer(data[:cut], dtype="<i2").astype(np.int16))
        await capture.finish()


def make_source(spec: str, realtime: bool = False, read_timeout_s: float = 5.0) -> Source:
    """The source for an audio.source / --source value: mic, mic:NAME, file:PATH or -."""
    if spec == "-":
        return StdinSource()
    if spec.startswith("file:"):
        return FileSource(Path(spec[5:]).expanduser(), realtime)
    if spec == "mic" or spec.startswith("mic:"):
        return MicSource(spec[4:], read_timeout_s)
    raise CaptureError(f"--source {spec!r}: expected mic, mic:NAME, file:PATH or -")
