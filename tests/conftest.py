"""Shared test helpers: the corpus copy, WAV loading, a virtual microphone, a daemon in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from captiond.capture import StdinSource  # noqa: E402
from captiond.client import Client, NotRunning  # noqa: E402
from captiond.config import Config, load  # noqa: E402
from captiond.engine import Engine  # noqa: E402
from captiond.frames import FRAME_SAMPLES  # noqa: E402
from captiond.server import Server  # noqa: E402
from captiond.service import Service  # noqa: E402
from captiond.translog import TranscriptLog  # noqa: E402
from captiond.engine import Segment, Transcript  # noqa: E402
from captiond.events import Word  # noqa: E402
from captiond.frames import SAMPLE_RATE  # noqa: E402
from captiond.rules import TINY_EN  # noqa: E402
from vmic import VirtualMic  # noqa: E402

DATA = ROOT / "tests" / "data"
CORPUS = DATA / "corpus"

# Without it OpenMP threads spin while the machine is busy and decodes slow down tenfold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def manifest() -> list[dict]:
    """The dev corpus clips copied into tests/data/corpus, with their references."""
    return [json.loads(line) for line in (CORPUS / "manifest.jsonl").read_text().splitlines() if line.strip()]


def clip(name: str) -> dict:
    """One manifest entry by file name."""
    return next(item for item in manifest() if item["file"] == name)


def read_wav(path: Path) -> np.ndarray:
    """A 16 kHz mono 16-bit WAV file as int16 samples."""
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2), path
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


def write_wav(path: Path, pcm: np.ndarray) -> Path:
    """Write int16 samples as a 16 kHz mono WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.astype(np.int16).tobytes())
    return path


def silence(seconds: float) -> np.ndarray:
    """Digital silence."""
    return np.zeros(int(seconds * 16000), dtype=np.int16)


