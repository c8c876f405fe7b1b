"""Dictation: each final typed into the focused window, as a person would type it; push-to-talk.

Composer (pure: finals in, keys out) decides what to type; a Typist (wtype, xdotool or ydotool in a
subprocess) presses the keys; type_finals() connects the two to the daemon's socket.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .client import CLOSED, Client, connect_when_running
from .models import resolve_model
from .events import Final, Hello, Pong, Status

NOT_TYPED = ("withheld", "possible_hallucination", "repetition", "error", "empty")
"""Final flags that keep a final from being typed (docs/protocol.md#final)."""

_UNDO = 100  # finals "scratch that" can reach back through
_TAIL = 4096  # characters of what was typed kept for spacing, capitals and undo
_PUNCT = ".,!?;:"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_I_WORD = re.compile(r"I('[a-z]+)?$")  # "I", "I'm", "I'll": capital wherever they stand


@dataclass(frozen=True)
class Keys:
    """What to press: `erase` BackSpaces, then `text` ("\\n" is the Return key)."""

    erase: int
    text: str


@dataclass(frozen=True)
class _Edit:
    """One final's change to the text field, kept so that "scratch that" can undo it."""

    erased: str
    typed: str


class _Field:
    """The end of the text field as this session typed it, and the keys that made it so."""

    def __init__(self, tail: str) -> None:
        self.text = tail
        self.erase = 0
        """BackSpaces to press first."""
        self.typed = ""
        """Then the text to type."""

    def add(self, text: str) -> None:
        self.text += text
        self.typed += text

    def remove(self, count: int) -> str:
        """Delete `count` characters from the end; returns those of them that were there before this final."""
        undone = min(count, len(self.typed))  # just typed: simply not typed after all
        self.typed = self.typed[: len(self.typed) - undone]
        self.erase += count - undone
        kept = max(0, len(self.text) - count)
        gone = self.text[kept:]
        self.text = self.text[:kept]
        return gone[: len(gone) - undone]


@dataclass(frozen=True)
class _Spoken:
    """A spoken command found among a final's words (a plain str is a word to type)."""

    cmd: str


def _bare(token: str) -> str:
    return re.sub(r"[^\w']+", "", token.lower())


class Composer:
    """Turns finals into keys: spaces and capitals between finals as a person would type, spoken commands.

    `phrases` maps the commands that are on (new_line, new_paragraph, period, comma, scratch_that) to
    their lower-case phrase; empty: every word is typed as said.
    """

    def __init__(self, phrases: Mapping[str, str] | None = None,
                 keeps_capital: Callable[[str], bool] = lambda word: False) -> None:
        # Whisper capitalises every utterance's first word; only a name's capital survives a sentence going on.
        self._keeps_capital = keeps_capital
        self._phrases = sorted(((tuple(p.split()), cmd) for cmd, p in (phrases or {}).items()),
                               key=lambda item: -len(item[0]))  # the longest phrase wins
        self._tail = ""
        self._edits: deque[_Edit] = deque(maxlen=_UNDO)
        self._before: tuple[str, tuple[_Edit, ...]] = ("", ())

    @property
    def text(self) -> str:
        """The end of what this composer typed, as the field should now show it."""
        return self._tail

    def take(self, final: Final) -> Keys | None:
        """The keys for one final; None when nothing is to be typed (flagged, empty, nothing changes)."""
        if set(final.flags) & set(NOT_TYPED) or not final.text.strip():
            return None
        self._before = self._tail, tuple(self._edits)
        field = _Field(self._tail)
        start = len(self._tail)  # where this final's own text begins in field.text
        erased = ""  # what this final deleted of the text before it
        first = True  # the first word of the final (or after a command): its capital is Whisper's guess
        for piece in self._pieces(final.text.split()):
            if not isinstance(piece, _Spoken):
                field.add(self._spaced(field.text, piece, first))
                first = False
                continue
            first = True
            if piece.cmd == "scratch_that":
                # What this final said before it, else the last final typed.
                edit = _Edit(erased, field.text[start:])
                if not edit.typed and not edit.erased:
                    edit = self._edits.pop() if self._edits else edit
                field.remove(len(edit.typed))
                field.add(edit.erased)
                start, erased = len(field.text), ""
            elif piece.cmd in ("new_line", "new_paragraph"):
                field.add("\n" if piece.cmd == "new_line" else "\n\n")
            else:  # period, comma
                if field.text and field.text[-1] in _PUNCT:  # in place of Whisper's own punctuation
                    gone = field.remove(1)
                    if len(field.text) < start:
                        erased, start = gone + erased, len(field.text)
                field.add("." if piece.cmd == "period" else ",")
        if not field.typed and not field.erase:
            return None
        if field.text[start:] or erased:
            self._edits.append(_Edit(erased, field.text[start:]))
        self._tail = field.text[-_TAIL:]
        return Keys(field.erase, field.typed)

    def untake(self) -> None:
        """The keys of the last take() were not typed: the field is as before it, and so are the
        spacing, the capitals and what "scratch that" undoes (it pressed BackSpace over the user's
        own text for a final the tool had failed to type)."""
        self._tail, edits = self._before
        self._edits = deque(edits, maxlen=_UNDO)

    def _pieces(self, tokens: Sequence[str]) -> list[str | _Spoken]:
        """The final's words, with spoken command phrases replaced by the command's name."""
        bare = [_bare(t) for t in tokens]
        out: list[str | _Spoken] = []
        i = 0
        while i < len(tokens):
            for phrase, cmd in self._phrases:
                n = len(phrase)
                if tuple(bare[i:i + n]) == phrase or bare[i] == "".join(phrase):  # "newline" too
                    out.append(_Spoken(cmd))
                    i += n if tuple(bare[i:i + n]) == phrase else 1
                    break
            else:
                out.append(tokens[i])
                i += 1
        return out

    def _spaced(self, before: str, word: str, first: bool) -> str:
        """The word with the space and capital it needs after `before`."""
        line = before.rstrip(" ")
        if not line or line.endswith("\n") or _SENTENCE_END.search(line):
            word = word[:1].upper() + word[1:]
        elif (first and word[:1].isupper() and word[1:] == word[1:].lower() and not _I_WORD.match(word)
              and not self._keeps_capital(word)):
            word = word[:1].lower() + word[1:]  # Whisper starts every utterance with a capital
        if not before or before[-1].isspace() or word[:1] in _PUNCT:
            return word
        return " " + word


def vocabulary_casing() -> Callable[[str], bool]:
    """A test for names: words written capitalised far more often than not ("Paris", "John", "Monday";
    not "The", "Store", "Yes", "However"), read from the bundled Whisper tokenizer's byte-pair
    vocabulary (English spelling habits, whatever model the daemon runs). The more often a spelling
    was seen, the sooner it was merged: it takes fewer tokens, or tokens with lower ids. Words that
    begin sentences are often seen capitalised too, so in one token each the capitalised id must be
    under half the lower-case one. Raises ModelError without the model."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(resolve_model("bundled").target) / "tokenizer.json"))

    def keeps_capital(word: str) -> bool:
        bare = word.rstrip(_PUNCT + "\"')]")
        cap, low = (tokenizer.encode(" " + w, add_special_tokens=False).ids for w in (bare, bare.lower()))
        if len(cap) != len(low):
            return len(cap) < len(low)
        return 2 * cap[0] < low[0] if len(cap) == 1 else cap < low

    return keeps_capital


# --- typing tools ---------------------------------------------------------------------------------

class TypistError(RuntimeError):
    """No way to type, or a typing tool failed; the message says what to install or fix."""


_PACKAGE = {"wtype": "wtype", "xdotool": "xdotool", "ydotool": "ydotool"}  # Debian package of each tool
_TOOL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ToolRun:
    """One run of a typing tool: its command line and what it reads on stdin (None: nothing)."""

    argv: list[str]
    stdin: str | None = None


class Typist:
    """Presses keys with one of the typing tools, one subprocess per run of text or keys."""

    def __init__(self, name: str, key_delay_ms: int = 4,
                 run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
        self.name = name
        self._delay = str(key_delay_ms)
        self._run = run

    def commands(self, keys: Keys) -> list[ToolRun]:
        """The tool's runs for these keys, in order."""
        out: list[ToolRun] = []
        if keys.erase:
            out.append(self._keys("BackSpace", keys.erase))
        for i, line in enumerate(keys.text.split("\n")):
            if i:
                out.append(self._keys("Return", 1))
            if line:
                out.append(self._text(line))
        return out

    def _keys(self, key: str, times: int) -> ToolRun:
        if self.name == "xdotool":
            return ToolRun(["xdotool", "key", "--delay", self._delay, *[key] * times])
        if self.name == "wtype":
            return ToolRun(["wtype", "-d", self._delay, *[a for _ in range(times) for a in ("-k", key)]])
        # ydotool 0.1 (Debian's) names keys after Linux's KEY_* codes.
        name = {"Return": "enter", "BackSpace": "backspace"}[key]
        return ToolRun(["ydotool", "key", "--delay", "0", "--key-delay", self._delay, *[name] * times])

    def _text(self, text: str) -> ToolRun:
        if self.name == "xdotool":
            return ToolRun(["xdotool", "type", "--delay", self._delay, "--", text])
        if self.name == "wtype":
            return ToolRun(["wtype", "-d", self._delay, "--", text])
        return ToolRun(["ydotool", "type", "--delay", "0", "--key-delay", self._delay, "--file", "-"], text)

    def press(self, keys: Keys) -> None:
        """Type the keys into the focused window; TypistError when the tool fails."""
        for run in self.commands(keys):
            presses = len(run.stdin or run.argv[-1]) + len(run.argv)  # at least the keys it presses
            try:
                done = self._run(run.argv, input=run.stdin, capture_output=True, text=True,
                                 timeout=_TOOL_TIMEOUT_S + presses * (int(self._delay) + 5) / 1000)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise TypistError(f"{self.name} failed: {exc}") from None
            if done.returncode != 0:
                why = (done.stderr or "").strip().splitlines()
                raise TypistError(f"{self.name} exited {done.returncode}: {why[-1] if why else 'no message'}")


def choose_typist(name: str, env: Mapping[str, str], key_delay_ms: int = 4,
                  which: Callable[[str], str | None] = shutil.which) -> Typist:
    """The typing tool to use: `name`, or for auto the one that fits the session; TypistError says what to install."""
    wayland, x11 = bool(env.get("WAYLAND_DISPLAY")), bool(env.get("DISPLAY"))
    if name == "auto":
        if wayland and which("wtype"):
            return Typist("wtype", key_delay_ms)
        if x11 and not wayland and which("xdotool"):
            return Typist("xdotool", key_delay_ms)
        if which("ydotool"):
            return Typist("ydotool", key_delay_ms)
        if wayland:
            raise TypistError("no typing tool for this Wayland session: install wtype (apt install wtype), or "
                              "ydotool on GNOME, whose Wayland lacks the protocol wtype needs (apt install ydotool)")
        if x11:
            raise TypistError("no typing tool for this X11 session: install xdotool (apt install xdotool)")
        raise TypistError("no display ($WAYLAND_DISPLAY and $DISPLAY are unset) and no ydotool: run this in your "
                          "desktop session, or install ydotool (apt install ydotool)")
    if not which(name):
        raise TypistError(f"--with {name}: {name} is not installed; install it with apt install {_PACKAGE[name]}")
    if name == "xdotool" and not x11:
        raise TypistError("--with xdotool: $DISPLAY is not set; xdotool types into an X11 session "
                          "(on Wayland use wtype or ydotool)")
    if name == "wtype" and not wayland:
        raise TypistError("--with wtype: $WAYLAND_DISPLAY is not set; wtype types into a Wayland session "
                          "(on X11 use xdotool)")
    return Typist(name, key_delay_ms)


# --- the subscriber ---------------------------------------------------------------------------------

def only_typist(socket_path: Path, env: Mapping[str, str]) -> int | None:
    """Lock this user's typing of `socket_path`'s finals for the process's life and return the lock's
    descriptor; TypistError when another `captiond type` holds it (two typed every final twice: an
    autostart entry and a window manager's `exec` are easy to have both). None where the user has no
    private runtime folder to lock in ($XDG_RUNTIME_DIR)."""
    folder = env.get("XDG_RUNTIME_DIR", "")
    if not folder.startswith("/") or not os.path.isdir(folder):
        return None
    name = hashlib.sha256(os.fsencode(socket_path.absolute())).hexdigest()[:16]
    lock = Path(folder) / f"captiond-type-{name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None  # a folder we may not write in: typing goes on unguarded, as before
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 20).decode(errors="replace").strip()
        os.close(fd)
        raise TypistError(f"another captiond type (pid {holder or '?'}) is typing these finals already; two would "
                          "type each twice: stop that one first") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def type_finals(path: Path, composer: Composer, typist: Typist, note: Callable[[str], None],
                retry_s: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> None:
    """Type every final for ever, reconnecting when the daemon goes away.

    Finals said while disconnected are not typed later: text from the past landing in whatever window
    has the focus now would be worse than missing.
    """
    while True:
        with connect_when_running(path, note, retry_s, sleep) as client:
            try:
                client.subscribe(["final"])
                for env in client.events():
                    if isinstance(env.event, Hello):
                        note(f"connected: typing finals with {typist.name}; Ctrl-C to quit")
                    elif isinstance(env.event, Final):
                        _type(env.event, composer, typist, note)
            except ConnectionError as exc:  # refused (too many clients), broken, or not captiond at all
                note(f"{exc}; trying again in {retry_s:g} s")
                sleep(retry_s)
                continue
        note("connection to captiond lost; reconnecting")
        sleep(retry_s)  # a peer that says hello and hangs up at once must not be reconnected to in a tight loop


def _type(final: Final, composer: Composer, typist: Typist, note: Callable[[str], None]) -> None:
    skip = [f for f in final.flags if f in NOT_TYPED]
    keys = composer.take(final)
    if keys is None:
        if skip and final.text:
            note(f"not typed ({', '.join(skip)}): {final.text}")
        return
    try:
        typist.press(keys)
    except TypistError as exc:
        composer.untake()
        note(f"could not type {keys.text!r}: {exc}")  # the words are still here, in the terminal
        return
    note(f"typed: {final.text}")


# --- push-to-talk -----------------------------------------------------------------------------------

def push_to_talk(client: Client, action: str) -> str:
    """start: resume listening; stop: finalise the open utterance and pause; toggle: whichever fits. The new state."""
    events = client.events()
    hello = next(events, None)
    if hello is None:  # a first line that is not hello is refused by events() itself
        raise ConnectionError("the daemon closed the connection before saying hello")
    if action == "toggle":
        action = "start" if hello.event.state == "paused" else "stop"
    commands = [{"cmd": "resume"}] if action == "start" else [{"cmd": "finalize"}, {"cmd": "pause"}]
    # Only answers from now on; the pong says the commands before it were all answered.
    for command in [{"cmd": "subscribe", "types": []}, *commands, {"cmd": "ping"}]:
        client.send(command)
    state = hello.event.state
    for env in events:
        if isinstance(env.event, Status):
            state = env.event.state
        elif isinstance(env.event, Pong):
            return state
    raise ConnectionError(CLOSED)
