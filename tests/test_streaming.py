import asyncio
import dataclasses
import logging
import threading
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

import numpy as np
import pytest

from captiond.config import AsrConfig
from captiond.engine import SHORT, Engine, Preempted, Segment, Transcript, WhisperDecoder, among, rivals, speakers_language
from captiond.events import Error, Final, Partial, SpeechEnd, SpeechStart, Word
from captiond.frames import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, int16_to_float
from captiond.gate import UtteranceAudio, UtteranceEnd, UtterancePause, UtteranceStart
from captiond.rules import TINY_EN, WHISPER, ends_sentence, looping
from captiond.stable import StableWords
from captiond.streaming import UtteranceStream
from captiond.window import AudioWindow
from captiond.worker import MIC, SESSION, AsrWorker
from conftest import CORPUS, FakeDecoder, ShortWindowLoops, caught_up, clip, read_wav, silence, trimmed
from wer import wer

SAMPLE = Path(__file__).resolve().parents[1] / "daemon" / "captiond" / "samples" / "demo.wav"


def utterance(utt, start, seconds, captured=0.0):
    n = int(seconds * SAMPLE_RATE) // FRAME_SAMPLES
    items = [UtteranceStart(utt, start)]
    for i in range(n):  # the last 10 frames unvoiced, as the gate's hangover
        items.append(UtteranceAudio(utt, np.full(FRAME_SAMPLES, 100, np.int16), start + (i + 1) * FRAME_SAMPLES,
                                    max(0, i + 11 - n) * 30))
    end = start + n * FRAME_SAMPLES
    items.append(UtteranceEnd(utt, end - 10 * FRAME_SAMPLES, end - 3 * FRAME_SAMPLES, "silence", captured))
    return items


def rare_partials(**kw):
    """A worker config whose partials come only after 30 s of an utterance: none in these tests."""
    return AsrConfig(partial_interval_s=30, first_partial_s=30, **kw)


def run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.5), clock=time.monotonic, end_at_pause=None,
               finals=None, name="microphone"):
    published = []

    async def main():
        queue = asyncio.Queue(maxsize=10000)
        engine = Engine(decoder)
        worker = AsrWorker(engine, cfg, queue, published.append, clock=clock, end_at_pause=end_at_pause,
                           finals=finals, name=name)
        task = asyncio.create_task(worker.run())
        feeding = asyncio.create_task(feed(queue, worker))
        await asyncio.wait({task, feeding}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():  # the worker failed while being fed: its exception, not the feed's wait for it
            feeding.cancel()
            task.result()
            raise AssertionError("the worker ended before its feed did")
        await feeding
        await queue.put(None)
        await asyncio.wait_for(task, 60)
        engine.close()
        return worker

    return asyncio.run(main()), published


def test_with_partials_off_each_utterance_is_decoded_once_at_its_end():
    async def feed(queue, worker):
        for item in utterance(1, 16000, 3.0):
            await queue.put(item)
            await asyncio.sleep(0.001)

    worker, events = run_worker(FakeDecoder(), feed, cfg=AsrConfig(partials=False, early_final=False))
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd, Final] and events[-1].text
    assert dict(worker.decodes) == {"final": 1}


def test_a_partial_decode_that_raises_costs_the_partials_and_says_the_final_still_comes():
    class PartialsFail(FakeDecoder):
        def decode(self, audio, *, beam_size, **kw):
            if beam_size == 1:
                raise RuntimeError("out of memory")
            return super().decode(audio, beam_size=beam_size, **kw)

    async def feed(queue, worker):
        for item in utterance(1, 16000, 3.0):
            await queue.put(item)
            await caught_up(worker)

    worker, events = run_worker(PartialsFail(), feed)
    errors = [e for e in events if isinstance(e, Error)]
    assert len(errors) == 1 and errors[0].code == "decode_failed" and "its final still comes" in errors[0].message
    assert not any(isinstance(e, Partial) for e in events)
    assert isinstance(events[-1], Final) and events[-1].text and "error" not in events[-1].flags


def test_partials_then_speech_end_then_final_with_stream_times():
    decoder = FakeDecoder()

    async def feed(queue, worker):
        for item in utterance(1, 16000, 2.0, captured=10.0):
            await queue.put(item)
            await caught_up(worker)

    # stable_from_s = 0: a 2 s utterance would have no stable word at all
    worker, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.5, stable_from_s=0), clock=lambda: 10.4)
    kinds = [type(e) for e in events]
    assert kinds[0] is SpeechStart and kinds[-2:] == [SpeechEnd, Final]
    partials = [e for e in events if isinstance(e, Partial)]
    assert len(partials) >= 2 and [p.rev for p in partials] == list(range(1, len(partials) + 1))
    assert all(p.start == 1.0 and p.end > p.start for p in partials)
    final = events[-1]
    assert final.start == 1.0 and final.text.startswith("heard") and abs(final.latency - 0.4) < 1e-9
    assert final.words[0] == Word("heard", 1.0, 1.3, 0.9)  # moved from utterance time to stream time
    # "heard" (0-0.3 s) begins every hypothesis: it becomes stable once a partial has heard a second
    # of audio after it, and stays.
    stable = [p.stable for p in partials]
    assert stable[0] == "" and stable[-1] == "heard" and stable == sorted(stable)
    assert all(p.end - p.start >= 1.3 for p in partials if p.stable)
    assert all(p.text == f"{p.stable} {p.unstable}".strip() for p in partials)
    # The final decodes the whole utterance up to audio_end with the final beam.
    n, beam, words, prompt = decoder.calls[-1]
    assert n == (2.0 * SAMPLE_RATE // FRAME_SAMPLES - 3) * FRAME_SAMPLES and beam == 5 and words
    # Partials are greedy but for the checks, decoded at the final's beam, that make words stable.
    beams = [beam for _, beam, _, _ in decoder.calls[:-1]]
    assert set(beams) == {1, 5} and beams[0] == 1


def test_finals_fall_back_to_sampling_only_when_configured_and_partials_never():
    async def feed(queue, worker):
        for item in utterance(1, 16000, 2.0):
            await queue.put(item)
            await caught_up(worker)

    for on in (False, True):
        decoder = FakeDecoder()
        run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.5, temperature_fallback=on))
        beams = [beam for _, beam, _, _ in decoder.calls]
        assert beams[-1] == 5 and 1 in beams  # partials, then the final
        assert decoder.fallbacks == [False] * (len(beams) - 1) + [on]  # the final alone, when configured


def test_slow_engine_skips_partials_never_finals():
    decoder = SlowPartials(delay=0.05)  # a partial under way ends only when a final's decode stops it

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
    # Each utterance's partial either found events waiting (skipped), or was under way at its end
    # and gave way to the final.
    assert worker.partials_given_way + worker.partials_skipped >= 5 and worker.partials_given_way >= 1
    assert worker.queued_samples == 0 and worker.lag == 0
    assert worker.rtf > 0


def test_flags_doubtful_and_empty_finals():
    class Doubtful(FakeDecoder):
        def decode(self, audio, *, beam_size, words, **_):
            text = "" if len(self.calls) else "thank you thank you thank you"
            self.calls.append(len(audio))
            found = tuple(Word(w, 0.1 * i, 0.1 * i + 0.1, 0.3) for i, w in enumerate(text.split()))
            return Transcript(text, (Segment(0.0, 1.0, text, found, -1.5, 0.8),) if text else (), "en", -1.5, 3.1, 0.8,
                              1.0, 0.0)

    async def feed(queue, worker):
        for item in utterance(1, 0, 0.6) + utterance(2, 20000, 0.6):
            await queue.put(item)

    _, events = run_worker(Doubtful(), feed, cfg=AsrConfig(partial_interval_s=5.0, first_partial_s=5.0))
    finals = [e for e in events if isinstance(e, Final)]
    assert finals[0].flags == ("possible_hallucination",)
    assert finals[1].flags == ("empty",) and finals[1].text == ""


def test_a_final_whisper_hears_no_speech_in_and_is_unsure_of_is_withheld_not_published():
    def transcript(p, no_speech=0.9, logprob=-0.98):
        said = (Word("You", 0.1, 0.4, p),)
        return Transcript("You", (Segment(0.0, 0.5, "You", said, logprob, no_speech),), "en", logprob, 0.5, no_speech,
                          1.0, 0.1)

    def final(t, stable=()):
        stream = UtteranceStream(1, 0, 0.4, rules=TINY_EN)
        stream.words.committed = list(stable)
        return stream.final(t, UtteranceEnd(1, 16000, 16000, "silence", 0.0), 0.1)

    withheld = final(transcript(0.009))  # tiny.en on a noise burst, as logged by the daemon
    assert (withheld.text, withheld.words, withheld.flags) == ("", (), ("possible_hallucination", "withheld"))
    assert final(transcript(0.2)).text == "You"  # a word that may be real: flagged only
    doubted_speech = final(transcript(0.03, no_speech=0.1, logprob=-1.3))  # garbled speech: Whisper heard speech
    assert doubted_speech.text == "You" and doubted_speech.flags == ("possible_hallucination",)
    assert final(transcript(0.009), stable=["You"]).text == "You"  # published as stable: a final keeps it

    def guess(first_p, no_speech=0.89, words="Thank you so much for watching"):
        said = tuple(Word(w, 0.3 * i, 0.3 * i + 0.2, first_p if i == 0 else 0.9) for i, w in enumerate(words.split()))
        return Transcript(words, (Segment(0.0, 3.0, words, said, -0.43, no_speech),), "en", -0.43, 1.6, no_speech, 3.0, 0.1)

    # Sure of no speech, and the first word a guess the rest follows: tiny.en on noise bursts and puffs.
    for words in ("Thank you so much for watching", "Oh, oh, oh, oh, oh, oh, oh, oh", "I don't know, I don't know, I don't"):
        assert final(guess(0.003, words=words)).text == ""
    assert final(guess(0.003)).flags == ("possible_hallucination", "withheld")
    assert final(guess(0.003, no_speech=0.7)).text == "Thank you so much for watching"  # less sure: flagged only
    assert final(guess(0.027, no_speech=0.7, words="I can't, I can't, I can't, I can't, I can")).text == ""  # a loop
    assert final(guess(0.06)).text == "Thank you so much for watching"  # the first word may be real


def test_loop_detector():
    assert looping("Montreal up, up, up, up, up.".split(), TINY_EN)
    assert looping("ask not ask not ask not ask not what".split(), TINY_EN)
    assert not looping("thank you thank you thank you".split(), TINY_EN)  # three times may be real speech
    assert not looping("the cat sat on the mat and the dog sat on the rug".split(), TINY_EN)


