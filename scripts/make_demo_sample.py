"""Build the bundled demo sample (daemon/captiond/samples/demo.wav) from dev corpus clips with pauses."""

import json
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "corpus"
OUT = ROOT / "daemon" / "captiond" / "samples"
CLIPS = ["jfk_inaugural.wav", "mfa_doc_english_slow.wav", "moonshine_beckett.wav", "ps_goforward.wav",
         "mfa_thoughts.wav", "ps_forever.wav"]
PAUSE_S = 1.5


def main() -> None:
    manifest = {m["file"]: m for m in map(json.loads, (CORPUS / "manifest.jsonl").read_text().splitlines())}
    parts, lines = [np.zeros(int(0.5 * 16000), np.int16)], []
    for name in CLIPS:
        with wave.open(str(CORPUS / name)) as w:
            parts.append(np.frombuffer(w.readframes(w.getnframes()), np.int16))
        parts.append(np.zeros(int(PAUSE_S * 16000), np.int16))
        m = manifest[name]
        lines.append(f"{name}\t{m['license']}\t{m['text']}")
    OUT.mkdir(parents=True, exist_ok=True)
    with wave.open(str(OUT / "demo.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.concatenate(parts).tobytes())
    (OUT / "demo.txt").write_text(
        "demo.wav: real speech from the dev corpus (../shared/corpus), clips in this order with "
        f"{PAUSE_S} s pauses; built by scripts/make_demo_sample.py.\nclip\tlicence\treference\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
