"""Replay recordings through the daemon's gate and ASR worker, with no microphone: where does it lose words?

Every recording is played whole (its own pauses inside, 1 s of silence around it) through the
daemon's own Gate and AsrWorker on the real model, the worker being fed at the pace it takes the
audio (as a microphone would if the decoder keeps up). Each recording is replayed twice: as
configured, and as the naive baseline (each utterance decoded once at its end, beam 5, no context).
Both are held against the whole recording decoded offline (faster-whisper's defaults, full window:
what recording and transcribing afterwards gives; bench/corpora.py). Prints the recordings where
streamed and naive differ, then the WER of each and their ratios, and the CPU time each spent.

tiny.en answers the same speech cut 5 samples later with other words, so --phases N replays every
recording at N alignments of the gate's 30 ms frames and pools the words.

The worker spaces partials by what the last decode took (streaming._PARTIAL_DUTY), so with measured
times a replay's decodes, and its WER, changed with the machine's load (0.027 and 0.029 for the same
code). Unless --measured, each decode is taken to have cost what COST says it costs on this 2-core
machine idle: the same decodes, and words, on any machine, busy or not.

    .venv/bin/python bench/replay.py [--corpus continuous --part tune] [--phases N] [--only ID] [--texts FILE]
                                     [--set section.KEY=VALUE ...] [--quiet]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT / "scripts")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from corpora import CORPORA, PARTS, Recording, WholeReference, recordings  # noqa: E402
from conftest import silence  # noqa: E402
from wer import corpus_wer, normalize, wer  # noqa: E402

from captiond.config import AsrConfig, Config, load  # noqa: E402
from captiond.engine import Engine, Transcript, WhisperDecoder  # noqa: E402
from captiond.models import resolve_model  # noqa: E402
from captiond.events import Final  # noqa: E402
from captiond.frames import FRAME_SAMPLES, SAMPLE_RATE, FrameAssembler  # noqa: E402
from captiond.gatedriver import GateStage  # noqa: E402
from captiond.worker import AsrWorker, gate_queue  # noqa: E402

COST = {1: (0.07, 0.044), 5: (0.0, 0.07)}
"""Seconds a decode of tiny.en took here idle (2 cores, int8, word times), by beam: (fixed, per audio
second); greedy 2-15 s windows 0.17-0.72 s, beam 5 a 5 s final 0.30 s, 22-25 s 1.35-1.83 s
(docs/benchmarks.md, twenty-third and twenty-fifth rounds). Other beams take the nearer one's."""

SLOWER = {"base": 0.107 / 0.062}
"""A model's decode time over tiny.en's here (`make bench-models`' real-time factors)."""


class PacedDecoder:
    """The decoder, each Transcript's decode_seconds replaced by COST's (`measured` keeps the real ones)."""

    def __init__(self, decoder: WhisperDecoder, scale: float) -> None:
        self._decoder = decoder
        self._scale = scale
        self.measured = 0.0
        """Seconds the decodes really took."""

    def __getattr__(self, name: str):
        return getattr(self._decoder, name)

    def decode(self, audio: np.ndarray, **kwargs) -> Transcript:
        """WhisperDecoder.decode, taken to cost what COST says."""
        t = self._decoder.decode(audio, **kwargs)
        self.measured += t.decode_seconds
        fixed, per_s = COST[1 if kwargs["beam_size"] < 3 else 5]
        return dataclasses.replace(t, decode_seconds=self._scale * (fixed + per_s * len(audio) / SAMPLE_RATE))


NAIVE = dict(partials=False, early_final=False, carry_over_s=0.0)
"""The naive baseline: the same worker decoding each utterance only once it has ended, with no context."""