def test_a_final_that_loops_is_flagged_and_not_carried_over_as_context():
    class Loops(FakeDecoder):
        def decode(self, audio, *, beam_size, words, prompt=None, **kw):
            self.calls.append(prompt)
            text = "I said no no no no no" if len(self.calls) == 1 else "fine"
            return Transcript(text, (Segment(0.0, 1.0, text, (), -0.3, 0.01),), "en", -0.3, 1.5, 0.01, 1.0, 0.0)

    async def feed(queue, worker):
        for item in utterance(1, 0, 0.6) + utterance(2, 12000, 0.6):  # well inside asr.carry_over_s
            await queue.put(item)

    decoder = Loops()
    _, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=5.0, first_partial_s=5.0, early_final=False))
    finals = [e for e in events if isinstance(e, Final)]
    assert finals[0].flags == ("repetition",) and finals[0].text == "I said no no no no no"
    assert finals[1].flags == () and decoder.calls == [None, None]



def pause_before(end):
    """The gate's pause hint for an utterance that then ends at `end`: 90 ms after its last voiced frame."""
    return UtterancePause(end.utt, end.end, end.end + 3 * FRAME_SAMPLES)


def test_final_decode_starts_at_the_pause_and_is_used_when_the_utterance_ends_there():
    decoder = FakeDecoder(delay=0.05)
    items = utterance(1, 0, 2.0)
    end = items[-1]

    async def feed(queue, worker):
        for item in items[:-1] + [pause_before(end)]:
            await queue.put(item)
        await asyncio.sleep(0.2)  # the rest of the hangover: the decode runs meanwhile
        await queue.put(end)

    worker, events = run_worker(decoder, feed, cfg=rare_partials())
    assert worker.speculations_used == 1 and worker.speculations_wasted == 0
    assert [beam for _, beam, _, _ in decoder.calls] == [5]  # one final decode, not two
    assert decoder.calls[0][0] == end.end + 3 * FRAME_SAMPLES and events[-1].text.startswith("heard")


@pytest.mark.parametrize("ending, went_on, asked", [  # the fake says "heard 1.20" and then the ending
    (" so far.", False, True), (" so far?", False, True), ("", False, False), (" so far...", False, False),
    (". Done.", False, False),  # a one-word sentence: Whisper's full stop after a slow word
    (". We are done." * 4, False, False),  # a loop: its full stop says nothing of the speech
    (" so far.", True, False)])
def test_an_early_final_that_ends_a_sentence_asks_the_gate_to_end_the_utterance_at_its_pause(ending, went_on, asked):
    items = utterance(1, 0, 3.0)
    pause = UtterancePause(1, 40 * FRAME_SAMPLES, 43 * FRAME_SAMPLES)
    asks = []

    items[41:44] = [dataclasses.replace(a, unvoiced_ms=30 * k) for k, a in enumerate(items[41:44], 1)]

    async def feed(queue, worker):
        for item in items[:44] + [pause]:
            await queue.put(item)
        if went_on:  # speech went on before the decode was done: it is not the final, nothing is asked
            for item in items[44:]:
                await queue.put(item)
        await caught_up(worker)  # the early final's decode is done (or was dropped), its callback queued

    worker, events = run_worker(FakeDecoder(delay=0.1, ending=ending), feed, cfg=rare_partials(),
                                end_at_pause=lambda utt, voiced_end: asks.append((utt, voiced_end)))
    assert asks == ([(1, 40 * FRAME_SAMPLES)] if asked else [])
    assert worker.speculations_wasted == int(went_on)


def test_silence_after_a_pause_never_discards_a_slow_early_final():
    # A 2 s hangover and a decode slower than the audio after the pause: only a voiced frame would
    # say the speech went on, so the early final is still the final and still ends the sentence.
    items = utterance(1, 0, 1.0)[:-1]  # its end replaced: the pause goes on for 2 s
    voiced_end, spoken = items[-1].end, len(items)
    for k in range(1, 67):
        items.append(UtteranceAudio(1, np.zeros(FRAME_SAMPLES, np.int16), voiced_end + k * FRAME_SAMPLES, 30 * k))
    asks = []

    async def feed(queue, worker):
        for item in items[:spoken]:
            await queue.put(item)
        await queue.put(UtterancePause(1, voiced_end, voiced_end + 3 * FRAME_SAMPLES))
        for item in items[spoken:]:
            await queue.put(item)
        await caught_up(worker)  # the decode (0.2 s) ends while the pause goes on
        await queue.put(UtteranceEnd(1, voiced_end, voiced_end + 3 * FRAME_SAMPLES, "sentence_end", 0.0))

    worker, events = run_worker(FakeDecoder(delay=0.2, ending=" so far."), feed, cfg=rare_partials(),
                                end_at_pause=lambda utt, end: asks.append((utt, end)))
    assert asks == [(1, voiced_end)]
    assert worker.speculations_used == 1 and worker.speculations_wasted == 0 and sum(worker.decodes.values()) == 1
    assert events[-1].text.startswith("heard")


class SlowPartials(FakeDecoder):
    """Greedy partials that would take `hold` seconds, or until `finish` is set, unless their stop is
    set at a safe point (then Preempted, as the real model does); every other decode takes `delay`."""

    def __init__(self, hold=10.0, delay=0.0):
        super().__init__(delay)
        self.hold = hold
        self.finish = threading.Event()
        self.partial_began = threading.Semaphore(0)
        self.preempted = 0

    def decode(self, audio, *, beam_size, stop=None, **kw):
        if beam_size == 1:
            self.partial_began.release()
            deadline = time.monotonic() + self.hold
            while not self.finish.is_set() and time.monotonic() < deadline:
                if stop is not None and stop.wait(min(0.01, self.hold)):
                    self.preempted += 1
                    raise Preempted("given up")
        return super().decode(audio, beam_size=beam_size, stop=stop, **kw)


@pytest.mark.parametrize("ends_at", ["end", "pause"])
def test_a_final_decode_does_not_wait_for_the_partial_under_way(ends_at):
    # Speech stops while a partial decodes: the final's decode (at the end, or begun at the pause) has
    # the partial give way at once, and no partial of the utterance comes after its final.
    decoder = SlowPartials()
    items = utterance(1, 0, 2.0)
    end = items[-1]

    async def feed(queue, worker):
        for item in items[:-1]:
            await queue.put(item)
            if isinstance(item, UtteranceAudio) and item.end == 20 * FRAME_SAMPLES:
                await asyncio.to_thread(decoder.partial_began.acquire)  # a partial of 0.6 s is under way
        if ends_at == "pause":
            await queue.put(pause_before(end))
        await queue.put(end)

    worker, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.5, partial_share=0))
    assert decoder.preempted == 1 and worker.partials_given_way == 1
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd, Final] and events[-1].text.startswith("heard")
    assert worker.speculations_used == (ends_at == "pause")


async def gave_way_and_holds(queue, decoder, items, upto):
    """Feed items[:upto] of a SlowPartials utterance: its partial gives way at a pause at frame 40 that
    speech goes on after, and returns once the partial asked for again (it holds) is under way."""
    first = 40 * FRAME_SAMPLES
    for item in items[:41]:
        await queue.put(item)
    await asyncio.to_thread(decoder.partial_began.acquire)
    await queue.put(UtterancePause(1, first, first + 3 * FRAME_SAMPLES))  # stops it; speech goes on
    for item in items[41:upto]:
        await queue.put(item)
    await asyncio.to_thread(decoder.partial_began.acquire)  # asked for again, once the early final is dropped


def test_a_partial_asked_for_again_after_giving_way_holds_through_the_next_pause():
    # Short pauses that speech goes on after: the first pause's early final stops the partial under way
    # and is thrown away; the partial asked for again is not stopped by the next pause (no early final
    # is begun there), or no partial would ever finish (base: none for 11-14 s).
    decoder = SlowPartials()
    items = utterance(1, 0, 4.0)
    second = 80 * FRAME_SAMPLES

    async def feed(queue, worker):
        await gave_way_and_holds(queue, decoder, items, 81)
        await queue.put(UtterancePause(1, second, second + 3 * FRAME_SAMPLES))  # begins no early final
        for item in items[81:]:
            await queue.put(item)

    worker, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.5, partial_share=0))
    assert worker.speculations_wasted == 1 and worker.speculations_used == 0, "one early final: the first pause's"
    assert decoder.preempted == 2  # the first partial at the first pause, the one that held at the end
    assert isinstance(events[-1], Final) and events[-1].text.startswith("heard")


def test_a_pause_that_comes_while_a_partial_holds_begins_its_early_final_once_that_partial_is_done():
    # The partial asked for again after giving way holds through the next pause; if speech has not gone
    # on when it is done, the pause's early final begins then, not only at the utterance's end.
    decoder = SlowPartials(hold=60.0)
    items = utterance(1, 0, 4.0)
    end = items[-1]

    async def feed(queue, worker):
        await gave_way_and_holds(queue, decoder, items, 100)
        for item in items[100:-1]:
            await queue.put(item)
        await queue.put(pause_before(end))
        while not queue.empty():
            await asyncio.sleep(0.01)
        assert not worker.speculating, "no early final while the partial holds"
        decoder.finish.set()
        await caught_up(worker)
        await queue.put(end)

    worker, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.5, partial_share=0))
    assert worker.speculations_wasted == 1 and worker.speculations_used == 1
    assert worker.decodes["speculation"] == 1 and worker.decodes["final"] == 0  # the first was dropped
    assert isinstance(events[-1], Final) and events[-1].text.startswith("heard")


class HeldFinals(FakeDecoder):
    """Finals (beam 5) that wait for `finish`, unless their stop is set at a safe point (then Preempted)."""

    def __init__(self):
        super().__init__()
        self.finish = threading.Event()
        self.began = threading.Semaphore(0)
        self.preempted = 0

    def decode(self, audio, *, beam_size, stop=None, **kw):
        if beam_size == 5:
            self.began.release()
            while not self.finish.is_set():
                if stop is not None and stop.wait(0.01):
                    self.preempted += 1
                    raise Preempted("given up")
        return super().decode(audio, beam_size=beam_size, stop=stop, **kw)


