"""Dictation without an X server: what the composer types, the typing tools' command lines, the choice
of tool, and `captiond type` / `captiond ptt` against the real socket (fake decoder)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from captiond.client import Client
from captiond.config import DictationConfig
from captiond.dictation import (NOT_TYPED, Composer, Keys, ToolRun, Typist, TypistError, _type, choose_typist,
                                push_to_talk, type_finals, vocabulary_casing)
from captiond.events import Final
from conftest import CORPUS, ROOT, SPEECH, EventLog, Harness, read_wav, silence, trimmed

COMMANDS = DictationConfig(commands=True).phrases()


def final(text: str, *flags: str) -> Final:
    return Final(1, 0.0, 1.0, text, (), "en", 0.1, flags)


class Field:
    """A text field that BackSpace and typing change, like a real one."""

    def __init__(self) -> None:
        self.text = ""

    def apply(self, keys: Keys | None) -> None:
        if keys is not None:
            self.text = self.text[: len(self.text) - keys.erase] + keys.text


def dictate(*texts: str, phrases=None) -> str:
    composer, field = Composer(phrases), Field()
    for text in texts:
        field.apply(composer.take(final(text)))
        assert composer.text == field.text
    return field.text


@pytest.mark.parametrize("said, typed", [
    (["Hello there.", "How are you?"], "Hello there. How are you?"),
    (["hello there"], "Hello there"),
    (["I went to the", "Store and back."], "I went to the store and back."),
    (["so", "I think I'm right."], "So I think I'm right."),
    (["We met", "NASA people."], "We met NASA people."),
    (["Yes!", "and then..."], "Yes! And then..."),
    (["Well,", "Maybe."], "Well, maybe."),
    (["One.", "new line", "Two."], "One. New line two."),  # commands are off: words as said
])
def test_spaces_and_capitals_between_finals_as_a_person_types_them(said, typed):
    assert dictate(*said) == typed


@pytest.mark.parametrize("said, typed", [
    (["We flew to", "Paris on Monday."], "We flew to Paris on Monday."),
    (["Then", "John said so."], "Then John said so."),
    (["I went to the", "Store and back."], "I went to the store and back."),
    (["Well,", "Maybe."], "Well, maybe."),
    (["so", "The end."], "So the end."),
    (["I think", "Yes, however", "Yeah."], "I think yes, however yeah."),
    (["and", "Hello there"], "And hello there"),
])
def test_names_keep_their_capital_where_a_sentence_goes_on(said, typed):
    composer, field = Composer(keeps_capital=vocabulary_casing()), Field()  # the bundled tokenizer's
    for text in said:
        field.apply(composer.take(final(text)))
    assert field.text == typed


@pytest.mark.parametrize("flag", NOT_TYPED)
def test_flagged_finals_are_never_typed_and_change_nothing(flag):
    composer = Composer()
    assert composer.take(final("Hello.")) == Keys(0, "Hello.")
    assert composer.take(final("Thank you.", flag)) is None
    assert composer.take(final("   ")) is None
    assert composer.take(final("Bye.")) == Keys(0, " Bye.")


def test_a_final_ended_by_finalize_or_a_split_is_typed():
    composer = Composer()
    assert composer.take(final("Hello", "end_of_stream")) == Keys(0, "Hello")
    assert composer.take(final("There we go.", "max_length")) == Keys(0, " there we go.")


@pytest.mark.parametrize("said, typed", [
    (["Dear John, new line.", "Thanks."], "Dear John,\nThanks."),
    (["First. New paragraph. Second."], "First.\n\nSecond."),
    (["Hello period how are you"], "Hello. How are you"),
    (["Hello there, comma, how are you?"], "Hello there, how are you?"),
    (["Hello there.", "Comma.", "And you?"], "Hello there, and you?"),
    (["Hi newline there."], "Hi\nThere."),
    (["One.", "Two.", "Scratch that."], "One."),
    (["One.", "Two.", "Scratch that.", "Three."], "One. Three."),
    (["One.", "Two.", "Scratch that.", "Scratch that."], ""),
    (["Hello world, scratch that. Goodbye."], "Goodbye."),
    (["Hello there,", "Period.", "Scratch that."], "Hello there,"),
    (["Scratch that."], ""),
])
def test_spoken_commands(said, typed):
    assert dictate(*said, phrases=COMMANDS) == typed


def test_command_phrases_come_from_the_config():
    phrases = DictationConfig(commands=True, period="full stop", scratch_that="").phrases()
    assert dictate("It works full stop", "Scratch that.", phrases=phrases) == "It works. Scratch that."
    assert dictate("A period of time, comma", phrases=phrases) == "A period of time,"
    assert DictationConfig().phrases() == {}, "spoken commands are off by default"


def test_scratch_that_deletes_with_backspaces():
    composer = Composer(COMMANDS)
    composer.take(final("One."))
    composer.take(final("Two three."))
    assert composer.take(final("Scratch that.")) == Keys(len(" Two three."), "")
    assert composer.take(final("Scratch that.")) == Keys(len("One."), "")
    assert composer.take(final("Scratch that.")) is None


def test_a_final_the_tool_failed_to_type_is_not_taken_as_typed():
    # "Scratch that." pressed BackSpace 37 times over the user's own text, for a final that xdotool had
    # failed to type (BadWindow); spaces and capitals after it assumed it was there.
    runs = []

    def run(argv, **kw):
        runs.append(argv)
        return subprocess.CompletedProcess(argv, 1 if len(runs) == 2 else 0, "", "X Error: BadWindow\n")

    composer, typist, notes = Composer(COMMANDS), Typist("xdotool", run=run), []
    for text in ("One.", "Two three four five.", "Scratch that."):
        _type(final(text), composer, typist, notes.append)
    assert "could not type" in notes[1]
    assert runs[-1] == ["xdotool", "key", "--delay", "4", *["BackSpace"] * len("One.")]  # One. goes, nothing more
    assert composer.text == ""


def test_tool_command_lines():
    keys = Keys(2, "a\n-b")
    assert Typist("xdotool", 7).commands(keys) == [
        ToolRun(["xdotool", "key", "--delay", "7", "BackSpace", "BackSpace"]),
        ToolRun(["xdotool", "type", "--delay", "7", "--", "a"]),
        ToolRun(["xdotool", "key", "--delay", "7", "Return"]),
        ToolRun(["xdotool", "type", "--delay", "7", "--", "-b"])]
    assert Typist("wtype", 0).commands(Keys(1, "x")) == [
        ToolRun(["wtype", "-d", "0", "-k", "BackSpace"]), ToolRun(["wtype", "-d", "0", "--", "x"])]
    assert Typist("ydotool", 3).commands(Keys(1, "\nx")) == [
        ToolRun(["ydotool", "key", "--delay", "0", "--key-delay", "3", "backspace"]),
        ToolRun(["ydotool", "key", "--delay", "0", "--key-delay", "3", "enter"]),
        ToolRun(["ydotool", "type", "--delay", "0", "--key-delay", "3", "--file", "-"], "x")]


def test_a_failing_tool_is_a_typist_error_with_its_message():
    def run(argv, **kw):
        return subprocess.CompletedProcess(argv, 1, "", "Error: Can't open display: :9\n")

    with pytest.raises(TypistError, match=r"xdotool exited 1: Error: Can't open display: :9"):
        Typist("xdotool", run=run).press(Keys(0, "hi"))


@pytest.mark.parametrize("env, tools, chosen", [
    ({"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"}, {"wtype", "xdotool", "ydotool"}, "wtype"),
    ({"DISPLAY": ":0"}, {"wtype", "xdotool", "ydotool"}, "xdotool"),
    ({"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"}, {"xdotool", "ydotool"}, "ydotool"),  # xdotool reaches X apps only
    ({}, {"wtype", "xdotool", "ydotool"}, "ydotool"),
])
def test_the_tool_is_chosen_for_the_session(env, tools, chosen):
    assert choose_typist("auto", env, which=lambda name: name if name in tools else None).name == chosen


@pytest.mark.parametrize("name, env, tools, message", [
    ("auto", {"DISPLAY": ":0"}, set(), "install xdotool (apt install xdotool)"),
    ("auto", {"WAYLAND_DISPLAY": "w"}, {"xdotool"}, "install wtype (apt install wtype)"),
    ("auto", {}, set(), "apt install ydotool"),
    ("ydotool", {"DISPLAY": ":0"}, {"xdotool"}, "--with ydotool: ydotool is not installed; install it with apt install ydotool"),
    ("xdotool", {"WAYLAND_DISPLAY": "w"}, {"xdotool"}, "$DISPLAY is not set"),
    ("wtype", {"DISPLAY": ":0"}, {"wtype"}, "$WAYLAND_DISPLAY is not set"),
])
def test_no_usable_tool_names_what_to_install(name, env, tools, message):
    with pytest.raises(TypistError) as err:
        choose_typist(name, env, which=lambda n: n if n in tools else None)
    assert message in str(err.value)


def test_type_without_any_tool_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path), "DISPLAY": ":0"}
    env.pop("WAYLAND_DISPLAY", None)
    result = subprocess.run([sys.executable, "-m", "captiond", "type"], env=env, capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "captiond: error: no typing tool for this X11 session: install xdotool (apt install xdotool)"]


def test_a_second_type_for_the_same_daemon_is_refused(tmp_path):
    # Two typed every final twice, with no word of it (an autostart entry and a window manager's exec).
    tool = tmp_path / "xdotool"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "DISPLAY": ":0", "XDG_RUNTIME_DIR": str(tmp_path)}
    env.pop("WAYLAND_DISPLAY", None)
    argv = [sys.executable, "-m", "captiond", "type", "--set", f"server.socket={tmp_path / 'none.sock'}"]
    first = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert "waiting for it" in first.stderr.readline()  # past the lock, it waits for the daemon
        second = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"captiond: error: another captiond type (pid {first.pid}) is typing these finals already; two "
            "would type each twice: stop that one first"]
    finally:
        first.kill()
        first.wait()
    # Once it is gone, the next one may type.
    third = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = third.stderr.readline()
        assert "another captiond type" not in line, line
    finally:
        third.kill()
        third.wait()


def test_ptt_without_a_daemon_fails_clearly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "captiond", "ptt", "toggle", "--set",
                             f"server.socket={tmp_path}/none.sock"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("captiond: error: captiond is not running") and result.stderr.count("\n") == 1


class Recorder:
    """A typist that keeps what it was asked to type."""

    name = "recorder"

    def __init__(self) -> None:
        self.field = Field()
        self.presses = threading.Semaphore(0)

    def press(self, keys: Keys) -> None:
        self.field.apply(keys)
        self.presses.release()


class Stop(Exception):
    pass


def _stop_at_second():
    """A sleep that ends type_finals at its second wait: the pause after a lost connection, then the
    wait for a daemon that is not running."""
    sleeps = []

    def sleep(_seconds):
        sleeps.append(_seconds)
        if len(sleeps) >= 2:
            raise Stop
    return sleep


def test_ptt_stop_types_the_open_utterance_at_once_and_start_listens_again(tmp_path):
    h = Harness(tmp_path, tmp_path / "t.log")
    events = EventLog(h.sock)
    h.say(silence(0.3))
    events.wait_for(lambda e: e.get("state") == "listening")
    typist, notes = Recorder(), []
    typer = threading.Thread(target=lambda: pytest.raises(Stop, type_finals, h.sock, Composer(), typist,
                                                          notes.append, sleep=_stop_at_second()), daemon=True)
    typer.start()
    deadline = time.monotonic() + 30  # connected before anything is said
    while not any(n.startswith("connected:") for n in notes):
        assert time.monotonic() < deadline, notes
        time.sleep(0.01)
    h.say(trimmed(read_wav(CORPUS / "ps_forever.wav"))[:16000])  # said, not ended by a pause: the pipe stalls
    events.wait_for(lambda e: e["type"] == "speech_start")
    h.wait_captured()
    with Client(h.sock, timeout=30) as client:
        assert push_to_talk(client, "stop") == "paused"
    assert typist.presses.acquire(timeout=30)
    final = events.wait_for(lambda e: e["type"] == "final")
    assert "end_of_stream" in final["flags"] and typist.field.text == "H" + final["text"][1:]
    with Client(h.sock, timeout=30) as client:
        assert push_to_talk(client, "toggle") == "listening"
    h.say(SPEECH)
    assert typist.presses.acquire(timeout=30)
    second = events.wait_for(lambda e: e["type"] == "final" and e["utt"] == 2)
    assert typist.field.text == f"{'H' + final['text'][1:]} {second['text']}"
    with Client(h.sock, timeout=30) as client:
        assert push_to_talk(client, "toggle") == "paused"
        assert push_to_talk(Client(h.sock, timeout=30), "start") == "listening"
    h.end()
    typer.join(30)
    assert not typer.is_alive()
    assert notes[0].startswith("connected: typing finals with recorder")
    assert "connection to captiond lost; reconnecting" in notes and "waiting for it" in notes[-1]
    assert [n for n in notes if n.startswith("typed: ")] == [f"typed: {final['text']}", f"typed: {second['text']}"]


def test_dictation_keys_are_checked_and_never_make_the_daemon_restart():
    from captiond.config import Config, ConfigError, from_dict
    from captiond.reloader import plan

    for table, key in [({"typer": "xdotol"}, "dictation.typer"), ({"key_delay_ms": -1}, "dictation.key_delay_ms"),
                       ({"comma": "co,mma"}, "dictation.comma"), ({"period": "comma"}, "dictation.period"),
                       ({"scratch": "x"}, "dictation.scratch")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            from_dict({"dictation": table})
    change = plan(Config(), from_dict({"dictation": {"commands": True, "key_delay_ms": 20}}))
    assert not change.applied and not change.later


def test_ptt_against_a_daemon_that_never_answers_gives_up_with_one_line(tmp_path):
    import socket

    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(1)  # accepts, never says hello
    try:
        result = subprocess.run([sys.executable, "-m", "captiond", "ptt", "stop", "--set",
                                 f"server.socket={tmp_path}/mute.sock"], capture_output=True, text=True, cwd=ROOT,
                                timeout=60)
    finally:
        mute.close()
    assert result.returncode == 1
    # Not "see `captiond status`": status waits the same 10 s for the same stuck daemon.
    assert result.stderr == "captiond: error: captiond did not answer within 10 s (stopped or stuck?); see its log, " \
                            "or restart it\n"
