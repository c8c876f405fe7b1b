"""Language detection and WER per language on ../shared/corpus/multilingual (Spanish, French, Russian
voice prompts), each clip decoded as a final is (beam 5, word times, short window) with
asr.language = auto: how often Whisper names the spoken language, and the WER of what it wrote
(lower case, accents stripped: the Spanish scripts are written without them).

--streamed plays each language's clips as one speaker's session instead (1.5 s between clips)
through the daemon's gate and ASR worker (bench/replay.py): the finals' languages, with the worker
keeping the speaker's language through short and unsure detections, and the streamed WER beside
each clip decoded alone.

    .venv/bin/python bench/languages.py [--model base] [--clips N] [--lang es] [--streamed] [--set asr.languages=en,es]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT / "scripts")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conftest import read_wav, silence  # noqa: E402
from replay import cpu_seconds, replay  # noqa: E402
from wer import edit_distance, words_of_any_language  # noqa: E402

from captiond.config import Config, load  # noqa: E402
from captiond.engine import Engine, Transcript, WhisperDecoder  # noqa: E402
from captiond.frames import SAMPLE_RATE, int16_to_float  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus" / "multilingual"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="base", help="asr.model (a multilingual one)")
    parser.add_argument("--clips", type=int, default=0, help="only the first N clips of each language (default: all)")
    parser.add_argument("--lang", help="only this language's clips (es, fr or ru)")
    parser.add_argument("--streamed", action="store_true",
                        help="play each language's clips as one session through the gate and worker")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override, e.g. asr.languages=en,es,fr,ru (repeatable)")
    args = parser.parse_args()
    config, _ = load(ROOT / "config" / "captiond.toml", [f"asr.model={args.model}", "asr.language=auto", *args.set])
    decoder = WhisperDecoder(config.asr)
    decoder.load()
    clips = [json.loads(line) for line in (CORPUS / "manifest.jsonl").read_text().splitlines() if line.strip()]
    clips = [c for c in clips if c["lang"] == (args.lang or c["lang"])]
    if args.streamed:
        asyncio.run(streamed(config, decoder, [c for c in clips if c.get("wer_ok") and c["text_norm"]], args.clips))
        return
    right, total, errors, words, seconds = (defaultdict(int) for _ in range(5))
    wrong = []
    for clip in clips:
        lang = clip["lang"]
        if args.clips and total[lang] >= args.clips:
            continue
        t = alone(decoder, config, read_wav(CORPUS / clip["file"]))
        total[lang] += 1
        right[lang] += t.language == lang
        seconds[lang] += t.decode_seconds
        if t.language != lang:
            wrong.append(f"{clip['id']}: {t.language} ({t.language_p:.2f}) {t.text[:60]!r}")
        if clip.get("wer_ok") and clip["text_norm"]:
            ref = words_of_any_language(clip["text"])
            errors[lang] += edit_distance(ref, words_of_any_language(t.text))
            words[lang] += len(ref)
    print(f"languages: {args.model}, {platform.machine()}, {os.cpu_count()} cores; each clip decoded alone, "
          f"asr.language = auto, asr.languages = {config.asr.languages or 'any'}, beam 5\n")
    print("| language | clips | detected right | WER | decode s per clip |")
    print("|---|---|---|---|---|")
    for lang in sorted(total):
        print(f"| {lang} | {total[lang]} | {right[lang] / total[lang]:.0%} | {errors[lang] / max(1, words[lang]):.3f} | "
              f"{seconds[lang] / total[lang]:.2f} |")
    print(f"| all | {sum(total.values())} | {sum(right.values()) / sum(total.values()):.0%} | "
          f"{sum(errors.values()) / max(1, sum(words.values())):.3f} | |")
    for line in wrong:
        print("  detected otherwise:", line)


def alone(decoder: WhisperDecoder, config: Config, pcm: np.ndarray) -> Transcript:
    """One clip decoded alone as a final is: its beam, word times, no temperature fallback, the short window,
    an unsure detection checked by decoding in its rivals."""
    return decoder.decode(int16_to_float(pcm), beam_size=config.asr.beam_size, words=True, fallback=False,
                          verify=True)


async def streamed(config: Config, decoder: WhisperDecoder, clips: list[dict], limit: int) -> None:
    """Print, per language, the finals of its clips played as one session, against each clip decoded alone."""
    engine = Engine(decoder)
    await engine.load()
    print(f"languages, streamed: {config.asr.model}, {platform.machine()}, {os.cpu_count()} cores; each language's "
          "clips as one session (1.5 s apart) through the gate and worker, asr.language = auto\n")
    print("| language | clips | finals | finals in it | WER streamed | WER each clip alone | CPU s per audio s |")
    print("|---|---|---|---|---|---|---|")
    for lang in sorted({c["lang"] for c in clips}):
        chosen = [c for c in clips if c["lang"] == lang][:limit or None]
        audio = [read_wav(CORPUS / c["file"]) for c in chosen]
        ref = [w for c in chosen for w in words_of_any_language(c["text"])]
        each = [w for pcm in audio for w in words_of_any_language(alone(decoder, config, pcm).text)]
        session = np.concatenate([silence(1.0), *(np.concatenate([pcm, silence(1.5)]) for pcm in audio)])
        cpu = cpu_seconds()
        finals = [f for f in await replay(engine, config, config.asr, session, Counter()) if f.text]
        cpu = cpu_seconds() - cpu
        hyp = [w for f in finals for w in words_of_any_language(f.text)]
        print(f"| {lang} | {len(chosen)} | {len(finals)} | {sum(f.language == lang for f in finals) / len(finals):.0%} | "
              f"{edit_distance(ref, hyp) / len(ref):.3f} | {edit_distance(ref, each) / len(ref):.3f} | "
              f"{cpu / (len(session) / SAMPLE_RATE):.2f} |")
        for f in finals:
            if f.language != lang:
                print(f"  in {f.language}: {f.text[:70]!r}")


if __name__ == "__main__":
    main()