def test_a_sessions_final_gives_way_to_the_microphones_final_and_is_decoded_again():
    # A long session final (a 58 s Wyoming one) held the microphone's for 4-6 s, past a stop's drain.
    decoder = HeldFinals()
    published = []

    async def main():
        engine = Engine(decoder)
        queue = asyncio.Queue()
        session = AsrWorker(engine, AsrConfig(partials=False), queue, published.append, priority=SESSION,
                            name="session")
        task = asyncio.create_task(session.run())
        for item in utterance(1, 0, 2.0):
            await queue.put(item)
        await asyncio.to_thread(decoder.began.acquire)  # the session's final decodes
        mic = asyncio.create_task(engine.decode(np.zeros(SAMPLE_RATE, np.float32), beam_size=5, words=False,
                                                priority=MIC))
        assert await asyncio.to_thread(decoder.began.acquire, timeout=60), "the microphone's final never began"
        decoder.finish.set()
        assert (await asyncio.wait_for(mic, 60)).text == "heard 1.00"
        await queue.put(None)
        await asyncio.wait_for(task, 60)
        engine.close()

    asyncio.run(main())
    assert decoder.preempted == 1
    assert [n for n, *_ in decoder.calls][0] == SAMPLE_RATE, "the microphone's final was decoded first"
    assert isinstance(published[-1], Final) and published[-1].text.startswith("heard"), published


def test_partials_go_on_after_a_final_decode_begun_at_a_pause_is_dropped():
    decoder = SlowPartials(hold=0.0)  # partials take no time: only the pause's decode stops one
    items = utterance(1, 0, 3.0)
    early = 40 * FRAME_SAMPLES

    async def feed(queue, worker):
        for item in items[:42]:
            await queue.put(item)
            await caught_up(worker)
        await queue.put(UtterancePause(1, early, early + 3 * FRAME_SAMPLES))
        for item in items[42:]:  # speech went on: the early final is dropped, partials resume
            await queue.put(item)
            await caught_up(worker)

    worker, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.5, partial_share=0))
    assert worker.speculations_wasted == 1
    partials = [e for e in events if isinstance(e, Partial)]
    assert partials and partials[-1].end > (early + 10 * FRAME_SAMPLES) / SAMPLE_RATE, "partials after the pause"
    assert isinstance(events[-1], Final) and events[-1].text.startswith("heard")


def test_speech_that_goes_on_after_a_pause_gets_a_final_of_all_of_it():
    decoder = FakeDecoder(delay=0.05)
    items = utterance(1, 0, 3.0)
    end = items[-1]
    early = 40 * FRAME_SAMPLES  # a pause one second in; then speech went on

    async def feed(queue, worker):
        for item in items[:30]:
            await queue.put(item)
        await queue.put(UtterancePause(1, early, early + 3 * FRAME_SAMPLES))
        await asyncio.sleep(0.1)
        for item in items[30:]:
            await queue.put(item)

    worker, events = run_worker(decoder, feed, cfg=rare_partials())
    assert worker.speculations_used == 0 and worker.speculations_wasted == 1
    final_decodes = [n for n, beam, _, _ in decoder.calls if beam == 5]
    assert final_decodes[-1] == end.audio_end and abs(float(events[-1].text.split()[1]) - end.audio_end / SAMPLE_RATE) < 0.01


def scripted(hypotheses, no_speech_prob=0.01, logprob=-0.2):
    """A decoder that says the next scripted hypothesis, made to begin with the prefix as Whisper is."""

    class Scripted(FakeDecoder):
        def decode(self, audio, *, beam_size, words, prompt=None, hotwords=None, prefix=None, **_):
            self.calls.append((len(audio), beam_size, words, prompt))
            self.prefixes.append(prefix)
            said = hypotheses[min(len(self.calls), len(hypotheses)) - 1].split()
            forced = (prefix or "").split()
            text = " ".join(forced + said[len(forced):])
            heard = (Segment(0.0, 1.0, text, (), logprob, no_speech_prob),) if text else ()
            return Transcript(text, heard, "en", logprob, 1.2, no_speech_prob, 1.0, 0.0)

    return Scripted()


WORDS = st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "hat", "The", "cat.", "Sat,"])


def test_partials_are_spaced_by_a_share_of_their_window_once_it_is_long():
    stream = UtteranceStream(1, 0, 0.4, partial_share=0.1)
    due_at = []
    for frame in range(1000):  # 30 s of voiced audio, a partial whenever one is due
        stream.insert(UtteranceAudio(1, np.zeros(FRAME_SAMPLES, np.int16), 0, 0))
        if stream.partial_due():
            due_at.append(stream.samples / SAMPLE_RATE)
            stream.partial(Transcript("", (), "en", -0.2, 1.0, 0.01, 0.0, 0.0), stream.samples, checked=False)
    gaps = np.diff(due_at)
    assert gaps[:5] == pytest.approx(0.42, abs=0.03)  # the interval while the window is short
    assert gaps[-1] == pytest.approx(0.1 * due_at[-1], abs=0.05) and due_at[-1] > 25  # a tenth of the window


def test_partials_come_at_the_first_interval_until_one_has_words_then_at_the_interval():
    # A viewer waits for the first words, and the first decode (mostly preroll) often has none;
    # later partials are spaced further to spare the CPU.
    stream = UtteranceStream(1, 0, 0.8, first_partial_s=0.3)
    due_at = []
    for frame in range(200):  # 6 s of voiced audio; the first three decodes hear no word
        stream.insert(UtteranceAudio(1, np.zeros(FRAME_SAMPLES, np.int16), 0, 0))
        if stream.partial_due():
            due_at.append(stream.samples / SAMPLE_RATE)
            heard = _transcript([Word("hello", 0.1, 0.4, 0.9)]) if len(due_at) > 3 else \
                Transcript("", (), "en", -0.2, 1.0, 0.01, 0.0, 0.0)
            stream.partial(heard, stream.samples, checked=False)
    gaps = np.diff(due_at)
    assert due_at[0] == pytest.approx(0.3, abs=0.03)
    assert gaps[:3] == pytest.approx(0.3, abs=0.03) and len(gaps) > 5
    assert all(gap == pytest.approx(0.81, abs=0.03) for gap in gaps[3:])


def test_a_partial_slower_than_its_interval_spaces_the_next_by_its_decode_time():
    # A slow model (base on 2 cores, a 20 s check: 2.3 s) must not queue partials faster than it decodes them.
    stream = UtteranceStream(1, 0, 0.4, partial_share=0.1)
    due_at = []
    for frame in range(400):  # 12 s of voiced audio; every partial's decode takes 1.5 s
        stream.insert(UtteranceAudio(1, np.zeros(FRAME_SAMPLES, np.int16), 0, 0))
        if stream.partial_due():
            due_at.append(stream.samples / SAMPLE_RATE)
            stream.partial(Transcript("", (), "en", -0.2, 1.0, 0.01, 0.0, 1.5), stream.samples, checked=False)
    assert len(due_at) > 5 and all(gap == pytest.approx(1.5, abs=0.03) for gap in np.diff(due_at))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(WORDS, max_size=8).map(" ".join), min_size=1, max_size=8), st.lists(WORDS, max_size=8))
def test_a_stable_word_is_never_retracted(partial_texts, final_words):
    """Whatever the decoder says, each partial's stable text extends the last one and the final begins with it."""
    stream = UtteranceStream(1, 0, 0.5)
    decoder = scripted(partial_texts + [" ".join(final_words)])
    stable = []
    for i, _ in enumerate(partial_texts):
        t = decoder.decode(np.zeros(1), beam_size=1, words=False, prefix=stream.stable)
        p = stream.partial(t, (i + 1) * 8000)
        assert p.stable.split()[:len(stable)] == stable
        assert p.text == f"{p.stable} {p.unstable}".strip()
        stable = p.stable.split()
    t = decoder.decode(np.zeros(1), beam_size=5, words=True, prefix=stream.stable)
    final = stream.final(t, UtteranceEnd(1, 16000, 16000, "silence", 0.0), 0.1)
    assert final.text.split()[:len(stable)] == stable


def test_local_agreement_commits_what_two_partials_agree_on_but_not_the_newest_word():
    stream = UtteranceStream(1, 0, 0.5)
    decoder = scripted(["And so my", "And so my fellow Americans", "And so, my fellow Americans ask"])
    texts = []
    for i in range(3):
        p = stream.partial(decoder.decode(np.zeros(1), beam_size=1, words=False, prefix=stream.stable), i)
        texts.append((p.stable, p.unstable))
    assert texts == [("", "And so my"), ("And so my", "fellow Americans"),
                     ("And so my fellow Americans", "ask")]
    assert decoder.prefixes == ["", "", "And so my"]  # later decodes begin with the stable words


def test_a_final_that_runs_on_inside_the_last_stable_word_is_not_doubled():
    # Held-out LibriSpeech: stable "... peppered, flower", final "... peppered, flower-fattened sauce."
    # used to be published as the stable words followed by the whole final again.
    stream = UtteranceStream(1, 0, 0.5)
    stream.words.committed = "in thick, peppered, flower".split()
    said = "In thick, peppered, flower-fattened sauce."
    t = Transcript(said, (Segment(0.0, 3.0, said, (), -0.2, 0.01),), "en", -0.2, 1.2, 0.01, 3.0, 0.0)
    assert stream.keeps_stable(t)
    final = stream.final(t, UtteranceEnd(1, 48000, 48000, "silence", 0.0), 0.1)
    assert final.text == "in thick, peppered, flower-fattened sauce."
    partial = stream.partial(t, 48000)  # a partial reads the same decode the same way
    assert (partial.stable, partial.unstable) == ("in thick, peppered, flower", "-fattened sauce.")


def test_a_sentence_end_after_the_stable_words_is_not_given_to_the_decoder():
    # Dev corpus mfa_surround: with prefix "... very bad aligner." tiny.en stopped there, and
    # "but what are you gonna do" was lost from every later partial and from the final.
    stream = UtteranceStream(1, 0, 0.5)
    stream.words.committed = "This one is going to be forced very bad aligner.".split()
    assert stream.prefix == "This one is going to be forced very bad aligner"
    said = "This one is going to be forced, very bad aligner, but what are you going to do?"
    t = Transcript(said, (Segment(0.0, 5.0, said, (), -0.2, 0.01),), "en", -0.2, 1.2, 0.01, 5.0, 0.0)
    assert stream.keeps_stable(t)
    final = stream.final(t, UtteranceEnd(1, 80000, 80000, "silence", 0.0), 0.1)
    assert final.text == "This one is going to be forced very bad aligner. but what are you going to do?"
    partial = stream.partial(t, 80000)  # the stable word keeps its full stop; the decode's comma is not a word
    assert (partial.stable, partial.unstable) == ("This one is going to be forced very bad aligner.",
                                                  "but what are you going to do?")


def test_punctuation_alone_never_becomes_a_word():
    # Dev corpus mfa_breaths: greedy decodes looped on " . . ." and the dots became stable, so the
    # final had to begin with them.
    stream = UtteranceStream(1, 0, 0.5)
    decoder = scripted(["Montreal . . . .", "Montreal . . . . .", "Montreal . . . . . .", "Montreal. Forest. A liner.",
                        "Montreal. Forest. A liner."])
    for i in range(5):
        p = stream.partial(decoder.decode(np.zeros(1), beam_size=1, words=False, prefix=stream.prefix), i)
        assert all(any(c.isalnum() for c in w) for w in p.text.split()), p.text
    assert (p.stable, p.unstable) == ("Montreal. Forest. A", "liner.")


