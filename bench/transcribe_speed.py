"""File transcription speed: `captiond transcribe`'s engine path against faster-whisper called directly.

Both decode the same long file (dev corpus clips joined by silences) with the same model, compute
type, threads, beam and word timestamps; faster-whisper is run with and without its own VAD filter.

    .venv/bin/python bench/transcribe_speed.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conftest import CORPUS, manifest, read_wav, silence, write_wav  # noqa: E402
from wer import corpus_wer  # noqa: E402

from captiond.config import load  # noqa: E402
from captiond.engine import WhisperDecoder  # noqa: E402
from captiond.transcribe import transcribe_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender (the median is shown)")
    args = parser.parse_args()
    config, _ = load(None, [])
    clips = [m for m in manifest() if m["wer_ok"]]
    parts = []
    for i, item in enumerate(clips):
        parts += [read_wav(CORPUS / item["file"]), silence((1.0, 2.5, 6.0)[i % 3])]
    reference = " ".join(item["text"] for item in clips)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_wav(Path(tmp) / "long.wav", np.concatenate(parts))
        duration = sum(len(p) for p in parts) / 16000
        decoder = WhisperDecoder(config.asr)
        decoder.load()
        model = decoder._model  # the very same loaded model for both contenders
        asr = config.asr

        def ours() -> str:
            return " ".join(s.text for s in transcribe_file(path, decoder, config).segments)

        def direct(vad: bool) -> str:
            from faster_whisper.audio import decode_audio

            segments, _ = model.transcribe(decode_audio(str(path), 16000), language=asr.language,
                                           beam_size=asr.beam_size, word_timestamps=True, vad_filter=vad)
            return " ".join(s.text.strip() for s in segments)

        contenders = {"captiond transcribe (gate + packed chunks)": ours,
                      "faster-whisper, vad_filter=True": lambda: direct(True),
                      "faster-whisper, vad_filter=False": lambda: direct(False)}
        results = {}
        for name, fn in contenders.items():
            times, text = [], ""
            for _ in range(args.repeat):
                started = time.monotonic()
                text = fn()
                times.append(time.monotonic() - started)
            results[name] = (statistics.median(times), corpus_wer([(reference, text)]))
    base = results["captiond transcribe (gate + packed chunks)"][0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; model {asr.model} {asr.compute_type}, "
          f"beam {asr.beam_size}, words on; file {duration:.0f} s ({len(clips)} clips); median of {args.repeat}")
    print("| contender | wall s | x real time | time relative to captiond | WER |\n|---|---|---|---|---|")
    for name, (secs, error) in results.items():
        print(f"| {name} | {secs:.1f} | {duration / secs:.1f} | {secs / base:.2f} | {error:.3f} |")


if __name__ == "__main__":
    main()
