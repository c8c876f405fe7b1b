import numpy as np
import pytest

from captiond.config import GateConfig
from captiond.frames import FRAME_SAMPLES, SAMPLE_RATE, FrameAssembler
from captiond.gate import Gate, UtteranceAudio, UtteranceEnd, UtteranceStart, features
from conftest import CORPUS, manifest, read_wav, silence, trimmed

rng = np.random.default_rng(7)
t = np.arange(5 * SAMPLE_RATE) / SAMPLE_RATE


def _pcm(x):
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def _clicks(period_s, length):
    x = np.zeros(len(t))
    for i in range(0, len(t), int(period_s * SAMPLE_RATE)):
        x[i:i + length] = rng.standard_normal(min(length, len(t) - i)) * 0.8
    return x


NON_SPEECH = {
    "white noise (fan)": 0.1 * rng.standard_normal(len(t)),
    "mains hum 50 Hz with harmonics": sum(0.3 / k * np.sin(2 * np.pi * 50 * k * t) for k in range(1, 12)),
    "buzz 120 Hz square": 0.2 * np.sign(np.sin(2 * np.pi * 120 * t)),
    "tone 440 Hz": 0.3 * np.sin(2 * np.pi * 440 * t),
    "click train 10 Hz": _clicks(0.1, 40),
    "fan: filtered noise with motor whine": 0.05 * np.convolve(rng.standard_normal(len(t)), np.hanning(30), "same") / 3
    + 0.02 * np.sin(2 * np.pi * 100 * t),
}


def run(gate, pcm, finish=True):
    asm = FrameAssembler()
    for frame in asm.insert(pcm, 0.0):
        gate.insert(frame)
    events = gate.process()
    if finish:
        for frame in asm.finish(0.0):
            gate.insert(frame)
        events += gate.finish()
    return events


def starts(events):
    return [e for e in events if isinstance(e, UtteranceStart)]


@pytest.mark.parametrize("name", NON_SPEECH)
def test_feature_check_rejects_noise_that_webrtcvad_lets_through(name):
    pcm = _pcm(NON_SPEECH[name])
    vad_only = Gate(GateConfig(feature_check=False))
    assert starts(run(vad_only, pcm)), f"webrtcvad alone should trigger on {name} for this test to mean anything"
    gate = Gate(GateConfig())
    assert starts(run(gate, pcm)) == []
    assert gate.rejected > 0


@pytest.mark.parametrize("item", manifest(), ids=lambda m: m["file"])
def test_every_corpus_clip_opens_an_utterance(item):
    pcm = np.concatenate([silence(0.5), read_wav(CORPUS / item["file"]), silence(1.0)])
    events = run(Gate(GateConfig()), pcm)
    assert starts(events), item["file"]
    assert sum(isinstance(e, UtteranceEnd) for e in events) == len(starts(events))


@pytest.mark.parametrize("cfg", [GateConfig(start_ms=30, start_window_ms=120),
                                 GateConfig(start_ms=30, start_window_ms=120, feature_check=False),
                                 GateConfig(min_sustain_ms=200)], ids=["narrowest", "narrowest-vad-only", "sustain"])
def test_the_extremes_config_accepts_still_open_on_speech(cfg):
    # Narrower start windows (30-90 ms) were accepted and never opened: too little audio to measure.
    pcm = np.concatenate([silence(0.5), read_wav(CORPUS / "jfk_inaugural.wav"), silence(1.0)])
    assert starts(run(Gate(cfg), pcm))


def test_speech_over_steady_hum_still_opens():
    speech = read_wav(CORPUS / "jfk_inaugural.wav")[:3 * SAMPLE_RATE].astype(np.float64) / 32768
    hum = 0.05 * np.sin(2 * np.pi * 50 * np.arange(len(speech)) / SAMPLE_RATE)
    assert starts(run(Gate(GateConfig()), _pcm(speech + hum)))