@pytest.mark.parametrize("bind", [True, False])
def test_a_long_utterance_is_decoded_in_a_bounded_window_and_loses_no_word(bind):
    # Someone reads 60 s without a pause: word i is said at 0.5 i s, a sentence ends every 8 words.
    # Unbound, the final's decode of the window hears its first stable word otherwise: it stands, after
    # the words cut off the window (60 s is past Whisper's window: no decode hears it all).
    said = [f"w{i}." if i % 8 == 7 else f"w{i}" for i in range(120)]

    class Speaker(FakeDecoder):
        def decode(self, audio, *, beam_size, words, prompt=None, prefix=None, **_):
            self.calls.append((len(audio), beam_size, words, prompt))
            self.prefixes.append(prefix)
            begin, end = stream.window.base / SAMPLE_RATE, stream.window.base / SAMPLE_RATE + len(audio) / SAMPLE_RATE
            heard = [Word(w, 0.5 * i - begin, 0.5 * i + 0.4 - begin, 0.9)
                     for i, w in enumerate(said) if begin <= 0.5 * i and 0.5 * i + 0.4 <= end]
            text = " ".join(w.word for w in heard)
            assert text.startswith(prefix or "")  # the window begins with its stable words
            return Transcript(text, (Segment(0.0, end - begin, text, tuple(heard), -0.2, 0.01),), "en", -0.2, 1.2, 0.01,
                              end - begin, 0.0)

    stream = UtteranceStream(1, 0, 0.4, context="Reading aloud.", max_window_s=10.0)
    decoder = Speaker()
    published = []
    unvoiced = 0
    for frame in range(2000):  # 30 ms frames, as the gate sends them; unvoiced between two words
        ms = frame * FRAME_MS % 500
        unvoiced = 0 if ms < 400 or ms + FRAME_MS > 500 else unvoiced + FRAME_MS
        stream.insert(UtteranceAudio(1, np.zeros(FRAME_SAMPLES, np.int16), 0, unvoiced))
        if frame % 13 < 12:
            continue
        partial = stream.partial(decoder.decode(stream.audio(), beam_size=1, words=True, prompt=stream.prompt,
                                                prefix=stream.prefix), stream.samples)  # every 0.39 s of audio
        assert partial.stable.split()[:len(published)] == published  # never retracted
        assert partial.text == f"{partial.stable} {partial.unstable}".strip()
        published = partial.stable.split()
    windows = [n / SAMPLE_RATE for n, *_ in decoder.calls]
    assert max(windows) <= 10.4 and stream.window.base > 0
    cut_off = stream.stable[:len(stream.stable) - len(stream.prefix)].strip()  # stable words no longer heard
    assert cut_off and stream.prompt == f"Reading aloud. {cut_off}"[-200:]  # they are the decoder's context
    if not bind:
        said[len(stream.words.done)] = "x"
    t = decoder.decode(stream.audio(), beam_size=5, words=True, prompt=stream.prompt,
                       prefix=stream.prefix if bind else None)
    final = stream.final(t, UtteranceEnd(1, stream.samples, stream.samples, "silence", 0.0), 0.1, bind=bind)
    assert final.text.split() == said and ("unbound" in final.flags) != bind
    assert [w.word for w in final.words] == said
    assert [w.start for w in final.words] == [0.5 * i for i in range(120)]


def test_nothing_becomes_stable_while_whisper_doubts_there_is_speech():
    # tiny.en says "You" to a noise burst with a high no-speech probability: not shown, and not made
    # stable (which would force it into the final past the no-speech check).
    stream = UtteranceStream(1, 0, 0.5)
    decoder = scripted(["You", "You", "You"], no_speech_prob=0.9)
    for i in range(3):
        p = stream.partial(decoder.decode(np.zeros(1), beam_size=1, words=False, prefix=stream.stable), i)
        assert (p.stable, p.unstable, p.text) == ("", "", "")  # the worker publishes no empty partial
    assert decoder.prefixes == ["", "", ""]


def test_a_long_stretch_whisper_hears_no_speech_in_is_not_kept_past_the_window():
    # Noise the gate let through for 40 s (music, say): nothing becomes stable, so nothing can be cut
    # at a word; the decodes still stay within max_window_s, and speech after it is heard.
    stream = UtteranceStream(1, 0, 0.4, max_window_s=10.0)
    decoder = scripted(["Oh, oh, oh"], no_speech_prob=0.9)
    for _ in range(100):
        stream.insert(UtteranceAudio(1, np.zeros(int(0.4 * SAMPLE_RATE), np.int16), 0))
        p = stream.partial(decoder.decode(stream.audio(), beam_size=1, words=False, prefix=stream.prefix),
                           stream.samples)
        assert p.text == ""
    assert max(n for n, *_ in decoder.calls) <= 10.4 * SAMPLE_RATE and stream.window.base >= 30 * SAMPLE_RATE
    stream.insert(UtteranceAudio(1, np.full(SAMPLE_RATE, 7, np.int16), 0))  # then someone speaks
    assert len(stream.audio()) < 11 * SAMPLE_RATE and stream.audio()[-1] > 0


def test_a_window_with_sure_words_in_it_is_not_cut_as_noise_whatever_its_no_speech_probability():
    # A conversation: a check past the window heard words with confidence (log-p -0.3) but a no-speech
    # probability of 0.7 in one segment; cut as noise, 54 of its 81 words were lost.
    stream = UtteranceStream(1, 0, 0.4, max_window_s=10.0)
    words = _timed("I thought you know I heard a beat this is Diane in New Jersey", step=0.5)
    heard = _doubting(_transcript(words), avg_logprob=-0.3, no_speech_prob=0.7)
    stream.insert(UtteranceAudio(1, np.full(12 * SAMPLE_RATE, 7, np.int16), 0))
    stream.partial(heard, stream.samples, checked=True)
    assert stream.window.base == 0
    doubted = _doubting(heard, avg_logprob=-1.5, no_speech_prob=0.7)  # improbable words too: Whisper's own "no speech"
    stream.partial(doubted, stream.samples, checked=True)
    assert stream.window.base > 0


def test_nothing_becomes_stable_from_decodes_whisper_itself_doubts():
    # Greedy partials said "I don't know" to breaths before speech, twice alike; made stable, it
    # would be forced into the final. Shown, but not made stable, below Whisper's log-prob threshold.
    stream = UtteranceStream(1, 0, 0.5)
    decoder = scripted(["I don't know", "I don't know.", "I don't know."], logprob=-1.4)
    for i in range(3):
        p = stream.partial(decoder.decode(np.zeros(1), beam_size=1, words=False, prefix=stream.prefix), i)
        assert p.stable == "" and p.unstable.startswith("I don't know")


async def late_stable_words(queue, worker):
    """An utterance whose early final is decoded before "the cat sat on the" became stable."""
    items = utterance(1, 0, 2.0)
    for item in items[:-1]:
        await queue.put(item)
    await queue.put(pause_before(items[-1]))
    await asyncio.sleep(0.1)  # the speculative decode is done, with no stable words yet
    worker._stream.words.committed = "the cat sat on the".split()  # as a partial in the hangover would
    await queue.put(items[-1])


def test_final_begun_before_late_stable_words_is_decoded_again():
    """A speculative final decoded with an older prefix must not drop words that became stable since."""
    decoder = scripted(["the cat sat on a hat", "the cat sat on the mat"])
    worker, events = run_worker(decoder, late_stable_words, cfg=rare_partials(bind_finals=True))
    assert decoder.prefixes == [None, "the cat sat on the"]
    assert events[-1].text == "the cat sat on the mat"


def test_unbound_a_final_that_hears_the_stable_words_otherwise_stands_flagged_unbound():
    decoder = scripted(["the cat sat on a hat", "the cat sat on the mat"])
    worker, events = run_worker(decoder, late_stable_words, cfg=rare_partials())  # unbound
    assert decoder.prefixes == [None], "no second decode bound to the stable words"
    assert events[-1].text == "the cat sat on a hat" and "unbound" in events[-1].flags
    assert worker.finals_unbound == 1 and worker.finals_bound == 0


@pytest.mark.parametrize("said, logprob", [("", -0.2), ("the cat sat on a hat", -1.5),
                                           ("the hat the hat the hat the hat the hat", -0.2)])
def test_unbound_a_free_decode_whisper_doubts_does_not_revise_the_stable_words(said, logprob):
    # Empty, improbable or looping: standing, it would replace words that passed the checks' tests.
    decoder = scripted([said, "the cat sat on the mat"], logprob=logprob)
    worker, events = run_worker(decoder, late_stable_words, cfg=rare_partials())
    assert decoder.prefixes == [None, "the cat sat on the"], "decoded again, bound"
    assert events[-1].text == "the cat sat on the mat" and "unbound" not in events[-1].flags
    assert worker.finals_bound == 1 and worker.finals_unbound == 0


@pytest.mark.slow
def test_real_decodes_of_a_growing_utterance_keep_every_stable_word_and_the_words_after_a_full_stop():
    """The policy with the real model on mfa_surround, whose stable words end with "aligner." mid-utterance."""
    item = clip("mfa_surround.wav")
    pcm = np.concatenate([silence(0.2), trimmed(read_wav(CORPUS / item["file"])), silence(0.3)])
    decoder = WhisperDecoder(AsrConfig())
    decoder.load()
    stream = UtteranceStream(1, 0, 0.4)
    step, published = round(0.4 * SAMPLE_RATE), []
    for i in range(0, len(pcm), step):
        stream.insert(UtteranceAudio(1, pcm[i:i + step], i + step))
        if not stream.partial_due():
            continue
        t = decoder.decode(stream.audio(), beam_size=1, words=True, prefix=stream.prefix or None, fallback=False)
        # A partial's decode time spaces the next one (_PARTIAL_DUTY); under load that moved which
        # decodes this test saw and so its stable words. A partial every 0.4 s keeps the test the same.
        t = dataclasses.replace(t, decode_seconds=0.0)
        p = stream.partial(t, stream.samples)
        assert p.stable.split()[:len(published)] == published
        published = p.stable.split()
    assert stream.stable.endswith("aligner.")  # the case: the final's prefix would end with a full stop
    t = decoder.decode(stream.audio(), beam_size=5, words=True, prefix=stream.prefix or None)
    final = stream.final(t, UtteranceEnd(1, len(pcm), len(pcm), "silence", 0.0), 0.1)
    assert final.text.split()[:len(published)] == published
    assert wer(item["text"], final.text) <= 0.25, final.text


