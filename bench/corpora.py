"""The speech the benchmarks play: dev clips, continuous recordings, held-out speech; and the
reference every streamed result is held against: each recording decoded whole, offline.

`continuous` is ../shared/corpus/continuous (read prompts with their own pauses, a telephone
conversation). Its recordings are split once, by a hash of their id, into a part that settings may be
tuned on (`tune`, two thirds) and a part nobody looks at while tuning (`heldout`, one third): a rule
that only helps the recordings it was fitted on shows up as a gap between the two.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpus"
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

from conftest import CORPUS, read_wav  # noqa: E402

CORPORA = ("dev", "continuous", "librispeech")
PARTS = ("tune", "heldout", "all")


@dataclass(frozen=True)
class Recording:
    """One recording: its id, reference text and 16 kHz mono int16 audio."""

    id: str
    text: str
    pcm: np.ndarray

    @property
    def seconds(self) -> float:
        """Its length in seconds."""
        return len(self.pcm) / 16000


def heldout(recording_id: str) -> bool:
    """True for the third of the recordings that no setting is tuned on."""
    return hashlib.sha1(recording_id.encode()).digest()[0] % 3 == 0


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line.strip()]


def recordings(corpus: str, part: str = "all") -> list[Recording]:
    """The recordings of one corpus (for continuous, of one part), in a fixed order."""
    if corpus == "dev":
        rows = [(m["file"], m["text"], CORPUS / m["file"]) for m in _manifest(CORPUS)
                if m["wer_ok"] and m["duration"] <= 15.0]
    elif corpus == "continuous":
        folder = SHARED / "continuous"
        rows = [(m["id"], m["text"], folder / m["file"]) for m in _manifest(folder)
                if m["wer_ok"] and (part == "all" or heldout(m["id"]) == (part == "heldout"))]
    elif corpus == "librispeech":
        from captiond.capture import decode_file

        folder = ROOT / "bench" / "heldout" / "librispeech"
        refs = dict(line.split(" ", 1) for t in folder.glob("*.trans.txt") for line in t.read_text().splitlines())
        return [Recording(p.stem, refs[p.stem], np.concatenate(list(decode_file(p))))
                for p in sorted(folder.glob("*.flac"))]
    else:
        raise ValueError(f"unknown corpus {corpus!r}; one of {', '.join(CORPORA)}")
    return [Recording(rid, text, read_wav(path)) for rid, text, path in rows]


class WholeReference:
    """Each recording decoded whole, offline, as a user who records and transcribes afterwards gets it:
    faster-whisper's own defaults (Whisper's full 30 s window, previous text as the next window's
    prompt, temperature fallback), beam 5. Cached per model and recording under /tmp."""

    def __init__(self, model_folder: str, compute_type: str = "int8", threads: int = 2) -> None:
        self._key = hashlib.sha1(f"{model_folder}|{compute_type}".encode()).hexdigest()[:12]
        self._cache_file = Path("/tmp") / f"captiond-whole-ref-{self._key}.json"
        self._cache = json.loads(self._cache_file.read_text()) if self._cache_file.exists() else {}
        self._args = (model_folder, compute_type, threads)
        self._model = None

    def text(self, rec: Recording) -> str:
        """The whole-recording decode of one recording."""
        key = f"{rec.id}:{hashlib.sha1(rec.pcm.tobytes()).hexdigest()[:12]}"
        if key not in self._cache:
            if self._model is None:
                from faster_whisper import WhisperModel

                folder, compute_type, threads = self._args
                self._model = WhisperModel(folder, compute_type=compute_type, cpu_threads=threads)
            segments, _ = self._model.transcribe(rec.pcm.astype(np.float32) / 32768.0, language="en", beam_size=5)
            self._cache[key] = " ".join(s.text.strip() for s in segments)
            self._cache_file.write_text(json.dumps(self._cache))
        return self._cache[key]