def cpu_seconds() -> float:
    """CPU time this process has used, all its threads (the model's) included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def replay(engine: Engine, config: Config, asr: AsrConfig, pcm: np.ndarray,
                 decodes: Counter[str]) -> list[Final]:
    """The recording's finals as a worker with `asr` publishes them; adds its decodes by kind
    (and their seconds, as "KIND s") to `decodes`. Frames reach the gate one at a time, each once the
    worker has taken all before it and finished a final begun at a pause: the pace of a decoder that
    keeps up, whose early final is done before gate.sentence_end_ms can end the utterance on it."""
    finals: list[Final] = []
    queue = gate_queue(asr)
    stage = GateStage(config.gate)
    worker = AsrWorker(engine, asr, queue, lambda e: finals.append(e) if isinstance(e, Final) else None,
                       end_at_pause=stage.end_at_pause)
    task = asyncio.get_running_loop().create_task(worker.run(), name="replay-worker")
    frames = FrameAssembler()
    for i in range(0, len(pcm) + 1, FRAME_SAMPLES):
        last = i >= len(pcm)
        for event in stage.feed(frames.finish(0.0) if last else frames.insert(pcm[i:i + FRAME_SAMPLES], 0.0), last):
            await worker.put(event)
        while not worker.idle:
            await asyncio.sleep(0.001)
    await worker.put(None)
    await task
    decodes.update(worker.decodes)
    decodes.update({f"{k} s": v for k, v in worker.decode_seconds.items()})
    decodes.update(speculations_wasted=worker.speculations_wasted, finals=worker.finals,
                   unbound=worker.finals_unbound)
    return finals


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=CORPORA, default="continuous")
    parser.add_argument("--part", choices=PARTS, default="tune",
                        help="continuous only: the part settings are tuned on, the held-out part, or all")
    parser.add_argument("--clips", type=int, default=0, help="only the first N recordings (default: all)")
    parser.add_argument("--phases", type=int, default=1, help="replay each recording at N frame alignments (default 1)")
    parser.add_argument("--only", help="only recordings whose id contains this")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    parser.add_argument("--texts", type=Path, help="also write every recording's texts, a JSON line each, to this file")
    parser.add_argument("--measured", action="store_true",
                        help="space partials by the decodes' measured times, as the daemon does (then the "
                             "words depend on the machine's load), not by COST's model of them")
    args = parser.parse_args()
    config = load(None, args.set)[0]
    texts_out = args.texts.open("w", buffering=1) if args.texts else None  # a bad path fails now, not minutes in
    modes = {"streamed": config.asr, "naive": dataclasses.replace(config.asr, **NAIVE)}
    decoder = WhisperDecoder(config.asr)
    engine = Engine(decoder if args.measured else PacedDecoder(decoder, SLOWER.get(config.asr.model, 1.0)))
    await engine.load()
    whole = WholeReference(resolve_model(config.asr.model).load_target(), config.asr.compute_type, config.asr.cpu_threads)
    recs: list[Recording] = [r for r in recordings(args.corpus, args.part) if (args.only or "") in r.id]
    recs = recs[: args.clips or None]
    pairs: dict[str, list[tuple[str, str]]] = {m: [] for m in (*modes, "whole")}
    cost = dict.fromkeys(modes, 0.0)
    decodes: dict[str, Counter[str]] = {m: Counter() for m in modes}
    started = time.monotonic()
    for rec in recs:
        reference = whole.text(rec)
        for k in range(args.phases):
            shift = np.zeros(k * FRAME_SAMPLES // args.phases, dtype=np.int16)
            pcm = np.concatenate([shift, silence(1.0), rec.pcm, silence(1.0)])
            texts = {"whole": reference}
            for mode, asr in modes.items():
                before = cpu_seconds()
                texts[mode] = " ".join(f.text for f in await replay(engine, config, asr, pcm, decodes[mode]) if f.text)
                cost[mode] += cpu_seconds() - before
            for m in pairs:
                pairs[m].append((rec.text, texts[m]))
            if texts_out:
                texts_out.write(json.dumps({"id": rec.id, "shift": len(shift), "set": args.set,
                                            "reference": rec.text, **texts}) + "\n")
            errors = {m: round(wer(rec.text, texts[m]) * len(normalize(rec.text))) for m in pairs}
            if not args.quiet and errors["streamed"] != errors["naive"]:
                print(f"{rec.id} (shift {len(shift)}): REF {rec.text}\n"
                      + "".join(f"  {m} ({errors[m]} errors): {texts[m]}\n" for m in pairs), flush=True)
    engine.close()
    audio = sum(r.seconds for r in recs) * args.phases
    words = sum(len(normalize(r.text)) for r in recs)
    print(f"\n{args.corpus}{'/' + args.part if args.corpus == 'continuous' else ''}: {len(recs)} recordings, "
          f"{audio / args.phases:.0f} s, {words} words, {args.phases} alignment(s); "
          f"{' '.join(args.set) or 'defaults'}; {time.monotonic() - started:.0f} s")
    w = {m: corpus_wer(pairs[m]) for m in pairs}

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "—"  # a recording with no error in the reference's decode
    print("| mode | WER | / whole recording | / naive | CPU s per audio s |\n|---|---|---|---|---|")
    for m in pairs:
        spent = f"{cost[m] / audio:.3f}" if m in cost else "—"
        print(f"| {m} | {w[m]:.3f} | {ratio(w[m], w['whole'])} | {ratio(w[m], w['naive'])} | {spent} |")
    kinds = ("partial", "check", "speculation", "whole speculation", "final", "whole final", "bound", "retry")
    print("\n| mode | " + " | ".join(kinds) + " | speculations wasted | finals (unbound) |\n|---"
          + "|---" * (len(kinds) + 2) + "|")
    for m in modes:
        d = decodes[m]
        print(f"| {m} | " + " | ".join(f"{d[k]} ({d[k + ' s'] / audio:.3f} s/s)" for k in kinds)
              + f" | {d['speculations_wasted']} | {d['finals']} ({d['unbound']}) |")
    if isinstance(engine.decoder, PacedDecoder):
        print(f"\nDecode seconds above are COST's model of them (the CPU column is measured); the decodes "
              f"took {engine.decoder.measured:.0f} s here. --measured spaces partials by the measured times.")


if __name__ == "__main__":
    asyncio.run(main())
