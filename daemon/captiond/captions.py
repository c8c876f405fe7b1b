"""Live captions in a terminal: the open utterance's partial rewritten in place, finals scrolling."""

from __future__ import annotations

import shutil
import textwrap
import time
import unicodedata
from pathlib import Path
from typing import Callable, TextIO

from .client import connect_when_running
from .events import NOT_PARTIAL, Envelope, Error, Final, Hello, Partial, Status, one_line

_DIM = "\x1b[2m"
_RESET = "\x1b[0m"
_CLEAR_LINE = "\r\x1b[2K"
_AWAY = ("device_lost", "overloaded", "paused", "stopping")  # states a caption viewer is told of


def _columns(c: str) -> int:
    """Terminal columns one character takes: two for wide and fullwidth ones (CJK), none for a combining mark."""
    if unicodedata.combining(c):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def _newest(text: str, width: int) -> str:
    """The end of text that fits in `width` columns, after "…" when some of it had to go."""
    if sum(map(_columns, text)) <= width:
        return text
    used, start = 1, len(text)  # 1: the "…"
    while start and used + _columns(text[start - 1]) <= width:
        start -= 1
        used += _columns(text[start])
    while start < len(text) and not _columns(text[start]):  # marks whose letter did not fit
        start += 1
    return "…" + text[start:]


class CaptionView:
    """Turns events into terminal output; holds the one partial line currently shown."""

    def __init__(self, out: TextIO, color: bool = True, timestamps: bool = False, terminal: bool = True,
                 notes: TextIO | None = None) -> None:
        self._out = out
        self._notes = notes or out
        """Where the bracketed lines about the connection and the daemon go (stderr into a file)."""
        self._color = color
        # Rewriting a line in place needs a terminal: into a file every partial would stay, each
        # behind a carriage return and an erase sequence; and a file's sentences stay one line each.
        self._terminal = terminal
        self.partials = terminal
        """Partials are shown (and so asked for: the daemon decodes none that no subscriber is sent)."""
        self._timestamps = timestamps
        self._partial_shown = False
        self._away = False  # the daemon's last state said was not listening

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size((80, 24)).columns)

    def _clear_partial(self) -> None:
        if self._partial_shown:
            self._out.write(_CLEAR_LINE)
            self._partial_shown = False

    def note(self, text: str) -> None:
        """A bracketed line about the connection or the daemon, never mixed into a partial."""
        self._clear_partial()
        self._notes.write(f"[{one_line(text)}]\n")
        self._notes.flush()

    def show(self, env: Envelope) -> None:
        """Render one event."""
        event = env.event
        if isinstance(event, Partial):
            if not self.partials:
                return
            # One row, counted in columns: a partial that wraps leaves rows _CLEAR_LINE cannot reach.
            text = _newest(event.text, self._width() - 1)
            self._out.write(_CLEAR_LINE + (f"{_DIM}{text}{_RESET}" if self._color else text))
            self._partial_shown = True
        elif isinstance(event, Final):
            self._clear_partial()
            if event.text:
                stamp = time.strftime("%H:%M:%S ", time.localtime(env.ts)) if self._timestamps else ""
                lines = textwrap.wrap(stamp + event.text, self._width(), subsequent_indent=" " * len(stamp)) \
                    if self._terminal else [stamp + event.text]
                self._out.write("\n".join(lines) + "\n")
        elif isinstance(event, Status):
            # Listening again is said too: else the last line shown said paused, device_lost or
            # starting (a daemon restarted) until someone spoke.
            if event.state in _AWAY or (event.state == "listening" and self._away):
                self.note(f"{event.state}{': ' + event.detail if event.detail else ''}")
            self._away = event.state != "listening"
        elif isinstance(event, Hello):
            self._away = event.state != "listening"
            self.note(f"connected: model {event.model}, {event.state}; Ctrl-C to quit")
        elif isinstance(event, Error):
            self.note(f"daemon error: {event.message}")
        self._out.flush()


def follow(path: Path, view: CaptionView, retry_s: float = 1.0,
           sleep: Callable[[float], None] = time.sleep) -> None:
    """Show captions for ever: reconnect when the daemon goes away, catching up on missed finals."""
    last_seq: int | None = None
    while True:
        with connect_when_running(path, view.note, retry_s, sleep) as client:
            try:
                events = client.events()
                hello = next(events, None)
                if hello is None:  # closed at once: a daemon stopping or starting; do not spin on it
                    sleep(retry_s)
                    continue
                view.show(hello)
                # The same daemon as before (its seq went on, not back to 0): replay finals we missed.
                since = last_seq if last_seq is not None and hello.seq >= last_seq else None
                types = None if view.partials else NOT_PARTIAL
                if since is not None or types is not None:
                    client.subscribe(types, since)
                last_seq = hello.seq
                for env in events:
                    view.show(env)
                    last_seq = max(last_seq, env.seq)
            except BrokenPipeError:  # our output was closed (`captiond captions | head`); client.py names its own
                raise
            except ConnectionError as exc:  # refused (too many clients), broken, or not captiond at all
                view.note(f"{exc}; trying again in {retry_s:g} s")
                sleep(retry_s)
                continue
        view.note("connection to captiond lost; reconnecting")
        sleep(retry_s)  # a peer that says hello and hangs up at once must not be reconnected to in a tight loop