def _collect(events):
    """Audio of each utterance as the worker would see it: from start, trimmed at audio_end."""
    out, audio, start = [], {}, {}
    for e in events:
        if isinstance(e, UtteranceStart):
            start[e.utt], audio[e.utt] = e.start, []
        elif isinstance(e, UtteranceAudio):
            audio[e.utt].append(e.pcm)
        elif isinstance(e, UtteranceEnd):
            pcm = np.concatenate(audio[e.utt])[:e.audio_end - start[e.utt]]
            out.append((start[e.utt], e, pcm))
    return out


def test_preroll_and_hangover():
    speech = read_wav(CORPUS / "mfa_thoughts.wav")
    pcm = np.concatenate([silence(1.0), speech, silence(2.0)])
    cfg = GateConfig()
    (start, end, audio), = _collect(run(Gate(cfg), pcm))
    first_voiced = SAMPLE_RATE + np.argmax(np.abs(speech) > 1000)
    assert start <= first_voiced - cfg.preroll_ms * SAMPLE_RATE // 1000 + FRAME_SAMPLES
    assert end.reason == "silence"
    assert np.array_equal(audio, pcm[start:end.audio_end])
    assert end.end <= SAMPLE_RATE + len(speech) + FRAME_SAMPLES


def test_long_speech_is_split_without_losing_or_repeating_audio():
    pcm = np.concatenate([silence(0.5), read_wav(CORPUS / "mfa_acoustic_corpus.wav")])
    utts = _collect(run(Gate(GateConfig(max_utterance_s=4.0)), pcm))
    splits = [(s, e, a) for s, e, a in utts if e.reason == "max_length"]
    assert len(splits) >= 3
    for (s1, e1, a1), (s2, _, _) in zip(utts, utts[1:]):
        if e1.reason == "max_length":
            assert s2 == e1.audio_end, "the next utterance must begin exactly where the split one ends"
    for start, end, audio in utts:
        assert np.array_equal(audio, pcm[start:start + len(audio)])
        assert len(audio) <= 4.0 * SAMPLE_RATE + FRAME_SAMPLES


def test_silence_never_opens_and_stays_cheap():
    gate = Gate(GateConfig())
    assert run(gate, silence(10.0)) == [] and gate.rejected == 0


def test_features_tell_speech_from_steady_noise():
    speech = features(read_wav(CORPUS / "jfk_inaugural.wav")[SAMPLE_RATE:2 * SAMPLE_RATE])
    hum = features(_pcm(NON_SPEECH["mains hum 50 Hz with harmonics"])[:SAMPLE_RATE])
    assert speech.modulation_db > 3.0 > hum.modulation_db
    assert speech.sustain_ms >= 60


