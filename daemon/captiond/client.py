"""Subscriber library: connect to the daemon's socket and read protocol v1 events."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Iterator


class NotRunning(ConnectionError):
    """No daemon answers on the socket; the message says where we looked and what to do."""


class Client:
    """A blocking connection to captiond; iterate over it for events as dicts."""

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise NotRunning(f"captiond is not running: nothing listens on {path} "
                             "(start it with `captiond run`, or pass the daemon's --set server.socket=PATH)") from None
        except PermissionError:
            self._sock.close()
            raise NotRunning(f"not allowed to connect to {path}: the socket belongs to another user "
                             "(see server.group to share it)") from None
        self._file = self._sock.makefile("rb")

    def send(self, command: dict) -> None:
        """Send one command, e.g. {"cmd": "subscribe", "types": ["final"]}."""
        self._sock.sendall((json.dumps(command) + "\n").encode())

    def subscribe(self, types: list[str] | None = None, since: int | None = None) -> None:
        """Ask for only some event types and/or a replay of kept finals after seq `since`."""
        command: dict = {"cmd": "subscribe"}
        if types:
            command["types"] = types
        if since is not None:
            command["since"] = since
        self.send(command)

    def lines(self) -> Iterator[bytes]:
        """Raw JSON lines as they arrive, until the daemon closes the connection."""
        while line := self._file.readline():
            yield line

    def __iter__(self) -> Iterator[dict]:
        for line in self.lines():
            yield json.loads(line)

    def close(self) -> None:
        """Close the connection."""
        self._file.close()
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
