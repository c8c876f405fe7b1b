"""Log lines that say whose they are: the microphone's worker, or a client's session."""

from __future__ import annotations

import logging
from typing import Any


class Named(logging.LoggerAdapter):
    """A logger whose lines say whose they are ("microphone: utterance 3: ...")."""

    def __init__(self, logger: logging.Logger, name: str) -> None:
        super().__init__(logger)
        # A name a client chose (a Wyoming client's socket path) is shown escaped and never formatted:
        # a newline would forge log lines, a % would lose every one of them.
        self.prefix = repr(name[:200])[1:-1].replace("%", "%%")

    def process(self, msg: Any, kwargs: Any) -> tuple[str, Any]:
        """The message after the name."""
        return f"{self.prefix}: {msg}", kwargs
