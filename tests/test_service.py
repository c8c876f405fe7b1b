"""The service wired for real (socket, gate, worker, log) with a fake decoder and a pipe as the source."""

import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from captiond.config import load
from captiond.translog import TranscriptLog
from conftest import CORPUS, SPEECH, EventLog, FakeDecoder, Harness, HeldLoad, read_wav, silence, trimmed

def test_full_disk_for_the_log_is_reported_and_finals_keep_coming(tmp_path):
    h = Harness(tmp_path, Path("/dev/full"))
    events = EventLog(h.sock)
    h.say(silence(0.3))
    events.wait_for(lambda e: e.get("state") == "listening")
    h.say(SPEECH)
    error = events.wait_for(lambda e: e["type"] == "error")
    assert error["code"] == "log_write_failed" and "No space left" in error["message"]
    h.say(SPEECH)
    events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 2)
    assert len(events.of("error")) == 1, "the same failure is reported once, not per line"
    h.end()
    assert h.exit_code == 0
    assert h.service.translog.backlog == 2


def test_pause_stops_listening_until_resume(tmp_path):
    h = Harness(tmp_path, tmp_path / "t.log")
    events = EventLog(h.sock)
    h.say(silence(0.3))
    events.wait_for(lambda e: e.get("state") == "listening")
    h.say(SPEECH)
    events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 1)
    events.client.send({"cmd": "pause"})
    paused = events.wait_for(lambda e: e["type"] == "status" and e["state"] == "paused")
    h.say(SPEECH)  # said while paused: never heard
    # More silence than a pipe holds: once written, all the speech has left the pipe; once the
    # ring is empty, the gate loop has passed it by while paused.
    h.say(silence(3.0))
    while len(h.service.ring):
        time.sleep(0.01)
    events.client.send({"cmd": "status"})
    reply = events.wait_for(lambda e: e["type"] == "status" and e["state"] == "paused" and e is not paused)
    assert reply["state"] == "paused" and reply["subscribers"] == 1 and reply["model"] == "fake"
    events.client.send({"cmd": "resume"})
    events.wait_for(lambda e: e["type"] == "status" and e["state"] == "listening" and e["seq"] > reply["seq"])
    h.say(SPEECH)
    h.end()
    # The daemon has stopped, but this client may not have read its last events yet (seen under load).
    events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 2)
    finals = events.of("final")
    assert [f["utt"] for f in finals] == [1, 2]
    assert finals[1]["start"] > (2 * len(SPEECH)) / 16000, "the second final is the speech after resume"
    assert [line.split("\t")[1] for line in (tmp_path / "t.log").read_text().splitlines()] == ["1", "2"]
    assert h.exit_code == 0


def test_context_command_reaches_the_decoder(tmp_path):
    h = Harness(tmp_path, tmp_path / "t.log", config=load(None, ["server.stats_interval_s=0",
                                                                 "asr.initial_prompt=Meeting notes."])[0])
    events = EventLog(h.sock)
    h.say(silence(0.3))
    events.wait_for(lambda e: e.get("state") == "listening")
    h.say(SPEECH)
    events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 1)
    assert all(prompt == "Meeting notes." for *_, prompt in h.decoder.calls)
    before = events.of("status")
    events.client.send({"cmd": "context", "prompt": "captiond, webrtcvad", "hotwords": "librosa"})
    events.wait_for(lambda e: e["type"] == "status" and e not in before)  # the answer: context is set
    h.say(silence(4.0))  # a long pause: the previous final is not carried over
    h.say(SPEECH)
    h.end()
    later = [c for c in h.decoder.calls if c[3] and "webrtcvad" in c[3]]
    assert later and all(prompt == "captiond, webrtcvad" for *_, prompt in later)
    assert h.decoder.hotwords_seen[-1] == "librosa"


class FailingDecoder(FakeDecoder):
    """Raises as faster-whisper did on a lone surrogate in the hotwords, while `failing` is set."""

    failing = True

    def decode(self, audio, **kw):
        if self.failing:
            raise TypeError("TextInputSequence must be str")
        return super().decode(audio, **kw)


