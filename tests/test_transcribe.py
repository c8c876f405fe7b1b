import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from captiond.config import Config
from captiond.engine import SHORT, Segment, Transcript
from captiond.rules import TINY_EN
from captiond.events import Word
from captiond.transcribe import FileTranscript, Piece, _TimeMap, cues, pack, render, transcribe_file
from conftest import CORPUS, ROOT, ShortWindowLoops, clip
from wer import wer

SRT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)$")


def seconds(h, m, s, ms):
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def check_srt(text):
    """The SubRip rules: numbered from 1, ordered non-overlapping times, 1-2 lines of ≤ 42 characters."""
    blocks = text.strip().split("\n\n")
    last_end = 0.0
    for n, block in enumerate(blocks, 1):
        lines = block.split("\n")
        assert lines[0] == str(n)
        m = SRT_TIME.match(lines[1])
        assert m, lines[1]
        start, end = seconds(*m.groups()[:4]), seconds(*m.groups()[4:])
        assert last_end <= start < end, block
        assert 1 <= len(lines[2:]) <= 2 and all(0 < len(line) <= 42 for line in lines[2:]), block
        last_end = end
    return blocks


def test_pack_keeps_order_and_limit():
    pieces = [Piece(i * 16000 * 10, np.ones(16000 * s, np.int16)) for i, s in enumerate([5, 10, 12, 3, 30, 2])]
    groups = list(pack(iter(pieces), max_s=28.0))
    assert [p for g in groups for p in g] == pieces
    for g in groups:
        total = sum(len(p.pcm) for p in g) + 0.3 * 16000 * (len(g) - 1)
        assert total <= 28 * 16000 or len(g) == 1


def test_time_map_returns_file_times():
    group = [Piece(16000 * 5, np.zeros(16000 * 2, np.int16)), Piece(16000 * 20, np.zeros(16000, np.int16))]
    to_file = _TimeMap(group)
    assert to_file(0.5) == 5.5
    assert to_file(2.3 + 0.25) == 20.25  # in the second piece, past the 0.3 s gap
    assert to_file(1.999) == 6.999


def test_cues_follow_subtitle_rules():
    words = tuple(Word(f"word{i}{'.' if i % 9 == 8 else ''}", i * 0.4, i * 0.4 + 0.35, 0.9) for i in range(60))
    srt = render(FileTranscript("x", 30.0, "en", (Segment(0, 24, "", words, -0.2, 0.01),)), "srt")
    blocks = check_srt(srt)
    assert len(blocks) > 5
    assert all(len(c.lines) <= 2 for c in cues(FileTranscript("x", 30.0, "en", (Segment(0, 24, "", words, -0.2, 0.01),))))


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "captiond", "transcribe", *args], capture_output=True,
                          timeout=300, cwd=ROOT, **kw)


@pytest.mark.slow
def test_transcribe_files_to_every_format_and_skip_a_bad_one(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    files = [str(CORPUS / "jfk_inaugural.wav"), str(bad), str(ROOT / "daemon/captiond/samples/demo.wav")]
    result = run(*files, "--format", "srt", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "broken.mp4" in err and "1 of 3 file(s) failed" in err and "Traceback" not in err
    jfk = check_srt((tmp_path / "out" / "jfk_inaugural.srt").read_text())
    demo = check_srt((tmp_path / "out" / "demo.srt").read_text())
    assert len(demo) >= 6
    text = " ".join(" ".join(b.split("\n")[2:]) for b in jfk)
    assert wer(clip("jfk_inaugural.wav")["text"], text) <= 0.15

    vtt = run(str(CORPUS / "ps_forever.wav"), "--format", "vtt").stdout.decode()
    assert vtt.startswith("WEBVTT\n\n") and re.search(r"\d\d:\d\d:\d\d\.\d\d\d --> ", vtt)

    out = run(str(CORPUS / "ps_forever.wav"), str(CORPUS / "mfa_thoughts.wav"), "--format", "json").stdout
    docs = [json.loads(line) for line in out.decode().splitlines()]
    assert [d["file"].split("/")[-1] for d in docs] == ["ps_forever.wav", "mfa_thoughts.wav"]
    seg = docs[1]["segments"][0]
    assert seg["words"] and seg["start"] <= seg["words"][0]["start"] < seg["words"][-1]["end"] <= docs[1]["duration"]
    assert wer(clip("mfa_thoughts.wav")["text"], seg["text"]) <= 0.2

    txt = run(str(CORPUS / "ps_forever.wav")).stdout.decode()
    assert "forever" in txt.lower()


def test_several_subtitle_files_to_stdout_are_refused():
    result = run("a.wav", "b.wav", "--format", "srt")
    assert result.returncode == 2 and b"--output-dir" in result.stderr


@pytest.mark.slow
def test_progress_bar_only_on_a_terminal():
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "captiond", "transcribe", str(CORPUS / "ps_forever.wav")],
                            stdout=subprocess.PIPE, stderr=slave, cwd=ROOT)
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        shown += data
    proc.wait(120)
    os.close(master)
    assert b"ps_forever.wav [" in shown and b"100%" in shown
    assert b"[" not in proc.stdout.read()  # stdout has only the transcript