def trimmed(pcm: np.ndarray) -> np.ndarray:
    """The clip without the silence before and after its speech (100 ms kept each side)."""
    frames = pcm[: len(pcm) // 480 * 480].reshape(-1, 480).astype(np.float64)
    loud = np.flatnonzero(np.sqrt((frames ** 2).mean(axis=1)) > 0.01 * np.abs(pcm).max())
    return pcm[max(0, loud[0] * 480 - 1600): (loud[-1] + 1) * 480 + 1600] if len(loud) else pcm


async def caught_up(worker, timeout: float = 60.0) -> None:
    """Until the worker is idle (AsrWorker.idle): a feed paced by this decodes at the same audio
    positions however busy the machine."""
    deadline = time.monotonic() + timeout
    while not worker.idle:
        assert time.monotonic() < deadline, "the worker never caught up"
        await asyncio.sleep(0.001)


class FakeDecoder:
    """Says how much audio it was given; optionally slow, to act out an overloaded machine."""

    name = "fake"
    rules = TINY_EN  # the bundled model's rules, which the tests of them assume
    multilingual = False

    def __init__(self, delay=0.0, ending=""):
        self.delay = delay
        self.ending = ending  # after the text, e.g. "." for a decode that ends a sentence
        self.calls = []
        self.hotwords_seen = []
        self.prefixes = []
        self.fallbacks = []
        self.languages = []
        self.verified = []

    def load(self):
        pass

    def decode(self, audio, *, beam_size, words, prompt=None, hotwords=None, prefix=None, fallback=True, window=None,
               language="", likely="", verify=False, stop=None):
        self.calls.append((len(audio), beam_size, words, prompt))
        self.hotwords_seen.append(hotwords)
        self.prefixes.append(prefix)
        self.fallbacks.append(fallback)
        self.languages.append(language)
        self.verified.append(verify)
        time.sleep(self.delay)
        secs = len(audio) / SAMPLE_RATE
        text = f"heard {secs:.2f}{self.ending}"
        if prefix and not text.startswith(prefix):  # the model is made to begin with the prefix
            text = f"{prefix} {text}"
        found = (Word("heard", 0.0, 0.3, 0.9), Word(f"{secs:.2f}", 0.3, secs, 0.9)) if words else ()
        return Transcript(text, (Segment(0.0, secs, text, found, -0.2, 0.01),), "en", -0.2, 1.2, 0.01, secs, self.delay)


class ShortWindowLoops(FakeDecoder):
    """Loops ("word," six times) whenever the encoder hears the short window; says `full` hearing all
    of Whisper's 30 s; `windows` holds what each decode heard."""

    def __init__(self, full):
        super().__init__()
        self.full = full
        self.windows = []

    def decode(self, audio, *, beam_size, words, window=None, **kw):
        super().decode(audio, beam_size=beam_size, words=words, window=window, **kw)
        self.windows.append(window)
        said = (self.full if window is None else "word, " * 6).split()
        timed = tuple(Word(w, 0.3 * i, 0.3 * i + 0.25, 0.9) for i, w in enumerate(said))
        text = " ".join(said)
        segments = (Segment(0.0, timed[-1].end, text, timed, -0.3, 0.01),) if said else ()
        return Transcript(text, segments, "en", -0.3, 1.5, 0.01, len(audio) / SAMPLE_RATE, 0.1)


class EventLog:
    """Reads a daemon's events on a background thread so tests can wait for them with a timeout."""

    def __init__(self, path: Path, subscribe: dict | None = None) -> None:
        self.client = Client(path)
        if subscribe:
            self.client.send(subscribe)
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self.client:
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        except OSError:
            pass
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        """The first event matching pred, waiting for it up to timeout seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if pred(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise AssertionError(f"no matching event within {timeout} s; got {[e['type'] for e in self.events]}")
                self._cond.wait(left)

    def wait_closed(self, timeout: float = 30.0) -> None:
        """Wait until the daemon closes the connection."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.closed:
                left = deadline - time.monotonic()
                assert left > 0, "daemon did not close the connection"
                self._cond.wait(left)

    def of(self, kind: str) -> list[dict]:
        """Events of one type received so far."""
        with self._cond:
            return [e for e in self.events if e["type"] == kind]

    def close(self) -> None:
        """Disconnect."""
        self.client.close()


class Daemon:
    """`captiond run` in a subprocess with its socket and transcript log in a temp folder."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None, stdin=None) -> None:
        self.socket = tmp / "captiond.sock"
        self.log = tmp / "transcript.log"
        self.stderr_path = tmp / "daemon.stderr"
        cmd = [sys.executable, "-m", "captiond", "run", "--set", f"server.socket={self.socket}",
               "--set", f"log.path={self.log}", *args]
        self.proc = subprocess.Popen(cmd, env=env or os.environ.copy(), stdin=stdin,
                                     stderr=open(self.stderr_path, "wb"), cwd=ROOT)

    @property
    def stderr(self) -> str:
        """What the daemon logged so far."""
        return self.stderr_path.read_text(errors="replace")

    def connect(self, timeout: float = 60.0, subscribe: dict | None = None) -> EventLog:
        """Connect once the socket exists and wait until the daemon says it is listening."""
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            assert self.proc.poll() is None, f"daemon exited early ({self.proc.returncode}):\n{self.stderr}"
            assert time.monotonic() < deadline, f"no socket after {timeout} s:\n{self.stderr}"
            time.sleep(0.05)
        while True:  # the file exists from bind(), connections are taken from listen(): refused in between
            try:
                events = EventLog(self.socket, subscribe)
                break
            except NotRunning:
                assert time.monotonic() < deadline, f"socket never answered in {timeout} s:\n{self.stderr}"
                time.sleep(0.05)
        events.wait_for(lambda e: e.get("state") == "listening", timeout)
        return events

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Make sure the process is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


SPEECH = np.concatenate([silence(0.5), read_wav(CORPUS / "ps_forever.wav"), silence(1.0)])


class HeldLoad(FakeDecoder):
    """A decoder whose load() waits until the test sets `release`; multilingual once loaded if asked."""

    def __init__(self, multilingual: bool = False):
        super().__init__()
        self.release = threading.Event()
        self._loaded_multilingual = multilingual

    def load(self):
        assert self.release.wait(60)
        self.multilingual = self._loaded_multilingual


class HeldDecoder(FakeDecoder):
    """A fake decoder whose decodes wait until `go` is set: what a test does meanwhile cannot depend on
    how fast the machine decodes."""

    def __init__(self, delay=0.0):
        super().__init__(delay)
        self.go = threading.Event()

    def decode(self, audio, **kw):
        self.go.wait(120)
        return super().decode(audio, **kw)


class Harness:
    """A Service on a real socket in a background event loop, fed through a pipe the test writes."""

    def __init__(self, tmp: Path, log_path: Path, config: Config | None = None, decode_delay: float = 0.0,
                 decoder: FakeDecoder | None = None, translog: TranscriptLog | None = None):
        self.config = config or load(None, ["server.stats_interval_s=0"])[0]
        self.decoder = decoder or FakeDecoder(decode_delay)
        self.read_fd, self.write_fd = os.pipe()
        self.sock = tmp / "s.sock"
        self.exit_code = None
        self.said = 0  # samples written into the pipe so far
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        translog = translog or TranscriptLog(log_path, 100_000, 1)
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main(translog)), daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    async def _main(self, translog):
        self.loop = asyncio.get_running_loop()
        server = Server(self.sock, max_clients=self.config.server.max_clients)
        service = Service(self.config, source=StdinSource(os.fdopen(self.read_fd, "rb")),
                          engine=Engine(self.decoder), server=server,
                          translog=translog)
        self.service = service
        task = asyncio.create_task(service.run())
        while not self.sock.exists() or (service.web is not None and not service.web.listening):
            await asyncio.sleep(0.01)
        self.ready.set()
        self.exit_code = await task

    def say(self, pcm):
        os.write(self.write_fd, pcm.tobytes())
        self.said += len(pcm)

    def wait_captured(self, timeout: float = 30.0) -> None:
        """Wait until every whole frame said so far is in the capture ring (a finalize covers only those)."""
        deadline = time.monotonic() + timeout
        while self.service.ring.written < self.said // FRAME_SAMPLES:
            assert time.monotonic() < deadline, f"the daemon did not take what was said within {timeout} s"
            time.sleep(0.01)

    def end(self, timeout: float = 30.0):
        """End the input and wait for the service to stop."""
        os.close(self.write_fd)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the service did not stop within {timeout} s of the end of its input"


@pytest.fixture(scope="session")
def vmic():
    """A PulseAudio virtual microphone for the whole session."""
    with VirtualMic() as mic:
        yield mic


@pytest.fixture
def daemon_factory(tmp_path):
    """Start daemons that are killed at the end of the test whatever happens."""
    started: list[Daemon] = []

    def start(*args: str, env: dict | None = None, stdin=None) -> Daemon:
        daemon = Daemon(tmp_path, *args, env=env, stdin=stdin)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB tmpfs, so writes fail part way through as on a disk that fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)