def _timed(text, start=0.0, step=0.3, p=0.9):
    return tuple(Word(w, start + i * step, start + i * step + 0.25, p) for i, w in enumerate(text.split()))


def _transcript(words):
    text = " ".join(w.word for w in words)
    return Transcript(text, (Segment(words[0].start, words[-1].end, text, tuple(words), -0.3, 0.01),), "en", -0.3, 1.5, 0.01,
                      words[-1].end + 0.2, 0.1)


def _doubting(t, avg_logprob, no_speech_prob):
    """The decode with Whisper's doubt set, the same for the whole and each segment (one 30 s pass)."""
    segments = tuple(dataclasses.replace(s, avg_logprob=avg_logprob, no_speech_prob=no_speech_prob) for s in t.segments)
    return dataclasses.replace(t, segments=segments, avg_logprob=avg_logprob, no_speech_prob=no_speech_prob)


def test_a_pass_whisper_doubts_keeps_only_its_own_words_from_becoming_stable():
    # base, a 31.5 s window, heard in two 30 s passes: the second, of trailing audio, had a no-speech
    # probability of 0.66; taken for the whole decode's, no word of the first pass became stable.
    stream = UtteranceStream(1, 0, 0.5)
    first = _timed("with extension 1234 and password 4242 that user is configured", step=2.5)
    second = _timed("if you dialed", start=30.2, p=0.4)
    said = " ".join(w.word for w in (*first, *second))
    passes = (Segment(0.0, first[-1].end, said[:said.index(" if")], first, -0.3, 0.05),
              Segment(30.2, second[-1].end, "if you dialed", second, -0.9, 0.66))
    heard = Transcript(said, passes, "en", -0.9, 1.5, 0.66, 31.5, 1.0)
    stream.partial(heard, round(31.5 * SAMPLE_RATE), checked=True)
    partial = stream.partial(heard, round(32.0 * SAMPLE_RATE), checked=True)
    assert (partial.stable, partial.unstable) == ("with extension 1234 and password 4242 that user is configured", "")


def test_a_final_that_loops_is_cut_back_to_one_saying():
    # tiny.en under load: "... Thank you for your time, thank you for your time, ..." six times.
    stream = UtteranceStream(1, 0, 0.4, rules=TINY_EN)
    words = _timed("We will call you back. " + "Thank you for your time, " * 6)
    final = stream.final(_transcript(words), UtteranceEnd(1, 16000 * 10, 16000 * 10, "silence", 0.0), 0.1)
    assert final.text == "We will call you back. Thank you for your time,"
    assert "repetition" in final.flags and len(final.words) == 10
    # every loop goes, not only the first
    two = _timed("We will call you back. " + "Thank you. " * 3 + "Bye bye. " * 20)
    final = stream.final(_transcript(two), UtteranceEnd(1, 16000 * 20, 16000 * 20, "silence", 0.0), 0.1)
    assert final.text == "We will call you back. Thank you. Bye" and "repetition" in final.flags
    # speech that repeats itself is kept
    said = _timed("Hello? Hello? Oh, hello. five five five")
    assert stream.final(_transcript(said), UtteranceEnd(1, 16000 * 4, 16000 * 4, "silence", 0.0), 0.1).text == \
        "Hello? Hello? Oh, hello. five five five"


@pytest.mark.parametrize("full, text", [("word word word word Word.", "word word word word Word."),
                                        ("more " * 6, "word,"), ("", "word,")])
def test_a_final_that_loops_in_the_short_window_is_decoded_again_hearing_the_whole_window(full, text):
    # tiny.en on the dev clip mfa_words: "word," seven times through the short window, cut to one; through
    # Whisper's whole window "word word word word Word." (five sayings: too few to be cut, enough to be
    # flagged). A retry that loops too, or says nothing, is not taken: the first decode's loop is cut.
    async def feed(queue, worker):
        for item in utterance(1, 0, 2.0):
            await queue.put(item)

    decoder = ShortWindowLoops(full)
    worker, events = run_worker(decoder, feed, cfg=AsrConfig(partials=False, early_final=False))
    final = next(e for e in events if isinstance(e, Final))
    assert (final.text, final.flags) == (text, ("repetition",))
    assert decoder.windows[-2:] == [SHORT, None] and worker.decodes["retry"] == 1


def test_a_final_that_loops_heard_whole_too_is_decoded_once_more_without_its_prompt():
    # Base, a 31 s utterance's window after a cut: "to a polite to a polite …" through the short window
    # and through the whole one, both with the words cut off as the prompt; cutting the loop lost the 25
    # words after it. Without the prompt it said them. Only when there is a prompt to leave out.
    class PromptLoops(ShortWindowLoops):
        def decode(self, audio, *, prompt=None, window=None, **kw):
            self.full = "more " * 6 if prompt or self.always else "to a polite, don't call menu."
            return super().decode(audio, prompt=prompt, window=None, **kw)

    async def feed(queue, worker):
        for item in utterance(1, 0, 2.0):
            await queue.put(item)

    for prompt, always, text, prompts in (("Dial 4, to send this caller", False, "to a polite, don't call menu.",
                                           ["Dial 4, to send this caller"] * 2 + [None]),
                                          ("", True, "more", [None, None])):  # no prompt: no third decode
        decoder = PromptLoops("")
        decoder.always = always
        worker, events = run_worker(decoder, feed,
                                    cfg=AsrConfig(partials=False, early_final=False, initial_prompt=prompt))
        final = next(e for e in events if isinstance(e, Final))
        assert final.text == text and [c[3] for c in decoder.calls] == prompts, (prompt, final, decoder.calls)


def test_a_retry_under_bind_finals_begins_with_the_stable_words_or_is_not_taken(monkeypatch):
    # "word," made stable by a check; the first decode keeps it and loops. A free retry that does not
    # begin with it would have the final say the stable word and then the whole retry.
    made = UtteranceStream.__init__

    def with_a_stable_word(self, *args, **kw):
        made(self, *args, **kw)
        self.words.committed = ["word,"]

    monkeypatch.setattr(UtteranceStream, "__init__", with_a_stable_word)

    async def feed(queue, worker):
        for item in utterance(1, 0, 2.0):
            await queue.put(item)

    for full, text in (("word word word word Word.", "word, word word word Word."), ("other words here", "word,")):
        worker, events = run_worker(ShortWindowLoops(full), feed,
                                    cfg=AsrConfig(partials=False, early_final=False, bind_finals=True))
        final = next(e for e in events if isinstance(e, Final))
        assert worker.decodes["retry"] == 1 and final.text == text, (full, final)


def test_no_retry_past_the_short_window_when_stopping_or_for_decodes_not_the_models_own():
    def feed_of(seconds):
        async def feed(queue, worker):
            for item in utterance(1, 0, seconds):
                await queue.put(item)
        return feed

    class FallbackLoops(ShortWindowLoops):  # decoded here because an inference server failed
        def decode(self, audio, **kw):
            return dataclasses.replace(super().decode(audio, **kw), origin="fallback")

    class Stopping(ShortWindowLoops):  # the daemon is told to stop while the final decodes
        def decode(self, audio, **kw):
            self.worker.stop()
            return super().decode(audio, **kw)

    class Failing(ShortWindowLoops):
        def decode(self, audio, *, window=None, **kw):
            if window is None:
                raise RuntimeError("out of memory")
            return super().decode(audio, window=window, **kw)

    once = AsrConfig(partials=False, early_final=False)
    assert SHORT.cuts(22.0) and not SHORT.cuts(22.5)  # past 22 s the short window is Whisper's whole one
    stopping = Stopping("fine")
    for cfg, decoder, seconds in ((once, FakeDecoder(), 2.0),
                                  (dataclasses.replace(once, short_window=False), ShortWindowLoops("fine"), 2.0),
                                  (once, ShortWindowLoops("fine"), 24.0),
                                  (once, FallbackLoops("fine"), 2.0),
                                  (once, stopping, 2.0)):
        async def feed(queue, worker, seconds=seconds):
            stopping.worker = worker
            await feed_of(seconds)(queue, worker)

        worker, events = run_worker(decoder, feed, cfg=cfg)
        assert worker.decodes["retry"] == 0 and len(decoder.calls) == 1, decoder
        assert next(e for e in events if isinstance(e, Final)).text
    # a retry that fails costs nothing: the first decode, its loop cut, is the final
    worker, events = run_worker(Failing("fine"), feed_of(2.0), cfg=once)
    final = next(e for e in events if isinstance(e, Final))
    assert final.text == "word," and "repetition" in final.flags and worker.decodes["retry"] == 0


def test_a_loop_the_decoder_ran_on_past_the_audio_is_cut_from_what_it_heard_too():
    # tiny.en on 1.1 s of "ten of clubs" (a Wyoming session): three sayings, the third placed after the
    # audio and left out by the engine; the two left made too few to be cut.
    stream = UtteranceStream(1, 0, 0.4, rules=TINY_EN)
    end = UtteranceEnd(1, round(1.2 * SAMPLE_RATE), round(1.3 * SAMPLE_RATE), "silence", 0.0)
    heard = _transcript(_timed("10 of clubs.. 10 of clubs..", step=0.2))
    looped = dataclasses.replace(heard, unheard=("10", "of", "clubs.."))
    final = stream.final(looped, end, 0.1)
    assert final.text == "10 of clubs.." and len(final.words) == 3 and "repetition" in final.flags
    # a loop only in what was left out is gone already: the final is what was heard, unflagged
    once = dataclasses.replace(_transcript(_timed("Thank you.", step=0.2)), unheard=("Thank", "you.") * 2)
    final = stream.final(once, end, 0.1)
    assert (final.text, final.flags) == ("Thank you.", ())


def test_improbable_words_run_on_past_the_last_voiced_frame_are_cut_from_the_final():
    # "... or 8 for more options. as." (p 0.06) on a prompt that ends at "options.".
    stream = UtteranceStream(1, 0, 0.4, rules=TINY_EN)
    words = (*_timed("or 8 for more options."), Word("as.", 1.5, 1.7, 0.06))
    end = UtteranceEnd(1, round(1.6 * SAMPLE_RATE), round(1.8 * SAMPLE_RATE), "silence", 0.0)
    assert stream.final(_transcript(words), end, 0.1).text == "or 8 for more options."
    # as probable a word there is kept; so is an improbable one well inside the speech
    sure = (*_timed("or 8 for more options."), Word("please.", 1.5, 1.7, 0.8))
    assert stream.final(_transcript(sure), end, 0.1).text == "or 8 for more options. please."
    inside = (*_timed("or 8 for more options."), Word("now.", 1.5, 1.7, 0.06))
    late = UtteranceEnd(1, round(2.5 * SAMPLE_RATE), round(2.7 * SAMPLE_RATE), "silence", 0.0)
    assert stream.final(_transcript(inside), late, 0.1).text == "or 8 for more options. now."
    # the rules fitted to tiny.en are off for other models
    assert UtteranceStream(1, 0, 0.4).final(_transcript(words), end, 0.1).text == "or 8 for more options. as."


