import asyncio
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from captiond.capture import (Capture, CaptureError, FileSource, InputDevice, MicSource, StdinSource, make_source,
                              pick_device)
from captiond.frames import FRAME_SAMPLES, FrameRing
from conftest import CORPUS, read_wav


def drain(source, ring_frames=64):
    """Run a source to its end through a Capture, reading frames as a gate would."""
    ring = FrameRing(ring_frames)
    capture = Capture(ring)
    frames = []

    async def reader(task):
        while not (task.done() and len(ring) == 0):
            await asyncio.sleep(0.001)
            while (f := ring.pop()) is not None:
                frames.append(f)
            capture.made_room()

    async def main():
        task = asyncio.create_task(source.run(capture))
        await reader(task)
        await task

    asyncio.run(main())
    return frames, ring


def test_file_source_delivers_every_sample_in_numbered_frames():
    pcm = read_wav(CORPUS / "ps_forever.wav")
    frames, ring = drain(FileSource(CORPUS / "ps_forever.wav"), ring_frames=8)
    assert [f.index for f in frames] == list(range(len(frames)))
    got = np.concatenate([f.pcm for f in frames])
    assert np.array_equal(got[:len(pcm)], pcm) and not got[len(pcm):].any()
    assert ring.overruns == 0  # a file waits for room instead of dropping


def test_file_source_resamples_other_rates(tmp_path):
    import av

    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=44100, layout="stereo")
        t = np.arange(44100 * 2) / 44100
        data = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.stack([data, data]), format="fltp", layout="stereo")
        frame.sample_rate = 44100
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    frames, _ = drain(FileSource(path))
    assert abs(len(frames) * FRAME_SAMPLES - 32000) <= 1600  # AAC pads ~50 ms at the edges
    assert np.abs(np.concatenate([f.pcm for f in frames])).max() > 5000


def test_corrupt_missing_and_audio_less_files_are_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + os.urandom(2000))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")  # FFmpeg's own words for it: "[Errno 1094995529] Invalid data found ..."
    for path, words in [(corrupt, "corrupt.wav"), (tmp_path / "nope.wav", "no such file"),
                        (empty, "empty.wav: the file is empty")]:
        with pytest.raises(CaptureError) as err:
            FileSource(path).check()
        assert words in str(err.value)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not audio\n" * 100)
    with pytest.raises(CaptureError, match="notes.txt"):
        FileSource(text).check()
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(CaptureError) as err:
        FileSource(garbage).check()
    # FFmpeg's words, not PyAV's number for them and the path again.
    assert str(err.value) == f"{garbage}: not audio PyAV can read (Invalid data found when processing input)"


