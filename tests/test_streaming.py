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
    assert all(p.stable == "" and p.unstable == p.text for p in partials)
    # The final decodes the whole utterance up to audio_end with the final beam.
    n, beam, words, prompt = decoder.calls[-1]
    assert n == (2.0 * SAMPLE_RATE // FRAME_SAMPLES - 3) * FRAME_SAMPLES and beam == 5 and words
    assert all(beam == 1 and not words for _, beam, words, _ in decoder.calls[:-1])


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

