"""The small parts split out of the service: health and its overload machine, the SIGHUP plan, the gate
handoff, the capture supervisor (with a real Capture and a source that fails as a lost device does)."""

import asyncio
import threading

import numpy as np

from captiond.capture import Capture, CaptureError, Source
from captiond.config import load
from captiond.frames import FrameRing
from captiond.health import OVERLOADED_LAG_S, RECOVERED_LAG_S, Health, State, Watchdog
from captiond.reloader import Handoff, plan
from captiond.supervisor import CaptureSupervisor


def test_health_announces_each_change_once_and_overload_has_a_gap():
    changes, paused = [], [False]
    health = Health(lambda: changes.append((health.state, health.detail)), lambda: paused[0])
    health.ready("mic")
    health.set(State.LISTENING, "mic")
    assert changes == [(State.LISTENING, "mic")] and health.state.value == "listening"
    health.lag(OVERLOADED_LAG_S + 1, "mic")
    assert health.state is State.OVERLOADED
    health.lag((OVERLOADED_LAG_S + RECOVERED_LAG_S) / 2, "mic")  # between the two: no flapping
    assert health.state is State.OVERLOADED
    assert health.detail == f"{(OVERLOADED_LAG_S + RECOVERED_LAG_S) / 2:.0f} s of speech waiting for the decoder"
    health.lag(RECOVERED_LAG_S / 2, "mic")
    assert changes[-1] == (State.LISTENING, "mic") and len(changes) == 4
    paused[0] = True
    health.settle("mic")
    health.lag(OVERLOADED_LAG_S + 1, "mic")  # a paused daemon is not overloaded
    assert health.state is State.PAUSED
    paused[0] = False
    health.settle("mic")  # a resume while speech waits: overloaded still, never listening between
    assert health.state is State.OVERLOADED and (State.LISTENING, "mic") not in changes[5:]


def test_a_wait_the_event_loop_overslept_is_waited_again_and_a_real_silence_ends_it():
    import asyncio
    import time

    from captiond.tasks import within

    async def main():
        loop = asyncio.get_running_loop()
        silent = loop.create_future()
        assert await within({silent}, 0.05) == set(), "nothing came: the wait ends empty"
        data = loop.create_future()

        def frozen():  # the process stopped past the timeout; the peer's data was there all along, and
            time.sleep(1.5)  # is read a few turns of the loop after the overdue timeout fires
            loop.call_soon(loop.call_soon, loop.call_soon, data.set_result, "audio")

        loop.call_soon(frozen)
        assert await within({data}, 0.2) == {data}

    asyncio.run(main())


def test_watchdog_names_the_first_stuck_part():
    assert Watchdog([lambda now: None]).problem() is None
    assert Watchdog([lambda now: None, lambda now: "gate", lambda now: "decoder"]).problem() == "gate"


def test_the_docs_name_every_key_a_reload_applies():
    from conftest import ROOT
    from captiond.reloader import LIVE_ASR_KEYS

    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text[text.index("### Applied at once, or after a restart"):text.index("### Per key")]
    assert [k for k in LIVE_ASR_KEYS if f"`{k}`" not in section] == []


def test_reload_plan_applies_live_keys_and_names_the_rest():
    old = load(None, [])[0]
    new = load(None, ["gate.hangover_ms=700", "asr.beam_size=3", "asr.model=/elsewhere", "log.max_bytes=2048"])[0]
    change = plan(old, new)
    assert change.applied == {"gate.hangover_ms": 700, "asr.beam_size": 3, "log.max_bytes": 2048}
    assert change.later == ("asr.model",)
    assert change.config.asr.beam_size == 3 and change.config.asr.model == old.asr.model
    assert change.touches("gate") and change.touches("log") and not change.touches("server")
    assert plan(old, old).applied == {} and plan(old, old).later == ()


def test_handoff_keeps_the_latest_put_and_gives_it_once():
    handoff = Handoff()
    assert handoff.take() is None
    handoff.put(1)
    handoff.put(2)
    assert handoff.take() == 2 and handoff.take() is None
    # Puts from one thread while another takes: the last put is never lost.
    taken = []
    stop = threading.Event()

    def taker():
        while not stop.is_set():
            if (v := handoff.take()) is not None:
                taken.append(v)

    thread = threading.Thread(target=taker)
    thread.start()
    for i in range(1, 20001):
        handoff.put(i)
    stop.set()
    thread.join()
    last = handoff.take()
    assert (taken and taken[-1] == 20000) or last == 20000
    assert taken == sorted(set(taken))


