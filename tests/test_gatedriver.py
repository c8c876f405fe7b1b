"""The gate driver, written once (stage, sync driver, async driver, the capture feed) and the client
commands, each with scripted parts; the daemon, sessions and `transcribe` use them through the real parts."""

import asyncio
import dataclasses
import logging

import numpy as np

from captiond.capture import Capture
from captiond.commands import Commands
from captiond.config import GateConfig
from captiond.events import Command, Pong, Status
from captiond.frames import FRAME_SAMPLES, Frame, FrameAssembler, FrameRing
from captiond.gate import Gate, UtteranceAudio, UtteranceEnd, UtteranceStart
from captiond.gatedriver import Batch, CaptureFeed, GateStage, drive, segment
from captiond.health import OVERLOADED_LAG_S, Health, State
from conftest import SPEECH

CONFIG = GateConfig(feature_check=False, start_ms=90, start_window_ms=150, hangover_ms=150, preroll_ms=0)


class LoudVad:
    """Voiced wherever the samples are not silent."""

    def is_speech(self, buf: bytes, sample_rate: int) -> bool:
        return any(buf)


def speech(frames: int) -> np.ndarray:
    return np.full(frames * FRAME_SAMPLES, 3000, dtype=np.int16)


def quiet(frames: int) -> np.ndarray:
    return np.zeros(frames * FRAME_SAMPLES, dtype=np.int16)