def test_the_tail_rule_never_cuts_a_stable_word():
    # Had it cut "options." the final would have said the stable words, then the whole decode again.
    stream = UtteranceStream(1, 0, 0.4, rules=TINY_EN)
    stream.words.committed = "or 8 for more options.".split()
    words = (*_timed("or 8 for more"), Word("options.", 1.5, 1.7, 0.06))
    end = UtteranceEnd(1, round(1.6 * SAMPLE_RATE), round(1.8 * SAMPLE_RATE), "silence", 0.0)
    assert stream.final(_transcript(words), end, 0.1).text == "or 8 for more options."


@pytest.fixture(scope="module")
def tiny():
    """The bundled model, loaded once for this file's real-model tests."""
    decoder = WhisperDecoder(AsrConfig())
    decoder.load()
    return decoder


@pytest.mark.slow
def test_a_final_bound_to_stable_words_says_them_once_with_the_real_model(tiny):
    # The sample's first 6 s with a second of silence: decoded bound to all it says, tiny.en ends on an
    # improbable "happened." at the voiced end, which the tail rule used to cut, doubling the final.
    pcm = read_wav(SAMPLE)[:6 * SAMPLE_RATE]
    audio = int16_to_float(np.concatenate([pcm, silence(1.0)]))
    decoder = tiny
    said = decoder.decode(audio, beam_size=5, words=True).text
    stream = UtteranceStream(1, 0, 0.4, rules=decoder.rules)
    stream.words.committed = said.split()
    bound = decoder.decode(audio, beam_size=5, words=True, prefix=stream.prefix)
    final = stream.final(bound, UtteranceEnd(1, len(pcm), len(audio), "silence", 0.0), 0.1)
    letters = lambda text: "".join(c for c in text.lower() if c.isalnum())  # noqa: E731
    assert letters(final.text).startswith(letters(said)) and len(letters(final.text)) < 1.3 * len(letters(said)), \
        (said, final.text)


@pytest.mark.slow
def test_a_decode_that_loops_reaches_no_final_with_the_real_model(tiny):
    # 48 s (two of Whisper's windows) decoded bound to all the sample says: tiny.en goes on
    # "Thank you. Thank you. Bye bye. Bye bye. …" to the end of the first window.
    pcm = read_wav(SAMPLE)
    audio = int16_to_float(np.concatenate([pcm, silence(3.0)]))
    decoder = tiny
    # Without the temperature fallback, as live finals are decoded: it samples, so it loops only sometimes.
    said = decoder.decode(audio, beam_size=5, words=True, fallback=False).text
    looped = decoder.decode(audio, beam_size=5, words=True, prefix=said, fallback=False)
    assert looping(looped.text.split(), decoder.rules), looped.text  # the real model really loops here
    stream = UtteranceStream(1, 0, 0.4, rules=decoder.rules)
    stream.words.committed = said.split()
    final = stream.final(looped, UtteranceEnd(1, len(pcm), len(audio), "silence", 0.0), 0.1)
    assert not looping(final.text.split(), decoder.rules) and final.text.lower().count("bye") <= 2, final.text
    assert "repetition" in final.flags


@pytest.mark.slow
def test_real_repetition_the_short_window_loops_on_is_kept_with_the_real_model(tiny):
    # The dev clip mfa_words ends "… here's some more word word word word word": through the short
    # window tiny.en writes "Word." seven times, a loop cut back to one; hearing the whole window, five.
    pcm = read_wav(CORPUS / "mfa_words.wav")
    assert tiny.decode(int16_to_float(pcm), beam_size=5, words=True, window=SHORT, fallback=False).unlooped(tiny.rules)[1]

    async def feed(queue, worker):
        await queue.put(UtteranceStart(1, 0))
        await queue.put(UtteranceAudio(1, pcm, len(pcm), 0))
        await queue.put(UtteranceEnd(1, len(pcm), len(pcm), "silence", 0.0))

    worker, events = run_worker(tiny, feed, cfg=AsrConfig(partials=False, early_final=False,
                                                          temperature_fallback=False))
    final = next(e for e in events if isinstance(e, Final))
    assert worker.decodes["retry"] == 1, final
    assert [w.strip(".,").lower() for w in final.text.split()][-5:] == ["word"] * 5, final.text


def test_partials_stuck_at_a_stable_word_are_decoded_without_it_until_a_word_more_is_stable():
    # base, bound to "... the VoiceOver" (Whisper writes "VoiceOverIP"), stopped there on every decode.
    stream = UtteranceStream(1, 0, 0.5)
    stream.words.committed = "test out the VoiceOver".split()
    stuck = _transcript(_timed("test out the VoiceOver"))
    for covered in (6, 7):  # one decode that says nothing new is no stall
        assert stream.partial_prefix == stream.prefix == "test out the VoiceOver"
        stream.partial(stuck, covered * SAMPLE_RATE, checked=True)
    assert stream.partial_prefix == "test out the" and stream.prefix == "test out the VoiceOver"
    on = _transcript(_timed("test out the VoiceOverIP capabilities of Asterisk"))
    stream.partial(on, 8 * SAMPLE_RATE, checked=False)
    assert stream.partial_prefix == "test out the"  # until a word more is stable
    partial = stream.partial(on, 9 * SAMPLE_RATE, checked=True)
    assert partial.stable == "test out the VoiceOver IP capabilities of"  # no stable word changed
    assert stream.partial_prefix == stream.prefix == "test out the VoiceOver IP capabilities of"


def test_the_worker_decodes_partials_without_a_stable_word_whisper_stops_at():
    # base, bound to "... the VoiceOver" (Whisper writes "VoiceOverIP"), stopped there on every decode.
    class Stuck(FakeDecoder):
        def decode(self, audio, *, beam_size, words, prompt=None, hotwords=None, prefix=None, **_):
            self.calls.append((len(audio), beam_size, words, prompt))
            self.prefixes.append(prefix)
            if prefix and prefix.endswith("VoiceOver"):
                text = prefix
            elif len(audio) < 4 * SAMPLE_RATE:
                text = "If you'd like to test out the VoiceOver IP"
            else:
                text = "If you'd like to test out the VoiceOverIP capabilities of Asterisk"
            return Transcript(text, (Segment(0.0, 1.0, text, (), -0.2, 0.01),), "en", -0.2, 1.2, 0.01, 1.0, 0.0)

    async def feed(queue, worker):
        for item in utterance(1, 0, 9.0):
            await queue.put(item)
            await caught_up(worker)  # the same decodes however busy the machine

    decoder = Stuck()
    worker, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.4))
    stable = [e.stable for e in events if isinstance(e, Partial)]
    assert all(later.startswith(sooner) for sooner, later in zip(stable, stable[1:]))
    assert "If you'd like to test out the" in decoder.prefixes  # the stall's prefix, less "VoiceOver"
    assert stable[-1].startswith("If you'd like to test out the VoiceOver IP capabilities")
    assert events[-1].text == "If you'd like to test out the VoiceOver IP capabilities of Asterisk"  # stable words stand


def test_under_translate_no_word_settles_so_a_transcribing_check_cannot_bind_the_final():
    # base under asr.task = translate sometimes transcribed the first seconds ("Lo siento ..."): made
    # stable, they bound the final, which Whisper doubted, to Spanish (CI, test_languages).
    class Translating(FakeDecoder):
        def decode(self, audio, *, beam_size, words, prompt=None, hotwords=None, prefix=None, **_):
            self.calls.append((len(audio), beam_size, words, prompt))
            self.prefixes.append(prefix)
            english = "I'm sorry, this is an invalid extension, please try again."
            text = prefix + " " + "intente de nuevo" if prefix else "Lo siento, esa es una extension" \
                if len(audio) < 8 * SAMPLE_RATE else english
            logprob = -1.2 if text == english else -0.3  # the translation is the doubted decode
            return Transcript(text, (Segment(0.0, 1.0, text, (), logprob, 0.01),), "es", logprob, 1.2, 0.01, 1.0, 0.0)

    async def feed(queue, worker):
        for item in utterance(1, 0, 9.0):
            await queue.put(item)
            await caught_up(worker)

    decoder = Translating()
    worker, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.4, task="translate"))
    assert not any(e.stable for e in events if isinstance(e, Partial))
    assert [beam for _, beam, _, _ in decoder.calls[:-1]] == [1] * (len(decoder.calls) - 1), "no check"
    assert not any(decoder.prefixes)
    assert events[-1].text == "I'm sorry, this is an invalid extension, please try again."

    # partials decoded at the final's beam are checks too, and settle nothing under translate either
    decoder = Translating()
    worker, events = run_worker(decoder, feed, cfg=AsrConfig(partial_interval_s=0.4, task="translate",
                                                             partial_beam_size=5))
    assert not any(e.stable for e in events if isinstance(e, Partial)) and not any(decoder.prefixes)
    assert events[-1].text == "I'm sorry, this is an invalid extension, please try again."


def test_words_become_stable_only_on_partials_decoded_at_the_finals_beam():
    stream = UtteranceStream(1, 0, 0.5)
    greedy, beam = _transcript(_timed("How do you do")), _transcript(_timed("Had he gone home"))
    for covered in (2, 3, 4):  # greedy decodes agree with each other, but make nothing stable
        stream.partial(greedy, covered * SAMPLE_RATE, checked=False)
    assert stream.stable == "" and stream.wants_check()
    stream.partial(beam, 5 * SAMPLE_RATE, checked=True)  # the check disagrees: still nothing
    assert stream.stable == "" and not stream.wants_check()
    stream.partial(_transcript(_timed("Had he gone home now")), 6 * SAMPLE_RATE, checked=False)
    stream.partial(_transcript(_timed("Had he gone home now")), 6 * SAMPLE_RATE, checked=False)
    stream.partial(_transcript(_timed("Had he gone home now")), 7 * SAMPLE_RATE, checked=True)
    assert stream.stable == "Had he gone home"


def test_no_word_becomes_stable_before_a_check_heard_stable_from_s_of_the_utterance():
    stream = UtteranceStream(1, 0, 0.5, stable_from_s=3.0)
    words = _transcript(_timed("You are about to enter an echo test"))
    for covered in (1.5, 2.5):  # agreeing checks of the first 2.5 s bind nothing: they heard too little
        stream.partial(words, round(covered * SAMPLE_RATE), checked=True)
    assert stream.stable == ""
    stream.partial(words, 3 * SAMPLE_RATE, checked=True)
    assert stream.stable == "You are about to enter an"  # the words that end 1 s (stable_after_s) before 3 s


