from pathlib import Path

import numpy as np
import pytest

from captiond.config import AsrConfig
from captiond.engine import ModelError, WhisperDecoder, resolve_model
from captiond.frames import int16_to_float
from conftest import CORPUS, clip, read_wav
from wer import wer


def test_missing_or_wrong_model_folders_are_clear(tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        resolve_model(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model.bin"):
        resolve_model(str(tmp_path / "empty"))
    assert resolve_model("base.en").fetch
    assert not resolve_model("bundled").fetch and (Path(resolve_model("bundled").target) / "model.bin").is_file()


@pytest.mark.slow
def test_bundled_model_transcribes_real_speech_with_word_times():
    decoder = WhisperDecoder(AsrConfig())
    decoder.load()
    assert decoder.name == "tiny.en (bundled)"
    item = clip("jfk_inaugural.wav")
    audio = int16_to_float(read_wav(CORPUS / item["file"]))
    t = decoder.decode(audio, beam_size=5, words=True)
    assert wer(item["text"], t.text) <= 0.15, t.text
    starts = [w.start for w in t.words]
    assert starts == sorted(starts) and 0 <= starts[0] and t.words[-1].end <= len(audio) / 16000 + 0.5
    assert t.language == "en" and t.audio_seconds == pytest.approx(11.0, abs=0.01)


@pytest.mark.slow
def test_silence_is_marked_as_no_speech():
    # tiny.en says "You" to digital silence; the gate keeps silence away from it, and the
    # no-speech probability it reports is what lets the worker flag such a final.
    decoder = WhisperDecoder(AsrConfig())
    decoder.load()
    t = decoder.decode(np.zeros(16000 * 3, np.float32), beam_size=5, words=True)
    assert t.text == "" or t.no_speech_prob > 0.6
