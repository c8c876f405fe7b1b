"""Dictation through the real parts: speech into the virtual microphone → daemon with the real model →
`captiond type --with xdotool` → keys in a real X server (Xvfb) → a Tk text field that has the focus."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from captiond.client import Client
from captiond.config import DictationConfig
from captiond.dictation import NOT_TYPED, Composer, push_to_talk, vocabulary_casing
from captiond.events import decode
from conftest import CORPUS, ROOT, Daemon, EventLog, clip, read_wav, silence, trimmed, write_wav
from wer import corpus_wer, normalize
from xsession import XServer, missing_tools

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def xserver():
    missing = missing_tools()
    if missing:
        pytest.skip(f"the X tests need {', '.join(missing)}: apt-get install xvfb xdotool python3-tk "
                    "(make setup installs them)")
    with XServer() as x:
        yield x


@pytest.fixture(scope="module")
def daemon(vmic, tmp_path_factory):
    # These tests count one final per clip. gate.sentence_end_ms ends an utterance at a pause inside a
    # clip when the early final is done within it ("… many books." + "But, there's …"), which depends
    # on the machine's speed: off here; the e2e and unit tests cover it.
    daemon = Daemon(tmp_path_factory.mktemp("dictation"), "--source", "mic", "--set", "gate.sentence_end_ms=0",
                    env=vmic.env)
    try:
        daemon.connect().close()
        yield daemon
    finally:
        daemon.kill()


def ptt(daemon: Daemon, action: str) -> str:
    done = subprocess.run([sys.executable, "-m", "captiond", "ptt", action, "--set", f"server.socket={daemon.socket}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@contextlib.contextmanager
def typing_into_a_field(xserver, daemon, tmp_path, *settings: str):
    """A focused text field and `captiond type --with xdotool [--set …]` typing into it, the daemon listening."""
    assert ptt(daemon, "start") == "listening"
    box = xserver.field(tmp_path / "field.txt")
    err = tmp_path / "type.stderr"
    typer = subprocess.Popen([sys.executable, "-m", "captiond", "type", "--with", "xdotool",
                              "--set", f"server.socket={daemon.socket}", *settings], env=xserver.env, cwd=ROOT,
                             stderr=open(err, "wb"))
    try:
        deadline = time.monotonic() + 60
        while "[connected: typing finals with xdotool" not in err.read_text():
            assert typer.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        yield box
    finally:
        typer.terminate()
        typer.wait(10)
        box.close()


@pytest.fixture
def field(xserver, daemon, tmp_path):
    """A focused text field that `captiond type` types finals into."""
    with typing_into_a_field(xserver, daemon, tmp_path) as box:
        yield box


def composed(finals: list[dict], phrases: dict[str, str] | None = None) -> str:
    """What a person's keyboard would have made of these finals: the field must hold exactly this."""
    composer, text = Composer(phrases, keeps_capital=vocabulary_casing()), ""  # as `captiond type` does
    for line in finals:
        keys = composer.take(decode(json.dumps(line)).event)
        if keys is not None:
            text = text[: len(text) - keys.erase] + keys.text
    return text


def _last_final(events: EventLog) -> list[dict]:
    last_utt = max(e["utt"] for e in events.of("speech_start"))
    events.wait_for(lambda e: e["type"] == "final" and e["utt"] == last_utt, timeout=60)
    return events.of("final")


def test_speech_is_typed_into_the_focused_window_and_flagged_finals_are_not(vmic, daemon, field, tmp_path):
    six = trimmed(read_wav(CORPUS / "cv_en_22058267.wav"))
    looped = np.concatenate([x for _ in range(6) for x in (six, silence(0.12))])  # "six six six …": a loop
    said = ["mfa_doc_english_slow.wav", "ps_forever.wav"]
    wav = write_wav(tmp_path / "said.wav", np.concatenate([
        silence(2.0), trimmed(read_wav(CORPUS / said[0])), silence(1.5), looped, silence(1.5),
        trimmed(read_wav(CORPUS / said[1])), silence(2.0)]))
    events = EventLog(daemon.socket, {"cmd": "subscribe", "types": ["speech_start", "final"]})
    assert vmic.play(wav).wait(120) == 0
    finals = _last_final(events)
    text = field.wait_for(lambda t: t == composed(finals) and t != "", timeout=30)

    flagged = [f for f in finals if set(f["flags"]) & set(NOT_TYPED)]
    assert flagged and all(f["text"] for f in flagged), f"the looped word must come back flagged: {finals}"
    assert "6" not in text and "six" not in text.lower()
    typed = [f for f in finals if f not in flagged]
    assert len(typed) == 2, f"one final per clip, none from the silence: {typed}"
    assert text[0].isupper() and "  " not in text and text.count(". ") >= 1
    error = corpus_wer([(" ".join(clip(n)["text"] for n in said), text)])
    assert error <= 0.25, f"WER {error:.2f}: {text}"