def test_a_decode_that_raises_costs_one_utterance_not_the_daemon(tmp_path):
    decoder = FailingDecoder()
    h = Harness(tmp_path, tmp_path / "t.log", decoder=decoder)
    events = EventLog(h.sock)
    h.say(silence(0.3))
    events.wait_for(lambda e: e.get("state") == "listening")
    h.say(SPEECH)
    failed = events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 1)
    assert failed["flags"] == ["error"] and failed["text"] == ""
    error = events.wait_for(lambda e: e["type"] == "error")
    assert error["code"] == "decode_failed" and "TextInputSequence" in error["message"]
    decoder.failing = False
    h.say(SPEECH)
    h.end()
    second = events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 2)
    assert second["text"].startswith("heard") and "error" not in second["flags"]
    assert h.exit_code == 0
    assert [line.split("\t")[1] for line in (tmp_path / "t.log").read_text().splitlines()] == ["2"]


def test_a_stop_with_a_subscriber_that_is_not_reading_logs_no_traceback(tmp_path, caplog):
    import logging
    import socket

    h = Harness(tmp_path, tmp_path / "t.log")
    greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    greedy.connect(str(h.sock))
    greedy.sendall(b'{"cmd":"ping"}\n' * 20000)  # answers it never reads: more than the kernel holds
    h.say(SPEECH)
    with caplog.at_level(logging.DEBUG):
        h.end()
    assert h.exit_code == 0
    assert "CancelledError" not in caplog.text and "Traceback" not in caplog.text
    greedy.close()


class HangingLog(TranscriptLog):
    """A disk that does not answer until `answers` is set."""

    def __init__(self, *args):
        super().__init__(*args)
        self.answers = threading.Event()

    def write(self, final, ts):
        self.answers.wait(60)
        return super().write(final, ts)


def test_a_log_write_that_hangs_holds_up_nothing_on_the_event_loop(tmp_path):
    translog = HangingLog(tmp_path / "t.log", 100_000, 1)
    h = Harness(tmp_path, tmp_path / "t.log", translog=translog)
    events = EventLog(h.sock)
    h.say(silence(0.3))
    events.wait_for(lambda e: e.get("state") == "listening")
    h.say(SPEECH)
    h.say(SPEECH)
    # The daemon answers while the disk does not, finals reach clients (held for their line at most
    # the outbox's bound), and no line is lost once the disk answers.
    events.client.send({"cmd": "ping"})
    events.wait_for(lambda e: e["type"] == "pong", timeout=10)
    events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 2)
    assert not (tmp_path / "t.log").exists() or not (tmp_path / "t.log").read_text()
    translog.answers.set()
    h.end()
    assert [line.split("\t")[1] for line in (tmp_path / "t.log").read_text().splitlines()] == ["1", "2"]
    assert h.exit_code == 0


def test_a_fifo_log_nobody_reads_holds_its_lines_until_it_is_read_without_another_final(tmp_path):
    import contextlib
    import os
    import select

    fifo = tmp_path / "t.log"
    os.mkfifo(fifo)  # nobody reads it yet: lines wait in memory, and are tried again now and then
    h = Harness(tmp_path, fifo)
    events = EventLog(h.sock)
    h.say(silence(0.3))
    events.wait_for(lambda e: e.get("state") == "listening")
    h.say(SPEECH)
    events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 1)
    h.say(SPEECH)
    events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 2)
    events.client.send({"cmd": "ping"})
    events.wait_for(lambda e: e["type"] == "pong", timeout=10)
    # Something reads it now: both lines arrive, whole. One reader stays open throughout, with a
    # write end of our own so the writer's close between two lines is no end of file (reopening per
    # line raced: a line written to the last reader just before it closed was lost, and the loop hung).
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    keep_open = os.open(fifo, os.O_WRONLY)
    got, deadline = b"", time.monotonic() + 60
    try:
        while got.count(b"\n") < 2:
            assert time.monotonic() < deadline, f"the log lines never arrived: {got!r}"
            select.select([reader], [], [], 1.0)
            with contextlib.suppress(BlockingIOError):
                got += os.read(reader, 65536)
    finally:
        os.close(keep_open)
        os.close(reader)
    h.end()
    assert [line.split(b"\t")[1] for line in got.splitlines()] == [b"1", b"2"]
    assert h.exit_code == 0


class SlowLog(TranscriptLog):
    """A disk that takes a fifth of a second per line (a busy one)."""

    def write(self, final, ts):
        time.sleep(0.2)
        return super().write(final, ts)