def test_log_mel_matches_librosa_melspectrogram():
    """Our STFT with librosa's filterbank equals librosa's own melspectrogram (which costs numba)."""
    import librosa

    from captiond.gate import log_mel

    pcm = (np.random.default_rng(1).standard_normal(16000) * 3000).astype(np.int16)
    mel, db = log_mel(pcm)
    ref = librosa.feature.melspectrogram(y=pcm.astype(np.float32) / 32768, sr=16000, n_fft=512, win_length=400,
                                         hop_length=160, n_mels=40, fmin=80, fmax=7600, center=False)
    assert mel.shape == ref.shape
    np.testing.assert_allclose(mel, ref, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(db, librosa.power_to_db(ref, ref=1.0, amin=1e-10, top_db=None), atol=1e-3)


def test_pause_hint_names_the_last_voiced_frame_the_utterance_ends_with():
    from captiond.gate import UtterancePause

    gate = Gate(GateConfig(hangover_ms=500))
    pcm = np.concatenate([silence(0.5), read_wav(CORPUS / "mfa_thoughts.wav"), silence(1.5)])
    events = []
    for frame in FrameAssembler().insert(pcm, 0.0):
        gate.insert(frame)
        events += gate.process()
    pauses = [e for e in events if isinstance(e, UtterancePause)]
    ends = [e for e in events if isinstance(e, UtteranceEnd)]
    assert pauses and len(ends) == 1
    assert pauses[-1].voiced_end == ends[0].end and pauses[-1].utt == ends[0].utt
    assert pauses[-1].audio_end == ends[0].end + 3 * FRAME_SAMPLES  # all the audio there was at the pause
    assert events.index(pauses[-1]) < events.index(ends[0])


def _pause_then_end(pcm, cfg, ask):
    """Frames one at a time; at each pause hint ask(gate, hint) may ask for the end; the events."""
    from captiond.gate import UtterancePause

    gate, events = Gate(cfg), []
    for frame in FrameAssembler().insert(pcm, 0.0):
        gate.insert(frame)
        for event in gate.process():
            events.append(event)
            if isinstance(event, UtterancePause):
                ask(gate, event)
    return events + gate.finish()


def test_a_pause_after_a_sentence_ends_the_utterance_sooner_unless_speech_comes_first():
    speech = read_wav(CORPUS / "mfa_thoughts.wav")
    cfg = GateConfig(hangover_ms=500, sentence_end_ms=300)
    once = np.concatenate([silence(0.5), speech, silence(1.5)])

    def end_here(gate, pause):
        gate.end_at_pause(pause.utt, pause.voiced_end)

    for ask, reason, after in ((end_here, "sentence_end", 10), (lambda gate, pause: None, "silence", 17),
                               (lambda gate, pause: gate.end_at_pause(pause.utt, pause.voiced_end - 1), "silence", 17)):
        events = _pause_then_end(once, cfg, ask)
        ends = [e for e in events if isinstance(e, UtteranceEnd)]
        assert [e.reason for e in ends] == [reason]
        audio = [e for e in events if isinstance(e, UtteranceAudio)]
        closed_at = audio[-1].end  # the frame that closed the utterance was the last one sent to it
        assert closed_at - ends[0].end == after * FRAME_SAMPLES

    # Asked at every pause, but the ~200 ms pause between the two sayings (each trimmed to 100 ms of
    # quiet) is shorter than 300 ms: speech came first, and the two stay one utterance.
    twice = np.concatenate([silence(0.5), trimmed(speech), trimmed(speech), silence(1.5)])
    ends = [e for e in _pause_then_end(twice, cfg, end_here) if isinstance(e, UtteranceEnd)]
    assert len(ends) == 1 and ends[0].reason == "sentence_end"
    assert ends[0].end > 0.5 * SAMPLE_RATE + len(trimmed(speech))


def test_an_end_asked_after_the_pause_was_long_enough_closes_without_waiting_for_more_frames():
    # The final's decode finished 400 ms into the pause: the gate had passed 300 ms without an ask, and
    # a microphone's next frames come 60 ms later; the utterance ends at the ask, with no frame.
    from captiond.gate import UtterancePause

    gate = Gate(GateConfig(hangover_ms=500, sentence_end_ms=300))
    pause = None
    for frame in FrameAssembler().insert(np.concatenate([silence(0.5), read_wav(CORPUS / "mfa_thoughts.wav"),
                                                         silence(1.0)]), 0.0):
        events = gate.feed([frame])
        assert not any(isinstance(e, UtteranceEnd) for e in events)
        pause = next((e for e in events if isinstance(e, UtterancePause)), pause)
        if any(isinstance(e, UtteranceAudio) and e.unvoiced_ms >= 360 for e in events):  # past sentence_end_ms, short of the hangover
            break
    assert gate.in_speech
    assert gate.process() == [], "nothing asked: the pause goes on to the hangover"
    gate.end_at_pause(pause.utt, pause.voiced_end)
    ends = gate.process()
    assert [(type(e), e.reason, e.end) for e in ends] == [(UtteranceEnd, "sentence_end", pause.voiced_end)]
    assert not gate.in_speech


def test_a_filterbank_child_that_cannot_start_is_a_feature_error(monkeypatch, tmp_path):
    # The interpreter's folder unreadable to the daemon's user made subprocess.run raise PermissionError,
    # a traceback, where a child that fails was already a one-line FeatureError.
    from captiond import gate

    monkeypatch.setattr(gate.sys, "executable", str(tmp_path / "no-python"))
    gate._mel_basis.cache_clear()
    try:
        with pytest.raises(gate.FeatureError, match="cannot design the gate's mel filterbank.*no-python"):
            gate.features(np.zeros(16000, dtype=np.int16))
    finally:
        gate._mel_basis.cache_clear()