def test_push_to_talk_off_types_nothing_and_stop_types_at_once(vmic, daemon, field, tmp_path):
    events = EventLog(daemon.socket, {"cmd": "subscribe", "types": ["speech_start", "partial", "final"]})
    assert ptt(daemon, "stop") == "paused"
    unheard = write_wav(tmp_path / "unheard.wav", np.concatenate([read_wav(CORPUS / "mfa_doc_english_t.wav"), silence(0.5)]))
    assert vmic.play(unheard).wait(60) == 0
    assert not events.of("speech_start"), "nothing is heard while push-to-talk is off"

    assert ptt(daemon, "toggle") == "listening"
    player = vmic.play(CORPUS / "jfk_inaugural.wav")  # 11 s; the key is let go in the middle of it
    events.wait_for(lambda e: e["type"] == "partial" and len(e["text"].split()) >= 3, timeout=60)
    # In process, not through `captiond ptt` (tested above): the stop must come before the clip's first
    # pause ends the utterance by itself, and starting a Python on a busy machine can take that long.
    with Client(daemon.socket) as client:
        assert push_to_talk(client, "stop") == "paused"
    final = events.wait_for(lambda e: e["type"] == "final", timeout=30)
    assert "end_of_stream" in final["flags"], "stop finalises the open utterance at once"
    text = field.wait_for(lambda t: t == composed([final]) and t != "", timeout=30)
    assert player.wait(60) == 0

    said = normalize(clip("jfk_inaugural.wav")["text"])
    words = normalize(text)
    # The stop may cut a word in half ("fellow" heard as "fella"): the words before it are the speech's.
    assert len(set(words[:-1]) & set(said)) >= 2, text
    assert len(words) < len(said) - 5, f"what was said after the stop was heard: {text}"
    assert not set(words) & set(normalize(clip("mfa_doc_english_t.wav")["text"])) - set(said), text
    assert ptt(daemon, "start") == "listening"
    assert ptt(daemon, "stop") == "paused"  # nothing is open: nothing more to type
    assert len(events.of("final")) == 1 and field.text == text
    assert ptt(daemon, "start") == "listening"


def test_spoken_commands_press_return_and_backspace_in_a_real_window(xserver, tmp_path):
    from captiond.dictation import Typist
    from captiond.events import Final

    box = xserver.field(tmp_path / "commands.txt")
    try:
        composer, typist = Composer(DictationConfig(commands=True).phrases()), Typist(
            "xdotool", 4, run=lambda argv, **kw: subprocess.run(argv, env=xserver.env, **kw))
        for said in ["Dear John, new line.", "It was great.", "Scratch that.", "Thanks a lot.", "Comma.",
                     "new paragraph see you"]:
            keys = composer.take(Final(1, 0.0, 1.0, said, (), "en", 0.1, ()))
            if keys is not None:
                typist.press(keys)
        expected = "Dear John,\nThanks a lot,\n\nSee you"
        assert composer.text == expected
        box.wait_for(lambda t: t == expected, timeout=30)
    finally:
        box.close()


def test_spoken_commands_in_real_speech_act_in_a_real_window(vmic, daemon, xserver, tmp_path):
    # No clip of ours says "new line" or "scratch that": the phrases are set to words clips do say, so
    # the real decoder's capitals and punctuation around them reach the command matching.
    phrases = {"scratch_that": "no", "new_paragraph": "long stop", "period": "that thing"}
    said = ["mfa_doc_english_slow.wav", "cv_en_22058264.wav", "mfa_longstop.wav", "mfa_thoughts.wav"]
    wav = write_wav(tmp_path / "said.wav", np.concatenate(
        [silence(2.0)] + [x for name in said for x in (trimmed(read_wav(CORPUS / name)), silence(2.0))]))
    settings = ["--set", "dictation.commands=true"] + [f"--set=dictation.{k}={v}" for k, v in phrases.items()]
    events = EventLog(daemon.socket, {"cmd": "subscribe", "types": ["speech_start", "final"]})
    with typing_into_a_field(xserver, daemon, tmp_path, *settings) as box:
        assert vmic.play(wav).wait(120) == 0
        events.wait_for(lambda e: sum(x["type"] == "final" and bool(x["text"]) for x in events.events) >= len(said),
                        timeout=60)
        finals = events.of("final")
        heard = [normalize(f["text"]) for f in finals if f["text"]]
        assert [len(heard), heard[3][-2:]] == [4, ["that", "thing"]], heard
        # tiny.en heard "long stop" as "long stuff" once, live under a CI run's load: words to type then.
        stop = heard[2][-2:] == ["long", "stop"]
        expected = composed(finals, DictationConfig(commands=True, **phrases).phrases())
        text = box.wait_for(lambda t: t == expected, timeout=30)
    # tiny.en heard the clip "no" as "No.", as "No, no." (either scratches the sentence before it) and, in
    # a fresh-clone CI run, as "No, no. So thank you.": more than the phrase, so words to type, not a command.
    # A final flagged as doubtful (NOT_TYPED, e.g. possible_hallucination) is not typed: it scratches nothing.
    no = [f for f in finals if f["text"]][1]
    if set(heard[1]) == {"no"} and not set(no["flags"]) & set(NOT_TYPED):
        assert "fox" not in text.lower(), "scratch that deleted the sentence before it"
        assert text.startswith("This is a\n\nI have" if stop else "This is a long"), repr(text)
    else:
        assert "fox" in text.lower(), (repr(text), no)  # nothing scratched it
    if stop:
        assert "\n\n" in text and "stop" not in text, repr(text)
    assert "thing" not in text and text.endswith("about."), repr(text)