class FlakyMic(Source):
    """A live source that delivers one chunk, then fails as an unplugged device does, `failures` times."""

    live = True
    description = "flaky mic"

    def __init__(self, failures):
        self.failures = failures
        self.runs = 0

    def check(self):
        pass

    async def run(self, capture):
        self.runs += 1
        capture.put_nowait(np.zeros(480, np.int16), 0.0)
        if self.runs <= self.failures:
            raise CaptureError("flaky mic stopped delivering audio")
        await asyncio.Event().wait()


def test_supervisor_reports_a_lost_device_once_and_its_return():
    states = []
    health = Health(lambda: states.append(health.state))
    health.ready("")
    source = FlakyMic(failures=3)
    lost = []

    async def main():
        capture = Capture(FrameRing(100))
        supervisor = CaptureSupervisor(source, capture, health, lambda: lost.append(True))
        task = asyncio.create_task(supervisor.run(), name="supervisor")
        while source.runs < 4 or health.state is not State.LISTENING:
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return supervisor

    supervisor = asyncio.run(main())
    assert states == [State.LISTENING, State.DEVICE_LOST, State.LISTENING, State.DEVICE_LOST, State.LISTENING,
                      State.DEVICE_LOST, State.LISTENING]
    assert len(lost) == 3 and supervisor.done


def test_a_pause_holds_while_the_device_goes_and_comes_back_and_resume_tells_a_device_still_gone():
    # The state said listening once the device came back, though audio was still thrown away, and a
    # resume said listening while the device was gone.
    states, paused = [], [True]
    health = Health(lambda: states.append(health.state), lambda: paused[0])
    health.ready("flaky mic")
    losses = []

    async def run(source, until):
        supervisor = CaptureSupervisor(source, Capture(FrameRing(100)), health, lambda: losses.append(True))
        task = asyncio.create_task(supervisor.run(), name="supervisor")
        while not until(source):
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run(FlakyMic(failures=1), lambda source: source.runs >= 2 and health.lost is None))
    assert losses and states == [State.PAUSED], "lost and back while paused: still paused"
    asyncio.run(run(FlakyMic(failures=10**6), lambda source: health.lost is not None))
    assert health.state is State.PAUSED
    paused[0] = False
    health.settle("flaky mic")  # a resume
    assert (health.state, health.detail) == (State.DEVICE_LOST, "flaky mic stopped delivering audio")
    health.device_back("flaky mic")
    assert (health.state, health.detail) == (State.LISTENING, "flaky mic")


def test_the_state_is_starting_until_ready_whatever_comes_first_and_stopping_is_the_last():
    paused = [False]
    health = Health(lambda: None, lambda: paused[0])
    health.device_lost("no microphone")
    health.device_back("mic")  # the device came while the model loads
    assert health.state is State.STARTING
    paused[0] = True
    health.settle("mic")
    paused[0] = False
    health.settle("mic")  # a pause and a resume before the first audio
    assert health.state is State.STARTING
    paused[0] = True
    health.ready("mic")  # paused before it was ready: stays paused
    assert health.state is State.PAUSED
    paused[0] = False
    health.settle("mic")
    assert (health.state, health.detail) == (State.LISTENING, "mic")
    health.set(State.STOPPING)
    paused[0] = True
    health.settle("mic")  # a pause read during the stop's flush
    health.device_lost("gone")
    assert health.state is State.STOPPING


def test_the_watchdog_waits_for_the_read_timeout_before_it_calls_a_quiet_capture_stuck():
    # A fixed 15 s stopped the pings while a microphone with a long audio.read_timeout_s was not yet
    # declared lost: systemd killed a daemon that would have reported device_lost and recovered.
    capture = Capture(FrameRing(10))
    patient = CaptureSupervisor(FlakyMic(0), capture, Health(lambda: None), lambda: None, read_timeout_s=120.0)
    default = CaptureSupervisor(FlakyMic(0), capture, Health(lambda: None), lambda: None)
    quiet_since = capture.last_chunk
    assert patient.stuck(quiet_since + 100, paused=False) is None
    assert "no audio from flaky mic for 131 s" in patient.stuck(quiet_since + 131, paused=False)
    assert "no audio from flaky mic for 16 s" in default.stuck(quiet_since + 16, paused=False)
    # Lost, its retries may each take the read timeout twice over after a minute's wait and a child's
    # look for the device (up to PROBE_S past the read timeout): not stuck then.
    health = Health(lambda: None)
    health.device_lost("the audio server does not answer")
    retrying = CaptureSupervisor(FlakyMic(0), capture, health, lambda: None, clock=lambda: 0.0, read_timeout_s=120.0)
    assert retrying.stuck(340.0, paused=False) is None
    assert "has not retried its device for 360 s" in retrying.stuck(360.0, paused=False)