def test_a_client_sees_a_final_only_once_its_line_is_in_the_log(tmp_path):
    import threading

    from captiond.client import Client

    path = tmp_path / "t.log"
    h = Harness(tmp_path, path, translog=SlowLog(path, 100_000, 1))
    seen = []  # (utt, whether its line was in the log the moment the client read the final)

    events = iter(Client(h.sock))
    assert next(events)["type"] == "hello"  # connected before anything is said

    def read():
        for event in events:
            if event["type"] == "final":
                logged = path.read_text().splitlines() if path.exists() else []
                seen.append((event["utt"], any(line.split("\t")[1] == str(event["utt"]) for line in logged)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    h.say(SPEECH)
    h.say(SPEECH)
    h.end()
    reader.join(30)
    assert seen == [(1, True), (2, True)]


def _open_utterance(h, events, seconds=1.5):
    """Say the first `seconds` of a clip and stop there: the utterance stays open (the pipe stalls)."""
    from conftest import CORPUS, read_wav, trimmed

    h.say(silence(0.3))
    events.wait_for(lambda e: e.get("state") == "listening")
    h.say(trimmed(read_wav(CORPUS / "ps_forever.wav"))[: int(seconds * 16000)])
    start = events.wait_for(lambda e: e["type"] == "speech_start")
    h.wait_captured()  # else the rest, captured after a finalize, would open an utterance of its own
    return start


def test_finalize_ends_the_open_utterance_at_once_and_listening_goes_on(tmp_path):
    h = Harness(tmp_path, tmp_path / "t.log")
    events = EventLog(h.sock)
    _open_utterance(h, events)
    events.client.send({"cmd": "finalize"})
    final = events.wait_for(lambda e: e["type"] == "final", timeout=30)
    assert final["utt"] == 1 and "end_of_stream" in final["flags"] and final["text"].startswith("heard")
    assert events.of("speech_end")[0]["utt"] == 1
    events.client.send({"cmd": "status"})
    answer = events.wait_for(lambda e: e["type"] == "status" and e["ts"] >= final["ts"])
    assert answer["state"] == "listening"
    events.client.send({"cmd": "finalize"})  # nothing open now: only an answer
    events.client.send({"cmd": "ping"})
    events.wait_for(lambda e: e["type"] == "pong")
    h.say(SPEECH)
    second = events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 2)
    assert "end_of_stream" not in second["flags"], "after a finalize the gate ends utterances at pauses again"
    h.end()
    assert len(events.of("final")) == 2 and h.exit_code == 0


def test_finalize_then_pause_keeps_every_frame_heard_before_the_pause(tmp_path):
    import threading

    from conftest import CORPUS, read_wav, trimmed

    h = Harness(tmp_path, tmp_path / "t.log")
    events = EventLog(h.sock)
    _open_utterance(h, events, seconds=1.0)
    # Hold the gate's thread so that what is said next waits in the capture ring, as it does when
    # push-to-talk's stop arrives before the gate took the last frames.
    hold = threading.Event()
    h.service._gate_thread.submit(hold.wait)
    h.say(trimmed(read_wav(CORPUS / "ps_forever.wav"))[16000:32000])
    h.wait_captured()  # all of it in the ring: waiting for the source's first read (16 frames) raced the rest
    events.client.send({"cmd": "finalize"})
    events.client.send({"cmd": "pause"})
    events.wait_for(lambda e: e["type"] == "status" and e["state"] == "paused")
    hold.set()
    final = events.wait_for(lambda e: e["type"] == "final", timeout=30)
    assert "end_of_stream" in final["flags"]
    assert final["end"] >= 0.3 + 2.0 - 0.3, f"the last second said was dropped: {final}"
    events.client.send({"cmd": "finalize"})  # while paused: nothing is heard, nothing opens
    h.say(SPEECH)
    h.say(silence(3.0))
    while len(h.service.ring):
        time.sleep(0.01)
    events.client.send({"cmd": "ping"})
    events.wait_for(lambda e: e["type"] == "pong")
    assert len(events.of("speech_start")) == 1
    h.end()
    assert h.exit_code == 0


def test_sighups_while_the_config_is_read_read_it_once_more_not_once_each(tmp_path):
    h = Harness(tmp_path, tmp_path / "t.log")
    reads, release = [], threading.Event()
    events = EventLog(h.sock)

    def slow_reload():  # a config on a slow disk: the reads happen off the event loop
        reads.append(time.monotonic())
        release.wait(30)
        return load(None, ["server.stats_interval_s=0", "gate.hangover_ms=600"])[0]

    h.service._reload = slow_reload
    h.loop.call_soon_threadsafe(h.service._on_signal, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not reads:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    events.client.send({"cmd": "ping"})  # the loop answers while the read waits
    events.wait_for(lambda e: e["type"] == "pong")
    for _ in range(20):  # the file may have changed since the read began
        h.loop.call_soon_threadsafe(h.service._on_signal, signal.SIGHUP)
    events.client.send({"cmd": "ping"})  # every one of them handled
    events.wait_for(lambda e: e["type"] == "pong" and len(events.of("pong")) == 2)
    release.set()
    while h.service.config.gate.hangover_ms != 600 or h.service._reloading is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(reads) == 2  # the first, and one for all the SIGHUPs that came during it
    h.end()


def test_a_reload_that_moves_the_log_where_it_cannot_be_written_is_refused(tmp_path, caplog):
    # As `run` refuses it at start: applied, it held every final's line in memory until a stop lost them.
    h = Harness(tmp_path, tmp_path / "t.log")
    moves = {"nowhere": "/proc/captiond-nope/t.log", "good": str(tmp_path / "moved.log")}

    def reload(to):
        h.service._reload = lambda: load(None, ["server.stats_interval_s=0", f"log.path={moves[to]}",
                                                "gate.hangover_ms=600"])[0]
        h.loop.call_soon_threadsafe(h.service._on_signal, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while h.service._reloading is not None or not any("SIGHUP" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.01)

    with caplog.at_level("INFO", logger="captiond"):
        reload("nowhere")
        refusal = [r.getMessage() for r in caplog.records if "SIGHUP" in r.getMessage()]
        assert refusal == ["SIGHUP: config not reloaded, the running one stays: log.path: cannot write the transcript "
                           "log /proc/captiond-nope/t.log: No such file or directory; set log.path to a writable file "
                           "or log.enabled = false"]
        assert h.service.config.gate.hangover_ms != 600, "refused as a whole"
        caplog.clear()
        reload("good")
        assert h.service.config.gate.hangover_ms == 600 and (tmp_path / "moved.log").exists()
    h.end()


def say_slowly(h, pcm, piece_s=0.3):
    """Say pcm a piece at a time, each through the gate and the worker before the next (on a slow
    machine too: the worker sees the utterance go on, not all of it at once)."""
    step = round(piece_s * 16000)
    for i in range(0, len(pcm), step):
        h.say(pcm[i:i + step])
        h.wait_captured()
        deadline = time.monotonic() + 30
        while len(h.service.ring) > 2 or not h.service.worker.idle:
            assert time.monotonic() < deadline, "the worker did not take the piece within 30 s"
            time.sleep(0.01)


def test_partials_are_decoded_only_for_utterances_that_begin_while_a_subscriber_wants_them(tmp_path):
    h = Harness(tmp_path, tmp_path / "t.log")
    finals_only = EventLog(h.sock, subscribe={"cmd": "subscribe", "types": ["final", "status"]})
    h.say(silence(0.3))
    finals_only.wait_for(lambda e: e.get("state") == "listening")
    decodes = h.service.worker.decodes
    say_slowly(h, SPEECH)
    finals_only.wait_for(lambda e: e["type"] == "final" and e["utt"] == 1)
    assert decodes["partial"] == decodes["check"] == 0, decodes
    assert decodes["speculation"] + decodes["final"] >= 1, decodes

    half = len(SPEECH) // 2
    say_slowly(h, SPEECH[:half])
    watcher = EventLog(h.sock)  # every type, partials included: it comes in the middle of utterance 2
    say_slowly(h, SPEECH[half:])
    watcher.wait_for(lambda e: e["type"] == "final" and e["utt"] == 2)
    assert decodes["partial"] == decodes["check"] == 0, "no catch-up decode of an utterance begun unwatched"

    say_slowly(h, SPEECH)
    watcher.wait_for(lambda e: e["type"] == "final" and e["utt"] == 3)
    assert decodes["partial"] >= 1, decodes
    assert {p["utt"] for p in watcher.of("partial")} == {3}
    finals_only.wait_for(lambda e: e["type"] == "final" and e["utt"] == 3)
    assert [f["utt"] for f in finals_only.of("final")] == [1, 2, 3] and not finals_only.of("partial")
    h.end()


class CostlyDecoder(FakeDecoder):
    """Takes time as a real decode does, in proportion to its audio and beam (15 ms per second per beam)."""

    def decode(self, audio, *, beam_size, **kwargs):
        time.sleep(len(audio) / 16000 * beam_size * 0.015)
        return super().decode(audio, beam_size=beam_size, **kwargs)


def test_a_stop_in_a_long_utterance_nobody_watched_partials_of_still_delivers_its_final(tmp_path):
    # Nothing cut its window, so its final decodes all of it: at beam 5 longer than the stop waits, and
    # so would an early final of all of it begun at a pause just before the stop.
    config = load(None, ["server.stats_interval_s=0", "gate.hangover_ms=3000"])[0]
    h = Harness(tmp_path, tmp_path / "t.log", config=config, decoder=CostlyDecoder())
    finals_only = EventLog(h.sock, subscribe={"cmd": "subscribe", "types": ["speech_start", "final", "status"]})
    h.say(silence(0.3))
    finals_only.wait_for(lambda e: e.get("state") == "listening")
    speech = np.tile(trimmed(read_wav(CORPUS / "jfk_inaugural.wav")), 5)  # ~55 s, no pause as long as 3 s
    h.say(speech)
    h.wait_captured()
    finals_only.wait_for(lambda e: e["type"] == "speech_start")
    h.loop.call_soon_threadsafe(h.service.stop)
    final = finals_only.wait_for(lambda e: e["type"] == "final", timeout=30)
    assert final["text"] and "error" not in final["flags"], final
    assert final["end"] - final["start"] > 45, "the whole utterance, not a piece"
    h.end()
    assert h.exit_code == 0
    assert (tmp_path / "t.log").read_text().count("\n") == 1


def test_a_pause_sent_while_the_model_loads_holds_once_the_daemon_is_ready(tmp_path, caplog):
    # A pause and resume while the model loaded said listening before the daemon was ready, and the
    # ready daemon then said listening while it was paused.
    caplog.set_level(logging.INFO, logger="captiond.service")
    decoder = HeldLoad()
    h = Harness(tmp_path, tmp_path / "t.log", decoder=decoder)
    events = EventLog(h.sock)
    events.client.send({"cmd": "pause"})
    events.client.send({"cmd": "resume"})
    events.client.send({"cmd": "pause"})
    def statuses():  # each change is broadcast, and each command answered with a status: one per run
        said = [e["state"] for e in events.events if e["type"] == "status"]
        return [state for i, state in enumerate(said) if i == 0 or said[i - 1] != state]

    events.wait_for(lambda e: len(statuses()) >= 3)
    h.say(SPEECH[:16000])
    deadline = time.monotonic() + 30
    while not h.service.capture.started.is_set():
        assert time.monotonic() < deadline, "no audio reached the capture"
        time.sleep(0.01)
    decoder.release.set()
    while not any("ready in" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.01)
    assert h.service.health.state.value == "paused", "ready, and still paused"
    events.client.send({"cmd": "resume"})
    events.wait_for(lambda e: e.get("state") == "listening")
    assert statuses() == ["paused", "starting", "paused", "listening"]
    h.end()


def test_a_stop_while_the_model_loads_never_says_ready(tmp_path, caplog):
    # The log said "ready in 2.2 s" after "SIGTERM: finishing", and READY=1 went to systemd mid-stop.
    caplog.set_level(logging.INFO, logger="captiond.service")
    decoder = HeldLoad()
    h = Harness(tmp_path, tmp_path / "t.log", decoder=decoder)
    h.say(SPEECH[:16000])  # audio flows, so only the stop can keep it from being ready
    deadline = time.monotonic() + 30
    while not h.service.capture.started.is_set():
        assert time.monotonic() < deadline, "no audio reached the capture"
        time.sleep(0.01)
    h.loop.call_soon_threadsafe(h.service.stop)
    while not h.service._stopping.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    decoder.release.set()
    h.end()
    assert not any("ready in" in r.getMessage() for r in caplog.records)


def test_a_stop_before_the_capture_began_ends_the_run_with_no_audio(tmp_path):
    # A SIGTERM held while the daemon started (signals.hold) reaches the loop at its first turn, before the
    # capture exists: the run then waited for a first audio that never came (to the stop bound: exit 1).
    import asyncio

    from captiond.capture import StdinSource
    from captiond.engine import Engine
    from captiond.server import Server
    from captiond.service import Service

    read_fd, write_fd = os.pipe()  # nothing is ever written: no first audio
    codes = []

    async def main():
        service = Service(load(None, ["server.stats_interval_s=0"])[0], source=StdinSource(os.fdopen(read_fd, "rb")),
                          engine=Engine(FakeDecoder()), server=Server(tmp_path / "s.sock"),
                          translog=TranscriptLog(tmp_path / "t.log", 100_000, 1))
        service.stop()
        codes.append(await service.run())

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)  # not the main thread: no relay
    thread.start()
    thread.join(120)
    os.close(write_fd)
    assert codes == [0], "the run did not end"
