import asyncio
import time

import numpy as np

from captiond.config import AsrConfig
from captiond.engine import Engine, Segment, Transcript
from captiond.events import Final, Partial, SpeechEnd, SpeechStart, Word
from captiond.frames import FRAME_SAMPLES, SAMPLE_RATE
from captiond.gate import UtteranceAudio, UtteranceEnd, UtteranceStart
from captiond.streaming import AsrWorker
from conftest import FakeDecoder


def utterance(utt, start, seconds, captured=0.0):
    n = int(seconds * SAMPLE_RATE) // FRAME_SAMPLES
    items = [UtteranceStart(utt, start)]
    for i in range(n):
        items.append(UtteranceAudio(utt, np.full(FRAME_SAMPLES, 100, np.int16), start + (i + 1) * FRAME_SAMPLES))
    end = start + n * FRAME_SAMPLES
    items.append(UtteranceEnd(utt, end - 10 * FRAME_SAMPLES, end - 3 * FRAME_SAMPLES, "silence", captured))
    return items


def run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.5), clock=time.monotonic):
    published = []

    async def main():
        queue = asyncio.Queue(maxsize=10000)
        engine = Engine(decoder)
        worker = AsrWorker(engine, cfg, queue, published.append, clock=clock)
        task = asyncio.create_task(worker.run())
        await feed(queue, worker)
        await queue.put(None)
        await asyncio.wait_for(task, 60)
        engine.close()
        return worker

    return asyncio.run(main()), published


def test_partials_then_speech_end_then_final_with_stream_times():
    decoder = FakeDecoder()

    async def feed(queue, worker):
        for item in utterance(1, 16000, 2.0, captured=10.0):
            await queue.put(item)
            await asyncio.sleep(0.001)  # let the worker catch up, as with live audio

    worker, events = run_worker(decoder, feed, clock=lambda: 10.4)
    kinds = [type(e) for e in events]
    assert kinds[0] is SpeechStart and kinds[-2:] == [SpeechEnd, Final]
    partials = [e for e in events if isinstance(e, Partial)]
    assert len(partials) >= 2 and [p.rev for p in partials] == list(range(1, len(partials) + 1))
    assert all(p.start == 1.0 and p.end > p.start for p in partials)
    final = events[-1]
    assert final.start == 1.0 and final.text.startswith("heard") and abs(final.latency - 0.4) < 1e-9
    assert final.words[0] == Word("heard", 1.0, 1.3, 0.9)  # moved from utterance time to stream time
    # "heard" was committed by two agreeing partials; the final keeps it and adds the rest.
    assert partials[-1].stable == "heard" and final.text.split()[0] == "heard" and len(final.words) == 2
    # The final decodes up to audio_end with the final beam; "heard" is in its window, so not in its prompt.
    n, beam, words, prompt = decoder.calls[-1]
    assert n == (2.0 * SAMPLE_RATE // FRAME_SAMPLES - 3) * FRAME_SAMPLES and beam == 5 and prompt is None
    assert all(beam == 1 for _, beam, _, _ in decoder.calls[:-1])


def test_slow_engine_skips_partials_never_finals():
    decoder = FakeDecoder(delay=0.05)

    async def feed(queue, worker):
        start = 0
        for utt in range(1, 6):
            for item in utterance(utt, start, 3.0):
                if isinstance(item, UtteranceAudio):
                    worker.queued_samples += len(item.pcm)
                await queue.put(item)
                await asyncio.sleep(0.0005)  # audio arrives ~60x faster than real time
            start += 4 * SAMPLE_RATE

    worker, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.2))
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.utt for f in finals] == [1, 2, 3, 4, 5]
    assert worker.partials_skipped > 0
    assert worker.queued_samples == 0 and worker.lag == 0
    assert worker.rtf > 0