@pytest.mark.parametrize("bind", [True, False])
def test_a_final_is_decoded_free_and_again_bound_to_the_stable_words_only_when_it_disagrees(bind):
    class Disagrees(FakeDecoder):
        def decode(self, audio, *, beam_size, words, prompt=None, hotwords=None, prefix=None, **kw):
            self.prefixes.append(prefix)
            if prefix:
                said = prefix + " home."
            elif kw.get("window") is not None and beam_size > 1 and len(audio) >= 3.5 * SAMPLE_RATE:
                said = "Add he gone home."  # the final's free decode hears it otherwise than the check did
            else:
                said = "Had he gone home." if beam_size > 1 else "Had he gone"
            timed = _timed(said)
            return Transcript(said, (Segment(0.0, timed[-1].end, said, timed, -0.2, 0.01),), "en", -0.2, 1.2, 0.01,
                              len(audio) / SAMPLE_RATE, 0.01)

    async def feed(queue, worker):
        for item in utterance(1, 0, 4.0):
            await queue.put(item)
            await caught_up(worker)

    decoder = Disagrees()
    cfg = AsrConfig(partial_interval_s=0.3, early_final=False, stable_from_s=0, bind_finals=bind)
    worker, events = run_worker(decoder, feed, cfg=cfg)
    final = events[-1]
    stable = max((e.stable for e in events if isinstance(e, Partial)), key=len)
    assert stable
    if bind:
        assert final.text.startswith(stable) and "unbound" not in final.flags  # never retracted
        assert worker.finals_bound == 1 and decoder.prefixes[-2] is None and decoder.prefixes[-1] == stable.rstrip(".")
    else:  # the final's own decode stands, and says that it revised the stable words
        assert final.text == "Add he gone home." and "unbound" in final.flags
        assert worker.finals_bound == 0 and worker.finals_unbound == 1 and decoder.prefixes[-1] is None


def test_a_loop_in_partials_is_never_made_stable_and_a_disagreeing_check_changes_nothing():
    stream = UtteranceStream(1, 0, 0.5, rules=TINY_EN)
    looping_text = _transcript(_timed("Hello. " * 7 + "I didn't know you were there."))
    stream.partial(looping_text, 5 * SAMPLE_RATE, checked=False)
    p = stream.partial(looping_text, 6 * SAMPLE_RATE, checked=True)
    assert stream.stable == "" and p.text == "Hello."  # one saying, shown; the loop is neither
    stream.partial(_transcript(_timed("Hello. I didn't know")), 7 * SAMPLE_RATE, checked=True)
    assert stream.stable == "Hello."
    p = stream.partial(_transcript(_timed("Oh, hello. I didn't know you")), 8 * SAMPLE_RATE, checked=True)
    assert stream.stable == "Hello." and p.text == "Hello. I didn't know"  # does not begin with it: nothing changes


def _window_with_pauses(seconds: float, *pauses: tuple[float, float]) -> AudioWindow:
    """A window of `seconds` of 30 ms frames, voiced but for the (from, to) second spans given."""
    window = AudioWindow(0)
    unvoiced = 0
    for k in range(round(seconds * 1000 / FRAME_MS)):
        quiet = any(a * 1000 <= k * FRAME_MS < b * 1000 for a, b in pauses)
        unvoiced = unvoiced + FRAME_MS if quiet else 0
        window.insert(np.zeros(FRAME_SAMPLES, np.int16), unvoiced)
    return window


def test_the_window_is_cut_only_in_a_pause_the_gate_heard():
    # A check left words out ("You have also [installed a set of sample sounds and] configuration
    # files"): its next word came late, and the widest gap between two stable words was speech. A cut
    # there lost the words, which had never become stable.
    window = _window_with_pauses(10.0, (2.0, 2.3))  # the pause: 2.01-2.31 s, gate frames ending there
    assert window.pause_in(1.9, 2.3) == pytest.approx(2.16)
    assert window.pause_in(3.1, 6.5) is None, "voiced all through"
    timed = [Word("Well,", 0.0, 1.9, 0.9), Word("you", 2.3, 2.5, 0.9), Word("have", 2.5, 2.8, 0.9),
             Word("also", 2.8, 3.1, 0.9), Word("configuration", 6.5, 7.2, 0.9), Word("files", 7.2, 7.6, 0.9),
             Word("that", 7.6, 8.0, 0.9)]

    # Placed by the words alone, the cut fell in the widest gap, 3.1-6.5 s, after "also": speech.
    in_a_pause = StableWords("", WHISPER, 1.0)
    in_a_pause.committed = [w.word for w in timed[:-1]]
    assert in_a_pause.cut_point(timed, 0.0, window.pause_in) == pytest.approx(2.16)
    assert in_a_pause.done == ["Well,"] and in_a_pause.committed[0] == "you"
    window.cut(round(2.16 * SAMPLE_RATE))
    assert window.pause_in(0.0, 0.1) == pytest.approx(0.075), "only the half of the pause left in the window"


def test_a_cut_never_takes_off_speech_a_decode_misplaced_after_the_last_stable_word():
    # A check placed the words after "now." 8 s late (a 4.5-12.5 s "gap" that was speech). Cut in the
    # widest pause touching that gap, at 9.1 s, the window lost "If you'd like to test out the VoiceOver
    # IP capabilities of Asterisk": the first words were stable but not cut off, the rest never stable.
    window = _window_with_pauses(15.0, (4.5, 4.9), (8.8, 9.4))
    assert window.pause_in(4.52, 12.54) == pytest.approx(4.71, abs=0.02)
    timed = [Word("dial", 3.5, 4.08, 0.9), Word("now.", 4.08, 4.52, 0.9), Word("If", 12.54, 13.06, 0.9),
             Word("you'd", 13.06, 13.3, 0.9)]
    words = StableWords("", WHISPER, 1.0)
    words.committed = ["dial", "now.", "If"]
    assert words.cut_point(timed, 0.0, window.pause_in) == pytest.approx(4.71, abs=0.02)
    assert words.done == ["dial", "now."] and words.committed == ["If"]
    far_only = _window_with_pauses(15.0, (8.8, 9.4))
    assert far_only.pause_in(4.52, 12.54) is None, "4 s of voice before the only pause"
    assert far_only.pause_in(8.7, 12.54) == pytest.approx(9.12, abs=0.02), "a word end a little early is no loss"


def test_past_whisper_s_window_a_check_s_word_times_alone_never_cut_it():
    # base, live: checks stuck on a stable word placed all the stable words at the end of a 32 s window;
    # cut by those times (past 30 s the gate's pauses were not asked), 25 s of speech left the window.
    stream = UtteranceStream(1, 0, 0.4, max_window_s=15.0)
    for _ in range(round(32.0 * 1000 / FRAME_MS)):  # voiced all through
        stream.insert(UtteranceAudio(1, np.zeros(FRAME_SAMPLES, np.int16), 0, 0))
    stream.words.committed = ["If", "you", "would"]
    misplaced = [Word("If", 29.0, 29.3, 0.9), Word("you", 29.3, 29.6, 0.9), Word("would", 29.6, 29.9, 0.9),
                 Word("like", 30.5, 31.0, 0.9)]
    stream.partial(_transcript(misplaced), stream.samples, checked=True)
    assert stream.window.base == 0 and stream.words.done == [], "no pause heard: no cut"


@pytest.mark.parametrize("whole_agrees, bind, served", [(True, True, False), (False, True, False), (False, False, False),
                                                        (False, True, True)])
def test_a_cut_utterance_that_fits_whisper_s_window_gets_the_final_of_all_of_it(whole_agrees, bind, served, caplog):
    # Someone reads 20 s: word i at 0.5 i s, a sentence end every 8 words; windows are cut at 8 s.
    # Every frame's samples hold its number, so the decoder knows what audio it was given.
    said = [f"w{i}." if i % 8 == 7 else f"w{i}" for i in range(40)]
    tail = ["Thanks", "for", "watching."]

    class Reader(FakeDecoder):
        def decode(self, audio, *, beam_size, words, prompt=None, prefix=None, **_):
            self.calls.append((len(audio), beam_size, words, prompt))
            begin = (round(audio[0] * 32768) - 1) * FRAME_SAMPLES / SAMPLE_RATE
            seconds = len(audio) / SAMPLE_RATE
            heard = [Word(w, 0.5 * i - begin, 0.5 * i + 0.4 - begin, 0.9)
                     for i, w in enumerate(said) if begin <= 0.5 * i and 0.5 * i + 0.4 <= begin + seconds]
            if begin == 0 and seconds > 12 and not whole_agrees:  # all 20 s heard otherwise than the checks did
                heard[0] = Word("x0", heard[0].start, heard[0].end, 0.9)
            if begin > 0 and beam_size > 1 and not prefix:  # a window's free decode runs on at the end
                heard += [Word(w, seconds - 0.3 + 0.1 * k, seconds - 0.25 + 0.1 * k, 0.9) for k, w in enumerate(tail)]
            text = " ".join(w.word for w in heard)
            if prefix:
                assert text.startswith(prefix)
            return Transcript(text, (Segment(0.0, seconds, text, tuple(heard), -0.2, 0.01),), "en", -0.2, 1.2, 0.01,
                              seconds, 0.0)

    async def feed(queue, worker):
        await queue.put(UtteranceStart(1, 0))
        frames = int(20.5 * SAMPLE_RATE) // FRAME_SAMPLES
        unvoiced = 0
        for k in range(frames):
            ms = k * FRAME_MS % 500  # unvoiced between two words (the window is cut only in a pause)
            unvoiced = 0 if ms < 400 or ms + FRAME_MS > 500 else unvoiced + FRAME_MS
            await queue.put(UtteranceAudio(1, np.full(FRAME_SAMPLES, k + 1, np.int16), (k + 1) * FRAME_SAMPLES, unvoiced))
            await caught_up(worker)
        await queue.put(UtteranceEnd(1, frames * FRAME_SAMPLES, frames * FRAME_SAMPLES, "silence", 0.0))

    class Server:
        """A server's finals: it answers the whole utterance's request, then fails (a local fallback)."""

        async def decode(self, audio, **kwargs):
            t = decoder.decode(audio, **kwargs)
            served_calls.append(len(audio))
            return dataclasses.replace(t, origin="fallback" if len(served_calls) > 1 else "remote")

    decoder, served_calls = Reader(), []
    cfg = AsrConfig(partial_interval_s=0.4, max_window_s=8.0, early_final=False, bind_finals=bind)
    caplog.set_level(logging.DEBUG, logger="captiond")
    worker, events = run_worker(decoder, feed, cfg=cfg, finals=Server() if served else None, name="session 7")
    final = events[-1]
    stable = max((e.stable for e in events if isinstance(e, Partial)), key=len)
    assert worker.decodes["check"] and max(n for n, *_ in decoder.calls[:-2]) <= 9 * SAMPLE_RATE  # cut (8 s and a partial's spacing)
    # A session's utterance numbers overlap the microphone's: its lines, the stream's too, say whose they are.
    said_by = [r.getMessage() for r in caplog.records if r.name in ("captiond.worker", "captiond.streaming")]
    assert any(m.startswith("session 7: utterance 1: ") and "cut off the window" in m for m in said_by)
    assert said_by and all(m.startswith("session 7: ") for m in said_by), said_by
    assert worker.decodes["whole final"] == 1
    if served:  # the server's whole decode cannot be bound: the window's, decoded here, keeps the stable words
        assert worker.decodes["final"] == 1 and worker.decodes["bound"] == 0
        assert final.text.startswith(stable) and final.flags == ("fallback",)
        return
    if not bind:  # the whole utterance's decode stands, though it hears the first stable word otherwise
        assert final.text.split() == ["x0", *said[1:]] and "unbound" in final.flags
        assert worker.decodes["bound"] == 0 and worker.decodes["final"] == 0
        assert [w.start for w in final.words] == [0.5 * i for i in range(40)]
        return
    assert final.text.startswith(stable)
    if whole_agrees:  # the whole utterance's decode is the final: no run-on tail, words timed from its start
        assert final.text.split() == said and worker.decodes["final"] == 0
        assert [w.start for w in final.words] == [0.5 * i for i in range(40)]
    else:  # it would retract a stable word: the window's decode bound to them, no free one before it
        assert worker.decodes["bound"] == 1 and worker.decodes["final"] == 0 and worker.finals_bound == 1
        assert final.text.split() == said  # not the tail a free decode of the window ran on with


