"""Peak RSS (MiB) over batches of decodes of every length, in a process of its own; prints a JSON list.

Run by tests/test_engine.py: a fresh interpreter holds only the decoder, so what the peaks show is the
decoder's own memory, not that of the threads and models earlier tests left in pytest's process.
"""
import json
import sys

import numpy as np

from captiond.config import AsrConfig
from captiond.engine import WhisperDecoder
from captiond.frames import int16_to_float
from conftest import CORPUS, manifest, read_wav


def rss_mib() -> float:
    """This process's resident set, MiB."""
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024


def main(sizes: list[int]) -> None:
    """Decode random spans of 0.5-20 s at beam 1 or 5; print the peak RSS of each batch."""
    decoder = WhisperDecoder(AsrConfig())
    decoder.load()
    audio = int16_to_float(np.concatenate([read_wav(CORPUS / item["file"]) for item in manifest()[:25]]))
    rng = np.random.default_rng(1)
    peaks = []
    for n in sizes:
        peak = 0.0
        for _ in range(n):
            start = rng.integers(0, len(audio) - 20 * 16000)
            decoder.decode(audio[start:start + rng.integers(8000, 20 * 16000)], beam_size=int(rng.choice([1, 5])),
                           words=True)
            peak = max(peak, rss_mib())
        peaks.append(round(peak, 1))
    print(json.dumps(peaks))


if __name__ == "__main__":
    main([int(n) for n in sys.argv[1:]])