def test_flags_doubtful_and_empty_finals():
    class Doubtful(FakeDecoder):
        def decode(self, audio, *, beam_size, words, prompt=None, hotwords=None):
            text = "" if len(self.calls) else "thank you thank you thank you"
            self.calls.append(len(audio))
            found = tuple(Word(w, 0.1 * i, 0.1 * i + 0.1, 0.3) for i, w in enumerate(text.split()))
            return Transcript(text, (Segment(0.0, 1.0, text, found),) if text else (), "en", -1.5, 3.1, 0.8, 1.0, 0.0)

    async def feed(queue, worker):
        for item in utterance(1, 0, 0.6) + utterance(2, 20000, 0.6):
            await queue.put(item)

    _, events = run_worker(Doubtful(), feed, cfg=AsrConfig(partial_interval_s=5.0))
    finals = [e for e in events if isinstance(e, Final)]
    assert finals[0].flags == ("possible_hallucination",)
    assert finals[1].flags == ("empty",) and finals[1].text == ""


class Scripted(FakeDecoder):
    """Returns the given hypotheses in turn (the last one again when they run out)."""

    def __init__(self, hypotheses):
        super().__init__()
        self.hypotheses = hypotheses

    def decode(self, audio, *, beam_size, words, prompt=None, hotwords=None):
        self.calls.append((len(audio), beam_size, words, prompt))
        text = self.hypotheses[min(len(self.calls) - 1, len(self.hypotheses) - 1)]
        found = tuple(Word(w, 0.1 * i, 0.1 * i + 0.1, 0.9) for i, w in enumerate(text.split()))
        return Transcript(text, (Segment(0.0, 1.0, text, found),), "en", -0.2, 1.2, 0.01, len(audio) / 16000, 0.0)


def test_stable_words_are_never_retracted_not_even_by_the_final():
    hypotheses = ["the cat", "the cat sad", "the cat sat on", "the cat sat on the mat",
                  "the cat sat on the mat.", "the bat sat on a mat.", "a mat. It purred"]
    decoder = Scripted(hypotheses)

    async def feed(queue, worker):
        for item in utterance(1, 0, 4.0):
            await queue.put(item)
            await asyncio.sleep(0.001)

    _, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.5))
    partials = [e for e in events if isinstance(e, Partial)]
    final = events[-1]
    assert len(partials) >= 6
    stables = [p.stable for p in partials] + [final.text]
    for earlier, later in zip(stables, stables[1:]):
        assert later.startswith(earlier), f"{earlier!r} was retracted in {later!r}"
    # A word is committed only when two decodes in a row agree on it.
    assert partials[0].stable == "" and partials[1].stable == "the cat"
    assert partials[2].stable == "the cat" and partials[3].stable == "the cat sat on"
    assert final.text.startswith("the cat sat on the mat.")
    for p in partials:
        assert p.text == f"{p.stable} {p.unstable}".strip()


def test_the_final_does_not_repeat_committed_words_still_in_its_window():
    long = "the red fox has read many books but"
    decoder = Scripted([long, long + " there's", long + " there's always more to read."])

    async def feed(queue, worker):
        for item in utterance(1, 0, 1.6):
            await queue.put(item)
            await asyncio.sleep(0.002)

    _, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.5))
    partials = [e for e in events if isinstance(e, Partial)]
    assert any(p.stable.startswith(long) for p in partials)
    assert events[-1].text == long + " there's always more to read."


def test_window_is_cut_after_committed_sentences_which_become_the_prompt():
    decoder = Scripted(["Hello there.", "Hello there. How", "How are", "How are you?"])

    async def feed(queue, worker):
        for item in utterance(1, 0, 3.0):
            await queue.put(item)
            await asyncio.sleep(0.002)

    _, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.5))
    (n1, _, _, p1), (n2, _, _, p2), (n3, _, _, p3) = decoder.calls[:3]
    assert p1 is None and p2 is None  # nothing committed yet
    assert p3 == "Hello there."  # committed by decodes 1 and 2, then cut off the window
    assert n3 < n2 + 0.5 * SAMPLE_RATE, "the third window starts after the committed sentence"
    assert events[-1].text.startswith("Hello there. How")