def frames_of(*parts: np.ndarray, first: int = 0) -> list[Frame]:
    pcm = np.concatenate(parts)
    return [Frame(first + i, pcm[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES], 0.0) for i in range(len(pcm) // FRAME_SAMPLES)]


def test_new_settings_take_over_between_utterances_and_numbering_goes_on(caplog):
    stage = GateStage(CONFIG, LoudVad())
    index = 0

    def utterance(reconfigure=()):
        """Speech, then quiet a frame at a time: (its id, quiet frames until it closed)."""
        nonlocal index
        events = stage.feed(frames_of(quiet(20), speech(20), first=index))
        index += 40
        starts = [e.utt for e in events if isinstance(e, UtteranceStart)]
        assert len(starts) == 1 and stage.in_speech
        for config in reconfigure:
            stage.reconfigure(config)
        for n in range(1, 100):
            index += 1
            if any(isinstance(e, UtteranceEnd) for e in stage.feed(frames_of(quiet(1), first=index - 1))):
                return starts[0], n
        raise AssertionError("never closed")

    # Given mid-utterance, the new settings wait for its end; the latest of two wins.
    assert utterance([dataclasses.replace(CONFIG, hangover_ms=600), dataclasses.replace(CONFIG, hangover_ms=300)]) \
        == (1, 5), "closed under the 150 ms it began with"
    with caplog.at_level(logging.INFO):
        assert utterance() == (2, 10), "300 ms now"
    assert "from utterance 2 on: hangover_ms=300" in caplog.text


def test_reloads_faster_than_a_start_window_leave_the_gate_hearing_the_start_and_its_preroll():
    config = dataclasses.replace(CONFIG, preroll_ms=90)
    audio = frames_of(quiet(10), speech(20))
    plain = [e for e in GateStage(config, LoudVad()).feed(audio) if isinstance(e, UtteranceStart)]
    stage = GateStage(config, LoudVad())
    events = []
    for i, frame in enumerate(audio):  # new settings before every frame (a SIGHUP storm)
        stage.reconfigure(dataclasses.replace(config, hangover_ms=150 + 30 * (i % 2)))
        events += stage.feed([frame])
    assert [e for e in events if isinstance(e, UtteranceStart)] == plain and len(plain) == 1
    assert plain[0].start == 7 * FRAME_SAMPLES, "three frames of pre-roll before the first voiced one"


def test_segment_is_the_gate_fed_the_whole_stream_with_its_last_partial_frame():
    pcm = SPEECH[: 2 * 16000 + 100]  # cut off in mid-word, not on a frame's edge
    chunks = [pcm[i:i + 1000] for i in range(0, len(pcm), 1000)]
    gate, asm = Gate(CONFIG), FrameAssembler()
    expected = gate.feed(asm.insert(pcm, 0.0)) + gate.feed(asm.finish(0.0), close=True)
    got = list(segment(chunks, CONFIG))
    assert [type(e) for e in got] == [type(e) for e in expected]
    assert got[-1].reason == "end_of_stream"
    assert sum(len(e.pcm) for e in got if isinstance(e, UtteranceAudio)) == \
        sum(len(e.pcm) for e in expected if isinstance(e, UtteranceAudio))


class Collector:
    def __init__(self):
        self.items = []

    async def put(self, event):
        self.items.append(event)


def test_drive_puts_every_event_in_order_and_ends_the_stream_after_the_last_batch():
    import concurrent.futures

    async def batches():
        yield Batch(frames_of(quiet(3), speech(10)))
        yield Batch([], close=True)  # a Finalize: the utterance ends here
        yield Batch(frames_of(speech(10), first=13), last=True)
        raise AssertionError("nothing is taken after the last batch")

    sink = Collector()
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        asyncio.run(drive(batches(), GateStage(CONFIG, LoudVad()), sink, thread))
    kinds = [(type(e).__name__, getattr(e, "utt", None)) for e in sink.items if not isinstance(e, UtteranceAudio)]
    assert kinds == [("UtteranceStart", 1), ("UtteranceEnd", 1), ("UtteranceStart", 2), ("UtteranceEnd", 2),
                     ("NoneType", None)]
    assert [e.reason for e in sink.items if isinstance(e, UtteranceEnd)] == ["end_of_stream", "end_of_stream"]


def test_capture_feed_batches_silence_drops_paused_frames_and_closes_on_flush_and_end():
    async def main():
        capture = Capture(FrameRing(100))
        stage = GateStage(CONFIG, LoudVad())
        ended = False
        feed = CaptureFeed(capture, stage, lambda: ended)
        batches = feed.batches()

        async def next_batch():
            return await asyncio.wait_for(batches.__anext__(), 5)

        capture.put_nowait(quiet(2), 0.0)  # two silent frames: not worth a wake-up yet
        waiting = asyncio.ensure_future(next_batch())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        capture.put_nowait(quiet(1), 0.0)
        batch = await waiting
        assert len(batch.frames) == 3 and not batch.close and not batch.last
        capture.put_nowait(speech(1), 0.0)
        feed.flush()  # a lost device: the open utterance gets its final
        batch = await next_batch()
        assert batch.close and len(batch.frames) == 1
        feed.paused = True
        capture.put_nowait(speech(5), 0.0)
        batch = await next_batch()
        assert batch.frames == [] and batch.close and len(capture.ring) == 0, "heard not at all"
        feed.paused = False
        ended = True
        capture.frames_ready.set()
        batch = await next_batch()
        assert batch.last
        assert feed.stuck(feed.tick + 100, held_up=False) is None, "nothing waits in the ring"
        capture.put_nowait(quiet(1), 0.0)
        assert "has not taken a frame" in feed.stuck(feed.tick + 100, held_up=False)
        assert feed.stuck(feed.tick + 100, held_up=True) is None, "held up by a full worker queue is not stuck"

    asyncio.run(main())


def test_a_finalize_closes_only_what_was_captured_before_it_and_speech_after_it_goes_on():
    async def main():
        capture = Capture(FrameRing(100))
        feed = CaptureFeed(capture, GateStage(CONFIG, LoudVad()), lambda: False)
        batches = feed.batches()

        async def next_batch():
            return await asyncio.wait_for(batches.__anext__(), 5)

        capture.put_nowait(speech(4), 0.0)
        feed.finalize()
        capture.put_nowait(speech(6), 0.0)  # said before the feed woke up: not part of what was finalised
        first = await next_batch()
        assert first.close and [f.index for f in first.frames] == [0, 1, 2, 3]
        second = await next_batch()
        assert not second.close and [f.index for f in second.frames] == [4, 5, 6, 7, 8, 9]

        feed.finalize()  # nothing open: speech after it is never closed by it
        capture.put_nowait(speech(3), 0.0)
        first = await next_batch()
        assert first.close and first.frames == []
        second = await next_batch()
        assert not second.close and len(second.frames) == 3

        capture.put_nowait(speech(2), 0.0)
        feed.finalize()  # push-to-talk's stop: finalize, then pause at once
        feed.paused = True
        capture.put_nowait(speech(2), 0.0)
        first = await next_batch()
        assert first.close and [f.index for f in first.frames] == [13, 14], "heard before the stop, kept"
        second = await next_batch()
        assert second.close and second.frames == [], "heard after the stop: not at all"

    asyncio.run(main())


def test_an_end_asked_at_a_pause_wakes_the_feed_so_the_gate_closes_before_the_next_frames():
    async def main():
        capture = Capture(FrameRing(100))
        stage = GateStage(dataclasses.replace(CONFIG, hangover_ms=600, sentence_end_ms=150), LoudVad())
        feed = CaptureFeed(capture, stage, lambda: False)
        batches = feed.batches()

        async def next_batch():
            return await asyncio.wait_for(batches.__anext__(), 5)

        capture.put_nowait(np.concatenate([speech(10), quiet(8)]), 0.0)  # 240 ms into the pause
        events = stage.feed((await next_batch()).frames)
        assert stage.in_speech and not any(isinstance(e, UtteranceEnd) for e in events)
        feed.end_at_pause(1, 10 * FRAME_SAMPLES)  # no frame follows: the ask alone wakes the feed
        batch = await next_batch()
        assert batch.frames == [] and not batch.close
        ends = [e for e in stage.feed(batch.frames) if isinstance(e, UtteranceEnd)]
        assert [(e.reason, e.end) for e in ends] == [("sentence_end", 10 * FRAME_SAMPLES)]

    asyncio.run(main())


class FakeWorker:
    prompt = ""
    hotwords = ""


def test_commands_pause_resume_and_set_context():
    async def main():
        changes = []
        feed = CaptureFeed(Capture(FrameRing(10)), GateStage(CONFIG), lambda: False)
        health = Health(lambda: changes.append(health.state), lambda: feed.paused)
        health.ready("mic")
        worker = FakeWorker()
        status = Status("x", "", "m", 0, 0, 0, 0)
        source = ["mic"]
        commands = Commands(worker, feed, health, lambda: status, lambda: source[0])
        assert isinstance(commands(Command("ping")), Pong)
        assert commands(Command("pause")) is status and feed.paused and health.state is State.PAUSED
        commands(Command("pause"))
        assert changes.count(State.PAUSED) == 1, "pausing twice announces once"
        commands(Command("resume"))
        assert not feed.paused and (health.state, health.detail) == (State.LISTENING, "mic")
        source[0] = "mic, reopened"
        commands(Command("resume"))
        assert health.detail == "mic", "a resume that changes nothing is only answered"
        health.lag(OVERLOADED_LAG_S + 1, "mic")
        commands(Command("pause"))
        commands(Command("resume"))
        assert health.state is State.OVERLOADED, "a resume while speech waits is not listening"
        commands(Command("context", prompt="Kubernetes", hotwords=None))
        assert (worker.prompt, worker.hotwords) == ("Kubernetes", "")
        commands(Command("context", prompt=None, hotwords="kubectl"))
        assert (worker.prompt, worker.hotwords) == ("Kubernetes", "kubectl")

    asyncio.run(main())
