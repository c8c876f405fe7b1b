"""Each installed model's speed on this machine, for `captiond models` (and a table).

Every WER-usable dev clip of 3-8 s of the test corpus is decoded as a final is (beam 5, word times,
the short window), twice; prints decode seconds per second of speech (real-time factor) and the p50
decode time of a 5 s final, and keeps them where `captiond models` reads them.

    .venv/bin/python bench/model_speed.py      (make bench-models)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conftest import CORPUS, manifest, read_wav  # noqa: E402

from captiond.config import load  # noqa: E402
from captiond.engine import WhisperDecoder  # noqa: E402
from captiond.frames import SAMPLE_RATE, int16_to_float  # noqa: E402
from captiond.models import KNOWN, installed, read_speeds, speed_file  # noqa: E402


def measure(name: str, clips: list) -> dict:
    """Real-time factor over the clips, and the p50 decode time scaled to a 5 s final."""
    config, _ = load(ROOT / "config" / "captiond.toml", [f"asr.model={name}"])  # the defaults, not a user config
    decoder = WhisperDecoder(config.asr)
    decoder.load()
    spent = audio = 0.0
    per_5s = []
    for _ in range(2):
        for pcm in clips:
            t = decoder.decode(pcm, beam_size=config.asr.beam_size, words=True, fallback=False)
            spent += t.decode_seconds
            audio += t.audio_seconds
            per_5s.append(t.decode_seconds * 5.0 / t.audio_seconds)
    return {"rtf": round(spent / audio, 4), "final_5s_p50": round(statistics.median(per_5s), 3),
            "clips": len(clips), "measured": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores"}


def main() -> None:
    clips = [int16_to_float(read_wav(CORPUS / m["file"])) for m in manifest()
             if m.get("wer_ok") and 3.0 <= m["duration"] <= 8.0]
    seconds = sum(len(c) for c in clips) / SAMPLE_RATE
    path, kept = speed_file(), read_speeds()
    print(f"model speed: {platform.machine()}, {os.cpu_count()} cores; {len(clips)} dev clips ({seconds:.0f} s), "
          "each decoded twice as a final is (beam 5, word times, short window)\n")
    print("| asr.model | real-time factor | a 5 s final, p50 |")
    print("|---|---|---|")
    for model in KNOWN.values():
        if model.extra and not installed(model):
            print(f"| {model.name} | not installed | |")
            continue
        kept[model.name] = measure(model.name, clips)
        print(f"| {model.name} | {kept[model.name]['rtf']:.3f} | {kept[model.name]['final_5s_p50']:.2f} s |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept, indent=1))
    print(f"\nkept in {path} for `captiond models`")


if __name__ == "__main__":
    main()
