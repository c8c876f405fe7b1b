"""Live captions in a terminal: the open utterance's partial rewritten in place, finals scrolling."""

from __future__ import annotations

import shutil
import textwrap
from typing import TextIO

_DIM = "\x1b[2m"
_RESET = "\x1b[0m"
_CLEAR_LINE = "\r\x1b[2K"


class CaptionView:
    """Turns events into terminal output; holds the one partial line currently shown."""

    def __init__(self, out: TextIO, color: bool = True) -> None:
        self._out = out
        self._color = color
        self._partial_shown = False

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size((80, 24)).columns)

    def _clear_partial(self) -> None:
        if self._partial_shown:
            self._out.write(_CLEAR_LINE)
            self._partial_shown = False

    def show(self, event: dict) -> None:
        """Render one event."""
        kind = event.get("type")
        if kind == "partial":
            text = event.get("text", "")
            width = self._width() - 1
            if len(text) > width:  # keep the newest words visible on one line
                text = "…" + text[-(width - 1):]
            self._out.write(_CLEAR_LINE + (f"{_DIM}{text}{_RESET}" if self._color else text))
            self._partial_shown = True
        elif kind == "final":
            self._clear_partial()
            if event.get("text"):
                self._out.write("\n".join(textwrap.wrap(event["text"], self._width())) + "\n")
        elif kind == "status" and event.get("state") in ("device_lost", "overloaded", "paused", "stopping"):
            self._clear_partial()
            self._out.write(f"[{event['state']}{': ' + event['detail'] if event.get('detail') else ''}]\n")
        elif kind == "hello":
            self._out.write(f"[connected: model {event.get('model')}, {event.get('state')}; Ctrl-C to quit]\n")
        elif kind == "error":
            self._clear_partial()
            self._out.write(f"[daemon error: {event.get('message')}]\n")
        self._out.flush()