def test_under_auto_the_speaker_s_language_is_told_to_short_audio_and_offered_to_detection():
    class Lingual(FakeDecoder):
        """Detects in turn what `detections` says, as (language, probability); or decodes in the language it is told."""

        detections: list[tuple[str, float]]
        likely: list[str]

        def decode(self, audio, *, language="", likely="", **kwargs):
            t = super().decode(audio, language=language, **kwargs)
            if not language:
                self.likely.append(likely)
            detected, p = self.detections.pop(0) if not language else (language, 1.0)
            return dataclasses.replace(t, language=detected, language_p=p)

    async def feed(queue, worker):
        for item in [*utterance(1, 0, 3.0), *utterance(2, 160000, 1.0), *utterance(3, 320000, 3.0),
                     *utterance(4, 480000, 1.0), *utterance(5, 640000, 3.0), *utterance(6, 800000, 1.0)]:
            await queue.put(item)

    decoder = Lingual()
    decoder.detections, decoder.likely = [("fr", 0.9), ("it", 0.3), ("de", 0.8)], []
    worker, events = run_worker(decoder, feed, cfg=AsrConfig(language="auto", partials=False, early_final=False))
    # 3 s: detected (sure); 1 s: told; 3 s: Italian, unsure: not the speaker's; 1 s: still told French;
    # 3 s: German surely, the speaker's from now on; 1 s: told German.
    assert decoder.languages == ["", "fr", "", "fr", "", "de"]
    assert decoder.likely == ["", "fr", "fr"]  # detection is offered the speaker's language (engine.speakers_language)
    assert [f.language for f in events if isinstance(f, Final)] == ["fr", "fr", "it", "fr", "de", "de"]
    assert worker.heard_language == "de"
    assert decoder.verified == [True] * 6  # each a final (partials are off)


def test_only_a_decode_of_an_utterance_s_end_may_check_an_unsure_language_by_decoding_again():
    async def feed(queue, worker):
        for item in utterance(1, 16000, 3.0):
            await queue.put(item)
            await caught_up(worker)

    decoder = FakeDecoder()
    worker, _ = run_worker(decoder, feed, cfg=AsrConfig(language="auto", partial_interval_s=0.5, early_final=False))
    assert worker.decodes["partial"] >= 2 and worker.decodes["final"] == 1
    assert decoder.verified.count(True) == 1 and decoder.verified[-1], decoder.verified  # the final alone


def test_a_bound_decode_is_in_the_language_the_utterance_s_first_decode_chose():
    class InSpanish(FakeDecoder):
        """Detects Spanish unsurely (as a rival's decode chosen over base's Polish); told a language, decodes in it."""

        def decode(self, audio, *, prefix=None, language="", verify=False, **_):
            self.prefixes.append(prefix)
            self.languages.append(language)
            forced = (prefix or "").split()
            said = ("the cat sat on a hat" if prefix is None else "the cat sat on the mat").split()
            text = " ".join(forced + said[len(forced):])
            return Transcript(text, (Segment(0.0, 1.0, text, (), -0.2, 0.01),), language or "es", -0.2, 1.2, 0.01,
                              1.0, 0.0, language_p=1.0 if language else 0.19)

    decoder = InSpanish()
    worker, events = run_worker(decoder, late_stable_words, cfg=rare_partials(bind_finals=True, language="auto"))
    assert decoder.prefixes == [None, "the cat sat on the"] and decoder.languages == ["", "es"]
    assert events[-1].language == "es" and events[-1].text == "the cat sat on the mat"
    assert worker.heard_language == ""  # told Spanish, the bound decode did not make it the speaker's


def test_detection_keeps_the_speaker_s_language_unless_it_names_one_far_likelier():
    # base's detections of three Spanish clips and a French one (bench: languages.py --streamed).
    assert speakers_language("it", 0.65, [("it", 0.65), ("es", 0.28)], "es") == ("es", 0.28)
    assert speakers_language("pl", 0.54, [("pl", 0.54), ("es", 0.17)], "es") == ("es", 0.17)
    assert speakers_language("he", 0.63, [("he", 0.63), ("fr", 0.03), ("es", 0.0083)], "es") == ("he", 0.63)
    assert speakers_language("fr", 0.99, [("fr", 0.99), ("es", 0.0007)], "es") == ("fr", 0.99)  # a new speaker
    assert speakers_language("it", 0.65, [("it", 0.65), ("es", 0.28)], "") == ("it", 0.65)  # none known yet


def test_an_unsure_detection_has_as_rivals_the_likeliest_languages_not_far_less_probable():
    # base's detections of Spanish clips (bench: languages.py): the second Spanish, the third far behind.
    assert rivals("pl", 0.47, [("pl", 0.47), ("es", 0.19), ("it", 0.14), ("pt", 0.1)]) == ["es", "it"]
    assert rivals("la", 0.38, [("la", 0.38), ("es", 0.36), ("ca", 0.01)]) == ["es"]
    assert rivals("it", 0.82, [("it", 0.82), ("es", 0.13)]) == []  # sure: decoded in it alone
    assert rivals("en", 0.49, [("en", 0.49), ("cy", 0.02)]) == []


def test_detection_among_the_configured_languages_rescales_their_probabilities():
    probs = [("it", 0.6), ("es", 0.3), ("en", 0.05), ("fr", 0.05)]
    assert among(probs, frozenset({"es", "en"})) == [("es", pytest.approx(0.3 / 0.35)), ("en", pytest.approx(0.05 / 0.35))]
    assert among(probs, frozenset({"zh", "ja"})) == [("ja", 0.5), ("zh", 0.5)]  # none heard: still one of them


@pytest.mark.parametrize("text, ends", [
    ("The red fox has read many books.", True), ("Ten of clubs?", True), ('He said "stop here."', True),
    ("Fail again. Fail better.", False),  # a two-word sentence: a full stop Whisper writes after slow words
    ("Montreal. Forced? A liner.", False), ("Well... so it goes.", True), ("Hello.", False),
    ("I hardly know her", False), ("and then...", False), ("and then…", False), ("", False),
    ("Yes sir !", False),  # a lone mark is no word
    ("And then came Mr.", False), ("He went to see Dr.", False),  # a title waits for its name
    ("We met at five p.m.", True), ("They said, “we are done.”", True),
    ("今日はいい天気です。", True), ("我很好。谢谢。", False), ("はい。", False), ("好的，然后", False),
    # a filled pause holds the floor, and is no word of the sentence
    ("Montreal forced, uh, um, uh, mmm, mmm, mmm.", False), ("And so we went, um.", False),
    ("Il est parti, euh.", False), ("Uh, um, okay.", False), ("Um, I think so.", True), ("Hmm. Er, we know.", False),
])
def test_only_a_sentence_of_three_words_or_more_may_end_an_utterance_early(text, ends):
    for rules in (TINY_EN, WHISPER):
        assert ends_sentence(text, rules) is ends


def test_no_early_final_of_more_audio_than_whispers_window():
    # An utterance nobody watched partials of keeps its window uncut: a pause 20 s in gets an early
    # final, one 40 s in does not (its decode would be a second 30 s pass, held a stop past its drain).
    items = utterance(1, 0, 45.0)
    pauses = {20.0: UtterancePause(1, int(20.0 * SAMPLE_RATE), int(20.1 * SAMPLE_RATE)),
              40.0: UtterancePause(1, int(40.0 * SAMPLE_RATE), int(40.1 * SAMPLE_RATE))}

    async def feed(queue, worker):
        for item in items:
            if isinstance(item, UtteranceAudio):
                for at, pause in list(pauses.items()):
                    if item.end >= pause.audio_end:
                        await queue.put(pause)
                        del pauses[at]
                        while worker.speculating or not queue.empty():
                            await asyncio.sleep(0.01)
            await queue.put(item)

    worker, events = run_worker(FakeDecoder(), feed, cfg=AsrConfig(partials=False))
    assert worker.speculations_wasted == 1 and worker.decodes["speculation"] + worker.decodes["whole speculation"] == 1
    assert events[-1].text


def test_the_gate_queue_is_bounded_by_the_audio_in_it_not_its_events():
    # A gate catching up hands over many frames in one event: counting events let twice the audio wait
    # (a lag of 233 s at asr.queue_seconds = 120).
    from captiond.config import AsrConfig
    from captiond.gate import UtteranceAudio
    from captiond.worker import gate_queue

    queue = gate_queue(AsrConfig(queue_seconds=5))
    piece = UtteranceAudio(1, np.zeros(SAMPLE_RATE, np.int16), SAMPLE_RATE)  # a second in one event
    for _ in range(5):
        queue.put_nowait(piece)
    assert queue.full() and queue.qsize() == 5
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(piece)
    queue.get_nowait()
    assert not queue.full()
