"""Language detection and WER per language on ../shared/corpus/multilingual (Spanish, French, Russian
voice prompts), each clip decoded as a final is (beam 5, word times, short window) with
asr.language = auto: how often Whisper names the spoken language, and the WER of what it wrote
(lower case, accents stripped: the Spanish scripts are written without them).

    .venv/bin/python bench/languages.py [--model base] [--clips N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conftest import read_wav  # noqa: E402
from wer import edit_distance, words_of_any_language  # noqa: E402

from captiond.config import load  # noqa: E402
from captiond.engine import WhisperDecoder  # noqa: E402
from captiond.frames import int16_to_float  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus" / "multilingual"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="base", help="asr.model (a multilingual one)")
    parser.add_argument("--clips", type=int, default=0, help="only the first N clips of each language (default: all)")
    args = parser.parse_args()
    config, _ = load(ROOT / "config" / "captiond.toml", [f"asr.model={args.model}", "asr.language=auto"])
    decoder = WhisperDecoder(config.asr)
    decoder.load()
    clips = [json.loads(line) for line in (CORPUS / "manifest.jsonl").read_text().splitlines() if line.strip()]
    right, total, errors, words, seconds = (defaultdict(int) for _ in range(5))
    wrong = []
    for clip in clips:
        lang = clip["lang"]
        if args.clips and total[lang] >= args.clips:
            continue
        t = decoder.decode(int16_to_float(read_wav(CORPUS / clip["file"])), beam_size=config.asr.beam_size,
                           words=True, fallback=False)
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
          "asr.language = auto, beam 5\n")
    print("| language | clips | detected right | WER | decode s per clip |")
    print("|---|---|---|---|---|")
    for lang in sorted(total):
        print(f"| {lang} | {total[lang]} | {right[lang] / total[lang]:.0%} | {errors[lang] / max(1, words[lang]):.3f} | "
              f"{seconds[lang] / total[lang]:.2f} |")
    print(f"| all | {sum(total.values())} | {sum(right.values()) / sum(total.values()):.0%} | "
          f"{sum(errors.values()) / max(1, sum(words.values())):.3f} | |")
    for line in wrong:
        print("  detected otherwise:", line)


if __name__ == "__main__":
    main()
