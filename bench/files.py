"""`captiond transcribe` on whole recordings: WER and decode time with the short and the full window.

Each recording is written to a WAV file and transcribed as `captiond transcribe` does it (the
daemon's gate cuts speech out, pieces are packed into chunks, each chunk decoded at beam 5), once
per window, and held against its reference text.

    .venv/bin/python bench/files.py [--corpus continuous --part tune] [--window short --window full]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT / "scripts")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conftest import write_wav  # noqa: E402
from corpora import CORPORA, PARTS, recordings  # noqa: E402
from wer import corpus_wer  # noqa: E402

from captiond.config import load  # noqa: E402
from captiond.engine import WhisperDecoder  # noqa: E402
from captiond.transcribe import transcribe_file  # noqa: E402

WINDOWS = {"short": True, "full": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=CORPORA, default="continuous")
    parser.add_argument("--part", choices=PARTS, default="tune")
    parser.add_argument("--window", action="append", choices=WINDOWS, help="short, full (default: both)")
    args = parser.parse_args()
    config = load(None, [])[0]
    decoder = WhisperDecoder(config.asr)
    decoder.load()
    recs = recordings(args.corpus, args.part)
    print(f"{args.corpus}{'/' + args.part if args.corpus == 'continuous' else ''}: {len(recs)} recordings, "
          f"{sum(r.seconds for r in recs):.0f} s\n| window | WER | CPU s per audio s |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_wav(Path(tmp) / f"{i}.wav", r.pcm) for i, r in enumerate(recs)]
        for name in args.window or list(WINDOWS):
            cfg = dataclasses.replace(config, asr=dataclasses.replace(config.asr, short_window=WINDOWS[name]))
            started = time.process_time()
            pairs = []
            for rec, path in zip(recs, paths):
                t = transcribe_file(path, decoder, cfg)
                pairs.append((rec.text, " ".join(s.text for s in t.segments)))
            spent = time.process_time() - started
            print(f"| {name} | {corpus_wer(pairs):.3f} | {spent / sum(r.seconds for r in recs):.3f} |", flush=True)


if __name__ == "__main__":
    main()
