"""The daemon: wires capture → gate → ASR worker → socket and transcript log; owns tasks, signals, shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Coroutine

from . import __version__
from . import reloader
from .capture import Capture, CaptureError, Source, portaudio_settled
from .commands import Commands
from .config import Config, ConfigError, LogConfig, log_path
from .engine import Engine
from .events import Error, Event, Hello, Stats, Status, one_line
from .frames import FRAME_MS, SAMPLE_RATE, FrameRing
from .gatedriver import CaptureFeed, GateStage, drive
from .health import Health, State, Watchdog, sd_notify
from .models import ModelError, check_asr
from .outbox import Outbox
from .remote import RemoteFinals
from .server import Occasional, Server, ServerError, quiet_accept_failures
from .session import LiveSession
from .signals import SignalRelay
from .worker import AsrWorker, gate_queue
from .supervisor import CaptureSupervisor
from .tasks import spawn
from .translog import LogWriter, TranscriptLog, check_writable
from .websocket import WebServer
from .wyoming_server import WyomingServer

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 5.0
"""How long shutdown waits for the open utterance's final before giving up on it (a greedy decode of all
of it: up to gate.max_utterance_s). With the 1 s bounds after it (tasks, subscribers, each server, the log)
and the audio device's 2.5 s, a stop in which every one runs out would take 11.5-13.5 s: STOP_BOUND_S
cuts it short (systemd's TimeoutStopSec is 15 s)."""
STOP_BOUND_S = 10.0
"""Past this many seconds after a stop began, a daemon run from the command line exits whatever its
threads are doing (a PortAudio call in a hung audio server never returns)."""
_STOP_TASKS_S = 1.0
# A stream stopped before its first audio takes ~1.7 s to stop (PulseAudio through ALSA, measured once here):
# a start that failed (a model that did not load) was called a hung audio server at 1 s. Past the bound,
# only a device that had delivered audio is called hung.
_AUDIO_CLOSE_S = 2.5
_FLUSH_SUBSCRIBERS_S = 1.0
_HEALTH_S = 1.0  # how often the lag is looked at for the overloaded state when no stats are sent


def _watchdog_usec() -> int:
    """systemd's WATCHDOG_USEC, 0 when unset; a value that is not a number is named and ignored."""
    value = os.environ.get("WATCHDOG_USEC", "")
    try:
        return max(0, int(value or 0))
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number of microseconds; no watchdog pings", value[:40])
        return 0


class Service:
    """One running daemon. Dependencies come in through the constructor so tests can swap them."""

    def __init__(self, config: Config, *, source: Source, engine: Engine, server: Server | None = None,
                 translog: TranscriptLog | None = None,
                 reload: Callable[[], Config] | None = None, stop_bound_s: float | None = None,
                 remote: RemoteFinals | None = None) -> None:
        self.config = config
        self._stop_bound_s = stop_bound_s
        self._exit_timer: threading.Timer | None = None
        self._reload = reload
        self._reloading: asyncio.Task | None = None
        self._reload_again = False  # a SIGHUP came while the config was being read
        # A storm of SIGHUPs re-read an unchanged file ~350 times a second, each saying so in the log.
        self._say_unchanged = Occasional(every_s=1.0)
        self.source = source
        self.engine = engine
        self.server = server
        self.outbox = Outbox(server.publish if server is not None else lambda event: None)
        self.outbox.log = self._new_logwriter(translog) if translog is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.web = WebServer(config.websocket, server, self._new_session) \
            if config.websocket.enabled and server is not None else None
        self.wyoming = WyomingServer(config.wyoming, lambda: self.config.asr, engine.name,
                                     lambda: engine.multilingual, self._new_session, engine.loaded.wait) \
            if config.wyoming.enabled else None
        self.stage = GateStage(config.gate)
        self.ring = FrameRing(max(1, round(config.audio.ring_seconds * 1000 / FRAME_MS)))
        self.capture = Capture(self.ring)
        self.queue = gate_queue(config.asr)
        # Finals of the microphone only: /listen and Wyoming sessions decode theirs here.
        self.remote = remote or (RemoteFinals(config.asr, engine, changed=lambda: self.publish(self.status()))
                                 if config.asr.backend == "openai" else None)
        self.health = Health(lambda: self.publish(self.status()), lambda: self.feed.paused)
        self.supervisor = CaptureSupervisor(source, self.capture, self.health, lambda: self.feed.flush(),
                                            read_timeout_s=config.audio.read_timeout_s)
        self.feed = CaptureFeed(self.capture, self.stage, lambda: self.supervisor.done)
        self.worker = AsrWorker(engine, config.asr, self.queue, self.publish, finals=self.remote,
                                end_at_pause=self.feed.end_at_pause,
                                watched=(lambda: server.wants("partial")) if server is not None else None)
        if server is not None:
            server.hello = self.hello
            server.on_command = Commands(self.worker, self.feed, self.health, self.status,
                                         lambda: self.source.description)
        self.watchdog = Watchdog([lambda now: self.supervisor.stuck(now, self.feed.paused),
                                  lambda now: self.feed.stuck(now, self.queue.full()), self._decoder_stuck])
        self.exit_code = 0
        self.started = time.monotonic()
        self._gate_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="captiond-gate")
        self._tasks: dict[str, asyncio.Task] = {}
        self._stopping = asyncio.Event()

    # --- events out -----------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Send an event to every subscriber, in order; a final with words once its log line is written."""
        self.outbox.publish(event)

    @property
    def translog(self) -> TranscriptLog | None:
        """The transcript log, None when it is off."""
        return self.outbox.log.log if self.outbox.log is not None else None

    def _new_logwriter(self, translog: TranscriptLog) -> LogWriter:
        def report(error: str | None, lost: int) -> None:  # on the writer's thread, or offer()'s (the loop)
            if error is None:
                if lost:
                    log.warning("transcript log %s is writable again; %d line(s) were lost meanwhile",
                                translog.path, lost)
                else:
                    log.info("transcript log %s is writable again", translog.path)
                return
            held = translog.backlog
            log.error("%s%s", error, f"; {held} line(s) held in memory until it works again" if held else "")
            with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting
                self._loop.call_soon_threadsafe(self.publish, Error("log_write_failed", error))

        return LogWriter(translog, report)

    @property
    def state(self) -> State:
        """The published state."""
        return self.health.state

    def hello(self) -> Hello:
        """The first event every subscriber gets."""
        return Hello(__version__, self.engine.name, SAMPLE_RATE, self.health.state.value)

    def status(self) -> Status:
        """The daemon's state and health figures, as a status event."""
        detail = "; ".join(d for d in (self.health.detail, self.remote and self.remote.problem) if d)
        return Status(self.health.state.value, detail, self.engine.name, time.monotonic() - self.started,
                      self.server.clients if self.server else 0, self.worker.lag, self.ring.overruns)

    def _new_session(self, send: Callable[[Event], None], **audio: Any) -> LiveSession:
        return LiveSession(self.engine, self.config, send, **audio)

    # --- tasks ----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, CaptureError):  # a file or pipe that broke; live devices are retried instead
            log.error("%s", exc)
            self.publish(Error("source_failed", str(exc)))
        elif isinstance(exc, ServerError):  # the socket's path taken by another daemon
            log.error("%s", exc)
            self.publish(Error("internal", str(exc)))
        else:
            log.error("task %s failed", task.get_name(), exc_info=exc)
            self.publish(Error("internal", f"{task.get_name()} failed: {exc!r}"))
            if task.get_name() == "asr-worker":
                self.worker.abandon(f"the decoder's worker failed ({exc!r})")
        self.exit_code = 1
        self.stop()

    def stop(self) -> None:
        """Begin a clean shutdown: stop capturing, finish the open utterance, then exit."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._arm_exit_bound()
            self.worker.stop()
            if self.remote is not None:
                self.remote.hurry()
            capture = self._tasks.get("capture")
            if capture is not None and not capture.done():
                capture.cancel()

    def _arm_exit_bound(self) -> None:
        """From now on the process ends within the stop bound, even if a thread never returns."""
        if self._stop_bound_s is None or self._exit_timer is not None:
            return

        def exit_now() -> None:
            stuck = [t.name for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive()]
            log.error("stop still not done after %.0f s (threads still running: %s); exiting anyway",
                      self._stop_bound_s, ", ".join(stuck))
            logging.shutdown()
            os._exit(self.exit_code or 1)  # a stage stuck at shutdown, as `run --help` says

        self._exit_timer = threading.Timer(self._stop_bound_s, exit_now)
        self._exit_timer.daemon = True
        self._exit_timer.name = "captiond-stop-bound"
        self._exit_timer.start()

    def _decoder_stuck(self, now: float) -> str | None:
        busy = self.engine.busy_since
        if busy is not None and not self.engine.working(now):
            return f"the decoder has been busy with one decode for {now - busy:.0f} s"
        return None

    async def _stats_loop(self, interval: float) -> None:
        """Stats every `interval` seconds (0: none), and the overload state machine at least every
        _HEALTH_S: `overloaded` does not wait for stats, nor depend on whether they are sent."""
        loop = asyncio.get_running_loop()
        stats_at = loop.time() + interval
        while True:
            await asyncio.sleep(min(_HEALTH_S, max(0.0, stats_at - loop.time())) if interval else _HEALTH_S)
            lag = self.worker.lag
            self.health.lag(lag, self.source.description)
            if interval and loop.time() >= stats_at:
                stats_at = loop.time() + interval
                r = self.remote
                self.publish(Stats(lag, self.worker.rtf, self.ring.overruns, self.queue.qsize(),
                                   *((r.latency, r.requests, r.fallbacks) if r is not None else ())))

    # --- lifetime -------------------------------------------------------------------------

    async def run(self) -> int:
        """Start everything, run until the source ends or a signal arrives, shut down; return the exit code."""
        loop = self._loop = asyncio.get_running_loop()
        # Before any thread of ours starts: each inherits the relay's blocked signals. A service embedded
        # elsewhere (not in the main thread) is stopped with stop().
        main = threading.current_thread() is threading.main_thread()
        signals = SignalRelay(loop, self._on_signal) if main else None
        quiet_accept_failures(loop)
        sd_notify(f"STATUS={self.health.state.value}")  # systemctl status says it while the model loads
        if self.outbox.log is not None:
            self.outbox.log.start()
        try:
            if self.server is not None:
                await self.server.start()
                self._spawn(self.server.watch(), "socket-watch")
            if self.web is not None:
                await self.web.start()
            if self.wyoming is not None:
                await self.wyoming.start()
            # Capture opens while the model loads; what it hears meanwhile waits in the ring, so
            # start-up loses no audio. The gate takes frames only after its warm-up: a frame fed first
            # met a broken librosa as a traceback in the gate task, not as the one-line error.
            capture = self._spawn(self.supervisor.run(), "capture")
            if self._stopping.is_set():  # a stop held while the daemon started (signals.hold) came first:
                loop.call_soon(capture.cancel)  # once it has begun, so that its end ends the gate's feed
            asr = self._spawn(self.worker.run(), "asr-worker")
            self._spawn(self._stats_loop(self.config.server.stats_interval_s), "stats")
            log.info("loading model %s and warming up", self.config.asr.model)
            await asyncio.gather(self.engine.load(), loop.run_in_executor(self._gate_thread, self.stage.warm_up))
            gate = self._spawn(drive(self.feed.batches(), self.stage, self.worker, self._gate_thread), "gate")
            # Ready means audio is flowing, not merely that a device was opened; a device lost again
            # right after its first chunk clears `started`, and is waited for again (else: starting for ever).
            while not self.capture.started.is_set() and not capture.done():  # a stop cancels the capture
                first = self._spawn(self.capture.started.wait(), "first-audio")
                await asyncio.wait([capture, first], return_when=asyncio.FIRST_COMPLETED)
                first.cancel()
            if self.capture.started.is_set() and not self._stopping.is_set():  # a stop during the load: not ready
                self.health.ready(self.source.description)
                log.info("ready in %.1f s: model %s, %s", time.monotonic() - self.started, self.engine.name,
                         self.source.description)
                sd_notify("READY=1")
            watchdog_usec = _watchdog_usec()
            if watchdog_usec and os.environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
                self._spawn(self.watchdog.run(watchdog_usec / 2e6), "watchdog")
            await asyncio.wait([asr, self._spawn(self._stopping.wait(), "stop-signal")],
                               return_when=asyncio.FIRST_COMPLETED)
            await self._drain([gate, asr])
            return self.exit_code
        finally:
            await self._shutdown()
            if signals is not None:
                # A reload or a stop racing the end (systemctl reload; a SIGTERM as a file source ended,
                # which under load killed the stopped daemon with -15) must not kill a daemon that
                # stopped cleanly; its exit is bounded (_arm_exit_bound).
                signals.close()

    def _on_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            if self._stopping.is_set():  # the log may be closed already: nothing is reopened now
                return
            # A storm of SIGHUPs re-reads the file once more after the read under way, not once each.
            self._reload_again = self._reloading is not None
            if self._reloading is None:
                self._reloading = spawn(self._reconfigure(), "reload")
            return
        log.info("%s: finishing the open utterance, then stopping", sig.name)
        self.stop()

    async def _reconfigure(self) -> None:
        """Re-read the config (SIGHUP) off the event loop, as often as asked while it read."""
        try:
            while True:
                self._reload_again = False
                if self._reload is None:
                    log.warning("SIGHUP: this daemon was started without a config to re-read")
                    return
                try:
                    new = await asyncio.get_running_loop().run_in_executor(None, self._reread, self.config.log)
                except ConfigError as exc:
                    log.error("SIGHUP: config not reloaded, the running one stays: %s", one_line(str(exc)))
                else:
                    if self._stopping.is_set():
                        return
                    self.reconfigure(new)
                if not self._reload_again:
                    return
        finally:
            self._reloading = None

    def _reread(self, running: LogConfig) -> Config:
        """The config file again (off the event loop), refused as a whole where `run` would refuse it at
        start: [asr] as models.check_asr finds it (a model not installed would take effect at the next
        restart, which would fail), a transcript log moved where it cannot be written (lines would wait
        in memory)."""
        assert self._reload is not None
        new = self._reload()
        try:
            check_asr(new.asr)
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
        path = log_path(new.log)  # one it cannot tell (no home folder) must not fail halfway through reconfigure()
        if new.log.enabled and (not running.enabled or path != log_path(running)):
            try:
                check_writable(path)
            except OSError as exc:
                raise ConfigError(f"log.path: cannot write the transcript log {path}: {exc.strerror or exc}; "
                                  "set log.path to a writable file or log.enabled = false") from None
        return new

    def reconfigure(self, new: Config) -> None:
        """Take a re-read config: apply what is safe while running, name what needs a restart."""
        change = reloader.plan(self.config, new)
        self.config = change.config
        self.worker.reconfigure(change.config.asr)
        if change.touches("gate"):
            self.stage.reconfigure(change.config.gate)
        if change.touches("log"):
            self._reopen_log(change.config)
        if change.applied:
            log.info("SIGHUP: applied %s", ", ".join(f"{k}={v!r}" for k, v in change.applied.items()))
        if change.later:
            log.warning("SIGHUP: %s changed but take(s) effect only after a restart (systemctl restart captiond)",
                        ", ".join(change.later))
        if not change.applied and not change.later and self._say_unchanged():
            log.info("SIGHUP: config re-read, nothing changed")

    def _reopen_log(self, config: Config) -> None:
        if not config.log.enabled:
            if self.outbox.log is not None:
                self.outbox.log.close(0)  # what it has queued is written; nothing waits for it
            self.outbox.log = None
        elif self.outbox.log is None:
            self.outbox.log = self._new_logwriter(
                TranscriptLog(log_path(config.log), config.log.max_bytes, config.log.backups))
            self.outbox.log.start()
        else:
            self.outbox.log.reconfigure(log_path(config.log), config.log.max_bytes, config.log.backups)

    async def _drain(self, tasks: list[asyncio.Task]) -> None:
        """Wait, with a bound, for the gate and worker to finish what was heard; name what is stuck."""
        _, stuck = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
        for task in stuck:
            log.error("shutdown: %s still busy after %.0f s; abandoning it", task.get_name(), DRAIN_TIMEOUT_S)
            if task.get_name() == "asr-worker":
                self.worker.abandon(f"the daemon stopped before its final was decoded (waited {DRAIN_TIMEOUT_S:.0f} s, "
                                    f"{self.worker.lag:.0f} s of speech still waiting for the decoder)")
            task.cancel()
            self.exit_code = self.exit_code or 1

    async def _shutdown(self) -> None:
        self._arm_exit_bound()
        self.health.set(State.STOPPING)
        sd_notify("STOPPING=1")
        for task in self._tasks.values():
            if not task.done():
                task.cancel()
        pending = [t for t in self._tasks.values() if not t.done()]
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=_STOP_TASKS_S)
            for task in stuck:
                log.error("shutdown: task %s did not stop", task.get_name())
        await self.outbox.flush(_FLUSH_SUBSCRIBERS_S)  # the last finals, once their lines are written
        if self.server is not None:  # its subscribers on the WebSocket get their last events here too
            await self.server.close(_FLUSH_SUBSCRIBERS_S)
        if self.web is not None:
            await self.web.close(_FLUSH_SUBSCRIBERS_S)
        if self.wyoming is not None:
            await self.wyoming.close(_FLUSH_SUBSCRIBERS_S)
        if self.outbox.log is not None:
            self.outbox.log.close(_FLUSH_SUBSCRIBERS_S)
        if not await portaudio_settled(_AUDIO_CLOSE_S):
            if self.capture.started.is_set():
                log.error("shutdown: the audio device did not close in %.1f s (is the audio server hung?); "
                          "abandoning it", _AUDIO_CLOSE_S)
            else:  # no audio yet: slow to stop so early, or an open the supervisor already said hangs
                log.info("shutdown: the audio device, opened before any audio came, had not closed in %.1f s; "
                         "not waited for", _AUDIO_CLOSE_S)
        self.engine.close()
        self._gate_thread.shutdown(wait=False, cancel_futures=True)
