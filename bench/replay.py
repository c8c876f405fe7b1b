"""Replay the streaming policy on dev corpus files, with no microphone: where does it lose words?

For every clip the daemon's gate cuts the utterances; each is then decoded three ways on identical
audio: as the daemon does (greedy partials every asr.partial_interval_s with the stable prefix, the
final begun at the 90 ms pause when the utterance ends there), as the naive baseline does (one
decode at the end, 210 ms of tail), and the early final alone (no partials). Prints the clips where
the three differ, then the WER of each. Deterministic unless asr.temperature_fallback is on (it samples).

tiny.en answers the same speech cut 5 samples later with other words on a third of the dev clips,
so --phases N replays every clip at N alignments of the gate's 30 ms frames (shifts of k/N frame)
and pools the words: a policy's effect is then less easily mistaken for one draw's luck.

    .venv/bin/python bench/replay.py [--clips N] [--phases N] [--only NAME] [--set section.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conftest import CORPUS, manifest, read_wav, silence  # noqa: E402
from wer import corpus_wer, normalize, wer  # noqa: E402

from captiond.config import Config, load  # noqa: E402
from captiond.engine import WhisperDecoder  # noqa: E402
from captiond.frames import FRAME_SAMPLES, FrameAssembler  # noqa: E402
from captiond.gate import Gate, UtteranceAudio, UtteranceEnd, UtterancePause, UtteranceStart  # noqa: E402
from captiond.streaming import UtteranceStream  # noqa: E402

MODES = ("streamed", "naive", "early final only")


def replay(decoder: WhisperDecoder, config: Config, pcm: np.ndarray) -> dict[str, str]:
    """The clip's text in each mode, its utterances joined."""
    asr = config.asr
    final = dict(beam_size=asr.beam_size, words=True, fallback=asr.temperature_fallback)
    out: dict[str, list[str]] = {m: [] for m in MODES}
    stream, pause = None, None
    for event in Gate(config.gate).feed(FrameAssembler().insert(pcm, 0.0), close=True):
        if isinstance(event, UtteranceStart):
            stream, pause = UtteranceStream(event.utt, event.start, asr.partial_interval_s, "", asr.max_window_s), None
        elif isinstance(event, UtteranceAudio):
            stream.insert(event)
            if stream.partial_due():
                t = decoder.decode(stream.audio(), beam_size=asr.partial_beam_size, words=True,
                                   prefix=stream.prefix or None, fallback=False)
                stream.partial(t, stream.samples)
        elif isinstance(event, UtterancePause):
            pause = event
        elif isinstance(event, UtteranceEnd):
            early = pause is not None and pause.voiced_end == event.end
            end = pause.audio_end if early else event.audio_end
            # Decoded here with today's prefix, so never stale as a live early final can be.
            t = decoder.decode(stream.audio(until=end), prefix=stream.prefix or None, **final)
            out["streamed"].append(stream.final(t, event, 0.0).text)
            out["naive"].append(decoder.decode(stream.audio(until=event.audio_end), **final).text)
            out["early final only"].append(decoder.decode(stream.audio(until=end), **final).text)
    return {m: " ".join(texts) for m, texts in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=0, help="only the first N usable clips (default: all)")
    parser.add_argument("--phases", type=int, default=1, help="replay each clip at N frame alignments (default 1)")
    parser.add_argument("--only", help="only clips whose file name contains this")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    args = parser.parse_args()
    config = load(None, args.set)[0]
    decoder = WhisperDecoder(config.asr)
    decoder.load()
    clips = [c for c in manifest() if c["wer_ok"] and c["duration"] <= 15 and (args.only or "") in c["file"]]
    clips = clips[: args.clips or None]
    pairs: dict[str, list[tuple[str, str]]] = {m: [] for m in MODES}
    for c in clips:
        for k in range(args.phases):
            shift = np.zeros(k * FRAME_SAMPLES // args.phases, dtype=np.int16)
            texts = replay(decoder, config, np.concatenate([shift, silence(1.0), read_wav(CORPUS / c["file"]), silence(1.0)]))
            errors = {m: round(wer(c["text"], texts[m]) * len(normalize(c["text"]))) for m in MODES}
            for m in MODES:
                pairs[m].append((c["text"], texts[m]))
            if len(set(errors.values())) > 1:
                print(f"{c['file']} (shift {len(shift)}): REF {c['text']}\n"
                      + "".join(f"  {m} ({errors[m]} errors): {texts[m]}\n" for m in MODES))
    print("| mode | WER |\n|---|---|")
    for m in MODES:
        print(f"| {m} | {corpus_wer(pairs[m]):.3f} |")


if __name__ == "__main__":
    main()