def test_truncated_file_gives_what_it_has_and_says_so(tmp_path, caplog):
    full = (CORPUS / "jfk_inaugural.wav").read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full[:len(full) // 2])
    FileSource(cut).check()
    frames, _ = drain(FileSource(cut))
    assert 0.4 * 11.0 < len(frames) * 0.03 < 0.6 * 11.0
    assert "cut.wav: the file looks truncated (what is there was transcribed): its header states" in caplog.text
    caplog.clear()
    drain(FileSource(CORPUS / "jfk_inaugural.wav"))
    assert "truncated" not in caplog.text


def test_a_wav_header_with_no_audio_after_it_does_not_say_something_was_transcribed(tmp_path):
    from captiond.capture import truncation

    header = tmp_path / "header.wav"
    header.write_bytes((CORPUS / "jfk_inaugural.wav").read_bytes()[:44])
    said = truncation(header, 0.0, 0.0)
    assert "(it holds no audio: nothing was transcribed): its header states" in said and "what is there" not in said


def test_a_pipe_given_as_a_file_is_refused_before_it_is_read(tmp_path):
    # check() and run() each open the file: on a pipe the check took the WAV header away (a FIFO with
    # no writer: it waited for ever), so a clear error, naming what to use instead.
    r, w = os.pipe()
    os.write(w, (CORPUS / "ps_forever.wav").read_bytes()[:30000])  # a valid WAV's start: decodable
    os.close(w)
    try:
        with pytest.raises(CaptureError, match="a pipe or device, not a file.*--source -"):
            FileSource(Path(f"/proc/self/fd/{r}")).check()
    finally:
        os.close(r)


def test_stdin_closed_is_an_error_before_the_model_loads(monkeypatch):
    monkeypatch.setattr("sys.stdin", None)  # what Python sets when fd 0 was closed at start
    with pytest.raises(CaptureError, match="standard input is closed"):
        StdinSource().check()


def test_a_broken_alsa_configuration_is_a_one_line_error(tmp_path):
    # PortAudio reads ~/.asoundrc when it starts; a syntax error there raised OSError from PyAudio().
    import subprocess
    import sys

    (tmp_path / ".asoundrc").write_text("pcm.!default { type nonsense\n")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path),
           "XDG_RUNTIME_DIR": str(tmp_path)}
    for command in (["run", "--source", "mic"], ["devices"]):
        run = subprocess.run([sys.executable, "-m", "captiond", *command], env=env, capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert run.returncode == 2, command
        assert run.stderr.strip().splitlines()[-1].startswith("captiond: error: PortAudio cannot start"), run.stderr
        assert "Traceback" not in run.stderr


def test_stdin_source_reads_raw_pcm_from_a_pipe():
    pcm = (np.arange(5000) % 300).astype(np.int16)
    r, w = os.pipe()

    def writer():
        data = pcm.tobytes() + b"\x01"  # a stray odd byte at the end is not a sample
        for i in range(0, len(data), 777):
            os.write(w, data[i:i + 777])
        os.close(w)

    threading.Thread(target=writer).start()
    with os.fdopen(r, "rb") as stream:
        frames, _ = drain(StdinSource(stream))
    got = np.concatenate([f.pcm for f in frames])
    assert np.array_equal(got[:5000], pcm) and len(got) == 11 * FRAME_SAMPLES


DEVICES = [InputDevice(0, "HDA Intel PCH: ALC257 Analog", 2, 44100, False),
           InputDevice(4, "USB Headset Mic", 1, 48000, False),
           InputDevice(7, "pulse", 32, 44100, True)]


def test_pick_device_by_default_index_and_name():
    assert pick_device(DEVICES, "").index == 7
    assert pick_device(DEVICES, "4").name == "USB Headset Mic"
    assert pick_device(DEVICES, "headset").index == 4
    for wanted, words in [("99", "index 99"), ("webcam", "'webcam'")]:
        with pytest.raises(CaptureError, match=words) as err:
            pick_device(DEVICES, wanted)
        assert "captiond devices" in str(err.value)
    with pytest.raises(CaptureError, match="no audio input device"):
        pick_device([], "")
    with pytest.raises(CaptureError, match="no default"):
        pick_device(DEVICES[:2], "")


class FakePyAudio:
    """A device that refuses 16 kHz (PortAudio -9997, as much real hardware does) and records at 48 kHz."""

    def __init__(self):
        self.opened = []

    def get_default_input_device_info(self):
        return {"index": 0}

    def get_device_count(self):
        return 1

    def get_device_info_by_index(self, i):
        return {"name": "Fussy USB Mic", "maxInputChannels": 1, "defaultSampleRate": 48000.0}

    def is_format_supported(self, rate, **kw):
        if rate != 48000:
            raise ValueError("Invalid sample rate", -9997)
        return True

    def open(self, rate, stream_callback, **kw):
        self.opened.append(rate)
        return FakeStream(stream_callback)

    def terminate(self):
        pass


class FakeStream:
    def __init__(self, callback):
        self.callback = callback
        self.active = True

    def start_stream(self):
        def play():
            t = np.arange(48000) / 48000
            pcm = (8000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
            for i in range(0, len(pcm), 1440):
                self.callback(pcm[i:i + 1440].tobytes(), 1440, {}, 0)
            self.active = False  # then the device goes away

        threading.Thread(target=play).start()

    def is_active(self):
        return self.active

    def stop_stream(self):
        pass

    def close(self):
        pass


def test_mic_that_refuses_16k_is_opened_at_its_rate_and_resampled():
    fake = FakePyAudio()
    source = MicSource("fussy", read_timeout_s=1.0, pyaudio_factory=lambda: fake)
    source.check()
    with pytest.raises(CaptureError, match="stopped delivering audio"):
        drain(source, ring_frames=1000)
    assert fake.opened == [48000]
    assert "48000 Hz" in source.description


def test_mic_resampled_audio_arrives_in_frames():
    fake = FakePyAudio()
    ring = FrameRing(1000)
    capture = Capture(ring)

    async def main():
        with pytest.raises(CaptureError):
            await MicSource("", read_timeout_s=1.0, pyaudio_factory=lambda: fake).run(capture)

    asyncio.run(main())
    frames = [ring.pop() for _ in range(len(ring))]
    assert 30 <= len(frames) <= 34  # one second at 16 kHz, less the resampler's delay
    assert np.abs(np.concatenate([f.pcm for f in frames])).max() > 4000


def test_make_source_understands_every_spec(tmp_path):
    assert isinstance(make_source("-"), StdinSource)
    assert isinstance(make_source(f"file:{tmp_path}/a.wav"), FileSource)
    assert isinstance(make_source("mic:USB"), MicSource)
    with pytest.raises(CaptureError, match="expected mic"):
        make_source("speaker")


def test_the_audio_devices_signature_changes_when_the_audio_server_comes_back(tmp_path, monkeypatch):
    from captiond.capture import audio_devices

    server = tmp_path / "native"
    monkeypatch.setenv("PULSE_SERVER", f"unix:{server}")
    gone = audio_devices()
    server.write_text("")  # the audio server's socket, made again by a restarted server
    back = audio_devices()
    assert back != gone and audio_devices() == back
    server.unlink()
    assert audio_devices() == gone


def test_a_microphone_away_for_long_is_looked_for_by_a_child_process(vmic, monkeypatch):
    # Each PortAudio initialisation leaks ~13 kB: the daemon's own PortAudio is not touched by the look.
    for key in ("XDG_RUNTIME_DIR", "PULSE_SERVER"):
        monkeypatch.setenv(key, vmic.env[key])

    def no_portaudio_here():
        raise AssertionError("PortAudio initialised in the daemon's own process")

    async def look(device):
        return await MicSource(device, 5.0, no_portaudio_here).present()

    assert asyncio.run(look(""))  # the default device: the virtual microphone
    assert asyncio.run(look("pulse"))
    assert not asyncio.run(look("no-such-microphone"))



@pytest.mark.parametrize("child, looks_back", [
    ("import sys; sys.exit(3)", False),  # the device is not there
    ("import sys; sys.exit(1)", True),  # the look failed (a broken install, say): reopened to see, as before
    ("import time; time.sleep(60)", True),  # no answer: killed, reopened to see
    ("", True),  # no process to be had (here: the interpreter gone, as after an upgrade)
])
def test_a_look_by_a_child_that_cannot_tell_reopens_the_device_to_see(child, looks_back, monkeypatch, caplog):
    from captiond import capture

    monkeypatch.setattr(capture, "_PROBE", child)
    monkeypatch.setattr(capture, "PROBE_S", 1.0)
    if not child:
        monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    mic = MicSource("no-such-microphone", 0.5)
    assert asyncio.run(mic.present()) is looks_back and asyncio.run(mic.present()) is looks_back
    warned = [r for r in caplog.records if "reopening it to see" in r.getMessage()]
    assert len(warned) == (1 if looks_back else 0), warned  # once, not every minute