def damaged_mp3(path, pcm):
    """An MP3 of pcm whose second half is overwritten with garbage."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mp3", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + np.random.default_rng(1).bytes(len(data) - len(data) // 2))
    return path


@pytest.mark.slow
def test_damaged_and_truncated_files_give_what_they_have_and_say_so(tmp_path):
    from conftest import read_wav

    full = (CORPUS / "jfk_inaugural.wav").read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full[:len(full) // 2])
    mp3 = damaged_mp3(tmp_path / "damaged.mp3", read_wav(CORPUS / "jfk_inaugural.wav"))
    for path, says in [(cut, "looks truncated"), (mp3, "s before the damage were used")]:
        result = run(str(path))
        err = result.stderr.decode()
        assert result.returncode == 1 and says in err and "Traceback" not in err, err
        assert "fellow" in result.stdout.decode().lower(), "the words before the damage are printed"


def test_a_file_damaged_before_its_first_sample_says_none_of_it_was_used(tmp_path):
    import struct

    zero = tmp_path / "zero.wav"  # a WAV header that says 0 channels: FFmpeg cannot open its decoder
    data = b"\x00\x01" * 16000
    zero.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt "
                     + struct.pack("<IHHIIHH", 16, 1, 0, 16000, 32000, 2, 16) + b"data" + struct.pack("<I", len(data)) + data)
    result = run(str(zero))
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    assert "none of it could be used" in err and "before the damage" not in err, err


def test_a_sound_file_with_more_channels_than_ffmpeg_can_mix_down_names_its_format(tmp_path):
    import wave

    wide = tmp_path / "wide.wav"
    with wave.open(str(wide), "wb") as w:
        w.setnchannels(64)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros((16000, 64), dtype="<i2").tobytes())
    result = run(str(wide))
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    assert "cannot convert its audio (64 channel(s), 16000 Hz" in err and "corrupt" not in err, err


def test_a_header_with_a_sample_rate_no_recording_has_is_refused_at_once(tmp_path):
    import struct

    wav = bytearray((CORPUS / "jfk_inaugural.wav").read_bytes())
    wav[24:32] = struct.pack("<II", 1, 2)  # 1 Hz, 2 bytes a second: 11 s of speech became 49 hours of work
    damaged = tmp_path / "rate1.wav"
    damaged.write_bytes(bytes(wav))
    result = run(str(damaged))
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    assert "says 1 Hz" in err.splitlines()[0] and "1 of 1 file(s) failed" in err, err
    wav[24:32] = struct.pack("<II", 7350, 14700)  # a rate MPEG-4 audio has: slow speech, but audio
    damaged.write_bytes(bytes(wav))
    result = run(str(damaged))
    assert result.returncode == 0 and result.stdout.strip(), result.stderr.decode()


def test_standard_output_that_cannot_be_written_is_a_one_line_error():
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, "-m", "captiond", "transcribe", str(CORPUS / "ps_forever.wav")],
                                stdout=full, stderr=subprocess.PIPE, timeout=300, cwd=ROOT)
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    assert "cannot write the transcript of" in err and "No space left on device" in err, err


def test_an_output_dir_that_cannot_be_made_is_a_one_line_error(tmp_path):
    (tmp_path / "taken").write_text("a file where the folder should go")
    result = run(str(CORPUS / "ps_forever.wav"), "--output-dir", str(tmp_path / "taken" / "out"))
    err = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--output-dir" in err and "cannot create it (Not a directory)" in err


def test_an_output_disk_that_fills_leaves_no_truncated_transcript_under_its_name(small_disk):
    with open(small_disk / "filler", "wb", buffering=0) as filler, pytest.raises(OSError):
        while True:  # the disk full to its last page
            filler.write(b"x" * 1024)
    result = run(str(CORPUS / "ps_forever.wav"), "--format", "json", "--output-dir", str(small_disk))
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    assert "cannot write" in err and "No space left on device" in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # nothing half-written, under any name


def test_names_that_are_not_utf8_or_hold_newlines_and_escapes_stay_on_one_line(tmp_path):
    odd = os.fsdecode(b"bad\xff\xfe\x1b[31mname.wav")
    (tmp_path / odd).write_bytes((CORPUS / "ps_forever.wav").read_bytes())
    missing = str(tmp_path / "one\ntwo.wav")
    result = run(str(tmp_path / odd), missing, str(CORPUS / "ps_forever.wav"), "--format", "json",
                 "--output-dir", str(tmp_path / "out"))
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err and "\x1b" not in err, err
    assert "one\\ntwo.wav: no such file" in err  # the newline shown, not obeyed
    written = json.loads((tmp_path / "out" / os.fsdecode(b"bad\xff\xfe\x1b[31mname.json")).read_text(errors="surrogateescape"))
    assert written["file"].endswith("bad\\xff\\xfe\x1b[31mname.wav") and written["segments"]  # JSON escapes ESC
    assert (tmp_path / "out" / "ps_forever.json").exists()  # the file after them is still done


def test_an_output_name_too_long_is_refused_before_any_work_and_a_symlinked_target_is_written_through(tmp_path):
    long_input = tmp_path / ("x" * 251 + ".wav")  # 255 bytes: its .json would be 256
    long_input.write_bytes((CORPUS / "ps_forever.wav").read_bytes())
    result = run(str(long_input), "--format", "json", "--output-dir", str(tmp_path / "out"))
    err = result.stderr.decode()
    assert result.returncode == 2 and "longer than 255 bytes" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    kept = tmp_path / "elsewhere.txt"
    kept.write_text("old")
    kept.chmod(0o640)
    (tmp_path / "out" / "ps_forever.txt").symlink_to(kept)
    assert run(str(CORPUS / "ps_forever.wav"), "--output-dir", str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out" / "ps_forever.txt").is_symlink() and "forever" in kept.read_text().lower()
    assert kept.stat().st_mode & 0o777 == 0o640  # its mode kept


def test_a_pipe_is_read_once_and_a_fifo_as_the_output_is_written_into_not_replaced(tmp_path):
    # The duration probe read the pipe, and the decode then found it empty ("not audio PyAV can
    # read") or, on a FIFO, waited for ever; an output that was a FIFO or device was replaced by a file.
    out = tmp_path / "out"
    out.mkdir()
    fifo = tmp_path / "captions.fifo"
    os.mkfifo(fifo)
    (out / "stdin.txt").symlink_to(fifo)
    read = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()), daemon=True)
    reader.start()
    with open(CORPUS / "ps_forever.wav", "rb") as wav:
        writer = subprocess.Popen(["cat"], stdin=wav, stdout=subprocess.PIPE)
        result = run("/dev/stdin", "--output-dir", str(out), stdin=writer.stdout)
        writer.wait()
    reader.join(30)
    assert result.returncode == 0, result.stderr.decode()
    assert fifo.is_fifo() and "forever" in read[0].lower()


def test_two_inputs_with_the_same_stem_are_refused_before_any_work(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "talk.wav").write_bytes((CORPUS / "ps_forever.wav").read_bytes())
    result = run(str(tmp_path / "a/talk.wav"), str(tmp_path / "b/talk.wav"), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and b"would both be written to" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_chunk_that_loops_is_cut_back_to_one_saying():
    decoder = ShortWindowLoops("word, " * 6)  # it loops whatever window it hears
    transcript = transcribe_file(CORPUS / "mfa_words.wav", decoder, Config())
    assert " ".join(s.text for s in transcript.segments) == "word,"
    assert decoder.windows == [SHORT], "a file's chunk is decoded once: its fallback samples again already"


def test_a_loop_cut_from_a_chunk_leaves_its_other_segments_as_they_were():
    def seg(text, start, p):
        words = tuple(Word(w, start + 0.3 * i, start + 0.3 * i + 0.25, 0.9) for i, w in enumerate(text.split()))
        return Segment(start, words[-1].end + 0.1, text, words, p, 0.01)

    segments = (seg("Thank you. " * 3, 0.0, -0.5), seg("And then we", 3.0, -0.1), seg("went home.", 5.0, -0.2))
    looped = Transcript(" ".join(s.text for s in segments), segments, "en", -0.5, 1.5, 0.01, 6.0, 0.1)
    kept, cut = looped.unlooped(TINY_EN)
    assert cut and [s.text for s in kept.segments] == ["Thank you.", "And then we", "went home."]
    assert kept.segments[1:] == segments[1:] and kept.segments[0].start == 0.0