def test_supervisor_lets_a_file_source_failure_through():
    class BrokenFile(FlakyMic):
        live = False

    async def main():
        supervisor = CaptureSupervisor(BrokenFile(failures=1), Capture(FrameRing(100)), Health(lambda: None),
                                       lambda: None)
        try:
            await supervisor.run()
        except CaptureError:
            return "raised"

    assert asyncio.run(main()) == "raised"


class SlowAudioServer:
    """PyAudio for an audio server whose first open hangs until `release` is set; `streams` started."""

    def __init__(self):
        self.release, self.streams, self.made = threading.Event(), [], 0

    def __call__(self):
        self.made += 1
        if self.made == 1:
            self.release.wait(60)
        return self

    def get_default_input_device_info(self):
        return {"index": 0}

    def get_device_count(self):
        return 1

    def get_device_info_by_index(self, i):
        return {"name": "slow", "maxInputChannels": 1, "defaultSampleRate": 16000.0}

    def is_format_supported(self, rate, **kw):
        return True

    def open(self, stream_callback, **kw):
        return FakeStream(stream_callback, self.streams)

    def terminate(self):
        pass


class FakeStream:
    """Delivers 30 ms of silence every 30 ms from start_stream() to stop_stream()."""

    def __init__(self, callback, started):
        self.callback, self.started, self.stopped = callback, started, threading.Event()

    def start_stream(self):
        self.started.append(self)

        def play():
            while not self.stopped.wait(0.03):
                self.callback(np.zeros(480, np.int16).tobytes(), 480, {}, 0)

        threading.Thread(target=play, daemon=True).start()

    def stop_stream(self):
        self.stopped.set()

    def close(self):
        pass


async def _until(condition, timeout=60.0):
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


def test_an_open_that_finishes_after_its_attempt_gave_up_is_the_next_attempts_stream_not_a_second_one():
    # A slow audio server: the first open outlasts audio.read_timeout_s and finishes while the
    # supervisor waits to retry. The retry used to open again beside it, leaving the first stream
    # running unclosed into the same capture (each slow open one more: the gate heard audio twice).
    from captiond.capture import MicSource

    server = SlowAudioServer()
    health = Health(lambda: None)
    health.ready("")

    async def main():
        capture = Capture(FrameRing(1000))
        supervisor = CaptureSupervisor(MicSource("", 2.0, server), capture, health, lambda: None)
        task = asyncio.create_task(supervisor.run(), name="supervisor")
        await _until(lambda: health.state is State.DEVICE_LOST)  # the first open timed out
        server.release.set()  # it finishes now, while the supervisor waits to retry
        await _until(lambda: health.state is State.LISTENING)
        await asyncio.sleep(0.5)  # time for a second open, if one were started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert len(server.streams) == 1 and server.made == 1, "the late open was taken, no second one made"


def test_a_stop_while_an_open_hangs_closes_the_stream_it_opens_later():
    # Stopped between two attempts, the supervisor left the pending open without an owner: its late
    # stream kept running (a live PortAudio callback as the interpreter exits).
    from captiond.capture import MicSource

    server = SlowAudioServer()
    health = Health(lambda: None)
    health.ready("")

    async def main():
        supervisor = CaptureSupervisor(MicSource("", 0.5, server), Capture(FrameRing(1000)), health, lambda: None)
        task = asyncio.create_task(supervisor.run(), name="supervisor")
        await _until(lambda: health.state is State.DEVICE_LOST)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.release.set()
        await _until(lambda: server.streams and server.streams[0].stopped.is_set())

    asyncio.run(main())


