"""Log lines that say whose they are: the microphone's worker, or a client's session."""

from __future__ import annotations

import logging
from typing import Any


def shown(text: str, most: int = 200) -> str:
    """A text a client chose, as it may appear in a log line: escaped (a newline would forge lines) and cut."""
    return repr(text[:most])[1:-1]


class Named(logging.LoggerAdapter):
    """A logger whose lines say whose they are ("microphone: utterance 3: ...")."""

    def __init__(self, logger: logging.Logger, name: str) -> None:
        super().__init__(logger)
        # A name a client chose (a Wyoming client's socket path) is never formatted: a % would lose
        # every line of it.
        self.prefix = shown(name).replace("%", "%%")

    def process(self, msg: Any, kwargs: Any) -> tuple[str, Any]:
        """The message after the name."""
        return f"{self.prefix}: {msg}", kwargs