def test_an_audio_server_that_answers_again_after_a_minute_is_listened_to_at_once():
    # Away over a minute, the supervisor waits for the devices to change; an audio server that hung
    # changes none of them when it recovers, but its pending open's stream starts delivering audio.
    from captiond.capture import MicSource

    server, now = SlowAudioServer(), [0.0]
    health = Health(lambda: None)
    health.ready("")

    async def main():
        supervisor = CaptureSupervisor(MicSource("", 0.5, server), Capture(FrameRing(1000)), health, lambda: None,
                                       devices=lambda: "nothing changes", clock=lambda: now[0])
        task = asyncio.create_task(supervisor.run(), name="supervisor")
        await _until(lambda: health.state is State.DEVICE_LOST)
        now[0] = 61.0  # the hang has lasted a minute
        await asyncio.sleep(1.5)  # the next attempt times out too: now it waits for a change
        server.release.set()
        await _until(lambda: health.state is State.LISTENING, timeout=20)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert len(server.streams) == 1


class AbsentMic(Source):
    """A microphone that is not there; asked whether it looks back, it says `there` (raises it if an error)."""

    live, description = True, "absent mic"

    def __init__(self, there: bool | Exception = False):
        self.runs, self.asked, self.there = 0, 0, there

    def check(self):
        pass

    async def run(self, capture):
        self.runs += 1
        raise CaptureError("no audio input device")

    async def present(self):
        self.asked += 1
        if isinstance(self.there, Exception):
            raise self.there
        return self.there


def test_a_look_for_a_device_away_for_long_that_raises_does_not_end_the_capture(monkeypatch):
    from captiond import supervisor as module

    monkeypatch.setattr(module, "_DEVICES_POLL_S", 0.01)
    now = [0.0]

    source = AbsentMic(ValueError("embedded null byte"))  # as a device name with a NUL did in the child's argv

    async def main():
        supervisor = CaptureSupervisor(source, Capture(FrameRing(10)), Health(lambda: None), lambda: None,
                                       devices=lambda: "no card", clock=lambda: now[0])
        task = asyncio.create_task(supervisor.run(), name="supervisor")
        await _until(lambda: source.runs >= 1)
        now[0] = 61.0
        await asyncio.sleep(0.05)
        runs = source.runs
        now[0] = 122.0  # a minute without a change: the look raises, and the device is reopened to see
        await _until(lambda: source.runs > runs)
        assert not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_a_device_away_for_a_minute_is_retried_when_the_audio_devices_change_not_every_second(monkeypatch):
    # Each retry initialises PortAudio again, which leaks native memory (~13 kB here): retried every
    # second for ever, an absent microphone cost a gigabyte a day.
    from captiond import supervisor as module

    monkeypatch.setattr(module, "_DEVICES_POLL_S", 0.01)
    now, devices, looked = [0.0], ["no card"], []

    def current_devices():
        looked.append(now[0])
        return devices[0]

    source = AbsentMic()

    async def main():
        supervisor = CaptureSupervisor(source, Capture(FrameRing(10)), Health(lambda: None), lambda: None,
                                       devices=current_devices, clock=lambda: now[0])
        task = asyncio.create_task(supervisor.run(), name="supervisor")
        await _until(lambda: source.runs >= 3)  # within the first minute: retried within a second
        now[0] = 61.0
        looked.clear()
        await _until(lambda: len(looked) >= 3)  # away a minute: now it waits for the devices to change
        runs = source.runs
        await _until(lambda: len(looked) >= 30)
        assert source.runs == runs, "not retried while nothing changed"
        devices[0] = "a USB microphone"
        await _until(lambda: source.runs >= runs + 3)  # and then quickly again, for another minute
        now[0] = 200.0
        looked.clear()
        await _until(lambda: len(looked) >= 3)
        runs = source.runs
        await _until(lambda: len(looked) >= 30)
        assert source.runs == runs
        now[0] = 261.0  # nothing changed for a minute: the source is asked, and says it is not there
        await _until(lambda: source.asked == 1)
        now[0] = 322.0
        await _until(lambda: source.asked == 2)
        assert source.runs == runs, "not run again while it says it is not there"
        assert supervisor.stuck(now[0], paused=False) is None  # waiting that way is retrying, for the watchdog
        source.there = True
        now[0] = 383.0  # another minute: it says it is there, and is run (once: it still fails)
        await _until(lambda: source.runs == runs + 1)
        assert supervisor.stuck(now[0], paused=False) is None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
